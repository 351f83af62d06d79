"""Shared pieces of the benchmarks: geometries, device checks, timers, peak memory."""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import contextmanager

import torch

from models.random_clip import GEOMETRIES, geometry_kwargs

# A small geometry with the patch of ViT-L/14, for quick checks and tests.
TINY = dict(vision_width=64, vision_layers=4, patch=14, grid=2, text_width=64, text_layers=2,
            embed_dim=64)
GEOMETRY_NAMES = list(GEOMETRIES) + ["tiny"]


def geometry(name: str) -> dict:
    return dict(TINY) if name == "tiny" else geometry_kwargs(name)


def default_layers(vision_layers: int) -> list[int]:
    """Four evenly spaced blocks ending with the last (6 12 18 24 for 24 blocks)."""
    step = max(1, vision_layers // 4)
    return [min(vision_layers, step * i) for i in range(1, 5)]


def default_image_size(patch: int) -> int:
    """518 px, rounded down to a multiple of the patch (512 for patch 16)."""
    return 518 // patch * patch


def add_common_flags(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument("--geometry", default="ViT-L-14-336", choices=GEOMETRY_NAMES,
                   help="random-weight CLIP geometry ('tiny': 64 wide, 4 blocks, patch 14)")
    p.add_argument("--image_size", type=int, default=None,
                   help="input side in pixels (default 518, rounded down to the patch)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="1-based vision blocks (default: 4 evenly spaced, e.g. 6 12 18 24)")
    p.add_argument("--prompt_num", type=int, default=3, help="N")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:INDEX")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--iters", type=int, default=3, help="timed repetitions (median kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--class_name", nargs="+", default=["bottle"],
                   help="class names of the images, cycled over the batch")
    p.add_argument("--seed", type=int, default=0)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Validate the common flags (errors end through ``p.error``) and apply the thread and TF32
    settings; returns the device."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device name: use cpu, cuda or cuda:INDEX")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {args.device} was asked for but no CUDA device is available "
                    "here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA "
                    "device(s)")
    for name in ("batch_size", "iters", "sample_num"):
        if getattr(args, name, 1) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    if args.tf32 and device.type != "cuda":
        p.error("--tf32 applies to CUDA matmuls only; drop it or use --device cuda")
    if args.precision == "fp16" and device.type == "cpu":
        print("note: fp16 autocast on CPU is slow on most processors; bf16 is the CPU choice")
    g = geometry(args.geometry)
    args.image_size = args.image_size or default_image_size(g["patch"])
    if args.image_size % g["patch"]:
        p.error(f"--image_size {args.image_size} is not a multiple of the patch {g['patch']}")
    args.layers = args.layers or default_layers(g["vision_layers"])
    if not all(1 <= i <= g["vision_layers"] for i in args.layers):
        p.error(f"--layers must lie within 1..{g['vision_layers']} for {args.geometry}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    return device


def build_models(args: argparse.Namespace, device: torch.device):
    """Random-weight frozen CLIP (fp32, eval) and a Bayes-PFL module with the official
    initialisation, both on ``device``."""
    from models.bayes_pfl import BayesPFL
    from models.weights import build_clip
    from models.random_clip import make_clip_state_dict

    sd = make_clip_state_dict(seed=args.seed, **geometry(args.geometry))
    clip = build_clip(sd, image_size=args.image_size)
    del sd
    clip.requires_grad_(False)
    clip = clip.eval().to(device)
    torch.manual_seed(args.seed)
    model = BayesPFL.from_clip(clip, prompt_num=args.prompt_num, layers=args.layers)
    return clip, model.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of named parts, synchronising CUDA before each reading."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.times.setdefault(name, []).append(time.perf_counter() - start)

    def median(self, name: str) -> float:
        values = sorted(self.times[name])
        return values[len(values) // 2]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc), so that the resident set reflects
    live data before a peak is measured."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class PeakMemory:
    """Peak memory of a section: CUDA ``max_memory_allocated``, or on CPU the peak resident
    set size (Linux: the high-water mark is reset at the start through /proc/self/clear_refs;
    elsewhere the process peak from ``resource``). Python-level tracemalloc would miss torch's
    allocations, so it is not used."""

    def __init__(self, device: torch.device):
        self.device = device
        self.before = self.peak = 0.0
        self.scope = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
            self.scope = "CUDA allocated"
            return self
        release_free_memory()
        self.before = (_status_kib("VmRSS") or 0) / 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.scope = "RSS, peak reset at start"
        except OSError:
            self.scope = "RSS, process peak"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        hwm = _status_kib("VmHWM")
        if hwm is None or self.scope == "RSS, process peak":
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if platform.system() == "Darwin":
                hwm //= 1024
        self.peak = hwm / 1024


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.2f}"
    return (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
            f"{load}, torch {torch.__version__}")


def benchmark_main(get_parser, run, report, argv=None) -> int:
    """Parse the flags, check them, run the benchmark and print its report."""
    p = get_parser()
    args = p.parse_args(argv)
    device = check_args(p, args)
    report(args, device, run(args, device))
    return 0
