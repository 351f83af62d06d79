"""dataset/folder.py: a labelled folder in each layout gives the expected meta file, each bad
input its one line and no file, and test.py / train.py run on the result."""

from __future__ import annotations

import json
import os
import shutil
import zlib

import numpy as np
import pytest
from PIL import Image

import dataset.folder_layout as layout_module
import test as test_script
import train as train_script
import dataset.make_meta as make_meta_module
from dataset.data import AnomalyDataset
from dataset.folder import folder_meta, main
from dataset.synthetic import generate_raw
from models.errors import SettingsError
from tests.clip_factory import TINY_LAYERS
from utils.training import TrainConfig, train

CLASSES = ("pill", "wood")
N_TRAIN, N_GOOD, N_ANOMALY = 2, 4, 3          # per class; anomaly types crack, hole, + a third


@pytest.fixture(scope="module")
def raw_source(tmp_path_factory):
    """MVTec-AD raw layout (masks <stem>_mask.png) of two 32 px synthetic classes."""
    root = tmp_path_factory.mktemp("raw")
    generate_raw(str(root), classes=list(CLASSES), size=32, n_train=N_TRAIN,
                 n_test_good=N_GOOD, n_test_anomaly=N_ANOMALY)
    return root


@pytest.fixture
def raw(raw_source, tmp_path):
    """A fresh copy of the raw layout."""
    shutil.copytree(raw_source, tmp_path / "raw")
    return tmp_path / "raw"


def listing(cls_dir):
    """{"train": [file names], "test": {type: [file names]}} of a raw class, by os.listdir."""
    test = cls_dir / "test"
    return {"train": sorted(os.listdir(cls_dir / "train" / "good")),
            "test": {kind: sorted(os.listdir(test / kind)) for kind in sorted(os.listdir(test))}}


def sample(img, mask, cls, specie, name):
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie,
            "dataset_name": name, "anomaly": int(specie != "good")}


def placeholder(cls):
    return [sample("", "", cls, "good", "")]


def info(layout, classification_only, wording, n_train=0, seed=None, left_out=()):
    return {"source": "dataset.folder", "layout": layout,
            "classification_only": classification_only, "wording": wording,
            "n_train": n_train, "seed": seed,
            "left_out": [{"path": p, "reason": r} for p, r in left_out]}


def read_meta(root, name):
    with open(root / f"meta_{name}.json", encoding="utf-8") as handle:
        return json.load(handle)


def run(capsys, *args):
    """(exit code, stdout lines, stderr lines) of ``python -m dataset.folder ...``."""
    code = main([str(a) for a in args] + ["--no_progress"])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def flatten(raw_cls, dst, normal="good", mask_root="ground_truth", suffix=True):
    """Rearrange a raw class into the flat layout at ``dst``: ``<normal>/``, ``<type>/``, masks
    in ``<mask_root>/<type>/`` (None: no masks), named ``<stem>_mask.png`` or ``<stem>.png``;
    the train images are dropped."""
    dst.mkdir(parents=True, exist_ok=True)
    for kind in os.listdir(raw_cls / "test"):
        shutil.copytree(raw_cls / "test" / kind, dst / (normal if kind == "good" else kind))
    if mask_root is None:
        return
    for kind in os.listdir(raw_cls / "ground_truth"):
        for name in os.listdir(raw_cls / "ground_truth" / kind):
            target = dst / mask_root / kind / (name if suffix else name.replace("_mask", ""))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw_cls / "ground_truth" / kind / name, target)


def flat_test(files, prefix, cls, name, mask_root="ground_truth", suffix=True, normal="good"):
    """The expected test entries of a flattened class; types sorted by their new folder name."""
    renamed = {normal if kind == "good" else kind: kind for kind in files["test"]}
    entries = []
    for folder in sorted(renamed):
        kind = renamed[folder]
        for file in files["test"][kind]:
            stem = file[:-len(".png")]
            mask = ("" if kind == "good" or mask_root is None else
                    f"{prefix}{mask_root}/{kind}/{stem}{'_mask' if suffix else ''}.png")
            entries.append(sample(f"{prefix}{folder}/{file}", mask, cls, kind, name))
    return entries


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


