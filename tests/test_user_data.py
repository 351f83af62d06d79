"""The data users bring: outputs never read back as inputs, meta files checked entry by entry,
classes and masks that make metrics n/a said, validation data that cannot select refused, full
disks, class names too long for the text tower, FIFOs and devices among the inputs, archive
bombs. Tiny random weights and synthetic data; grouped by item of the reliability issue."""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.synthetic import write_standard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "32", "--features_list", "1", "2", "3", "4", "--sample_num", "1",
        "--no_progress"]


def weights(tiny_files):
    return ["--pretrained_path", tiny_files[0], "--checkpoint_path", tiny_files[1]]


def images(folder, names, size=24, seed=0):
    rng = np.random.RandomState(seed)
    for name in names:
        path = os.path.join(str(folder), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.randint(0, 255, (size, size, 3)).astype(np.uint8)).save(path)


def run(args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error") or " ERROR " in line]


def dataset_copy(tmp_path, name="d", classes=("pill",), good=2, anomalous=2):
    """A synthetic dataset of 32 px images under tmp_path/<name>; returns (root, meta dict)."""
    root = str(tmp_path / name)
    meta_file = write_standard(root, name="x", size=32, classes=list(classes), n_train=0,
                               n_test_good=good, n_test_anomaly=anomalous)
    with open(meta_file) as f:
        return root, json.load(f)


def write_meta(root, name, test, train=None):
    with open(os.path.join(root, f"meta_{name}.json"), "w") as f:
        json.dump({"train": train or {}, "test": test}, f)


class Records(logging.Handler):
    """The messages logged to one logger (independent of pytest's capture)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


# ------------------------------------------------------------------------------------------------
# 2. outputs never read as inputs


def earlier_run(folder):
    """An output folder as predict.py / test.py leave it: the marker, result files and pictures
    under overlays/, uncertainty/ and imgs/."""
    from utils.results import make_output_folder

    make_output_folder(str(folder), "--out")
    images(folder, ["overlays/a.png", "overlays/sub/b.png", "uncertainty/a.png",
                    "imgs/pill/good/c.png"], seed=1)
    (folder / "predictions.csv").write_text("path,score\n")


def test_every_output_folder_is_marked(tmp_path):
    from dataset.files import OUTPUT_MARKER, is_output_folder
    from utils.results import make_output_folder

    new, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    for folder in (new, existing):
        assert not is_output_folder(folder)
        make_output_folder(str(folder))
        assert is_output_folder(folder) and (folder / OUTPUT_MARKER).is_file()
    (new / OUTPUT_MARKER).write_text("kept")
    make_output_folder(str(new))                     # a second run keeps the marker
    assert (new / OUTPUT_MARKER).read_text() == "kept"
    assert not is_output_folder(tmp_path / "missing")


def test_pictures_of_an_earlier_run_are_never_found(tmp_path):
    from utils.discovery import collect_images, why_no_images

    src = tmp_path / "parts"
    images(src, ["p1.png", "sub/p2.png"])
    earlier_run(src / "preds")
    images(src / "preds", ["mine.png"])               # the user's own image beside the results
    earlier_run(src / "preds" / "deeper")
    expected = {str(src / "p1.png"), str(src / "sub" / "p2.png"),
                str(src / "preds" / "mine.png")}

    def found(*specs):
        return {item.path for item in collect_images([str(s) for s in specs], "part")}

    assert found(src) == expected                                    # a folder, at any depth
    assert found(f"{src}/**/*.png") == expected                      # a glob matching files
    assert found(f"{src}/*") == expected                             # a glob matching folders
    assert found(src / "preds") == {str(src / "preds" / "mine.png")}  # the output folder itself
    # named explicitly: skipped, with the reason
    for spec in (src / "preds" / "overlays" / "a.png", src / "preds" / "overlays",
                 src / "preds" / "uncertainty", src / "preds" / "imgs" / "pill",
                 f"{src}/preds/overlays/*.png"):
        unmatched = []
        assert collect_images([str(spec)], "part", on_unmatched=unmatched.append) == []
        assert unmatched == [str(spec)]
        reason = why_no_images(str(spec))
        assert "earlier run" in reason and "never read as inputs" in reason, reason
    # through symbolic links: a link to an overlay, a linked folder of overlays
    os.symlink(src / "preds" / "overlays" / "a.png", src / "link.png")
    os.symlink(src / "preds" / "overlays", src / "linked_dir")
    assert found(src / "link.png") == set() and found(src / "linked_dir") == set()
    assert found(src) == expected
    # without the marker a folder called overlays is the user's
    images(tmp_path / "plain", ["overlays/o.png", "imgs/i.png"])
    assert found(tmp_path / "plain") == {str(tmp_path / "plain" / "overlays" / "o.png"),
                                         str(tmp_path / "plain" / "imgs" / "i.png")}


def test_calibration_never_includes_an_earlier_runs_overlays(tiny_files, tmp_path):
    import predict

    good = tmp_path / "good"
    images(good, ["g1.png", "g2.png"])
    parts = tmp_path / "parts"
    images(parts, ["p.png"], seed=3)
    # a first run wrote its overlays inside the calibration folder (scoring other images)
    other = tmp_path / "other"
    images(other, ["o1.png", "o2.png"], seed=5)
    assert predict.main([*weights(tiny_files), *TINY, "--input", str(other),
                         "--out", str(good / "first")]) == 0
    assert len(list((good / "first" / "overlays").rglob("*.png"))) == 2
    assert predict.main([*weights(tiny_files), *TINY, "--input", str(parts), "--calibrate",
                         str(good), "--class_name", "part", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert result["threshold"]["calibration"]["n_images"] == 2
    assert {"path": str(good / "first" / "overlays"), "reason": "an earlier run's pictures"} \
        in result["left_out"]
    # and scoring the folder again finds the two images, not their overlays
    assert predict.main([*weights(tiny_files), *TINY, "--input", str(good),
                         "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "predictions.json").read_text())
    assert sorted(os.path.basename(r["path"]) for r in again["predictions"]) == ["g1.png",
                                                                                 "g2.png"]


def test_listings_and_make_meta_skip_the_pictures_of_output_folders(tmp_path):
    from dataset.files import list_dirs, list_files
    from dataset.make_meta import make_meta

    root, meta = dataset_copy(tmp_path)
    data = os.path.join(root, "x")
    # test.py run with --save_path on the dataset folder, predict.py with --out on a phase
    earlier_run(tmp_path / "d" / "x")
    earlier_run(tmp_path / "d" / "x" / "pill" / "test")
    assert list_dirs(data) == ["pill"]
    assert list_dirs(os.path.join(data, "pill", "test")) == ["anomaly", "good"]
    assert list_files(os.path.join(data, "imgs", "pill", "good")) == []
    assert list_files(os.path.join(data, "pill", "test", "overlays")) == []
    assert make_meta(root, "x", classes=None)["test"] == meta["test"]


# ------------------------------------------------------------------------------------------------
# 3. meta files


@pytest.mark.parametrize("entry,expected", [
    ({"mask_path": "", "cls_name": "pill", "anomaly": 0}, "has no img_path"),
    ({"img_path": "", "mask_path": "", "cls_name": "pill", "anomaly": 0}, "has no img_path"),
    ({"img_path": None, "cls_name": "pill", "anomaly": 0}, "has no img_path"),
    ({"img_path": 7, "cls_name": "pill", "anomaly": 0}, "has a non-text img_path"),
    ("x/pill/test/good/a.bmp", "is a str, not a sample"),
    (["x/pill/test/good/a.bmp"], "is a list, not a sample"),
    (None, "is a NoneType, not a sample"),
    ({"img_path": "{good}", "mask_path": 3, "cls_name": "pill", "anomaly": 0},
     "non-text mask_path"),
    ({"img_path": "{good}", "mask_path": "", "cls_name": "pill", "anomaly": 2}, "anomaly=2"),
])
def test_a_bad_test_entry_is_one_line_naming_it(tmp_path, entry, expected):
    from dataset.data import AnomalyDataset, DatasetError

    root, meta = dataset_copy(tmp_path)
    entries = list(meta["test"]["pill"])
    if isinstance(entry, dict) and entry.get("img_path") == "{good}":
        entry = {**entry, "img_path": entries[-1]["img_path"]}
    entries.insert(2, entry)
    write_meta(root, "bad", {"pill": entries})
    with pytest.raises(DatasetError) as info:
        AnomalyDataset(root, "bad", image_size=32)
    line = str(info.value)
    assert "\n" not in line and expected in line
    assert os.path.join(root, "meta_bad.json") in line
    assert "Entry 2 of class 'pill'" in line


def test_an_entry_of_another_class_is_refused_naming_both(tmp_path):
    from dataset.data import AnomalyDataset, DatasetError

    root, meta = dataset_copy(tmp_path, classes=("pill", "wood"))
    test = meta["test"]
    moved = dict(test["wood"][1], cls_name="wood")
    test["pill"] = test["pill"] + [moved]                  # listed under pill, says wood
    write_meta(root, "mixed", test)
    with pytest.raises(DatasetError) as info:
        AnomalyDataset(root, "mixed", image_size=32)
    line = str(info.value)
    assert "'wood'" in line and "'pill'" in line and f"Entry {len(test['pill']) - 1}" in line
    # a missing or empty cls_name takes the class key (hand-written meta files)
    for value in (None, ""):
        entries = [dict(e) for e in meta["test"]["wood"]]
        for e in entries:
            e.pop("cls_name")
            if value is not None:
                e["cls_name"] = value
        write_meta(root, "keyed", {"wood": entries})
        ds = AnomalyDataset(root, "keyed", image_size=32)
        assert {s["cls_name"] for s in ds.samples} == {"wood"} and len(ds) == len(entries)


def test_test_py_refuses_a_meta_file_with_a_dropped_entry(tiny_files, tmp_path):
    import test as test_script

    root, meta = dataset_copy(tmp_path)
    entries = meta["test"]["pill"]
    entries[1] = {k: v for k, v in entries[1].items() if k != "img_path"}
    write_meta(root, "x", meta["test"], meta["train"])
    out = tmp_path / "res"
    code = test_script.main(["--dataset", "x", "--data_path", root, *weights(tiny_files),
                             *TINY, "--save_path", str(out), "--num_workers", "0"])
    assert code == 1 and not out.exists()


def test_train_split_placeholders_and_repeated_entries(tmp_path):
    from dataset.data import AnomalyDataset

    root, meta = dataset_copy(tmp_path)
    assert meta["train"]["pill"][0]["img_path"] == ""          # make_meta's placeholder
    assert len(AnomalyDataset(root, "x", image_size=32)) == 4   # "train" is never read
    test = {"pill": meta["test"]["pill"] + meta["test"]["pill"][:1]}
    write_meta(root, "twice", test)
    with Records("dataset.data") as logged:
        ds = AnomalyDataset(root, "twice", image_size=32)
    assert len(ds) == 5
    lines = [m for m in logged if "more than once" in m]
    assert len(lines) == 1 and "class pill" in lines[0] and "2 times" in lines[0]


# ------------------------------------------------------------------------------------------------
# 4. classes of one kind, implausible masks, colour masks


def test_a_class_of_one_kind_is_one_warning_at_construction(tmp_path):
    from dataset.data import AnomalyDataset

    root, meta = dataset_copy(tmp_path, classes=("pill", "wood", "mesh"), good=2, anomalous=3)
    test = meta["test"]
    test["pill"] = [e for e in test["pill"] if e["anomaly"] == 0]       # only normal
    test["wood"] = [e for e in test["wood"] if e["anomaly"] == 1]       # only anomalous
    write_meta(root, "kinds", test)
    with Records("dataset.data") as logged:
        AnomalyDataset(root, "kinds", image_size=32)
    assert len(logged) == 2, logged
    pill = next(m for m in logged if "class pill" in m)
    wood = next(m for m in logged if "class wood" in m)
    assert "2 normal and 0 anomalous" in pill and "pixel metrics will be n/a" in pill
    assert "auroc_sp" in pill
    assert "0 normal and 3 anomalous" in wood and "image metrics" in wood
    assert "pixel" not in wood
    with Records("dataset.data") as logged:                 # training never warns about it
        AnomalyDataset(root, "kinds", mode="train", image_size=32)
    assert logged == []


def brute_force_mask_counts(labels, masks):
    counts = {"empty": 0, "full": 0, "most": 0, "stained": 0}
    for label, mask in zip(labels, masks):
        share = sum(map(int, mask.flatten())) / mask.size
        if label and share == 0:
            counts["empty"] += 1
        elif label and share == 1:
            counts["full"] += 1
        elif label and share > 0.5:
            counts["most"] += 1
        elif not label and share > 0:
            counts["stained"] += 1
    return counts


def test_mask_warnings_count_each_kind_of_problem():
    from utils.checks import mask_warnings

    rng = np.random.default_rng(0)
    n, s = 40, 8
    labels = rng.integers(0, 2, n)
    masks = np.zeros((n, s, s), bool)
    for i in range(n):
        kind = rng.integers(0, 5)
        if kind == 1:
            masks[i] = True
        elif kind == 2:
            masks[i] = rng.random((s, s)) < 0.85
        elif kind == 3:
            masks[i, :2, :2] = True
    counts = brute_force_mask_counts(labels, masks)
    assert all(counts.values())
    lines = mask_warnings("bolt", labels, masks)
    assert len(lines) == 4 and all(line.startswith("class bolt: ") for line in lines)
    anomalous, normal = int(labels.sum()), int(n - labels.sum())
    assert f"{counts['empty']} of {anomalous} anomalous images have an empty mask" in lines[0]
    assert f"{counts['full']} of {anomalous} anomalous images have a mask covering the whole" \
        in lines[1]
    assert f"{counts['most']} of {anomalous} anomalous images have a mask covering more than " \
           "half" in lines[2] and "inverted" in lines[2]
    assert f"{counts['stained']} of {normal} normal images" in lines[3]
    # plausible masks, data without masks: nothing to say
    good = np.zeros((4, s, s), bool)
    good[2:, 1:3, 1:3] = True
    assert mask_warnings("bolt", [0, 0, 1, 1], good) == []
    assert mask_warnings("bolt", [1, 1], None) == []
    with pytest.raises(ValueError, match="3 labels for 4 masks"):
        mask_warnings("bolt", [1, 1, 0], good)


def test_evaluation_warns_about_empty_full_and_inverted_masks(tiny_files, tmp_path):
    import test as test_script

    root, meta = dataset_copy(tmp_path, classes=("pill",), good=1, anomalous=3)
    masks = sorted(glob.glob(os.path.join(root, "x", "pill", "ground_truth", "anomaly",
                                          "*.png")))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks[0])           # all 0
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(masks[1])       # all 255
    inverted = np.full((32, 32), 255, np.uint8)
    inverted[:8, :8] = 0
    Image.fromarray(inverted).save(masks[2])                               # inverted
    out = tmp_path / "res"
    assert test_script.main(["--dataset", "x", "--data_path", root, *weights(tiny_files),
                             *TINY, "--save_path", str(out), "--num_workers", "0",
                             "--no_vis", "--pro", "off"]) == 0
    log = (out / "test_x.log").read_text()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 3, warnings
    assert "class pill: 1 of 3 anomalous images have an empty mask" in warnings[0]
    assert "class pill: 1 of 3 anomalous images have a mask covering the whole" in warnings[1]
    assert "class pill: 1 of 3 anomalous images have a mask covering more than half" \
        in warnings[2]


def test_colour_masks_are_one_warning_per_class(tmp_path):
    from dataset.data import AnomalyDataset

    root, _ = dataset_copy(tmp_path, classes=("pill", "wood"), good=1, anomalous=3)
    grey = AnomalyDataset(root, "x", image_size=32)
    before = [grey[i]["mask"] for i in range(len(grey))]
    masks = sorted(glob.glob(os.path.join(root, "x", "pill", "ground_truth", "anomaly",
                                          "*.png")))
    for path, mode in zip(masks, ("RGB", "RGBA")):
        Image.open(path).convert(mode).save(path)
    with Records("dataset.data") as logged:
        colour = AnomalyDataset(root, "x", image_size=32)
    assert len(logged) == 1, logged
    assert "class pill" in logged[0] and "2 of 3 masks" in logged[0]
    assert "RGB 1" in logged[0] and "RGBA 1" in logged[0]
    # still read as before (white on black: the same ground truth)
    assert all(torch.equal(a, colour[i]["mask"]) for i, a in enumerate(before))
    with Records("dataset.data") as logged:   # no masks read: nothing to say
        AnomalyDataset(root, "x", image_size=32, classification_only=True)
    assert logged == []


# ------------------------------------------------------------------------------------------------
# 5. validation data that cannot select


def train_config(tmp_path, root, clip_path, val_dataset, val_classes=None, **overrides):
    from utils.training import TrainConfig

    settings = dict(dataset="x", train_data_path=root, val_data_path=root,
                    val_dataset=val_dataset, val_classes=val_classes,
                    save_path=str(tmp_path / "run"), pretrained_path=clip_path,
                    features_list=[1, 2, 3, 4], image_size=32, batch_size=4, val_batch_size=4,
                    epochs=1, sample_num=1, num_workers=0, device="cpu", seed=5)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_validation_classes_that_cannot_select_are_refused_before_training(tiny_files,
                                                                          tmp_path):
    from utils.training import TrainingError, train

    root, meta = dataset_copy(tmp_path, classes=("pill", "wood", "mesh"), good=2, anomalous=2)
    test = meta["test"]
    only_normal = {"pill": [e for e in test["pill"] if e["anomaly"] == 0],
                   "wood": test["wood"]}
    write_meta(root, "vnormal", only_normal)
    empty = {"wood": [dict(e) for e in test["wood"]]}
    for path in glob.glob(os.path.join(root, "x", "wood", "ground_truth", "anomaly", "*.png")):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    write_meta(root, "vempty", empty)
    write_meta(root, "vanom", {"mesh": [e for e in test["mesh"] if e["anomaly"] == 1]})
    write_meta(root, "HeadCT", {"mesh": test["mesh"]})              # classification only
    cases = [("vnormal", "pill hold only normal images"),
             ("vempty", "wood all have empty masks"),
             ("vanom", "no class among mesh holds both normal and anomalous"),
             ("HeadCT", "has no masks")]
    for val_dataset, expected in cases:
        with pytest.raises(TrainingError) as info:
            train(train_config(tmp_path, root, tiny_files[0], val_dataset))
        line = str(info.value)
        assert "\n" not in line and expected in line and f"meta_{val_dataset}.json" in line
        assert not (tmp_path / "run").exists()                     # before anything is written


def test_train_py_refuses_validation_without_anomalies_in_one_line(tiny_files, tmp_path, capsys):
    import train as train_script

    root, meta = dataset_copy(tmp_path, classes=("pill", "wood"))
    write_meta(root, "vnormal", {"pill": [e for e in meta["test"]["pill"] if e["anomaly"] == 0]})
    code = train_script.main(["--dataset", "x", "--train_data_path", root, "--val_data_path",
                              root, "--val_dataset", "vnormal", "--pretrained_path",
                              tiny_files[0], "--features_list", "1", "2", "3", "4",
                              "--image_size", "32", "--batch_size", "4", "--num_workers", "0",
                              "--device", "cpu", "--save_path", str(tmp_path / "run")])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and "only normal images" in lines[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 10. a full disk or a read-only folder while saving checkpoints


@pytest.fixture
def small_model(tiny):
    return tiny[1]


def _assert_clean(folder, kept):
    assert sorted(p.name for p in folder.iterdir()) == kept


def test_a_failing_checkpoint_save_is_one_line_and_leaves_the_old_file(small_model, tmp_path,
                                                                       monkeypatch):
    import models.checkpoint as checkpoint
    from models.errors import OutputError

    path = tmp_path / "best.pth"
    checkpoint.save_checkpoint(small_model, str(path), stage=1)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_full(obj, handle, *args, **kwargs):
        real_save(obj, handle)                  # some bytes reach the temporary file, then:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_full)
    with pytest.raises(OutputError) as info:
        checkpoint.save_checkpoint(small_model, str(path), stage=2)
    line = str(info.value)
    assert "\n" not in line and str(path) in line and "free some space" in line
    assert "No space left on device" in line
    assert path.read_bytes() == before
    _assert_clean(tmp_path, ["best.pth"])
    monkeypatch.undo()

    # a real full device: the temporary file is /dev/full
    os.symlink("/dev/full", f"{path}.tmp{os.getpid()}")
    with pytest.raises(OutputError, match="No space left on device"):
        checkpoint.atomic_save({"x": torch.zeros(1000)}, str(path))
    assert path.read_bytes() == before
    _assert_clean(tmp_path, ["best.pth"])

    # a read-only folder (as for a user without write access), and a file in the way
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)

    def read_only(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).startswith(str(readonly)):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", read_only, raising=False)
    with pytest.raises(OutputError, match="Read-only file system") as info:
        checkpoint.atomic_save({"x": torch.zeros(3)}, str(readonly / "last.pth"))
    assert str(readonly / "last.pth") in str(info.value)
    readonly.chmod(0o755)
    assert list(readonly.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile"):
        checkpoint.atomic_save({"x": torch.zeros(3)}, str(tmp_path / "afile" / "last.pth"))


def test_torch_save_failing_as_a_runtime_error_is_one_line(tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as a RuntimeError (inline_container.cc),
    not an OSError: the same one line, no file left; other RuntimeErrors are not hidden."""
    import models.checkpoint as checkpoint
    from models.errors import OutputError

    def writer_fails(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", writer_fails)
    path = tmp_path / "last.pth"
    with pytest.raises(OutputError) as info:
        checkpoint.atomic_save({"x": torch.zeros(3)}, str(path))
    line = str(info.value)
    assert "\n" not in line and str(path) in line and "free some space" in line
    assert "inline_container.cc" in line and list(tmp_path.iterdir()) == []

    def other(obj, handle, *args, **kwargs):
        raise RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(checkpoint.torch, "save", other)
    with pytest.raises(RuntimeError, match="a bug"):
        checkpoint.atomic_save({"x": torch.zeros(3)}, str(path))
    assert list(tmp_path.iterdir()) == []


def test_train_py_on_a_full_disk_is_one_line(tiny_files, tmp_path, monkeypatch, capsys):
    import models.checkpoint as checkpoint
    import train as train_script

    def full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    root, _ = dataset_copy(tmp_path, classes=("pill", "wood"))
    save = tmp_path / "run"
    code = train_script.main(["--dataset", "x", "--train_data_path", root, "--val_data_path",
                              root, "--val_dataset", "x", "--val_classes", "pill",
                              "--pretrained_path", tiny_files[0], "--features_list", "1", "2",
                              "3", "4", "--image_size", "32", "--batch_size", "4",
                              "--val_batch_size", "4", "--sample_num", "1", "--epochs", "1",
                              "--num_workers", "0", "--device", "cpu", "--save_path",
                              str(save)])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "free some space" in lines[0] and str(save) in lines[0]
    assert not glob.glob(str(save / "*.pth*")) and not glob.glob(str(save / "*tmp*"))


# ------------------------------------------------------------------------------------------------
# 11. class names too long for the text tower


def prompt_positions(name: str) -> int:
    """Independently: the text positions of "X <name>" once "X" becomes the P + Q = 10 prompt
    vectors ([SOS] + tokens + [EOT] from the tokenizer with room to spare)."""
    from models.tokenizer import tokenize

    tokens = tokenize(["X " + name], context_length=1000)[0]
    return int((tokens != 0).sum()) + 10 - 1


def test_check_class_names_knows_the_limit(tiny):
    from models.errors import SettingsError

    _, model = tiny
    assert model.name_token_limit() == 65
    for words in ("word", "printed circuit", "zq", "a1b2c3"):
        for n in range(10, 80, 3):
            name = " ".join([words] * n)
            fits = prompt_positions(name) <= 77
            if fits:
                model.check_class_names([name, "bottle"])
            else:
                with pytest.raises(SettingsError) as info:
                    model.check_class_names(["bottle", name])
                line = str(info.value)
                assert "\n" not in line and "at most 65 tokens" in line
                assert repr(name[:20])[:-1] in line
    # the wording counts, not the key; non-text names are one line too
    model.wording = {"pcb9": " ".join(["printed circuit board"] * 30)}
    try:
        with pytest.raises(SettingsError, match="'pcb9' \\(worded 'printed circuit board"):
            model.check_class_names(["pcb9"])
    finally:
        model.wording = {}
    for bad in (None, 3):
        with pytest.raises(SettingsError, match="must be text"):
            model.check_class_names([bad])


def test_the_api_refuses_a_long_class_name_before_any_work(tiny, monkeypatch):
    from models import AnomalyDetector
    from models.errors import UserError

    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=1, layers=[1, 2, 3, 4])

    def never(*args):
        raise AssertionError("the image tower ran")

    monkeypatch.setattr(det, "encode_images", never)
    with pytest.raises(UserError, match="too long for the text tower"):
        det.predict(torch.zeros(2, 3, 32, 32), "zq" * 80)


def test_scripts_refuse_a_long_class_name_before_writing(tiny_files, tmp_path):
    import test as test_script

    long_folder = "qz" * 60                       # a folder name of 120 tokens
    images(tmp_path / "in" / long_folder, ["a.png"])
    for extra in ([], ["--class_name", "metal " * 70]):
        out = tmp_path / f"out{len(extra)}"
        proc = run(["predict.py", *weights(tiny_files), *TINY, "--input", tmp_path / "in",
                    "--out", out, *extra])
        lines = error_lines(proc.stderr)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and "too long for the text tower" in lines[0]
        assert not out.exists()

    root, meta = dataset_copy(tmp_path)
    for entry in meta["test"]["pill"]:
        entry["cls_name"] = long_folder
    write_meta(root, "x", {long_folder: meta["test"]["pill"]})
    out = tmp_path / "res"
    assert test_script.main(["--dataset", "x", "--data_path", root, *weights(tiny_files),
                             *TINY, "--save_path", str(out), "--num_workers", "0"]) == 1
    assert not out.exists()


def test_training_refuses_a_long_class_name_before_the_first_epoch(tiny_files, tmp_path):
    from models.errors import SettingsError
    from utils.training import train

    root, meta = dataset_copy(tmp_path, classes=("pill", "wood"))
    long_name = "zq" * 70
    test = meta["test"]
    for entry in test["wood"]:
        entry["cls_name"] = long_name
    test[long_name] = test.pop("wood")
    write_meta(root, "x", test)
    for val_classes in (["pill"], [long_name]):                   # training or validation
        with pytest.raises(SettingsError, match="too long for the text tower"):
            train(train_config(tmp_path, root, tiny_files[0], "x", val_classes))
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# 12. FIFOs, sockets and devices named like images


def special_files(folder):
    """fifo.png (a FIFO), sock.png (a socket) and zero.png (a link to /dev/zero) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    os.symlink("/dev/zero", folder / "zero.png")
    return server


def test_only_regular_files_are_found(tmp_path):
    from dataset.files import list_files
    from utils.discovery import collect_images, why_no_images

    src = tmp_path / "in"
    images(src, ["ok.png"])
    server = special_files(src)
    try:
        expected = [str(src / "ok.png")]
        for spec in (src, f"{src}/*.png", f"{src}/**"):
            assert [i.path for i in collect_images([str(spec)], "part")] == expected
        assert list_files(src) == [src / "ok.png"]
        for name, kind in (("fifo.png", "FIFO"), ("sock.png", "socket"),
                           ("zero.png", "character device")):
            unmatched = []
            assert collect_images([str(src / name)], "part", on_unmatched=unmatched.append) == []
            assert unmatched == [str(src / name)]
            assert why_no_images(str(src / name)) == (f"not a regular file but a {kind}: only "
                                                      f"regular files are read")
    finally:
        server.close()


def _finishes(function, seconds=20):
    """function() in a thread: (finished in time, its exception)."""
    outcome = {}

    def target():
        try:
            function()
        except BaseException as error:  # noqa: BLE001
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome.get("error")


def test_a_fifo_in_a_dataset_is_one_line_not_a_hang(tmp_path):
    from dataset.data import AnomalyDataset
    from dataset.errors import DatasetError
    from dataset.transforms import ImageReadError, read_image

    root, meta = dataset_copy(tmp_path)
    good = [i for i, e in enumerate(meta["test"]["pill"]) if e["anomaly"] == 0][0]
    path = os.path.join(root, meta["test"]["pill"][good]["img_path"])
    os.remove(path)
    os.mkfifo(path)
    dataset = AnomalyDataset(root, "x", image_size=32)
    done, error = _finishes(lambda: dataset[good])
    assert done and isinstance(error, DatasetError)         # in a dataset: a dataset error
    assert "FIFO, not a regular file" in str(error) and path in str(error)
    done, error = _finishes(lambda: read_image("/dev/zero"))
    assert done and isinstance(error, ImageReadError) and "character device" in str(error)


def test_predict_py_with_a_fifo_among_the_inputs_finishes(tiny_files, tmp_path):
    src = tmp_path / "in"
    images(src, ["ok.png"])
    server = special_files(src)
    try:
        out = tmp_path / "out"
        proc = run(["predict.py", *weights(tiny_files), *TINY, "--input", src, src / "fifo.png",
                    "--out", out], timeout=90)
        assert proc.returncode == 0, proc.stderr
        assert "not a regular file but a FIFO" in proc.stderr
        result = json.loads((out / "predictions.json").read_text())
        assert [r["path"] for r in result["predictions"]] == [str(src / "ok.png")]
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------
# 13. archive bombs


def deflated_copy(src, dst, inflate=None):
    """``src`` (a zip written by torch) rewritten with deflated entries; ``inflate``: the
    suffix of one entry whose bytes become 8 MiB of zeros (declared, compressed to ~8 KB)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if inflate and info.filename.endswith(inflate):
                data = bytes(8 << 20)
            zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED,
                          compresslevel=1)
    return str(dst)


