"""The detection metrics of ``utils.metrics`` as torch code, on whatever device the tensors
are on (the model's, so that a GPU run does not wait for the CPU).

The functions take whole-class tensors (a class's maps and masks, possibly gathered from
several processes) and return Python floats equal to those of ``utils.metrics``, the
reference, up to float summation order (about 1e-12): the counts behind AUROC, AP, F1-max
and IoU are exact integers, F1-max picks the same threshold, and AUPRO follows the same
curve. The regions of AUPRO are labelled on the CPU (``utils.metrics.label_regions``); the
sorting and the accumulation run on the device.
"""

from __future__ import annotations

import math

import torch

from utils.metrics import SortedScores, label_regions


def _flat_pair(labels, scores) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores).reshape(-1)
    y = torch.as_tensor(labels).to(s.device).reshape(-1).bool()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.numel()} vs {s.numel()}.")
    if not torch.is_floating_point(s):
        s = s.double()
    return y, s


def sort_by_label(labels, scores) -> SortedScores:
    """Scores of the positive and of the negative samples, each sorted ascending (tensors on
    the scores' device), shared by the ranking metrics."""
    y, s = _flat_pair(labels, scores)
    return SortedScores(torch.sort(s[y]).values, torch.sort(s[~y]).values)


def _require_both(ss: SortedScores, metric: str) -> None:
    if ss.positives.numel() == 0 or ss.negatives.numel() == 0:
        present = "positive" if ss.positives.numel() else "negative"
        raise ValueError(
            f"{metric} is undefined when only one class is present (all samples are {present})."
        )


def _curve_at_positive_values(ss: SortedScores):
    """At each distinct positive score u, ascending: (u, TP = #pos >= u, FP = #neg >= u)."""
    pos, neg = ss
    values, counts = torch.unique_consecutive(pos, return_counts=True)   # [U] ascending
    starts = counts.cumsum(0) - counts                                   # first index of u
    tps = pos.numel() - starts
    fps = neg.numel() - torch.searchsorted(neg, values, right=False)
    return values, tps, fps


def auroc_sorted(ss: SortedScores) -> float:
    """Area under the ROC curve (ties counted half) from :func:`sort_by_label` output."""
    _require_both(ss, "AUROC")
    pos, neg = ss
    # every (positive, negative) pair counts 2 if the positive is higher, 1 if tied
    below = torch.searchsorted(neg, pos, right=False)
    below_or_tied = torch.searchsorted(neg, pos, right=True)
    twice_wins = int(below.sum()) + int(below_or_tied.sum())
    return twice_wins / (2.0 * pos.numel() * neg.numel())


def _precision_recall(ss: SortedScores):
    values, tps, fps = _curve_at_positive_values(ss)
    precision = tps.double() / (tps + fps).double()
    recall = tps.double() / ss.positives.numel()
    return values, precision, recall


def average_precision_sorted(ss: SortedScores) -> float:
    """Average precision (step-wise sum over the distinct thresholds)."""
    _require_both(ss, "Average precision")
    _, precision, recall = _precision_recall(ss)
    # recall falls as the threshold rises: each step's gain is recall[i] - recall[i + 1]
    gain = recall - torch.cat([recall[1:], recall.new_zeros(1)])
    return float((gain * precision).sum())


def f1_max_sorted(ss: SortedScores) -> tuple[float, float]:
    """(highest F1, the lowest threshold reaching it); a sample is positive when its score is
    >= the threshold."""
    if ss.positives.numel() == 0:
        raise ValueError("F1 is undefined without any positive sample.")
    values, precision, recall = _precision_recall(ss)
    f1 = 2 * precision * recall / (precision + recall)
    best = int(torch.argmax(f1))          # the first maximum of ascending thresholds
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
    """Intersection over union of two binary tensors (1.0 when both are empty)."""
    a = torch.as_tensor(mask).reshape(-1).bool()
    b = torch.as_tensor(pred).to(a.device).reshape(-1).bool()
    if a.shape != b.shape:
        raise ValueError(f"mask and prediction differ in size: {a.numel()} vs {b.numel()}.")
    union = int((a | b).sum())
    if union == 0:
        return 1.0
    return int((a & b).sum()) / union


# ---------------------------------------------------------------------------------------------
# Per-region overlap