def test_mvtec_raw_with_mask_suffix(raw, capsys):
    (raw / "notes.txt").write_text("not a class")
    (raw / ".cache").mkdir()
    (raw / "meta_mine.json").write_text("old")            # not written by dataset.folder
    code, out, err = run(capsys, raw, "--dataset", "mine")
    assert code == 1 and err == [f"dataset.folder: {raw / 'meta_mine.json'} exists and was not "
                                 f"written by dataset.folder (no info.source 'dataset.folder'): "
                                 f"choose another --dataset name, or move the file away."]
    assert (raw / "meta_mine.json").read_text() == "old"
    (raw / "meta_mine.json").unlink()
    assert run(capsys, raw, "--dataset", "mine")[0] == 0
    code, out, err = run(capsys, raw, "--dataset", "mine")   # its own file: replaced
    assert (code, err) == (0, [])
    expected = {"train": {}, "test": {}}
    for cls in CLASSES:
        files = listing(raw / cls)
        expected["train"][cls] = [sample(f"{cls}/train/good/{f}", "", cls, "good", "mine")
                                  for f in files["train"]]
        expected["test"][cls] = [
            sample(f"{cls}/test/{kind}/{f}",
                   "" if kind == "good" else f"{cls}/ground_truth/{kind}/{f[:-4]}_mask.png",
                   cls, kind, "mine")
            for kind, names in files["test"].items() for f in names]
        assert len(expected["test"][cls]) == N_GOOD + N_ANOMALY
    expected["info"] = info({"pill": "mvtec", "wood": "mvtec"}, False,
                            {"pill": "pill", "wood": "wood"},
                            left_out=[(".cache", "a hidden folder"), ("meta_mine.json",
                                                                      "a meta file"),
                                      ("notes.txt", "not an image file (extension .txt)")])
    text = (raw / "meta_mine.json").read_text(encoding="utf-8")
    assert json.loads(text) == expected
    assert list(json.loads(text)) == ["train", "test", "info"]
    assert text == json.dumps(expected, indent=4) + "\n"
    assert [f for f in os.listdir(raw) if f.endswith(".partial")] == []
    n = N_TRAIN + N_GOOD + N_ANOMALY
    assert out == [f"{cls} (mvtec): {n} images, {N_TRAIN + N_GOOD} normal / {N_ANOMALY} "
                   f"anomalous, {N_ANOMALY} masks; train {N_TRAIN}, test {N_GOOD + N_ANOMALY}"
                   for cls in CLASSES] + [
        f"{2 * n} images used (train {2 * N_TRAIN}, test {2 * (N_GOOD + N_ANOMALY)}), "
        f"{2 * N_ANOMALY} masks; 3 left out: 1 a hidden folder, 1 a meta file, 1 not an image "
        f"file (listed in the meta file's info.left_out)", f"wrote {raw / 'meta_mine.json'}"]


def test_flat_with_ground_truth_masks_at_root(raw, tmp_path, capsys):
    """ROOT itself is the one class; odd extensions, hidden and non-image files, a mask folder
    of the normal images."""
    root = tmp_path / "metal_nut"
    files = listing(raw / "pill")
    flatten(raw / "pill", root)
    crack = files["test"]["crack"][0]
    (root / "crack" / crack).rename(root / "crack" / crack.replace(".png", ".PNG"))
    (root / "good" / ".DS_Store").write_text("x")
    (root / "good" / "notes.txt").write_text("x")
    (root / "ground_truth" / "good").mkdir()
    Image.new("L", (32, 32)).save(root / "ground_truth" / "good" / "000.png")   # ignored
    code, out, err = run(capsys, root, "--dataset", "parts")
    assert (code, err) == (0, [])
    test = flat_test(files, "", "metal_nut", "parts")
    for entry in test:
        entry["img_path"] = entry["img_path"].replace(f"crack/{crack}",
                                                      f"crack/{crack[:-4]}.PNG")
    assert read_meta(root, "parts") == {
        "train": {"metal_nut": placeholder("metal_nut")}, "test": {"metal_nut": test},
        "info": info({"metal_nut": "flat"}, False, {"metal_nut": "metal nut"}, left_out=[
            ("good/.DS_Store", "a hidden file"),
            ("good/notes.txt", "not an image file (extension .txt)"),
            ("ground_truth/good/000.png", "a mask of normal images (not needed: all zero)")])}
    assert out[0] == (f"metal_nut (flat): {N_GOOD + N_ANOMALY} images, {N_GOOD} normal / "
                      f"{N_ANOMALY} anomalous, {N_ANOMALY} masks; train 0, test "
                      f"{N_GOOD + N_ANOMALY}")


