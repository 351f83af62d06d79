"""The torch metrics (utils.metrics_torch) and the class protocol on a device, against the
numpy reference (utils.metrics), scikit-learn, brute force and analytic values. Run on CPU
tensors here; the code is the same on any device."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from utils import metrics, metrics_torch, protocol
from utils.metrics import label_regions
from utils.protocol import evaluate_class
from tests.test_metrics import _aupro_brute, _small_case
from tests.test_protocol import _class_case as protocol_case

ALL = ("auroc_px", "aupro_px", "ap_px", "f1_px", "iou", "threshold", "auroc_sp", "ap_sp",
       "f1_sp")


def _scores(seed, n=5000, decimals=None, positives=0.3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < positives
    scores = rng.normal(size=n) + 0.8 * labels
    if decimals is not None:          # quantised: many ties, across the two labels too
        scores = np.round(scores, decimals)
    return labels, scores.astype(dtype)


def _sklearn_f1_max(labels, scores):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1])        # the last point (recall 0) has no threshold
    best = int(np.argmax(f1))          # thresholds ascend: the lowest of the best
    return f1[best], thresholds[best]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_ranking_metrics_equal_the_reference_and_sklearn(seed, decimals, dtype):
    labels, scores = _scores(seed, decimals=decimals, dtype=dtype)
    y, s = torch.from_numpy(labels), torch.from_numpy(scores)
    ss = metrics_torch.sort_by_label(y, s)
    reference = metrics.sort_by_label(labels, scores)
    assert np.array_equal(ss.positives.numpy(), reference.positives)
    assert np.array_equal(ss.negatives.numpy(), reference.negatives)
    got = metrics_torch.auroc_sorted(ss)
    assert got == metrics.auroc_sorted(reference)                # exact integer counts
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    got = metrics_torch.average_precision_sorted(ss)
    assert got == pytest.approx(metrics.average_precision_sorted(reference), abs=1e-12)
    assert got == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    f1, threshold = metrics_torch.f1_max_sorted(ss)
    assert (f1, threshold) == metrics.f1_max_sorted(reference)     # the same threshold
    sk_f1, sk_threshold = _sklearn_f1_max(labels, scores)
    assert f1 == pytest.approx(sk_f1, abs=1e-12) and threshold == sk_threshold
    pred = s > threshold
    assert metrics_torch.iou(y, pred) == metrics.iou(labels, pred.numpy())


def test_tiny_and_degenerate_inputs():
    t = torch.tensor
    assert metrics_torch.auroc(t([True, False]), t([0.2, 0.1])) == 1.0
    assert metrics_torch.auroc(t([True, False]), t([0.1, 0.1])) == 0.5        # a tie: half
    assert metrics_torch.average_precision(t([True, False]), t([0.1, 0.1])) == 0.5
    assert metrics_torch.f1_max(t([True, False, False]), t([0.5, 0.5, 0.1])) == (
        pytest.approx(2 / 3), 0.5)
    assert metrics_torch.f1_max(t([1, 0, 1]), t([3, 2, 1])) == metrics.f1_max(
        np.array([1, 0, 1]), np.array([3, 2, 1]))                          # integer scores
    assert metrics_torch.iou(torch.zeros(4, 4), torch.zeros(4, 4)) == 1.0
    with pytest.raises(ValueError, match="only one class is present .all samples are "
                                         "negative"):
        metrics_torch.auroc(torch.zeros(5), torch.rand(5))
    with pytest.raises(ValueError, match="all samples are positive"):
        metrics_torch.average_precision(torch.ones(5), torch.rand(5))
    with pytest.raises(ValueError, match="without any positive"):
        metrics_torch.f1_max(torch.zeros(5), torch.rand(5))
    with pytest.raises(ValueError, match="differ in size"):
        metrics_torch.auroc(torch.ones(4), torch.rand(5))


# ---------------------------------------------------------------------------------------------
# AUPRO


@pytest.mark.parametrize("limit", [0.3, 0.05, 0.1234567, 1.0])
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_aupro_equals_the_exact_reference_and_brute_force(limit, decimals):
    masks, maps = _small_case()
    if decimals is None:
        maps = maps + np.random.default_rng(1).random(maps.shape) * 1e-3
    else:
        maps = np.round(maps + np.random.default_rng(1).random(maps.shape) * 0.2, decimals)
    got = metrics_torch.aupro(torch.from_numpy(masks), torch.from_numpy(maps), limit)
    assert got == pytest.approx(metrics.aupro(masks, maps, limit), abs=1e-12)
    assert got == pytest.approx(_aupro_brute(masks, maps, limit), abs=1e-12)


def test_aupro_analytic_values_and_given_regions():
    masks, _ = _small_case()
    m = torch.from_numpy(masks)
    assert metrics_torch.aupro(m, m.float()) == pytest.approx(1.0, abs=1e-12)
    # constant map: one threshold, curve (0, 0) -> (1, 1); area up to 0.3 is 0.3^2 / 2
    assert metrics_torch.aupro(m, torch.full(m.shape, 0.5)) == pytest.approx(0.15, abs=1e-12)
    assert metrics_torch.aupro(m, -m.double()) == pytest.approx(0.0, abs=1e-12)
    assert metrics_torch.aupro(m, torch.full(m.shape, 0.5), fpr_limit=1.0) == pytest.approx(0.5)
    maps = torch.rand(m.shape, generator=torch.Generator().manual_seed(0))
    regions = label_regions(masks)
    assert metrics_torch.aupro(m, maps, regions=regions) == metrics_torch.aupro(m, maps)
    with pytest.raises(ValueError, match="regions do not belong"):
        metrics_torch.aupro(m[1:], maps[1:], regions=regions)


def test_aupro_one_region_pixel_and_errors():
    masks = torch.zeros(1, 5, 5, dtype=torch.bool)
    masks[0, 2, 2] = True
    maps = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5) / 24.0
    expected = metrics.aupro(masks.numpy(), maps.numpy())
    assert metrics_torch.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="without any anomalous pixel"):
        metrics_torch.aupro(torch.zeros(2, 8, 8), torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="without any normal pixel"):
        metrics_torch.aupro(torch.ones(2, 8, 8), torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics_torch.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="equal shapes"):
        metrics_torch.aupro(masks, maps[:, :4])


def test_floor_score_always_leaves_enough_background():
    """The strided sample's proposal (close above the exact order statistic on ordinary
    scores), and the exact fallback when the sample misleads."""
    n = 900_000                                            # a sample of every 2nd score
    bg = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for needed in (1, 1000, 300_000, n - 1, n):
        floor = metrics_torch._floor_score(bg, needed)
        assert needed <= int((bg >= floor).sum()) < needed + 0.02 * n
    for high_at_sample in (False, True):                   # scores alternating low and high
        bg = torch.zeros(n)
        bg[int(high_at_sample)::2] = 1.0 + torch.rand(n // 2,
                                                      generator=torch.Generator().manual_seed(0))
        for needed in (1000, 300_000, 460_000, n):
            floor = metrics_torch._floor_score(bg, needed)
            assert int((bg >= floor).sum()) >= needed
    # a sample pointing too high (all its scores high, too few of them): the exact answer
    assert float(metrics_torch._floor_score(bg, 460_000)) == 0.0


def test_aupro_at_518_pixels():
    """A few float32 maps of 518 x 518 with realistic regions: the exact reference."""
    from benchmarks.metrics import make_class

    masks, maps = make_class(3, 518, seed=5)
    got = metrics_torch.aupro(torch.from_numpy(masks), torch.from_numpy(maps))
    assert got == pytest.approx(metrics.aupro(masks, maps), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The class protocol on a device


def _class_case(seed=0, n=6, size=40, decimals=None):
    return protocol_case(seed, n, size, speck=True, decimals=decimals)


def _on_device(monkeypatch):
    """Every device, the CPU included, runs the torch metrics."""
    monkeypatch.setattr(protocol, "_metrics_on_device", lambda device: True)


def _assert_same(a, b, tol=1e-6):
    for key in ALL:
        if a[key] is None or b[key] is None:
            assert a[key] is b[key] is None, key
        else:
            assert a[key] == pytest.approx(b[key], abs=tol), key
    np.testing.assert_allclose(a["image_scores"], b["image_scores"], rtol=0, atol=1e-12)
    if a["smoothed_maps"] is None:
        assert b["smoothed_maps"] is None
    else:
        np.testing.assert_array_equal(a["smoothed_maps"], b["smoothed_maps"])


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("pro", ["exact", "official", "off"])
def test_evaluate_class_on_a_device_equals_the_reference(monkeypatch, pro, decimals):
    labels, masks, text, maps = _class_case(decimals=decimals)
    reference = evaluate_class(labels, masks, text, maps, "bottle", "mvtec", pro=pro)
    _on_device(monkeypatch)
    got = evaluate_class(torch.from_numpy(labels), torch.from_numpy(masks),
                         torch.from_numpy(text), torch.from_numpy(maps), "bottle", "mvtec",
                         pro=pro)
    _assert_same(got, reference)
    assert all(type(got[k]) is float for k in ALL if got[k] is not None)
    assert got["image_scores"].dtype == np.float64
    assert got["smoothed_maps"].dtype == np.float32
    # the threshold is the reference's, so IoU counts the same pixels
    assert got["threshold"] == reference["threshold"] and got["iou"] == reference["iou"]


def test_evaluate_class_on_a_device_at_518_pixels(monkeypatch):
    from benchmarks.metrics import make_class

    masks, maps = make_class(4, 518, seed=3)
    labels = masks.reshape(4, -1).any(1).astype(int)
    labels[0] = 1 - labels[0] if labels.all() or not labels.any() else labels[0]
    text = np.linspace(0.2, 0.8, 4)
    reference = evaluate_class(labels, masks, text, maps, "bottle", "mvtec")
    _on_device(monkeypatch)
    _assert_same(evaluate_class(labels, masks, text, maps, "bottle", "mvtec"), reference)


def test_evaluate_class_on_a_device_keeps_the_not_applicable_rules(monkeypatch):
    labels, masks, text, maps = _class_case()
    keep = labels == 1
    cases = [((labels[keep], masks[keep], text[keep], maps[keep], "screw", "visa"), "image"),
             ((labels, np.zeros_like(masks), text, maps, "bottle", "mvtec"), "pixel"),
             ((labels, None, text, maps, "brain", "BrainMRI"), "pixel")]
    references = [evaluate_class(*args) for args, _ in cases]
    _on_device(monkeypatch)
    for (args, missing), reference in zip(cases, references):
        got = evaluate_class(*args)
        _assert_same(got, reference)
        shown = protocol.IMAGE_METRICS if missing == "image" else protocol.PIXEL_METRICS
        assert all(got[k] is None for k in shown)


def test_evaluate_class_device_argument(monkeypatch):
    labels, masks, text, maps = _class_case()
    seen, on_device = [], protocol._metrics_on_device
    assert not on_device(torch.device("cpu")) and on_device(torch.device("cuda", 0))
    monkeypatch.setattr(protocol, "_metrics_on_device",
                        lambda device: seen.append(device) or False)
    evaluate_class(labels, masks, text, maps, "bottle", "mvtec")             # numpy: the CPU
    evaluate_class(labels, masks, text, torch.from_numpy(maps), "bottle", "mvtec")
    evaluate_class(labels, masks, text, maps, "bottle", "mvtec", device="cpu")
    assert seen == [torch.device("cpu")] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_class_on_cuda_equals_the_cpu():
    labels, masks, text, maps = _class_case(decimals=2)
    reference = evaluate_class(labels, masks, text, maps, "bottle", "mvtec")
    torch.backends.cuda.matmul.allow_tf32 = True             # as test.py --tf32 sets it
    try:
        got = evaluate_class(labels, masks, text, torch.from_numpy(maps).cuda(), "bottle",
                             "mvtec")
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    for key in ALL:
        assert got[key] == pytest.approx(reference[key], abs=1e-6), key
    np.testing.assert_allclose(got["smoothed_maps"], reference["smoothed_maps"], atol=1e-6)
