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
    return y, s


class SortedScores(NamedTuple):
    """Scores of the positive and the negative samples, each sorted ascending."""

    positives: np.ndarray
    negatives: np.ndarray


def sort_by_label(labels, scores) -> SortedScores:
    """Splits scores by binary label and sorts each part (shared by the ranking metrics)."""
    y, s = _flat_pair(labels, scores)
    positives, negatives = s[y], s[~y]    # (new arrays: faster than np.compress)
    positives.sort()
    negatives.sort()
    return SortedScores(positives, negatives)


def _require_both(ss: SortedScores, metric: str) -> None:
    if ss.positives.size == 0 or ss.negatives.size == 0:
        present = "positive" if ss.positives.size else "negative"
        raise ValueError(
            f"{metric} is undefined when only one class is present (all samples are {present})."
        )


def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and the index where each run of equal values starts."""
    if sorted_values.size == 0:
        return sorted_values, np.zeros(0, dtype=np.int64)
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
    """(highest F1 over all distinct thresholds, the threshold reaching it); positive: >= t."""
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
    elif s.dtype.itemsize < 4:
        s = s.astype(np.float32)
    return np.ascontiguousarray(m), np.ascontiguousarray(s)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected regions of each mask, numbered across the whole stack.

    masks: bool [N, H, W]. Returns the region index (0..R-1) of every anomalous pixel, int64
    [A] in the order of masks.reshape(-1).nonzero(), and the region sizes, int64 [R].
    """
    ids = []
    offset = 0
    for mask in masks:
        if not mask.any():
            continue
        count, lab = cv2.connectedComponents(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        ids.append(lab[mask].astype(np.int64) + (offset - 1))
        offset += count - 1
    region_of_pixel = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return region_of_pixel, np.bincount(region_of_pixel, minlength=offset).astype(np.int64)


def _top_background(scores: np.ndarray, anomalous: np.ndarray, num_bg: int, needed: int):
    """A floor score v with at least `needed` background pixels >= v (and not many more), and
    the mask of the background pixels >= v.

    A strided sample proposes v and a full count confirms it; the exact order statistic is the
    fallback, so the result is valid whatever the sample looks like.
    """
    if needed < num_bg:
        step = max(1, scores.size // 400_000)
        sample = scores[::step][~anomalous[::step]]
        # Rank in the sample expected to hold `needed` pixels above it, plus a safety margin.
        above = needed / num_bg * sample.size
        above = int(above + 6.0 * math.sqrt(above + 1.0) + 0.005 * sample.size + 16)
        if above < sample.size:
            floor = np.partition(sample, sample.size - above)[sample.size - above]
            top = np.greater_equal(scores, floor)
            np.greater(top, anomalous, out=top)  # score >= floor and background
            if np.count_nonzero(top) >= needed:
                return floor, top
        bg = scores[~anomalous]
        floor = np.partition(bg, bg.size - needed)[bg.size - needed]
    else:
        floor = scores.dtype.type(-np.inf)
    top = np.greater_equal(scores, floor)
    return floor, np.greater(top, anomalous, out=top)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """Signed integers of the floats' width whose order is that of the (non-NaN) float values."""
    int_type = np.int32 if values.dtype.itemsize == 4 else np.int64
    if values.size and values.min() > 0:
        return values.view(int_type)  # positive floats order like their bit patterns
    bits = (values + values.dtype.type(0)).view(int_type)  # + 0 turns -0.0 into +0.0
    return np.where(bits < 0, bits ^ np.iinfo(int_type).max, bits)


_MAX_BUCKETS_LOG2 = 22


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Exact area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    masks: binary [N, H, W]; maps: finite scores [N, H, W]. Regions are the 8-connected
    components of each mask. Every distinct score t is a threshold (a pixel is positive when
    score >= t): FPR(t) = background pixels >= t / all background pixels, PRO(t) = mean over all
    regions of the fraction of the region's pixels >= t. The curve starts at (0, 0), is cut at
    `fpr_limit` by linear interpolation, and its trapezoidal area is divided by `fpr_limit`.

    The curve only moves right at distinct background scores b, along the straight segment from
    (FPR(> b), PRO(> b)) to (FPR(>= b), PRO(>= b)); between consecutive distinct background
    scores it is vertical (region pixels only). The area is a sum over these segments, in any
    order, and the limit falls in exactly one of them. Only pixels at or above the background
    score where FPR passes the limit take part. Their scores are bucketed by their float bits
    (order preserving); in a bucket without any region pixel PRO is constant, so its background
    pixels form one flat segment and are only counted. The background scores of the other
    buckets are sorted, and PRO at each is read from the sorted region scores.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")
    masks, maps = _stack(masks, maps)
    region_of_pixel, sizes = label_regions(masks)  # [A], [R]
    num_regions = sizes.size
    if num_regions == 0:
        raise ValueError("AUPRO is undefined without any anomalous pixel in the masks.")
    scores = maps.reshape(-1)
    anomalous = masks.reshape(-1)
    num_bg = anomalous.size - int(sizes.sum())
    if num_bg == 0:
        raise ValueError("AUPRO is undefined without any normal pixel in the masks.")

    # Background pixels needed to pass the limit (+1 guards the float product).
    needed = min(num_bg, math.floor(fpr_limit * num_bg) + 2)
    floor, top = _top_background(scores, anomalous, num_bg, needed)
    bg = scores[top]  # [B], unsorted
    region = scores[anomalous]
    region_kept = region >= floor
    region, region_id = region[region_kept], region_of_pixel[region_kept]  # [P]

    # Buckets of consecutive float values above the floor, from the order-preserving keys.
    floor_key = int(_order_keys(np.array([floor]))[0])
    top_key = max(int(_order_keys(x.max(keepdims=True))[0]) for x in (bg, region) if x.size)
    span = top_key - floor_key
    buckets_log2 = min(_MAX_BUCKETS_LOG2, bg.size.bit_length())  # about one per pixel at most
    shift = max(0, span.bit_length() - buckets_log2)
    num_buckets = (span >> shift) + 1

    def bucket(keys: np.ndarray) -> np.ndarray:
        if keys.dtype == np.int32:
            out = np.subtract(keys, floor_key, dtype=np.int64)
            return np.right_shift(out, shift, out=out)
        # int64 keys: the wrapping difference read as unsigned is exact (the span is < 2**64).
        return ((keys - np.int64(floor_key)).view(np.uint64) >> np.uint64(shift)).astype(np.intp)

    bg_keys = _order_keys(bg)  # [B]
    region_keys = _order_keys(region).astype(np.int64)  # [P]
    if bg_keys.dtype == np.int32:  # float32 scores: sort keys and region ids as one 64-bit word
        word = (region_keys + 2**31).astype(np.uint64) << np.uint64(32)
        word = np.sort(word | region_id.astype(np.uint64))
        region_keys = (word >> np.uint64(32)).astype(np.int64) - 2**31
        region_id = (word & np.uint64(0xFFFFFFFF)).astype(np.intp)
    else:
        order = np.argsort(region_keys, kind="stable")
        region_keys, region_id = region_keys[order], region_id[order]  # ascending scores
    region_bucket = bucket(region_keys)  # [P], ascending
    region_weight = (1.0 / (num_regions * sizes))[region_id]
    # pro_from[i] = PRO(>= i-th lowest kept region score) = sum of region_weight[i:]
    pro_from = np.r_[np.cumsum(region_weight[::-1])[::-1], 0.0]

    bg_bucket = bucket(bg_keys)  # [B]
    bg_count = np.bincount(bg_bucket, minlength=num_buckets)  # [num_buckets]
    mixed = np.zeros(num_buckets, dtype=bool)
    mixed[region_bucket] = True

    # Flat segments: buckets with background pixels and no region pixel.
    flat = np.flatnonzero((bg_count > 0) & ~mixed)
    flat_count = bg_count[flat]
    bg_above = np.cumsum(bg_count, out=bg_count)
    bg_above = np.subtract(bg.size, bg_above, out=bg_above)  # background pixels in higher buckets
    flat_lo = bg_above[flat]  # background pixels above the segment
    flat_hi = flat_lo + flat_count
    pro_above = np.bincount(region_bucket, weights=region_weight, minlength=num_buckets)
    pro_above = pro_above.astype(np.float64, copy=False)  # (integer when there are no weights)
    pro_above = np.cumsum(pro_above, out=pro_above)
    pro_above = np.subtract(pro_from[0], pro_above, out=pro_above)  # PRO of the higher buckets
    flat_pro = pro_above[flat]
    del flat, flat_count, pro_above

    # Sharp segments: distinct background scores in buckets holding region pixels.
    sharp = np.sort(bg[mixed[bg_bucket]])
    values, starts = _distinct(sharp)
    ends = np.r_[starts[1:], sharp.size]
    sharp_bucket = bucket(_order_keys(sharp))
    value_bucket = sharp_bucket[starts]
    bucket_end = np.searchsorted(sharp_bucket, value_bucket, side="right")
    # Background pixels above b: higher buckets, then the same bucket's higher scores.
    sharp_lo = bg_above[value_bucket] + (bucket_end - ends)
    sharp_hi = sharp_lo + (ends - starts)
    value_keys = _order_keys(values).astype(np.int64)
    sharp_pro_hi = pro_from[np.searchsorted(region_keys, value_keys, side="left")]  # PRO(>= b)
    sharp_pro_lo = pro_from[np.searchsorted(region_keys, value_keys, side="right")]  # PRO(> b)

    count_lo = np.r_[flat_lo, sharp_lo]  # background pixels above each segment
    count_hi = np.r_[flat_hi, sharp_hi]  # ... and down to its lowest score
    pro_lo = np.r_[flat_pro, sharp_pro_lo]
    pro_hi = np.r_[flat_pro, sharp_pro_hi]
    return _area_to_limit(count_lo / num_bg, count_hi / num_bg, pro_lo, pro_hi, fpr_limit)


def _area_to_limit(fpr_lo, fpr_hi, pro_lo, pro_hi, fpr_limit: float) -> float:
    """The trapezoidal area of the PRO curve's segments, (fpr_lo, pro_lo) to (fpr_hi,
    pro_hi), up to ``fpr_limit`` (the segment holding it cut by linear interpolation), divided
    by the limit."""
    full = fpr_hi < fpr_limit
    area = float(np.dot((fpr_hi - fpr_lo) * full, pro_hi + pro_lo)) / 2.0
    (cut,) = np.flatnonzero((fpr_lo < fpr_limit) & ~full)  # the segment holding the limit
    x0, x1, y0, y1 = fpr_lo[cut], fpr_hi[cut], pro_lo[cut], pro_hi[cut]
    y_cut = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
    area += (fpr_limit - x0) * (y0 + y_cut) / 2.0
    return area / fpr_limit


class RegionScores(NamedTuple):
    """``sort_by_label`` output for [N, H, W] masks, with the region of every positive."""

    scores: SortedScores      # positives (the region pixels) and negatives, ascending
    regions: np.ndarray       # int64 [A]: the region index of each sorted positive
    sizes: np.ndarray         # int64 [R]: the region sizes


def sort_by_region(masks, maps) -> RegionScores:
    """One sort shared by every pixel metric: the scores split by the masks and sorted, the
    positives with their 8-connected regions (:func:`label_regions`)."""
    masks, maps = _stack(masks, maps)
    y, s = masks.reshape(-1), maps.reshape(-1)
    region_of_pixel, sizes = label_regions(masks)
    positives, negatives = s[y], s[~y]
    order = np.argsort(positives)
    negatives.sort()
    return RegionScores(SortedScores(positives[order], negatives), region_of_pixel[order], sizes)


def iou_above(ss: SortedScores, threshold: float) -> float:
    """:func:`iou` of the positives against the samples scored strictly above ``threshold``,
    counted from ``sort_by_label`` output."""
    pos, neg = ss
    hits = pos.size - int(np.searchsorted(pos, _needle(pos, threshold), side="right"))
    union = pos.size + neg.size - int(np.searchsorted(neg, _needle(neg, threshold),
                                                      side="right"))
    return 1.0 if union == 0 else hits / union


def _needle(values: np.ndarray, x: float):
    """``x`` as a scalar of ``values``' type when that is exact: numpy's searchsorted with a
    needle of another type converts the whole array first (milliseconds on millions of
    pixels); an ``x`` the type cannot hold exactly is searched as it is."""
    cast = values.dtype.type(x)
    return cast if cast == x else x


def aupro_sorted(rs: RegionScores, fpr_limit: float = 0.3) -> float:
    """:func:`aupro` (the same curve and area, to float summation order) from
    :func:`sort_by_region` output.

    The curve moves right only at distinct background scores b, from (FPR(> b), PRO(> b)) to
    (FPR(>= b), PRO(>= b)). Only the background scores down to the one where FPR passes the
    limit take part: the highest of the sorted negatives; their counts come from their
    positions. Each region pixel's weight 1 / (regions x region size) is added to the first
    of these b above (or at) its score, and PRO at b is the sum of the weights added at or
    above b.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")
    (pos, neg), regions, sizes = rs
    if sizes.size == 0:
        raise ValueError("AUPRO is undefined without any anomalous pixel in the masks.")
    num_bg = neg.size
    if num_bg == 0:
        raise ValueError("AUPRO is undefined without any normal pixel in the masks.")
    needed = min(num_bg, math.floor(fpr_limit * num_bg) + 2)   # (+1 guards the product)
    offset = num_bg - needed
    values, starts = _distinct(neg[offset:])                    # [D] ascending
    ends = np.r_[starts[1:], needed]
    above_hi = num_bg - offset - starts                         # background pixels >= b
    above_hi[0] = num_bg - np.searchsorted(neg, values[0], side="left")  # ties below offset
    above_lo = num_bg - offset - ends                           # background pixels > b
    weight = (1.0 / (sizes.size * sizes))[regions]              # [A], ascending scores

    def pro_at(side: str) -> np.ndarray:
        """[D] PRO(>= b) ("right") or PRO(> b) ("left") at each distinct b."""
        # values[:k] lie below (or at) a region pixel whose insertion index is k
        added = np.bincount(np.searchsorted(values, pos, side=side), weights=weight,
                            minlength=values.size + 1)          # [D + 1]
        return np.cumsum(added[:0:-1])[::-1]                    # sum of added[j + 1:]

    return _area_to_limit(above_lo / num_bg, above_hi / num_bg, pro_at("left"),
                          pro_at("right"), fpr_limit)


def aupro_official(masks, maps, max_step: int = 200, fpr_limit: float = 0.3) -> float:
    """The approximate AUPRO behind the paper's PRO figures.

    Thresholds: np.arange(min, max, (max - min) / max_step) over all maps; a pixel is positive
    when score > t. PRO = mean over every region of every image of its covered fraction,
    FPR = false positives / all background pixels. Points with FPR < fpr_limit are kept, their
    FPRs min-max normalised to [0, 1], and the trapezoidal area of PRO over them returned
    (nan when fewer than two distinct FPRs remain).
    """
    masks, maps = _stack(masks, maps)
    region_ids, sizes = label_regions(masks)
    num_regions = sizes.size
    if num_regions == 0:
        raise ValueError("AUPRO is undefined without any anomalous pixel in the masks.")
    anomalous = masks.reshape(-1)
    num_bg = anomalous.size - int(sizes.sum())
    if num_bg == 0:
        raise ValueError("AUPRO is undefined without any normal pixel in the masks.")
    scores = maps.reshape(-1)
    bg_scores = scores[~anomalous]
    region_scores = scores[anomalous]

    min_th, max_th = scores.min(), scores.max()
    delta = (max_th - min_th) / max_step
    thresholds = np.arange(min_th, max_th, delta) if delta > 0 else np.empty(0)
    pros = np.empty(thresholds.size)
    fprs = np.empty(thresholds.size)
    for i, t in enumerate(thresholds):
        covered = np.bincount(region_ids, weights=region_scores > t, minlength=num_regions)
        pros[i] = np.mean(covered / sizes)
        fprs[i] = np.count_nonzero(bg_scores > t) / num_bg

    kept = fprs < fpr_limit
    fprs, pros = fprs[kept], pros[kept]
    if fprs.size < 2 or fprs.max() == fprs.min():
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # FPR falls as the threshold rises, so the trapezoids come with a negative sign.
    return float(-np.sum(np.diff(fprs) * (pros[1:] + pros[:-1]) / 2.0))
