"""Where the time of test.py's evaluation loop goes, stage by stage, with and without pictures.

    python benchmarks/pipeline.py              # 120 images in 4 classes, 518 px, 2 workers, batch 8
    python benchmarks/pipeline.py --n 24 --classes 2 --image_size 112 --runs off

The model is a tiny random CLIP with the patch of ViT-L/14 (a 37 x 37 grid at 518 px, so the
maps are full size) and a random Bayes-PFL module (layers 1 2 3 4, R 10): the network costs
little and what remains is the loop's own work. The classes are written by the synthetic-data
generator. ``utils.evaluate.evaluate_runs`` runs as test.py runs it, with clocks around its
parts, per image:

- read: ``AnomalyDataset.__getitem__`` (file reading, resizing, normalising), timed alone in
  this process; in the run the reader workers do it;
- model forward: image tower, text tower, heads and map building (``encode_images`` and
  ``forward_features_shots``), on the model's device;
- main process outside the forward: its wall time less the forward and less its waits (for
  the reader workers and for room in the picture queue), split into the class metrics
  (``evaluate_class``: smoothing, fusion, pixel and image metrics), the picture hand-over and
  the rest (host copies, buffering, receiving batches); and its CPU time (all its threads)
  outside the forward;
- pictures: drawing and writing one picture, timed alone in this process; in the run the
  picture processes do it;
- images per second of the whole run (worker start-up included).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from multiprocessing.reduction import ForkingPickler

import torch
from tabulate import tabulate

from benchmarks.common import TINY, machine_line, synchronize
from dataset.data import AnomalyDataset, make_loader
from dataset.synthetic import write_standard
from dataset.synthetic_scenes import CATEGORIES
from models.bayes_pfl import BayesPFL
from models.detector import AnomalyDetector
from models.random_clip import make_clip_state_dict
from models.weights import build_clip
from utils import evaluate
from utils.cli import Parser, positive_int
from utils.pictures import PictureWriter, class_jobs, default_picture_workers, draw
from utils.visualize import save_rgb

TARGET_OFF_MS = 15.0        # main process outside the forward, pictures off
TARGET_EXTRA_MS = 5.0       # ... and what pictures may add to it


def get_parser() -> Parser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=120,
                   help="test images in all (rounded down to a multiple of --classes)")
    p.add_argument("--classes", type=positive_int, default=4, help="classes they fall into")
    p.add_argument("--image_size", type=positive_int, default=518,
                   help="S, a multiple of 14 (the tiny CLIP's patch)")
    p.add_argument("--source_size", type=positive_int, default=256,
                   help="side of the written images")
    p.add_argument("--sample_num", type=positive_int, default=10, help="R")
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--workers", type=int, default=2, help="DataLoader reader workers")
    p.add_argument("--picture_workers", type=positive_int, default=default_picture_workers(),
                   help="picture processes (default: test.py's, 2 at most the CPUs)")
    p.add_argument("--runs", nargs="+", default=["off", "on"], choices=["off", "on"],
                   help="runs without and with pictures")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:INDEX")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--gpu_forward_ms", type=float, default=None,
                   help="a GPU's forward time per image, for the GPU-machine estimate")
    p.add_argument("--cores", type=positive_int, default=16,
                   help="CPU cores of the GPU machine in the estimate")
    p.add_argument("--seed", type=int, default=0)
    return p


def write_inputs(root: str, args) -> tuple[str, AnomalyDetector]:
    """The synthetic classes (n / classes images each, two thirds of them anomalous) and the
    tiny detector."""
    per_class = args.n // args.classes
    data = os.path.join(root, "data")
    write_standard(data, name="synthetic", classes=list(CATEGORIES)[:args.classes],
                   seed=args.seed, size=args.source_size, n_train=0,
                   n_test_good=per_class - (2 * per_class) // 3,
                   n_test_anomaly=(2 * per_class) // 3)
    device = torch.device(args.device)
    clip = build_clip(make_clip_state_dict(seed=args.seed, **TINY), image_size=args.image_size)
    clip.requires_grad_(False)
    clip = clip.eval().to(device)
    torch.manual_seed(args.seed)
    model = BayesPFL.from_clip(clip, layers=[1, 2, 3, 4]).eval()
    detector = AnomalyDetector(clip, model, image_size=args.image_size,
                               sample_num=args.sample_num, layers=[1, 2, 3, 4])
    return data, detector


class Clocks:
    """Wall and CPU seconds of named parts of the main process."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            synchronize(self.device)
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return timed