def test_flat_masks_folder_without_suffix_several_classes(raw, tmp_path, capsys):
    root = tmp_path / "mine"
    for cls in CLASSES:
        flatten(raw / cls, root / cls, mask_root="masks", suffix=False)
    # one image as JPEG (its mask stays a PNG of its size)
    hole = root / "wood" / "hole" / listing(raw / "wood")["test"]["hole"][0]
    Image.open(hole).convert("RGB").save(hole.with_suffix(".jpg"))
    hole.unlink()
    assert run(capsys, root, "--dataset", "mine")[0] == 0
    expected_test = {cls: flat_test(listing(raw / cls), f"{cls}/", cls, "mine", "masks", False)
                     for cls in CLASSES}
    for entry in expected_test["wood"]:
        if entry["img_path"] == f"wood/hole/{hole.name}":
            entry["img_path"] = f"wood/hole/{hole.stem}.jpg"
    assert read_meta(root, "mine") == {
        "train": {cls: placeholder(cls) for cls in CLASSES}, "test": expected_test,
        "info": info({"pill": "flat", "wood": "flat"}, False, {"pill": "pill", "wood": "wood"})}


def test_flat_without_masks_is_classification_only(raw, tmp_path, capsys):
    root = tmp_path / "mine"
    for cls in CLASSES:
        flatten(raw / cls, root / cls, mask_root=None)
    code, out, _ = run(capsys, root, "--dataset", "mine")
    assert code == 0
    meta = read_meta(root, "mine")
    assert meta["test"] == {cls: flat_test(listing(raw / cls), f"{cls}/", cls, "mine", None)
                            for cls in CLASSES}
    assert meta["info"]["classification_only"] is True
    assert all(s["mask_path"] == "" for c in meta["test"].values() for s in c)
    assert out[-1] == f"wrote {root / 'meta_mine.json'}; classification only (no masks: pixel " \
                      f"metrics n/a)"
    assert ", 0 masks;" in out[0]
    dataset = AnomalyDataset(str(root), "mine", image_size=32)
    assert dataset.classification_only and dataset.info == meta["info"]
    assert dataset.wording == {"pill": "pill", "wood": "wood"}
    assert AnomalyDataset(str(root), "mine", image_size=32,
                          classification_only=False).classification_only is False
    item = dataset[[s["label"] for s in dataset.samples].index(1)]
    assert item["label"] == 1 and float(item["mask"].sum()) == 0.0


@pytest.mark.parametrize("absolute", [False, True])
def test_explicit_normal_dir_and_mask_dir(raw, tmp_path, capsys, absolute):
    root = tmp_path / "widget"
    flatten(raw / "pill", root, normal="nominal", mask_root="labels/png")
    mask_dir = str(root / "labels" / "png") if absolute else "labels/png"
    (root / "ground_truth" / "crack").mkdir(parents=True)     # not searched with --mask_dir
    Image.new("L", (8, 8)).save(root / "ground_truth" / "crack" / "zzz.png")
    code, _, err = run(capsys, root, "--dataset", "w", "--normal_dir", "nominal", "--mask_dir",
                       mask_dir)
    assert (code, err) == (0, [])
    test = flat_test(listing(raw / "pill"), "", "widget", "w", "labels/png", normal="nominal")
    assert [s["specie_name"] for s in test].count("good") == N_GOOD
    assert read_meta(root, "w")["test"] == {"widget": test}


def test_single_class_at_root_and_among_several(raw, tmp_path, capsys):
    """One class folder gives the same entries whether it is ROOT or a class inside ROOT,
    paths relative to ROOT in each case."""
    assert run(capsys, raw / "wood", "--dataset", "one")[0] == 0
    assert run(capsys, raw, "--dataset", "all")[0] == 0
    one, every = read_meta(raw / "wood", "one"), read_meta(raw, "all")
    assert list(one["test"]) == ["wood"] and list(every["test"]) == ["pill", "wood"]
    for split in ("train", "test"):
        prefixed = [{**s, "img_path": f"wood/{s['img_path']}",
                     "mask_path": s["mask_path"] and f"wood/{s['mask_path']}",
                     "dataset_name": "all"} for s in one[split]["wood"]]
        assert prefixed == every[split]["wood"]
    for entry in every["test"]["wood"]:
        assert (raw / entry["img_path"]).is_file()
        assert not entry["mask_path"] or (raw / entry["mask_path"]).is_file()


