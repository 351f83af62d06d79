"""The user's files under the scripts' outputs (dataset/outputs.py): nothing of the user's is
written over or deleted, a rerun that fails keeps the earlier run's complete results, a refused
run marks nothing, and the cases of the hostile round each stay fixed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import export
import train as train_script
from dataset.outputs import (clear_own, is_marked_png, is_own_checkpoint, is_own_file,
                             marked_png)
from tests.clip_factory import TINY_LAYERS
from tests.helpers import run_predict, run_test_py
from utils.discovery import ImageItem, overlay_names
from utils.pictures import _sigint_ignored, picture_names


def _images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(path)
    return str(folder)


def _test_py(tiny_files, root, out, *extra):
    return run_test_py(tiny_files, root, out, *extra)


def _predict(tiny_files, *extra):
    return run_predict(tiny_files, *extra)


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("error") or " ERROR " in line]
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------------- the marker


def test_the_marker_of_each_kind_of_file(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (4, 3)).save(png)
    assert not is_marked_png(str(png)) and not is_own_file(str(png))
    png.write_bytes(marked_png(png.read_bytes()))
    assert is_marked_png(str(png)) and is_own_file(str(png))
    with Image.open(png) as image:                           # still a valid PNG
        assert image.size == (4, 3) and image.info["Software"] == "Bayes-PFL"
    (tmp_path / "r.json").write_text(json.dumps({"written_by": "Bayes-PFL", "x": 1}))
    (tmp_path / "u.json").write_text(json.dumps({"x": 1}))
    assert is_own_file(str(tmp_path / "r.json")) and not is_own_file(str(tmp_path / "u.json"))
    torch.save({"MyModel": {}, "provenance": {}}, tmp_path / "own.pth")
    torch.save({"MyModel": {}}, tmp_path / "released.pth")
    (tmp_path / "text.pth").write_text("precious")
    assert is_own_checkpoint(str(tmp_path / "own.pth"))
    assert not is_own_file(str(tmp_path / "released.pth"))
    assert not is_own_file(str(tmp_path / "text.pth"))
    os.symlink(tmp_path / "own.pth", tmp_path / "link.pth")
    assert not is_own_file(str(tmp_path / "link.pth"))      # a link is never the project's


def test_clear_own_keeps_the_users_files_and_a_failed_removal_is_one_line(tmp_path,
                                                                         monkeypatch):
    folder = tmp_path / "overlays"
    folder.mkdir()
    own = folder / "x.png"
    own.write_bytes(marked_png(_png()))
    (folder / "mine.png").write_bytes(b"the user's")
    removed, kept = clear_own([str(folder)], str(tmp_path))
    assert removed == ["overlays/x.png"] and kept == ["overlays/mine.png"]
    assert (folder / "mine.png").read_bytes() == b"the user's"
    own.write_bytes(marked_png(_png()))

    def denied(path):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(os, "remove", denied)
    from models.errors import OutputError

    with pytest.raises(OutputError, match=r"^cannot remove .*x\.png, an earlier run's file "
                                          r"\(Operation not permitted\)"):
        clear_own([str(folder)], str(tmp_path))


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


# -------------------------------------------------------------------------------- picture names


def test_picture_names_stay_unique_against_names_like_the_digests():
    """Images sharing a stem get digits of their path's digest; an image whose own name equals
    such a name (x_<digits>.png) makes them take more: no picture replaces another."""
    samples = [{"img_path": p, "cls_name": "c", "specie_name": "good"}
               for p in ("/d/a/x.png", "/d/b/x.png")]
    first = picture_names(samples)
    crafted = [{"img_path": "/d/" + os.path.basename(n), "cls_name": "c",
                "specie_name": "good"} for n in first.values()]
    names = picture_names(samples + crafted)
    assert len({n.lower() for n in names.values()}) == 4


def test_overlay_names_never_make_a_file_where_a_folder_is_needed():
    items = [ImageItem("a", "c", "x.jpg"), ImageItem("b", "c", "x.png/y.png"),
             ImageItem("c", "c", "A.png"), ImageItem("d", "c", "a.jpg")]
    assert overlay_names(items) == ["x.jpg.png", "x.png/y.png", "A.png", "a.jpg.png"]


# ------------------------------------------------------------------------------------- test.py


def test_a_failing_rerun_keeps_the_complete_results(tiny_files, synth_root, tmp_path,
                                                    monkeypatch, capsys):
    """A rerun that fails after the first class (an unreadable image) keeps the earlier run's
    complete result files; a complete rerun then replaces them."""
    import utils.evaluate as evaluate

    out = tmp_path / "res"
    assert _test_py(tiny_files, synth_root, out, "--no_vis") == 0
    before = (out / "results_synth.json").read_text()
    real = evaluate.evaluate_class
    calls = []

    def fail_at_the_second_class(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            from dataset.errors import DatasetError

            raise DatasetError("cannot read image x.png")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_class", fail_at_the_second_class)
    assert _test_py(tiny_files, synth_root, out, "--no_vis", "--seed", "5") == 1
    assert (out / "results_synth.json").read_text() == before
    assert (out / "results_synth.incomplete.json").is_file()
    monkeypatch.setattr(evaluate, "evaluate_class", real)
    assert _test_py(tiny_files, synth_root, out, "--no_vis", "--seed", "5") == 0
    after = json.loads((out / "results_synth.json").read_text())
    assert after["settings"]["seed"] == 5 and not list(out.glob("*.incomplete.*"))
    # a flag refused before anything: nothing removed, no traceback
    with pytest.raises(SystemExit):
        _test_py(tiny_files, synth_root, out, "--num_workers", "-1")
    assert "--num_workers: must be at least 0" in capsys.readouterr().err
    assert (out / "results_synth.json").is_file()


def test_a_refused_test_py_run_marks_nothing(tiny_files, synth_root, tmp_path, capsys):
    """A --save_path holding a file of the user's at an output name is refused before the
    folder is marked as an output folder (which would hide the user's images as pictures)."""
    proj = tmp_path / "proj"
    _images(proj / "imgs" / "part", ["p0.png", "p1.png"])
    (proj / "results_synth.csv").write_text("the user's table\n")
    assert _test_py(tiny_files, synth_root, proj, "--no_vis") == 1
    assert "holds results_synth.csv" in _one_error(capsys)
    assert sorted(p.name for p in proj.iterdir()) == ["imgs", "results_synth.csv"]
    assert _predict(tiny_files, "--input", str(proj / "imgs"), "--class_name", "part",
                    "--out", str(tmp_path / "out"), "--no_overlay") == 0


def test_repeated_seeds_are_refused(tiny_files, synth_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _test_py(tiny_files, synth_root, tmp_path / "o", "--seeds", "1", "1")
    assert "--seeds repeats 1" in capsys.readouterr().err


def test_an_interrupt_before_any_class_says_nothing_was_written(tiny_files, synth_root,
                                                               tmp_path, monkeypatch, capsys):
    import utils.evaluate as evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_class", interrupted)
    assert _test_py(tiny_files, synth_root, tmp_path / "o", "--no_vis") == 130
    assert "interrupted before any class was evaluated" in capsys.readouterr().err


def test_picture_workers_start_with_ctrl_c_ignored():
    """The workers inherit SIGINT ignored while they start (a Ctrl-C during their start-up
    once printed one traceback per worker); the main thread's handler is restored after."""
    before = signal.getsignal(signal.SIGINT)
    with _sigint_ignored():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_sigint_ignored().__enter__()))
    thread.start()
    thread.join()                          # outside the main thread: nothing to change
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------------- predict.py


