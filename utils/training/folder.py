"""The run folder: one training writes it at a time (a lock file), an existing run is never
replaced by accident, and what a killed run left half-written is cleaned."""

from __future__ import annotations

import glob
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from dataset.locks import folder_lock
from dataset.outputs import is_own_file
from utils.results import make_output_folder

from .config import TrainingError

log = logging.getLogger("bayes_pfl.train")
LOCK_FILE = ".train.lock"


def run_files(save_path: str) -> list[str]:
    """The checkpoints of a run in ``save_path`` (last.pth, best.pth, epoch_post_*.pth)."""
    names = [os.path.join(save_path, n) for n in ("last.pth", "best.pth")]
    found = [p for p in names if os.path.isfile(p)]
    return found + sorted(glob.glob(os.path.join(glob.escape(save_path), "epoch_post_*.pth")))


@contextmanager
def claimed(save_path: str, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold the run folder for the body: create it, lock it, remove temporary files a killed
    run left, and refuse a folder that holds a run unless ``resume`` (continue it) or
    ``overwrite`` (its files are deleted first)."""
    make_output_folder(save_path)
    with folder_lock(Path(save_path) / LOCK_FILE,
                     f"Run folder {save_path} is being written by another train.py",
                     "no training runs in it", TrainingError):
        for stale in glob.glob(os.path.join(glob.escape(save_path), "*.pth.tmp*")):
            os.remove(stale)
            log.info("removed %s, left by an interrupted run", stale)
        existing = run_files(save_path)
        if existing and not resume:
            if not overwrite:
                raise TrainingError(
                    f"{save_path} holds a run ({len(existing)} checkpoint file(s), e.g. "
                    f"{os.path.basename(existing[0])}): continue it with --resume, replace it "
                    f"with --overwrite (its files are deleted first), or choose another "
                    f"--save_path")
            log_file = os.path.join(save_path, "train.log")
            doomed = existing + ([log_file] if os.path.isfile(log_file) else [])
            foreign = [p for p in doomed if not is_own_file(p)]
            if foreign:
                raise TrainingError(
                    f"--overwrite would delete {foreign[0]}, which train.py did not write (it "
                    f"carries no record of a run): move it, or choose another --save_path")
            for path in doomed:
                os.remove(path)
            log.info("--overwrite: removed the %d files of the previous run in %s",
                     len(existing), save_path)
        yield


def claimed_on_main(main: bool, save_path: str, resume: bool, overwrite: bool):
    """:func:`claimed` on the main process; the other processes of a DDP run write nothing."""
    return claimed(save_path, resume, overwrite) if main else nullcontext()
