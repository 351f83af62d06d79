"""Bayes-PFL checkpoint files: the official format ``{"MyModel": state_dict}``."""

from __future__ import annotations

import os
import re

import torch

from models.clip import WeightsError, check_state_dict

BAYES_WEIGHTS = {
    "train_visa.pth": "https://drive.google.com/file/d/1rNs_rdTmrg4JshmKHotq6AN1gqTpPjvm/view",
    "train_mvtec.pth": "https://drive.google.com/file/d/1EHa4jPi7r8jmRVURoZ4yH2-jqDt6K1Ni/view",
}
_STAGE = re.compile(r"epoch_post_\d+_(\d+)\.pth$")


def stage_from_filename(path: str) -> int:
    """``epoch_post_{epoch}_{stage}.pth`` -> stage; other names (released files) -> 2."""
    m = _STAGE.search(os.path.basename(path))
    return int(m.group(1)) if m else 2


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of an official-format checkpoint (also accepts a bare state dict and
    this project's resumable ``last.pth``)."""
    if not os.path.isfile(path):
        name = os.path.basename(path)
        hint = (f"download {name} from {BAYES_WEIGHTS[name]} into bayes_weight/"
                if name in BAYES_WEIGHTS else
                "train one with train.py or download train_visa.pth / train_mvtec.pth "
                "(see bayes_weight/README.md)")
        raise WeightsError(f"Bayes-PFL checkpoint not found at '{path}': {hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"'{path}' is not a checkpoint torch can read ({type(e).__name__}); "
                           "download or save it again") from None
    if isinstance(obj, dict) and "MyModel" in obj:
        obj = obj["MyModel"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"'{path}' is not a Bayes-PFL checkpoint (expected "
                           "{'MyModel': state_dict})")
    return obj


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Strictly load an official-format checkpoint into ``model``; a mismatch names the
    differing keys (e.g. a checkpoint made for another CLIP or other prompt settings)."""
    sd = read_checkpoint(path)
    check_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)


def save_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Write ``{"MyModel": state_dict}`` atomically (temporary file, then rename)."""
    atomic_save({"MyModel": model.state_dict()}, path)


def atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