def test_a_reference_among_the_scored_images_is_refused(tiny_files, tmp_path, capsys):
    src = _images(tmp_path / "in", ["a0.png", "a1.png"])
    assert _predict(tiny_files, "--input", src, "--class_name", "part", "--reference",
                    os.path.join(src, "a0.png"), "--out", str(tmp_path / "o")) == 2
    assert "is both an image to score (--input) and a reference" in _one_error(capsys)
    assert not (tmp_path / "o").exists()


def test_a_hard_link_between_inputs_and_calibration_is_refused(tiny_files, tmp_path, capsys):
    good = _images(tmp_path / "good", ["g0.png", "g1.png"])
    src = _images(tmp_path / "in", ["p0.png"], seed=3)
    os.link(os.path.join(good, "g1.png"), os.path.join(src, "hard.png"))
    assert _predict(tiny_files, "--input", src, "--class_name", "part", "--calibrate", good,
                    "--out", str(tmp_path / "o"), "--no_overlay") == 2
    assert "is both an image to score (--input) and a known-good" in _one_error(capsys)


def test_a_file_and_a_folder_of_one_name_both_get_overlays(tiny_files, tmp_path):
    src = _images(tmp_path / "in", ["x.jpg", "x.png/y.png"])
    out = tmp_path / "o"
    assert _predict(tiny_files, "--input", src, "--class_name", "part", "--out", str(out)) == 0
    result = json.loads((out / "predictions.json").read_text())
    assert result["status"] == "complete" and result["summary"]["n_images"] == 2
    assert sorted(os.path.relpath(r["overlay"], out) for r in result["predictions"]) == [
        "overlays/x.jpg.png", "overlays/x.png/y.png"]


