"""Zero-shot anomaly scores and heat maps for your own images: one file, folders (searched
recursively) or glob patterns.

    python predict.py --pretrained_path pretrained_weight/ViT-L-14-336px.pt \
        --checkpoint_path bayes_weight/train_visa.pth --input DIR --class_name "metal nut" \
        --out predictions

Writes <out>/predictions.csv and <out>/predictions.json (one row per image: score, text
score, map score, decision) and, unless --no_overlay, a heat-map overlay per image under
<out>/overlays/. A threshold is either given (--threshold) or calibrated on images known to be
good (--calibrate DIR --percentile P); --reference adds good images of the part as few-shot
references. With --onnx, a file written by export.py is scored by ONNX Runtime instead (no CLIP
or checkpoint needed; its class, seed, R, image size and references are the file's). See
docs/predict.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np
import torch
from tabulate import tabulate

from models import AnomalyDetector
from models.errors import SettingsError, UserError
from dataset.locks import folder_lock
from dataset.outputs import check_writable, clear_own, kept_note
from utils.cli import (Parser, add_model_arguments, add_runtime_arguments, add_weight_arguments,
                       class_name_text, fail, interrupt_on_sigterm, model_request,
                       non_negative_float, positive_int, probability, seed_int)
from utils.discovery import LeftOut, file_key, left_out_summary
from utils.inference import (PICTURE_FOLDERS, PREDICTION_FILES, InputError, OnnxDetector,
                             find_inputs, find_references, output_files, predict_folder,
                             references_of)
from utils.onnx_detector import providers_for, require_runtime
from utils.misc import resolve_device, set_seed
from utils.provenance import file_sha256, provenance
from utils.results import OutputError, make_output_folder

LOCK_FILE = ".predict.lock"
# Defaults of the settings that an exported file fixes (with --onnx: the file's).
DEFAULTS = {"seed": 111, "sample_num": 10, "fewshot_weight": 1.0}


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def describe_threshold(threshold: dict) -> str:
    if threshold["method"] == "none":
        return "no threshold (no decisions): pass --threshold or --calibrate"
    if threshold["method"] == "fixed":
        return f"threshold {threshold['value']:.6f} (fixed)"
    c = threshold["calibration"]
    return (f"threshold {threshold['value']:.6f} (calibrated: percentile {c['percentile']:g} "
            f"of the scores of {c['n_images']} good images in {c['directory']}; anomalous "
            f"above it)")


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


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_onnx(args) -> OnnxDetector:
    """The exported file of --onnx. The settings it fixes that were given must be its own (one
    line naming each that differs and the file's value); those not given are taken from it."""
    ort = require_runtime()
    providers = providers_for(args.device, ort.get_available_providers())
    if providers[0] == "CUDAExecutionProvider" and args.device_id is not None:
        providers[0] = ("CUDAExecutionProvider", {"device_id": args.device_id})
    detector = OnnxDetector(args.onnx, providers)
    spec = detector.metadata.get("model_spec") or {}
    fixed = {"--seed": (args.seed, detector.seed),
             "--sample_num": (args.sample_num, detector.sample_num),
             "--image_size": (args.image_size, detector.image_size),
             "--features_list": (args.features_list, detector.layers),
             "--fewshot_weight": (args.fewshot_weight, detector.fewshot_weight),
             **{f"--{k}": (getattr(args, k), spec[k]) for k in (
                 "prompt_num", "prompt_context_len", "prompt_state_len", "num_flows",
                 "activation") if k in spec}}
    differ = [f"{flag} {_shown(given)} (the file has {_shown(own)})"
              for flag, (given, own) in fixed.items() if given is not None and given != own]
    if differ:
        raise SettingsError(f"{args.onnx} was exported with other settings: {'; '.join(differ)}; "
                            f"drop these flags to use the file's, or export it again with them")
    if args.precision != "fp32":
        raise SettingsError(f"--precision {args.precision} applies to the PyTorch path: "
                            f"{args.onnx} computes in float32; drop --precision")
    if args.uncertainty and not detector.uncertainty:
        raise SettingsError(f"--uncertainty needs the spreads, which {args.onnx} was exported "
                            f"without: export it again with --uncertainty")
    if args.reference:
        detector.reference_bank(args.reference)       # baked in at export: one line
    if args.class_name is not None:
        detector.check_class(args.class_name)
    args.seed, args.sample_num = detector.seed, detector.sample_num
    args.fewshot_weight = detector.fewshot_weight
    return detector


def load_references(detector, paths: list[str], exif_transpose: bool):
    """The few-shot bank of the --reference images (each read by range and, as the scored
    images, turned upright by its EXIF orientation unless --ignore_exif; an unreadable one is
    one line)."""
    bank = references_of(detector, paths, exif_transpose)
    print(f"few-shot: {bank.count} reference images", file=sys.stderr, flush=True)
    return bank


def run(args) -> dict:
    """Find the inputs (an error before any weights are read when there are none; with --onnx
    the file is opened first, for its class name), load the weights, score, write the
    outputs; returns what predictions.json holds."""
    exported = load_onnx(args) if args.onnx else None
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    class_name = args.class_name or (exported.class_name if exported else None)
    inputs = find_inputs(args.input, args.out, class_name, args.calibrate)
    references = find_references(args.reference, args.out) if args.reference else None
    if references:
        scored = {file_key(i.path) for i in inputs.items}
        both = [p for p in references if file_key(p) in scored]
        if both:
            raise InputError(f"{both[0]} is both an image to score (--input) and a reference "
                             f"(--reference){'' if len(both) == 1 else f', and {len(both) - 1} more'}"
                             f": compared with itself its few-shot map is 0; give references "
                             f"that are not among the images scored")
    for spec, reason in inputs.unmatched:
        warn(f"no images in '{spec}': {reason}")
    if inputs.calibration:
        classes = {i.class_name for i in inputs.items}
        calib_classes = {i.class_name for i in inputs.calibration}
        if not classes & calib_classes:
            warn(f"the calibration images are of class {', '.join(sorted(calib_classes))} and "
                 f"the inputs of {', '.join(sorted(classes))} (folder names); pass "
                 "--class_name to use one class name for both")
        if len(inputs.calibration) < 5:
            warn(f"calibrating on {len(inputs.calibration)} good image(s) only: the threshold "
                 f"is a rough guess; give more known-good images")
        baked = exported.metadata.get("reference_paths") or [] if exported else []
        if references is not None or baked:
            shared = {file_key(p) for p in (references or baked)} & {
                file_key(i.path) for i in inputs.calibration}
            if shared:
                warn(f"{len(shared)} calibration image(s) are also references: their few-shot "
                     f"map is 0, so the threshold comes out too low; calibrate on other good "
                     f"images")
    started = time.time()
    if exported is not None:
        detector, bank = exported, None
        settings = {**vars(args), "model_spec": exported.metadata.get("model_spec"),
                    "onnx": {"sha256": file_sha256(args.onnx), "providers": exported.providers,
                             "metadata": exported.metadata}}
    else:
        detector = load_detector(args)
        # every class name and reference checked before anything is written
        detector.model.check_class_names(
            [i.class_name for i in inputs.items + inputs.calibration])
        detector.fewshot_weight = args.fewshot_weight
        bank = (load_references(detector, references, not args.ignore_exif)
                if references else None)
        settings = {**vars(args), "model_spec": detector.spec.to_dict()}
    weights = (None, None) if exported else (args.pretrained_path, args.checkpoint_path)
    outputs = output_files(args.out, inputs, not args.no_overlay, args.uncertainty)
    if os.path.isdir(args.out):            # refused before the folder is even marked
        check_writable(outputs, "--out", args.out)
    make_output_folder(args.out, "--out")
    with folder_lock(os.path.join(args.out, LOCK_FILE),
                     f"--out {args.out} is being written by another predict.py",
                     "no predict.py is running", OutputError):
        # nothing of the user's is written over; only the earlier run's own files go
        check_writable(outputs, "--out", args.out)
        replaced, kept = clear_own([os.path.join(args.out, name)
                                    for name in PICTURE_FOLDERS + PREDICTION_FILES], args.out)
        if replaced:
            warn(f"replaced the previous run's {len(replaced)} file(s) in {args.out}")
        if kept:
            warn(kept_note(kept, "--out", args.out))
        set_seed(args.seed)
        try:
            result = predict_folder(
                detector, inputs, args.out, threshold=args.threshold, calibrate=args.calibrate,
                percentile=args.percentile, batch_size=args.batch_size, seed=args.seed,
                overlays=not args.no_overlay, exif_transpose=not args.ignore_exif,
                progress=not args.no_progress, settings=settings, uncertainty=args.uncertainty,
                references=bank, extra=lambda: {"provenance": provenance(
                    settings, *weights, device=detector.device, precision=args.precision,
                    started=started)})
        except KeyboardInterrupt as stop:
            # predictions.json now can only be this run's (the earlier one's was cleared)
            stop.scored_so_far = os.path.isfile(os.path.join(args.out, "predictions.json"))
            raise
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
    add_weight_arguments(p)
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders (searched recursively) or glob patterns "
                        "(quote them; ** allowed)")
    p.add_argument("--class_name", type=class_name_text, default=None,
                   help="object name put in the prompts (e.g. 'metal nut'); default: the name "
                        "of each image's folder")
    p.add_argument("--out", default="./predictions", help="output folder")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="a file written by export.py, scored with ONNX Runtime instead of "
                        "--pretrained_path / --checkpoint_path (CPU, or CUDA with "
                        "onnxruntime-gpu and --device cuda); its class, seed, R, image size "
                        "and references are fixed in it")
    p.add_argument("--sample_num", type=positive_int, default=None,
                   help="Monte Carlo samples R (default 10; with --onnx, the file's)")
    p.add_argument("--seed", type=seed_int, default=None,
                   help="seed of the prompt noise (default 111; with --onnx, the file's)")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="images per forward (one class per batch)")
    add_runtime_arguments(p)
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--threshold", type=probability, default=None,
                       help="images scoring above this (0..1) are 'anomalous'")
    limit.add_argument("--calibrate", metavar="NORMAL_DIR", default=None,
                       help="images known to be good: the threshold is --percentile of their "
                            "scores")
    p.add_argument("--percentile", type=float, default=None,
                   help="with --calibrate (default 100): percentile (0..100) of the good images' "
                        "scores; "
                        "100 = their maximum")
    p.add_argument("--reference", nargs="+", default=None, metavar="PATH",
                   help="good images of the part (files, folders or glob patterns): the few-shot "
                        "mode, the anomaly map plus --fewshot_weight times each patch's distance "
                        "to the references' patches (calibrate on other good images)")
    p.add_argument("--fewshot_weight", type=non_negative_float, default=None,
                   help="weight of the few-shot map in the anomaly map (with --reference; "
                        "default 1; with --onnx, the file's)")
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
    if args.percentile is not None and args.calibrate is None:
        parser.error("--percentile applies to --calibrate only: add --calibrate GOOD_DIR, or "
                     "drop --percentile")
    args.percentile = 100.0 if args.percentile is None else args.percentile
    if not 0.0 <= args.percentile <= 100.0:
        parser.error(f"--percentile must be within 0..100, not {args.percentile:g}")
    if args.fewshot_weight is not None and not (args.reference or args.onnx):
        parser.error("--fewshot_weight applies to the few-shot mode only: add --reference "
                     "PATH ..., or drop --fewshot_weight")
    interrupt_on_sigterm()
    try:
        result = run(args)
    except InputError as e:
        return fail(str(e), 2)
    except UserError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt as stop:
        return fail("interrupted: " + (
            f"the images scored so far are in {args.out}/predictions.csv and predictions.json "
            f"(marked \"status\": \"interrupted\")" if getattr(stop, "scored_so_far", False)
            else "nothing was scored"), 130)
    rows = result["predictions"]
    if rows:
        print(summary_table(rows))
    print(describe_threshold(result["threshold"]))
    s = result["summary"]
    skipped = f", {s['n_skipped']} skipped (unreadable)" if s["n_skipped"] else ""
    flagged = f", {s['n_anomalous']} anomalous" if result["threshold"]["value"] is not None else ""
    left = left_out_summary([LeftOut(**e) for e in result["left_out"]])
    left = f"; {left} (listed in predictions.json)" if left else ""
    print(f"{s['n_images']} images scored{flagged}{skipped}{left}; results in "
          f"{result['files']['csv']} and {result['files']['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
