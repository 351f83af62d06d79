"""make_meta.py: schema, order, placeholders and errors of the meta files."""
from __future__ import annotations

import json

import pytest

from dataset.converters import DatasetError
from dataset.files import is_image_file
from dataset.make_dataset import convert
from dataset.make_meta import main, make_meta, write_meta
from tests.test_converters import MVTEC, make_mvtec, project_installed, run_script, touch, write_image

FIELDS = ["img_path", "mask_path", "cls_name", "specie_name", "dataset_name", "anomaly"]


def make_tree(root, name, layout):
    """Standardised tree from {cls: [relative file path, ...]}; all four folders per class.
    Image files are 16 x 16 images (make_meta reads the sizes of anomalous images and their
    masks from the headers); other files hold one byte."""
    for cls, paths in layout.items():
        for folder in ("train/good", "test/good", "test/anomaly", "ground_truth/anomaly"):
            (root / name / cls / folder).mkdir(parents=True, exist_ok=True)
        for path in paths:
            target = root / name / cls / path
            if is_image_file(path):
                # OpenCV picks the format by the lower-case extension
                write_image(target.with_suffix(target.suffix.lower())).rename(target)
            else:
                touch(target)


def test_schema_order_and_format(tmp_path):
    make_tree(tmp_path, "BTAD", {
        "wood": ["train/good/BTAD_0000_000003.bmp", "test/good/BTAD_good_0002_000005.bmp",
                 "test/anomaly/BTAD_ko_0001_000004.bmp", "ground_truth/anomaly/BTAD_ko_0001_000004.png"],
        "metal1": ["train/good/BTAD_0001_000001.bmp", "train/good/BTAD_0000_000000.bmp",
                   "test/good/BTAD_good_0002_000002.BMP", "test/good/.DS_Store",
                   "test/good/notes.txt", "train/good/Thumbs.db"],
    })
    touch(tmp_path / "BTAD" / "meta_old.json")        # stray file beside the class folders
    meta = make_meta(tmp_path, "btad")                 # folder matched case-insensitively
    assert list(meta) == ["train", "test"]
    assert list(meta["train"]) == ["metal1", "wood"] == list(meta["test"])
    assert meta["train"]["metal1"] == [
        {"img_path": f"BTAD/metal1/train/good/BTAD_000{i}_00000{i}.bmp", "mask_path": "",
         "cls_name": "metal1", "specie_name": "good", "dataset_name": "BTAD", "anomaly": 0}
        for i in (0, 1)]
    assert meta["test"]["metal1"] == [{
        "img_path": "BTAD/metal1/test/good/BTAD_good_0002_000002.BMP", "mask_path": "",
        "cls_name": "metal1", "specie_name": "good", "dataset_name": "BTAD", "anomaly": 0}]
    # anomaly before good, each sorted
    assert meta["test"]["wood"] == [
        {"img_path": "BTAD/wood/test/anomaly/BTAD_ko_0001_000004.bmp",
         "mask_path": "BTAD/wood/ground_truth/anomaly/BTAD_ko_0001_000004.png",
         "cls_name": "wood", "specie_name": "anomaly", "dataset_name": "BTAD", "anomaly": 1},
        {"img_path": "BTAD/wood/test/good/BTAD_good_0002_000005.bmp", "mask_path": "",
         "cls_name": "wood", "specie_name": "good", "dataset_name": "BTAD", "anomaly": 0}]
    assert all(list(s) == FIELDS for phase in meta.values() for c in phase.values() for s in c)

    path = write_meta(tmp_path, "BTAD")
    assert path == tmp_path / "meta_BTAD.json"
    text = path.read_text()
    assert text == json.dumps(meta, indent=4) + "\n"
    assert text.startswith('{\n    "train": {\n        "metal1": [\n            {\n'
                           '                "img_path": "BTAD/metal1/train/good/')


def test_placeholder_for_empty_train_and_odd_dataset_names(tmp_path):
    make_tree(tmp_path, "KSDD2", {"Metal": [
        "test/anomaly/KSDD2-metal-defect-000004_0000000000.bmp",
        "ground_truth/anomaly/KSDD2-metal-defect-000004_0000000000.png",
        "test/good/KSDD2-metal-null-000001_0000000001.bmp"]})
    meta = make_meta(tmp_path, "KSDD2")
    assert meta["train"] == {"Metal": [{"img_path": "", "mask_path": "", "cls_name": "Metal",
                                        "specie_name": "good", "dataset_name": "", "anomaly": 0}]}
    assert [s["dataset_name"] for s in meta["test"]["Metal"]] == [
        "KSDD2-metal-defect-000004", "KSDD2-metal-null-000001"]
    assert [s["anomaly"] for s in meta["test"]["Metal"]] == [1, 0]


