"""No silent failure, no lost run: divergence, run folders, outputs, bad input on every entry
point. Tiny random weights and synthetic data; the scripts run as a user runs them."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from dataset.files import OUTPUT_MARKER
from dataset.synthetic import write_standard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth(synth_root):
    return synth_root


def run(args, cwd=ROOT, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, **kwargs)


def one_line(proc) -> str:
    """The one error line of a failed script run (no traceback)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines()
             if not line.startswith(("usage:", " ")) and "%|" not in line]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def train_args(synth, clip_path, save, *extra):
    return ["train.py", "--dataset", "synth", "--train_data_path", synth, "--val_data_path",
            synth, "--val_dataset", "synth", "--val_classes", "pill", "--pretrained_path",
            clip_path, "--features_list", "1", "2", "3", "4", "--image_size", "32",
            "--batch_size", "4", "--val_batch_size", "4", "--sample_num", "2", "--num_workers",
            "0", "--device", "cpu", "--save_path", save, *extra]


# ------------------------------------------------------------------------------------------------
# 1. divergence never looks like success


def test_divergence_stops_training_with_one_line(synth, tiny_files, tmp_path):
    save = tmp_path / "run"
    proc = run(train_args(synth, tiny_files[0], save, "--epochs", "3",
                          "--learning_rate_linear", "1e3", "--learning_rate_prompt", "1e3",
                          "--learning_rate_PFL", "1e3", "--temperature_lr", "1e3"))
    line = one_line(proc)
    assert proc.returncode == 2 and "not finite" in line and "epoch" in line
    assert "diverged" in line and "step" in line or "validation" in line
    # whatever was written before holds finite numbers only
    for path in glob.glob(str(save / "*.pth")):
        state = torch.load(path, weights_only=True)
        tensors = state.get("MyModel") or state["model"]
        assert all(torch.isfinite(t).all() for t in tensors.values()), path


def test_nan_never_counts_as_an_improvement():
    from utils.training import StageController

    c = StageController(patience=3)
    assert c.update(1, 0.2, 0.0).improved
    assert not c.update(2, float("nan"), 0.0).improved
    assert c.best[1] == 0.2


def test_checkpoints_with_non_finite_values_are_refused(tiny, tiny_files, tmp_path):
    from models import AnomalyDetector
    from models.checkpoint import save_checkpoint
    from models.errors import WeightsError

    clip, model = tiny
    broken = tmp_path / "best.pth"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["RCA.linear_proj.0.weight"][0, 0] = float("nan")
    model_copy = type(model).from_clip(clip, layers=[1, 2, 3, 4])
    model_copy.load_state_dict(state)
    save_checkpoint(model_copy, str(broken), stage=2)
    with pytest.raises(WeightsError, match="non-finite") as info:
        AnomalyDetector.from_files(tiny_files[0], str(broken), device="cpu")
    assert str(broken) in str(info.value) and "\n" not in str(info.value)

    img = tmp_path / "in"
    write_standard(str(tmp_path / "d"), name="x", size=32, classes=["pill"], n_train=0,
                   n_test_good=1, n_test_anomaly=1)
    img = glob.glob(str(tmp_path / "d" / "x" / "pill" / "test" / "good" / "*.bmp"))[0]
    proc = run(["predict.py", "--pretrained_path", tiny_files[0], "--checkpoint_path", broken,
                "--input", img, "--out", tmp_path / "pred", "--no_progress"])
    assert "non-finite" in one_line(proc) and proc.returncode == 1
    proc = run(["test.py", "--dataset", "x", "--data_path", tmp_path / "d", "--checkpoint_path",
                broken, "--pretrained_path", tiny_files[0], "--save_path", tmp_path / "res",
                "--no_progress", "--pro", "off"])
    assert proc.returncode == 1 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# 2. a run folder is never overwritten by accident; 11. resuming


