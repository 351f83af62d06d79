"""Checkpoint files: the recorded stage and settings, the file-name rule for the released
files, and a clear refusal when the flags disagree with what a file records."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from models import AnomalyDetector
from models.checkpoint import open_checkpoint, save_checkpoint
from models.errors import SettingsError
from models.spec import ModelSpec, resolve_spec
from tests.clip_factory import TINY_LAYERS, standard_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(clip, **kw):
    return ModelSpec(layers=tuple(TINY_LAYERS), image_size=32, backbone=clip.geometry.name, **kw)


def test_stage_recorded_then_file_name_then_two(tiny, tiny_files, tmp_path):
    clip, model = tiny
    recorded = tmp_path / "best.pth"
    save_checkpoint(model, str(recorded), stage=1, spec=_spec(clip))
    obj = torch.load(recorded, weights_only=True)
    assert set(obj) == {"MyModel", "stage", "model_spec"} and len(obj["MyModel"]) == 131
    c = open_checkpoint(str(recorded))
    assert (c.stage, c.spec) == (1, _spec(clip)) and "recorded" in c.stage_source

    named = tmp_path / "epoch_post_3_1.pth"
    shutil.copyfile(tiny_files[1], named)                 # official format, stage in the name
    c = open_checkpoint(str(named))
    assert (c.stage, c.spec) == (1, None) and "file name" in c.stage_source
    c = open_checkpoint(tiny_files[1])
    assert (c.stage, c.spec) == (2, None) and "released" in c.stage_source


def test_stage1_best_is_evaluated_with_the_stage1_head(tiny, tiny_files, tmp_path, caplog):
    clip, model = tiny
    best = tmp_path / "best.pth"                          # a run that never reached stage 2
    save_checkpoint(model, str(best), stage=1, spec=_spec(clip))
    with caplog.at_level(logging.INFO, logger="models"):
        det = AnomalyDetector.from_files(tiny_files[0], str(best), device="cpu", sample_num=2)
    assert det.stage == 1 and det.image_size == 32 and det.layers == TINY_LAYERS
    assert any("stage 1: recorded in the file" in r.getMessage() for r in caplog.records)
    images = torch.randn(2, 3, 32, 32)
    noise = standard_noise(2, 2, clip.embed_dim, seed=4)
    stage1 = AnomalyDetector(clip, model, 32, 2, 1, TINY_LAYERS).predict(images, "x", noise)
    stage2 = AnomalyDetector(clip, model, 32, 2, 2, TINY_LAYERS).predict(images, "x", noise)
    got = det.predict(images, "x", noise)
    assert torch.equal(got["image_score"], stage1["image_score"])
    assert not torch.equal(got["image_score"], stage2["image_score"])


def test_settings_come_from_the_record_and_must_agree(tiny, tiny_files, tmp_path):
    clip, model = tiny
    path = str(tmp_path / "run.pth")
    save_checkpoint(model, path, stage=2, spec=_spec(clip))
    # nothing asked for: the recorded settings, not the official 518 px and 6 12 18 24
    det = AnomalyDetector.from_files(tiny_files[0], path, device="cpu", sample_num=1)
    assert det.image_size == 32 and det.layers == TINY_LAYERS
    # the same settings asked for explicitly: fine
    AnomalyDetector.from_files(tiny_files[0], path, device="cpu", sample_num=1,
                               layers=[1, 2, 3, 4], image_size=32)
    with pytest.raises(SettingsError) as error:
        AnomalyDetector.from_files(tiny_files[0], path, device="cpu", layers=[2, 3, 4, 5])
    message = str(error.value)
    assert "--features_list 1 2 3 4" in message and "--features_list 2 3 4 5" in message
    assert path in message and "\n" not in message
    # a record of another backbone
    other = str(tmp_path / "other.pth")
    save_checkpoint(model, other, stage=2, spec=_spec(clip).__class__(
        **{**_spec(clip).to_dict(), "backbone": "ViT-L/14@336px"}))
    with pytest.raises(SettingsError, match="ViT-L/14@336px"):
        AnomalyDetector.from_files(tiny_files[0], other, device="cpu")


def test_resolve_spec_without_a_record_uses_the_official_defaults():
    spec = resolve_spec({"layers": None, "image_size": 224}, None, "x.pth")
    assert spec.layers == (6, 12, 18, 24) and spec.image_size == 224
    with pytest.raises(SettingsError, match="distinct"):
        ModelSpec(layers=(6, 6))


def test_test_py_refuses_a_checkpoint_trained_with_other_layers(tiny, tiny_files, tmp_path):
    from dataset.synthetic import write_standard

    clip, model = tiny
    path = str(tmp_path / "epoch_post_2_1.pth")
    save_checkpoint(model, path, stage=1, spec=_spec(clip))
    write_standard(str(tmp_path / "data"), name="synthetic", classes=["pill"], size=32,
                   n_train=0, n_test_good=1, n_test_anomaly=1)
    proc = subprocess.run(
        [sys.executable, "test.py", "--dataset", "synthetic", "--data_path",
         str(tmp_path / "data"), "--checkpoint_path", path, "--pretrained_path", tiny_files[0],
         "--features_list", "1", "2", "3", "5", "--save_path", str(tmp_path / "out"),
         "--no_progress", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "--features_list 1 2 3 4" in errors[0] and "--features_list 1 2 3 5" in errors[0]
