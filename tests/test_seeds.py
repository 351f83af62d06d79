"""Results as mean ± std over sampling seeds, one image-tower pass for all seeds, and the
provenance of every result file."""

from __future__ import annotations

import json

import numpy as np
import pytest

import test as test_script
from dataset.data import AnomalyDataset, make_loader
from models import AnomalyDetector
from tests.clip_factory import TINY_LAYERS
from utils.evaluate import evaluate_runs
from utils.protocol import COLUMNS


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from dataset.synthetic import write_standard

    root = tmp_path_factory.mktemp("seeds_data")
    write_standard(str(root), name="synthetic", classes=["pill", "wood"], size=40, n_train=0,
                   n_test_good=2, n_test_anomaly=3)
    return str(root)


def _run(tiny_files, data_root, out, *extra):
    clip_path, ckpt = tiny_files
    assert test_script.main([
        "--dataset", "synthetic", "--data_path", data_root, "--checkpoint_path", ckpt,
        "--pretrained_path", clip_path, "--image_size", "32", "--features_list", "1", "2", "3",
        "4", "--sample_num", "2", "--num_workers", "0", "--save_path", str(out),
        "--no_progress", *extra]) == 0
    return out


def test_each_seed_equals_its_own_run_and_the_summary_is_mean_std(tiny_files, data_root,
                                                                  tmp_path):
    seeds = [333, 334, 335]
    many = _run(tiny_files, data_root, tmp_path / "many", "--seeds", *map(str, seeds),
                "--no_vis", "--batch_size", "2")
    per_seed = {}
    for seed in seeds:
        alone = _run(tiny_files, data_root, tmp_path / f"s{seed}", "--seed", str(seed),
                     "--no_vis", "--batch_size", "2")
        single = json.loads((alone / "results_synthetic.json").read_text())
        within = json.loads((many / f"seed{seed}_results_synthetic.json").read_text())
        assert within["classes"] == single["classes"] and within["mean"] == single["mean"]
        assert (many / f"seed{seed}_results_synthetic.csv").is_file()
        per_seed[seed] = single
    assert per_seed[333]["classes"] != per_seed[334]["classes"]      # the seed matters
    combined = json.loads((many / "results_synthetic.json").read_text())
    assert combined["seeds"] == seeds
    for name in ("pill", "wood"):
        for column in COLUMNS:
            values = [per_seed[s]["classes"][name][column] for s in seeds]
            if values[0] is None:
                continue
            assert combined["classes"][name][column] == pytest.approx(np.mean(values))
            assert combined["std"][name][column] == pytest.approx(np.std(values))
    for column in COLUMNS:
        values = [per_seed[s]["mean"][column] for s in seeds]
        if values[0] is not None:
            assert combined["mean"][column] == pytest.approx(np.mean(values))
            assert combined["mean_std"][column] == pytest.approx(np.std(values))
    header = (many / "results_synthetic.csv").read_text().splitlines()[0]
    assert "auroc_px,auroc_px_std" in header
    log = (many / "test_synthetic.log").read_text()
    assert "±" in log and "seed 334" in log


def test_the_image_tower_runs_once_for_all_seeds(tiny, data_root):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=2, stage=2, layers=TINY_LAYERS)
    calls = []
    encode = det.encode_images
    det.encode_images = lambda images: (calls.append(len(images)), encode(images))[1]
    ds = AnomalyDataset(data_root, "synthetic", image_size=32)
    loader = make_loader(ds, batch_size=4, shuffle=False, num_workers=0, seed=0)
    runs = evaluate_runs(det, loader, "synthetic", [1, 2, 3], pro="off", progress=False)
    assert sum(calls) == len(ds) == 10 and len(calls) == len(loader)
    assert set(runs) == {1, 2, 3} and all(set(r) == {"pill", "wood"} for r in runs.values())


def test_uncertainty_panel_and_provenance(tiny_files, data_root, tmp_path):
    from PIL import Image

    out = _run(tiny_files, data_root, tmp_path / "u", "--save_uncertainty")
    picture = next((out / "imgs").rglob("*.png"))
    with Image.open(picture) as image:
        assert image.size == (5 * 32, 32)                        # five panels
    record = json.loads((out / "results_synthetic.json").read_text())["provenance"]
    assert record["weights"]["clip_sha256"] and record["weights"]["checkpoint_sha256"]
    assert record["data"][0]["meta_sha256"] and record["data"][0]["images_per_class"] == {
        "pill": 5, "wood": 5}
    assert record["environment"]["torch"] and record["environment"]["device"] == "cpu"
    assert record["settings"]["seed"] == 111 and record["wall_time_s"] >= 0
    assert "commit" in record["code"]


def test_summary_compares_two_results_files(tiny_files, data_root, tmp_path, capsys):
    from utils import summary

    a = _run(tiny_files, data_root, tmp_path / "a", "--no_vis", "--seed", "1")
    b = _run(tiny_files, data_root, tmp_path / "b", "--no_vis", "--seed", "2", "--pro", "off")
    capsys.readouterr()
    assert summary.main(["--compare", str(a / "results_synthetic.json"),
                         str(b / "results_synthetic.json")]) == 0
    out = capsys.readouterr().out
    assert "auroc_px" in out and "what differs" in out
    assert "settings.seed" in out and "settings.pro" in out
    assert "provenance.weights.clip_sha256" not in out               # the same file
    assert summary.main(["--compare", str(a / "nothing.json"), str(a / "x.json")]) == 1