class TimedLoader:
    """A loader whose waits for the next batch are clocked as "loader wait"."""

    def __init__(self, loader, clocks: Clocks):
        self.loader, self.dataset, self.clocks = loader, loader.dataset, clocks
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            with self.clocks.part("loader wait"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def one_run(detector: AnomalyDetector, dataset, args, vis_dir: str | None) -> dict:
    """One evaluation with clocks; totals in seconds, the writer, the first class's jobs."""
    device = torch.device(args.device)
    clocks = Clocks(device)
    writers, first_class = [], []

    class ClockedWriter(PictureWriter):
        def __init__(self, out_dir, image_size, **kwargs):
            super().__init__(out_dir, image_size, workers=args.picture_workers, **kwargs)
            writers.append(self)

        def submit(self, outputs, smoothed, threshold, colour_range=None):
            if not first_class:
                first_class.append((outputs, smoothed.copy(), threshold))
            with clocks.part("hand-over"):
                super().submit(outputs, smoothed, threshold, colour_range)

        def close(self):
            with clocks.part("pictures after the last class"):
                super().close()

    saved = (detector.encode_images, detector.forward_features_shots, evaluate.evaluate_class,
             evaluate.PictureWriter)
    detector.encode_images = clocks.wrap("forward", detector.encode_images)
    detector.forward_features_shots = clocks.wrap("forward", detector.forward_features_shots)
    evaluate.evaluate_class = clocks.wrap("metrics", evaluate.evaluate_class)
    evaluate.PictureWriter = ClockedWriter
    loader = TimedLoader(make_loader(dataset, batch_size=args.batch_size, shuffle=False,
                                     num_workers=args.workers, seed=args.seed), clocks)
    try:
        with clocks.part("run"):
            evaluate.evaluate_runs(detector, loader, "synthetic", [args.seed], pro="exact",
                                   vis_dir=vis_dir, progress=False)
    finally:
        (detector.encode_images, detector.forward_features_shots, evaluate.evaluate_class,
         evaluate.PictureWriter) = saved
        del detector.encode_images, detector.forward_features_shots   # the class's methods
    writer = writers[0] if writers else None
    waited = writer.waited_s if writer else 0.0
    last = "pictures after the last class"
    result = {"first_class": first_class[0] if first_class else None}
    for kind, clock in (("wall", clocks.wall), ("cpu", clocks.cpu)):
        get = lambda name: clock.get(name, 0.0)                            # noqa: E731
        # waiting costs wall time only: for the reader workers (without workers the main
        # process reads: its own work), for room for pictures, for the last pictures
        loader = get("loader wait") if kind == "wall" and args.workers else 0.0
        waits = loader + get(last) + (waited if kind == "wall" else 0.0)
        hand_over = get("hand-over") - (waited if kind == "wall" else 0.0)
        outside = get("run") - get("forward") - waits
        result[kind] = {"run": get("run"), "forward": get("forward"),
                        "metrics": get("metrics"), "hand-over": hand_over, "outside": outside,
                        "other": outside - get("metrics") - hand_over,
                        "loader wait": get("loader wait"), last: get(last)}
    return result


def time_reading(dataset, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds per image of ``dataset[i]`` in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        dataset[i]
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def time_pictures(first_class, image_size: int, out_dir: str) -> tuple[float, float]:
    """(wall, CPU) seconds per picture drawn and written in this process (the first
    class's)."""
    outputs, smoothed, threshold = first_class
    jobs = list(class_jobs(outputs, smoothed, threshold, out_dir))
    wall, cpu = time.perf_counter(), time.process_time()
    for job in jobs:
        save_rgb(job.out_path, draw(job, image_size))
    return (time.perf_counter() - wall) / len(jobs), (time.process_time() - cpu) / len(jobs)


def time_jobs(first_class, out_dir: str) -> tuple[float, float]:
    """(wall, CPU) seconds per image of what the picture writer's threads in the main process
    do: the jobs of the first class made and serialised as its queue serialises them."""
    outputs, smoothed, threshold = first_class
    wall, cpu = time.perf_counter(), time.process_time()
    for job in class_jobs(outputs, smoothed, threshold, out_dir):
        ForkingPickler.dumps(job)
    count = len(outputs.paths)
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        data, detector = write_inputs(root, args)
        dataset = AnomalyDataset(data, "synthetic", mode="test", image_size=args.image_size)
        # warm-up: first calls of the towers, the heads and the metrics
        warm = torch.utils.data.Subset(dataset, list(range(min(len(dataset), args.batch_size))))
        evaluate.evaluate_runs(detector, make_loader(warm, batch_size=args.batch_size,
                                                     shuffle=False, num_workers=0, seed=0),
                               "synthetic", [args.seed], progress=False)
        runs = {}
        for mode in args.runs:
            vis = os.path.join(root, f"vis_{mode}") if mode == "on" else None
            runs[mode] = one_run(detector, dataset, args, vis)
        read = time_reading(dataset, len(dataset))
        first = next((r["first_class"] for r in runs.values() if r["first_class"]), None)
        if first is None:              # pictures were not asked for: draw the first class's
            first = one_run_first_class(detector, dataset, args)
        picture = time_pictures(first, args.image_size, os.path.join(root, "alone"))
        jobs = time_jobs(first, os.path.join(root, "alone"))
    return {"n": len(dataset), "read": read, "picture": picture, "jobs": jobs, "runs": runs}


def one_run_first_class(detector, dataset, args):
    """The first class's outputs and smoothed maps, for timing its pictures."""
    loader = make_loader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=0,
                         seed=args.seed)
    outputs = next(evaluate.iterate_classes(detector, loader, progress=False, seed=args.seed))
    metrics = evaluate.evaluate_class(outputs.labels, outputs.masks, outputs.text_scores,
                                      outputs.maps, outputs.name, "synthetic")
    return outputs, metrics["smoothed_maps"], metrics["threshold"]


ROWS = [  # (label, where, key in a run's figures or None for the stages timed alone)
    ("read (dataset __getitem__, timed alone)", "reader workers", "read"),
    ("model forward (towers, heads, maps)", "model device", "forward"),
    ("class metrics (evaluate_class)", "main process", "metrics"),
    ("picture hand-over (submit)", "main process", "hand-over"),
    ("picture jobs, serialised (its threads, timed alone)", "main process", "jobs"),
    ("the rest (copies, buffering, batches)", "main process", "other"),
    ("**main process outside the forward**", "main process", "outside"),
    ("waiting for the reader workers", "main process", "loader wait"),
    ("pictures (draw + write one, timed alone)", "picture processes", "picture"),
    ("whole run", "", "run"),
]


def report(args, result: dict) -> None:
    n, runs = result["n"], result["runs"]
    modes = list(runs)
    head = ["ms per image", "where"] + [f"pictures {m}, {k}" for m in modes
                                        for k in ("wall", "CPU")]
    rows = []
    for label, where, key in ROWS:
        row = [label, where]
        for mode in modes:
            for kind in ("wall", "cpu"):
                if key in ("read", "picture") or (key == "jobs" and mode == "on"):
                    value = 1000.0 * result[key][kind == "cpu"]
                elif (key in ("hand-over", "jobs") and mode == "off") or (
                        kind == "cpu" and key == "loader wait"):
                    value = None
                else:
                    value = 1000.0 * runs[mode][kind][key] / n
                row.append(value)
        rows.append(row)
    print(f"{n} images in {args.classes} classes, {args.image_size} px maps, R "
          f"{args.sample_num}, batch {args.batch_size}, {args.workers} reader workers, "
          f"{args.picture_workers} picture processes; tiny random CLIP (patch 14), device "
          f"{args.device}")
    print(machine_line(torch.device(args.device)))
    print(tabulate(rows, headers=head, tablefmt="github", floatfmt=".1f", missingval="–"))
    print("images/s: " + ", ".join(f"pictures {m} {n / runs[m]['wall']['run']:.2f}"
                                   for m in modes))
    if "off" in runs:
        for kind in ("cpu", "wall"):
            off = 1000.0 * runs["off"][kind]["outside"] / n
            line = (f"target ({'CPU' if kind == 'cpu' else 'wall'} time), pictures off: main "
                    f"process outside the forward {off:.1f} ms <= {TARGET_OFF_MS:.0f} ms: "
                    f"{'met' if off <= TARGET_OFF_MS else 'NOT met'}")
            if "on" in runs:
                # the submit calls, and the writer's threads (their time may fall in the
                # forward's, so it is added as timed alone)
                extra = (1000.0 * runs["on"][kind]["hand-over"] / n
                         + 1000.0 * result["jobs"][kind == "cpu"])
                total = 1000.0 * runs["on"][kind]["outside"] / n - off
                line += (f"; pictures on: +{extra:.1f} ms <= {TARGET_EXTRA_MS:.0f} ms: "
                         f"{'met' if extra <= TARGET_EXTRA_MS else 'NOT met'} (totals "
                         f"differ by {total:+.1f} ms)")
            print(line)
    estimate(args, result)


def estimate(args, result: dict) -> None:
    """Images/s a GPU machine could sustain, from the measured CPU times of the stages."""
    runs, n = result["runs"], result["n"]
    figures = runs["on" if "on" in runs else "off"]["cpu"]
    # on a GPU the metrics run on the device: the main process keeps the rest and the hand-over
    main_ms = 1000.0 * (figures["other"] + max(figures["hand-over"], 0.0)) / n \
        + 1000.0 * result["jobs"][1]
    pictures = min(2, args.cores)
    readers = max(1, args.cores - 1 - pictures)
    limits = {f"{readers} readers": readers / result["read"][1],
              "main process (metrics on the GPU)": 1000.0 / max(main_ms, 1e-3),
              f"{pictures} picture processes": pictures / result["picture"][1]}
    if args.gpu_forward_ms:
        limits["GPU forward"] = 1000.0 / args.gpu_forward_ms
    off = {k: v for k, v in limits.items() if "picture" not in k}
    print(f"estimate for {args.cores} cores (images/s each stage sustains, from CPU times): "
          + ", ".join(f"{k} {v:.0f}" for k, v in limits.items()))
    print(f"  -> at most {min(off.values()):.0f} images/s without pictures, "
          f"{min(limits.values()):.0f} with them")


def main(argv=None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    if args.image_size % 14:
        p.error(f"--image_size {args.image_size} is not a multiple of 14 (the patch)")
    if args.classes > len(CATEGORIES) or args.n < 3 * args.classes:
        p.error(f"--classes must lie within 1..{len(CATEGORIES)} with at least 3 images each "
                f"(--n)")
    if args.workers < 0:
        p.error("--workers must be at least 0")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    report(args, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
