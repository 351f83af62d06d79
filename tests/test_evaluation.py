"""test.py end to end on the synthetic dataset with a tiny random CLIP and checkpoint."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import test as test_script
from tests.noise import api_outputs, assert_batchings_agree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from dataset.synthetic import write_standard

    root = tmp_path_factory.mktemp("eval_data")
    write_standard(str(root), name="synthetic", classes=["gravel", "pill", "wood"], size=48,
                   n_train=1, n_test_good=2, n_test_anomaly=3)
    return str(root)


def _args(tiny_files, data_root, out, *extra):
    clip_path, ckpt = tiny_files
    return ["--dataset", "synthetic", "--data_path", data_root, "--checkpoint_path", ckpt,
            "--pretrained_path", clip_path, "--image_size", "32", "--features_list", "1", "2",
            "3", "4", "--sample_num", "2", "--seed", "333", "--num_workers", "0",
            "--save_path", str(out), "--no_progress", *extra]


def test_end_to_end_outputs_agree_and_batch_size_does_not_matter(tiny_files, data_root, tmp_path,
                                                                  capsys):
    cli = test_script
    assert cli.main(_args(tiny_files, data_root, tmp_path / "b1", "--batch_size", "1")) == 0
    table = capsys.readouterr().out
    assert cli.main(_args(tiny_files, data_root, tmp_path / "b4", "--batch_size", "4",
                          "--no_vis")) == 0
    for col in ("auroc_px", "aupro_px", "ap_px", "f1_px", "iou", "auroc_sp", "ap_sp", "f1_sp",
                "threshold"):
        assert col in table
    assert "mean" in table and "gravel" in table

    res1 = json.loads((tmp_path / "b1" / "results_synthetic.json").read_text())
    res4 = json.loads((tmp_path / "b4" / "results_synthetic.json").read_text())
    assert set(res1["classes"]) == {"gravel", "pill", "wood"}
    # the maps agree to float32 rounding (~1e-7); each metric lies inside the interval that
    # this noise allows (tests/noise.py)
    api = {b: api_outputs(tiny_files, data_root, "synthetic", b, 333) for b in (1, 4)}
    assert set(res4["classes"]) == set(res1["classes"])
    for cls in res1["classes"]:
        assert_batchings_agree({1: res1["classes"][cls], 4: res4["classes"][cls]},
                               {b: api[b][cls][333] for b in (1, 4)}, "synthetic", where=cls)
    # CSV rows equal the JSON
    with open(tmp_path / "b1" / "results_synthetic.csv") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"gravel", "pill", "wood", "mean"}
    for cls, row in res1["classes"].items():
        for k, v in row.items():
            assert float(rows[cls][k]) == pytest.approx(v, abs=1e-6)
    mean_auroc = np.mean([r["auroc_px"] for r in res1["classes"].values()])
    assert float(rows["mean"]["auroc_px"]) == pytest.approx(mean_auroc, abs=1e-6)
    # pictures: one per test image, four panels side by side
    pics = sorted((tmp_path / "b1" / "imgs").rglob("*.png"))
    assert len(pics) == 3 * 5
    import cv2
    img = cv2.imread(str(pics[0]))
    assert img.shape == (32, 4 * 32, 3)
    assert {p.parent.name for p in pics} == {"good", "anomaly"}
    assert not (tmp_path / "b4" / "imgs").exists()
    assert (tmp_path / "b1" / "test_synthetic.log").read_text().count("auroc_px") >= 1


def test_official_pro_and_stage_from_name(tiny_files, data_root, tmp_path):
    cli = test_script
    clip_path, ckpt = tiny_files
    stage1 = tmp_path / "epoch_post_3_1.pth"
    stage1.write_bytes(open(ckpt, "rb").read())
    args = _args((clip_path, str(stage1)), data_root, tmp_path / "o", "--pro", "official",
                 "--no_vis", "--classes", "pill")
    assert cli.main(args) == 0
    res = json.loads((tmp_path / "o" / "results_synthetic.json").read_text())
    assert res["settings"]["stage"] == 1
    assert list(res["classes"]) == ["pill"]
    assert 0 <= res["classes"]["pill"]["aupro_px"] <= 1


def test_missing_weights_and_data_are_one_line_errors(tiny_files, data_root, tmp_path):
    clip_path, ckpt = tiny_files
    cmd = [sys.executable, os.path.join(ROOT, "test.py"),
           *_args((str(tmp_path / "ViT-L-14-336px.pt"), ckpt), data_root, tmp_path / "x")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "ViT-L-14-336px.pt" in r.stderr and "download" in r.stderr
    assert "Traceback" not in r.stderr
    cli = test_script
    assert cli.main(_args(tiny_files, str(tmp_path / "nowhere"), tmp_path / "y")) == 1


def test_test_sh_lists_missing_files_and_runs_what_is_present(tiny_files, tmp_path):
    from dataset.synthetic import write_standard

    clip_path, ckpt = tiny_files
    data = tmp_path / "data"
    write_standard(str(data), name="BTAD", classes=["pill"], size=32, n_train=1,
                   n_test_good=2, n_test_anomaly=2)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "train_visa.pth").write_bytes(open(ckpt, "rb").read())
    env = dict(os.environ, DATA=str(data), CLIP=clip_path, WEIGHTS=str(weights),
               OUT=str(tmp_path / "out"), DEVICE="cpu", PYTHON=sys.executable,
               EXTRA="--image_size 32 --features_list 1 2 3 4 --sample_num 2 --no_vis "
                     "--num_workers 0 --no_progress")
    r = subprocess.run(["bash", os.path.join(ROOT, "test.sh")], capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0
    assert "train_mvtec.pth" in r.stderr and "meta_mvtec.json" in r.stderr
    assert "meta_BTAD.json" not in r.stderr
    assert "| BTAD |" in r.stdout
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("| dataset |") and "BTAD" in summary
    # nothing present at all: every file listed, non-zero exit
    env.update(CLIP=str(tmp_path / "none.pt"), DATA=str(tmp_path / "nodata"))
    r = subprocess.run(["bash", os.path.join(ROOT, "test.sh")], capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0
    assert "none.pt" in r.stderr and "nothing could be evaluated" in r.stderr
    assert r.stderr.count("missing:") == 1 + 1 + 15


def test_summary_shows_paper_numbers():
    from utils.summary import markdown

    table = markdown({"mvtec": {"mean": {"auroc_sp": 0.9, "auroc_px": None, "ap_px": 0.5},
                                "seeds": [333]},
                      "visa": {"mean": {"auroc_sp": 0.8}, "mean_std": {"auroc_sp": 0.012},
                               "seeds": [333, 334]}})
    assert "90.0 (paper 92.3)" in table and "n/a (paper 91.8)" in table
    assert "80.0 ± 1.2 (paper 87.0)" in table and "| 333 334 |" in table
    assert table.index("| mvtec |") < table.index("| visa |")
