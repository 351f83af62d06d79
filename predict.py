"""Zero-shot anomaly scores and heat maps for your own images: one file, folders (searched
recursively) or glob patterns.

    python predict.py --pretrained_path pretrained_weight/ViT-L-14-336px.pt \
        --checkpoint_path bayes_weight/train_visa.pth --input DIR --class_name "metal nut" \
        --out predictions

Writes <out>/predictions.csv and <out>/predictions.json (one row per image: score, text
score, map score, decision) and, unless --no_overlay, a heat-map overlay per image under
<out>/overlays/. A threshold is either given (--threshold) or calibrated on images known to be
good (--calibrate DIR --percentile P). See docs/predict.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np
import torch
from tabulate import tabulate

from models import AnomalyDetector
from models.errors import UserError
from utils.cli import (Parser, add_model_arguments, add_runtime_arguments, fail, finite_float,
                       model_request, positive_int)
from utils.inference import InputError, find_inputs, predict_folder
from utils.misc import resolve_device, set_seed
from utils.provenance import provenance
from utils.results import make_output_folder


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def describe_threshold(threshold: dict) -> str:
    if threshold["method"] == "none":
        return "no threshold (no decisions): pass --threshold or --calibrate"
    if threshold["method"] == "fixed":
        return f"threshold {threshold['value']:.6f} (fixed)"
    c = threshold["calibration"]
    return (f"threshold {threshold['value']:.6f} (calibrated: percentile {c['percentile']:g} "
            f"of the scores of {c['n_images']} good images in {c['directory']})")


def summary_table(rows: Sequence[dict]) -> str:
    classes: dict[str, list[dict]] = {}
    for row in rows:
        classes.setdefault(row["class_name"], []).append(row)
    table = []
    for name, group in classes.items():
        scores = [r["score"] for r in group]
        flagged = sum(r["decision"] == "anomalous" for r in group)
        table.append([name, len(group), flagged, float(np.mean(scores)), float(np.max(scores))])
    return tabulate(table, headers=["class", "images", "anomalous", "mean score", "max score"],
                    floatfmt=".4f")


def load_detector(args):
    """The detector of the run (weights checked and loaded once)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    return AnomalyDetector.from_files(
        args.pretrained_path, args.checkpoint_path,
        device=resolve_device(args.device, args.device_id), sample_num=args.sample_num,
        precision=args.precision, verify=not args.no_verify, **model_request(args))


def run(args) -> dict:
    """Find the inputs (an error before any weights are read when there are none), load the
    weights, score, write the outputs; returns what predictions.json holds."""
    inputs = find_inputs(args.input, args.out, args.class_name, args.calibrate)
    for spec, reason in inputs.unmatched:
        warn(f"no images in '{spec}': {reason}")
    if inputs.calibration:
        classes = {i.class_name for i in inputs.items}
        calib_classes = {i.class_name for i in inputs.calibration}
        if not classes & calib_classes:
            warn(f"the calibration images are of class {', '.join(sorted(calib_classes))} and "
                 f"the inputs of {', '.join(sorted(classes))} (folder names); pass "
                 "--class_name to use one class name for both")
    started = time.time()
    detector = load_detector(args)
    detector.model.check_class_names([i.class_name for i in inputs.items + inputs.calibration])
    make_output_folder(args.out, "--out")
    set_seed(args.seed)
    settings = {**vars(args), "model_spec": detector.spec.to_dict()}
    result = predict_folder(detector, inputs, args.out, threshold=args.threshold,
                            calibrate=args.calibrate, percentile=args.percentile,
                            batch_size=args.batch_size, seed=args.seed,
                            overlays=not args.no_overlay, exif_transpose=not args.ignore_exif,
                            progress=not args.no_progress, settings=settings,
                            uncertainty=args.uncertainty, extra=lambda: {"provenance": provenance(
                                settings, args.pretrained_path, args.checkpoint_path,
                                device=detector.device, precision=args.precision,
                                started=started)})
    if not result["predictions"]:
        raise InputError(f"none of the {len(result['skipped'])} images could be read (listed "
                         f"in {result['files']['csv']}): check the files")
    return result


# --------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Bayes-PFL zero-shot anomaly scores and heat maps for your own images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_path", default="./pretrained_weight/ViT-L-14-336px.pt",
                   help="OpenAI CLIP weights")
    p.add_argument("--checkpoint_path", default="./bayes_weight/train_visa.pth",
                   help="Bayes-PFL checkpoint; the stage is read from epoch_post_{e}_{stage}.pth, "
                        "else 2")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders (searched recursively) or glob patterns "
                        "(quote them; ** allowed)")
    p.add_argument("--class_name", default=None,
                   help="object name put in the prompts (e.g. 'metal nut'); default: the name "
                        "of each image's folder")
    p.add_argument("--out", default="./predictions", help="output folder")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--sample_num", type=positive_int, default=10, help="Monte Carlo samples R")
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="images per forward (one class per batch)")
    add_runtime_arguments(p)
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--threshold", type=finite_float, default=None,
                       help="images scoring >= this are 'anomalous'")
    limit.add_argument("--calibrate", metavar="NORMAL_DIR", default=None,
                       help="images known to be good: the threshold is --percentile of their "
                            "scores")
    p.add_argument("--percentile", type=float, default=100.0,
                   help="with --calibrate: percentile (0..100) of the good images' scores; "
                        "100 = their maximum")
    p.add_argument("--no_overlay", action="store_true", help="skip the heat-map overlays")
    p.add_argument("--uncertainty", action="store_true",
                   help="also the spread over the prompt samples: a score_std column and a "
                        "second overlay per image of the per-pixel spread (under "
                        "<out>/uncertainty, read on the scale 0..0.25)")
    p.add_argument("--ignore_exif", action="store_true",
                   help="read files as the official code does, without turning them upright by "
                        "their EXIF orientation (files without one are read the same either way)")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.percentile <= 100.0:
        parser.error(f"--percentile must be within 0..100, not {args.percentile:g}")
    try:
        result = run(args)
    except InputError as e:
        return fail(str(e), 2)
    except UserError as e:
        return fail(str(e), 1)
    rows = result["predictions"]
    if rows:
        print(summary_table(rows))
    print(describe_threshold(result["threshold"]))
    s = result["summary"]
    skipped = f", {s['n_skipped']} skipped (unreadable)" if s["n_skipped"] else ""
    flagged = f", {s['n_anomalous']} anomalous" if result["threshold"]["value"] is not None else ""
    print(f"{s['n_images']} images scored{flagged}{skipped}; results in "
          f"{result['files']['csv']} and {result['files']['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
