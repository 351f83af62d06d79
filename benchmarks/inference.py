"""Inference latency, throughput and peak memory of the detector on random weights.

    python benchmarks/inference.py                        # ViT-L/14-336 at 518 px, fp32, CPU
    python benchmarks/inference.py --precision bf16
    python benchmarks/inference.py --device cuda --batch_size 8 --tf32
    python benchmarks/inference.py --geometry tiny --image_size 56 --iters 1   # quick check
    python benchmarks/inference.py --k_shot 4             # the few-shot map's cost, K = 4

One forward is timed part by part, calling the same stages ``AnomalyDetector.forward`` calls
(image tower, prompt sampling, text tower, heads, scoring; CUDA is synchronised between parts
only), and end to end through ``predict``. Peak memory covers all timed calls. With
``--precision bf16|fp16`` the scores and maps are also compared with fp32 on the same inputs and
noise. The text-tower work is printed as sequences x positions per image, against the 60 x 77 of
the plain computation (2NR sequences of the full context). With ``--k_shot K`` the few-shot map
of each image against a bank of K references (test.py --k_shot, predict.py --reference) is
timed too, against the zero-shot prediction.
"""

from __future__ import annotations

import argparse
from functools import partial
import sys

import torch
from tabulate import tabulate

from benchmarks.common import (PeakMemory, Timer, add_common_flags, benchmark_main, build_models,
                               machine_line)
from models.bayes_pfl import TEXT_MODES
from models.detector import AnomalyDetector
from models.noise import RunNoise, standard_noise

PARTS = [("image tower", "image"), ("prompt sampling", "sampling"), ("text tower", "text"),
         ("heads (RCA, logits)", "heads"), ("scoring (maps, scores)", "scoring")]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(p, batch_size=1)
    p.add_argument("--sample_num", type=int, default=10, help="R")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2])
    p.add_argument("--no_compare", action="store_true",
                   help="with a lower precision, skip the comparison with fp32")
    p.add_argument("--seeds", type=int, default=1,
                   help="also time an evaluation with this many seeds sharing one image-tower "
                        "pass (test.py --seeds) against one seed")
    p.add_argument("--k_shot", type=int, default=0,
                   help="also time the few-shot map against a bank of this many references")
    p.add_argument("--text", default="packed", choices=TEXT_MODES,
                   help="text tower: normal/abnormal pairs packed with their shared prefix "
                        "(default), one sequence per prompt cut after the last end token, or "
                        "one sequence per prompt at all 77 positions")
    return p


def timed_forward(det: AnomalyDetector, images: torch.Tensor, names: list[str],
                  timer: Timer) -> None:
    """One forward, stage by stage, as ``AnomalyDetector.forward`` runs it."""
    with timer("image"):
        features, tokens = det.encode_images(images)
    with timer("sampling"):
        samples = det.draw_samples(features, None)
    with timer("text"):
        text = det.encode_text(samples, names)
    with timer("heads"):
        image_logits, pixel_logits = det.head_logits(features, tokens, text)
    with timer("scoring"):
        det.score(image_logits, pixel_logits)


def compare_with_fp32(det: AnomalyDetector, images: torch.Tensor, names: list[str],
                      seed: int) -> tuple[float, float]:
    """Max abs difference of image scores and maps against fp32, same inputs and noise."""
    g = torch.Generator().manual_seed(seed + 1)
    r, b, d = det.sample_num, images.shape[0], det.model.prompt_context.shape[-1]
    noise = standard_noise(r, b, d, generator=g)
    reference = AnomalyDetector(det.clip, det.model, det.image_size, det.sample_num, det.stage,
                                det.layers, precision="fp32")
    low = det.predict(images, names, noise)
    full = reference.predict(images, names, noise)
    score = (low["image_score"] - full["image_score"]).abs().max().item()
    amap = (low["anomaly_map"] - full["anomaly_map"]).abs().max().item()
    return score, amap


def run(args: argparse.Namespace, device: torch.device) -> dict:
    clip, model = build_models(args, device)
    model.eval()
    model.text_mode = args.text
    det = AnomalyDetector(clip, model, image_size=args.image_size, sample_num=args.sample_num,
                          stage=args.stage, layers=args.layers, precision=args.precision)
    g = torch.Generator().manual_seed(args.seed)
    b, s = args.batch_size, args.image_size
    images = torch.randn(b, 3, s, s, generator=g).to(device)
    names = [args.class_name[i % len(args.class_name)] for i in range(b)]
    torch.manual_seed(args.seed)
    det.reset_samples()

    timer = Timer(device)
    with torch.no_grad():
        for _ in range(args.warmup):
            timed_forward(det, images, names, Timer(device))
            det.predict(images, names)
        with PeakMemory(device) as memory:
            for _ in range(args.iters):
                timed_forward(det, images, names, timer)
                with timer("predict"):
                    det.predict(images, names)

    if args.seeds > 1:
        result_seeds = time_seeds(det, images, names, args, timer)
    if args.k_shot > 0:
        result_fewshot = time_fewshot(det, images, args, timer)
    sequences, positions = model.text_work(model.class_tokens(names), model.prompt_num
                                           * args.sample_num)
    result = {"parts": {key: timer.median(key) for _, key in PARTS},
              "predict": timer.median("predict"), "memory": memory,
              "text_work": (sequences, positions), "names": names}
    if args.precision != "fp32" and not args.no_compare:
        result["diff"] = compare_with_fp32(det, images, names, args.seed)
    if args.seeds > 1:
        result["seeds"] = result_seeds
    if args.k_shot > 0:
        result["fewshot"] = result_fewshot
    return result


