"""The spread over the posterior samples: per-pixel uncertainty maps and score spreads,
checked against the plain computation (one detector call per sample, stacked, std)."""

from __future__ import annotations

import pytest
import torch

from models import AnomalyDetector
from tests.clip_factory import TINY_LAYERS, standard_noise


def _per_sample(det_one, images, names, noise, r, topk=None):
    """Maps, image scores and fused scores of each sample alone (sample_num = 1)."""
    maps, scores, fused = [], [], []
    for i in range(r):
        one = {k: v[i:i + 1] for k, v in noise.items()}
        out = det_one.predict(images, names, one)
        maps.append(out["anomaly_map"])
        scores.append(out["image_score"])
        if topk is not None:
            flat = out["anomaly_map"].flatten(1)
            top = torch.stack([flat[j].topk(k).values.mean() for j, k in enumerate(topk)])
            fused.append(0.5 * (out["image_score"] + top))
    return torch.stack(maps), torch.stack(scores), (torch.stack(fused) if fused else None)


def test_std_equals_the_plain_computation(tiny):
    clip, model = tiny
    r, b = 5, 3
    det = AnomalyDetector(clip, model, 32, sample_num=r, stage=2, layers=TINY_LAYERS)
    det_one = AnomalyDetector(clip, model, 32, sample_num=1, stage=2, layers=TINY_LAYERS)
    images = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = ["bottle", "screw", "pcb1"]
    noise = standard_noise(r, b, clip.embed_dim, seed=2)
    topk = [20, 7, 100]
    out = det.predict(images, names, noise, return_std=True, topk=topk)
    maps, scores, fused = _per_sample(det_one, images, names, noise, r, topk)
    torch.testing.assert_close(out["anomaly_map_std"], maps.std(0, correction=0), rtol=0,
                               atol=2e-6)
    torch.testing.assert_close(out["image_score_std"], scores.std(0, correction=0), rtol=0,
                               atol=2e-6)
    torch.testing.assert_close(out["score_std"], fused.std(0, correction=0), rtol=0, atol=2e-6)
    # the mean is the mean of the per-sample maps, and the same with or without the spread
    torch.testing.assert_close(out["anomaly_map"], maps.mean(0), rtol=0, atol=2e-6)
    plain = det.predict(images, names, noise)
    assert torch.equal(plain["anomaly_map"], out["anomaly_map"])
    assert torch.equal(plain["image_score"], out["image_score"])
    assert set(plain) == {"image_score", "anomaly_map"}            # nothing extra when off
    assert out["anomaly_map_std"].shape == (b, 32, 32) and out["image_score_std"].shape == (b,)
    assert out["anomaly_map_std"].max() > 1e-4                      # there is a spread


def test_std_with_one_sample_is_zero(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=1, stage=1, layers=TINY_LAYERS)
    out = det.predict(torch.randn(2, 3, 32, 32), "wood",
                      standard_noise(1, 2, clip.embed_dim, seed=0), return_std=True)
    assert not out["anomaly_map_std"].any() and not out["image_score_std"].any()


def test_predict_py_uncertainty_outputs(tiny_files, tmp_path):
    import csv

    import numpy as np
    from PIL import Image

    import predict
    from utils.inference import predict_images

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.RandomState(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.randint(0, 255, (20, 30, 3)).astype(np.uint8)).save(src / name)
    args = ["--pretrained_path", tiny_files[0], "--checkpoint_path", tiny_files[1],
            "--image_size", "32", "--features_list", "1", "2", "3", "4", "--sample_num", "3",
            "--input", str(src), "--out", str(tmp_path / "out"), "--no_progress",
            "--uncertainty", "--class_name", "bottle"]
    assert predict.main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert len(rows) == 2 and all(float(r["score_std"]) > 0 for r in rows)
    for row in rows:
        with Image.open(row["uncertainty_overlay"]) as overlay:
            assert overlay.size == (30, 20)                      # the image's own size
    # the same numbers as the notebook API
    det = predict.load_detector(predict.get_parser().parse_args(args))
    (res,) = predict_images(det, [str(src / "a.png")], "bottle", seed=111, return_std=True)
    assert float(rows[0]["score_std"]) == pytest.approx(res["score_std"], abs=1e-6)
    assert res["anomaly_map_std"].shape == (20, 30)