def test_classification_only_masks_point_at_absent_files(tmp_path):
    make_tree(tmp_path, "HeadCT", {"head ct": ["test/anomaly/HeadCT_defect_001_000000.bmp"]})
    sample = make_meta(tmp_path, "HeadCT")["test"]["head ct"][0]
    assert sample["mask_path"] == "HeadCT/head ct/ground_truth/anomaly/HeadCT_defect_001_000000.png"
    assert not (tmp_path / sample["mask_path"]).exists()


def test_missing_mask_names_the_file(tmp_path):
    make_tree(tmp_path, "ISIC", {"skin": ["test/anomaly/ISIC_defect_ISIC_0001_000000.bmp"]})
    with pytest.raises(DatasetError, match=r"Mask .*ISIC_defect_ISIC_0001_000000\.png for anomalous "
                                           r"image .* not found: re-run 'python -m dataset\.make_dataset --dataset ISIC "
                                           r"--overwrite'"):
        make_meta(tmp_path, "ISIC")


def test_empty_test_folder_and_phase_without_sub_folders(tmp_path):
    make_tree(tmp_path, "Kvasir", {"colon": [], "polyp": []})
    (tmp_path / "Kvasir/polyp/test/good").rmdir()
    (tmp_path / "Kvasir/polyp/test/anomaly").rmdir()
    meta = make_meta(tmp_path, "Kvasir")
    assert meta["test"] == {"colon": []}
    assert len(meta["train"]["polyp"]) == 1
    (tmp_path / "Kvasir/polyp/test").rmdir()
    with pytest.raises(DatasetError, match=r"polyp.test not found: re-run 'python -m dataset\.make_dataset"):
        make_meta(tmp_path, "Kvasir")


def test_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"Folder .*DTD not found: run 'python -m dataset\.make_dataset "
                                            r"--dataset DTD' first"):
        make_meta(tmp_path, "DTD")
    make_tree(tmp_path, "mvtec", {cls: [] for cls in MVTEC if cls != "wood"})
    with pytest.raises(DatasetError, match=r"mvtec.wood not found"):
        make_meta(tmp_path, "mvtec")


def test_meta_of_converted_mvtec(tmp_path):
    make_mvtec(tmp_path / "raw")
    convert("mvtec", tmp_path / "raw", tmp_path / "data", progress=False)
    meta = make_meta(tmp_path / "data", "mvtec")
    assert list(meta["test"]) == list(MVTEC)          # the fixed official order
    assert [s["img_path"] for s in meta["test"]["bottle"]] == [
        "mvtec/bottle/test/anomaly/mvtec_broken_large_000002.bmp",
        "mvtec/bottle/test/anomaly/mvtec_contamination_000003.bmp",
        "mvtec/bottle/test/good/mvtec_good_000004.bmp"]
    assert all((tmp_path / "data" / s["mask_path"]).is_file()
               for c in meta["test"].values() for s in c if s["anomaly"])
    assert meta["train"]["cable"][0]["img_path"] == ""   # cable's train was skipped
    assert meta["test"]["toothbrush"] == []
    assert sum(len(c) for c in meta["test"].values()) == 3 + 2 * 13


def test_main_all_and_errors(tmp_path, capsys):
    make_tree(tmp_path, "ColonDB", {"colon": []})
    make_tree(tmp_path, "ISIC", {"skin": ["test/anomaly/ISIC_defect_1_000000.bmp"]})
    assert main(["--data_root", str(tmp_path), "--all"]) == 1    # ISIC lacks its mask
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{tmp_path / 'meta_ColonDB.json'}: 1 classes, 0 train, 0 test (0 anomalous)"
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_meta: Mask ")
    assert main(["--data_root", str(tmp_path / "none"), "--all"]) == 1
    assert "none not found" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    make_tree(tmp_path, "DAGM", {"Fabric2": ["test/good/DAGM2007-fabric-null-classes2_0001_0000000000.bmp"],
                                 "Fabric1": []})
    for as_file in sorted({False, project_installed(tmp_path)}):   # the file form once installed
        done = run_script("make_meta", ["--data_root", tmp_path, "--dataset", "DAGM"], tmp_path,
                          as_file=as_file)
        assert done.returncode == 0, done.stderr
        meta = json.loads((tmp_path / "meta_DAGM.json").read_text())
        assert list(meta["test"]) == ["Fabric1", "Fabric2"]
        assert meta["test"]["Fabric2"][0]["dataset_name"] == "DAGM2007-fabric-null-classes2"
        assert "2 classes, 0 train, 1 test (0 anomalous)" in done.stdout
