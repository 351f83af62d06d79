"""Bayes-PFL checkpoint files (the code lives in ``models/checkpoint.py``)."""

from models.checkpoint import (BAYES_WEIGHTS, Checkpoint, atomic_save, load_checkpoint,  # noqa: F401
                               open_checkpoint, read_checkpoint, save_checkpoint,
                               stage_from_filename)
