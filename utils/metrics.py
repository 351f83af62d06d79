"""Detection metrics for anomaly maps and image scores.

All functions take numpy arrays or torch tensors of any shape (flattened inside, except the
per-region metrics, which need [N, H, W] stacks) and compute on CPU with numpy.

Ranking metrics (AUROC, AP, F1-max) follow scikit-learn's definitions exactly, ties included,
but sort the positive and negative scores separately (values only) instead of arg-sorting all of
them, which keeps them fast on tens of millions of pixels.

AUPRO is offered twice: `aupro` is exact (every distinct score is a threshold), `aupro_official`
reproduces the 200-threshold approximation behind the paper's PRO figures.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np
import torch


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _flat_pair(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _to_numpy(labels).reshape(-1).astype(bool, copy=False)
    s = _to_numpy(scores).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}.")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    return y, s + s.dtype.type(0)  # + 0 turns -0.0 into +0.0 so that equal scores compare equal


class SortedScores(NamedTuple):
    """Scores of the positive and the negative samples, each sorted ascending."""

    positives: np.ndarray
    negatives: np.ndarray


def sort_by_label(labels, scores) -> SortedScores:
    """Splits scores by binary label and sorts each part (shared by the ranking metrics)."""
    y, s = _flat_pair(labels, scores)
    return SortedScores(np.sort(s[y]), np.sort(s[~y]))


def _require_both(ss: SortedScores, metric: str) -> None:
    if ss.positives.size == 0 or ss.negatives.size == 0:
        present = "positive" if ss.positives.size else "negative"
        raise ValueError(
            f"{metric} is undefined when only one class is present (all samples are {present})."
        )


def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and the index where each run of equal values starts."""
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return sorted_values[starts], starts


def _curve_at_positive_values(ss: SortedScores):
    """Counts at each distinct positive score u (descending): TP = #pos >= u, FP = #neg >= u.

    Precision and recall only change with a new positive at distinct positive scores; the
    thresholds in between add negatives only.
    """
    pos, neg = ss
    values, starts = _distinct(pos)
    values, starts = values[::-1], starts[::-1]  # descending thresholds
    tps = pos.size - starts
    fps = neg.size - np.searchsorted(neg, values, side="left")
    return values, tps, fps


def auroc_sorted(ss: SortedScores) -> float:
    """Area under the ROC curve (trapezoids, ties counted half) from `sort_by_label` output."""
    _require_both(ss, "AUROC")
    pos, neg = ss
    # Mann-Whitney form of the trapezoidal ROC area, in exact integer arithmetic:
    # every (positive, negative) pair counts 1 if the positive is higher, 1/2 if tied.
    below = np.searchsorted(neg, pos, side="left").astype(np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").astype(np.int64)
    twice_wins = int(below.sum()) + int(below_or_tied.sum())
    return twice_wins / (2.0 * pos.size * neg.size)


def average_precision_sorted(ss: SortedScores) -> float:
    """Average precision (step-wise sum over distinct thresholds) from `sort_by_label` output."""
    _require_both(ss, "Average precision")
    _, tps, fps = _curve_at_positive_values(ss)
    precision = tps / (tps + fps)
    recall = tps / ss.positives.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_max_sorted(ss: SortedScores) -> tuple[float, float]:
    """Highest F1 over all thresholds and the threshold reaching it, from `sort_by_label` output.

    A sample is positive when its score is >= the threshold. Among thresholds with the same F1
    the lowest is returned (the first maximum of an ascending precision-recall curve).
    """
    if ss.positives.size == 0:
        raise ValueError("F1 is undefined without any positive sample.")
    values, tps, fps = _curve_at_positive_values(ss)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    f1 = 2 * precision * recall / (precision + recall)
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # last maximum in descending order = lowest
    return float(f1[best]), float(values[best])


def auroc(labels, scores) -> float:
    """Area under the ROC curve; equal to sklearn.metrics.roc_auc_score."""
    return auroc_sorted(sort_by_label(labels, scores))


def average_precision(labels, scores) -> float:
    """Average precision; equal to sklearn.metrics.average_precision_score."""
    return average_precision_sorted(sort_by_label(labels, scores))


def f1_max(labels, scores) -> tuple[float, float]:
    """(highest F1 over all distinct thresholds, the threshold reaching it); positive: score >= t."""
    return f1_max_sorted(sort_by_label(labels, scores))


def iou(mask, pred) -> float:
    """Intersection over union of two binary arrays (1.0 when both are empty)."""
    a = _to_numpy(mask).reshape(-1).astype(bool, copy=False)
    b = _to_numpy(pred).reshape(-1).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"mask and prediction differ in size: {a.size} vs {b.size}.")
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return np.count_nonzero(a & b) / union