def test_n_train_draws_reproducibly_without_replacement(raw, tmp_path, capsys):
    root = tmp_path / "mine"
    for cls in CLASSES:
        flatten(raw / cls, root / cls)
    full = {cls: flat_test(listing(raw / cls), f"{cls}/", cls, "mine") for cls in CLASSES}
    draws = {}
    for seed in range(12):
        assert run(capsys, root, "--dataset", "mine", "--n_train", 2, "--seed", seed)[0] == 0
        meta = read_meta(root, "mine")
        assert meta["info"]["n_train"] == 2 and meta["info"]["seed"] == seed
        for cls in CLASSES:
            train, test = meta["train"][cls], meta["test"][cls]
            normal = [s for s in full[cls] if s["anomaly"] == 0]
            # the documented generator: seeded from (seed, class name), without replacement
            picked = np.random.default_rng([seed, zlib.crc32(cls.encode())]).choice(
                len(normal), 2, replace=False)
            assert train == [normal[i] for i in sorted(picked)]
            assert len({s["img_path"] for s in train}) == 2
            assert test == [s for s in full[cls] if s not in train]         # order kept
            draws.setdefault(cls, []).append(tuple(s["img_path"] for s in train))
    assert run(capsys, root, "--dataset", "mine", "--n_train", 2, "--seed", 3)[0] == 0
    assert tuple(s["img_path"] for s in read_meta(root, "mine")["train"]["pill"]) \
        == draws["pill"][3]
    for cls in CLASSES:                 # every normal image is drawn by some seed
        assert len(set(draws[cls])) > 1
        assert len({p for pair in draws[cls] for p in pair}) == N_GOOD
    # the test split AnomalyDataset reads has lost the drawn images
    dataset = AnomalyDataset(str(root), "mine", image_size=32)
    assert len(dataset) == len(CLASSES) * (N_GOOD - 2 + N_ANOMALY)

    code, _, err = run(capsys, root, "--dataset", "mine", "--n_train", N_GOOD)
    assert code == 1 and err == [
        f"dataset.folder: --n_train {N_GOOD}: class pill ({root / 'pill'}) has {N_GOOD} normal "
        f"test images; pass --n_train below {N_GOOD}, so that some stay for testing."]


def test_mvtec_n_train_adds_to_the_train_split(raw, capsys):
    assert run(capsys, raw / "pill", "--dataset", "p", "--n_train", 1)[0] == 0
    meta = read_meta(raw / "pill", "p")
    assert meta["info"]["seed"] == 0
    files = listing(raw / "pill")
    picked = int(np.random.default_rng([0, zlib.crc32(b"pill")]).choice(N_GOOD, 1,
                                                                        replace=False)[0])
    assert [s["img_path"] for s in meta["train"]["pill"]] == \
        [f"train/good/{f}" for f in files["train"]] + [f"test/good/{files['test']['good'][picked]}"]


def test_class_name_and_wording(raw, tmp_path, capsys):
    root = tmp_path / "mine"
    for cls in ("metal_nut", "pcb1", "my_part"):
        flatten(raw / "pill", root / cls, mask_root=None)
    assert run(capsys, root, "--dataset", "m")[0] == 0
    assert read_meta(root, "m")["info"]["wording"] == {
        "metal_nut": "metal nut", "my_part": "my part", "pcb1": "printed circuit board"}
    assert run(capsys, root, "--dataset", "m", "--class_name", "Shiny Part")[0] == 0
    assert read_meta(root, "m")["info"]["wording"] == dict.fromkeys(
        ("metal_nut", "my_part", "pcb1"), "Shiny Part")
    assert run(capsys, root, "--dataset", "m", "--wording", "my_part=steel bracket",
               "--wording", "pcb1=green board")[0] == 0
    assert read_meta(root, "m")["info"]["wording"] == {
        "metal_nut": "metal nut", "my_part": "steel bracket", "pcb1": "green board"}
    assert AnomalyDataset(str(root), "m", image_size=32).wording["pcb1"] == "green board"

    code, _, err = run(capsys, root, "--dataset", "x", "--wording", "bolt=a bolt")
    assert code == 1 and err == ["dataset.folder: --wording names no class folder bolt; the "
                                 "classes are metal_nut, my_part, pcb1."]
    assert not (root / "meta_x.json").exists()
    code, _, err = run(capsys, root, "--dataset", "x", "--class_name", " ")
    assert code == 1 and err == ["dataset.folder: The prompt words of class metal_nut are empty: "
                                 "pass some words."]
    with pytest.raises(SettingsError, match="^--class_name and --wording both set"):
        folder_meta(root, "x", class_name="a", wording={"pcb1": "b"})
    assert not (root / "meta_x.json").exists()
    with pytest.raises(SystemExit):                  # argparse: one or the other
        main([str(root), "--dataset", "x", "--class_name", "a", "--wording", "pcb1=b"])
    with pytest.raises(SystemExit):
        main([str(root), "--dataset", "x", "--wording", "pcb1"])


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit code 1, no meta file
# ------------------------------------------------------------------------------------------------


