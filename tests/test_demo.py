"""The demo learns: zero-shot pixel AUROC on unseen synthetic categories clearly above chance.

Runs the real demo (about 2 minutes on 2 CPU cores). With the default seed the figure is
about 64 (mesh ~40, ring ~70, wood ~84); it moves by a few points between machines
(floating-point differences), so the assertion leaves a wide margin."""

import json

import pytest

import demo
from dataset.files import OUTPUT_MARKER, is_output_folder


@pytest.mark.slow
def test_demo_learns_on_unseen_categories(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--quiet", "--no_vis"]) == 0
    printed = capsys.readouterr().out
    assert "unseen-category pixel AUROC" in printed
    res = json.loads((tmp_path / "results" / "results_demo_eval.json").read_text())
    assert set(res["classes"]) == set(demo.UNSEEN_CLASSES)
    assert not set(res["classes"]) & set(demo.TRAIN_CLASSES)
    assert res["mean"]["auroc_px"] > 0.58
    assert res["seeds"] == [333, 334, 335] and res["mean_std"]["auroc_px"] >= 0
    assert "±" in printed
    for seed in res["seeds"]:
        assert (tmp_path / "results" / f"seed{seed}_results_demo_eval.json").is_file()
    # only the files it shows: no per-epoch checkpoints, no resumable state (and the marker
    # of an output folder)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [OUTPUT_MARKER, "best.pth",
                                                                      "train.log"]
    assert is_output_folder(tmp_path / "results")