def test_percentile_without_calibrate_is_refused(tiny_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _predict(tiny_files, "--input", str(tmp_path), "--percentile", "50")
    assert "--percentile applies to --calibrate only" in capsys.readouterr().err


def test_a_rerun_into_a_folder_of_the_users_own_files_keeps_them(tiny_files, tmp_path, capsys):
    src = _images(tmp_path / "in", ["a.png"])
    out = tmp_path / "o"
    assert _predict(tiny_files, "--input", src, "--class_name", "part", "--out", str(out)) == 0
    (out / "overlays" / "mine.png").write_bytes(b"the user's own picture")
    (out / "notes.txt").write_text("the user's notes")
    assert _predict(tiny_files, "--input", src, "--class_name", "part", "--out", str(out)) == 0
    assert (out / "overlays" / "mine.png").read_bytes() == b"the user's own picture"
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert "kept 1 file(s) in --out" in capsys.readouterr().err
    # an output landing on a file of the user's: refused before anything is removed
    (out / "overlays" / "a.png").write_bytes(b"the user's a.png")
    assert _predict(tiny_files, "--input", src, "--class_name", "part", "--out", str(out)) == 1
    assert "holds overlays/a.png, which a run would write over" in _one_error(capsys)
    assert (out / "overlays" / "a.png").read_bytes() == b"the user's a.png"
    assert (out / "predictions.json").is_file()


def test_bad_exif_data_is_read_as_stored(tmp_path, caplog):
    from models.imaging import read_image

    path = tmp_path / "bad.png"
    Image.new("RGB", (5, 4)).save(path, exif=b"Exif\x00\x00garbage that is not a TIFF header")
    image = read_image(str(path), exif_transpose=True)
    assert image.size == (5, 4)


# ------------------------------------------------------------------------- train.py, export.py


def test_overwrite_never_deletes_a_file_train_py_did_not_write(tiny_files, synth_root, tmp_path,
                                                              capsys):
    save = tmp_path / "run"
    save.mkdir()
    (save / "epoch_post_7_2.pth").write_text("precious")
    code = train_script.main(["--dataset", "synth", "--train_data_path", synth_root,
                              "--val_data_path", synth_root, "--val_dataset", "synth",
                              "--val_classes", "pill", "--pretrained_path", tiny_files[0],
                              "--features_list", *map(str, TINY_LAYERS), "--image_size", "32",
                              "--batch_size", "4", "--epochs", "1", "--num_workers", "0",
                              "--device", "cpu", "--save_path", str(save), "--overwrite"])
    assert code == 2
    assert "--overwrite would delete" in capsys.readouterr().err
    assert (save / "epoch_post_7_2.pth").read_text() == "precious"
    with pytest.raises(SystemExit):
        train_script.main(["--stop_after", "0"])


def test_export_fewshot_weight_without_references_is_refused(tiny_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export.main(["--pretrained_path", tiny_files[0], "--checkpoint_path", tiny_files[1],
                     "--class_name", "x", "--out", str(tmp_path / "x.onnx"),
                     "--fewshot_weight", "2"])
    assert "--fewshot_weight applies to the few-shot mode only" in capsys.readouterr().err


def test_normal_entries_naming_a_mask_give_one_warning(tmp_path, caplog):
    from dataset.data import AnomalyDataset
    from dataset.synthetic import write_standard

    root = str(tmp_path)
    write_standard(root, name="w", classes=["pill"], size=32, n_train=0, n_test_good=2,
                   n_test_anomaly=2)
    meta_file = tmp_path / "meta_w.json"
    meta = json.loads(meta_file.read_text())
    anomalous = next(e for e in meta["test"]["pill"] if e["anomaly"])
    for entry in meta["test"]["pill"]:
        if not entry["anomaly"]:
            entry["mask_path"] = anomalous["mask_path"]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        AnomalyDataset(root, "w", image_size=32)
    said = {r.getMessage() for r in caplog.records if "name a mask" in r.getMessage()}
    assert len(said) == 1 and "2 normal entries" in next(iter(said))
    shutil.rmtree(tmp_path / "w")
