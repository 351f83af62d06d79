"""Metrics against scikit-learn, brute-force sweeps and analytic values."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from utils import metrics
from utils.metrics import (
    aupro,
    aupro_official,
    auroc,
    average_precision,
    f1_max,
    iou,
    label_regions,
)

EIGHT = np.ones((3, 3), dtype=int)  # 8-connectivity


def _random_case(seed, n=4000, decimals=None):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 0.8 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels, scores


@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_ap_equal_sklearn(seed, decimals):
    labels, scores = _random_case(seed, decimals=decimals)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-9
    )


def test_auroc_ap_torch_inputs_any_shape():
    labels, scores = _random_case(3, n=24 * 24 * 3, decimals=1)
    y = torch.from_numpy(labels.reshape(3, 24, 24))
    s = torch.from_numpy(scores.reshape(3, 24, 24)).float()
    expected = scores.astype(np.float32)
    assert auroc(y, s) == pytest.approx(roc_auc_score(labels, expected), abs=1e-9)
    expected_ap = average_precision_score(labels, expected)
    assert average_precision(y, s) == pytest.approx(expected_ap, abs=1e-9)


def test_one_class_raises():
    scores = np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="only one class"):
        auroc(np.zeros(10), scores)
    with pytest.raises(ValueError, match="only one class"):
        average_precision(np.ones(10), scores)
    with pytest.raises(ValueError):
        f1_max(np.zeros(10), scores)


def _f1_sweep(labels, scores):
    best, best_t = -1.0, None
    for t in np.unique(scores):  # ascending: the first maximum is the lowest threshold
        pred = scores >= t
        tp = np.sum(pred & labels)
        precision = tp / pred.sum()
        recall = tp / labels.sum()
        f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 > best + 1e-12:
            best, best_t = f1, t
    return best, best_t


@pytest.mark.parametrize("decimals", [None, 1])
def test_f1_max_equals_sweep(decimals):
    labels, scores = _random_case(5, n=600, decimals=decimals)
    f1, t = f1_max(labels, scores)
    ref_f1, ref_t = _f1_sweep(labels, scores)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert t == ref_t


def test_f1_max_perfect_and_iou():
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])
    assert f1_max(labels, scores) == (1.0, 0.7)
    assert iou(labels, scores >= 0.7) == 1.0
    assert iou([1, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(1 / 3)
    assert iou(np.zeros(4), np.zeros(4)) == 1.0


# ---------------------------------------------------------------------------------------------
# AUPRO


def _small_case(seed=0):
    """5 maps of 24x24, several regions per image (one without), rounded scores (ties)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 24, 24), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 15:20, 15:17] = True
    masks[0, 7, 7] = True  # touches (6, 8) diagonally: same 8-connected region
    masks[1, 10:14, 0:4] = True
    masks[2, 0:2, 20:24] = True
    masks[2, 20:24, 0:3] = True
    masks[2, 12, 12] = True
    masks[4, 5:18, 5:18] = True
    maps = np.round(rng.random(masks.shape) + 0.6 * ndimage.uniform_filter(masks * 1.0, 3), 1)
    return masks, maps


