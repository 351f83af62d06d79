"""Bayes-PFL checkpoint files.

The official format is ``{"MyModel": state_dict}`` (SPEC section 5). Files this project writes
add the stage the parameters were trained in and the model settings (:class:`ModelSpec`)
beside ``MyModel``; the official loader reads only ``MyModel``, so they stay loadable there.
Readers use the recorded stage, else the official file-name rule (``epoch_post_{epoch}_{stage}
.pth``), else 2 (the released files), and say which.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from .archive_limits import MAX_CHECKPOINT_BYTES, check_archive
from .weights import BAYES_WEIGHTS, check_state_dict
from .errors import OutputError, WeightsError
from .spec import ModelSpec

log = logging.getLogger(__name__)

_STAGE = re.compile(r"epoch_post_\d+_(\d+)\.pth$")


def stage_from_filename(path: str) -> int:
    """``epoch_post_{epoch}_{stage}.pth`` -> stage; other names (released files) -> 2."""
    m = _STAGE.search(os.path.basename(path))
    return int(m.group(1)) if m else 2


@dataclass
class Checkpoint:
    """A Bayes-PFL checkpoint as read: the state dict, the stage to evaluate it with and where
    that came from, and the recorded settings (None for files that record none)."""

    path: str
    state_dict: dict[str, torch.Tensor]
    stage: int
    stage_source: str
    spec: ModelSpec | None


def _load(path: str):
    if not os.path.isfile(path):
        name = os.path.basename(path)
        hint = (f"download {name} from {BAYES_WEIGHTS[name]} into bayes_weight/"
                if name in BAYES_WEIGHTS else
                "train one with train.py or download train_visa.pth / train_mvtec.pth "
                "(see bayes_weight/README.md)")
        raise WeightsError(f"Bayes-PFL checkpoint not found at '{path}': {hint}")
    check_archive(path, MAX_CHECKPOINT_BYTES, "Bayes-PFL checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise WeightsError(f"'{path}' is not a checkpoint torch can read ({type(e).__name__}); "
                           "download or save it again") from None


def open_checkpoint(path: str) -> Checkpoint:
    """Read an official-format checkpoint, one written by this project, a bare state dict or
    a resumable ``last.pth``."""
    path = os.fspath(path)
    obj = _load(path)
    record = obj if isinstance(obj, dict) else {}
    if "MyModel" in record:
        sd = record["MyModel"]
    elif isinstance(record.get("model"), dict):                  # last.pth
        sd = record["model"]
    else:
        sd = obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor)
                                                     for v in sd.values()):
        raise WeightsError(f"'{path}' is not a Bayes-PFL checkpoint (expected "
                           "{'MyModel': state_dict})")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"'{path}' holds non-finite values (NaN or inf) in {len(bad)} of "
                           f"{len(sd)} tensors (e.g. {bad[0]}): the training that wrote it "
                           f"diverged; use a checkpoint of an earlier epoch")
    spec = None
    if isinstance(record.get("model_spec"), dict):
        spec = ModelSpec.from_dict(record["model_spec"])
    if record.get("stage") in (1, 2):
        stage, source = int(record["stage"]), "recorded in the file"
    elif _STAGE.search(os.path.basename(path)):
        stage, source = stage_from_filename(path), "from the file name epoch_post_{e}_{stage}"
    else:
        stage, source = 2, "the default of files that record none (released checkpoints)"
    return Checkpoint(path, sd, stage, source, spec)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint (see :func:`open_checkpoint`)."""
    return open_checkpoint(path).state_dict


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    """Strictly load ``sd`` into ``model``; a mismatch names the differing keys (e.g. a
    checkpoint made for another CLIP or other prompt settings)."""
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Strictly load the checkpoint at ``path`` into ``model``."""
    load_state(model, read_checkpoint(path), path)


def checkpoint_record(model: torch.nn.Module, stage: int | None = None,
                      spec: ModelSpec | None = None, extra: dict | None = None) -> dict:
    """``{"MyModel": state_dict}`` plus the stage and the settings when known, and ``extra``
    (plain data, e.g. the provenance of the training)."""
    record: dict = {"MyModel": model.state_dict(), **(extra or {})}
    if stage is not None:
        record["stage"] = int(stage)
    if spec is not None:
        record["model_spec"] = spec.to_dict()
    return record


def save_checkpoint(model: torch.nn.Module, path: str, stage: int | None = None,
                    spec: ModelSpec | None = None, extra: dict | None = None) -> None:
    """Write the checkpoint of ``model`` atomically (temporary file, then rename)."""
    atomic_save(checkpoint_record(model, stage, spec, extra), path)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to the disk, then renamed
    over it: ``path`` is either the previous file or the complete new one. A write that fails
    (full disk, read-only or missing folder, a file in the way) removes the temporary file and
    is one OutputError naming ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # through a Python file, so that every failed write is an OSError with its errno
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        _remove_quietly(tmp)
        if isinstance(error, RuntimeError) and not _is_write_failure(error):
            raise
        reason = (error.strerror if isinstance(error, OSError) else None) or _first_line(error)
        raise OutputError(f"cannot write {path} ({reason}): free some space "
                          f"or choose another --save_path; nothing was left half-written "
                          f"(the previous {os.path.basename(path)}, if any, is unchanged)"
                          ) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


# What torch.save's zip writer (PytorchStreamWriter, inline_container.cc) raises as a
# RuntimeError when the file underneath stops taking bytes (a full disk): not an OSError.
_WRITER_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos",
                    "file write failed")


def _is_write_failure(error: RuntimeError) -> bool:
    return any(marker in str(error) for marker in _WRITER_FAILURES)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
