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
import csv
import glob
import json
import os
import sys
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from dataset.transforms import IMAGE_EXTENSIONS, ImageReadError
from utils.cli import add_model_arguments, add_runtime_arguments

CSV_COLUMNS = ["path", "class_name", "score", "text_score", "map_score", "decision", "overlay",
               "error"]


class ImageItem(NamedTuple):
    """One image to score: its path, the class name put in the prompts, and its path
    relative to the input it was found under (names the overlay)."""
    path: str
    class_name: str
    relpath: str


# --------------------------------------------------------------------------------------------
# Finding the images


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def folder_class_name(path: str) -> str:
    """The name of the folder holding ``path`` (underscores kept: the prompt wording maps
    e.g. metal_nut to "metal nut")."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or "object"


def _inside(path: str, folders: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == f or real.startswith(f + os.sep) for f in folders)


def _walk_images(root: str, exclude: Sequence[str]) -> list[str]:
    """Image files under ``root`` (recursively, sorted; hidden entries and ``exclude``
    folders left out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not _inside(os.path.join(dirpath, d), exclude))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and is_image_file(f))
    return found


def _glob_root(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard component."""
    parts = os.path.normpath(pattern).split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = os.sep.join(fixed)
    if pattern.startswith(os.sep) and not root.startswith(os.sep):
        root = os.sep + root
    return root or "."


def expand_input(spec: str, exclude: Sequence[str] = ()) -> list[tuple[str, str]]:
    """One --input value -> [(image path, path relative to the input)].

    A file is taken as it is (whatever its extension: it was named on purpose); a folder is
    searched recursively for image extensions (case-insensitive); anything else is a glob
    pattern (``**`` allowed), whose matching folders are searched as folders are."""
    exclude = [os.path.realpath(e) for e in exclude]
    if os.path.isfile(spec):
        return [(spec, os.path.basename(spec))]
    if os.path.isdir(spec):
        return [(p, os.path.relpath(p, spec)) for p in _walk_images(spec, exclude)]
    if not glob.has_magic(spec):
        return []
    root = _glob_root(spec)
    found = []
    for match in sorted(glob.glob(spec, recursive=True)):
        if _inside(match, exclude):
            continue
        if os.path.isdir(match):
            found.extend((p, os.path.relpath(p, root)) for p in _walk_images(match, exclude))
        elif os.path.isfile(match) and is_image_file(match):
            found.append((match, os.path.relpath(match, root)))
    return found


def collect_images(inputs: Sequence[str], class_name: str | None = None,
                   exclude: Sequence[str] = (),
                   on_unmatched: Callable[[str], None] | None = None) -> list[ImageItem]:
    """The images named by ``inputs`` (files, folders, glob patterns), each file once, in the
    order found. ``class_name`` None: each image's parent folder name. ``on_unmatched`` is
    called with each input that names no image."""
    items, seen = [], set()
    for spec in inputs:
        found = expand_input(spec, exclude)
        if not found and on_unmatched is not None:
            on_unmatched(spec)
        for path, rel in found:
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            items.append(ImageItem(path, class_name or folder_class_name(path), rel))
    return items


def overlay_names(items: Sequence[ImageItem]) -> list[str]:
    """Relative overlay file names: the image's relative path with a .png extension; the full
    file name is kept (a.jpg -> a.jpg.png) where two images would share one name."""
    names, taken = [], set()
    for item in items:
        stem = os.path.splitext(item.relpath)[0]
        candidates = [stem + ".png", item.relpath + ".png"]
        name = next((c for c in candidates if c not in taken), None)
        n = 1
        while name is None:
            if f"{stem}_{n}.png" not in taken:
                name = f"{stem}_{n}.png"
            n += 1
        taken.add(name)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Scoring


def group_by_class(items: Sequence[ImageItem]) -> list[ImageItem]:
    """Items reordered class after class (classes in order of first appearance, images in
    their found order within a class)."""
    order: dict[str, list[ImageItem]] = {}
    for item in items:
        order.setdefault(item.class_name, []).append(item)
    return [item for group in order.values() for item in group]


def iter_scores(detector, items: Sequence[ImageItem], batch_size: int = 8,
                seed: int | None = None, exif_transpose: bool = True
                ) -> Iterator[tuple[ImageItem, Image.Image | None, dict | str]]:
    """Score items in batches of one class each. Yields (item, image as read, result of
    ``predict_images``) for each image, or (item, None, reason) for a file that cannot be
    read. ``exif_transpose``: files are turned upright by their EXIF orientation first."""
    from dataset.transforms import read_image

    batch: list[tuple[ImageItem, Image.Image]] = []

    def flush():
        results = detector.predict_images([im for _, im in batch], batch[0][0].class_name,
                                          batch_size=len(batch), seed=seed)
        done = [(item, im, res) for (item, im), res in zip(batch, results)]
        batch.clear()
        return done

    for item in items:
        if batch and (batch[0][0].class_name != item.class_name or len(batch) >= batch_size):
            yield from flush()
        try:
            image = read_image(item.path, exif_transpose)
        except ImageReadError as e:
            yield item, None, str(e)
            continue
        batch.append((item, image))
    if batch:
        yield from flush()


def calibrate_threshold(scores: Sequence[float], percentile: float = 100.0) -> float:
    """The ``percentile`` (0..100, linear interpolation as numpy) of the scores of images
    known to be good; 100 is their maximum."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within 0..100, not {percentile}")
    if len(scores) == 0:
        raise ValueError("no calibration scores: the calibration folder gave no readable image")
    return float(np.percentile(np.asarray(scores, dtype=np.float64), percentile))