@pytest.fixture
def no_loading(monkeypatch):
    """Every reader of tensors fails the test when called."""
    import models.checkpoint
    import models.torchscript_reader
    import models.weights
    import utils.training.state

    def never(*args, **kwargs):
        raise AssertionError("a tensor reader ran")

    for module in (models.checkpoint, models.weights, utils.training.state):
        monkeypatch.setattr(module.torch, "load", never)
    monkeypatch.setattr(models.weights.torch.jit, "load", never)
    monkeypatch.setattr(models.torchscript_reader, "_Unpickler", never)


def test_a_deflated_bomb_checkpoint_is_refused_before_reading(tmp_path, no_loading,
                                                             tiny_files):
    from models import AnomalyDetector
    from models.checkpoint import open_checkpoint
    from models.errors import WeightsError
    from utils.training.state import read_resume_state

    real = tmp_path / "real.pth"
    torch.save({"MyModel": {"w": torch.zeros(2 << 20)}}, real)   # 8 MiB of tensor
    bomb = deflated_copy(real, tmp_path / "bomb.pth")             # the same, deflated
    assert os.path.getsize(bomb) < 100_000
    for read in (open_checkpoint, read_resume_state,
                 lambda p: AnomalyDetector.from_files(tiny_files[0], p, device="cpu")):
        with pytest.raises(WeightsError) as info:
            read(bomb)
        line = str(info.value)
        assert "\n" not in line and bomb in line and "refused before reading" in line
        assert "data/0" in line and "8,388,608 bytes" in line


