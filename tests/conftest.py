import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """(clip_path, checkpoint_path) of a tiny random CLIP (32 px, patch 8, 4 blocks) and a
    random official-format Bayes-PFL checkpoint (layers 1 2 3 4)."""
    from tests.clip_factory import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_weights"))
