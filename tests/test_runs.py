"""Runs that are stopped, run twice or at once (issue: no run that looks complete when it is
not, no lost results): test.py's incomplete result files, predict.py's CSV row by row, the
locks of both output folders, a rerun replacing the earlier run's files, the threshold and
class-name flags, calibration that never flags its own images."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import predict
import utils.evaluate as evaluate
import utils.inference as inference
from models import AnomalyDetector
from utils.cli import interrupt_on_sigterm
from tests.helpers import TINY, run_predict, run_test_py


def _test_py(tiny_files, root, out, *extra):
    return run_test_py(tiny_files, root, out, *extra)


def _predict(tiny_files, *extra):
    return run_predict(tiny_files, *extra)


def _images(folder, count, start=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(
            os.path.join(folder, f"{start + i}.png"))
    return str(folder)


def _rows(out):
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------- test.py

def test_an_interrupted_test_py_leaves_incomplete_files_and_says_so(tiny_files, synth_root,
                                                                    tmp_path, monkeypatch):
    real = evaluate.evaluate_class
    calls = []

    def stop_at_the_second_class(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_class", stop_at_the_second_class)
    out = tmp_path / "res"
    assert _test_py(tiny_files, synth_root, out, "--no_vis") == 130
    assert not (out / "results_synth.json").exists() and not (out / "results_synth.csv").exists()
    partial = json.loads((out / "results_synth.incomplete.json").read_text())
    assert partial["status"] == "incomplete"
    assert list(partial["classes"]) == [calls[0]]
    assert set(partial["classes_pending"]) == {"mesh", "pill", "wood"} - {calls[0]}
    # no mean row while classes are missing: it would read as the dataset's mean
    with open(out / "results_synth.incomplete.csv", newline="") as handle:
        assert [r["class"] for r in csv.DictReader(handle)] == [calls[0]]
    assert partial["mean"] is None
    log = (out / "test_synth.log").read_text()
    assert "interrupted" in log and "results_synth.incomplete.json" in log

    # a complete rerun replaces the incomplete files with the final ones
    monkeypatch.setattr(evaluate, "evaluate_class", real)
    assert _test_py(tiny_files, synth_root, out, "--no_vis") == 0
    final = json.loads((out / "results_synth.json").read_text())
    assert final["status"] == "complete" and final["classes_pending"] == []
    assert sorted(final["classes"]) == ["mesh", "pill", "wood"]
    assert not list(out.glob("*.incomplete.*"))


def test_sigterm_stops_like_ctrl_c():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                      # the signal arrives before this ends
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_during_test_py_leaves_its_results_marked(tiny_files, synth_root, tmp_path):
    """The real signal, in a subprocess stopped while its first class is being evaluated."""
    out = tmp_path / "res"
    clip, ckpt = tiny_files
    slow = tmp_path / "slow.py"               # a test.py whose second class takes a while
    slow.write_text(
        "import os, sys, time\nsys.path.insert(0, os.getcwd())\nimport utils.evaluate as e\nimport test\nreal = e.evaluate_class\n"
        "calls = []\n"
        "def slow(*a, **k):\n    calls.append(1)\n    if len(calls) == 2:\n"
        "        time.sleep(60)\n    return real(*a, **k)\n"
        "e.evaluate_class = slow\nsys.exit(test.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, str(slow), "--dataset", "synth", "--data_path",
                             synth_root, "--checkpoint_path", ckpt, "--pretrained_path", clip,
                             *TINY, "--num_workers", "0", "--save_path", str(out), "--no_vis"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "test_synth.log").exists() and time.time() < deadline:
            time.sleep(0.2)
        while not (out / "results_synth.incomplete.json").exists() and time.time() < deadline:
            time.sleep(0.2)                    # the first class is in, the second sleeps
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "results_synth.json").exists()
    partial = json.loads((out / "results_synth.incomplete.json").read_text())
    assert partial["status"] == "incomplete" and list(partial["classes"]) == ["mesh"]
    assert not (out / ".test.lock").exists()                  # the lock is released


def test_two_test_py_runs_never_share_a_folder(tiny_files, synth_root, tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".test.lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        assert _test_py(tiny_files, synth_root, out, "--no_vis") == 1
        assert "is being written by another test.py" in capsys.readouterr().err
        assert not (out / "results_synth.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # once that process is gone, its lock is taken over
    assert _test_py(tiny_files, synth_root, out, "--no_vis") == 0


def test_a_rerun_replaces_the_earlier_runs_pictures_and_log(tiny_files, synth_root, tmp_path):
    out = tmp_path / "res"
    assert _test_py(tiny_files, synth_root, out, "--classes", "pill", "wood") == 0
    pictures = out / "imgs" / "synth"
    assert (pictures / "pill").is_dir() and (pictures / "wood").is_dir()
    (pictures / "pill" / "notes.png").write_bytes(b"the user's file, no marker")
    first_log = (out / "test_synth.log").read_text()
    assert _test_py(tiny_files, synth_root, out, "--classes", "pill", "--no_vis") == 0
    # this run draws no pictures of pill: the earlier run's are gone, the user's file stays
    assert [p.name for p in (pictures / "pill").rglob("*") if p.is_file()] == ["notes.png"]
    assert (pictures / "wood").is_dir()                   # a class not evaluated now is kept
    log = (out / "test_synth.log").read_text()
    assert log.count("arguments:") == 1 and log != first_log
    assert "replaced the previous run's outputs" in log
    result = json.loads((out / "results_synth.json").read_text())
    assert list(result["classes"]) == ["pill"]


# ---------------------------------------------------------------------------------- predict.py

def test_an_interrupted_predict_py_keeps_every_scored_row(tiny_files, tmp_path, monkeypatch,
                                                          capsys):
    inputs = _images(tmp_path / "in", 5)
    real = inference.save_overlay
    written = []

    def stop_at_the_third(path, *args, **kwargs):
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(inference, "save_overlay", stop_at_the_third)
    out = tmp_path / "out"
    assert _predict(tiny_files, "--input", inputs, "--class_name", "pill", "--out",
                    str(out)) == 130
    assert "interrupted: the images scored so far" in capsys.readouterr().err
    rows = _rows(out)
    assert [r["path"] for r in rows] == [os.path.join(inputs, f"{i}.png") for i in range(2)]
    result = json.loads((out / "predictions.json").read_text())
    assert result["status"] == "interrupted" and result["summary"]["n_not_scored"] == 3
    assert len(result["predictions"]) == 2


def test_predict_py_interrupted_before_scoring_says_nothing_was_scored(tiny_files, tmp_path,
                                                                      monkeypatch, capsys):
    """Ctrl-C while the weights load, into the folder of a complete earlier run: nothing of
    this run was scored, and the earlier run's files are not called this run's."""
    inputs = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    args = ("--input", inputs, "--class_name", "pill", "--out", str(out))
    assert _predict(tiny_files, *args) == 0
    capsys.readouterr()

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "load_detector", stopped)
    assert _predict(tiny_files, *args) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was scored" in err and "scored so far" not in err
    assert json.loads((out / "predictions.json").read_text())["status"] == "complete"


def test_a_full_disk_during_predict_py_keeps_the_rows_already_scored(tiny_files, tmp_path,
                                                                     monkeypatch):
    inputs = _images(tmp_path / "in", 4)
    real = inference.save_rgb
    count = []

    def disk_full(path, image):
        count.append(path)
        if len(count) == 3:
            raise OSError(28, "No space left on device")
        return real(path, image)

    monkeypatch.setattr(inference, "save_rgb", disk_full)
    out = tmp_path / "out"
    assert _predict(tiny_files, "--input", inputs, "--class_name", "pill", "--out",
                    str(out)) == 1
    assert len(_rows(out)) == 2                             # written as they were scored
    assert json.loads((out / "predictions.json").read_text())["status"] == "interrupted"


def test_predict_py_row_log_survives_when_the_final_files_cannot_be_written(tmp_path):
    log = inference.RowLog(str(tmp_path / "predictions.csv"))
    log.add({"path": "a.png", "class_name": "x", "score": 0.5, "text_score": 0.4,
             "map_score": 0.6, "decision": None, "overlay": None})
    log.add({"path": "b.png", "class_name": "x", "error": "cannot read"})
    # another process reading the file now sees both rows, whole
    rows = _rows(tmp_path)
    assert [r["path"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["score"] == "0.5" and rows[1]["decision"] == "skipped"
    log.close()


def test_a_predict_rerun_replaces_its_overlays_and_two_never_share_a_folder(tiny_files,
                                                                           tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(tiny_files, "--input", _images(tmp_path / "a", 3), "--class_name", "pill",
                    "--out", str(out)) == 0
    assert len(list((out / "overlays").glob("*.png"))) == 3
    assert _predict(tiny_files, "--input", _images(tmp_path / "b", 1, start=10),
                    "--class_name", "pill", "--out", str(out)) == 0
    assert [p.name for p in (out / "overlays").glob("*.png")] == ["10.png"]
    assert len(_rows(out)) == 1
    assert "replaced the previous run's 5 file(s)" in capsys.readouterr().err
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".predict.lock").write_text(f"{holder.pid} {os.uname().nodename}\n")
        assert _predict(tiny_files, "--input", str(tmp_path / "b"), "--class_name", "pill",
                        "--out", str(out)) == 1
        assert "is being written by another predict.py" in capsys.readouterr().err
        assert [p.name for p in (out / "overlays").glob("*.png")] == ["10.png"]
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_that_predict_py_did_not_mark_is_never_cleared(tiny_files, tmp_path):
    out = tmp_path / "mine"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "keep.txt").write_text("the user's own file")
    assert _predict(tiny_files, "--input", _images(tmp_path / "a", 1), "--class_name", "pill",
                    "--out", str(out)) == 0
    assert (out / "overlays" / "keep.txt").read_text() == "the user's own file"


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "-1"], "--threshold: must be within 0..1"),
    (["--threshold", "1.5"], "--threshold: must be within 0..1"),
    (["--class_name", ""], "--class_name: must name the object"),
    (["--class_name", "   "], "--class_name: must name the object"),
    (["--fewshot_weight", "-1"], "--fewshot_weight: must be at least 0"),
])
def test_predict_py_bad_flags_are_one_line(tiny_files, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        _predict(tiny_files, "--input", _images(tmp_path / "a", 1), "--out",
                 str(tmp_path / "o"), *extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_calibration_never_flags_its_own_images(tiny_files, tmp_path, capsys):
    """The percentile-100 threshold is the largest good score, and the rule is strictly
    above it: a calibration image is never flagged. The same file as an image to score and a
    calibration image is refused in one line (the threshold must come from other images)."""
    good = _images(tmp_path / "good", 1, start=3)
    out = tmp_path / "out"
    assert _predict(tiny_files, "--input", good, "--class_name", "pill", "--calibrate", good,
                    "--out", str(out), "--no_overlay") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is both an image to score (--input) and a known-good" in err[0]
    assert not out.exists()
    clip_path, ckpt_path = tiny_files
    det = AnomalyDetector.from_files(clip_path, ckpt_path, image_size=32, device="cpu",
                                     sample_num=2, layers=[1, 2, 3, 4])
    paths = [os.path.join(good, "3.png")]
    score = inference.predict_images(det, paths, "pill", seed=111)[0]["score"]
    threshold = inference.calibrate_threshold([score], 100.0)
    assert threshold == score and inference.decide(score, threshold) == "normal"
    assert inference.decide(0.5, 0.5) == "normal" and inference.decide(0.5000001, 0.5) \
        == "anomalous"
