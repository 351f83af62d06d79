"""dataset.folder on layouts that used to be read wrong without a word: each is now read as the
user sees it, or stops with one line naming the file and both readings; and every file under
ROOT is used or listed as left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset.data import AnomalyDataset
from dataset.folder import main

RNG = np.random.default_rng(0)


def image(path: Path, size=(16, 12), fmt=None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def mask(path: Path, size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[2:5, 3:7] = 255
    Image.fromarray(arr).save(path)
    return path


def flat_class(folder: Path, normal=("a.png", "b.png"), types=("scratch",), masks=True):
    for name in normal:
        image(folder / "good" / name)
    for kind in types:
        image(folder / kind / "x.png")
        if masks:
            mask(folder / "ground_truth" / kind / "x_mask.png")


def run(capsys, root, *args):
    code = main([str(root), "--dataset", "mine", "--no_progress", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def meta(root):
    return json.loads((Path(root) / "meta_mine.json").read_text())


def fails(capsys, root, *args) -> str:
    code, out, err = run(capsys, root, *args)
    assert code == 1 and out == [] and len(err) == 1, (out, err)
    assert not (Path(root) / "meta_mine.json").exists()
    return err[0].removeprefix("dataset.folder: ")


def test_a_stray_image_in_a_class_of_several_stops_naming_it(tmp_path, capsys):
    """Case 5: bottle/preview.png beside bottle's good/ once turned ROOT into one class."""
    for cls in ("bottle", "cable"):
        flat_class(tmp_path / cls)
    image(tmp_path / "bottle" / "preview.png")
    said = fails(capsys, tmp_path)
    assert said.startswith(f"Image {tmp_path / 'bottle' / 'preview.png'} lies directly in "
                           f"{tmp_path / 'bottle'}: move it into")
    (tmp_path / "bottle" / "preview.png").unlink()
    code, out, _ = run(capsys, tmp_path)
    assert code == 0 and sorted(meta(tmp_path)["test"]) == ["bottle", "cable"]


def test_a_class_named_masks_is_a_class_and_a_lone_mask_folder_stops(tmp_path, capsys):
    """Case 6: a class folder named masks (it has good/) is a class; a folder of masks beside
    the classes reads two ways and stops."""
    flat_class(tmp_path / "bottle")
    flat_class(tmp_path / "masks")
    assert run(capsys, tmp_path)[0] == 0
    assert sorted(meta(tmp_path)["test"]) == ["bottle", "masks"]
    (tmp_path / "meta_mine.json").unlink()
    flat_class(tmp_path / "ground_truth", normal=(), types=())
    mask(tmp_path / "ground_truth" / "scratch" / "x_mask.png")
    said = fails(capsys, tmp_path)
    assert said.startswith(f"Folder {tmp_path / 'ground_truth'} is named like a mask folder, "
                           f"but {tmp_path} holds classes (bottle, masks)")


def test_images_at_any_depth_take_their_folders_label(tmp_path, capsys):
    """Case 7: good/day2/, scratch/batch2/ and test/crack/more/ are read, masks mirrored."""
    flat = tmp_path / "flat"
    flat_class(flat)
    image(flat / "good" / "day2" / "c.png")
    image(flat / "scratch" / "batch2" / "x.png")                 # same stem, other folder
    mask(flat / "ground_truth" / "scratch" / "batch2" / "x_mask.png")
    mvtec = tmp_path / "mvtec"
    image(mvtec / "train" / "good" / "old" / "t.png")
    image(mvtec / "test" / "good" / "g.png")
    image(mvtec / "test" / "crack" / "more" / "c.png")
    mask(mvtec / "ground_truth" / "crack" / "more" / "c_mask.png")
    for root in (flat, mvtec):
        assert run(capsys, root)[0] == 0
    entries = {s["img_path"]: s for s in meta(flat)["test"]["flat"]}
    assert entries["good/day2/c.png"]["anomaly"] == 0
    assert entries["scratch/batch2/x.png"]["specie_name"] == "scratch"
    assert entries["scratch/batch2/x.png"]["mask_path"] == \
        "ground_truth/scratch/batch2/x_mask.png"
    assert entries["scratch/x.png"]["mask_path"] == "ground_truth/scratch/x_mask.png"
    m = meta(mvtec)
    assert [s["img_path"] for s in m["train"]["mvtec"]] == ["train/good/old/t.png"]
    (crack,) = [s for s in m["test"]["mvtec"] if s["specie_name"] == "crack"]
    assert crack["img_path"] == "test/crack/more/c.png"
    assert crack["mask_path"] == "ground_truth/crack/more/c_mask.png"
    # the mask mirroring scratch/x.png is its own; batch2/x.png then needs its own mask
    (flat / "ground_truth" / "scratch" / "batch2" / "x_mask.png").unlink()
    (flat / "meta_mine.json").unlink()
    assert fails(capsys, flat).startswith(
        f"Anomalous image {flat / 'scratch' / 'batch2' / 'x.png'} has no mask")
    # a mask that does not mirror either of two images of one stem stops
    (flat / "scratch" / "batch1").mkdir()
    (flat / "scratch" / "x.png").rename(flat / "scratch" / "batch1" / "x.png")
    said = fails(capsys, flat)
    assert said.startswith(f"Mask {flat / 'ground_truth' / 'scratch' / 'x_mask.png'} lies in "
                           f"{flat / 'ground_truth' / 'scratch'} and its name fits 2 anomalous "
                           f"images")