def _first(folder, pattern="*.png"):
    return sorted(folder.glob(pattern))[0]


def _missing_mask(root):
    mask = _first(root / "ground_truth" / "hole")
    mask.unlink()
    image = root / "hole" / mask.name.replace("_mask", "")
    return f"Anomalous image {image} has no mask"


def _orphan_mask(root):
    shutil.copy(_first(root / "ground_truth" / "hole"), root / "ground_truth" / "hole" /
                "123_mask.png")
    return f"Mask {root / 'ground_truth' / 'hole' / '123_mask.png'} has no image hole/123.*"


def _mask_of_other_type(root):
    (root / "ground_truth" / "dent").mkdir()
    Image.new("L", (32, 32)).save(root / "ground_truth" / "dent" / "000_mask.png")
    return f"Mask {root / 'ground_truth' / 'dent' / '000_mask.png'} has no image dent/000.*"


def _mask_size(root):
    mask = _first(root / "ground_truth" / "crack")
    Image.new("L", (20, 32)).save(mask)
    return f"Mask {mask} is 20 x 32 pixels but its image {root / 'crack' / '000.png'} is 32 x 32"


def _one_stem(root):
    Image.open(root / "good" / "000.png").convert("RGB").save(root / "good" / "000.jpg")
    good = root / "good"
    return f"Images {good / '000.jpg'} and {good / '000.png'} share the stem '000'"


def _two_masks(root):
    mask = _first(root / "ground_truth" / "crack")
    shutil.copy(mask, mask.with_name(mask.name.replace("_mask", "")))
    return f"Image {root / 'crack' / '000.png'} has two masks"


def _garbage_image(root):
    (root / "good" / "009.png").write_bytes(b"not an image at all")
    return f"Cannot read the image file {root / 'good' / '009.png'} (UnidentifiedImageError"


def _truncated_png(root):
    path = root / "crack" / "000.png"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with Image.open(path) as image:             # the header alone reads fine
        assert image.size == (32, 32)
    return f"Cannot read the image file {path} ("


def _truncated_jpeg(root):
    path = root / "good" / "001.jpg"
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(rgb).save(path, quality=95)
    (root / "good" / "001.png").unlink()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with Image.open(path) as image:
        assert image.size == (64, 64)
    return f"Cannot read the image file {path} (OSError: image file is truncated"


def _truncated_mask(root):
    mask = _first(root / "ground_truth" / "crack")
    mask.write_bytes(mask.read_bytes()[:60])
    return f"Cannot read the image file {mask} ("


def _float_image_out_of_range(root):
    path = root / "good" / "002.tif"
    Image.fromarray(np.full((32, 32), 5.0, np.float32)).save(path)     # mode F, intensity 5
    (root / "good" / "002.png").unlink()
    return f"image {path} holds floating-point values"


def _loose_image(root):
    shutil.copy(root / "good" / "000.png", root / "stray.png")
    return f"Image {root / 'stray.png'} lies directly in {root}"


def _good_as_anomaly_type(root):
    (root / "good").rename(root / "nominal")
    (root / "good").mkdir()
    shutil.copy(root / "nominal" / "000.png", root / "good" / "000.png")
    return f"Folder {root / 'good'} would be an anomaly type"