def _stack(masks, maps) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(maps)
    m = torch.as_tensor(masks).to(s.device).bool()
    if m.dim() == 2:
        m, s = m[None], s[None]
    if m.dim() != 3 or m.shape != s.shape:
        raise ValueError(f"masks and maps must both be [N, H, W] with equal shapes, got "
                         f"{tuple(m.shape)} and {tuple(s.shape)}.")
    if not torch.is_floating_point(s):
        s = s.double()
    elif s.element_size() < 4:
        s = s.float()
    return m, s


def _floor_score(bg: torch.Tensor, needed: int) -> torch.Tensor:
    """A score v with at least ``needed`` of the background scores ``bg`` [B] >= v, and not
    many more (0-dim tensor). A strided sample proposes v and a full count confirms it; the
    exact order statistic is the fallback."""
    if needed >= bg.numel():
        return bg.min()
    step = max(1, bg.numel() // 400_000)
    sample = torch.sort(bg[::step]).values
    # rank in the sample expected to hold `needed` pixels above it, plus a safety margin
    above = needed / bg.numel() * sample.numel()
    above = int(above + 6.0 * math.sqrt(above + 1.0) + 0.005 * sample.numel() + 16)
    if above < sample.numel():
        floor = sample[sample.numel() - above]
        if int((bg >= floor).sum()) >= needed:
            return floor
    return torch.kthvalue(bg, bg.numel() - needed + 1).values


def aupro(masks, maps, fpr_limit: float = 0.3, regions=None) -> float:
    """Exact area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1]
    (the definition of ``utils.metrics.aupro``).

    masks: binary [N, H, W]; maps: finite scores [N, H, W], on one device. ``regions``: the
    output of ``utils.metrics.label_regions`` for these masks (computed here from a CPU copy
    when not given). Every distinct score is a threshold (positive: score >= t). The pixels
    that can lie on the curve before FPR passes the limit (background pixels down to the
    score where it does, and the region pixels above it) are sorted once, descending; the
    false-positive count and PRO, the sum of 1 / (regions x region size) over the covered
    region pixels, accumulate along them; each run of tied scores is one point; the curve
    from (0, 0) is cut at the limit by linear interpolation and its trapezoidal area divided
    by the limit.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}.")
    masks, maps = _stack(masks, maps)
    device = maps.device
    if regions is None:
        regions = label_regions(masks.cpu().numpy())
    region_of_pixel = torch.as_tensor(regions[0], device=device)                  # [A]
    sizes = torch.as_tensor(regions[1], device=device)                            # [R]
    num_regions = sizes.numel()
    if num_regions == 0:
        raise ValueError("AUPRO is undefined without any anomalous pixel in the masks.")
    scores = maps.reshape(-1)
    anomalous = masks.reshape(-1)
    num_anomalous = int(anomalous.sum())
    if not int(sizes.sum()) == region_of_pixel.numel() == num_anomalous:
        raise ValueError("regions do not belong to these masks.")
    num_bg = anomalous.numel() - num_anomalous
    if num_bg == 0:
        raise ValueError("AUPRO is undefined without any normal pixel in the masks.")

    # background pixels needed to pass the limit (+1 guards the float product)
    needed = min(num_bg, math.floor(fpr_limit * num_bg) + 2)
    bg = scores[~anomalous]                                                       # [num_bg]
    floor = _floor_score(bg, needed)
    bg = bg[bg >= floor]                                                          # [B]
    region = scores[anomalous]
    kept = region >= floor
    region = region[kept]                                                         # [P]
    weight = (1.0 / (num_regions * sizes.double()))[region_of_pixel[kept]]        # [P]

    values, order = torch.sort(torch.cat([bg, region]), descending=True)          # [B + P]
    is_bg = torch.zeros(values.numel(), dtype=torch.bool, device=device)
    is_bg[:bg.numel()] = True
    steps = torch.cat([weight.new_zeros(bg.numel()), weight])
    false_positives = is_bg[order].cumsum(0)                                       # int64
    pro = steps[order].cumsum(0)
    last = torch.ones_like(is_bg)
    last[:-1] = values[1:] != values[:-1]                                          # end of a tie
    zero = pro.new_zeros(1)
    fpr = torch.cat([zero, false_positives[last].double() / num_bg])              # [T + 1]
    pro = torch.cat([zero, pro[last]])
    cut = int(torch.searchsorted(fpr, torch.tensor([fpr_limit], dtype=fpr.dtype,
                                                   device=device)))                # fpr >= limit
    x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
    y_cut = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
    area = (torch.diff(fpr[:cut]) * (pro[1:cut] + pro[:cut - 1])).sum() / 2.0
    area = area + (fpr_limit - x0) * (y0 + y_cut) / 2.0
    return float(area) / fpr_limit