def config(synth, clip_path, save, **overrides):
    from utils.training import TrainConfig

    settings = dict(dataset="synth", train_data_path=synth, val_data_path=synth,
                    val_dataset="synth", val_classes=["pill"], save_path=str(save),
                    pretrained_path=clip_path, features_list=[1, 2, 3, 4], image_size=32,
                    batch_size=4, val_batch_size=4, epochs=2, sample_num=2, num_workers=0,
                    device="cpu", seed=5)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(synth, tiny_files,
                                                                       tmp_path):
    from utils.training import TrainingError, train

    save = tmp_path / "run"
    train(config(synth, tiny_files[0], save, epochs=1))
    before = {p.name: p.stat().st_mtime_ns for p in save.iterdir()}
    with pytest.raises(TrainingError, match="holds a run") as info:
        train(config(synth, tiny_files[0], save, epochs=1))
    assert "--resume" in str(info.value) and "--overwrite" in str(info.value)
    assert {p.name: p.stat().st_mtime_ns for p in save.iterdir()} == before   # untouched

    # --overwrite deletes only files a run wrote: a file of another origin stops it
    (save / "epoch_post_9_2.pth").write_bytes(b"not written by train.py")
    with pytest.raises(TrainingError, match="--overwrite would delete .*epoch_post_9_2.pth"):
        train(config(synth, tiny_files[0], save, epochs=1, overwrite=True))
    assert (save / "epoch_post_9_2.pth").read_bytes() == b"not written by train.py"
    import shutil

    shutil.copy(save / "epoch_post_1_1.pth", save / "epoch_post_9_2.pth")   # a run's own file
    (save / "last.pth.tmp4242").write_bytes(b"left by a kill")
    train(config(synth, tiny_files[0], save, epochs=1, overwrite=True))
    names = sorted(p.name for p in save.iterdir())
    assert "epoch_post_9_2.pth" not in names and "last.pth.tmp4242" not in names
    assert names == [OUTPUT_MARKER, "best.pth", "epoch_post_1_1.pth", "last.pth", "train.log"]
    assert (save / "train.log").read_text().count("arguments:") == 1


def test_two_trainings_never_write_one_folder(synth, tiny_files, tmp_path):
    from utils.training import TrainingError, train

    save = tmp_path / "run"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (save / ".train.lock").write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(TrainingError, match="being written by another train.py"):
            train(config(synth, tiny_files[0], save, epochs=1))
        # nothing but the output folder's marker (make_output_folder, before the lock)
        assert sorted(p.name for p in save.iterdir()) == [OUTPUT_MARKER, ".train.lock"]
    finally:
        holder.kill()
        holder.wait()
    train(config(synth, tiny_files[0], save, epochs=1))       # a dead holder's lock is taken
    assert not (save / ".train.lock").exists()


def test_resume_refuses_other_settings_and_a_copy_reports_its_own_paths(synth, tiny_files,
                                                                        tmp_path):
    import shutil

    from utils.training import TrainingError, train

    save = tmp_path / "run"
    train(config(synth, tiny_files[0], save, epochs=3, stop_after=1))
    last = str(save / "last.pth")
    for change in (dict(epochs=5), dict(image_size=64), dict(features_list=[1, 2, 3])):
        with pytest.raises(TrainingError, match="other settings") as info:
            train(config(synth, tiny_files[0], save, **{"epochs": 3, "resume": last, **change}))
        assert f"--{next(iter(change))}" in str(info.value)
    copy = tmp_path / "copy"
    shutil.copytree(save, copy)
    result = train(config(synth, tiny_files[0], copy, epochs=3, resume=str(copy / "last.pth"),
                          num_workers=1))
    assert result.epochs_run == 3
    assert all(p.startswith(str(copy)) for p in result.checkpoints + [result.best_path])
    assert all(os.path.isfile(p) for p in result.checkpoints)


# ------------------------------------------------------------------------------------------------
# 3. the demo removes only what it wrote; 10. its settings are checked before any work


