"""Scoring your own images: single images in memory, and whole folders with thresholds,
calibration on known-good images, heat-map overlays and result files. predict.py is the
command line over :func:`predict_folder`; in a notebook:

    from models import AnomalyDetector
    from utils.inference import predict_images, predict_folder

    det = AnomalyDetector.from_files("pretrained_weight/ViT-L-14-336px.pt",
                                     "bayes_weight/train_visa.pth")
    results = predict_images(det, ["part1.png", "part2.png"], "metal nut", seed=0)
    summary = predict_folder(det, ["my_parts/"], "predictions", class_name="metal nut",
                             calibrate="known_good_parts/")

An exported file (export.py) runs the same way: ``predict_images(OnnxDetector("part.onnx"),
images, "metal nut", seed=111)`` (the class and the seed must be the file's).

The score of an image is the mean of its text score (mean abnormal probability of the prompt
pairs) and its map score (mean of the top-k anomaly-map values, k as the official protocol):
both in [0, 1]. The official per-class min-max needs a whole test set and is not applied.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from dataset.files import IMAGE_EXTENSIONS
from dataset.outputs import WRITTEN_BY, check_apart, check_writable
from models.detector import AnomalyDetector
from models.errors import InputError
from models.fewshot import ReferenceBank
from models.imaging import preprocess, preprocess_image, to_pil_image
from models.noise import shared_noise
from utils.discovery import (ImageItem, LeftOut, collect_images, file_key, group_by_class,
                             overlay_names, why_no_images)
from utils.onnx_detector import OnnxDetector
from utils.protocol import gaussian_smooth, topk_for_class
from utils.results import OutputError, write_text
from utils.visualize import heat_overlay, save_rgb

__all__ = ["CSV_COLUMNS", "InputError", "Inputs", "STD_SCALE", "calibrate_threshold", "decide",
           "csv_text", "find_inputs", "find_references", "image_list", "iter_scores", "OnnxDetector",
           "predict_folder", "predict_images", "prediction_row", "predictions_record",
           "preprocess", "references_of", "save_overlay", "write_outputs"]

CSV_COLUMNS = ["path", "class_name", "score", "text_score", "map_score", "decision", "overlay",
               "score_std", "uncertainty_overlay", "error"]
# The spread overlays read the per-pixel std on the scale 0..STD_SCALE (a std of
# probabilities; 0.25 is already a wide spread).
STD_SCALE = 0.25
SCORE_DEFINITION = ("mean of text_score (mean abnormal probability of the prompt pairs) and "
                    "map_score (mean of the top-k anomaly-map values); no per-class min-max")
DECISION_RULE = "anomalous when score > threshold (strictly), else normal"


# --------------------------------------------------------------------------------------------
# Images in memory


def _at_size(amap: torch.Tensor, image: Image.Image) -> np.ndarray:
    """A map [S, S] resized bilinearly to the image's original size, float32 [H, W]."""
    full = F.interpolate(amap[None, None], size=(image.height, image.width), mode="bilinear",
                         align_corners=False)[0, 0]
    return full.cpu().numpy()


