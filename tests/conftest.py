"""Shared fixtures: tiny random weights and the model built from them; two threads."""

import pytest
import torch

from tests.clip_factory import load_tiny, write_tiny_checkpoints

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """(clip_path, checkpoint_path) of a tiny random CLIP (32 px, patch 8, 4 blocks) and a
    random official-format Bayes-PFL checkpoint (layers 1 2 3 4)."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture(scope="module")
def tiny(tiny_files):
    """(clip, model in eval mode) built from ``tiny_files``; one pair per test module."""
    return load_tiny(tiny_files)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Three synthetic classes of 32 px images (2 good + 2 anomalous each), dataset "synth";
    "pill" validates the training tests."""
    from dataset.synthetic import write_standard

    root = str(tmp_path_factory.mktemp("synth"))
    write_standard(root, name="synth", size=32, classes=["wood", "pill", "mesh"], n_train=0,
                   n_test_good=2, n_test_anomaly=2)
    return root


@pytest.fixture(scope="module")
def det(tiny):
    """An AnomalyDetector on ``tiny`` (32 px, layers 1 2 3 4, R 2)."""
    from models import AnomalyDetector
    from tests.clip_factory import TINY_LAYERS

    clip, model = tiny
    return AnomalyDetector(clip, model, image_size=32, sample_num=2, layers=TINY_LAYERS)
