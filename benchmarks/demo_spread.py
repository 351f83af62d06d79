"""How much the demo's printed figure moves when nothing that should matter changes.

    python -m benchmarks.demo_spread [--out DIR] [--epochs 20] [--patience 20]

Trains and evaluates the demo's recipe (utils.demo: the same data, random CLIP and settings as
demo.py) under small perturbations that a second machine would bring anyway: 2 and 1 intra-op
threads (another summation order in every matrix product), the initial weights of the
Bayes-PFL module moved by 1e-6 (a rounding difference of the first step), and a second training
seed. Prints, per run, the epoch of the best validation pixel AP, the stage switch, the mean
training loss of the first and last epoch and the printed figure (unseen-category pixel AUROC,
mean over the demo's three sampling seeds), then the spread (largest minus smallest). With
``--first_step`` it also prints the first optimisation step whose loss differs between 1 and 2
threads, and by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tabulate import tabulate

from models import AnomalyDetector, load_clip
from utils import demo
from utils.misc import set_seed
import utils.training.trainer as trainer_module
from utils.training.trainer import Trainer

PERTURBATIONS = (("2 threads", 2, 0.0, 0), ("1 thread", 1, 0.0, 0),
                 ("weights + 1e-6", 2, 1e-6, 0), ("training seed + 1", 2, 0.0, 1))


class PerturbedTrainer(demo.AveragingTrainer):
    """The demo's trainer with every floating-point parameter of the freshly built Bayes-PFL
    module moved by ``eps`` times a fixed standard-normal draw."""

    def __init__(self, config, eps: float = 0.0, **kwargs):
        super().__init__(config, **kwargs)
        self.eps = eps

    def setup(self) -> None:
        super().setup()
        if self.eps:
            generator = torch.Generator().manual_seed(12345)
            with torch.no_grad():
                for parameter in self.model.parameters():
                    if parameter.dtype.is_floating_point:
                        noise = torch.randn(parameter.shape, generator=generator)
                        parameter.add_(self.eps * noise.to(parameter))


def one_run(out: str, data: str, clip_path: str, threads: int, eps: float, seed: int,
            epochs: int, patience: int) -> dict:
    torch.set_num_threads(threads)
    save = os.path.join(out, f"train_t{threads}_e{eps:g}_s{seed}")
    config = demo.train_config(data, clip_path, save, seed, epochs=epochs, patience=patience)
    config.overwrite = True
    set_seed(seed)
    started = time.time()
    result = demo.train_averaged(config, trainer_class=PerturbedTrainer, eps=eps)
    clip = load_clip(clip_path, image_size=demo.IMAGE_SIZE)
    detector = AnomalyDetector(clip, result.model.eval(), image_size=demo.IMAGE_SIZE,
                               sample_num=10, stage=result.final_stage, layers=demo.LAYERS)
    _, loader = demo.eval_data(data, 333)
    runs = demo.zero_shot_runs(detector, loader, [333, 334, 335])
    losses = [record["losses"]["loss"] for record in result.history]
    return {"threads": threads, "eps": eps, "seed": seed, "figure": demo.mean_pixel_auroc(runs),
            "best_epoch": result.best_epoch.get(1), "switch": result.switch_epoch,
            "first_loss": losses[0], "last_loss": losses[-1], "seconds": time.time() - started}


def first_different_step(data: str, clip_path: str, out: str) -> tuple[int, float, float]:
    """(step, loss at 2 threads, loss at 1 thread) of the first training step whose loss
    differs between the two thread counts."""
    real = trainer_module.optimisation_step
    recorded: dict[int, list[float]] = {}

    def recording(*args, **kwargs):
        losses = real(*args, **kwargs)
        recorded[torch.get_num_threads()].append(float(losses["loss"]))
        return losses

    trainer_module.optimisation_step = recording
    try:
        for threads in (2, 1):
            recorded[threads] = []
            torch.set_num_threads(threads)
            config = demo.train_config(data, clip_path, os.path.join(out, f"steps{threads}"),
                                       333, epochs=1, patience=1)
            config.overwrite = True
            set_seed(333)
            Trainer(config).run()
    finally:
        trainer_module.optimisation_step = real
    for step, (a, b) in enumerate(zip(recorded[2], recorded[1])):
        if a != b:
            return step + 1, a, b
    return 0, recorded[2][-1], recorded[1][-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="./demo_spread")
    p.add_argument("--epochs", type=int, default=demo.EPOCHS)
    p.add_argument("--patience", type=int, default=None,
                   help="default: the demo's (as long as the training)")
    p.add_argument("--first_step", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data")
    if not os.path.isdir(data):
        demo.make_data(data, 333, 24)
    clip_path = os.path.join(args.out, "clip_random.pt")
    if not os.path.isfile(clip_path):
        demo.make_clip(clip_path, 333)
    if args.first_step:
        step, two, one = first_different_step(data, clip_path, args.out)
        print(f"first step whose loss differs between 2 and 1 threads: {step} "
              f"({two!r} against {one!r}, {abs(two - one):.3g} apart)")
    patience = args.epochs if args.patience is None else args.patience
    rows = []
    for label, threads, eps, seed in PERTURBATIONS:
        run = one_run(args.out, data, clip_path, threads, eps, 333 + seed, args.epochs, patience)
        rows.append([label, run["best_epoch"], run["switch"], f"{run['first_loss']:.4f}",
                     f"{run['last_loss']:.4f}", f"{100 * run['figure']:.1f}",
                     f"{run['seconds']:.0f}"])
        print(json.dumps({"run": label, **run}), flush=True)
    print(tabulate(rows, headers=["run", "best val epoch", "switch", "loss epoch 1",
                                  "last loss", "pixel AUROC", "s"], tablefmt="pipe"))
    figures = [float(r[5]) for r in rows]
    print(f"spread of the printed figure: {max(figures) - min(figures):.1f} points "
          f"({min(figures):.1f} to {max(figures):.1f}; epochs {args.epochs}, patience {patience})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