def image_list(images, what: str = "images") -> list:
    """The images of a call as a list: one path, PIL image or array is a list of one; a list or
    tuple is taken as it is (each element read by ``models.imaging.to_pil_image``). A tensor,
    another type or an empty list is one InputError."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        raise InputError(f"the {what} are a tensor: pass preprocessed [B, 3, S, S] batches to "
                         f"AnomalyDetector.predict, and paths, PIL images or arrays here")
    if not isinstance(images, (list, tuple)):
        raise InputError(f"the {what} must be a path, a PIL image, an array or a list of them, "
                         f"not a {type(images).__name__}")
    if not images:
        raise InputError(f"no {what} given: pass at least one")
    return list(images)


def references_of(detector, references, exif_transpose: bool = True) -> ReferenceBank | None:
    """``references`` as a bank of ``detector``: a ReferenceBank as it is, None as None, else
    good images (paths, PIL images, arrays; one or a list) read by range and encoded (the
    paths recorded in the bank)."""
    if references is None or isinstance(references, ReferenceBank):
        return references
    given = image_list(references, "reference images")
    for im in given:                  # images only, as for predict_images: a tensor gets its line
        if isinstance(im, torch.Tensor):
            to_pil_image(im)
    return detector.reference_bank(given, exif_transpose=exif_transpose)


def predict_images(detector, images, class_name: str | Sequence[str],
                   batch_size: int = 8, smooth_sigma: float = 8.0, seed: int | None = None,
                   exif_transpose: bool = True, return_std: bool = False,
                   references=None, return_fewshot: bool = True) -> list[dict]:
    """Score images (paths, PIL images or arrays, read by range: ``models.imaging``; one image
    or a list) of one class (or one class name each).

    Returns one dict per image: ``text_score``, ``map_score`` (mean of the top-k map values,
    k = 20 or 2000 as the official protocol), ``score`` = the mean of the two, and
    ``anomaly_map`` float32 [H, W] at the image's original size (smoothed with a Gaussian of
    ``smooth_sigma`` at S x S, then resized bilinearly). ``return_std``: also ``score_std``
    and ``text_score_std`` (the spread of the per-sample scores over the R prompt samples)
    and ``anomaly_map_std`` (the per-pixel spread of the per-sample maps, unsmoothed, at the
    original size).

    ``references``: good images of the class (one, a list, or a bank from
    ``detector.reference_bank``): the few-shot mode, the anomaly map being the zero-shot map
    plus ``detector.fewshot_weight`` times the few-shot map (before smoothing) and the map
    score taken from it; each result also gets ``fewshot_map`` (smoothed likewise, original
    size) unless ``return_fewshot`` is False.

    ``seed``: when given, every image gets the same standard-normal draws, so that an image's
    result depends neither on the other images of the call nor on its position; None: draws
    from the torch RNG as ``detector.predict``. ``exif_transpose``: files are turned upright by
    their EXIF orientation (as image viewers show them; the official code ignores it); files
    without one read the same either way."""
    images = image_list(images)
    names = AnomalyDetector.class_names_of(class_name, len(images))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
    bank = references_of(detector, references, exif_transpose)
    baked = isinstance(detector, OnnxDetector)
    if baked:
        detector.check_seed(seed)           # an exported file has its seed's noise baked in
    results = []
    for start in range(0, len(images), batch_size):
        chunk = [to_pil_image(im, exif_transpose) for im in images[start:start + batch_size]]
        batch = torch.stack([preprocess_image(im, detector.image_size) for im in chunk])
        chunk_names = names[start:start + batch_size]
        noise = None if seed is None or baked else shared_noise(
            detector.sample_num, len(chunk), detector.model.prompt_context.shape[-1], seed)
        ks = [min(topk_for_class(name), detector.image_size ** 2) for name in chunk_names]
        out = detector.predict(batch, chunk_names, noise, return_std, ks if return_std else None,
                               references=bank)
        maps = out["anomaly_map"].float()
        smoothed = gaussian_smooth(maps, smooth_sigma) if smooth_sigma else maps
        fewshot = None
        if return_fewshot and "fewshot_map" in out:
            fewshot = out["fewshot_map"].float()
            fewshot = gaussian_smooth(fewshot, smooth_sigma) if smooth_sigma else fewshot
        for i, im in enumerate(chunk):
            map_score = float(maps[i].flatten().topk(ks[i]).values.mean())
            text_score = float(out["image_score"][i])
            result = {"text_score": text_score, "map_score": map_score,
                      "score": 0.5 * (text_score + map_score),
                      "anomaly_map": _at_size(smoothed[i], im)}
            if fewshot is not None:
                result["fewshot_map"] = _at_size(fewshot[i], im)
            if return_std:
                result.update(score_std=float(out["score_std"][i]),
                              text_score_std=float(out["image_score_std"][i]),
                              anomaly_map_std=_at_size(out["anomaly_map_std"][i].float(), im))
            results.append(result)
    return results


# --------------------------------------------------------------------------------------------
# Folders


def iter_scores(detector, items: Sequence[ImageItem], batch_size: int = 8,
                seed: int | None = None, exif_transpose: bool = True, return_std: bool = False,
                references: ReferenceBank | None = None, return_fewshot: bool = True
                ) -> Iterator[tuple[ImageItem, Image.Image | None, dict | str]]:
    """Score items in batches of one class each. Yields (item, the image as read by range -
    8 bits per channel -, result of ``predict_images``) for each image, or (item, None,
    reason) for a file that cannot be read. ``exif_transpose``: files are turned upright by
    their EXIF orientation first; ``return_fewshot``: as for ``predict_images``."""
    batch: list[tuple[ImageItem, Image.Image]] = []

    def flush():
        results = predict_images(detector, [im for _, im in batch], batch[0][0].class_name,
                                 batch_size=len(batch), seed=seed, return_std=return_std,
                                 references=references, return_fewshot=return_fewshot)
        done = [(item, im, res) for (item, im), res in zip(batch, results)]
        batch.clear()
        return done

    for item in items:
        if batch and (batch[0][0].class_name != item.class_name or len(batch) >= batch_size):
            yield from flush()
        try:
            image = to_pil_image(item.path, exif_transpose)
        except InputError as e:            # unreadable, or values that are not an image's
            yield item, None, str(e)
            continue
        batch.append((item, image))
    if batch:
        yield from flush()


def calibrate_threshold(scores: Sequence[float], percentile: float = 100.0) -> float:
    """The ``percentile`` (0..100, linear interpolation as numpy) of the scores of images
    known to be good; 100 is their maximum. With the decision rule ``score > threshold``, no
    calibration image scores above the threshold at percentile 100 (a single good image is
    not flagged by its own score)."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within 0..100, not {percentile}")
    if len(scores) == 0:
        raise ValueError("no calibration scores: the calibration folder gave no readable image")
    return float(np.percentile(np.asarray(scores, dtype=np.float64), percentile))


