"""Validation after each epoch: mean pixel AP and mean image AP over the validation classes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from models import AnomalyDetector, BayesPFL
from utils.evaluate import iterate_classes
from utils.metrics import average_precision

from .config import TrainConfig, TrainingError


# Validation
# ------------------------------------------------------------------------------------------------


def check_validation_data(dataset) -> None:
    """Refuse, with one TrainingError naming the validation dataset and the classes, data
    on which the selection cannot work: stage 1 keeps the epoch of the best mean pixel AP
    (it needs anomalous pixels), stage 2 that of the best mean image AP (it needs normal and
    anomalous images of one class). A class with only normal images, or whose anomalous
    images all have empty masks, adds nothing to either and is refused; so are data without
    masks and data without any class holding both kinds. The masks are read until one
    defect pixel is found per class (usually the first mask)."""
    where = f"validation dataset {dataset.dataset_name} ({dataset.meta_file})"
    fix = ("choose --val_dataset / --val_classes whose classes have normal and anomalous "
           "images with defect masks")
    if dataset.classification_only:
        raise TrainingError(f"{where} has no masks (classification only): stage 1 selects on "
                            f"the pixel AP, which needs them; {fix}")
    by_class: dict[str, list[int]] = {}
    for index, sample in enumerate(dataset.samples):
        by_class.setdefault(sample["cls_name"], []).append(index)
    only_normal, no_pixels, both = [], [], []
    for name, indices in by_class.items():
        anomalous = [i for i in indices if dataset.samples[i]["label"] == 1]
        if not anomalous:
            only_normal.append(name)
            continue
        if len(anomalous) < len(indices):
            both.append(name)
        if not any(dataset.read_full_mask(i).any() for i in anomalous):
            no_pixels.append(name)
    problems = []
    if only_normal:
        problems.append(f"class(es) {', '.join(only_normal)} hold only normal images")
    if no_pixels:
        problems.append(f"the anomalous images of class(es) {', '.join(no_pixels)} all have "
                        f"empty masks (no anomalous pixel)")
    if problems:
        raise TrainingError(f"{where} cannot select the best epoch: {'; '.join(problems)}; "
                            f"{fix}")
    if not both:
        raise TrainingError(f"{where} cannot select the best epoch: no class among "
                            f"{', '.join(by_class)} holds both normal and anomalous images "
                            f"(stage 2 selects on the image AP); {fix}")


@dataclass
class ValidationResult:
    pixel_ap: float
    image_ap: float
    per_class: dict[str, dict[str, float | None]]
    skipped: list[str] = field(default_factory=list)     # log lines of skipped figures


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


@torch.no_grad()
def validate(clip, model: BayesPFL, loader: Iterable[dict], config: TrainConfig, stage: int,
             seed: int, progress: Callable | None = None, epoch: int = 0) -> ValidationResult:
    """Per class: AP of the raw maps over all pixels and AP of the text scores; then the mean
    over classes. Fresh image-agnostic samples, drawn from ``seed`` in a forked RNG (the
    caller's RNG state is untouched); the batch size does not change the samples. Non-finite
    maps or scores (a diverged training) raise a TrainingError naming ``epoch``."""
    device = next(model.parameters()).device
    detector = AnomalyDetector(clip, model, config.image_size, config.sample_num, stage,
                               config.features_list, precision=config.precision)
    detector.reset_samples()
    per_class: dict[str, dict[str, float | None]] = {}
    skipped: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for out in iterate_classes(detector, loader, progress=progress is not None,
                                   desc="validation", leave=False):
            if not (np.isfinite(out.maps).all() and np.isfinite(out.text_scores).all()):
                raise TrainingError(f"validation after epoch {epoch} gives non-finite anomaly "
                                    f"maps or scores for class {out.name}: the training "
                                    f"diverged; lower the learning rates")
            pixel = image = None
            if out.masks.any() and not out.masks.all():
                pixel = average_precision(out.masks, out.maps)
            else:
                skipped.append(f"class {out.name}: no anomalous pixels, left out of the mean "
                               "pixel AP")
            if 0 < out.labels.sum() < len(out.labels):
                image = average_precision(out.labels, out.text_scores)
            else:
                skipped.append(f"class {out.name}: one image label only, left out of the mean "
                               "image AP")
            per_class[out.name] = {"pixel_ap": pixel, "image_ap": image}
    pixel_ap = _mean([v["pixel_ap"] for v in per_class.values() if v["pixel_ap"] is not None])
    image_ap = _mean([v["image_ap"] for v in per_class.values() if v["image_ap"] is not None])
    return ValidationResult(pixel_ap, image_ap, per_class, skipped)


# ------------------------------------------------------------------------------------------------
