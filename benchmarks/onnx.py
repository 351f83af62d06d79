"""ONNX export and ONNX Runtime inference against PyTorch, on random weights.

    python benchmarks/onnx.py                     # ViT-L/14-336 at 518 px, R 10, batch 1, CPU
    python benchmarks/onnx.py --geometry tiny --image_size 28 --iters 1 --warmup 0   # quick

Exports one class's detector once (``utils.export``: trace, then the float32 and float16
files), quantises the float32 file with ONNX Runtime's dynamic int8 quantisation
(``onnxruntime.quantization.quantize_dynamic``) and reports, for PyTorch and each file: the
file size, the seconds per image (median of --iters after --warmup, the same images and
threads) and the largest differences against ``AnomalyDetector.predict`` with the same noise
(image scores, maps). The files go to a temporary folder (--workdir) and are deleted after.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # run as a script, this folder comes first on sys.path, where this file's name would hide
    # the onnx package
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import shutil
import tempfile
import time

import torch
from tabulate import tabulate

from benchmarks.common import Timer, add_common_flags, build_models, check_args, machine_line
from models.detector import AnomalyDetector
from models.noise import shared_noise
from utils.export import trace_detector, write_onnx
from utils.onnx_detector import OnnxDetector, providers_for, require_onnx, require_runtime


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(p, batch_size=1)
    p.add_argument("--sample_num", type=int, default=10, help="R")
    p.add_argument("--workdir", default=None,
                   help="folder for the files (default: a new temporary folder, deleted after)")
    p.add_argument("--no_int8", action="store_true", help="skip the int8 quantisation")
    return p


def timed(call, iters: int, warmup: int, device: torch.device) -> tuple[float, object]:
    """(median seconds of ``call()`` over ``iters`` runs after ``warmup``, CUDA synchronised
    (benchmarks.common.Timer), its last result)."""
    out = None
    for _ in range(warmup):
        out = call()
    timer = Timer(device)
    for _ in range(iters):
        with timer("call"):
            out = call()
    return timer.median("call"), out


def differences(got: dict, want: dict) -> tuple[float, float]:
    """Largest absolute differences (image scores, maps)."""
    return (float((got["image_score"] - want["image_score"].cpu()).abs().max()),
            float((got["anomaly_map"] - want["anomaly_map"].cpu()).abs().max()))


def file_bytes(path: str) -> int:
    """The ONNX file and its external data file, if any."""
    data = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(data) if os.path.isfile(data) else 0)


def run(args: argparse.Namespace, device: torch.device) -> dict:
    ort = require_runtime()
    require_onnx()
    clip, model = build_models(args, device)
    model.eval()
    det = AnomalyDetector(clip, model, image_size=args.image_size, sample_num=args.sample_num,
                          stage=2, layers=args.layers)
    s, b = args.image_size, args.batch_size
    images = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(args.seed))
    name = args.class_name[0]
    noise = shared_noise(args.sample_num, b, clip.embed_dim, args.seed)
    rows: list = []
    result: dict = {"rows": rows}

    seconds, want = timed(lambda: det.predict(images.to(device), name, noise), args.iters,
                          args.warmup, device)
    rows.append(["PyTorch", None, seconds / b, 0.0, 0.0])

    workdir = args.workdir or tempfile.mkdtemp(prefix="bayes_pfl_onnx_")
    os.makedirs(workdir, exist_ok=True)
    try:
        traced = trace_detector(det, name, seed=args.seed)
        result["trace_s"] = traced.seconds
        paths = {"fp32": os.path.join(workdir, "detector.onnx"),
                 "fp16": os.path.join(workdir, "detector_fp16.onnx")}
        started = time.perf_counter()
        write_onnx(traced, paths["fp32"])
        result["write_s"] = time.perf_counter() - started
        write_onnx(traced, paths["fp16"], fp16=True)
        del traced, det, clip, model
        if not args.no_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            paths["int8"] = os.path.join(workdir, "detector_int8.onnx")
            started = time.perf_counter()
            quantize_dynamic(paths["fp32"], paths["int8"], weight_type=QuantType.QInt8)
            result["quantize_s"] = time.perf_counter() - started
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        providers = providers_for(device.type, ort.get_available_providers())
        labels = {"fp32": "ONNX Runtime, float32", "fp16": "ONNX Runtime, float16 weights",
                  "int8": "ONNX Runtime, dynamic int8"}
        for kind, path in paths.items():
            onnx_det = OnnxDetector(path, providers, options)
            seconds, got = timed(lambda: onnx_det.predict(images), args.iters, args.warmup,
                                 device)
            rows.append([labels[kind], file_bytes(path) / 1e6, seconds / b,
                         *differences(got, want)])
            del onnx_det
        result["providers"] = providers
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def report(args: argparse.Namespace, device: torch.device, result: dict) -> None:
    print(f"{args.geometry} at {args.image_size} px, layers {' '.join(map(str, args.layers))}, "
          f"R {args.sample_num}, N {args.prompt_num}, batch {args.batch_size}, median of "
          f"{args.iters} (after {args.warmup} warm-up)")
    print(machine_line(device) + f", ONNX Runtime providers {', '.join(result['providers'])}")
    quantize = f", int8 quantisation {result['quantize_s']:.1f} s" if "quantize_s" in result \
        else ""
    print(f"export: trace and conversion {result['trace_s']:.1f} s, float32 file written in "
          f"{result['write_s']:.1f} s{quantize}")
    print(tabulate(result["rows"], missingval="",
                   headers=["", "file MB", "s / image", "max |d| score", "max |d| map"],
                   floatfmt=("", ".1f", ".3f", ".1e", ".1e")))
    torch_s = result["rows"][0][2]
    for row in result["rows"][1:]:
        print(f"{row[0]}: {row[2] / torch_s:.2f}x PyTorch's time per image")


def main(argv=None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    device = check_args(p, args)
    if args.precision != "fp32":
        p.error("--precision: the files compute in float32 and are compared with PyTorch in "
                "float32; drop --precision")
    report(args, device, run(args, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
