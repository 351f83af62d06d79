"""Tests of dataset/synthetic.py: determinism, exact masks, raw and standard layouts, meta file."""

import hashlib
import json
import os
import re

import cv2
import numpy as np
import pytest

from dataset.synthetic_scenes import MAX_AREA, MIN_AREA
from dataset.synthetic import (
    CATEGORIES,
    OBJECTS,
    TEXTURES,
    defects_of,
    generate_raw,
    main,
    render_sample,
    write_standard,
)

SMALL = dict(size=64, n_train=2, n_test_good=2, n_test_anomaly=4)
RAW_CLASSES = ["mesh", "ring"]


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    base = tmp_path_factory.mktemp("raw")
    runs = {}
    for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_raw(str(base / tag), classes=RAW_CLASSES, seed=seed, **SMALL)
        runs[tag] = _files(str(base / tag))
    return str(base / "a"), runs


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    out = tmp_path_factory.mktemp("standard")
    meta_file = write_standard(str(out), name="synth", classes=["pill", "checker"], seed=0,
                               **SMALL)
    return str(out), meta_file


def test_categories_and_defects():
    assert len(CATEGORIES) == 8 and set(TEXTURES) | set(OBJECTS) == set(CATEGORIES)
    for category in CATEGORIES:
        assert {"crack", "hole"} <= set(defects_of(category))
    assert "missing" in defects_of("pill") and "stain" in defects_of("wood")


def test_deterministic_for_a_seed(raw):
    _, runs = raw
    assert runs["a"] and runs["a"] == runs["b"]
    assert runs["a"].keys() == runs["c"].keys()
    assert runs["a"] != runs["c"]
    assert all(runs["a"][k] != runs["c"][k] for k in runs["a"])


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_cover_exactly_the_changed_pixels(category):
    for defect in defects_of(category):
        for seed in (0, 1):
            sample = render_sample(category, defect, seed=seed, size=64)
            changed = np.any(sample["image"] != sample["normal"], axis=-1)
            assert np.array_equal(sample["mask"], changed)
            assert MIN_AREA <= sample["mask"].mean() <= MAX_AREA, (category, defect, seed)
    good = render_sample(category, None, seed=0, size=64)
    assert not good["mask"].any() and np.array_equal(good["image"], good["normal"])
    with pytest.raises(ValueError, match="not painted"):
        render_sample(category, "teleport", size=64)


def test_raw_layout(raw):
    root, runs = raw
    files = runs["a"]
    for category in RAW_CLASSES:
        assert f"{category}/train/good/000.png" in files
        assert f"{category}/train/good/001.png" in files
        assert f"{category}/test/good/001.png" in files
        species = sorted(os.listdir(os.path.join(root, category, "test")))
        assert species == sorted(defects_of(category) + ("good",))
        for defect in defects_of(category):
            image = cv2.imread(os.path.join(root, category, "test", defect, "000.png"))
            assert image.shape == (64, 64, 3)
            mask = cv2.imread(os.path.join(root, category, "ground_truth", defect,
                                           "000_mask.png"), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 64) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) == {0, 255}
        assert not os.path.exists(os.path.join(root, category, "ground_truth", "good"))
        anomalous = [k for k in files if k.startswith(f"{category}/test/") and "/good/" not in k]
        assert len(anomalous) == 4
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_raw(root, classes=["mesh"], **SMALL)
    with pytest.raises(ValueError, match="available"):
        generate_raw(root, classes=["carpet"], **SMALL)


def test_standard_layout_names(standard):
    out, meta_file = standard
    assert meta_file == os.path.join(out, "meta_synth.json")
    ids = []
    for category in ("checker", "pill"):  # sorted class order, one running id
        root = os.path.join(out, "synth", category)
        assert sorted(os.listdir(root)) == ["ground_truth", "test", "train"]
        train = sorted(os.listdir(os.path.join(root, "train", "good")))
        good = sorted(os.listdir(os.path.join(root, "test", "good")))
        anomaly = sorted(os.listdir(os.path.join(root, "test", "anomaly")))
        masks = sorted(os.listdir(os.path.join(root, "ground_truth", "anomaly")))
        assert all(re.fullmatch(r"synth_\d{6}\.bmp", name) for name in train)
        assert all(re.fullmatch(r"synth_good_\d{6}\.bmp", name) for name in good)
        assert all(re.fullmatch(r"synth_(crack|hole|missing|scratch|stain)_\d{6}\.bmp", name)
                   for name in anomaly)
        assert masks == [name.replace(".bmp", ".png") for name in anomaly]
        assert (len(train), len(good), len(anomaly)) == (2, 2, 4)
        # train first, then the test sub-folders in sorted defect/good name order
        test_ids = {}
        for name in good + anomaly:
            test_ids[int(name[-10:-4])] = name.split("_")[1]
        ordered = [test_ids[k] for k in sorted(test_ids)]
        assert ordered == sorted(ordered)
        ids += [int(name[-10:-4]) for name in train] + sorted(test_ids)
        image = cv2.imread(os.path.join(root, "test", "anomaly", anomaly[0]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 64, 3)
    assert ids == list(range(16))


def test_standard_meta(standard):
    out, meta_file = standard
    with open(meta_file, encoding="utf-8") as handle:
        text = handle.read()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=4) + "\n"
    assert list(meta) == ["train", "test"]
    assert list(meta["test"]) == ["checker", "pill"] == list(meta["train"])
    fields = ["img_path", "mask_path", "cls_name", "specie_name", "dataset_name", "anomaly"]
    for category, samples in meta["test"].items():
        assert len(samples) == 6 and sum(s["anomaly"] for s in samples) == 4
        assert [s["specie_name"] for s in samples] == ["anomaly"] * 4 + ["good"] * 2
        paths = [s["img_path"] for s in samples]
        assert paths[:4] == sorted(paths[:4]) and paths[4:] == sorted(paths[4:])
        for sample in samples:
            assert list(sample) == fields
            assert sample["cls_name"] == category and sample["dataset_name"] == "synth"
            assert isinstance(sample["anomaly"], int)
            assert os.path.isfile(os.path.join(out, sample["img_path"]))
            assert sample["img_path"].startswith(f"synth/{category}/test/{sample['specie_name']}/")
            if sample["anomaly"]:
                assert sample["mask_path"] == sample["img_path"].replace(
                    "/test/anomaly/", "/ground_truth/anomaly/").replace(".bmp", ".png")
                mask = cv2.imread(os.path.join(out, sample["mask_path"]), cv2.IMREAD_GRAYSCALE)
                assert mask.max() == 255 and MIN_AREA <= (mask > 0).mean() <= MAX_AREA
            else:
                assert sample["mask_path"] == ""
    for category, samples in meta["train"].items():
        assert [s["specie_name"] for s in samples] == ["good", "good"]
        assert all(s["anomaly"] == 0 and s["mask_path"] == "" for s in samples)