def decide(score: float, threshold: float | None) -> str | None:
    """'anomalous' when score >= threshold, else 'normal'; None without a threshold."""
    if threshold is None:
        return None
    return "anomalous" if score >= threshold else "normal"


def save_overlay(path: str, image: Image.Image, anomaly_map: np.ndarray) -> None:
    """The image at full size with its anomaly map blended on top, the map read as
    probabilities (0 -> blue, 1 -> red) so that overlays compare between images."""
    from utils.visualize import heat_overlay, save_rgb

    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    save_rgb(path, heat_overlay(rgb, anomaly_map, vmin=0.0, vmax=1.0))


# --------------------------------------------------------------------------------------------
# Output files


def write_outputs(out: str, result: dict) -> tuple[str, str]:
    """``predictions.json`` (the whole result) and ``predictions.csv`` (the predictions, then
    the skipped files with decision 'skipped' and the reason in 'error')."""
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "predictions.json")
    csv_path = os.path.join(out, "predictions.csv")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in result["predictions"]:
            writer.writerow({k: "" if row.get(k) is None else row.get(k, "")
                             for k in CSV_COLUMNS})
        for row in result["skipped"]:
            writer.writerow({"path": row["path"], "class_name": row["class_name"],
                             "decision": "skipped", "error": row["error"]})
    return csv_path, json_path


def describe_threshold(threshold: dict) -> str:
    if threshold["method"] == "none":
        return "no threshold (no decisions): pass --threshold or --calibrate"
    if threshold["method"] == "fixed":
        return f"threshold {threshold['value']:.6f} (fixed)"
    c = threshold["calibration"]
    return (f"threshold {threshold['value']:.6f} (calibrated: percentile {c['percentile']:g} "
            f"of the scores of {c['n_images']} good images in {c['directory']})")


def summary_table(rows: Sequence[dict]) -> str:
    from tabulate import tabulate

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


# --------------------------------------------------------------------------------------------
# The run


def why_no_images(spec: str) -> str:
    """Why an --input value named no image, in a few words."""
    if os.path.isdir(spec):
        return "the folder holds no image file"
    if glob.has_magic(spec):
        return "the pattern matches no image file"
    return "no such file or folder"


class InputError(ValueError):
    """The inputs name no image (or the calibration folder holds none)."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_detector(args):
    """The detector of the run (weights checked and loaded once)."""
    import torch

    from models import AnomalyDetector
    from utils.cli import model_request
    from utils.misc import resolve_device

    torch.backends.cuda.matmul.allow_tf32 = bool(getattr(args, "tf32", False))
    return AnomalyDetector.from_files(
        args.pretrained_path, args.checkpoint_path,
        device=resolve_device(args.device, args.device_id), sample_num=args.sample_num,
        precision=args.precision, verify=not args.no_verify, **model_request(args))


def _scored(detector, items, batch_size, desc, progress, skipped, seed=None,
            exif_transpose=True):
    """(item, image, result) of each readable item as it is scored, under a progress bar;
    unreadable files are reported and appended to ``skipped``. Nothing is held beyond a
    batch, so folders of any size fit in memory."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for item, image, res in iter_scores(detector, items, batch_size, seed, exif_transpose):
            bar.update(1)
            if image is None:
                tqdm.write(f"warning: skipped: {res}", file=sys.stderr)
                skipped.append({"path": item.path, "class_name": item.class_name,
                                "error": res})
                continue
            yield item, image, res


