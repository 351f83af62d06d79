"""The one reader and preprocessing of every entry point (dataset/transforms.py, SPEC section 6):
a file is resized in its own mode and converted to RGB afterwards, as the official transform
does; test.py (the Dataset) and predict.py / the notebook API give identical inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.data import AnomalyDataset
from models.errors import InputError
from dataset.transforms import (CLIP_MEAN, CLIP_STD, ImageReadError, preprocess_image,
                                read_image, to_pil_image)

SIZE = 16


def _expected(path: str, size: int = SIZE) -> torch.Tensor:
    """Computed here with Pillow and numpy: resize as opened, then RGB, [0, 1], mean/std."""
    with Image.open(path) as image:
        rgb = image.resize((size, size), Image.BICUBIC).convert("RGB")
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _converted_first(path: str, size: int = SIZE) -> torch.Tensor:
    with Image.open(path) as image:
        return preprocess_image(image.convert("RGB"), size)


def _write(kind: str, path: str) -> None:
    rng = np.random.RandomState(0)
    if kind == "rgba":            # translucent: grey levels where alpha is 0 must not leak
        rgba = rng.randint(0, 256, (30, 41, 4)).astype(np.uint8)
        rgba[..., 3] = np.where(np.arange(41) % 3 == 0, 0, 160)
        Image.fromarray(rgba, "RGBA").save(path)
    elif kind == "palette":
        Image.fromarray(rng.randint(0, 256, (30, 41, 3)).astype(np.uint8)).quantize(12).save(path)
    elif kind == "16bit":
        values = (np.arange(30 * 41).reshape(30, 41) * 41).astype(np.uint16)
        Image.fromarray(values).save(path)
    else:
        Image.fromarray(rng.randint(0, 256, (30, 41, 3)).astype(np.uint8)).save(path)


@pytest.mark.parametrize("kind,mode", [("rgba", "RGBA"), ("palette", "P"), ("16bit", "I;16")])
def test_files_are_resized_in_their_own_mode(tmp_path, kind, mode):
    path = str(tmp_path / f"{kind}.png")
    _write(kind, path)
    image = read_image(path)
    assert image.mode == mode                                  # nothing converted on reading
    got = preprocess_image(image, SIZE)
    torch.testing.assert_close(got, _expected(path), rtol=0, atol=1e-6)
    # converting first (the old reading) gives another input: the test can tell them apart
    assert (got - _converted_first(path)).abs().max() > 0.1


def test_rgb_and_grey_files_do_not_depend_on_the_order(tmp_path):
    rgb = str(tmp_path / "rgb.png")
    _write("rgb", rgb)
    grey = str(tmp_path / "grey.png")
    Image.open(rgb).convert("L").save(grey)
    for path in (rgb, grey):
        torch.testing.assert_close(preprocess_image(read_image(path), SIZE), _expected(path),
                                   rtol=0, atol=1e-6)
        assert torch.equal(preprocess_image(read_image(path), SIZE), _converted_first(path))


def test_exif_orientation_is_an_explicit_step(tmp_path):
    path = str(tmp_path / "photo.jpg")
    array = np.zeros((20, 30, 3), np.uint8)
    array[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6                                            # rotate 90 degrees to view
    Image.fromarray(array).save(path, exif=exif.tobytes(), quality=95)
    assert read_image(path).size == (30, 20)                    # as stored (official)
    assert read_image(path, exif_transpose=True).size == (20, 30)
    plain = str(tmp_path / "plain.png")
    _write("rgb", plain)
    assert np.array_equal(np.asarray(read_image(plain)),
                          np.asarray(read_image(plain, exif_transpose=True)))


def test_unreadable_files_and_bad_arrays_are_one_line(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError) as error:
        read_image(broken)
    assert str(broken) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match="H, W"):
        to_pil_image(np.zeros((2, 3, 5)))
    grey16 = to_pil_image(np.full((4, 5), 257 * 200, np.uint16))     # read by range: / 257
    assert grey16.mode == "L" and grey16.getpixel((0, 0)) == 200
    assert to_pil_image(np.ones((4, 5, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)


def test_test_py_and_predict_py_see_the_same_input_and_score(tmp_path, tiny_files):
    """For an ordinary 8-bit RGB file the Dataset (test.py, train.py) and the notebook API /
    predict.py build identical inputs, and the detector gives identical scores."""
    from tests.clip_factory import load_tiny

    os.makedirs(tmp_path / "data" / "square", exist_ok=True)
    _write("rgb", str(tmp_path / "data" / "square" / "a.png"))
    meta = {"train": {}, "test": {"square": [{
        "img_path": "square/a.png", "mask_path": "", "cls_name": "square",
        "specie_name": "good", "dataset_name": "x", "anomaly": 0}]}}
    (tmp_path / "data" / "meta_x.json").write_text(json.dumps(meta))
    item = AnomalyDataset(str(tmp_path / "data"), "x", image_size=32)[0]

    from models import AnomalyDetector
    from models.noise import shared_noise
    from utils.inference import predict_images, preprocess

    clip, model = load_tiny(tiny_files)
    det = AnomalyDetector(clip, model, image_size=32, sample_num=2, stage=2, layers=[1, 2, 3, 4])
    path = str(tmp_path / "data" / "square" / "a.png")
    assert torch.equal(preprocess(path, 32), item["image"])
    assert torch.equal(preprocess(path, 32, exif_transpose=True), item["image"])
    (result,) = predict_images(det, [path], "square", seed=3)
    out = det.predict(item["image"][None], ["square"], shared_noise(2, 1, clip.embed_dim, 3))
    assert result["text_score"] == float(out["image_score"][0])
