"""Per-class protocol: smoothing against scipy, fusion rule, metrics dict, table."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from utils.metrics import aupro, f1_max
from utils.protocol import (
    COLUMNS,
    TOPK_20_CLASSES,
    evaluate_class,
    fuse_image_scores,
    gaussian_smooth,
    summarise,
    topk_for_class,
)


@pytest.mark.parametrize(
    "shape, sigma",
    [((3, 64, 64), 8.0), ((2, 10, 10), 8.0), ((2, 40, 28), 2.0), ((1, 5, 3), 8.0), ((33, 17), 1.5)],
)
def test_gaussian_equals_scipy(shape, sigma):
    """Including maps smaller than the radius (32 at sigma 8): reflected again and again."""
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    planes = x.reshape((-1,) + shape[-2:])
    expected = np.stack([ndimage.gaussian_filter(p, sigma) for p in planes]).reshape(shape)
    got = gaussian_smooth(torch.from_numpy(x), sigma)
    assert got.dtype == torch.float32 and got.shape == x.shape
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5, rtol=0)


def test_gaussian_chunks_and_in_place():
    x = torch.rand(5, 20, 24)
    expected = gaussian_smooth(x, 3.0, chunk=16)
    got = gaussian_smooth(x, 3.0, chunk=2)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)
    y = x.clone()
    assert gaussian_smooth(y, 3.0, chunk=2, out=y) is y
    np.testing.assert_allclose(y.numpy(), expected.numpy(), atol=1e-6)


def test_topk_classes():
    assert TOPK_20_CLASSES == {"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw",
                               "cashew", "chewinggum"}
    assert all(topk_for_class(c) == 20 for c in TOPK_20_CLASSES)
    assert topk_for_class("bottle") == 2000 and topk_for_class("candle") == 2000


def test_fusion_rule():
    rng = np.random.default_rng(1)
    text = rng.random(6)
    maps = rng.random((6, 50, 50)).astype(np.float32)  # 2500 pixels: k = 2000 fits
    for name, k in [("screw", 20), ("bottle", 2000)]:
        top = np.sort(maps.reshape(6, -1), axis=1)[:, -k:].astype(np.float64).mean(axis=1)
        norm = lambda v: (v - v.min()) / (v.max() - v.min() + 1e-8)  # noqa: E731
        expected = 0.5 * norm(text) + 0.5 * norm(top)
        got = fuse_image_scores(torch.from_numpy(text), torch.from_numpy(maps), name)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    # Maps smaller than k: the mean of all pixels.
    small = rng.random((3, 10, 10))
    got = fuse_image_scores(text[:3], small, "bottle").numpy()
    mean = small.reshape(3, -1).mean(axis=1)
    norm_text = (text[:3] - text[:3].min()) / (np.ptp(text[:3]) + 1e-8)
    norm_mean = (mean - mean.min()) / (np.ptp(mean) + 1e-8)
    np.testing.assert_allclose(got, 0.5 * norm_text + 0.5 * norm_mean, atol=1e-9)


def _class_case(seed=0, n=6, size=40, speck=False, decimals=None):
    """Half the images anomalous with a square defect scored higher than the rest; ``speck``
    adds a one-pixel region beside each square, ``decimals`` rounds the maps (ties)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    masks = np.zeros((n, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(4, size - 14, 2)
        masks[i, r:r + 10, c:c + 10] = True
        if speck:
            masks[i, r + 12, c] = True
    maps = rng.random((n, size, size)) * 0.5 + 0.4 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    text = 0.3 * labels + 0.5 * rng.random(n)
    return labels, masks, text, maps.astype(np.float32)


def test_evaluate_class_metrics():
    labels, masks, text, maps = _class_case()
    before = maps.copy()
    m = evaluate_class(labels, masks, text, maps, "bottle", "mvtec")
    np.testing.assert_array_equal(maps, before)  # inputs untouched
    smoothed = np.stack([ndimage.gaussian_filter(x, 8.0) for x in maps])
    np.testing.assert_allclose(m["smoothed_maps"], smoothed, atol=1e-5)
    sm = m["smoothed_maps"]
    assert m["auroc_px"] == pytest.approx(roc_auc_score(masks.ravel(), sm.ravel()), abs=1e-9)
    assert m["ap_px"] == pytest.approx(average_precision_score(masks.ravel(), sm.ravel()), abs=1e-9)
    f1, threshold = f1_max(masks, sm)
    assert (m["f1_px"], m["threshold"]) == (f1, threshold)
    pred = sm > threshold                       # official: strictly above the threshold
    assert m["iou"] == pytest.approx((pred & masks).sum() / (pred | masks).sum())
    assert m["aupro_px"] == pytest.approx(aupro(masks, sm))
    fused = fuse_image_scores(text, maps, "bottle").numpy()
    np.testing.assert_allclose(m["image_scores"], fused)
    assert m["auroc_sp"] == pytest.approx(roc_auc_score(labels, fused), abs=1e-9)
    assert m["ap_sp"] == pytest.approx(average_precision_score(labels, fused), abs=1e-9)
    assert m["f1_sp"] == f1_max(labels, fused)[0]
    off = evaluate_class(labels, masks, text, maps, "bottle", "mvtec", pro="off")
    assert off["aupro_px"] is None
    official = evaluate_class(labels, masks, text, torch.from_numpy(maps), "bottle", "mvtec",
                              pro="official")
    assert 0.0 < official["aupro_px"] <= 1.0
    with pytest.raises(ValueError, match="pro"):
        evaluate_class(labels, masks, text, maps, "bottle", "mvtec", pro="fast")


def test_all_anomalous_class_has_no_image_metrics():
    labels, masks, text, maps = _class_case()
    keep = labels == 1
    m = evaluate_class(labels[keep], masks[keep], text[keep], maps[keep], "screw", "visa")
    assert m["auroc_sp"] is None and m["ap_sp"] is None and m["f1_sp"] is None
    assert m["auroc_px"] is not None and m["aupro_px"] is not None


def test_class_without_anomalous_pixels_has_no_pixel_metrics():
    labels, masks, text, maps = _class_case()
    m = evaluate_class(labels, np.zeros_like(masks), text, maps, "bottle", "mvtec")
    assert all(m[k] is None for k in ("auroc_px", "aupro_px", "ap_px", "f1_px", "iou", "threshold"))
    assert m["auroc_sp"] is not None


def test_classification_only_dataset():
    labels, _, text, maps = _class_case()
    m = evaluate_class(labels, None, text, maps, "brain", "BrainMRI")
    assert all(m[k] is None for k in ("auroc_px", "aupro_px", "ap_px", "f1_px", "iou", "threshold"))
    np.testing.assert_allclose(m["image_scores"], text)  # the text score alone
    assert m["auroc_sp"] == pytest.approx(roc_auc_score(labels, text), abs=1e-9)
    assert m["smoothed_maps"] is None


def test_summarise_table_and_mean():
    rows = {
        "bottle": {"auroc_px": 0.9, "aupro_px": 0.8, "ap_px": 0.5, "f1_px": 0.55, "iou": 0.4,
                   "auroc_sp": 0.95, "ap_sp": 0.97, "f1_sp": 0.9, "threshold": 0.123456,
                   "image_scores": np.zeros(3)},
        "screw": {"auroc_px": 0.8, "aupro_px": None, "ap_px": 0.3, "f1_px": 0.35, "iou": 0.2,
                  "auroc_sp": None, "ap_sp": None, "f1_sp": None, "threshold": 0.5},
    }
    table, mean = summarise(rows)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["class", *COLUMNS]
    screw = [c.strip() for c in lines[3].strip("|").split("|")]
    assert screw == ["screw", "80.0", "n/a", "30.0", "35.0", "20.0", "n/a", "n/a", "n/a", "0.5000"]
    last = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert last == ["mean", "85.0", "80.0", "40.0", "45.0", "30.0", "95.0", "97.0", "90.0",
                    "0.3117"]
    assert mean["auroc_px"] == pytest.approx(0.85) and mean["aupro_px"] == pytest.approx(0.8)
    assert summarise({"x": dict.fromkeys(COLUMNS)})[1]["auroc_sp"] is None


def test_iou_counts_pixels_strictly_above_the_f1_threshold():
    """Ties exactly at the F1-max threshold are predicted normal, as in the official code."""
    from utils.protocol import _pixel_metrics

    masks = np.zeros((2, 4, 4), dtype=bool)
    smoothed = np.full((2, 4, 4), 0.1, dtype=np.float32)
    masks[0, :2] = True                               # 8 anomalous pixels
    smoothed[0, :2] = 0.9
    smoothed[0, 0, :2] = 0.5                          # 2 of them tie at 0.5 ...
    smoothed[1, 0, :1] = 0.5                          # ... with 1 normal pixel
    m = _pixel_metrics(masks, smoothed, "off")
    assert m["threshold"] == pytest.approx(0.5)       # F1 0.94 there against 0.86 at 0.9
    above, at_or_above = smoothed > 0.5, smoothed >= 0.5
    assert m["iou"] == pytest.approx((above & masks).sum() / (above | masks).sum())   # 6 / 8
    assert m["iou"] != pytest.approx((at_or_above & masks).sum() / (at_or_above | masks).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_top_values_equal_topk(dtype):
    from utils.protocol import top_values

    rng = np.random.default_rng(3)
    flat = torch.from_numpy(np.round(rng.random((5, 3000)), 2)).to(dtype)   # many ties
    for k in (1, 20, 2000, 3000):
        got = top_values(flat, k)
        expected = flat.topk(k, dim=1).values
        assert got.dtype == expected.dtype and got.is_contiguous()
        assert torch.equal(got, expected)
        assert torch.equal(got.double().mean(1), expected.double().mean(1))