def _aupro_brute(masks, maps, limit):
    regions = []  # (image index, region mask)
    for i, m in enumerate(masks):
        lab, count = ndimage.label(m, structure=EIGHT)
        regions += [(i, lab == r) for r in range(1, count + 1)]
    points = [(0.0, 0.0)]
    background = ~masks
    for t in np.unique(maps)[::-1]:
        positive = maps >= t
        fpr = np.sum(positive & background) / background.sum()
        covered = [np.sum(positive[i] & region) / region.sum() for i, region in regions]
        points.append((fpr, np.mean(covered)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 >= limit:
            y_cut = y0 + (limit - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y1
            area += (limit - x0) * (y0 + y_cut) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_label_regions_eight_connected():
    masks, _ = _small_case()
    region_of_pixel, sizes = label_regions(masks)
    expected = sum(ndimage.label(m, structure=EIGHT)[1] for m in masks)
    assert sizes.size == expected == 8
    assert region_of_pixel.size == sizes.sum() == masks.sum()
    assert np.array_equal(np.bincount(region_of_pixel), sizes)
    # Pixel order: that of masks.reshape(-1).nonzero(); regions numbered image after image.
    image_of_pixel = np.nonzero(masks.reshape(-1))[0] // (24 * 24)
    regions_per_image = [set(region_of_pixel[image_of_pixel == i]) for i in range(5)]
    assert regions_per_image == [{0, 1, 2}, {3}, {4, 5, 6}, set(), {7}]
    first = np.nonzero(masks[0].reshape(-1))[0][0]  # row 2, column 3: region 0
    assert region_of_pixel[0] == 0 and first == 2 * 24 + 3


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("decimals", [1, None])
def test_aupro_equals_brute_force(limit, decimals):
    masks, maps = _small_case()
    if decimals is None:  # distinct scores
        maps = maps + np.random.default_rng(1).random(maps.shape) * 1e-3
    expected = _aupro_brute(masks, maps, limit)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("buckets_log2", [0, 2, 6, 20])
def test_aupro_any_bucket_size(monkeypatch, buckets_log2):
    """From one bucket (all background pixels sorted) to many: the same area."""
    masks, maps = _small_case(seed=3)
    maps = maps + np.random.default_rng(2).random(maps.shape) * 1e-2 * (maps > 0.8)
    expected = _aupro_brute(masks, maps, 0.3)
    monkeypatch.setattr(metrics, "_MAX_BUCKETS_LOG2", buckets_log2)
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps.astype(np.float32)) == pytest.approx(
        _aupro_brute(masks, maps.astype(np.float32), 0.3), abs=1e-12
    )


def test_aupro_negative_scores():
    masks, maps = _small_case(seed=4)
    maps = maps - 1.0  # negative, zero and positive scores
    assert aupro(masks, maps) == pytest.approx(_aupro_brute(masks, maps, 0.3), abs=1e-12)
    assert aupro(masks, -0.0 * maps) == pytest.approx(0.15, abs=1e-12)  # -0.0 equals 0.0


def test_aupro_limit_between_points_and_torch_input():
    masks, maps = _small_case(seed=2)
    # A limit that no background count hits exactly: the cut interpolates inside a segment.
    limit = 0.1234567
    expected = _aupro_brute(masks, maps, limit)
    got = aupro(torch.from_numpy(masks), torch.from_numpy(maps).float(), fpr_limit=limit)
    assert got == pytest.approx(_aupro_brute(masks, maps.astype(np.float32), limit), abs=1e-9)
    assert got == pytest.approx(expected, abs=1e-6)


def test_aupro_fpr_limit_respected():
    """Scores below the limit's cut do not change the area; scores above it do."""
    masks, maps = _small_case()
    base = aupro(masks, maps, fpr_limit=0.3)
    lowered = maps.copy()
    lowest_bg = maps[~masks].min()
    lowered[(maps == lowest_bg) & ~masks] -= 5.0  # background pixels far below the cut
    lowered[(maps == maps.min()) & masks] -= 5.0  # region pixels below the cut as well
    assert aupro(masks, lowered, fpr_limit=0.3) == pytest.approx(base, abs=1e-12)
    raised = maps.copy()
    raised[~masks] += 1.0  # every background pixel above every region pixel
    assert aupro(masks, raised, fpr_limit=0.3) == pytest.approx(0.0, abs=1e-12)


def test_aupro_analytic():
    masks, _ = _small_case()
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    # Constant map: one threshold, curve (0, 0) -> (1, 1); area up to 0.3 is 0.3^2 / 2.
    constant = np.full(masks.shape, 0.5)
    assert aupro(masks, constant, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0, abs=1e-12)


def test_aupro_needs_both_kinds_of_pixel():
    with pytest.raises(ValueError, match="anomalous"):
        aupro(np.zeros((2, 8, 8)), np.random.default_rng(0).random((2, 8, 8)))
    with pytest.raises(ValueError, match="normal"):
        aupro(np.ones((2, 8, 8)), np.random.default_rng(0).random((2, 8, 8)))


def _aupro_official_plain(masks, maps, max_step=200, expect_fpr=0.3):
    """Direct transcription of the definition: loops over thresholds, images and regions."""
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / max_step
    fprs, pros = [], []
    for t in np.arange(min_th, max_th, delta):
        binary = maps > t
        overlaps = []
        for b, m in zip(binary, masks):
            lab, count = ndimage.label(m, structure=EIGHT)
            for r in range(1, count + 1):
                region = lab == r
                overlaps.append(b[region].sum() / region.sum())
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(~masks, binary).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # FPR falls as the threshold rises: trapezoids taken with the opposite sign.
    return -np.sum(np.diff(fprs) * (pros[1:] + pros[:-1]) / 2.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aupro_official_equals_plain(dtype):
    masks, maps = _small_case()
    maps = (maps + np.random.default_rng(4).random(maps.shape) * 0.05).astype(dtype)
    got = aupro_official(masks, maps)
    assert got == pytest.approx(_aupro_official_plain(masks, maps), abs=1e-12)
    assert 0.0 < got <= 1.0


def test_aupro_official_degenerate_is_nan():
    masks, _ = _small_case()
    assert math.isnan(aupro_official(masks, np.full(masks.shape, 0.5)))


# ---------------------------------------------------------------------------------------------
# One sort shared by the pixel metrics (sort_by_region, aupro_sorted, iou_above)


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.1234567, 1.0])
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_aupro_sorted_equals_aupro_and_brute_force(limit, decimals):
    masks, maps = _small_case(seed=1)
    if decimals is None:  # distinct scores
        maps = maps + np.random.default_rng(3).random(maps.shape) * 1e-3
    else:                 # ties within and across the two kinds of pixel
        maps = np.round(maps + np.random.default_rng(3).random(maps.shape) * 0.2, decimals)
    rs = metrics.sort_by_region(masks, maps)
    got = metrics.aupro_sorted(rs, fpr_limit=limit)
    assert got == pytest.approx(aupro(masks, maps, fpr_limit=limit), abs=1e-12)
    assert got == pytest.approx(_aupro_brute(masks, maps, limit), abs=1e-12)


def test_sort_by_region_shares_the_ranking_sort():
    masks, maps = _small_case(seed=2)
    rs = metrics.sort_by_region(masks, maps.astype(np.float32))
    ss = metrics.sort_by_label(masks, maps.astype(np.float32))
    assert np.array_equal(rs.scores.positives, ss.positives)
    assert np.array_equal(rs.scores.negatives, ss.negatives)
    region_of_pixel, sizes = label_regions(masks)
    assert np.array_equal(rs.sizes, sizes)
    # each sorted positive carries its own region: the multiset of (score, region) pairs
    pairs = sorted(zip(maps[masks].astype(np.float32), region_of_pixel))
    assert sorted(zip(rs.scores.positives, rs.regions)) == pairs


def test_aupro_sorted_analytic_and_errors():
    masks, _ = _small_case()
    rs = metrics.sort_by_region(masks, masks.astype(np.float32))
    assert metrics.aupro_sorted(rs) == pytest.approx(1.0, abs=1e-12)
    constant = metrics.sort_by_region(masks, np.full(masks.shape, 0.5))
    assert metrics.aupro_sorted(constant) == pytest.approx(0.15, abs=1e-12)
    assert metrics.aupro_sorted(constant, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    inverted = metrics.sort_by_region(masks, -masks.astype(float))
    assert metrics.aupro_sorted(inverted) == pytest.approx(0.0, abs=1e-12)
    one = np.zeros((1, 5, 5), dtype=bool)
    one[0, 2, 2] = True
    ramp = np.arange(25.0).reshape(1, 5, 5)
    assert metrics.aupro_sorted(metrics.sort_by_region(one, ramp)) == pytest.approx(
        aupro(one, ramp), abs=1e-12)
    with pytest.raises(ValueError, match="anomalous"):
        metrics.aupro_sorted(metrics.sort_by_region(np.zeros((2, 8, 8)), np.ones((2, 8, 8))))
    with pytest.raises(ValueError, match="normal"):
        metrics.aupro_sorted(metrics.sort_by_region(np.ones((2, 8, 8)), np.ones((2, 8, 8))))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro_sorted(rs, fpr_limit=1.5)


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_iou_above_counts_what_iou_counts(decimals):
    labels, scores = _random_case(7, n=3000, decimals=decimals)
    ss = metrics.sort_by_label(labels, scores)
    for threshold in [f1_max(labels, scores)[1], -np.inf, np.inf, float(np.median(scores))]:
        assert metrics.iou_above(ss, threshold) == iou(labels, scores > threshold)
