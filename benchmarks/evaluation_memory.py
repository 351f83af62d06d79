"""Peak memory of test.py on one class of N test images with maps of S x S pixels.

    python benchmarks/evaluation_memory.py                 # 150 images, 518 px maps
    python benchmarks/evaluation_memory.py --n 30 --image_size 224 --pro off

The model is a tiny random CLIP with the patch of ViT-L/14 (so a 37 x 37 grid at 518 px) and a
random official-format Bayes-PFL checkpoint: the network is small, so the peak is made of what
the evaluation itself holds. The class is written by the synthetic-data generator. Each run is a
fresh process (``--num_workers 0``, so that loading counts too) reporting its own peak resident
set size; a baseline process loads the same weights and scores one image. The sizes of the
arrays one class needs are printed beside the peaks, with the size that a list of per-layer,
per-sample full-size maps would take.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from tabulate import tabulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLASS = "wood"
# Runs a script as __main__ and reports the process's peak resident set size on stderr.
RUN_WITH_PEAK = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""
BASELINE = """
import importlib.util
import sys
import torch
# the modules a test.py run imports
spec = importlib.util.spec_from_file_location("test_script", "test.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from models import AnomalyDetector, BayesPFL, load_clip
from utils.checkpoint import load_checkpoint
clip_path, ckpt, size, r = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
clip = load_clip(clip_path, image_size=size)
model = BayesPFL.from_clip(clip, layers=[1, 2, 3, 4])
load_checkpoint(model, ckpt)
det = AnomalyDetector(clip, model.eval(), image_size=size, sample_num=r, layers=[1, 2, 3, 4])
det.predict(torch.zeros(1, 3, size, size), "wood")
"""


def write_inputs(root: str, n: int, image_size: int, source_size: int, seed: int
                 ) -> tuple[str, str]:
    """The synthetic class (n test images, two thirds anomalous) and the two weight files."""
    import torch

    from benchmarks.common import TINY
    from dataset.synthetic import write_standard
    from models.bayes_pfl import BayesPFL
    from models.weights import build_clip
    from models.random_clip import make_clip_state_dict

    anomalous = (2 * n) // 3
    write_standard(os.path.join(root, "data"), name="synthetic", classes=[CLASS], seed=seed,
                   size=source_size, n_train=1, n_test_good=n - anomalous,
                   n_test_anomaly=anomalous)
    sd = make_clip_state_dict(seed=seed, **TINY)
    clip_path = os.path.join(root, "clip_tiny_p14.pt")
    torch.save(sd, clip_path)
    clip = build_clip(sd, image_size=image_size)
    torch.manual_seed(seed)
    model = BayesPFL.from_clip(clip, layers=[1, 2, 3, 4])
    ckpt = os.path.join(root, "bayes_tiny.pth")
    torch.save({"MyModel": model.state_dict()}, ckpt)
    return clip_path, ckpt


def peak_of(command: list[str]) -> float:
    """Run a Python script with arguments in a fresh process; its peak RSS in MiB."""
    done = subprocess.run([sys.executable, "-c", RUN_WITH_PEAK, *command], cwd=ROOT,
                          capture_output=True, text=True)
    for line in done.stderr.splitlines():
        if line.startswith("PEAK_RSS_KIB"):
            if done.returncode:
                raise RuntimeError(f"{' '.join(command[:2])} failed:\n{done.stderr[-2000:]}")
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no peak reported:\n{done.stderr[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=150, help="test images in the class")
    p.add_argument("--image_size", type=int, default=518, help="S (a multiple of 14)")
    p.add_argument("--source_size", type=int, default=256, help="side of the written images")
    p.add_argument("--sample_num", type=int, default=10, help="R")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--pro", nargs="+", default=["exact", "off"],
                   choices=["exact", "official", "off"], help="one run per AUPRO mode")
    p.add_argument("--vis", action="store_true", help="write the pictures too")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.image_size % 14:
        p.error("--image_size must be a multiple of 14 (the patch of the tiny CLIP)")
    if args.n < 3:
        p.error("--n must be at least 3")

    with tempfile.TemporaryDirectory() as root:
        clip_path, ckpt = write_inputs(root, args.n, args.image_size, args.source_size,
                                       args.seed)
        rows = []
        baseline = os.path.join(root, "baseline.py")
        with open(baseline, "w") as f:
            f.write(BASELINE)
        base = peak_of([baseline, clip_path, ckpt, str(args.image_size), str(args.sample_num)])
        rows.append(["baseline: weights loaded, one image scored", base, 0.0])
        for pro in args.pro:
            command = ["test.py", "--dataset", "synthetic",
                       "--data_path", os.path.join(root, "data"), "--checkpoint_path", ckpt,
                       "--pretrained_path", clip_path, "--image_size", str(args.image_size),
                       "--features_list", "1", "2", "3", "4", "--sample_num",
                       str(args.sample_num), "--batch_size", str(args.batch_size),
                       "--num_workers", "0", "--save_path", os.path.join(root, f"out_{pro}"),
                       "--pro", pro, "--no_progress"] + ([] if args.vis else ["--no_vis"])
            peak = peak_of(command)
            rows.append([f"test.py, --pro {pro}" + ("" if args.vis else ", --no_vis"), peak,
                         peak - base])

    n, s, r = args.n, args.image_size, args.sample_num
    mib = 2 ** 20
    pairs = 3 * r
    print(f"one class of {n} test images, maps {s} x {s}, R {r}, batch {args.batch_size}, "
          f"tiny random CLIP (patch 14, grid {s // 14}), 4 layers")
    print(tabulate(rows, headers=["process", "peak RSS MiB", "above baseline MiB"],
                   floatfmt=("", ".0f", ".0f")))
    sizes = [
        ["maps of the class, float32 [N, S, S]", n * s * s * 4 / mib],
        ["masks of the class, bool [N, S, S]", n * s * s / mib],
        ["smoothed maps, float32 [N, S, S]", n * s * s * 4 / mib],
        ["one batch's working maps: [B, 8 pairs, S, S] float32",
         args.batch_size * 8 * s * s * 4 / mib],
        [f"per-layer, per-sample maps of ONE image: 4 x {pairs} x S x S float32 (never held)",
         4 * pairs * s * s * 4 / mib],
        ["the same for the whole class (never held)", n * 4 * pairs * s * s * 4 / mib],
    ]
    print(tabulate(sizes, headers=["array", "MiB"], floatfmt=("", ".0f")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
