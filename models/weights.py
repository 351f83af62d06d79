"""Reading OpenAI's CLIP weight files: the one pipeline from a file to a frozen model.

Read the file (OpenAI's TorchScript archive or a plain state dict, ``weights_only=True``),
fix the state dict up (wrappers stripped, fp16 to fp32, the position grid resized once to
the input size, with a log line), then load it with strict key and shape checks that name
the differing keys. Files named like OpenAI's downloads are checked against the SHA-256
that their download address embeds.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .archive_limits import MAX_CLIP_BYTES, check_archive
from .clip import CLIP, CLIPGeometry, make_activation
from .errors import WeightsError
from .torchscript_reader import (ArchiveFormatError, UnsafeArchiveError, is_torchscript_archive,
                                 read_torchscript_state_dict)

log = logging.getLogger(__name__)

# OpenAI's download addresses embed each file's SHA-256.
OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{name}"
OPENAI_SHA256 = {
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
}
DEFAULT_CLIP_FILE = "ViT-L-14-336px.pt"
# The released Bayes-PFL checkpoints (the authors' Google Drive).
BAYES_WEIGHTS = {
    "train_visa.pth": "https://drive.google.com/file/d/1rNs_rdTmrg4JshmKHotq6AN1gqTpPjvm/view",
    "train_mvtec.pth": "https://drive.google.com/file/d/1EHa4jPi7r8jmRVURoZ4yH2-jqDt6K1Ni/view",
}
# Entries of OpenAI's archives that are not weights.
EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def openai_url(name: str) -> str:
    return OPENAI_URL.format(sha=OPENAI_SHA256[name], name=name)


def download_url(name: str) -> str:
    """Where to download a weights file known by its name (OpenAI's CLIP files, the released
    Bayes-PFL checkpoints)."""
    if name in OPENAI_SHA256:
        return openai_url(name)
    if name in BAYES_WEIGHTS:
        return BAYES_WEIGHTS[name]
    raise KeyError(f"no known download address for {name!r}")


def resize_position_grid(pos: torch.Tensor, grid_size: int) -> torch.Tensor:
    """[1 + g*g, C] position embedding -> [1 + G*G, C]: bicubic with antialias on the
    patch grid, class position kept apart."""
    n = pos.shape[0] - 1
    old = int(round(math.sqrt(n)))
    if old == grid_size:
        return pos
    cls_pos, grid = pos[:1], pos[1:]
    grid = grid.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic",
                         antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_size * grid_size, -1)
    return torch.cat([cls_pos.float(), grid], dim=0).to(pos.dtype)


def _missing_file_message(path: str) -> str:
    name = os.path.basename(path)
    expected = name if name in OPENAI_SHA256 else DEFAULT_CLIP_FILE
    return (f"CLIP weights not found at '{path}': download {expected} from "
            f"{openai_url(expected)} and put it there (see pretrained_weight/README.md)")


def require_clip_file(path: str | os.PathLike) -> None:
    """A WeightsError saying where to get the file when ``path`` is not a file."""
    if not os.path.isfile(path):
        raise WeightsError(_missing_file_message(os.fspath(path)))


def sha256_of(path: str) -> str:
    """The SHA-256 of a file, computed once per version of the file (path, size, mtime): the
    checksum check, the archive fallback and the provenance of results share it."""
    info = os.stat(path)
    return _sha256(os.path.abspath(path), info.st_size, info.st_mtime_ns)


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_openai_file(path: str) -> None:
    """For files named like OpenAI's downloads, check the SHA-256 that the download address
    embeds; other names are not checked."""
    name = os.path.basename(path)
    expected = OPENAI_SHA256.get(name)
    if expected is None:
        return
    got = sha256_of(path)
    if got != expected:
        size = os.path.getsize(path)
        raise WeightsError(
            f"'{path}' is not OpenAI's {name} (SHA-256 {got[:12]}..., expected "
            f"{expected[:12]}..., {size:,} bytes): the download is truncated or damaged; "
            f"download it again from {openai_url(name)}, or turn the check off (--no_verify, "
            "verify=False) for a file changed on purpose")


def _read_archive(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, read without running anything from the file
    (``models/torchscript_reader.py``). Only an archive whose content is one of OpenAI's
    published files (by SHA-256, whatever its name) may fall back to ``torch.jit.load`` when
    the restricted reader cannot parse it; any other is refused."""
    try:
        sd = read_torchscript_state_dict(path)
        # OpenAI's model keeps the text mask as a plain tensor attribute (not a buffer), which
        # a scripted archive would store beside the weights: not a weight
        return {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
    except (ArchiveFormatError, UnsafeArchiveError) as error:
        reason = str(error)
    digest = sha256_of(path)
    official = next((name for name, sha in OPENAI_SHA256.items() if sha == digest), None)
    if official is None:
        raise WeightsError(f"{reason}; only OpenAI's published CLIP files may be read otherwise "
                           f"(this file's SHA-256 {digest[:12]}... is none of them): download "
                           f"the weights from OpenAI's address (see pretrained_weight/README.md)"
                           ) from None
    log.info("reading %s (OpenAI's %s by its SHA-256) with torch.jit.load: the restricted "
             "reader could not parse it (%s)", path, official, reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").state_dict()


def read_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an OpenAI TorchScript archive or a plain state dict to a state dict of CPU
    tensors (extra archive entries dropped, wrappers stripped). No file is ever executed:
    archives are read by a restricted unpickler, state dicts with ``weights_only=True``; a
    file whose declared sizes exceed ``models.archive_limits``' bounds is refused first."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(_missing_file_message(path))
    check_archive(path, MAX_CLIP_BYTES, "CLIP file")
    if is_torchscript_archive(path):
        sd = _read_archive(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any reader failure is the same user error
            raise WeightsError(
                f"'{path}' is neither a TorchScript archive nor a state dict that torch can "
                f"read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                "download the file again") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"'{path}' does not hold a state dict of tensors; expected OpenAI's "
                           "CLIP archive or its state dict")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k in EXTRA_KEYS:
            continue
        out[k] = v
    return out


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check that names the differing keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or wrong):
        return

    def names(keys: list[str]) -> str:
        shown = ", ".join(keys[:6])
        return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {names(unexpected)}")
    if wrong:
        parts.append("wrong shapes: " + names(
            [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]))
    raise WeightsError(f"'{source}' does not match the model ({'; '.join(parts)})")


def build_clip(sd: dict[str, torch.Tensor], image_size: int | None = None,
               activation: str = "gelu", source: str = "state dict") -> CLIP:
    """Build a CLIP from an OpenAI-layout state dict (fp32 weights; fp16 tensors are
    converted), resizing the position grid to ``image_size``."""
    geometry = CLIPGeometry.from_state_dict(sd)
    model = CLIP(geometry, image_size=image_size, activation=activation)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    key = "visual.positional_embedding"
    if key in sd and model.grid_size != geometry.grid_size:
        log.info("resizing the CLIP position grid from %dx%d to %dx%d (image size %d)",
                 geometry.grid_size, geometry.grid_size, model.grid_size, model.grid_size,
                 model.image_size)
        sd[key] = resize_position_grid(sd[key], model.grid_size)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def load_clip(path: str | os.PathLike, image_size: int = 518,
              device: str | torch.device = "cpu", activation: str = "gelu",
              verify: bool = True) -> CLIP:
    """Load OpenAI's CLIP weights (TorchScript archive or state dict) as a frozen fp32 model
    in eval mode for ``image_size`` x ``image_size`` inputs.

    ``activation``: "gelu" (exact GELU, as the Bayes-PFL release and its checkpoints) or
    "quick_gelu" (OpenAI's). ``verify``: check the SHA-256 of files named like OpenAI's
    downloads."""
    path = os.fspath(path)
    make_activation(activation)  # validate early
    if not os.path.isfile(path):
        raise WeightsError(_missing_file_message(path))
    if verify:
        verify_openai_file(path)
    sd = read_clip_state_dict(path)
    model = build_clip(sd, image_size=image_size, activation=activation, source=path)
    model.requires_grad_(False)
    return model.eval().to(device)

