"""The dataset tools around the converters: one error class, one image-extension list, the
registry as the source of dataset facts, safe replacement of an output folder (atomic swap,
recovery, lock), mask sizes checked against their images, and one-line CLI errors."""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import dataset.converters.common as common
from dataset import make_dataset, make_meta
from dataset.converters import CONVERTERS, mvtec, visa
from dataset.converters import DatasetError as ConvertersDatasetError
from dataset.errors import DatasetError
from dataset.files import IMAGE_EXTENSIONS, is_image_file, list_files
from dataset.registry import MVTEC_CLASSES, REGISTRY, VISA_CLASSES
from models.errors import UserError
from tests.test_converters import REPO, class_files, make_object, make_pos_neg, run, touch
from tests.test_make_meta import make_tree

KVASIR = ("png", "png", "png")


def python(code: str) -> str:
    """stdout of `python -c code` run from the repository root."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def write_sized(path: Path, width: int, height: int, grey: bool = False, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if grey else (height, width, 3)
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


# ----------------------------------------------------------------------------- one of each

def test_one_image_extension_list(tmp_path):
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib",
                                ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pbm",
                                ".pnm", ".tga")
    assert common.IMAGE_EXTS is IMAGE_EXTENSIONS
    assert all(is_image_file(name) for name in ("a.png", "B.JPG", "c.Jpeg", "d.BMP", "e.tif",
                                                "f.TIFF", "g.webp", Path("h/i.WebP"), "j.pgm",
                                                "k.GIF", "l.jfif"))
    assert not any(is_image_file(name) for name in ("a.txt", "png", ".png", "a.png.txt",
                                                    "b.svg", "c.heic"))
    for name in ("a.WEBP", "b.png", "notes.txt", ".c.png"):
        touch(tmp_path / name)
    assert [p.name for p in list_files(tmp_path)] == ["a.WEBP", "b.png"]


def test_every_image_extension_is_read_as_an_image(tmp_path):
    """Each extension of the list is a format Pillow writes and the readers read: the same
    pixels back (lossless formats) or the same size (JPEG)."""
    from PIL import Image

    from models.imaging import read_image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    formats = {".jpe": "JPEG", ".jfif": "JPEG", ".dib": "BMP", ".pgm": "PPM", ".pbm": "PPM",
               ".pnm": "PPM"}
    for ext in IMAGE_EXTENSIONS:
        path = tmp_path / f"image{ext}"
        mode = {".pgm": "L", ".pbm": "1"}.get(ext, "P" if ext == ".gif" else "RGB")
        image = Image.fromarray(rgb).convert(mode)
        image.save(path, format=formats.get(ext))
        read = read_image(str(path))
        assert read.size == (5, 6), ext
        if ext not in (".jpg", ".jpeg", ".jpe", ".jfif", ".webp"):
            assert np.array_equal(np.asarray(read.convert("RGB")),
                                  np.asarray(image.convert("RGB"))), ext


def test_files_module_needs_the_standard_library_only():
    loaded = python("import sys, dataset.files; print(sorted(m for m in sys.modules if "
                    "m.split('.')[0] in ('torch', 'numpy', 'cv2', 'PIL', 'models', 'dataset')))")
    # models.filekind (what kind of entry a path is) is standard library only too
    assert loaded == "['dataset', 'dataset.files', 'models', 'models.filekind']"


def test_make_meta_does_not_import_the_loader_or_opencv():
    assert python("import sys, dataset.make_meta; print('dataset.data' in sys.modules, "
                  "'cv2' in sys.modules, 'dataset.converters' in sys.modules)") == "False False False"


def test_one_dataset_error_class(tmp_path):
    assert common.DatasetError is DatasetError and ConvertersDatasetError is DatasetError
    assert issubclass(make_dataset.UnknownDatasetError, DatasetError)
    assert issubclass(DatasetError, UserError) and issubclass(DatasetError, ValueError)
    (tmp_path / "raw").mkdir()
    with pytest.raises(DatasetError) as raised:
        run("DTD", tmp_path / "raw", tmp_path / "data")       # no texture folders
    assert isinstance(raised.value, UserError)
    with pytest.raises(UserError):
        make_meta.make_meta(tmp_path, "nothing")


# ----------------------------------------------------------------------------- the registry

def test_registry_gives_classes_and_converters():
    assert mvtec.CLASSES is MVTEC_CLASSES and visa.CLASSES is VISA_CLASSES
    assert make_meta.FIXED_CLASSES == {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES}
    rows = [info for info in REGISTRY.values() if info.converter]
    assert list(CONVERTERS) == [info.name for info in rows]
    assert [module.__name__ for module in CONVERTERS.values()] == [
        f"dataset.converters.{info.converter}" for info in rows]


def test_make_meta_reads_classification_only_from_the_registry(tmp_path, monkeypatch):
    make_tree(tmp_path, "ISIC", {"skin": ["test/anomaly/ISIC_defect_1_000000.bmp"]})
    with pytest.raises(DatasetError, match="not found"):     # ISIC has masks
        make_meta.make_meta(tmp_path, "ISIC")
    monkeypatch.setitem(REGISTRY, "ISIC", replace(REGISTRY["ISIC"], classification_only=True))
    sample = make_meta.make_meta(tmp_path, "ISIC")["test"]["skin"][0]
    assert sample["mask_path"] == "ISIC/skin/ground_truth/anomaly/ISIC_defect_1_000000.png"


def test_summary_takes_paper_numbers_and_order_from_the_registry(monkeypatch):
    from utils import summary

    monkeypatch.setitem(REGISTRY, "BTAD", replace(REGISTRY["BTAD"], paper={"auroc_sp": 77.7}))
    table = summary.markdown({"BTAD": {"mean": {"auroc_sp": 0.5}},
                              "mvtec": {"mean": {"auroc_sp": 0.9}},
                              "Aaa": {"mean": {"auroc_sp": 0.1}}})
    assert "50.0 (paper 77.7)" in table and "90.0 (paper 92.3)" in table
    assert table.index("| mvtec |") < table.index("| BTAD |") < table.index("| Aaa |")


def test_test_sh_asks_the_registry(tmp_path):
    """test.sh evaluates the datasets the registry lists, each with the checkpoint it names."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1 $2" = "-m dataset.registry" ]; then
  if [ "${{3:-}}" = "--checkpoint" ]; then echo "ckpt_$4.pth"; else echo "alpha beta"; fi
  exit 0
