"""Time and peak memory of one training step, text cut to the needed positions vs all 77.

    python benchmarks/train_step.py                       # ViT-L/14-336 at 518 px, batch 8, fp32
    python benchmarks/train_step.py --device cuda --batch_size 32
    python benchmarks/train_step.py --geometry tiny --image_size 56 --iters 1   # quick check

A step is (a) the frozen image tower, without gradients (``utils.training.encode_images``), then
(b) the Bayes-PFL step (``utils.training.optimisation_step``: ``training_forward``, backward,
Adam step), as ``Trainer.train_epoch`` runs them. (b) is timed with the text tower cut after the
last end token (the default, normal/abnormal pairs packed with their shared prefix), cut but
one sequence per prompt (``model.text_mode = "cut"``), and with all 77 positions
(``model.text_mode = "full"``: the plain computation); (a) does not depend on it and is timed once
per repetition.
"""

from __future__ import annotations

import argparse
from functools import partial
import sys

import torch
from tabulate import tabulate

from benchmarks.common import (PeakMemory, Timer, add_common_flags, benchmark_main, build_models,
                               machine_line)
from utils.training import (
    TrainConfig,
    TrainingStep,
    encode_images,
    make_optimizer,
    optimisation_step,
    set_trainable,
)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(p, batch_size=8)
    p.add_argument("--stage", type=int, default=1, choices=[1, 2])
    return p


def make_batch(args: argparse.Namespace) -> dict:
    """Random images, rectangular defects on every other image, labels, class names."""
    g = torch.Generator().manual_seed(args.seed)
    b, s = args.batch_size, args.image_size
    images = torch.randn(b, 3, s, s, generator=g)
    masks = torch.zeros(b, 1, s, s)
    for i in range(0, b, 2):
        y, x = torch.randint(0, s // 2, (2,), generator=g).tolist()
        masks[i, :, y:y + s // 4, x:x + s // 3] = 1.0
    labels = (masks.flatten(1).amax(1) > 0).long()
    names = [args.class_name[i % len(args.class_name)] for i in range(b)]
    return {"image": images, "mask": masks, "label": labels, "cls_name": names}


# benchmark mode -> (BayesPFL.text_mode, label)
MODES = {"cut": ("packed", "text cut (default, shared prefix packed)"),
         "cut_unpacked": ("cut", "text cut, one sequence per prompt"),
         "full": ("full", "text at 77 positions")}


def set_mode(model, mode: str) -> None:
    model.text_mode = MODES[mode][0]


def run(args: argparse.Namespace, device: torch.device) -> dict:
    clip, model = build_models(args, device)
    model.train()
    set_trainable(model, args.stage)
    optimizer = make_optimizer(model, TrainConfig(), args.stage)
    step = TrainingStep(model, clip)
    batch = make_batch(args)
    masks = batch["mask"].to(device)
    timer = Timer(device)
    peaks = dict.fromkeys(["image", *MODES], 0.0)
    before = 0.0
    scope = ""

    def module_step(mode: str, features, tokens, index: int) -> None:
        set_mode(model, mode)
        optimisation_step(step, optimizer, None, features, tokens, batch["cls_name"],
                          batch["label"], masks, index, args.stage, device, args.precision)

    try:
        features, tokens = encode_images(clip, batch["image"], args.layers, device,
                                         args.precision)
        for i in range(args.warmup):
            for mode in MODES:
                module_step(mode, features, tokens, i % model.prompt_num)
        for i in range(args.iters):
            with PeakMemory(device) as memory, timer("image"):
                features, tokens = encode_images(clip, batch["image"], args.layers, device,
                                                 args.precision)
            peaks["image"] = max(peaks["image"], memory.peak)
            before, scope = before or memory.before, memory.scope
            for mode in MODES:
                with PeakMemory(device) as memory, timer(mode):
                    module_step(mode, features, tokens, i % model.prompt_num)
                peaks[mode] = max(peaks[mode], memory.peak)
        work = {}
        for mode in MODES:
            set_mode(model, mode)
            work[mode] = model.text_work(model.class_tokens(batch["cls_name"]),
                                         model.prompt_num)                  # R = 1
    finally:
        set_mode(model, "cut")
    return {"image": timer.median("image"), "steps": {m: timer.median(m) for m in MODES},
            "peaks": peaks, "before": before, "scope": scope, "text_work": work}


def report(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    image, steps, peaks = result["image"], result["steps"], result["peaks"]
    rows = [[MODES[m][1], image, steps[m], image + steps[m], max(peaks["image"], peaks[m])]
            for m in MODES]
    full = steps["full"]
    for m in ("cut", "cut_unpacked"):
        rows.append([f"ratio {m.replace('_', ' ')} / full", None, steps[m] / full,
                     (image + steps[m]) / (image + full), None])
    print(f"{args.geometry} at {args.image_size} px, layers {' '.join(map(str, args.layers))}, "
          f"stage {args.stage}, batch {args.batch_size}, {args.precision}, median of "
          f"{args.iters} (after {args.warmup} warm-up step(s) of each kind)")
    print(machine_line(device))
    print(tabulate(rows, headers=["", "(a) image tower s", "(b) Bayes-PFL step s",
                                  "whole step s", "peak MiB"],
                   floatfmt=("", ".3f", ".3f", ".3f", ".0f"), missingval=""))
    print(f"peak memory: {result['scope']}; {result['before']:.0f} MiB before the timed calls "
          "(weights, inputs, optimiser state)")
    for m in MODES:
        sequences, positions = result["text_work"][m]
        print(f"text tower per image, {MODES[m][1]}: {sequences} sequences x {positions} "
              f"positions = {sequences * positions}")
    print(f"(a) is {100 * image / (image + steps['cut']):.1f}% of the default step; with (b) "
          f"free the whole-step ratio would still be {image / (image + full):.3f}")


main = partial(benchmark_main, get_parser, run, report)     # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