BAD = {"missing mask": _missing_mask, "mask without image": _orphan_mask,
       "mask of an unknown type": _mask_of_other_type, "mask size": _mask_size,
       "one stem": _one_stem, "two masks": _two_masks, "garbage": _garbage_image,
       "truncated png": _truncated_png, "truncated jpeg": _truncated_jpeg,
       "truncated mask": _truncated_mask, "float out of range": _float_image_out_of_range,
       "loose image": _loose_image,
       "good as a type": _good_as_anomaly_type}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_one_line_and_write_nothing(raw, tmp_path, capsys, case):
    root = tmp_path / "part"
    flatten(raw / "pill", root)
    old = root / "meta_part.json"
    old.write_text("previous")                      # an earlier file stays as it was
    start = BAD[case](root)
    extra = ["--normal_dir", "nominal"] if case == "good as a type" else []
    code, out, err = run(capsys, root, "--dataset", "part", *extra)
    assert code == 1 and out == [] and len(err) == 1, err
    assert err[0].startswith(f"dataset.folder: {start}"), err[0]
    assert old.read_text() == "previous"
    assert not list(root.glob(".*.partial"))


def test_bad_structure_and_settings_are_one_line(raw, tmp_path, capsys):
    def fails(root, *args):
        code, out, err = run(capsys, root, "--dataset", "d", *args)
        assert code == 1 and out == [] and len(err) == 1, err
        assert not list(tmp_path.rglob("meta_d.json"))
        return err[0].removeprefix("dataset.folder: ")

    assert fails(tmp_path / "nowhere") == (
        f"Folder {tmp_path / 'nowhere'} not found: pass the folder holding your class folders "
        f"(or your good/ and anomaly folders) as ROOT.")
    empty = tmp_path / "empty"
    (empty / "ground_truth" / "crack").mkdir(parents=True)
    assert fails(empty).startswith(f"No class folder found in {empty}: ")
    several = tmp_path / "several"
    flatten(raw / "pill", several / "pill")
    (several / "docs" / "notes").mkdir(parents=True)            # a class with no image
    assert fails(several).startswith(f"Class folder {several / 'docs'} holds no test image")
    shutil.rmtree(several / "docs")
    flatten(raw / "wood", several / "wood")
    assert fails(several, "--mask_dir", "labels").startswith(
        f"--mask_dir labels: no such folder in {several / 'pill'}, {several / 'wood'}")
    assert fails(several, "--mask_dir", str(tmp_path)).startswith(f"--mask_dir {tmp_path} is "
                                                                  f"absolute")
    assert fails(several, "--seed", "1") == ("--seed draws the images of --n_train: pass "
                                             "--n_train K as well.")
    assert fails(several, "--n_train", "-1").startswith("--n_train -1: pass a count")
    assert fails(several, "--dataset", "a/b").startswith("--dataset 'a/b': pass a plain name")
    mvtec = raw / "pill"
    (mvtec / "train" / "crack").mkdir()
    assert fails(mvtec).startswith(f"Folder {mvtec / 'train' / 'crack'}: the train split holds "
                                   f"only normal images")


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_dataset_reads_images_labels_and_masks(raw, tmp_path, capsys):
    root = tmp_path / "mine"
    for cls in CLASSES:
        flatten(raw / cls, root / cls, mask_root="masks", suffix=False)
    assert run(capsys, root, "--dataset", "mine")[0] == 0
    dataset = AnomalyDataset(str(root), "mine", image_size=32)
    assert not dataset.classification_only and dataset.class_names == list(CLASSES)
    assert len(dataset) == len(CLASSES) * (N_GOOD + N_ANOMALY)
    assert sum(s["label"] for s in dataset.samples) == len(CLASSES) * N_ANOMALY
    for index, entry in enumerate(dataset.samples):
        item = dataset[index]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
        kind = os.path.basename(os.path.dirname(entry["img_path"]))
        assert item["label"] == int(kind != "good") and item["specie_name"] == kind
        if item["label"]:
            mask_file = root / entry["cls_name"] / "masks" / kind / os.path.basename(
                entry["img_path"])
            truth = np.asarray(Image.open(mask_file).convert("L")) > 127      # 32 px: no resize
            assert truth.any() and np.array_equal(item["mask"][0].numpy() > 0.5, truth)
        else:
            assert float(item["mask"].sum()) == 0.0


