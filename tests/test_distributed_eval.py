"""Evaluation across processes (torchrun --nproc_per_node 2 test.py, Gloo on the CPU): the
results equal one process's bit for bit at batch size 1, with several seeds and few-shot runs
too; every image's picture is written once, by the rank that scored it, identical to one
process's; a rank that fails ends every rank with its one line, without a hang."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import pytest

from tests.clip_factory import TINY_LAYERS
from utils.distributed_eval import ClassShards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS), "--sample_num", "2",
        "--no_progress", "--num_workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three classes of 5 test images (odd counts: the ranks' shares differ) and train images
    for the references."""
    from dataset.synthetic import write_standard

    root = str(tmp_path_factory.mktemp("dist_data"))
    write_standard(root, name="dist", classes=["mesh", "pill", "wood"], size=32, n_train=3,
                   n_test_good=2, n_test_anomaly=3)
    return root


def _args(tiny_files, data, out, *extra):
    clip, ckpt = tiny_files
    return ["test.py", "--dataset", "dist", "--data_path", data, "--checkpoint_path", ckpt,
            "--pretrained_path", clip, *TINY, "--save_path", str(out), *extra]


def _run(args, processes: int = 1, env=None, timeout=300):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable])
    return subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                **(env or {})})


def test_class_shards_split_each_class_into_contiguous_blocks():
    classes = ["a"] * 5 + ["b"] * 1 + ["c"] * 4
    shards = [ClassShards(classes, r, 3) for r in range(3)]
    assert [s.indices for s in shards] == [[0, 6], [1, 2, 7], [3, 4, 5, 8, 9]]
    together = sorted(i for s in shards for i in s.indices)
    assert together == list(range(10))                        # every image once
    for name, start, n in (("a", 0, 5), ("b", 5, 1), ("c", 6, 4)):
        blocks = [[i - start for i in s.indices if classes[i] == name] for s in shards]
        assert [b for block in blocks for b in block] == list(range(n))   # in rank order
        assert [s.offsets[name] for s in shards] == [n * r // 3 for r in range(3)]
        assert all(block == list(range(s.offsets[name], s.offsets[name] + len(block)))
                   for s, block in zip(shards, blocks))
    with pytest.raises(ValueError, match="not contiguous"):
        ClassShards(["a", "b", "a"], 0, 2)


def _pictures(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, files in os.walk(folder) for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    [],
    ["--seeds", "3", "4", "--k_shot", "2", "--shot_seeds", "0", "1", "--no_vis"],
])
def test_two_processes_equal_one(tiny_files, data, tmp_path, extra):
    one = _run(_args(tiny_files, data, tmp_path / "one", *extra))
    assert one.returncode == 0, one.stderr
    two = _run(_args(tiny_files, data, tmp_path / "two", *extra), processes=2)
    assert two.returncode == 0, two.stderr
    names = sorted(n for n in os.listdir(tmp_path / "one") if n.endswith(".json"))
    assert names == sorted(n for n in os.listdir(tmp_path / "two") if n.endswith(".json"))
    for name in names:
        a = json.loads((tmp_path / "one" / name).read_text())
        b = json.loads((tmp_path / "two" / name).read_text())
        assert a["classes"] == b["classes"] and a["mean"] == b["mean"], name   # bit for bit
        assert b["status"] == "complete" and b["settings"]["processes"] == 2
    if "--no_vis" not in extra:
        pictures = _pictures(tmp_path / "one" / "imgs")
        assert len(pictures) == 15 and pictures == _pictures(tmp_path / "two" / "imgs")
        for rel in pictures:
            assert filecmp.cmp(tmp_path / "one" / "imgs" / rel, tmp_path / "two" / "imgs" / rel,
                               shallow=False), rel
    assert two.stdout.count("| mean") == 1                     # one rank prints the table


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_with_its_line(tiny_files, data, tmp_path):
    """Rank 1 fails while scoring its share of the second class; rank 0 waits for it in no
    collective: both end, each with one line."""
    script = tmp_path / "failing.py"
    script.write_text(
        "import os, sys\nsys.path.insert(0, os.getcwd())\nimport models.noise as noise\nfrom dataset.errors import DatasetError\n"
        "real = noise.RunNoise.batch\ncalls = []\n"
        "def batch(self, names, indices):\n"
        "    calls.append(names[0])\n"
        "    if os.environ['RANK'] == '1' and names[0] == 'pill':\n"
        "        raise DatasetError('cannot read image pill/3.bmp (injected)')\n"
        "    return real(self, names, indices)\n"
        "noise.RunNoise.batch = batch\n"
        "import test\nsys.exit(test.main(sys.argv[1:]))\n")
    args = _args(tiny_files, data, tmp_path / "out", "--no_vis")
    proc = _run([str(script), *args[1:]], processes=2, timeout=240)
    assert proc.returncode != 0
    err = proc.stderr
    assert "cannot read image pill/3.bmp (injected)" in err
    assert "rank 1 failed: cannot read image pill/3.bmp (injected)" in err    # rank 0's line
    ours = err.split("torch/distributed/elastic")[0]              # before torchrun's report
    assert "Traceback" not in ours and ours.count(" ERROR ") == 2
    saved = json.loads((tmp_path / "out" / "results_dist.incomplete.json").read_text())
    assert list(saved["classes"]) == ["mesh"]                 # the class before the failure