def test_a_deflated_bomb_clip_file_is_refused_before_reading(tmp_path, no_loading):
    from models.errors import WeightsError
    from models.torchscript_reader import UnsafeArchiveError, read_torchscript_state_dict
    from models.weights import load_clip, read_clip_state_dict
    from tests.clip_factory import TINY_GEOMETRY, make_clip_state_dict, write_torchscript

    sd = make_clip_state_dict(seed=0, **TINY_GEOMETRY)
    sd["visual.proj"] = torch.zeros(2048, 1024)                   # one 8 MiB tensor
    torch.save(sd, tmp_path / "sd.pt")
    write_torchscript(tmp_path / "ts.pt", sd)
    for source in ("sd.pt", "ts.pt"):
        bomb = deflated_copy(tmp_path / source, tmp_path / f"bomb_{source}")
        for read in (read_clip_state_dict, lambda p: load_clip(p, image_size=32)):
            with pytest.raises(WeightsError) as info:
                read(bomb)
            assert "CLIP file" in str(info.value) and bomb in str(info.value)
        with pytest.raises(UnsafeArchiveError, match="torch stores tensors uncompressed"):
            read_torchscript_state_dict(bomb)


def test_archive_bounds_many_entries_totals_and_legacy_files(tmp_path, monkeypatch):
    import models.checkpoint as checkpoint
    from models.archive_limits import archive_problem
    from models.errors import WeightsError

    # many small deflated entries, none above 1 MiB, 16 MiB declared in a few KB
    many = tmp_path / "many.pth"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(16):
            zf.writestr(f"many/data/{i}", bytes(1 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert "declares 16,777,216 bytes of entries" in archive_problem(many, 4 << 30)
    # stored entries within the file's size but above the limit of their kind
    stored = tmp_path / "stored.pth"
    torch.save({"MyModel": {"w": torch.zeros(100_000)}}, stored)
    assert archive_problem(stored, 4 << 30) is None
    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 100_000)
    with pytest.raises(WeightsError, match="more than the 100,000 bytes a weights file"):
        checkpoint.open_checkpoint(str(stored))
    # torch's legacy format: its size is the bound
    legacy = tmp_path / "legacy.pth"
    torch.save({"MyModel": {"w": torch.ones(100_000)}}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match=r"is [\d,]+ bytes, more than the 100,000"):
        checkpoint.open_checkpoint(str(legacy))
    monkeypatch.undo()
    assert torch.equal(checkpoint.read_checkpoint(str(legacy))["w"], torch.ones(100_000))


def test_files_torch_writes_and_honest_compression_still_load(tmp_path, tiny_files):
    from models.checkpoint import read_checkpoint
    from models.weights import read_clip_state_dict

    expected = torch.load(tiny_files[1], weights_only=True)["MyModel"]
    zipped = deflated_copy(tiny_files[1], tmp_path / "zipped.pth")     # ratio well below 10
    got = read_checkpoint(zipped)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    floats = tmp_path / "floats.pth"
    torch.save({"MyModel": {"w": torch.randn(600_000)}}, floats)       # 2.4 MB, deflated ~1.1x
    assert torch.equal(read_checkpoint(deflated_copy(floats, tmp_path / "fz.pth"))["w"],
                       read_checkpoint(str(floats))["w"])
    clip = read_clip_state_dict(tiny_files[0])
    assert len(clip) > 10
    shutil.copy(tiny_files[0], tmp_path / "clip.pt")
    assert read_clip_state_dict(deflated_copy(tmp_path / "clip.pt", tmp_path / "cz.pt")
                                ).keys() == clip.keys()
