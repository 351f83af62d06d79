"""Float32 noise of the forward, and what it allows the metrics to move.

Two runs that differ only in how images are batched (batch size, a process's share) compute
the same maps to float32 rounding: a GEMM of another shape sums in another order, so a map
value moves by about 1e-7 (``MAP_NOISE`` bounds it with a margin). The rank metrics turn such
moves of nearly tied values into larger ones (an AUPRO step of 1e-5 from 1e-7), so they are not
compared at a fixed tolerance but inside the interval that the noise allows:

every metric of the protocol but the threshold is monotone: raising a positive's value or
lowering a negative's never lowers AUROC, AP, F1-max or AUPRO (nor the IoU at a fixed
threshold). So with the other run's values within ``d`` of these, its metric lies between the
metric of these values with every positive lowered and every negative raised by ``d`` and the
metric with the opposite shift (:func:`metric_interval`). The F1-max threshold is not monotone
(two near-equal F1 peaks may trade places); the test is that the other run's threshold is
(near) the best of these values too: at it, these values shifted up reach the lower F1 bound.
"""

from __future__ import annotations

import numpy as np

from utils import metrics
from utils.protocol import _image_metrics, _pixel_metrics, gaussian_smooth

# Map values of two batchings agree to this (measured: up to 2e-7 at the tiny geometry).
MAP_NOISE = 1e-6
# The smoothing and the fusion add their own float rounding on top of the maps' noise.
SMOOTHING_NOISE = 1e-6

MONOTONE_PIXEL = ("auroc_px", "aupro_px", "ap_px", "f1_px")
MONOTONE_IMAGE = ("auroc_sp", "ap_sp", "f1_sp")


def _shifted(values: np.ndarray, positive: np.ndarray, d: float) -> np.ndarray:
    """``values`` with every positive raised by ``d`` and every negative lowered by ``d``
    (``d`` < 0: the other way), in float64 so that the shift is not rounded away."""
    return values.astype(np.float64) + d * np.where(positive, 1.0, -1.0)


def smoothed(maps) -> np.ndarray:
    import torch

    return gaussian_smooth(torch.as_tensor(np.asarray(maps, np.float32))).numpy()


def metric_interval(labels, masks, smoothed_maps, image_scores, d_pixel: float,
                    d_image: float, pro: str = "exact") -> dict[str, tuple[float, float]]:
    """{column: (lowest, highest)} that another run can reach whose smoothed maps lie within
    ``d_pixel`` of ``smoothed_maps`` and whose image scores lie within ``d_image`` of
    ``image_scores`` (the monotone columns; see the module docstring)."""
    masks = np.asarray(masks, bool)
    labels = np.asarray(labels, bool)
    low = {**_pixel_metrics(masks, _shifted(smoothed_maps, masks, -d_pixel), pro),
           **_image_metrics(labels, _shifted(image_scores, labels, -d_image))}
    high = {**_pixel_metrics(masks, _shifted(smoothed_maps, masks, d_pixel), pro),
            **_image_metrics(labels, _shifted(image_scores, labels, d_image))}
    return {k: (low[k], high[k]) for k in MONOTONE_PIXEL + MONOTONE_IMAGE
            if low.get(k) is not None}


def assert_rows_within_noise(row: dict, other: dict, labels, masks, smoothed_maps,
                             image_scores, d_pixel: float, d_image: float, pro: str = "exact",
                             where: str = "") -> None:
    """``other`` (a class's metric row of a run whose maps and scores lie within the given
    distances of these) holds what that noise allows: each monotone column inside
    :func:`metric_interval`, the IoU inside its interval at ``other``'s threshold, and that
    threshold one where these maps (shifted up) reach the lower F1 bound. ``row`` (this run's metrics) must lie in the same intervals."""
    intervals = metric_interval(labels, masks, smoothed_maps, image_scores, d_pixel, d_image,
                                pro)
    for column, (lo, hi) in intervals.items():
        for name, value in (("this run", row[column]), ("the other run", other[column])):
            assert lo - 1e-12 <= value <= hi + 1e-12, (
                f"{where} {column} of {name} {value!r} outside [{lo!r}, {hi!r}], the interval "
                f"that map noise of {d_pixel:g} (scores {d_image:g}) allows")
    if other.get("threshold") is None:
        assert row.get("threshold") is None, where
        return
    masks = np.asarray(masks, bool)
    t = other["threshold"]
    up = _shifted(smoothed_maps, masks, d_pixel)
    down = _shifted(smoothed_maps, masks, -d_pixel)
    iou_lo = metrics.iou(masks, down > t)
    iou_hi = metrics.iou(masks, up > t)
    assert iou_lo - 1e-12 <= other["iou"] <= iou_hi + 1e-12, (where, other["iou"], iou_lo, iou_hi)
    f1_at_t = _f1_at(masks, up, t)
    assert f1_at_t >= intervals["f1_px"][0] - 1e-12, (
        f"{where} the other run's threshold {t!r} is not near an F1 peak of this run's maps "
        f"(F1 {f1_at_t!r} there, below the lower bound {intervals['f1_px'][0]!r})")