fi
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), DATA=str(tmp_path / "data"),
               CLIP=str(tmp_path / "none.pt"), WEIGHTS=str(tmp_path / "w"), OUT=str(tmp_path / "o"))
    done = subprocess.run(["bash", str(REPO / "test.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode != 0
    missing = [line for line in done.stderr.splitlines() if line.startswith("missing:")]
    assert len(missing) == 5
    assert any(f"{tmp_path / 'w' / 'ckpt_beta.pth'} (for beta)" in line for line in missing)
    assert any("meta_alpha.json (alpha)" in line for line in missing)
    assert "mvtec" not in done.stderr and "train_visa" not in done.stderr


# ----------------------------------------------------------------------------- safe replacement

def converted_kvasir(tmp_path) -> tuple[Path, Path, Path]:
    """(raw source, output root, marker file inside the converted output)."""
    src, dst = tmp_path / "raw", tmp_path / "data"
    make_object(src, KVASIR, "{}.png")
    out = run("Kvasir", src, dst)
    return src, dst, touch(out / "colon" / "old.txt")


def leftovers(dst: Path) -> list:
    return sorted(name for name in os.listdir(dst) if name.startswith("."))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_overwrite_interrupted_between_the_two_renames_keeps_the_old_output(tmp_path, monkeypatch):
    src, dst, marker = converted_kvasir(tmp_path)
    out, staging = dst / "Kvasir", dst / ".Kvasir.partial"
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == staging and Path(target) == out:   # moving the new output in
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        run("Kvasir", src, dst, overwrite=True)
    assert marker.is_file() and len(class_files(dst, "Kvasir")) == 7
    assert leftovers(dst) == []                    # no staging, old copy or lock left
    monkeypatch.setattr(os, "rename", real_rename)
    run("Kvasir", src, dst, overwrite=True)
    assert not marker.exists() and len(class_files(dst, "Kvasir")) == 6


def test_next_run_repairs_a_killed_swap_and_a_stale_lock(tmp_path, caplog):
    src, dst, marker = converted_kvasir(tmp_path)
    out = dst / "Kvasir"
    # killed between the renames: the output renamed aside, the new one staged, the lock left
    os.rename(out, dst / ".Kvasir.old-1")
    older = touch(dst / ".Kvasir.old-2" / "colon" / "older.txt").parents[1]
    os.utime(older, (1, 1))                           # the older copy is removed, not restored
    touch(dst / ".Kvasir.partial" / "colon" / "new.txt")
    stale = dead_pid()
    (dst / ".Kvasir.lock").write_text(f"{stale} {socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="dataset.make_dataset"):
        with pytest.raises(DatasetError, match="Kvasir already exists: pass --overwrite"):
            run("Kvasir", src, dst)
    assert marker.is_file() and leftovers(dst) == []
    logged = caplog.text
    assert f"Took over the lock {dst / '.Kvasir.lock'} of process {stale}" in logged
    assert f"Restored {out} from {dst / '.Kvasir.old-1'}" in logged
    assert f"Removed {older}, the old output" in logged
    assert f"Removed {dst / '.Kvasir.partial'}, the unfinished output" in logged
    # killed after the second rename: the old copy beside the new output is removed
    touch(dst / ".Kvasir.old-3" / "x")
    run("Kvasir", src, dst, overwrite=True)
    assert leftovers(dst) == [] and not marker.exists()


@pytest.fixture
def live_lock(tmp_path):
    """A lock on `<tmp>/data/Kvasir` held by another process that runs."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock = tmp_path / "data" / ".Kvasir.lock"
    yield lock, holder.pid
    holder.kill()
    holder.wait()


def test_concurrent_conversions_give_one_line(tmp_path, live_lock, capsys):
    lock, pid = live_lock
    src, dst, marker = converted_kvasir(tmp_path)
    lock.write_text(f"{pid} {socket.gethostname()}\n")

    def message(owner):
        return (f"make_dataset: Output folder {dst / 'Kvasir'} is being written by another "
                f"make_dataset (process {owner}, lock file {lock}): wait for it to finish, or "
                f"delete the lock file if no conversion is running.")

    args = ["--dataset", "kvasir", "--src", str(src), "--dst", str(dst), "--overwrite"]
    assert make_dataset.main(args) == 1
    assert capsys.readouterr().err.splitlines() == [message(pid)]
    assert marker.is_file() and lock.read_text().split()[0] == str(pid)
    # a lock of another machine cannot be checked: it is respected
    lock.write_text(f"{dead_pid()} elsewhere\n")
    with pytest.raises(DatasetError, match=r"on elsewhere, lock file"):
        run("Kvasir", src, dst, overwrite=True)
    # the real thing: this process holds the lock while another one converts
    lock.unlink()
    with make_dataset.output_lock(dst, "Kvasir"):
        done = subprocess.run([sys.executable, "-m", "dataset.make_dataset", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [message(os.getpid())]
    assert marker.is_file() and not lock.exists()


# ----------------------------------------------------------------------------- mask sizes

def test_converters_reject_a_mask_of_another_size(tmp_path):
    src = tmp_path / "raw"
    make_object(src, KVASIR, "{}.png")
    image = write_sized(src / "object/test/defect/10.png", 48, 48)
    mask = write_sized(src / "object/ground_truth/defect/10.png", 96, 20, grey=True)
    with pytest.raises(DatasetError) as raised:
        run("Kvasir", src, tmp_path / "data")
    assert str(raised.value) == (
        f"Mask {mask} is 96 x 20 pixels but its image {image} is 48 x 48 (width x height): "
        f"replace the mask or the image with the file from the original download.")
    assert not (tmp_path / "data/Kvasir").exists()
    # the pos/neg releases too (a clean mask of a written neg image)
    pos_neg = tmp_path / "ksdd2"
    make_pos_neg(pos_neg, ["KSDD2-metal-defect-000001"], ["KSDD2-metal-null-000001"])
    write_sized(pos_neg / "neg/KSDD2-metal-null-000001.png", 16, 17, grey=True, value=0)
    with pytest.raises(DatasetError, match=r"KSDD2-metal-null-000001\.png is 16 x 17 pixels but "
                                           r"its image .*KSDD2-metal-null-000001\.jpg is 16 x 16"):
        run("KSDD2", pos_neg, tmp_path / "data")


def test_make_meta_rejects_a_mask_of_another_size(tmp_path, capsys):
    make_tree(tmp_path, "ColonDB", {"colon": []})
    image = write_sized(tmp_path / "ColonDB/colon/test/anomaly/ColonDB_defect_1_000000.bmp", 48, 48)
    mask = write_sized(tmp_path / "ColonDB/colon/ground_truth/anomaly/ColonDB_defect_1_000000.png",
                       96, 20, grey=True)
    message = (f"Mask {mask} is 96 x 20 pixels but its image {image} is 48 x 48 (width x height): "
               f"replace the mask or the image, or re-run the conversion.")
    with pytest.raises(DatasetError) as raised:
        make_meta.make_meta(tmp_path, "ColonDB")
    assert str(raised.value) == message
    assert make_meta.main(["--data_root", str(tmp_path), "--dataset", "colondb"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"make_meta: {message}"]
    assert not (tmp_path / "meta_ColonDB.json").exists()
    write_sized(mask, 48, 48, grey=True)
    assert make_meta.main(["--data_root", str(tmp_path), "--dataset", "colondb"]) == 0
    mask.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=f"Cannot read the image file {re.escape(str(mask))}"):
        make_meta.make_meta(tmp_path, "ColonDB")


# ----------------------------------------------------------------------------- one-line errors

def test_make_dataset_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    src = tmp_path / "raw"
    make_object(src, KVASIR, "{}.png")
    dst_file = touch(tmp_path / "data")
    assert make_dataset.main(["--dataset", "kvasir", "--src", str(src), "--dst", str(dst_file)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"make_dataset: Output root {dst_file} is a file, not a folder: choose another --dst."]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(make_dataset, "convert", interrupted)
    assert make_dataset.main(["--dataset", "kvasir", "--src", str(src)]) == 130
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("make_dataset: Interrupted; existing outputs")

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(make_dataset, "convert", unreadable)
    assert make_dataset.main(["--dataset", "kvasir", "--src", str(src)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"make_dataset: Cannot convert Kvasir: [Errno 13] Permission denied: '{src}'"]


def test_make_meta_cli_errors_are_one_line(tmp_path, capsys):
    make_tree(tmp_path, "Kvasir", {"colon": ["test/good/Kvasir_good_1_000000.bmp"]})
    (tmp_path / "meta_Kvasir.json").mkdir()
    assert make_meta.main(["--data_root", str(tmp_path), "--dataset", "kvasir"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"make_meta: {tmp_path / 'meta_Kvasir.json'} is a folder: move it away so the meta file "
        f"can be written."]
    (tmp_path / "meta_Kvasir.json").rmdir()
    assert make_meta.main(["--data_root", str(tmp_path), "--dataset", "kvasir"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["Kvasir", "meta_Kvasir.json"]   # no partial file


def test_synthetic_cli_errors_are_one_line(tmp_path, capsys):
    from dataset.synthetic import main

    out = touch(tmp_path / "file")
    assert main(["--out", str(out), "--classes", "pill", "--size", "32", "--standard"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