def decide(score: float, threshold: float | None) -> str | None:
    """'anomalous' when score > threshold (strictly, as the official IoU counts pixels above
    the F1 threshold), else 'normal'; None without a threshold."""
    if threshold is None:
        return None
    return "anomalous" if score > threshold else "normal"


def save_overlay(path: str, image: Image.Image, anomaly_map: np.ndarray,
                 vmax: float = 1.0) -> None:
    """The image at full size with a map blended on top, read on the fixed scale 0..``vmax``
    (0 -> blue) so that overlays compare between images: the anomaly map as probabilities
    (``vmax`` 1), its spread over the samples with ``vmax`` = STD_SCALE."""
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    try:
        save_rgb(path, heat_overlay(rgb, anomaly_map, vmin=0.0, vmax=vmax))
    except OSError as error:
        raise OutputError(f"cannot write the overlay {path} ({error.strerror or error}): free "
                          f"some space, choose another --out or pass --no_overlay") from None


def _csv_row(row: dict) -> dict:
    if "score" not in row:                                   # a skipped file
        return {"path": row["path"], "class_name": row["class_name"], "decision": "skipped",
                "error": row["error"]}
    return {k: "" if row.get(k) is None else row.get(k, "") for k in CSV_COLUMNS}


def csv_text(rows: Sequence[dict], skipped: Sequence[dict] = ()) -> str:
    """predictions.csv's text: the header, the scored rows, then the skipped files (decision
    'skipped', the reason in 'error')."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in (*rows, *skipped):                    # a skipped file: decision 'skipped'
        writer.writerow(_csv_row(row))
    return text.getvalue()


def write_outputs(out: str, result: dict) -> tuple[str, str]:
    """``predictions.json`` (the whole result) and ``predictions.csv`` (the predictions, then
    the skipped files with decision 'skipped' and the reason in 'error'), atomically."""
    json_path = os.path.join(out, "predictions.json")
    csv_path = os.path.join(out, "predictions.csv")
    write_text(json_path, json.dumps(result, indent=2))
    write_text(csv_path, csv_text(result["predictions"], result["skipped"]))
    return csv_path, json_path


class RowLog:
    """``predictions.csv`` as the images are scored: the header, then each row appended and
    flushed as soon as it is known, so that an interruption or a full disk loses no row of an
    image already scored (the finished run replaces the file in one step, rows in order)."""

    def __init__(self, path: str):
        self.path = path
        self._file = self._io(open, path, "w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS)
        self._write(self._writer.writeheader)

    def _io(self, action, *args, **kwargs):
        """``action(...)``; a failed write is one OutputError naming the file."""
        try:
            return action(*args, **kwargs)
        except OSError as error:
            raise OutputError(f"cannot write {self.path} ({error.strerror or error}): free "
                              f"some space or choose another --out") from None

    def _write(self, action, *args) -> None:
        self._io(action, *args)
        self._io(self._file.flush)

    def add(self, row: dict) -> None:
        self._write(self._writer.writerow, _csv_row(row))

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass


def _scored(detector, items, batch_size, desc, progress, skipped, seed=None,
            exif_transpose=True, return_std=False, references=None, on_skip=None):
    """(item, image, result) of each readable item as it is scored, under a progress bar;
    unreadable files are reported and appended to ``skipped`` (and passed to ``on_skip``).
    Nothing is held beyond a batch, so folders of any size fit in memory; the results leave
    out the few-shot map, which predict_folder does not write."""
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for item, image, res in iter_scores(detector, items, batch_size, seed, exif_transpose,
                                            return_std, references, return_fewshot=False):
            bar.update(1)
            if image is None:
                tqdm.write(f"warning: skipped: {res}", file=sys.stderr)
                entry = {"path": item.path, "class_name": item.class_name, "error": res}
                skipped.append(entry)
                if on_skip:
                    on_skip(entry)
                continue
            yield item, image, res


@dataclass
class Inputs:
    """What the inputs name: the images to score, the known-good images to calibrate on, the
    inputs that named no image (each with the reason), and every other file under the inputs
    (and the calibration folder) that is not scored, with its reason."""
    items: list[ImageItem]
    calibration: list[ImageItem] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    calibration_left_out: list[LeftOut] = field(default_factory=list)


def _input_places(flag: str, specs: Sequence[str]) -> tuple[list, list]:
    """(folders, files) that ``specs`` (files, folders, glob patterns) read, as (flag, path)."""
    folders, files = [], []
    for spec in specs:
        matches = [spec] if os.path.exists(spec) or not glob.has_magic(spec) else \
            glob.glob(spec, recursive=True)
        for path in matches:
            if os.path.isdir(path):
                folders.append((flag, path))
            elif os.path.lexists(path):
                files.append((flag, path))
    return folders, files


def check_out_apart(out: str, named: Sequence[tuple[str, Sequence[str]]]) -> None:
    """One OutputError when the output folder ``out`` overlaps what ``named`` ((flag, specs)
    pairs: --input, --calibrate, --reference) reads: a folder inside it or holding it, a file
    inside it (dataset.outputs.check_apart)."""
    folders, files = [], []
    for flag, specs in named:
        more_folders, more_files = _input_places(flag, specs)
        folders += more_folders
        files += more_files
    check_apart(out, "--out", folders, files)


def find_inputs(inputs: Sequence[str], out: str | None = None, class_name: str | None = None,
                calibrate: str | None = None) -> Inputs:
    """The images named by ``inputs`` (files, folders, glob patterns), grouped class by class;
    ``class_name`` None: each image's folder name. ``out`` (the output folder) must lie apart
    from every input (:func:`check_out_apart`). Raises InputError when nothing is found (in
    the inputs or the calibration folder)."""
    if out is not None:
        check_out_apart(out, [("--input", inputs)] + ([("--calibrate", [calibrate])]
                                                      if calibrate is not None else []))
    unmatched: list[str] = []
    left_out: list[LeftOut] = []
    items = group_by_class(collect_images(inputs, class_name, on_unmatched=unmatched.append,
                                          left_out=left_out))
    reasons = [(spec, why_no_images(spec)) for spec in unmatched]
    if not items:
        said = "; ".join(f"'{spec}': {why}" for spec, why in reasons)
        raise InputError(f"no images found ({said}): give image files "
                         f"({', '.join(IMAGE_EXTENSIONS)}), folders holding them or glob "
                         "patterns")
    calibration: list[ImageItem] = []
    calibration_left_out: list[LeftOut] = []
    if calibrate is not None:
        calibration = group_by_class(collect_images([calibrate], class_name,
                                                    left_out=calibration_left_out))
        if not calibration:
            raise InputError(f"no images found in the calibration folder '{calibrate}' "
                             f"({why_no_images(calibrate)})")
        scored = {file_key(i.path) for i in items}
        both = [i.path for i in calibration if file_key(i.path) in scored]
        if both:
            raise InputError(f"{both[0]} is both an image to score (--input) and a known-good "
                             f"calibration image (--calibrate){_more(both)}: the threshold must "
                             f"come from other images; give --calibrate a folder of other good "
                             f"images")
    return Inputs(items, calibration, reasons, left_out, calibration_left_out)


def _more(paths: Sequence[str]) -> str:
    return f", and {len(paths) - 1} more" if len(paths) > 1 else ""


def find_references(references: Sequence[str], out: str | None = None) -> list[str]:
    """The image files named by ``references`` (files, folders, globs, as ``--input``); an
    InputError when they name none. ``out``: the output folder, which must lie apart from
    them."""
    if out is not None:
        check_out_apart(out, [("--reference", references)])
    unmatched: list[str] = []
    found = [item.path for item in collect_images(references, "reference",
                                                  on_unmatched=unmatched.append)]
    if unmatched or not found:
        said = "; ".join(f"'{spec}': {why_no_images(spec)}" for spec in unmatched) or \
            "they name no image"
        raise InputError(f"no reference images found ({said}): give good image files, folders "
                         f"holding them or glob patterns")
    return found


def prediction_row(path: str, class_name: str, image: Image.Image, res: dict,
                   decision: str | None, overlay: str | None = None, uncertainty: bool = False,
                   spread: str | None = None) -> dict:
    """predictions.json's row of one scored image (``uncertainty``: with its score_std and
    spread overlay)."""
    row = {"path": path, "class_name": class_name, "score": res["score"],
           "text_score": res["text_score"], "map_score": res["map_score"],
           "decision": decision, "overlay": overlay, "width": image.width,
           "height": image.height}
    if uncertainty:
        row.update(score_std=res["score_std"], uncertainty_overlay=spread)
    return row


def predictions_record(status: str, threshold: dict, rows: list[dict], skipped: list[dict],
                       n_not_scored: int, references: dict | None, settings: dict,
                       left_out: Sequence[LeftOut] = ()) -> dict:
    """What predictions.json holds (before any provenance): the run's status, its threshold
    record, the counts, the score's definition, the references, the settings, the rows, the
    skipped files (unreadable) and the files under the inputs left out (with the reason)."""
    return {
        "written_by": WRITTEN_BY,
        "status": status,
        "threshold": threshold,
        "summary": {"n_images": len(rows),
                    "n_anomalous": sum(r["decision"] == "anomalous" for r in rows),
                    "n_skipped": len(skipped), "n_not_scored": n_not_scored,
                    "n_left_out": len(left_out)},
        "score": SCORE_DEFINITION,
        "references": references,
        "settings": settings,
        "predictions": rows,
        "skipped": skipped,
        "left_out": [{"path": e.path, "reason": e.reason} for e in left_out],
    }


def _references_record(detector, bank: ReferenceBank | None) -> dict | None:
    """predictions.json's record of the few-shot references (those baked into an exported
    file too)."""
    if bank is not None:
        return {"n_images": bank.count, "paths": list(bank.paths),
                "fewshot_weight": detector.fewshot_weight}
    if isinstance(detector, OnnxDetector) and detector.references:
        return {"n_images": detector.references,
                "paths": list(detector.metadata.get("reference_paths", [])),
                "fewshot_weight": detector.fewshot_weight, "baked_into": detector.path}
    return None


PREDICTION_FILES = ("predictions.csv", "predictions.json")
PICTURE_FOLDERS = ("overlays", "uncertainty")


def output_files(out: str, inputs: Inputs, overlays: bool = True,
                 uncertainty: bool = False) -> list[str]:
    """Every file predict_folder writes into ``out`` for ``inputs``."""
    names = overlay_names(inputs.items) if overlays else []
    folders = ["overlays"] + (["uncertainty"] if uncertainty else [])
    return [os.path.join(out, name) for name in PREDICTION_FILES] + [
        os.path.join(out, folder, name) for folder in folders for name in names]


def predict_folder(detector, inputs: Inputs | Sequence[str], out: str,
                   class_name: str | None = None, threshold: float | None = None,
                   calibrate: str | None = None, percentile: float = 100.0,
                   batch_size: int = 8, seed: int | None = 111, overlays: bool = True,
                   exif_transpose: bool = True, progress: bool = False,
                   settings: dict | None = None, uncertainty: bool = False,
                   extra: Callable[[], dict] | None = None, references=None) -> dict:
    """Score every image the inputs name, write ``<out>/predictions.csv`` / ``.json`` and
    (``overlays``) a heat-map overlay per image, and return what predictions.json holds.

    The threshold is ``threshold`` when given, else the ``percentile`` of the scores of the
    known-good images in ``calibrate`` (scored first, so that it depends only on them and the
    seed), else none (no decisions); an image is anomalous when its score is above it. Unreadable
    files are skipped and listed. ``uncertainty``: each row also gets ``score_std`` (the spread of
    the score over the prompt samples) and, with ``overlays``, a second overlay of the per-pixel
    spread under ``<out>/uncertainty``. ``references`` (good images, or a bank): the few-shot
    mode for the calibration and the scored images alike. ``extra()``, called once the images are
    scored (e.g. the provenance with its wall time), goes into predictions.json as it is.

    predictions.csv grows row by row as the images are scored; an interruption (Ctrl-C,
    SIGTERM raised as KeyboardInterrupt) or an error while writing ends with both files written
    as far as the run went and marked ``"status": "interrupted"`` in the JSON, then re-raises."""
    if not isinstance(inputs, Inputs):
        inputs = find_inputs(inputs, out, class_name, calibrate)
    check_writable(output_files(out, inputs, overlays, uncertainty), "--out", out)
    bank = references_of(detector, references, exif_transpose)
    skipped: list[dict] = []
    chosen: dict = {"method": "none", "value": None}
    if threshold is not None:
        chosen = {"method": "fixed", "value": float(threshold)}
    elif inputs.calibration:
        calib_skipped: list[dict] = []
        scores, classes = [], set()
        for item, _, res in _scored(detector, inputs.calibration, batch_size, "calibrate",
                                    progress, calib_skipped, seed, exif_transpose,
                                    references=bank):
            scores.append(res["score"])
            classes.add(item.class_name)
        if not scores:
            raise InputError(f"no readable image in the calibration folder '{calibrate}'")
        chosen = {"method": "calibrated", "value": calibrate_threshold(scores, percentile),
                  "calibration": {"directory": calibrate, "n_images": len(scores),
                                  "percentile": percentile, "class_names": sorted(classes),
                                  "score_min": float(min(scores)),
                                  "score_max": float(max(scores)), "skipped": calib_skipped}}
    if chosen["value"] is not None:
        chosen["rule"] = DECISION_RULE

    names = dict(zip(inputs.items, overlay_names(inputs.items)))
    rows: list[dict] = []
    status = "interrupted"
    log = RowLog(os.path.join(out, "predictions.csv"))

    def result() -> dict:
        return {**predictions_record(status, chosen, rows, skipped,
                                     len(inputs.items) - len(rows) - len(skipped),
                                     _references_record(detector, bank),
                                     {**(settings or {}), "stage": detector.stage},
                                     inputs.left_out + inputs.calibration_left_out),
                **(extra() if extra else {})}

    try:
        for item, image, res in _scored(detector, inputs.items, batch_size, "predict",
                                        progress, skipped, seed, exif_transpose, uncertainty,
                                        bank, on_skip=log.add):
            overlay = spread = None
            if overlays:
                overlay = os.path.join(out, "overlays", names[item])
                save_overlay(overlay, image, res["anomaly_map"])
                if uncertainty:
                    spread = os.path.join(out, "uncertainty", names[item])
                    save_overlay(spread, image, res["anomaly_map_std"], vmax=STD_SCALE)
            row = prediction_row(item.path, item.class_name, image, res,
                                 decide(res["score"], chosen["value"]), overlay, uncertainty,
                                 spread)
            rows.append(row)
            log.add(row)
        status = "complete"
    except BaseException:
        log.close()
        try:                      # what was scored, marked interrupted; never hides the cause
            write_outputs(out, result())
        except OutputError:
            pass
        raise
    log.close()
    done = result()
    csv_path, json_path = write_outputs(out, done)
    done["files"] = {"csv": csv_path, "json": json_path}
    return done
