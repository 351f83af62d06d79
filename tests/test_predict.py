"""predict.py: inputs, outputs, thresholds and calibration, odd images, errors."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import predict
from utils.discovery import collect_images, overlay_names
from utils.inference import calibrate_threshold, predict_images
from models import AnomalyDetector, WeightsError, load_clip
from tests.clip_factory import TINY_LAYERS
from utils.visualize import heat_overlay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS), "--sample_num", "2",
        "--no_progress"]


def weights(tiny_files):
    clip_path, ckpt_path = tiny_files
    return ["--pretrained_path", clip_path, "--checkpoint_path", ckpt_path]


def rgb(seed, h=40, w=30):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def save(image, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return str(path)


def read_outputs(out):
    with open(os.path.join(out, "predictions.json")) as f:
        result = json.load(f)
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return result, rows


def by_path(rows):
    return {r["path"]: r for r in rows}


def test_folder_rows_overlays_csv_json(tiny_files, tmp_path, capsys):
    src = tmp_path / "images"
    sizes = {"metal_nut/000.png": (40, 30), "metal_nut/001.PNG": (24, 52),
             "metal_nut/scratch/002.jpg": (33, 33), "bottle/a/b/003.png": (16, 64)}
    for i, (rel, (h, w)) in enumerate(sizes.items()):
        save(rgb(i, h, w), src / rel)
    (src / "metal_nut" / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions"

    for _ in range(2):                  # the second run replaces the first's files
        assert predict.main([*weights(tiny_files), *TINY, "--input", str(src),
                             "--out", str(out)]) == 0
        result, rows = read_outputs(out)
        assert len(result["predictions"]) == len(rows) == len(sizes)

    printed = capsys.readouterr().out
    assert "4 images scored" in printed and "no threshold" in printed
    # every file under the input is accounted for: the text file is listed as left out
    assert "1 left out: 1 not an image file" in printed
    assert result["left_out"] == [{"path": str(src / "metal_nut" / "notes.txt"),
                                   "reason": "not an image file (extension .txt)"}]
    assert result["summary"]["n_left_out"] == 1
    assert result["threshold"] == {"method": "none", "value": None}
    assert result["skipped"] == [] and result["summary"]["n_images"] == 4
    expected_class = {"metal_nut/000.png": "metal_nut", "metal_nut/001.PNG": "metal_nut",
                      "metal_nut/scratch/002.jpg": "scratch", "bottle/a/b/003.png": "b"}
    json_rows = by_path(result["predictions"])
    csv_rows = by_path(rows)
    assert set(json_rows) == set(csv_rows) == {str(src / rel) for rel in sizes}
    for rel, (h, w) in sizes.items():
        j, c = json_rows[str(src / rel)], csv_rows[str(src / rel)]
        assert j["class_name"] == c["class_name"] == expected_class[rel]
        for key in ("score", "text_score", "map_score"):
            assert float(c[key]) == j[key]
            assert 0.0 <= j[key] <= 1.0
        assert j["score"] == pytest.approx(0.5 * (j["text_score"] + j["map_score"]))
        assert j["decision"] is None and c["decision"] == ""
        assert j["overlay"] == c["overlay"] == str(out / "overlays" / (os.path.splitext(rel)[0]
                                                                       + ".png"))
        with Image.open(j["overlay"]) as overlay:
            assert overlay.size == (w, h) and overlay.mode == "RGB"


def test_calibration_threshold_is_the_percentile(tiny_files, tmp_path):
    good = [save(rgb(10 + i), tmp_path / "good" / f"{i:02d}.png") for i in range(5)]
    test_dir = tmp_path / "test"
    for i in range(3):
        save(rgb(20 + i), test_dir / f"{i}.png")

    clip_path, ckpt_path = tiny_files
    det = AnomalyDetector.from_files(clip_path, ckpt_path, image_size=32, device="cpu",
                                     sample_num=2, layers=TINY_LAYERS)
    scores = [r["score"] for r in predict_images(det, good, "widget", batch_size=8, seed=111)]

    for percentile in (100, 95):
        out = tmp_path / f"out{percentile}"
        assert predict.main([*weights(tiny_files), *TINY, "--input", str(test_dir),
                             "--class_name", "widget", "--calibrate", str(tmp_path / "good"),
                             "--percentile", str(percentile), "--out", str(out),
                             "--no_overlay"]) == 0
        result, rows = read_outputs(out)
        threshold = result["threshold"]
        assert threshold["method"] == "calibrated"
        assert threshold["calibration"]["n_images"] == 5
        assert threshold["calibration"]["percentile"] == percentile
        assert threshold["calibration"]["directory"] == str(tmp_path / "good")
        assert threshold["value"] == pytest.approx(np.percentile(scores, percentile),
                                                   rel=1e-6, abs=1e-7)
        for row in result["predictions"]:
            assert row["class_name"] == "widget" and row["overlay"] is None
            assert row["decision"] == ("anomalous" if row["score"] > threshold["value"]
                                       else "normal")
        assert result["summary"]["n_anomalous"] == sum(r["decision"] == "anomalous"
                                                       for r in rows)
        assert not (out / "overlays").exists()


def test_fixed_threshold_decisions_and_overlay_scale(tiny_files, tmp_path, capsys):
    paths = [save(rgb(30 + i, 20 + i, 30), tmp_path / "in" / f"{i}.png") for i in range(3)]
    assert predict.main([*weights(tiny_files), *TINY, "--input", str(tmp_path / "in"),
                         "--threshold", "0.5", "--out", str(tmp_path / "out")]) == 0
    result, rows = read_outputs(tmp_path / "out")
    assert result["threshold"] == {
        "method": "fixed", "value": 0.5,
        "rule": "anomalous when score > threshold (strictly), else normal"}
    for j, c in zip(result["predictions"], rows):
        assert j["decision"] == c["decision"] == ("anomalous" if j["score"] > 0.5 else "normal")

    # the same numbers as predict_images, and overlays with the map read on a fixed 0..1 scale
    clip_path, ckpt_path = tiny_files
    det = AnomalyDetector.from_files(clip_path, ckpt_path, image_size=32, device="cpu",
                                     sample_num=2, layers=TINY_LAYERS)
    direct = predict_images(det, paths, "in", seed=111)
    for path, row, res in zip(paths, result["predictions"], direct):
        assert row["path"] == path and row["class_name"] == "in"
        assert row["score"] == pytest.approx(res["score"], rel=1e-6)
        expected = heat_overlay(np.asarray(Image.open(path).convert("RGB")), res["anomaly_map"],
                                vmin=0.0, vmax=1.0)
        with Image.open(row["overlay"]) as overlay:
            assert np.abs(np.asarray(overlay).astype(int) - expected).max() <= 1
    printed = capsys.readouterr().out
    assert "threshold 0.500000 (fixed)" in printed
    assert f"{result['summary']['n_anomalous']} anomalous" in printed


def test_calibrate_threshold_function():
    scores = [0.2, 0.9, 0.4, 0.1]
    assert calibrate_threshold(scores) == 0.9
    assert calibrate_threshold(scores, 95) == pytest.approx(np.percentile(scores, 95))
    assert calibrate_threshold(scores, 0) == 0.1
    with pytest.raises(ValueError, match="percentile"):
        calibrate_threshold(scores, 101)
    with pytest.raises(ValueError, match="no calibration"):
        calibrate_threshold([], 100)


def test_odd_modes_and_unreadable_file(tiny_files, tmp_path, capsys):
    src = tmp_path / "parts"
    base = np.random.default_rng(0).integers(0, 256, (36, 28, 4), np.uint8)
    wide = np.random.default_rng(1).integers(0, 65536, (20, 45), np.uint16)
    images = {
        "rgba.png": Image.fromarray(base, "RGBA"),
        "grey.png": Image.fromarray(base[..., 0], "L"),
        "deep.png": Image.fromarray(wide),                       # 16-bit grey
        "palette.png": rgb(2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "wide.bmp": rgb(3, 21, 77),
        "tiny.png": rgb(4, 3, 2),
    }
    for name, image in images.items():
        save(image, src / name)
    with Image.open(src / "deep.png") as im:
        assert im.mode in ("I;16", "I")
    broken = src / "broken.png"
    broken.write_bytes(b"\x89PNG not really" + bytes(range(256)))

    out = tmp_path / "out"
    assert predict.main([*weights(tiny_files), *TINY, "--input", str(src), "--out", str(out),
                         "--class_name", "part"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and "skipped" in lines[0]

    result, rows = read_outputs(out)
    scored = by_path(result["predictions"])
    assert set(scored) == {str(src / name) for name in images}
    for name, image in images.items():
        row = scored[str(src / name)]
        assert np.isfinite(row["score"])
        with Image.open(row["overlay"]) as overlay:
            assert overlay.size == image.size
    assert [s["path"] for s in result["skipped"]] == [str(broken)]
    assert "cannot read image" in result["skipped"][0]["error"]
    assert result["summary"]["n_skipped"] == 1
    skipped_rows = [r for r in rows if r["decision"] == "skipped"]
    assert [r["path"] for r in skipped_rows] == [str(broken)] and skipped_rows[0]["error"]
    assert rows[-1]["decision"] == "skipped"      # listed after the scored images


def test_glob_input(tiny_files, tmp_path):
    for cls in ("screw", "pill"):
        save(rgb(len(cls)), tmp_path / "data" / cls / "x.png")
        save(rgb(5), tmp_path / "data" / cls / "y.jpg")
    out = tmp_path / "out"
    pattern = str(tmp_path / "data" / "*" / "*.png")
    assert predict.main([*weights(tiny_files), *TINY, "--input", pattern, "--out",
                         str(out)]) == 0
    result, _ = read_outputs(out)
    rows = by_path(result["predictions"])
    assert set(rows) == {str(tmp_path / "data" / c / "x.png") for c in ("screw", "pill")}
    for cls in ("screw", "pill"):
        row = rows[str(tmp_path / "data" / cls / "x.png")]
        assert row["class_name"] == cls
        assert row["overlay"] == str(out / "overlays" / cls / "x.png")


def test_collect_images(tmp_path):
    save(rgb(0), tmp_path / "a" / "one.png")
    save(rgb(0), tmp_path / "a" / "one.jpg")
    save(rgb(0), tmp_path / "a" / ".hidden.png")
    unmatched = []
    items = collect_images([str(tmp_path / "a"), str(tmp_path / "a" / "one.png"),
                                    str(tmp_path / "nothing*.png")], on_unmatched=unmatched.append)
    assert [os.path.basename(i.path) for i in items] == ["one.jpg", "one.png"]
    assert {i.class_name for i in items} == {"a"}
    assert unmatched == [str(tmp_path / "nothing*.png")]
    assert overlay_names(items) == ["one.png", "one.png.png"]


def test_no_input_exits_2(tiny_files, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for inputs in ([str(tmp_path / "empty")], [str(tmp_path / "missing.png")]):
        assert predict.main([*weights(tiny_files), *TINY, "--input", *inputs,
                             "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: no images found") and inputs[0] in err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_weights_exit_1(tiny_files, tmp_path, capsys):
    save(rgb(0), tmp_path / "in" / "a.png")
    clip_path, _ = tiny_files
    missing_ckpt = str(tmp_path / "nowhere" / "train_visa.pth")
    assert predict.main(["--pretrained_path", clip_path, "--checkpoint_path", missing_ckpt,
                         *TINY, "--input", str(tmp_path / "in"),
                         "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and missing_ckpt in err and len(err.splitlines()) == 1

    # the script itself: one line on stderr, exit status 1, no traceback
    missing_clip = str(tmp_path / "nowhere" / "ViT-L-14-336px.pt")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"),
                           "--pretrained_path", missing_clip, "--input",
                           str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and missing_clip in lines[0] and "not found" in lines[0]


def test_openai_name_with_wrong_content(tiny_files, tmp_path, capsys):
    clip_path, ckpt_path = tiny_files
    fake = tmp_path / "ViT-B-16.pt"
    shutil.copyfile(clip_path, fake)
    with pytest.raises(WeightsError, match="SHA-256"):
        load_clip(fake, image_size=32)
    assert load_clip(fake, image_size=32, verify=False).image_size == 32

    save(rgb(0), tmp_path / "in" / "a.png")
    argv = ["--pretrained_path", str(fake), "--checkpoint_path", ckpt_path, *TINY,
            "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert predict.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(fake) in err and "SHA-256" in err and "--no_verify" in err
    assert predict.main([*argv, "--no_verify"]) == 0
    result, _ = read_outputs(tmp_path / "out")
    assert len(result["predictions"]) == 1


def test_seeded_scores_do_not_depend_on_the_other_images(tiny_files, tmp_path):
    paths = [save(rgb(40 + 7 * i, 10, 90 - 5 * i), tmp_path / f"{i}.png") for i in range(3)]
    clip_path, ckpt_path = tiny_files
    det = AnomalyDetector.from_files(clip_path, ckpt_path, image_size=32, device="cpu",
                                     sample_num=2, layers=TINY_LAYERS)
    together = predict_images(det, paths, "in", batch_size=2, seed=5)
    alone = predict_images(det, paths[2:], "in", seed=5)
    assert alone[0]["score"] == pytest.approx(together[2]["score"], abs=1e-6)
    np.testing.assert_allclose(alone[0]["anomaly_map"], together[2]["anomaly_map"], atol=1e-6)
    other = predict_images(det, paths[2:], "in", seed=6)
    assert other[0]["score"] != pytest.approx(alone[0]["score"], abs=1e-7)