@pytest.mark.parametrize("masks", [True, False])
def test_test_py_runs_on_a_folder(raw, tmp_path, tiny_files, capsys, masks):
    root = tmp_path / "mine"
    for cls in CLASSES:
        flatten(raw / cls, root / cls, mask_root="ground_truth" if masks else None)
    assert run(capsys, root, "--dataset", "mine")[0] == 0
    clip_path, ckpt = tiny_files
    out = tmp_path / "results"
    assert test_script.main([
        "--dataset", "mine", "--data_path", str(root), "--pretrained_path", clip_path,
        "--checkpoint_path", ckpt, "--image_size", "32", "--features_list",
        *map(str, TINY_LAYERS), "--sample_num", "2", "--save_path", str(out), "--no_vis",
        "--num_workers", "0", "--no_progress"]) == 0
    result = json.loads((out / "results_mine.json").read_text())
    assert set(result["classes"]) == set(CLASSES)
    for row in result["classes"].values():
        assert 0.0 <= row["auroc_sp"] <= 1.0
        assert (row["auroc_px"] is not None) == masks
        if masks:
            assert 0.0 <= row["auroc_px"] <= 1.0


def test_train_py_uses_a_folder_as_auxiliary_data(raw, tmp_path, tiny_files, capsys):
    root = tmp_path / "mine"
    for cls in CLASSES:
        flatten(raw / cls, root / cls)
    assert run(capsys, root, "--dataset", "mine", "--wording", "pill=round tablet")[0] == 0
    clip_path = tiny_files[0]
    common = ["--dataset", "mine", "--train_data_path", str(root), "--val_data_path", str(root),
              "--pretrained_path", clip_path, "--image_size", "32", "--features_list",
              *map(str, TINY_LAYERS), "--batch_size", "4", "--val_batch_size", "4",
              "--sample_num", "2", "--num_workers", "0", "--device", "cpu", "--no_verify"]
    cli = train_script
    # an unknown dataset has no official validation set: one line saying what to pass
    assert cli.main([*common, "--epochs", "1", "--save_path", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no official validation set for --dataset mine" in err[0]
    assert "--val_dataset" in err[0] and "--val_classes" in err[0]

    assert cli.main([*common, "--epochs", "1", "--val_dataset", "mine", "--val_classes", "wood",
                     "--save_path", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "last.pth").is_file()
    result = train(TrainConfig(
        dataset="mine", train_data_path=str(root), val_data_path=str(root), val_dataset="mine",
        val_classes=["wood"], save_path=str(tmp_path / "c"), pretrained_path=clip_path,
        features_list=TINY_LAYERS, image_size=32, batch_size=4, val_batch_size=4, epochs=1,
        sample_num=2, num_workers=0, device="cpu", verify_weights=False))
    assert result.model.wording == {"pill": "round tablet", "wood": "wood"}
    # a folder without masks as training data: the pixel losses would learn all-zero masks
    bare = tmp_path / "bare"
    for cls in CLASSES:
        flatten(raw / cls, bare / cls, mask_root=None)
    assert run(capsys, bare, "--dataset", "bare")[0] == 0
    args = [*common, "--epochs", "1", "--val_dataset", "mine", "--val_classes", "wood",
            "--save_path", str(tmp_path / "d")]
    args[args.index("mine")] = "bare"
    args[args.index(str(root))] = str(bare)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training dataset bare" in err[0] and "has no masks" in err[0]
    assert not (tmp_path / "d").exists()


def test_write_and_read_failures_are_one_line(raw, tmp_path, capsys, monkeypatch):
    root = tmp_path / "part"
    flatten(raw / "pill", root)
    (root / "meta_part.json").mkdir()
    code, _, err = run(capsys, root, "--dataset", "part")
    assert code == 1 and err == [f"dataset.folder: {root / 'meta_part.json'} is a folder: move "
                                 f"it away so the meta file can be written."]
    (root / "meta_part.json").rmdir()

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(make_meta_module, "write_text_atomic", full)       # the one meta writer
    code, _, err = run(capsys, root, "--dataset", "part")
    assert code == 1 and err == [f"dataset.folder: Cannot write the meta file "
                                 f"{root / 'meta_part.json'} (No space left on device): make "
                                 f"{root} writable, or free some space."]

    def denied(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(layout_module, "folder_entries", denied)
    code, _, err = run(capsys, root, "--dataset", "part")
    assert code == 1 and err == [f"dataset.folder: Cannot read {root} (Permission denied): "
                                 f"check its permissions."]
    assert not (root / "meta_part.json").exists()