def test_demo_replaces_only_its_own_output(tmp_path, capsys):
    import demo

    foreign = tmp_path / "mine"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "precious.txt").write_text("not the demo's")
    assert demo.main(["--out", str(foreign), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not write" in err[0] and str(foreign) in err[0]
    assert (foreign / "data" / "precious.txt").read_text() == "not the demo's"

    own = tmp_path / "demo"
    demo.claim_output(str(own))                     # a first run marks the folder as its own
    (own / "data").mkdir()
    (own / "data" / "old.bmp").write_bytes(b"from the last demo run")
    (own / "notes.txt").write_text("the user's")
    demo.claim_output(str(own))                     # the next run replaces its folders only
    assert not (own / "data").exists() and (own / "notes.txt").read_text() == "the user's"

    for flags in (["--epochs", "0"], ["--n_anomalous", "0"], ["--patience", "-1"]):
        assert demo.main(["--out", str(tmp_path / "never"), *flags]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()        # checked before any work


# ------------------------------------------------------------------------------------------------
# 6. predict.py: --out inside --input, nothing readable, a NaN threshold


def _images(folder, names, size=24):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 255, (size, size, 3)).astype(np.uint8)).save(path)


def test_predict_out_overlapping_an_input_is_one_line_and_writes_nothing(tiny_files, tmp_path,
                                                                        capsys):
    """An --out that is the input folder, lies inside it or holds it: one line before anything
    is written (the overlays once landed on the user's images); apart, every image is scored."""
    import predict

    import json

    weights = ["--pretrained_path", tiny_files[0], "--checkpoint_path", tiny_files[1],
               "--image_size", "32", "--features_list", "1", "2", "3", "4", "--sample_num", "1",
               "--no_progress"]
    for k, sub in enumerate((".", "a", "results")):
        src = tmp_path / f"in{k}"
        _images(src, ["x.png", "y.png", "a/1.png", "a/2.png", "b/3.png", "b/4.png", "c/5.png"])
        before = sorted(p for p in src.rglob("*"))
        out = src / sub
        assert predict.main([*weights, "--input", str(src), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        relation = "is" if sub == "." else "lies inside"
        assert len(err) == 1 and f"--out {out} {relation} the input folder {src}" in err[0], err
        assert sorted(p for p in src.rglob("*")) == before
    # an --out holding the input folder, and one holding an input file
    src = tmp_path / "in0"
    assert predict.main([*weights, "--input", str(src), "--out", str(tmp_path)]) == 1
    assert f"holds the input folder {src}" in capsys.readouterr().err
    assert predict.main([*weights, "--input", str(src / "x.png"), "--out", str(src)]) == 1
    assert f"holds the input file {src / 'x.png'}" in capsys.readouterr().err
    out = tmp_path / "apart"
    assert predict.main([*weights, "--input", str(src), "--out", str(out)]) == 0
    assert json.loads((out / "predictions.json").read_text())["summary"]["n_images"] == 7
    assert len(list((out / "overlays").rglob("*.png"))) == 7


def test_predict_nothing_readable_and_nan_threshold_fail(tiny_files, tmp_path, capsys):
    import predict

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"not an image")
    (src / "b.jpg").write_bytes(b"nor this")
    weights = ["--pretrained_path", tiny_files[0], "--checkpoint_path", tiny_files[1],
               "--image_size", "32", "--features_list", "1", "2", "3", "4", "--no_progress"]
    assert predict.main([*weights, "--input", str(src), "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "none of the 2 images could be read" in err[0]
    for value in ("nan", "inf"):
        proc = run(["predict.py", *weights, "--input", src, "--threshold", value])
        assert proc.returncode == 2 and "finite" in one_line(proc)


# ------------------------------------------------------------------------------------------------
# 7. results before pictures; 12. a failing test.py writes nothing


def test_results_are_written_before_the_pictures(tiny_files, synth, tmp_path, monkeypatch,
                                                 capsys):
    import test as test_script
    import utils.pictures as pictures
    from tests.picture_faults import disk_full

    monkeypatch.setattr(pictures, "save_rgb", disk_full)     # what the picture processes use
    out = tmp_path / "res"
    code = test_script.main(["--dataset", "synth", "--data_path", synth, "--checkpoint_path",
                             tiny_files[1], "--pretrained_path", tiny_files[0], "--image_size",
                             "32", "--features_list", "1", "2", "3", "4", "--sample_num", "1",
                             "--save_path", str(out), "--no_progress", "--num_workers", "0"])
    assert code == 1
    import json

    saved = json.loads((out / "results_synth.json").read_text())
    assert "mesh" in saved["classes"]                        # the first class's metrics kept
    err = capsys.readouterr().err
    assert (f"cannot write the pictures under {out / 'imgs' / 'synth'} (No space left on "
            f"device): free "
            f"some space or pass --no_vis") in err and "Traceback" not in err


def test_a_failing_test_py_leaves_no_file(tiny_files, synth, tmp_path):
    proc = run([os.path.join(ROOT, "test.py"), "--dataset", "synth", "--data_path", synth,
                "--checkpoint_path", tmp_path / "missing.pth", "--pretrained_path",
                tiny_files[0], "--no_progress"], cwd=tmp_path)
    assert proc.returncode == 1 and "missing.pth" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == []                # no results/, no log file


# ------------------------------------------------------------------------------------------------
# 8. the worker count changes nothing; 9. a class's row does not depend on the other classes


def test_training_does_not_depend_on_the_worker_count(synth, tiny_files, tmp_path):
    from utils.training import train

    runs = [train(config(synth, tiny_files[0], tmp_path / f"w{w}", epochs=2, num_workers=w))
            for w in (0, 2)]
    assert [r["losses"] for r in runs[0].history] == [r["losses"] for r in runs[1].history]
    a, b = runs[0].model.state_dict(), runs[1].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_class_row_does_not_depend_on_the_other_classes(tiny_files, synth, tmp_path):
    import json

    import test as test_script

    def evaluate(name, *extra):
        out = tmp_path / name
        assert test_script.main(["--dataset", "synth", "--data_path", synth, "--checkpoint_path",
                                 tiny_files[1], "--pretrained_path", tiny_files[0],
                                 "--image_size", "32", "--features_list", "1", "2", "3", "4",
                                 "--sample_num", "2", "--save_path", str(out), "--no_progress",
                                 "--num_workers", "0", "--no_vis", "--pro", "off", *extra]) == 0
        return json.loads((out / "results_synth.json").read_text())["classes"]

    everything = evaluate("all")
    alone = evaluate("wood", "--classes", "wood")
    assert alone["wood"] == everything["wood"]                   # bit for bit
    # at other batch sizes (batches then mix classes) the same to float32 rounding: each
    # metric inside the interval that this noise allows (tests/noise.py)
    from tests.noise import api_outputs, assert_batchings_agree

    pair = evaluate("pair", "--classes", "wood", "pill", "--batch_size", "3")
    alone_api = api_outputs(tiny_files, synth, "synth", 1, 111)
    pair_api = api_outputs(tiny_files, synth, "synth", 3, 111, classes=["wood", "pill"])
    for name in ("wood", "pill"):
        assert_batchings_agree({1: everything[name], 3: pair[name]},
                               {1: alone_api[name][111], 3: pair_api[name][111]}, "synth",
                               pro="off", where=name)


# ------------------------------------------------------------------------------------------------
# 10. one line for every bad setting


@pytest.mark.parametrize("extra,expected", [
    (["--batch_size", "0"], "--batch_size"),
    (["--sample_num", "0"], "--sample_num"),
    (["--features_list", "1", "2", "3", "9"], "outside the CLIP"),
    (["--save_path", "{file}"], "is a file"),
    (["--save_path", "{file}/below"], "cannot write"),
])
def test_test_py_bad_settings_are_one_line(tiny_files, synth, tmp_path, extra, expected):
    (tmp_path / "afile").write_text("x")
    extra = [e.replace("{file}", str(tmp_path / "afile")) for e in extra]
    args = ["test.py", "--dataset", "synth", "--data_path", synth, "--checkpoint_path",
            tiny_files[1], "--pretrained_path", tiny_files[0], "--image_size", "32",
            "--features_list", "1", "2", "3", "4", "--save_path", tmp_path / "out",
            "--no_progress", *extra]
    proc = run(args)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "ERROR" in line or "error" in line]
    assert len(lines) == 1 and expected in lines[0], proc.stderr


@pytest.mark.parametrize("extra,expected", [
    (["--image_size", "33"], "multiple of the CLIP patch"),
    (["--num_flows", "0"], "--num_flows"),
    (["--prompt_num", "0"], "--prompt_num"),
    (["--learning_rate_PFL", "nan"], "finite"),
    (["--temperature_lr", "-1"], "at least 0"),
    (["--features_list", "1", "1", "2", "3"], "distinct"),
    (["--features_list", "1", "2", "3", "30"], "outside the CLIP"),
    (["--save_path", "{file}"], "is a file"),
])
def test_train_py_bad_settings_are_one_line(tiny_files, synth, tmp_path, extra, expected):
    (tmp_path / "afile").write_text("x")
    extra = [e.replace("{file}", str(tmp_path / "afile")) for e in extra]
    proc = run(train_args(synth, tiny_files[0], tmp_path / "run", "--epochs", "1", *extra))
    line = one_line(proc)
    assert expected in line, proc.stderr


def test_resume_with_another_geometry_is_one_line(synth, tiny_files, tmp_path):
    save = tmp_path / "run"
    assert run(train_args(synth, tiny_files[0], save, "--epochs", "1")).returncode == 0
    proc = run(train_args(synth, tiny_files[0], save, "--epochs", "1", "--resume",
                          "--features_list", "1", "2", "3"))
    assert "--features_list" in one_line(proc)


def test_metrics_benchmark_bad_n_is_one_line():
    proc = run(["benchmarks/metrics.py", "--n", "0"])
    assert proc.returncode == 2 and "--n" in one_line(proc)


def test_a_corrupt_image_under_workers_is_the_same_line(tiny_files, tmp_path):
    write_standard(str(tmp_path / "d"), name="x", size=32, classes=["pill"], n_train=0,
                   n_test_good=2, n_test_anomaly=2)
    bad = sorted(glob.glob(str(tmp_path / "d" / "x" / "pill" / "test" / "good" / "*.bmp")))[0]
    with open(bad, "wb") as handle:
        handle.write(b"broken")
    lines = []
    for workers in ("0", "2"):
        proc = run(["test.py", "--dataset", "x", "--data_path", tmp_path / "d", "--checkpoint_path",
                    tiny_files[1], "--pretrained_path", tiny_files[0], "--image_size", "32",
                    "--features_list", "1", "2", "3", "4", "--save_path", tmp_path / "o",
                    "--no_progress", "--num_workers", workers])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and bad in errors[0]
        lines.append(errors[0].split("ERROR", 1)[1])
    assert lines[0] == lines[1]


def test_predict_output_folder_problems_are_one_line(tiny_files, tmp_path):
    _images(tmp_path / "in", ["a.png"])
    (tmp_path / "afile").write_text("x")
    for out, expected in ((tmp_path / "afile", "is a file"),
                          (tmp_path / "afile" / "below", "cannot write")):
        proc = run(["predict.py", "--pretrained_path", tiny_files[0], "--checkpoint_path",
                    tiny_files[1], "--image_size", "32", "--features_list", "1", "2", "3", "4",
                    "--input", tmp_path / "in", "--out", out, "--no_progress"])
        assert expected in one_line(proc)
