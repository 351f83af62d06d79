"""Builders the script tests share: test.py and predict.py on the tiny weights."""

from __future__ import annotations

import predict
import test as test_script
from tests.clip_factory import TINY_LAYERS

TINY = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS), "--sample_num", "2",
        "--no_progress"]


def run_test_py(tiny_files, root, out, *extra, dataset: str = "synth") -> int:
    """test.py on ``dataset`` under ``root`` into ``out`` with the tiny weights (R 2, 32 px)."""
    clip, ckpt = tiny_files
    return test_script.main(["--dataset", dataset, "--data_path", root, "--checkpoint_path",
                             ckpt, "--pretrained_path", clip, *TINY, "--num_workers", "0",
                             "--save_path", str(out), *extra])


def run_predict(tiny_files, *extra) -> int:
    """predict.py with the tiny weights (R 2, 32 px) and ``extra`` flags."""
    clip, ckpt = tiny_files
    return predict.main(["--pretrained_path", clip, "--checkpoint_path", ckpt, *TINY, *extra])