@pytest.mark.slow
def test_test_sh_gpus_runs_each_dataset_on_that_many_processes(tiny_files, tmp_path):
    """GPUS=0,1 (here with DEVICE=cpu: two Gloo processes) gives the one-process results."""
    from dataset.synthetic import write_standard

    clip, ckpt = tiny_files
    data = tmp_path / "data"
    write_standard(str(data), name="BTAD", classes=["pill", "wood"], size=32, n_train=0,
                   n_test_good=2, n_test_anomaly=3)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "train_visa.pth").write_bytes(open(ckpt, "rb").read())
    out = tmp_path / "out"
    env = dict(os.environ, DATA=str(data), CLIP=clip, WEIGHTS=str(weights), OUT=str(out),
               DEVICE="cpu", GPUS="0,1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               EXTRA=" ".join(["--image_size", "32", "--features_list", "1", "2", "3", "4",
                               "--sample_num", "2", "--no_vis", "--num_workers", "0",
                               "--no_progress"]))
    done = subprocess.run(["bash", os.path.join(ROOT, "test.sh")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert "| BTAD |" in done.stdout, done.stderr
    assert "2 processes" in done.stderr
    import test as test_script                              # one process, in this one

    assert test_script.main(["--dataset", "BTAD", "--data_path", str(data), "--checkpoint_path",
                             ckpt, "--pretrained_path", clip, "--device", "cpu", "--seeds", "333",
                             "--image_size", "32", "--features_list", "1", "2", "3", "4",
                             "--sample_num", "2",
                             "--no_vis", "--num_workers", "0", "--no_progress",
                             "--save_path", str(tmp_path / "one")]) == 0
    two = json.loads((out / "BTAD" / "results_BTAD.json").read_text())
    one = json.loads((tmp_path / "one" / "results_BTAD.json").read_text())
    assert two["classes"] == one["classes"] and two["settings"]["processes"] == 2


def test_default_workers_share_the_cpus_among_the_ranks_of_a_machine(monkeypatch):
    """test.py's and train.py's default alike: torchrun's LOCAL_WORLD_SIZE (else WORLD_SIZE)
    processes share the CPUs this process may use."""
    from utils import cli
    from utils.training import TrainConfig

    monkeypatch.setattr(cli, "available_cpus", lambda: 16)
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.default_workers() == TrainConfig().num_workers == 16
    monkeypatch.setenv("WORLD_SIZE", "8")                  # two machines of 4 ranks each
    assert cli.default_workers() == TrainConfig().num_workers == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cli.default_workers() == TrainConfig().num_workers == 4
    assert cli.default_workers(3) == 5
