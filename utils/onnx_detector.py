"""Running an exported detector (``export.py``, :mod:`utils.export`) with ONNX Runtime.

    from utils.inference import OnnxDetector

    det = OnnxDetector("part.onnx")                    # CPU; providers=[...] for others
    out = det.predict(images)                          # images: preprocessed [B, 3, S, S]
    out["image_score"], out["anomaly_map"]             # as AnomalyDetector.predict

The file fixes the class, the seed, R, the image size, the stage and the layers (its metadata
records them, :attr:`OnnxDetector.metadata`); a request for another class, image size, seed or
for references is one error line naming both. ``predict_images`` / ``predict_folder`` (and
``predict.py --onnx``) take an OnnxDetector as they take an AnomalyDetector.

ONNX Runtime, onnx and onnxscript are the optional ``deploy`` extra; without them the import
of this module works and using it ends in one line saying what to install.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch

from models.errors import InputError, SettingsError, WeightsError
from models.noise import shared_noise
from models.wording import prompt_class_name
from utils.protocol import topk_for_class

DEPLOY_INSTALL = 'pip install -e ".[deploy]"'
# The value of the "format" metadata entry of the files export.py writes.
FORMAT = "bayes-pfl-onnx/1"
# Metadata entries stored as plain text; every other entry is JSON.
TEXT_ENTRIES = ("format", "class_name", "prompt", "backbone", "clip_file", "clip_sha256",
                "checkpoint_file", "checkpoint_sha256", "version", "commit")
# The entries a file must hold to be run.
REQUIRED = ("class_name", "seed", "sample_num", "image_size", "stage", "layers", "embed_dim",
            "outputs", "topk", "uncertainty", "references")
SPREADS = ("anomaly_map_std", "image_score_std", "score_std")


class MissingExtraError(SettingsError):
    """An optional dependency (the ``deploy`` extra) is not installed."""


def _missing(what: str, module: str) -> MissingExtraError:
    return MissingExtraError(f"{what} needs the optional package {module}, which is not "
                             f"installed: {DEPLOY_INSTALL}")


def require_onnx():
    """The ``onnx`` module, with ``onnxscript`` (torch's ONNX exporter) importable; else one
    MissingExtraError line."""
    try:
        import onnx
    except ImportError:
        raise _missing("ONNX export", "onnx") from None
    try:
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) runs on it)
    except ImportError:
        raise _missing("ONNX export", "onnxscript") from None
    return onnx


def require_runtime():
    """The ``onnxruntime`` module, else one MissingExtraError line."""
    try:
        import onnxruntime
    except ImportError:
        raise _missing("running an ONNX file", "onnxruntime") from None
    return onnxruntime


def encode_metadata(values: dict) -> dict[str, str]:
    """Metadata values -> ``metadata_props`` strings (text entries as they are, the others as
    JSON; entries that are None are left out)."""
    out = {"format": FORMAT}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = value if key in TEXT_ENTRIES else json.dumps(value)
    return out


def decode_metadata(props: dict[str, str]) -> dict:
    """``metadata_props`` strings -> values (the inverse of :func:`encode_metadata`)."""
    out = {}
    for key, text in props.items():
        if key in TEXT_ENTRIES:
            out[key] = text
            continue
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def providers_for(device: str, available: Sequence[str]) -> list[str]:
    """ONNX Runtime execution providers for a device setting ("cpu", "cuda", "auto"; a
    "cuda:N" index is not chosen here); "cuda" without the CUDA provider is one line."""
    kind = device.split(":")[0]
    has_cuda = "CUDAExecutionProvider" in available
    if kind == "cuda" and not has_cuda:
        raise SettingsError(f"--device {device}: this onnxruntime has no CUDA provider "
                            f"(it offers {', '.join(available)}); install onnxruntime-gpu "
                            f"instead of onnxruntime, or use --device cpu")
    if kind == "cuda" or (kind == "auto" and has_cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxDetector:
    """An exported detector run by ONNX Runtime, with ``AnomalyDetector.predict``'s interface.

    ``providers``: ONNX Runtime execution providers (None: the CPU). Attributes read from the
    file: ``class_name``, ``seed``, ``sample_num``, ``image_size``, ``stage``, ``layers``,
    ``fewshot_weight``, ``references`` (how many reference images are baked in), ``topk``,
    ``uncertainty`` (whether the spreads are outputs) and the whole ``metadata`` dict."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 session_options=None):
        ort = require_runtime()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise WeightsError(f"ONNX file not found at '{path}': export one with export.py "
                               f"(see README, Deploying a detector)")
        providers = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in providers if (p if isinstance(p, str) else p[0]) not in available]
        if missing:
            names = ", ".join(p if isinstance(p, str) else p[0] for p in missing)
            raise SettingsError(f"ONNX Runtime here has no {names} (it offers "
                                f"{', '.join(available)}): install onnxruntime-gpu instead of "
                                f"onnxruntime for CUDA, or use the CPU")
        try:
            self.session = ort.InferenceSession(path, sess_options=session_options,
                                                providers=providers)
        except Exception as e:  # noqa: BLE001 - any reader failure is the same user error
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise WeightsError(f"'{path}' cannot be loaded by ONNX Runtime ({type(e).__name__}: "
                               f"{first}); export it again with export.py") from None
        self.path = path
        self.metadata = decode_metadata(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED if k not in self.metadata]
        if self.metadata.get("format") != FORMAT or missing:
            raise WeightsError(f"'{path}' is not a Bayes-PFL detector written by export.py "
                               f"(its metadata lacks {', '.join(missing) or 'the format entry'}); "
                               f"export it with export.py")
        meta = self.metadata
        self.class_name: str = meta["class_name"]
        self.prompt: str = meta.get("prompt", "X " + prompt_class_name(self.class_name))
        self.seed = int(meta["seed"])
        self.sample_num = int(meta["sample_num"])
        self.image_size = int(meta["image_size"])
        self.stage = int(meta["stage"])
        self.layers = [int(x) for x in meta["layers"]]
        self.embed_dim = int(meta["embed_dim"])
        self.topk = int(meta["topk"])
        self.uncertainty = bool(meta["uncertainty"])
        self.references = int(meta["references"])
        self.fewshot_weight = float(meta.get("fewshot_weight", 1.0))
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.device = torch.device("cpu")           # where the outputs are returned

    def __repr__(self) -> str:
        return (f"OnnxDetector('{self.path}', class '{self.class_name}', seed {self.seed}, "
                f"R {self.sample_num}, {self.image_size} px, {self.references} references)")

    # --------------------------------------------------------------------------------------
    # Checks of what a call asks for against what the file fixes

    def check_class(self, class_names: Sequence[str] | str | None) -> None:
        """Each name must be worded in the prompt as the file's class (``metal_nut`` and
        ``metal nut`` are the same class) and have its top-k; else one SettingsError naming
        both."""
        if class_names is None:
            return
        for name in [class_names] if isinstance(class_names, str) else list(class_names):
            if not isinstance(name, str) or ("X " + prompt_class_name(name)) != self.prompt \
                    or min(topk_for_class(name), self.image_size ** 2) != self.topk:
                raise SettingsError(f"the class name '{name}' differs from '{self.class_name}', "
                                    f"the class {self.path} was exported for: export a file for "
                                    f"it (export.py --class_name \"{name}\")")

    def check_seed(self, seed: int | None) -> None:
        """The prompt noise is baked into the file: a seed other than the file's (or None,
        fresh draws) is one SettingsError naming both."""
        if seed is None or int(seed) != self.seed:
            asked = "no seed (fresh draws)" if seed is None else f"seed {seed}"
            raise SettingsError(f"{asked} was asked for but {self.path} has the noise of seed "
                                f"{self.seed} baked in: use --seed {self.seed}, or export the "
                                f"file again with --seed {seed if seed is not None else 'N'}")

    def reference_bank(self, images, chunk: int = 8, exif_transpose: bool = False):
        """References cannot be added to an exported file: one SettingsError."""
        raise SettingsError(f"few-shot references are baked into the file at export: "
                            f"{self.path} holds {self.references}; export it again with "
                            f"export.py --reference PATH ... to change them")

    def check_images(self, images) -> np.ndarray:
        """A preprocessed batch [B, 3, S, S] (torch tensor or numpy array) as contiguous
        float32, else one InputError (an image size other than the file's names both)."""
        s = self.image_size
        if isinstance(images, torch.Tensor):
            if not images.is_floating_point():
                raise InputError(f"the images are a {images.dtype} tensor: OnnxDetector.predict "
                                 f"takes preprocessed float batches (models.imaging.preprocess)")
            images = images.detach().cpu().float().numpy()
        elif isinstance(images, np.ndarray):
            if not np.issubdtype(images.dtype, np.floating):
                raise InputError(f"the images are a {images.dtype} array: OnnxDetector.predict "
                                 f"takes preprocessed float batches (models.imaging.preprocess)")
        else:
            raise InputError(f"the images must be a preprocessed float tensor [B, 3, {s}, {s}], "
                             f"not a {type(images).__name__}")
        shape = list(images.shape)
        if len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] and shape[2] != s:
            raise InputError(f"the images are {shape[2]} px but {self.path} was exported for "
                             f"{s} px: preprocess them at {s} px (or export again with "
                             f"--image_size {shape[2]})")
        if len(shape) != 4 or shape[1] != 3 or shape[2:] != [s, s]:
            raise InputError(f"the images have the shape {shape}: expected [B, 3, {s}, {s}]")
        if shape[0] == 0:
            raise InputError("the images are an empty batch: give at least one image")
        if not np.isfinite(images).all():
            raise InputError("the images hold NaN or infinite values")
        return np.ascontiguousarray(images, dtype=np.float32)

    def _check_noise(self, noise: dict | None, batch: int) -> None:
        if noise is None:
            return
        baked = shared_noise(self.sample_num, batch, self.embed_dim, self.seed)
        same = all(k in noise and tuple(noise[k].shape) == tuple(v.shape)
                   and torch.equal(noise[k].detach().cpu().float(), v) for k, v in baked.items())
        if not same:
            raise SettingsError(f"the noise given is not the draws baked into {self.path} "
                                f"(models.noise.shared_noise of seed {self.seed}): pass "
                                f"noise=None, or export the file again with the seed wanted")

    # --------------------------------------------------------------------------------------

    def predict(self, images, class_names: Sequence[str] | str | None = None,
                noise: dict[str, torch.Tensor] | None = None, return_std: bool = False,
                topk: Sequence[int] | None = None, references=None) -> dict[str, torch.Tensor]:
        """images [B, 3, S, S] (preprocessed) -> the dict of ``AnomalyDetector.predict``
        (CPU float32 tensors): ``image_score`` [B], ``anomaly_map`` [B, S, S] (unsmoothed),
        ``fewshot_map`` when references are baked in, and with ``return_std`` (a file
        exported with --uncertainty) ``anomaly_map_std``, ``image_score_std`` and, with
        ``topk``, ``score_std``. ``class_names``, ``noise``, ``topk``: checked against what
        the file fixes; ``references``: only the ones baked in (pass None)."""
        batch = self.check_images(images)
        self.check_class(class_names)
        if isinstance(class_names, (list, tuple)) and len(class_names) != batch.shape[0]:
            raise InputError(f"{len(class_names)} class names for {batch.shape[0]} images")
        self._check_noise(noise, batch.shape[0])
        if references is not None:
            self.reference_bank(references)
        if return_std and not self.uncertainty:
            raise SettingsError(f"{self.path} was exported without the spreads: export it again "
                                f"with --uncertainty")
        if topk is not None and any(int(k) != self.topk for k in topk):
            raise SettingsError(f"top-k {sorted(set(int(k) for k in topk))} asked for, but "
                                f"{self.path} computes score_std with k = {self.topk}")
        values = self.session.run(None, {"image": batch})
        out = {name: torch.from_numpy(np.asarray(v)) for name, v in zip(self.outputs, values)}
        if not return_std:
            out = {k: v for k, v in out.items() if k not in SPREADS}
        elif topk is None:
            out.pop("score_std", None)
        return out