def _f1_at(masks: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """F1 of ``values >= threshold`` against ``masks``."""
    predicted = values >= threshold
    tp = float(np.sum(predicted & masks))
    fp = float(np.sum(predicted & ~masks))
    fn = float(np.sum(~predicted & masks))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# Images' fused scores: the fusion min-max normalises the map scores over the class, which can
# scale the maps' noise up by a few times.
IMAGE_NOISE = 10 * MAP_NOISE


def assert_batchings_agree(rows: dict, outputs: dict, dataset_name: str, pro: str = "exact",
                           where: str = "") -> None:
    """Two batchings ``a`` and ``b`` of one class's run: ``outputs`` {a: ClassOutputs, b:
    ClassOutputs} (computed through the API) and ``rows`` {a: row, b: row} (what a script wrote
    for them). Each row is exactly the metrics of its outputs; the outputs agree to the float32
    noise (maps and text scores within MAP_NOISE, smoothed maps within MAP_NOISE +
    SMOOTHING_NOISE, fused scores within IMAGE_NOISE); and each row lies inside the interval
    that this noise allows around the other batching's outputs."""
    from utils.protocol import COLUMNS, evaluate_class

    (a, first), (b, second) = outputs.items()
    assert np.abs(first.maps - second.maps).max() <= MAP_NOISE, where
    assert np.abs(first.text_scores - second.text_scores).max() <= MAP_NOISE, where
    computed = {key: evaluate_class(o.labels, o.masks, o.text_scores, o.maps, o.name,
                                    dataset_name, pro=pro) for key, o in outputs.items()}
    for key in (a, b):
        assert {c: rows[key][c] for c in COLUMNS} == {c: computed[key][c] for c in COLUMNS}, (
            where, key)
    d_pixel = MAP_NOISE + SMOOTHING_NOISE
    if computed[a]["smoothed_maps"] is not None:
        assert np.abs(computed[a]["smoothed_maps"] - smoothed(second.maps)).max() <= d_pixel
    assert np.abs(computed[a]["image_scores"] - computed[b]["image_scores"]).max() \
        <= IMAGE_NOISE, where
    assert_rows_within_noise(rows[a], rows[b], first.labels, first.masks,
                             computed[a]["smoothed_maps"], computed[a]["image_scores"], d_pixel,
                             IMAGE_NOISE, pro, where)


def api_outputs(tiny_files, root: str, dataset_name: str, batch_size: int, seed: int,
                classes=None, references=None, sample_num: int = 2) -> dict:
    """{class: {run: ClassOutputs}} of test.py's run on the tiny weights (32 px, layers 1-4),
    through the API: ``references(dataset, detector)`` -> the few-shot banks, or None."""
    from dataset.data import AnomalyDataset, make_loader
    from models import AnomalyDetector
    from utils.evaluate import iterate_runs

    det = AnomalyDetector.from_files(*tiny_files, image_size=32, layers=[1, 2, 3, 4],
                                     sample_num=sample_num, device="cpu")
    dataset = AnomalyDataset(root, dataset_name, mode="test", image_size=32,
                             class_names=classes)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, seed=0)
    banks = references(dataset, det) if references is not None else None
    return {next(iter(runs.values())).name: runs
            for runs in iterate_runs(det, loader, [seed], progress=False, references=banks)}
