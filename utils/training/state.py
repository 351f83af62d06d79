"""Resumable state: derived seeds, the RNG states, and reading a run's ``last.pth``."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from models.archive_limits import MAX_CHECKPOINT_BYTES, check_archive

from .config import TrainingError

RESUME_FORMAT = 2
# Purposes of derived seeds (see derive_seed).
SEED_GLOBAL, SEED_LOADER, SEED_PROMPT, SEED_VALIDATION, SEED_CACHE = range(5)


def derive_seed(seed: int, epoch: int, rank: int, purpose: int) -> int:
    """A 32-bit seed for one purpose of one epoch on one rank."""
    return int(np.random.SeedSequence([int(seed) % 2**32, epoch, rank, purpose])
               .generate_state(1)[0])


# Resumable state
# ------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


# Settings a resumed run may change: where things are and how the work is run, never what is
# computed (the model, the data, the schedule, the selection).
RESUMABLE_CHANGES = frozenset({
    "resume", "stop_after", "device", "device_id", "num_workers", "print_freq", "tf32",
    "save_path", "train_data_path", "val_data_path", "pretrained_path", "val_batch_size",
    "verify_weights", "overwrite"})


def read_resume_state(path: str, config=None) -> dict:
    """The contents of a ``last.pth`` written by the trainer. With ``config`` (a TrainConfig),
    settings that would change what the run computes (the geometry, the data, --epochs and so
    the learning-rate schedule, the learning rates, the seed, ...) must equal the saved ones:
    a difference is one error naming each setting."""
    if not os.path.isfile(path):
        raise TrainingError(f"resume checkpoint {path} not found; train without --resume first "
                            f"or give the path of an existing last.pth")
    check_archive(path, MAX_CHECKPOINT_BYTES, "training state")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        raise TrainingError(f"{path} cannot be read as a training state ({type(error).__name__});"
                            f" resume from another last.pth or start afresh") from None
    if isinstance(state, dict) and isinstance(state.get("format"), int) \
            and state["format"] < RESUME_FORMAT:
        raise TrainingError(f"{path} was written by an earlier version of this project, whose "
                            f"stage rule differs from the official one; start the run afresh")
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise TrainingError(f"{path} is not a resumable training state (an official-format "
                            f"checkpoint cannot be resumed); give the run's last.pth")
    if config is not None:
        saved = state["config"]
        differ = [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in config.to_dict().items()
                  if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
        if differ:
            raise TrainingError(f"{path} was trained with other settings ({'; '.join(differ)}): "
                                f"resume with the saved ones (the run continues exactly), or "
                                f"start a new run with --overwrite or another --save_path")
    return state


# ------------------------------------------------------------------------------------------------


def resume_record(trainer, finished: bool) -> dict:
    """Everything ``--resume`` needs of a trainer after an epoch (``last.pth``)."""
    return {
        "format": RESUME_FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict(),
        "controller": trainer.controller.state_dict(),
        "remembered": trainer.remembered,
        "epoch": trainer.epoch,
        "global_step": trainer.global_step,
        "rng": rng_state(),
        "config": trainer.config.to_dict(),
        "history": trainer.history,
        "checkpoints": trainer.checkpoints,
        "best_path": trainer.best_path,
        "finished": finished,
        "stage": trainer.history[-1]["stage"] if trainer.history else 1,
        "model_spec": trainer.spec.to_dict(),
        **trainer._provenance(),
    }


def restore(trainer, state: dict) -> None:
    """Put a trainer back in the state of :func:`resume_record` (its stage's optimiser,
    schedule, RNG, history); the run's files are named where the run now is, so a copied or
    moved run folder reports its own."""
    trainer.controller.load_state_dict(state["controller"])
    trainer.model.load_state_dict(state["model"])
    if trainer.controller.stage != 1:
        trainer._enter_stage(trainer.controller.stage)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None and state.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.remembered = {int(k): v for k, v in state["remembered"].items()}
    trainer.epoch = int(state["epoch"])
    trainer.global_step = int(state["global_step"])
    trainer.history = list(state["history"])
    here = trainer.config.save_path
    trainer.checkpoints = [os.path.join(here, os.path.basename(p)) for p in state["checkpoints"]]
    trainer.best_path = (os.path.join(here, os.path.basename(state["best_path"]))
                         if state.get("best_path") else None)
    set_rng_state(state["rng"])