@pytest.mark.parametrize("name", ["Good", "GOOD"])
def test_a_normal_folder_in_another_case_stops(tmp_path, capsys, name):
    """Case 8: Good/ once became an anomaly type (every normal image anomalous)."""
    flat_class(tmp_path / "part", normal=())
    image(tmp_path / "part" / name / "a.png")
    said = fails(capsys, tmp_path / "part")
    assert said.startswith(f"Folder {tmp_path / 'part' / name} differs from 'good' (the normal "
                           f"images) only in case: it would be read as an anomaly type")
    assert said.endswith(f"rename it to good, or pass --normal_dir {name}.")
    assert run(capsys, tmp_path / "part", "--normal_dir", name)[0] == 0


def test_pillow_still_image_formats_are_images(tmp_path, capsys):
    """Case 9: .pgm, .gif and .jfif are read (predict.py reads them too)."""
    root = tmp_path / "part"
    flat_class(root, normal=("a.png",))
    image(root / "good" / "b.pgm", fmt="PPM", mode="L")
    image(root / "good" / "c.gif", mode="P")
    image(root / "good" / "d.jfif", fmt="JPEG")
    assert run(capsys, root)[0] == 0
    paths = {s["img_path"] for s in meta(root)["test"]["part"]}
    assert {"good/b.pgm", "good/c.gif", "good/d.jfif"} <= paths
    dataset = AnomalyDataset(str(root), "mine", image_size=32)
    assert all(dataset[i]["image"].shape == (3, 32, 32) for i in range(len(dataset)))


@pytest.mark.parametrize("folder, flag", [("masks", ["--mask_dir", "masks"]), ("mask", [])])
def test_flat_masks_in_a_mask_folder_are_masks(tmp_path, capsys, folder, flag):
    """Cases 10 and 11: masks lying flat in masks/ (--mask_dir) or in anomalib's mask/ are the
    anomalous images' masks, not ignored and not an anomaly type "mask"."""
    root = tmp_path / "part"
    flat_class(root, types=("scratch",), masks=False)
    image(root / "dent" / "y.png")
    for stem in ("x", "y"):
        mask(root / folder / f"{stem}.png")
    assert run(capsys, root, *flag)[0] == 0
    m = meta(root)
    assert m["info"]["classification_only"] is False
    assert {s["specie_name"] for s in m["test"]["part"]} == {"good", "scratch", "dent"}
    masks = {s["img_path"]: s["mask_path"] for s in m["test"]["part"] if s["anomaly"]}
    assert masks == {"scratch/x.png": f"{folder}/x.png", "dent/y.png": f"{folder}/y.png"}


def test_a_flat_mask_fitting_two_types_stops(tmp_path, capsys):
    root = tmp_path / "part"
    flat_class(root, types=("scratch", "dent"), masks=False)
    mask(root / "mask" / "x.png")
    said = fails(capsys, root)
    assert said.startswith(f"Mask {root / 'mask' / 'x.png'} lies flat in {root / 'mask'} and "
                           f"its name fits 2 anomalous images")


def test_one_mask_folder_for_two_classes_stops(tmp_path, capsys):
    """Case 12: --mask_dir ../masks shared by two classes with equal file names."""
    root = tmp_path / "data"
    for cls in ("bottle", "cable"):
        flat_class(root / cls, masks=False)
    mask(root / "shared" / "scratch" / "x.png")
    said = fails(capsys, root, "--mask_dir", "../shared")
    assert said.startswith("Classes bottle and cable read their masks from the same folder")