# ---------------------------------------------------------------------------------------------
# Per-region overlap


def _stack(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m = _to_numpy(masks).astype(bool, copy=False)
    s = _to_numpy(maps)
    if m.ndim == 2:
        m, s = m[None], s[None]
    if m.ndim != 3 or m.shape != s.shape:
        raise ValueError(
            f"masks and maps must both be [N, H, W] with equal shapes, got {m.shape} and {s.shape}."
        )
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    return m, s


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected regions of each mask, numbered across the whole stack.

    masks: bool [N, H, W]. Returns labels int32 [N, H, W] (0 = background, 1..R = regions) and
    sizes int64 [R + 1] (sizes[0] = number of background pixels).
    """
    labels = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        count, lab = cv2.connectedComponents(masks[i].astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        lab[lab > 0] += offset
        labels[i] = lab
        offset += count - 1
    sizes = np.bincount(labels.reshape(-1), minlength=offset + 1).astype(np.int64)
    return labels, sizes


def _background_floor(scores: np.ndarray, background: np.ndarray, needed: int) -> float:
    """A score v such that at least `needed` background pixels score >= v, and not many more.

    A strided sample proposes v; a full count confirms it (the exact order statistic is the
    fallback), so the result is always valid whatever the sample looks like.
    """
    num_bg = int(np.count_nonzero(background))
    if needed >= num_bg:
        return -math.inf
    step = max(1, scores.size // 1_000_000)
    sample = scores[::step][background[::step]]
    if sample.size > 0:
        # Rank in the sample expected to hold `needed` pixels above it, plus a safety margin.
        above = needed / num_bg * sample.size
        above = int(above + 6.0 * math.sqrt(above + 1.0) + 0.01 * sample.size + 16)
        if above < sample.size:
            v = np.partition(sample, sample.size - above)[sample.size - above]
            if np.count_nonzero((scores >= v) & background) >= needed:
                return float(v)
    bg = scores[background]
    return float(np.partition(bg, bg.size - needed)[bg.size - needed])


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Exact area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    masks: binary [N, H, W]; maps: scores [N, H, W]. Regions are the 8-connected components of
    each mask. Every distinct score t is a threshold (a pixel is positive when score >= t):
    FPR(t) = background pixels >= t / all background pixels, PRO(t) = mean over all regions of
    the fraction of the region's pixels >= t. The curve starts at (0, 0), is cut at `fpr_limit`
    by linear interpolation, and its trapezoidal area is divided by `fpr_limit`.

    The curve only moves right at distinct background scores b: between its points
    (FPR(> b), PRO(> b)) and (FPR(>= b), PRO(>= b)) it is a straight segment, and between
    consecutive distinct background scores it is vertical (region pixels only). So the area is
    a sum over distinct background scores, with PRO read from the sorted region pixels by binary
    search. Only the pixels scoring at or above the background score where FPR passes the limit
    take part.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")
    masks, maps = _stack(masks, maps)
    labels, sizes = label_regions(masks)
    num_regions = sizes.size - 1
    num_bg = int(sizes[0])
    if num_regions == 0:
        raise ValueError("AUPRO is undefined without any anomalous pixel in the masks.")
    if num_bg == 0:
        raise ValueError("AUPRO is undefined without any normal pixel in the masks.")

    scores = maps.reshape(-1) + maps.dtype.type(0)  # + 0 turns -0.0 into +0.0
    labels = labels.reshape(-1)
    background = labels == 0
    # Background pixels needed to pass the limit (+1 guards the float product).
    needed = min(num_bg, math.floor(fpr_limit * num_bg) + 2)
    floor = _background_floor(scores, background, needed)
    keep = scores >= floor

    bg = np.sort(scores[keep & background])  # [B] ascending
    in_region = keep & ~background
    region_scores = scores[in_region]
    order = np.argsort(region_scores, kind="stable")
    region_scores = region_scores[order]  # [P] ascending
    region_weight = (1.0 / (num_regions * sizes))[labels[in_region][order]]
    # weight_above[i] = sum of the weights of region_scores[i:]
    weight_above = np.r_[np.cumsum(region_weight[::-1])[::-1], 0.0]

    values, starts = _distinct(bg)
    values, starts = values[::-1], starts[::-1]  # descending distinct background scores
    fpr_hi = (bg.size - starts) / num_bg  # FPR(>= b)
    fpr_lo = np.r_[0.0, fpr_hi[:-1]]  # FPR(> b)
    pro_hi = weight_above[np.searchsorted(region_scores, values, side="left")]  # PRO(>= b)
    pro_lo = weight_above[np.searchsorted(region_scores, values, side="right")]  # PRO(> b)

    cut = int(np.searchsorted(fpr_hi, fpr_limit, side="left"))  # first segment reaching the limit
    area = float(np.sum((fpr_hi[:cut] - fpr_lo[:cut]) * (pro_hi[:cut] + pro_lo[:cut]))) / 2.0
    x0, x1, y0, y1 = fpr_lo[cut], fpr_hi[cut], pro_lo[cut], pro_hi[cut]
    y_cut = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
    area += (fpr_limit - x0) * (y0 + y_cut) / 2.0
    return area / fpr_limit


def aupro_official(masks, maps, max_step: int = 200, fpr_limit: float = 0.3) -> float:
    """The approximate AUPRO behind the paper's PRO figures.

    Thresholds: np.arange(min, max, (max - min) / max_step) over all maps; a pixel is positive
    when score > t. PRO = mean over every region of every image of its covered fraction,
    FPR = false positives / all background pixels. Points with FPR < fpr_limit are kept, their
    FPRs min-max normalised to [0, 1], and the trapezoidal area of PRO over them returned
    (nan when fewer than two distinct FPRs remain).
    """
    masks, maps = _stack(masks, maps)
    labels, sizes = label_regions(masks)
    num_regions = sizes.size - 1
    if num_regions == 0:
        raise ValueError("AUPRO is undefined without any anomalous pixel in the masks.")
    if sizes[0] == 0:
        raise ValueError("AUPRO is undefined without any normal pixel in the masks.")
    scores = maps.reshape(-1)
    labels = labels.reshape(-1)
    background = labels == 0
    bg_scores = scores[background]
    region_scores = scores[~background]
    region_ids = labels[~background] - 1

    min_th, max_th = scores.min(), scores.max()
    delta = (max_th - min_th) / max_step
    thresholds = np.arange(min_th, max_th, delta) if delta > 0 else np.empty(0)
    pros = np.empty(thresholds.size)
    fprs = np.empty(thresholds.size)
    for i, t in enumerate(thresholds):
        covered = np.bincount(region_ids, weights=region_scores > t, minlength=num_regions)
        pros[i] = np.mean(covered / sizes[1:])
        fprs[i] = np.count_nonzero(bg_scores > t) / sizes[0]

    kept = fprs < fpr_limit
    fprs, pros = fprs[kept], pros[kept]
    if fprs.size < 2 or fprs.max() == fprs.min():
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # FPR falls as the threshold rises, so the trapezoids come with a negative sign.
    return float(-np.sum(np.diff(fprs) * (pros[1:] + pros[:-1]) / 2.0))