def test_standard_placeholder_and_overwrite(tmp_path):
    meta_file = write_standard(str(tmp_path), classes=["bolt"], size=48, n_train=0,
                               n_test_good=1, n_test_anomaly=2)
    with open(meta_file) as handle:
        meta = json.load(handle)
    assert meta["train"]["bolt"] == [{"img_path": "", "mask_path": "", "cls_name": "bolt",
                                      "specie_name": "good", "dataset_name": "", "anomaly": 0}]
    assert [s["img_path"].split("/")[-1] for s in meta["test"]["bolt"]] == [
        "synthetic_crack_000000.bmp", "synthetic_hole_000002.bmp", "synthetic_good_000001.bmp"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_standard(str(tmp_path), classes=["bolt"], size=48)
    write_standard(str(tmp_path), classes=["ring"], size=48, n_train=1, n_test_good=1,
                   n_test_anomaly=1, overwrite=True)
    assert os.listdir(tmp_path / "synthetic") == ["ring"]


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--classes", "gravel", "--size", "48", "--n_train", "1",
                 "--n_test_good", "1", "--n_test_anomaly", "2", "--standard",
                 "--name", "mvtec"]) == 0
    assert "Wrote 4 images" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "mvtec" / "gravel" / "test" / "anomaly")) == [
        "mvtec_crack_000001.bmp", "mvtec_hole_000003.bmp"]
    assert os.listdir(tmp_path / "mvtec" / "gravel" / "test" / "good") == ["mvtec_good_000002.bmp"]
    assert os.path.isfile(tmp_path / "meta_mvtec.json")
    assert main(["--out", str(tmp_path), "--classes", "carpet"]) == 1
    assert "available" in capsys.readouterr().err


# sha256 of the meta files written by the synthetic module's own meta code, before it used
# dataset/make_meta.py's writer: the meta must stay identical byte for byte. "mvtec" and "visa"
# (official class lists in the registry) keep the generated classes; "HeadCT" is
# classification-only; n_train=0 gives the placeholder entry.
META_BEFORE_MAKE_META = [
    (dict(name="synth", classes=["pill", "checker"], seed=0, size=64, n_train=2, n_test_good=2,
          n_test_anomaly=4), "22aefb8e3eeae40dc354f8df539c82b459422d8723ff445006629714173cc579"),
    (dict(name="synthetic", classes=["bolt"], size=48, n_train=0, n_test_good=1,
          n_test_anomaly=2), "fff9417203718274b569a694e968a8937391cf903a15d26f87548567b5cf8862"),
    (dict(name="mvtec", classes=["gravel"], size=48, n_train=1, n_test_good=1, n_test_anomaly=2),
     "582b91028b9e6c67614eb41de7faea048e277eb2b8f92d86e05126c03e80a017"),
    (dict(name="HeadCT", classes=["ring", "wood"], size=32, n_train=1, n_test_good=0,
          n_test_anomaly=3), "7ff30cd955749368b3c0354a8fb21fd947f5b7288e437e7c879a7ba988cd6333"),
    (dict(name="visa", classes=["mesh"], size=32, n_train=0, n_test_good=0, n_test_anomaly=0),
     "dd9b7ff97b4ddc8fd2c8c88b2fa25ec7ca1642f934aceeeed7b1ed6ae3ecec34"),
]


@pytest.mark.parametrize("config,digest", META_BEFORE_MAKE_META,
                         ids=[config["name"] for config, _ in META_BEFORE_MAKE_META])
def test_standard_meta_unchanged_by_the_shared_writer(tmp_path, config, digest):
    from dataset.make_meta import make_meta

    meta_file = write_standard(str(tmp_path), **config)
    with open(meta_file, "rb") as handle:
        text = handle.read()
    assert hashlib.sha256(text).hexdigest() == digest
    assert json.loads(text) == make_meta(tmp_path, config["name"], classes=config["classes"])
    assert set(os.listdir(tmp_path)) == {config["name"], f"meta_{config['name']}.json"}