@pytest.mark.parametrize("name", ["HeadCT", "mvtec", "visa"])
def test_the_papers_dataset_names_are_refused(tmp_path, capsys, name):
    """Case 13: a folder converted with a registry name once lost its pixel metrics."""
    flat_class(tmp_path / "part")
    code = main([str(tmp_path / "part"), "--dataset", name, "--no_progress"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and len(err) == 1 and "names one of the paper's datasets" in err[0]


def test_a_folder_meta_with_a_registry_name_keeps_its_own_facts(tmp_path, capsys):
    """A meta file written by dataset.folder under a registry name (before the refusal):
    the meta's facts win, so the masks are used."""
    root = tmp_path / "part"
    flat_class(root)
    assert run(capsys, root)[0] == 0
    (root / "meta_mine.json").rename(root / "meta_HeadCT.json")
    dataset = AnomalyDataset(str(root), "HeadCT", image_size=32)
    assert dataset.from_folder and not dataset.classification_only


def test_exif_rotated_images_are_read_upright_everywhere(tmp_path, capsys):
    """Case 14: a photo with EXIF orientation 6 is read upright by the folder dataset (as by
    predict.py and the API), and its mask is compared with the upright size."""
    root = tmp_path / "part"
    flat_class(root)
    raw = RNG.integers(0, 256, (10, 20, 3), dtype=np.uint8)          # stored 20 x 10
    exif = Image.Exif()
    exif[0x0112] = 6                                                # rotate 90 to view
    Image.fromarray(raw).save(root / "scratch" / "r.png", exif=exif)
    mask(root / "ground_truth" / "scratch" / "r_mask.png", size=(10, 20))   # upright size
    assert run(capsys, root)[0] == 0
    dataset = AnomalyDataset(str(root), "mine", image_size=32)
    index = [s["img_path"] for s in dataset.samples].index(str(root / "scratch" / "r.png"))
    read, _ = dataset.read_sample(index)
    assert read.size == (10, 20)
    with Image.open(root / "scratch" / "r.png") as opened:
        from PIL import ImageOps

        upright = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    assert np.array_equal(np.asarray(read.convert("RGB")), upright)


def test_every_file_is_used_or_listed(tmp_path, capsys):
    root = tmp_path / "part"
    flat_class(root)
    (root / "good" / "notes.txt").write_text("x")
    (root / "good" / ".DS_Store").write_text("x")
    (root / "scratch" / "README").write_text("x")
    (root / "ground_truth" / "good").mkdir(parents=True)
    Image.new("L", (16, 12)).save(root / "ground_truth" / "good" / "a.png")   # all zero
    code, out, _ = run(capsys, root)
    assert code == 0
    assert out[-2] == ("3 images used (train 0, test 3), 1 masks; 4 left out: 2 not an image "
                       "file, 1 a hidden file, 1 a mask of normal images (listed in the meta "
                       "file's info.left_out)")
    assert meta(root)["info"]["left_out"] == [
        {"path": "good/.DS_Store", "reason": "a hidden file"},
        {"path": "good/notes.txt", "reason": "not an image file (extension .txt)"},
        {"path": "ground_truth/good/a.png",
         "reason": "a mask of normal images (not needed: all zero)"},
        {"path": "scratch/README", "reason": "not an image file (no extension)"}]


def test_a_class_named_mean_is_refused(tmp_path, capsys):
    """Case 23: a class named mean would lose its CSV row to the mean row."""
    for cls in ("mean", "bottle"):
        flat_class(tmp_path / cls)
    said = fails(capsys, tmp_path)
    assert said.startswith(f"Class folder {tmp_path / 'mean'}: a class named 'mean' would "
                           f"share the result tables' row of the mean")


def test_n_train_on_a_class_without_normal_images_says_so(tmp_path, capsys):
    flat_class(tmp_path / "part", normal=())
    said = fails(capsys, tmp_path / "part", "--n_train", "1")
    assert said.startswith("--n_train 1: class part") and "has no normal test image" in said


# ------------------------------------------------------------------------------------------------
# The hostile round's cases


@pytest.mark.parametrize("link, target", [("good/more", "../crack"),
                                          ("good/dup.png", "../crack/x.png"),
                                          ("good/loop", "..")])
def test_a_link_back_into_the_dataset_stops(tmp_path, capsys, link, target):
    """A link inside good/ to the crack folder, to a crack image or to the class itself once
    read the defective image (and a mask) as normal too."""
    root = tmp_path / "part"
    image(root / "good" / "a.png")
    image(root / "crack" / "x.png")
    mask(root / "ground_truth" / "crack" / "x_mask.png")
    (root / link).symlink_to(target)
    said = fails(capsys, root)
    assert said.startswith(f"{root / link} is a link to ") and "lies in the dataset" in said
    # a link to a folder outside the dataset is followed
    (root / link).unlink()
    image(tmp_path / "elsewhere" / "b.png")
    (root / "good" / "more").symlink_to(tmp_path / "elsewhere")
    assert run(capsys, root)[0] == 0
    assert "good/more/b.png" in {s["img_path"] for s in meta(root)["test"]["part"]}


def test_the_same_file_twice_through_hard_links_stops(tmp_path, capsys):
    root = tmp_path / "part"
    flat_class(root)
    (root / "good" / "c.png").hardlink_to(root / "scratch" / "x.png")
    assert "are the same file" in fails(capsys, root)


@pytest.mark.parametrize("where", ["GROUND_TRUTH/crack/c_mask.png", "Masks/crack/c_mask.png",
                                   "crack/masks/c_mask.png", "crack/c_mask.png"])
def test_mask_folders_out_of_place_or_case_stop(tmp_path, capsys, where):
    """Mask folders in another case, a mask folder inside an anomaly folder, a mask beside its
    image: each once became anomalous images, the pixel metrics gone without a word."""
    root = tmp_path / "part"
    image(root / "good" / "a.png")
    image(root / "crack" / "c.png")
    mask(root / where)
    said = fails(capsys, root)
    assert any(words in said for words in ("only in case", "named like a mask folder",
                                           "reads two ways")), said


def test_a_mask_folder_among_the_test_types_stops(tmp_path, capsys):
    root = tmp_path / "part"
    image(root / "train" / "good" / "t.png")
    image(root / "test" / "good" / "g.png")
    image(root / "test" / "crack" / "c.png")
    mask(root / "test" / "ground_truth" / "crack" / "c_mask.png")
    assert "lies among the anomaly types" in fails(capsys, root)


def test_a_mask_of_a_normal_image_with_defect_pixels_stops(tmp_path, capsys):
    root = tmp_path / "part"
    flat_class(root)
    mask(root / "ground_truth" / "good" / "a_mask.png")          # defect pixels
    assert fails(capsys, root).startswith(
        f"Mask {root / 'ground_truth' / 'good' / 'a_mask.png'} of the normal images marks "
        f"defect pixels")


@pytest.mark.parametrize("args, said", [
    (["--mask_dir", "."], "--mask_dir '.': pass the folder of the masks"),
    (["--mask_dir", ""], "--mask_dir '': pass the folder of the masks")])
def test_bad_mask_dirs_are_one_line(tmp_path, capsys, args, said):
    flat_class(tmp_path / "part")
    assert fails(capsys, tmp_path / "part", *args).startswith(said)


def test_an_empty_root_is_refused_and_writes_nothing(tmp_path, capsys, monkeypatch):
    flat_class(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["", "--dataset", "mine", "--no_progress"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err == ["dataset.folder: ROOT '': pass the folder holding your class "
                                 "folders (or your good/ and anomaly folders)."]
    assert not (tmp_path / "meta_mine.json").exists()


def test_a_mask_dir_inside_a_default_mask_folder_is_used_once(tmp_path, capsys):
    """An absolute --mask_dir inside ground_truth/: its masks are used, and listed nowhere as
    left out."""
    root = tmp_path / "part"
    flat_class(root)
    assert run(capsys, root, "--mask_dir", root / "ground_truth" / "scratch")[0] == 0
    m = meta(root)
    (entry,) = [s for s in m["test"]["part"] if s["anomaly"]]
    assert entry["mask_path"] == "ground_truth/scratch/x_mask.png"
    assert m["info"]["left_out"] == []


def test_wording_twice_and_a_class_named_like_mean_are_refused(tmp_path, capsys):
    for cls in ("bottle", "Mean"):
        flat_class(tmp_path / cls)
    assert "a class named 'Mean' would share" in fails(capsys, tmp_path)
    (tmp_path / "Mean").rename(tmp_path / "cable")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--dataset", "mine", "--wording", "bottle=screw", "--wording",
              "bottle=nail"])
    assert "names the folder bottle twice" in capsys.readouterr().err


def test_meta_files_and_markers_in_a_class_root_are_listed_as_such(tmp_path, capsys):
    root = tmp_path / "part"
    flat_class(root)
    (root / "meta_other.json").write_text("{}")
    assert run(capsys, root)[0] == 0
    assert {"path": "meta_other.json", "reason": "a meta file"} in meta(root)["info"]["left_out"]
