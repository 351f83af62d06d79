"""Dataset converters and make_dataset.py on tiny fake raw datasets (16x16 images).

Each test writes a raw download in the layout of one dataset, converts it and checks the
output tree, the exact file names (running ids included), the pixels and the binarised masks.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from dataset.converters import CONVERTERS, DatasetError
from dataset.converters.common import IdCounter, binarise, list_dirs, list_files, stem
from dataset.make_dataset import UnknownDatasetError, convert, main, resolve_name

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
MASK_VALUES = (0, 60, 128, 129, 200, 255)   # > 128 keeps 129, 200, 255; > 0 keeps all but 0
SPLIT_FOLDERS = ("train/good", "test/good", "test/anomaly", "ground_truth/anomaly")


# ----------------------------------------------------------------------------- fake raw files

def write_image(path: Path, seed: int = 0, grey: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE) if grey else (SIZE, SIZE, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
    return path


def write_mask(path: Path, values=MASK_VALUES) -> Path:
    """Grey mask with vertical stripes of `values`."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for column in range(SIZE):
        mask[:, column] = values[column % len(values)]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def files(root: Path) -> list:
    """Relative POSIX paths of all files under `root`, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def class_files(out: Path, cls: str) -> list:
    return files(out / cls)


def run(name: str, src: Path, dst: Path, **kw) -> Path:
    convert(name, src, dst, progress=False, **kw)
    return dst / resolve_name(name)


def raw(tmp_path: Path, make) -> Path:
    """tmp_path/raw with the fake raw data ``make`` writes."""
    make(tmp_path / "raw")
    return tmp_path / "raw"


def converted(tmp_path: Path, name: str, make, classes) -> Path:
    """Fake raw data written by ``make`` under tmp_path/raw, converted to tmp_path/data; the
    output folder, checked to hold ``classes`` in the standard layout."""
    out = run(name, raw(tmp_path, make), tmp_path / "data")
    assert_layout(out, classes)
    return out


def assert_layout(out: Path, classes) -> None:
    assert list_dirs(out) == sorted(classes)
    for cls in classes:
        for folder in SPLIT_FOLDERS:
            assert (out / cls / folder).is_dir(), f"{cls}/{folder}"


def assert_same_image(written: Path, source: Path, flags: int = cv2.IMREAD_COLOR) -> None:
    image = cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
    assert written.suffix == ".bmp" and image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(image, cv2.imread(str(source), flags))


def assert_binary_mask(written: Path, source: Path, threshold: int = 128) -> None:
    mask = cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
    assert written.suffix == ".png" and mask.ndim == 2 and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) <= {0, 255}
    expected = np.where(cv2.imread(str(source), cv2.IMREAD_GRAYSCALE) > threshold, 255, 0)
    assert np.array_equal(mask, expected)


# ----------------------------------------------------------------------------- common pieces

def test_id_counter_and_binarise():
    counter = IdCounter(6)
    assert [counter.next(), counter.next()] == ["000000", "000001"]
    assert IdCounter(10).next() == "0000000000"
    mask = np.array([[0, 60, 128, 129, 255]], np.uint8)
    assert binarise(mask).tolist() == [[0, 0, 0, 255, 255]]
    assert binarise(mask, 0).tolist() == [[0, 255, 255, 255, 255]]
    assert stem("a/b/000.tar.png") == "000"


def test_listings_skip_stray_entries(tmp_path):
    for name in ("b.png", "a.png", "c.PNG", "d.JPG", ".DS_Store", "notes.txt"):
        touch(tmp_path / name)
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    assert [p.name for p in list_files(tmp_path, "*.png")] == ["a.png", "b.png"]
    assert [p.name for p in list_files(tmp_path)] == ["a.png", "b.png", "c.PNG", "d.JPG"]
    assert list_dirs(tmp_path) == ["sub"]


def test_registry_has_all_sixteen_datasets():
    """The converters, in registry order (dataset/registry.py), each named as its row."""
    assert list(CONVERTERS) == ["mvtec", "visa", "BTAD", "KSDD2", "RSDD", "DAGM", "DTD", "HeadCT",
                                "BrainMRI", "Br35H", "ISIC", "ClinicDB", "ColonDB", "Kvasir",
                                "Endo", "TN3K"]
    assert all(module.NAME == name for name, module in CONVERTERS.items())


# ----------------------------------------------------------------------------- MVTec AD

MVTEC = CONVERTERS["mvtec"].CLASSES


def make_mvtec(src: Path) -> None:
    """bottle: two train, two defect types; cable: a second train folder (train skipped);
    toothbrush: test/good only (test skipped, MVTec needs two test folders); others: 1/1/1."""
    for index, cls in enumerate(MVTEC):
        root = src / cls
        write_image(root / "train/good/000.png", index)
        test_dirs = {"bottle": ("broken_large", "contamination"), "toothbrush": ()}.get(cls, ("crack",))
        for defect in test_dirs:
            write_image(root / "test" / defect / "000.png", 100 + index)
            write_mask(root / "ground_truth" / defect / "000_mask.png")
        write_image(root / "test/good/000.png", 200 + index)
    write_image(src / "bottle/train/good/001.png", 1)
    touch(src / "bottle/train/readme.txt")
    touch(src / "bottle/test/.DS_Store")
    write_image(src / "cable/train/extra/000.png")
    touch(src / "README.txt")


def test_mvtec(tmp_path):
    out = converted(tmp_path, "mvtec", make_mvtec, MVTEC)
    src = tmp_path / "raw"
    assert class_files(out, "bottle") == [
        "ground_truth/anomaly/mvtec_broken_large_000002.png",
        "ground_truth/anomaly/mvtec_contamination_000003.png",
        "test/anomaly/mvtec_broken_large_000002.bmp",
        "test/anomaly/mvtec_contamination_000003.bmp",
        "test/good/mvtec_good_000004.bmp",
        "train/good/mvtec_000000.bmp",
        "train/good/mvtec_000001.bmp",
    ]
    assert class_files(out, "cable") == [
        "ground_truth/anomaly/mvtec_crack_000005.png", "test/anomaly/mvtec_crack_000005.bmp",
        "test/good/mvtec_good_000006.bmp"]
    assert class_files(out, "toothbrush") == ["train/good/mvtec_000034.bmp"]
    assert class_files(out, "zipper") == [
        "ground_truth/anomaly/mvtec_crack_000042.png", "test/anomaly/mvtec_crack_000042.bmp",
        "test/good/mvtec_good_000043.bmp", "train/good/mvtec_000041.bmp"]
    assert_same_image(out / "bottle/train/good/mvtec_000001.bmp", src / "bottle/train/good/001.png")
    assert_same_image(out / "bottle/test/anomaly/mvtec_contamination_000003.bmp",
                      src / "bottle/test/contamination/000.png")
    assert_binary_mask(out / "bottle/ground_truth/anomaly/mvtec_contamination_000003.png",
                       src / "bottle/ground_truth/contamination/000_mask.png")


def test_mvtec_missing_mask_names_the_file(tmp_path):
    src = raw(tmp_path, make_mvtec)
    (src / "pill/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"Mask .*pill.ground_truth.crack.000_mask\.png .*not found"):
        run("mvtec", src, tmp_path / "data")
    assert not (tmp_path / "data" / "mvtec").exists()


def test_mvtec_missing_class_folder(tmp_path):
    src = raw(tmp_path, make_mvtec)
    for path in sorted((src / "zipper").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (src / "zipper").rmdir()
    with pytest.raises(DatasetError, match="zipper not found"):
        run("mvtec", src, tmp_path / "data")


# ----------------------------------------------------------------------------- VisA

VISA = CONVERTERS["visa"].CLASSES


def make_visa(src: Path, rows=None) -> None:
    rows = rows or [
        ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
        ("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
        ("candle", "test", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
        ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0005.JPG", ""),
        ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
        ("pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/010.JPG", "pcb1/Data/Masks/Anomaly/010.png"),
    ]
    for seed, (_, _, _, image, mask) in enumerate(rows):
        write_image(src / image, seed)
        if mask:
            write_mask(src / mask)
    (src / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(src / "split_csv/1cls.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)


def test_visa(tmp_path):
    out = converted(tmp_path, "VISA", make_visa, VISA)   # the name is matched in any case
    src = tmp_path / "raw"
    assert class_files(out, "candle") == [
        "ground_truth/anomaly/visa_000_000002.png",
        "test/anomaly/visa_000_000002.bmp",
        "test/good/visa_0002_000003.bmp",
        "train/good/visa_0000_000000.bmp",
        "train/good/visa_0001_000001.bmp",
    ]
    assert class_files(out, "pcb1") == [
        "ground_truth/anomaly/visa_010_000005.png", "test/anomaly/visa_010_000005.bmp",
        "train/good/visa_0005_000004.bmp"]
    assert class_files(out, "cashew") == []
    assert_same_image(out / "candle/test/anomaly/visa_000_000002.bmp",
                      src / "candle/Data/Images/Anomaly/000.JPG")
    assert_binary_mask(out / "candle/ground_truth/anomaly/visa_000_000002.png",
                       src / "candle/Data/Masks/Anomaly/000.png", threshold=0)


def test_visa_bad_split_file(tmp_path):
    with pytest.raises(DatasetError, match=r"1cls\.csv not found"):
        run("visa", tmp_path, tmp_path / "data")
    src = tmp_path / "raw"
    make_visa(src, [("candle", "train", "anomaly", "candle/Data/Images/Anomaly/000.JPG",
                     "candle/Data/Masks/Anomaly/000.png")])
    with pytest.raises(DatasetError, match="anomalous image .*000.JPG in the train split"):
        run("visa", src, tmp_path / "data")


# ----------------------------------------------------------------------------- BTAD

def test_btad(tmp_path):
    src = tmp_path / "raw"
    for folder, ext, mask_ext in (("01", "bmp", "png"), ("02", "png", "png"), ("03", "bmp", "bmp")):
        write_image(src / folder / f"train/ok/0000.{ext}")
        write_image(src / folder / f"train/ok/0001.{ext}", 1)
        write_image(src / folder / f"test/ok/0002.{ext}", 2)
        write_image(src / folder / f"test/ko/0003.{ext}", 3)
        write_mask(src / folder / f"ground_truth/ko/0003.{mask_ext}")
    out = run("btad", src, tmp_path / "data")
    assert_layout(out, ["metal1", "wood", "metal2"])
    assert class_files(out, "metal1") == [
        "ground_truth/anomaly/BTAD_ko_0003_000002.png", "test/anomaly/BTAD_ko_0003_000002.bmp",
        "test/good/BTAD_good_0002_000003.bmp", "train/good/BTAD_0000_000000.bmp",
        "train/good/BTAD_0001_000001.bmp"]
    assert class_files(out, "metal2") == [
        "ground_truth/anomaly/BTAD_ko_0003_000010.png", "test/anomaly/BTAD_ko_0003_000010.bmp",
        "test/good/BTAD_good_0002_000011.bmp", "train/good/BTAD_0000_000008.bmp",
        "train/good/BTAD_0001_000009.bmp"]
    assert_same_image(out / "wood/train/good/BTAD_0000_000004.bmp", src / "02/train/ok/0000.png")
    assert_binary_mask(out / "metal2/ground_truth/anomaly/BTAD_ko_0003_000010.png",
                       src / "03/ground_truth/ko/0003.bmp")


# ----------------------------------------------------------------------------- DTD-Synthetic

DTD_TEXTURES = CONVERTERS["DTD"].TEXTURES


def make_dtd(src: Path) -> None:
    for index, (folder, _) in enumerate(sorted(DTD_TEXTURES)):
        write_image(src / folder / "train/good/000.png", index)
        write_image(src / folder / "test/good/001.png", index)
        write_image(src / folder / "test/bad/002.png", index)
        write_mask(src / folder / "ground_truth/bad/002_mask.png")
    touch(src / ".DS_Store")
    touch(src / "license.txt")


def test_dtd_fixed_order_and_stray_files(tmp_path):
    out = converted(tmp_path, "dtd", make_dtd, [cls for _, cls in DTD_TEXTURES])
    src = tmp_path / "raw"
    # processing order of the released data: woven2 first, mesh second, blotchy last
    assert class_files(out, "woven2") == [
        "ground_truth/anomaly/DTD_bad_002_000001.png", "test/anomaly/DTD_bad_002_000001.bmp",
        "test/good/DTD_good_001_000002.bmp", "train/good/DTD_000_000000.bmp"]
    assert class_files(out, "mesh")[-1] == "train/good/DTD_000_000003.bmp"
    assert class_files(out, "blotchy")[-1] == "train/good/DTD_000_000033.bmp"
    assert_binary_mask(out / "mesh/ground_truth/anomaly/DTD_bad_002_000004.png",
                       src / "Mesh_114/ground_truth/bad/002_mask.png")


def test_dtd_unknown_texture_folder(tmp_path):
    src = raw(tmp_path, make_dtd)
    (src / "Woven_999").mkdir()
    with pytest.raises(DatasetError, match="Woven_999 is not a DTD-Synthetic texture"):
        run("DTD", src, tmp_path / "data")


# ----------------------------------------------------------------------------- medical object layout

# name, class, (train, good, anomaly) extensions, mask file name from the image stem (None: no masks)
MEDICAL = [
    ("HeadCT", "head ct", ("png", "png", "png"), None),
    ("BrainMRI", "brain ct", ("jpg", "jpg", "JPG"), None),
    ("Br35H", "brain", ("jpg", "jpg", "jpg"), None),
    ("ISIC", "skin", ("jpg", "jpg", "jpg"), "{}_Segmentation.png"),
    ("ClinicDB", "colon", ("tif", "tif", "tif"), "{}.tif"),
    ("ColonDB", "colon", ("png", "png", "png"), "{}.png"),
    ("Endo", "colon", ("png", "jpg", "jpg"), "{}.png"),
    ("Kvasir", "colon", ("png", "png", "png"), "{}.png"),
    ("TN3K", "thyroid", ("jpg", "jpg", "jpg"), "{}.jpg"),
]


def make_object(src: Path, exts, mask_name, grey=False) -> None:
    """train/good: one image; test/good: one; test/defect: 1.x and 10.x (sorted: '1', '10')."""
    root = src / "object"
    train, good, anomaly = exts
    write_image(root / f"train/good/t0.{train}", 1, grey)
    write_image(root / f"test/good/g0.{good}", 2, grey)
    for seed, name in enumerate(("1", "10")):
        write_image(root / f"test/defect/{name}.{anomaly}", 3 + seed, grey)
        if mask_name:
            values = (0, 255) if mask_name.endswith(".jpg") else MASK_VALUES
            write_mask(root / "ground_truth/defect" / mask_name.format(name), values)
    # files the globs must leave out
    touch(root / "test/defect/Thumbs.db")
    touch(root / "test/.DS_Store")


@pytest.mark.parametrize("name,cls,exts,mask_name", MEDICAL, ids=[m[0] for m in MEDICAL])
def test_medical_object_layout(tmp_path, name, cls, exts, mask_name):
    src = tmp_path / "raw"
    make_object(src, exts, mask_name, grey=name == "HeadCT")
    out = run(name.lower(), src, tmp_path / "data")
    assert_layout(out, [cls])
    expected = [f"test/anomaly/{name}_defect_1_000001.bmp",
                f"test/anomaly/{name}_defect_10_000002.bmp",
                f"test/good/{name}_good_g0_000003.bmp",
                f"train/good/{name}_t0_000000.bmp"]
    if mask_name:
        expected += [f"ground_truth/anomaly/{name}_defect_1_000001.png",
                     f"ground_truth/anomaly/{name}_defect_10_000002.png"]
    assert class_files(out, cls) == sorted(expected)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    assert_same_image(out / cls / f"test/anomaly/{name}_defect_10_000002.bmp",
                      src / f"object/test/defect/10.{exts[2]}", flags)
    if mask_name:
        assert_binary_mask(out / cls / f"ground_truth/anomaly/{name}_defect_10_000002.png",
                           src / "object/ground_truth/defect" / mask_name.format("10"))


def test_medical_empty_train_and_missing_mask(tmp_path):
    src = tmp_path / "raw"
    write_image(src / "object/test/defect/ISIC_0001.jpg")
    (src / "object/train").mkdir()
    with pytest.raises(DatasetError, match=r"ISIC_0001_Segmentation\.png .*not found"):
        run("ISIC", src, tmp_path / "data")
    write_mask(src / "object/ground_truth/defect/ISIC_0001_Segmentation.png")
    out = run("ISIC", src, tmp_path / "data")
    assert class_files(out, "skin") == ["ground_truth/anomaly/ISIC_defect_ISIC_0001_000000.png",
                                        "test/anomaly/ISIC_defect_ISIC_0001_000000.bmp"]
    (src / "object/train").rmdir()
    with pytest.raises(DatasetError, match="train/ folder"):
        run("ISIC", src, tmp_path / "data2")


def test_brainmri_official_globs_and_any_case(tmp_path):
    src = tmp_path / "raw"
    (src / "object/train").mkdir(parents=True)
    write_image(src / "object/test/good/no 1.jpg")
    write_image(src / "object/test/good/no 2.JPG")      # left out by the official glob
    write_image(src / "object/test/defect/Y1.JPG")
    write_image(src / "object/test/defect/Y2.jpeg")     # left out by the official glob
    out = run("BrainMRI", src, tmp_path / "data")
    assert class_files(out, "brain ct") == ["test/anomaly/BrainMRI_defect_Y1_000000.bmp",
                                            "test/good/BrainMRI_good_no 1_000001.bmp"]
    out = run("BrainMRI", src, tmp_path / "wide", brainmri_any_case=True)
    assert class_files(out, "brain ct") == [
        "test/anomaly/BrainMRI_defect_Y1_000000.bmp", "test/anomaly/BrainMRI_defect_Y2_000001.bmp",
        "test/good/BrainMRI_good_no 1_000002.bmp", "test/good/BrainMRI_good_no 2_000003.bmp"]


def test_clinicdb_tiff_variants(tmp_path):
    """16-bit TIFFs are scaled to 8 bits, multi-page TIFFs give their first page, grey ones 3 channels."""
    root = tmp_path / "raw/object"
    (root / "train").mkdir(parents=True)
    deep = (np.arange(SIZE * SIZE * 3).reshape(SIZE, SIZE, 3) * 199 % 65536).astype(np.uint16)
    (root / "test/defect").mkdir(parents=True)
    assert cv2.imwrite(str(root / "test/defect/1.tif"), deep)
    pages = [np.full((SIZE, SIZE, 3), value, np.uint8) for value in (10, 200)]
    assert cv2.imwritemulti(str(root / "test/defect/2.tif"), pages)
    write_image(root / "test/defect/3.tif", grey=True)
    for name in ("1", "2", "3"):
        write_mask(root / f"ground_truth/defect/{name}.tif")
    out = run("ClinicDB", tmp_path / "raw", tmp_path / "data") / "colon/test/anomaly"
    written = [cv2.imread(str(out / f"ClinicDB_defect_{n}_00000{i}.bmp"), cv2.IMREAD_UNCHANGED)
               for i, n in enumerate(("1", "2", "3"))]
    assert all(w.dtype == np.uint8 and w.shape == (SIZE, SIZE, 3) for w in written)
    assert np.abs(written[0].astype(int) - deep // 256).max() <= 1
    assert (written[1] == 10).all()


# ----------------------------------------------------------------------------- KSDD2, RSDD, DAGM

def make_pos_neg(src: Path, pos, neg, defect_values=(0, 255)) -> None:
    for seed, name in enumerate(pos):
        write_image(src / "pos" / f"{name}.jpg", seed)
        write_mask(src / "pos" / f"{name}.png", defect_values)
    for seed, name in enumerate(neg):
        write_image(src / "neg" / f"{name}.jpg", 50 + seed)
        write_mask(src / "neg" / f"{name}.png", (0,))


def test_ksdd2(tmp_path):
    out = converted(tmp_path, "KSDD2", lambda src: make_pos_neg(
        src, ["KSDD2-metal-defect-000004", "KSDD2-metal-defect-000002"],
        ["KSDD2-metal-null-000003", "KSDD2-metal-null-000001", "KSDD2-metal-null-000002"]),
        ["Metal"])
    src = tmp_path / "raw"
    assert class_files(out, "Metal") == [
        "ground_truth/anomaly/KSDD2-metal-defect-000002_0000000000.png",
        "ground_truth/anomaly/KSDD2-metal-defect-000004_0000000001.png",
        "test/anomaly/KSDD2-metal-defect-000002_0000000000.bmp",
        "test/anomaly/KSDD2-metal-defect-000004_0000000001.bmp",
        "test/good/KSDD2-metal-null-000001_0000000002.bmp",
        "test/good/KSDD2-metal-null-000002_0000000003.bmp",
    ]
    assert_same_image(out / "Metal/test/good/KSDD2-metal-null-000001_0000000002.bmp",
                      src / "neg/KSDD2-metal-null-000001.jpg")
    assert_binary_mask(out / "Metal/ground_truth/anomaly/KSDD2-metal-defect-000004_0000000001.png",
                       src / "pos/KSDD2-metal-defect-000004.png")


@pytest.mark.parametrize("where,values,message", [
    ("pos", (0, 128, 255), r"has values \[0, 128, 255\], expected exactly 0 and 255"),
    ("pos", (0,), r"has values \[0\]"),
    ("neg", (0, 255), "is not all zero"),
])
def test_pos_neg_bad_masks(tmp_path, where, values, message):
    src = tmp_path / "raw"
    make_pos_neg(src, ["KSDD2-metal-defect-000001"], ["KSDD2-metal-null-000001", "KSDD2-metal-null-000002"])
    bad = f"KSDD2-metal-{'defect' if where == 'pos' else 'null'}-000001.png"
    write_mask(src / where / bad, values)
    with pytest.raises(DatasetError, match=bad.replace(".", r"\.") + ".*" + message):
        run("KSDD2", src, tmp_path / "data")
    assert not (tmp_path / "data/KSDD2").exists()


def test_pos_neg_missing_mask(tmp_path):
    src = tmp_path / "raw"
    make_pos_neg(src, ["RSDD_I-metal-defect-000001"], ["RSDD_I-metal-null-000001"])
    (src / "neg/RSDD_I-metal-null-000001.png").unlink()
    with pytest.raises(DatasetError, match=r"RSDD_I-metal-null-000001\.png .*not found"):
        run("RSDD", src, tmp_path / "data")


def test_rsdd(tmp_path):
    out = converted(tmp_path, "rsdd", lambda src: make_pos_neg(
        src, ["RSDD_II-metal-defect-000001", "RSDD_I-metal-defect-000156"],
        ["RSDD_I-metal-null-000157", "RSDD_I-metal-null-000158", "RSDD_I-metal-null-000159"]),
        ["Metal15"])
    assert [Path(f).name for f in class_files(out, "Metal15") if f.startswith("test/")] == [
        "RSDD_I-metal-defect-000156_0000000000.bmp", "RSDD_II-metal-defect-000001_0000000001.bmp",
        "RSDD_I-metal-null-000157_0000000002.bmp", "RSDD_I-metal-null-000158_0000000003.bmp"]


def test_dagm(tmp_path):
    src = tmp_path / "raw"
    make_pos_neg(src, ["DAGM2007-fabric-defect-classes1_0001", "DAGM2007-fabric-defect-classes10_0001",
                       "DAGM2007-fabric-defect-classes7_0001", "DAGM2007-fabric-defect-classes6_0001"],
                 ["DAGM2007-fabric-null-classes1_0001", "DAGM2007-fabric-null-classes1_0002",
                  "DAGM2007-fabric-null-classes7_0001"])
    out = run("DAGM", src, tmp_path / "data")
    assert_layout(out, [f"Fabric{n}" for n in (1, 2, 3, 4, 5, 7, 8)])
    assert class_files(out, "Fabric1") == [
        "ground_truth/anomaly/DAGM2007-fabric-defect-classes1_0001_0000000000.png",
        "test/anomaly/DAGM2007-fabric-defect-classes1_0001_0000000000.bmp",
        "test/good/DAGM2007-fabric-null-classes1_0001_0000000001.bmp"]
    assert class_files(out, "Fabric7") == [
        "ground_truth/anomaly/DAGM2007-fabric-defect-classes7_0001_0000000002.png",
        "test/anomaly/DAGM2007-fabric-defect-classes7_0001_0000000002.bmp",
        "test/good/DAGM2007-fabric-null-classes7_0001_0000000003.bmp"]
    assert class_files(out, "Fabric2") == []


# ----------------------------------------------------------------------------- make_dataset driver

def test_convert_errors(tmp_path):
    with pytest.raises(UnknownDatasetError, match="Unknown dataset 'mvtec3d': choose one of mvtec, visa"):
        convert("mvtec3d", tmp_path, tmp_path / "data")
    with pytest.raises(DatasetError, match=r"Source folder .*nowhere not found: pass --src"):
        convert("btad", tmp_path / "nowhere", tmp_path / "data")


def test_existing_output_needs_overwrite(tmp_path):
    src = tmp_path / "raw"
    make_object(src, ("png", "png", "png"), "{}.png")
    out = run("Kvasir", src, tmp_path / "data")
    marker = touch(out / "colon/old.txt")
    with pytest.raises(DatasetError, match=r"Kvasir already exists: pass --overwrite"):
        run("Kvasir", src, tmp_path / "data")
    assert marker.exists()
    # a failed conversion leaves the existing output alone
    (src / "object/ground_truth/defect/10.png").unlink()
    with pytest.raises(DatasetError, match="not found"):
        run("Kvasir", src, tmp_path / "data", overwrite=True)
    assert marker.exists() and not (tmp_path / "data/.Kvasir.partial").exists()
    write_mask(src / "object/ground_truth/defect/10.png")
    run("Kvasir", src, tmp_path / "data", overwrite=True)
    assert not marker.exists() and len(class_files(out, "colon")) == 6


def test_main_error_lines(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--dataset", "foo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unknown dataset 'foo'" in err[0] and "TN3K" in err[0]
    assert main(["--dataset", "ISIC", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing not found" in err[0]


def test_main_all_converts_present_and_reports_absent(tmp_path, capsys):
    root = tmp_path / "raw"
    make_object(root / "ColonDB", ("png", "png", "png"), "{}.png")
    make_object(root / "headct", ("png", "png", "png"), None)      # folder name in another case
    assert main(["--all", "--src-root", str(root), "--dst", str(tmp_path / "data")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16
    assert sum("skipped" in line for line in lines) == 14
    assert any(line.startswith("ColonDB: 1 classes, 1 train, 3 test (2 anomalous)") for line in lines)
    assert list_dirs(tmp_path / "data") == ["ColonDB", "HeadCT"]


def project_installed(tmp_path) -> bool:
    """Whether the project is installed (`pip install -e .`): `dataset` imports outside the repo."""
    done = subprocess.run([sys.executable, "-c", "import dataset.registry"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, timeout=60)
    return done.returncode == 0


def run_script(module: str, args, tmp_path, as_file: bool = False):
    """`python -m dataset.<module> ARGS` (or `python dataset/<module>.py ARGS`) from the repo root."""
    target = [f"dataset/{module}.py"] if as_file else ["-m", f"dataset.{module}"]
    return subprocess.run([sys.executable, *target, *map(str, args)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True,
                          timeout=60)


def test_cli_subprocess(tmp_path):
    """Both ways to run the script, from the repository root (the file form when the project is
    installed, test_cli_as_file_without_install otherwise); a second run without --overwrite
    fails."""
    src = tmp_path / "raw"
    make_object(src, ("jpg", "jpg", "jpg"), None)
    args = ["--dataset", "br35h", "--src", src, "--dst", tmp_path / "data"]
    done = run_script("make_dataset", args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Br35H: 1 classes, 1 train, 3 test (2 anomalous)" in done.stdout
    assert (tmp_path / "data/Br35H/brain/test/anomaly/Br35H_defect_1_000001.bmp").is_file()
    done = run_script("make_dataset", args, tmp_path, as_file=project_installed(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"make_dataset: Output folder {tmp_path / 'data' / 'Br35H'} already exists: "
        f"pass --overwrite to replace it."]


def test_cli_as_file_without_install():
    """`python -S` (no site-packages, so no installed project) shows what a user without
    `pip install -e .` gets from the file form: one line saying what to do."""
    for module in ("make_dataset", "make_meta"):
        done = subprocess.run([sys.executable, "-S", f"dataset/{module}.py", "--all"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": ""}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.strip().splitlines() == [
            f"{module}: the package 'dataset' cannot be imported: run 'python -m "
            f"dataset.{module} ...' from the repository root, or install the project with "
            f"'pip install -e .'."]