def time_fewshot(det: AnomalyDetector, images: torch.Tensor, args: argparse.Namespace,
                 timer: Timer) -> tuple[float, float, float]:
    """(seconds to build a bank of ``args.k_shot`` references, seconds per batch of the
    few-shot map, the bank's MiB)."""
    g = torch.Generator().manual_seed(args.seed + 2)
    refs = torch.randn(args.k_shot, 3, args.image_size, args.image_size, generator=g)
    with torch.no_grad():
        with timer("bank"):
            bank = det.reference_bank(refs.to(images.device))
        _, tokens = det.encode_images(images)
        for _ in range(args.warmup):
            det.fewshot(tokens, bank)
        for _ in range(args.iters):
            with timer("fewshot"):
                det.fewshot(tokens, bank)
    return timer.median("bank"), timer.median("fewshot"), bank.nbytes() / 2**20


def time_seeds(det: AnomalyDetector, images: torch.Tensor, names: list[str],
               args: argparse.Namespace, timer: Timer) -> tuple[float, float]:
    """(one seed, ``args.seeds`` seeds) seconds per batch of an evaluation step: the image
    tower once, then the prompt samples, text tower, heads and scores of each seed."""
    dim = det.model.prompt_context.shape[-1]
    noises = [RunNoise(args.seed + k, det.sample_num, dim) for k in range(args.seeds)]
    indices = list(range(len(names)))

    def step(count: int) -> None:
        features, tokens = det.encode_images(images)
        for run_noise in noises[:count]:
            det.forward_features(features, tokens, names, run_noise.batch(names, indices))

    with torch.no_grad():
        for _ in range(args.warmup):
            step(args.seeds)
        for _ in range(args.iters):
            with timer("one seed"):
                step(1)
            with timer("seeds"):
                step(args.seeds)
    return timer.median("one seed"), timer.median("seeds")


def report(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    b = args.batch_size
    total = sum(result["parts"].values())
    rows = [[label, result["parts"][key], result["parts"][key] / b,
             100 * result["parts"][key] / total] for label, key in PARTS]
    rows.append(["sum of parts", total, total / b, 100.0])
    rows.append(["predict (end to end)", result["predict"], result["predict"] / b, None])
    print(f"{args.geometry} at {args.image_size} px, layers {' '.join(map(str, args.layers))}, "
          f"R {args.sample_num}, N {args.prompt_num}, stage {args.stage}, batch {b}, "
          f"{args.precision}, text {args.text}, median of {args.iters} (after {args.warmup} "
          "warm-up)")
    print(machine_line(device))
    print(tabulate(rows, headers=["part", "s / batch", "s / image", "% of parts"],
                   floatfmt=("", ".3f", ".3f", ".1f"), missingval=""))
    per_image = result["predict"] / b
    print(f"latency {per_image:.3f} s per image, {1 / per_image:.2f} images/s")
    mem = result["memory"]
    print(f"peak memory {mem.peak:.0f} MiB ({mem.scope}; {mem.before:.0f} MiB before the timed "
          f"calls: weights and inputs)")
    sequences, positions = result["text_work"]
    plain = 2 * args.prompt_num * args.sample_num * 77
    print(f"text tower work per image: {sequences} sequences x {positions} positions = "
          f"{sequences * positions} = {100 * sequences * positions / plain:.1f}% of "
          f"{2 * args.prompt_num * args.sample_num} x 77 (class names of the batch: "
          f"{', '.join(sorted(set(result['names'])))})")
    if "seeds" in result:
        one, many = result["seeds"]
        print(f"{args.seeds} seeds sharing the image tower: {many / b:.3f} s per image against "
              f"{one / b:.3f} s for one seed = {many / one:.2f}x (test.py --seeds)")
    if "fewshot" in result:
        bank, fewshot, mib = result["fewshot"]
        print(f"few-shot map, K = {args.k_shot} references: {fewshot / b:.3f} s per image = "
              f"{100 * fewshot / result['predict']:.1f}% of the zero-shot predict (bank: "
              f"{bank:.2f} s once per class, {mib:.0f} MiB)")
    if "diff" in result:
        score, amap = result["diff"]
        print(f"{args.precision} vs fp32, same inputs and noise: max abs difference "
              f"{score:.2e} (image scores), {amap:.2e} (maps)")


main = partial(benchmark_main, get_parser, run, report)     # main(argv=None) -> exit code


if __name__ == "__main__":
    sys.exit(main())