def run(args) -> dict:
    """Score the images named by ``args`` (the parsed flags), write the outputs and return
    the result written to predictions.json. Raises InputError when no image is found,
    ``models.WeightsError`` for missing or mismatched weights."""
    from utils.misc import set_seed

    exclude = [args.out]
    unmatched: list[str] = []
    items = group_by_class(collect_images(args.input, args.class_name, exclude,
                                          on_unmatched=unmatched.append))
    reasons = "; ".join(f"'{s}': {why_no_images(s)}" for s in unmatched)
    if not items:
        raise InputError(f"no images found ({reasons}): give image files "
                         f"({', '.join(IMAGE_EXTENSIONS)}), folders holding them or glob "
                         "patterns")
    for spec in unmatched:
        warn(f"no images in '{spec}': {why_no_images(spec)}")
    calib_items = []
    if args.calibrate is not None:
        calib_items = group_by_class(collect_images([args.calibrate], args.class_name, exclude))
        if not calib_items:
            raise InputError(f"no images found in the calibration folder '{args.calibrate}'")
        classes = {i.class_name for i in items}
        calib_classes = {i.class_name for i in calib_items}
        if not classes & calib_classes:
            warn(f"the calibration images are of class {', '.join(sorted(calib_classes))} and "
                 f"the inputs of {', '.join(sorted(classes))} (folder names); pass "
                 "--class_name to use one class name for both")

    detector = load_detector(args)
    set_seed(args.seed)
    progress = not args.no_progress
    skipped: list[dict] = []

    # Calibration images first, so that the threshold depends only on them and the seed.
    threshold = {"method": "none", "value": None}
    if args.threshold is not None:
        threshold = {"method": "fixed", "value": float(args.threshold)}
    elif calib_items:
        calib_skipped: list[dict] = []
        scores, scored_classes = [], set()
        for item, _, res in _scored(detector, calib_items, args.batch_size, "calibrate",
                                    progress, calib_skipped, args.seed, not args.ignore_exif):
            scores.append(res["score"])
            scored_classes.add(item.class_name)
        if not scores:
            raise InputError(f"no readable image in the calibration folder '{args.calibrate}'")
        threshold = {
            "method": "calibrated",
            "value": calibrate_threshold(scores, args.percentile),
            "calibration": {"directory": args.calibrate, "n_images": len(scores),
                            "percentile": args.percentile,
                            "class_names": sorted(scored_classes),
                            "score_min": float(min(scores)), "score_max": float(max(scores)),
                            "skipped": calib_skipped}}

    names = dict(zip(items, overlay_names(items)))
    overlay_dir = os.path.join(args.out, "overlays")
    rows = []
    for item, image, res in _scored(detector, items, args.batch_size, "predict", progress,
                                    skipped, args.seed, not args.ignore_exif):
        overlay = None
        if not args.no_overlay:
            overlay = os.path.join(overlay_dir, names[item])
            save_overlay(overlay, image, res["anomaly_map"])
        rows.append({"path": item.path, "class_name": item.class_name, "score": res["score"],
                     "text_score": res["text_score"], "map_score": res["map_score"],
                     "decision": decide(res["score"], threshold["value"]),
                     "overlay": overlay, "width": image.width, "height": image.height})

    result = {
        "threshold": threshold,
        "summary": {"n_images": len(rows),
                    "n_anomalous": sum(r["decision"] == "anomalous" for r in rows),
                    "n_skipped": len(skipped)},
        "score": "mean of text_score (mean abnormal probability of the prompt pairs) and "
                 "map_score (mean of the top-k anomaly-map values); no per-class min-max",
        "settings": dict(vars(args)),
        "predictions": rows,
        "skipped": skipped,
    }
    result["settings"]["stage"] = detector.stage
    csv_path, json_path = write_outputs(args.out, result)
    result["files"] = {"csv": csv_path, "json": json_path}
    return result


# --------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--sample_num", type=int, default=10, help="Monte Carlo samples R")
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--batch_size", type=int, default=8,
                   help="images per forward (one class per batch)")
    add_runtime_arguments(p)
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--threshold", type=float, default=None,
                       help="images scoring >= this are 'anomalous'")
    limit.add_argument("--calibrate", metavar="NORMAL_DIR", default=None,
                       help="images known to be good: the threshold is --percentile of their "
                            "scores")
    p.add_argument("--percentile", type=float, default=100.0,
                   help="with --calibrate: percentile (0..100) of the good images' scores; "
                        "100 = their maximum")
    p.add_argument("--no_overlay", action="store_true", help="skip the heat-map overlays")
    p.add_argument("--ignore_exif", action="store_true",
                   help="read files as the official code does, without turning them upright by "
                        "their EXIF orientation (files without one are read the same either way)")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    from models.errors import UserError

    parser = get_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.percentile <= 100.0:
        parser.error(f"--percentile must be within 0..100, not {args.percentile:g}")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    try:
        result = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
