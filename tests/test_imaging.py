"""The user's images (models/imaging.py, the reading by range) and the notebook API's inputs:
16-bit and floating-point files and arrays read by the range of their type, the paper's
datasets read as the official code reads them (and counted in the log), and one InputError for
everything that is not an image."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from dataset.data import AnomalyDataset
from dataset.folder import main as folder_main
from models.errors import InputError
from models.imaging import (array_to_8bit, preprocess, preprocess_image, read_image,
                            to_8bit, to_pil_image)
from tests.clip_factory import TINY_LAYERS
from utils.evaluate import evaluate_runs
from utils.inference import predict_images
from dataset.data import make_loader

TINY = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS), "--sample_num", "2",
        "--no_progress"]


def grey(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), np.uint8)


def test_sixteen_bit_files_read_as_their_8_bit_original(det, tmp_path):
    g8 = grey(0)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    for ext in ("png", "tif"):
        Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / f"g16.{ext}")
        assert read_image(tmp_path / f"g16.{ext}").mode == "I;16"
        assert torch.equal(preprocess(str(tmp_path / f"g16.{ext}"), 32),
                           preprocess(str(tmp_path / "g8.png"), 32))
    # the official reading clips the 16-bit values (what test.py keeps for the paper's data)
    official = preprocess_image(read_image(tmp_path / "g16.png"), 32)
    assert not torch.equal(official, preprocess(str(tmp_path / "g8.png"), 32))
    assert official.max() == pytest.approx(float(((1 - 0.40821073) / 0.27577711)), abs=1e-5)
    a, b = predict_images(det, [str(tmp_path / "g16.png"), str(tmp_path / "g8.png")], "pill",
                          seed=3)
    assert a["score"] == b["score"] and np.array_equal(a["anomaly_map"], b["anomaly_map"])


def test_rounding_of_16_bit_and_float_values():
    values = np.array([[0, 128, 129, 257, 385, 386, 65535]], np.uint16)
    assert array_to_8bit(values).tolist() == [[0, 0, 1, 1, 1, 2, 255]]      # / 257, half up
    floats = np.array([[0.0, 0.5 / 255, 0.51 / 255, 1.0]], np.float32)
    assert array_to_8bit(floats).tolist()[0][0] == 0 and array_to_8bit(floats)[0, 3] == 255
    u8 = grey(1)
    assert np.array_equal(array_to_8bit(u8.astype(np.float64) / 255), u8)
    assert np.array_equal(array_to_8bit(u8.astype(np.int64)), u8)        # 0..255 wider ints
    assert array_to_8bit(np.array([[True, False]])).tolist() == [[255, 0]]
    rgb16 = np.stack([u8, u8, u8], -1).astype(np.uint16) * 257
    assert np.array_equal(array_to_8bit(rgb16), np.stack([u8, u8, u8], -1))  # as grey 16-bit
    # files: 32-bit integers (0..65535 as 16-bit) and floats (intensities in [0, 1])
    assert np.array_equal(np.asarray(to_8bit(Image.fromarray(u8.astype(np.int32) * 257))), u8)
    assert np.array_equal(np.asarray(to_8bit(Image.fromarray(
        (u8 / 255).astype(np.float32)))), u8)


@pytest.mark.parametrize("array, message", [
    (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
    (np.full((4, 4), -0.5, np.float32), r"floating-point values -0.5..-0.5, outside \[0, 1\]"),
    (np.full((4, 4), 3.0), "outside \\[0, 1\\]"),
    (np.full((4, 4), 300, np.int32), "int32 with values 300..300"),
    (np.full((4, 4), -1, np.int8), "int8 with values -1..-1"),
    (np.zeros((0, 0), np.uint8), "empty"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"shape \[2, 4, 4, 3\]"),
    (np.zeros((4, 4, 2), np.uint8), r"shape \[4, 4, 2\]"),
    (np.zeros((4, 4), np.complex64), "type complex64"),
])
def test_arrays_that_are_not_images_are_one_input_error(array, message):
    with pytest.raises(InputError, match=message):
        to_pil_image(array)


def test_out_of_range_files_are_one_line_and_skipped(tiny_files, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((20, 20), 2.5, np.float32)).save(tmp_path / "in" / "f.tif")
    Image.fromarray(grey(2)).save(tmp_path / "in" / "ok.png")
    clip, ckpt = tiny_files
    assert predict.main(["--pretrained_path", clip, "--checkpoint_path", ckpt, *TINY,
                         "--input", str(tmp_path / "in"), "--class_name", "pill",
                         "--out", str(tmp_path / "out"), "--no_overlay"]) == 0
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [r["path"] for r in result["predictions"]] == [str(tmp_path / "in" / "ok.png")]
    assert "outside [0, 1]" in result["skipped"][0]["error"]
    assert "f.tif" in result["skipped"][0]["error"]


def test_the_api_takes_the_obvious_forms(det, tmp_path):
    path = str(tmp_path / "a.png")
    Image.fromarray(grey(3)).save(path)
    as_list = predict_images(det, [path], "pill", seed=0)
    assert len(predict_images(det, path, "pill", seed=0)) == 1                  # one path
    one_pil = predict_images(det, Image.open(path), "pill", seed=0)             # one image
    one_array = predict_images(det, grey(3), "pill", seed=0)                    # one array
    rgb = predict_images(det, np.stack([grey(3)] * 3, -1), "pill", seed=0)      # grey as RGB
    for other in (one_pil, one_array, rgb):
        assert other[0]["score"] == as_list[0]["score"]


@pytest.mark.parametrize("call, message", [
    (lambda d: predict_images(d, [], "pill"), "no images given"),
    (lambda d: predict_images(d, torch.zeros(1, 3, 32, 32), "pill"), "are a tensor"),
    (lambda d: predict_images(d, {"a": 1}, "pill"), "not a dict"),
    (lambda d: predict_images(d, [np.zeros((8, 8), np.uint8)], None), "not None"),
    (lambda d: predict_images(d, [np.zeros((8, 8), np.uint8)], 3), "not 3"),
    (lambda d: predict_images(d, [np.zeros((8, 8), np.uint8)], ""), "non-empty string"),
    (lambda d: predict_images(d, [np.zeros((8, 8), np.uint8)], ["a", "b"]), "2 class names"),
    (lambda d: predict_images(d, [np.zeros((8, 8), np.uint8)], "pill", batch_size=0),
     "positive integer"),
    (lambda d: d.predict(torch.zeros(0, 3, 32, 32), "pill"), "empty batch"),
    (lambda d: d.predict(torch.zeros(3, 32, 32), "pill"), r"add the batch axis"),
    (lambda d: d.predict(torch.zeros(1, 1, 32, 32), "pill"), r"shape \[1, 1, 32, 32\]"),
    (lambda d: d.predict(torch.zeros(1, 3, 28, 28), "pill"), r"expected \[B, 3, 32, 32\]"),
    (lambda d: d.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "pill"),
     "torch.uint8 tensor"),
    (lambda d: d.predict(torch.full((1, 3, 32, 32), float("nan")), "pill"), "NaN"),
    (lambda d: d.predict(np.zeros((1, 3, 32, 32), np.float32), "pill"), "not a ndarray"),
    (lambda d: d.predict(torch.zeros(1, 3, 32, 32), None), "not None"),
    (lambda d: d.predict(torch.zeros(2, 3, 32, 32), ["pill"]), "1 class names for 2"),
    (lambda d: d.predict(torch.zeros(1, 3, 32, 32), "pill", references=[1]),
     "references must be a bank"),
])
def test_everything_else_is_one_input_error(det, call, message):
    with pytest.raises(InputError, match=message) as error:
        call(det)
    assert "\n" not in str(error.value)


def _sixteen_bit_dataset(root, name: str, with_folder_meta: bool):
    """One class 'part': two good and two anomalous 16-bit images (8-bit values x 257)."""
    base = root / name
    for kind, count in (("good", 2), ("crack", 2)):
        (base / "part" / kind).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(grey(10 + i + 5 * (kind == "crack")).astype(np.uint16) * 257).save(
                base / "part" / kind / f"{i}.png")
    if with_folder_meta:
        assert folder_main([str(base), "--dataset", name]) == 0
        return str(base)
    samples = [{"img_path": f"{name}/part/{kind}/{i}.png", "mask_path": "", "cls_name": "part",
                "specie_name": kind, "dataset_name": name, "anomaly": int(kind != "good")}
               for kind, count in (("good", 2), ("crack", 2)) for i in range(count)]
    (root / f"meta_{name}.json").write_text(json.dumps({"train": {}, "test": {"part": samples}}))
    return str(root)


def test_datasets_read_officially_and_say_so_folders_by_range(det, tmp_path, caplog):
    official_root = _sixteen_bit_dataset(tmp_path, "made", with_folder_meta=False)
    dataset = AnomalyDataset(official_root, "made", image_size=32, classification_only=True)
    item = dataset[0]
    assert item["high_bit_depth"] == 1
    assert torch.equal(item["image"], preprocess_image(read_image(dataset.samples[0]["img_path"]),
                                                       32))
    with caplog.at_level(logging.WARNING):
        evaluate_runs(det, make_loader(dataset, 4, False, 0, 0), "made", [0], pro="off",
                      progress=False)
    assert "part: 4 image file(s) of more than 8 bits per channel read as the official code" \
        in caplog.text

    folder_root = _sixteen_bit_dataset(tmp_path / "f", "mine", with_folder_meta=True)
    folder = AnomalyDataset(folder_root, "mine", image_size=32)
    assert folder.reading == "range" and folder.classification_only
    first = folder[0]
    assert first["high_bit_depth"] == 0
    assert torch.equal(first["image"], preprocess(folder.samples[0]["img_path"], 32))
