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
