"""Bayes-PFL training: optimiser, schedule, two-stage control, validation, resumable state.

The protocol is the official one (SPEC section 6): a frozen CLIP, the auxiliary dataset's test
split with augmentation, one prompt of the bank per step, Adam with betas (0.5, 0.999) over four
parameter groups and a warm-up + cosine schedule in stage 1, then a second stage that trains
``class_mapping``, ``image_mapping`` and ``fuse`` on the cross-entropy alone. After every epoch
the module is validated (mean pixel AP of the raw maps, mean image AP of the text score over the
validation classes) and :class:`StageController` decides between remembering, restoring,
switching stage and stopping.

    from utils.training import TrainConfig, train
    result = train(TrainConfig(dataset="visa", epochs=30, seed=333))
    result.best_pixel_ap, result.history, result.best_path

Details worth knowing:

* Parameter groups are formed from ``model.named_parameters()``, which lists every parameter once,
  under its first registered name. The shared encoder therefore appears as ``context_encoder.*``
  and ``state_encoder.*``, the decoders as ``context_decoder.*`` / ``state_decoder.*`` (no
  ``PFL`` in these names: the "rest" group); the ``PFL`` group holds ``PFL_context.{amor_u,
  amor_w, amor_b, p_mu}`` and ``PFL_normal`` / ``PFL_abnormal``'s ``{amor_u, amor_w, amor_b,
  state, p_mu}``. The aliases ``PFL_*.encoder.*`` / ``PFL_*.decoder.*`` would be excluded from
  the PFL group by the encoder/decoder rule anyway, so no parameter can fall in two groups.
* Parameters that receive no gradient in a stage (stage 1: the decoders, ``p_mu``, ``fuse``,
  ``image_mapping``; stage 2: all but ``class_mapping``, ``image_mapping``, ``fuse``) are marked
  ``requires_grad=False`` for that stage. Adam skips them either way (their gradient is None),
  so updates are unchanged; it lets DistributedDataParallel run without
  ``find_unused_parameters``.
* The prompt index of each step: ``torch.randint(prompt_num, (steps,), generator=g)`` drawn at the
  start of an epoch from a CPU ``torch.Generator`` seeded from (seed, epoch), the same on every
  rank.
* Randomness is re-derived from (seed, epoch, rank) at the start of every epoch (Python, NumPy,
  torch, the DataLoader's generator, the DistributedSampler's epoch) and validation draws its
  Monte Carlo samples from (seed, epoch) in a forked RNG. Nothing random is carried from one
  epoch to the next, so a run stopped after epoch k and resumed from ``last.pth`` is identical
  to an uninterrupted one.
* Epochs are numbered from 1 (``epoch_post_1_1.pth`` is written after the first epoch, trained
  in stage 1). The stage in a file name is the stage the epoch was trained in; the file holds the
  parameters that were validated, before any restore.
* ``best.pth`` holds the best parameters of the stage reached last (stage 1 by pixel AP, then
  stage 2 by image AP). Stage 2 starts its own best image AP afresh at the switch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from dataset.data import AnomalyDataset, DatasetError, load_meta, make_loader
from models import AnomalyDetector, BayesPFL, load_clip
from utils import distributed as dist_utils
from models.spec import ModelSpec
from utils.checkpoint import atomic_save, save_checkpoint
from utils.evaluate import iterate_classes
from utils.metrics import average_precision
from utils.misc import autocast, resolve_device, set_seed

log = logging.getLogger("bayes_pfl.train")

# Training dataset -> (validation dataset, classes): the official cross-dataset validation.
OFFICIAL_VALIDATION = {
    "visa": ("mvtec", ("bottle", "hazelnut", "wood", "zipper", "leather")),
    "mvtec": ("visa", ("chewinggum", "cashew", "pipe_fryum", "capsules", "candle")),
}
ADAM_BETAS = (0.5, 0.999)
STAGE2_MODULES = ("class_mapping", "image_mapping", "fuse")
GROUPS = ("prompt", "temperature", "PFL", "rest")
LOSS_KEYS = ("loss", "loss_ce", "loss_seg", "loss_focal", "loss_dice", "loss_kl",
             "loss_kl_context", "loss_kl_normal", "loss_kl_abnormal", "loss_orth")
SHOWN_LOSSES = ("loss", "loss_ce", "loss_seg", "loss_kl", "loss_orth")   # on the progress bar
RESUME_FORMAT = 2

# Purposes of derived seeds (see derive_seed).
_SEED_GLOBAL, _SEED_LOADER, _SEED_PROMPT, _SEED_VALIDATION, _SEED_CACHE = range(5)


class TrainingError(ValueError):
    """A training setting or file the user can fix (the message says what to do)."""


# ------------------------------------------------------------------------------------------------
# Configuration and result
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Mirrors train.py's flags (same names and defaults)."""

    dataset: str = "visa"
    train_data_path: str = "./dataset/mvisa/data"
    val_data_path: str = "./dataset/mvisa/data"
    save_path: str = "./my_exps/train_visa"
    pretrained_path: str = "./pretrained_weight/ViT-L-14-336px.pt"
    prompt_context_len: int = 5
    prompt_num: int = 3
    prompt_state_len: int = 5
    learning_rate: float = 1e-4            # accepted, no effect (as officially)
    learning_rate_PFL: float = 1e-3
    learning_rate_prompt: float = 1e-3
    learning_rate_linear: float = 1e-4     # the stage-1 "rest" group and stage 2
    temperature_lr: float = 0.01
    features_list: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    image_size: int = 518
    batch_size: int = 32                   # per process
    epochs: int = 30
    sample_num: int = 5                    # validation R
    num_flows: int = 10
    seed: int = 111
    print_freq: int = 10
    save_freq: int = 1
    device: str = "auto"
    device_id: int | None = None
    num_workers: int = 4
    precision: str = "fp32"
    tf32: bool = False                     # allow TF32 matmuls on CUDA
    activation: str = "gelu"
    resume: str | None = None
    val_dataset: str | None = None
    val_classes: list[str] | None = None
    val_batch_size: int = 8
    patience: int = 3
    warmup_ratio: float = 0.1
    stop_after: int | None = None
    verify_weights: bool = True
    # Opt-in options for small runs (off by default: the official behaviour).
    cache_features: bool = False
    cache_size: int | None = None
    lr_overrides: dict[str, float] | None = None

    def __post_init__(self):
        self.features_list = [int(x) for x in self.features_list]
        if self.val_classes is not None:
            self.val_classes = list(self.val_classes)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise TrainingError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        unknown = set(self.lr_overrides or {}) - set(GROUPS) - {"stage2"}
        if unknown:
            raise TrainingError(f"unknown learning-rate group(s) {sorted(unknown)}; the groups "
                                f"are {', '.join(GROUPS)} and stage2")
        for name in ("batch_size", "epochs", "sample_num", "save_freq", "val_batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be at least 1, not {getattr(self, name)}")
        if int(self.patience) < 0:
            raise TrainingError(f"patience must be at least 0, not {self.patience}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """Outcome of a run. ``best_pixel_ap`` / ``best_image_ap``: the best validation figures of
    stage 1 / stage 2 (None when the stage saw no scorable epoch); ``best_epoch``: stage -> epoch
    of that figure; ``history``: one record per epoch (losses, figures, per-class figures,
    learning rates, decision); ``checkpoints``: the epoch_post files written; ``model``: the
    module as training left it (after an early stop, the current parameters: the
    official rule does not restore; ``best.pth`` holds the best stage-2 ones)."""

    best_pixel_ap: float | None
    best_image_ap: float | None
    best_epoch: dict[int, int | None]
    switch_epoch: int | None
    stopped_early: bool
    final_stage: int
    epochs_run: int
    history: list[dict]
    checkpoints: list[str]
    best_path: str | None
    last_path: str | None
    model: BayesPFL | None = field(default=None, repr=False)


def model_spec(config: TrainConfig, clip) -> ModelSpec:
    """The settings of the model a run trains (recorded in its checkpoints)."""
    return ModelSpec(prompt_num=config.prompt_num, prompt_context_len=config.prompt_context_len,
                     prompt_state_len=config.prompt_state_len, num_flows=config.num_flows,
                     layers=tuple(config.features_list), image_size=config.image_size,
                     activation=config.activation, backbone=clip.geometry.name)


# ------------------------------------------------------------------------------------------------
# Optimisation pieces
# ------------------------------------------------------------------------------------------------


def parameter_group(name: str) -> str:
    """The official optimiser group of a parameter name."""
    if "prompt" in name:
        return "prompt"
    if name in ("temperature_pixel", "temperature_image"):
        return "temperature"
    if "PFL" in name and "encoder" not in name and "decoder" not in name:
        return "PFL"
    return "rest"


def group_learning_rates(config: TrainConfig) -> dict[str, float]:
    """Group -> lr. As officially, ``learning_rate_linear`` sets the stage-1 "rest" group and
    the stage-2 optimiser, and ``learning_rate`` sets nothing."""
    lrs = {"prompt": config.learning_rate_prompt, "temperature": config.temperature_lr,
           "PFL": config.learning_rate_PFL, "rest": config.learning_rate_linear,
           "stage2": config.learning_rate_linear}
    lrs.update(config.lr_overrides or {})
    return lrs


def group_parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """Group -> parameter names (``named_parameters`` order, each parameter once)."""
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        groups[parameter_group(name)].append(name)
    return groups


def stage_parameter_names(model: nn.Module, stage: int) -> list[str]:
    """Names of the parameters that receive gradients in ``stage``."""
    names = [n for n, _ in model.named_parameters()]
    if stage == 2:
        return [n for n in names if n.split(".")[0] in STAGE2_MODULES]
    return [n for n in names
            if not ("decoder" in n or ".p_mu." in n or n.split(".")[0] in ("fuse", "image_mapping"))]


def set_trainable(model: nn.Module, stage: int | None) -> None:
    """requires_grad for the parameters of ``stage`` only (None: all parameters)."""
    keep = None if stage is None else set(stage_parameter_names(model, stage))
    for name, p in model.named_parameters():
        p.requires_grad_(keep is None or name in keep)


def make_optimizer(model: nn.Module, config: TrainConfig, stage: int) -> torch.optim.Adam:
    """Stage 1: Adam over all parameters in the four official groups; stage 2: Adam over
    class_mapping, image_mapping and fuse. Each group carries its name under "group"."""
    lrs = group_learning_rates(config)
    params = dict(model.named_parameters())
    if stage == 1:
        groups = [{"params": [params[n] for n in names], "lr": lrs[g], "group": g}
                  for g, names in group_parameter_names(model).items() if names]
    else:
        groups = [{"params": [params[n] for n in stage_parameter_names(model, 2)],
                   "lr": lrs["stage2"], "group": "stage2"}]
    return torch.optim.Adam(groups, betas=ADAM_BETAS)


class WarmupCosine:
    """lr factor: step / warmup for step < warmup, then 0.5 (1 + cos(pi (step - warmup) /
    (total - warmup))). A callable object so that LambdaLR saves its settings."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup_steps) / span))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over int(warmup_ratio * total_steps) steps, then cosine; step it after
    every optimiser step."""
    schedule = WarmupCosine(int(warmup_ratio * total_steps), total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ------------------------------------------------------------------------------------------------
# Stage logic
# ------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What to do after one epoch's validation."""
    epoch: int
    stage: int             # the stage the epoch was trained in
    value: float           # the figure that stage selects on (pixel AP, then image AP)
    improved: bool         # remember the parameters (and write best.pth)
    patience: int
    restore: bool = False  # load the remembered parameters of ``stage``
    switch: bool = False   # start stage 2 (new optimiser)
    stop: bool = False     # training ends


class StageController:
    """The official two-stage rule, free of tensors and files.

    A counter ``patience`` starts at 0 and the best figure of each stage at 0. Stage 1 selects
    on pixel AP: a value >= the best so far is an improvement (remember the parameters, reset
    the counter). Otherwise, if the counter already equals ``patience`` (3), the remembered
    parameters are restored and stage 2 starts; in either case the counter then goes up by
    one. The switch therefore comes at the (patience + 1)-th consecutive epoch without
    improvement (the 4th with the official 3). Stage 2 does the same with image AP, its best
    starting again at 0 (so its first epoch always improves and resets the counter), and
    stops instead of switching, keeping the current parameters (no restore). NaN (no class
    could be scored) never improves."""

    def __init__(self, patience: int = 3):
        self.patience_limit = int(patience)
        self.stage = 1
        self.patience = 0
        self.best = {1: 0.0, 2: 0.0}
        self.best_epoch: dict[int, int | None] = {1: None, 2: None}
        self.switch_epoch: int | None = None
        self.finished = False

    def update(self, epoch: int, pixel_ap: float, image_ap: float) -> Decision:
        if self.finished:
            raise RuntimeError("training has already stopped")
        stage = self.stage
        value = float(pixel_ap if stage == 1 else image_ap)
        improved = value >= self.best[stage]          # False for NaN
        decision = Decision(epoch, stage, value, improved, self.patience)
        if improved:
            self.best[stage] = value
            self.best_epoch[stage] = epoch
            self.patience = 0
        else:
            if self.patience == self.patience_limit:
                if stage == 1:
                    decision.restore = decision.switch = True
                    self.stage = 2
                    self.switch_epoch = epoch
                else:
                    decision.stop = True
                    self.finished = True
            self.patience += 1
        decision.patience = self.patience
        return decision

    def state_dict(self) -> dict:
        return {"patience_limit": self.patience_limit, "stage": self.stage,
                "patience": self.patience, "best": dict(self.best),
                "best_epoch": dict(self.best_epoch), "switch_epoch": self.switch_epoch,
                "finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        self.patience_limit = int(state["patience_limit"])
        self.stage = int(state["stage"])
        self.patience = int(state["patience"])
        self.best = {int(k): float(v) for k, v in state["best"].items()}
        self.best_epoch = {int(k): v for k, v in state["best_epoch"].items()}
        self.switch_epoch = state["switch_epoch"]
        self.finished = bool(state["finished"])


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass
class DataPlan:
    train_dataset: str
    train_root: str
    train_classes: list[str] | None    # None: all classes
    val_dataset: str
    val_root: str
    val_classes: list[str] | None
    held_out: bool                     # validation classes removed from the training data


def plan_data(config: TrainConfig) -> DataPlan:
    """Which classes train and which validate (official cross-dataset choice by default)."""
    official = OFFICIAL_VALIDATION.get(config.dataset)
    val_dataset = config.val_dataset
    if val_dataset is None:
        if official is None:
            raise TrainingError(
                f"there is no official validation set for --dataset {config.dataset}; pass "
                f"--val_dataset and --val_classes (e.g. --val_dataset {config.dataset} "
                f"--val_classes <held-out classes>)")
        val_dataset = official[0]
    val_classes = config.val_classes
    if not val_classes:
        if official is not None and val_dataset == official[0]:
            val_classes = list(official[1])
        elif val_dataset == config.dataset:
            raise TrainingError(
                f"validating on the training dataset {config.dataset} needs --val_classes: the "
                f"classes to hold out of training and validate on")
        else:
            val_classes = None
    train_classes = None
    held_out = val_dataset == config.dataset
    if held_out:
        available = sorted(load_meta(config.train_data_path, config.dataset)["test"])
        unknown = [c for c in val_classes if c not in available]
        if unknown:
            raise DatasetError(f"validation class(es) {', '.join(unknown)} are not in "
                               f"{config.train_data_path}/meta_{config.dataset}.json; available: "
                               f"{', '.join(available)}")
        train_classes = [c for c in available if c not in set(val_classes)]
        if not train_classes:
            raise TrainingError(f"--val_classes holds out every class of {config.dataset}; "
                                f"leave some for training")
    return DataPlan(config.dataset, config.train_data_path, train_classes, val_dataset,
                    config.val_data_path, val_classes, held_out)


class FeatureCache(Dataset):
    """Frozen-CLIP outputs of a fixed pool of training images (no augmentation), kept in memory.

    Items: ``global`` [D], ``tokens`` [L, G*G, V], ``mask`` [1, S, S], ``label``, ``cls_name``."""

    def __init__(self, features: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor,
                 labels: torch.Tensor, class_names: list[str]):
        self.features, self.tokens, self.masks = features, tokens, masks
        self.labels, self.class_names = labels, class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"global": self.features[index], "tokens": self.tokens[index],
                "mask": self.masks[index].float(), "label": int(self.labels[index]),
                "cls_name": self.class_names[index]}


@torch.no_grad()
def build_feature_cache(clip, dataset: AnomalyDataset, config: TrainConfig,
                        device: torch.device, progress: Callable | None = None) -> FeatureCache:
    """Encode a seeded subset of ``cache_size`` images (all when None) of ``dataset`` (which
    should have augmentation and mosaic off) once with the frozen CLIP."""
    n = len(dataset)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, 0, 0, _SEED_CACHE))
    pool = torch.randperm(n, generator=generator)[:config.cache_size or n].sort().values
    subset = torch.utils.data.Subset(dataset, pool.tolist())
    loader = make_loader(subset, batch_size=config.batch_size, shuffle=False,
                         num_workers=config.num_workers, seed=config.seed)
    feats, toks, masks, labels, names = [], [], [], [], []
    for batch in _progress(progress, loader, "caching CLIP features"):
        g, tokens = encode_images(clip, batch["image"], config.features_list, device,
                                  config.precision)
        feats.append(g.cpu())
        toks.append(torch.stack(tokens, dim=1).cpu())             # [B, L, GG, V]
        masks.append(batch["mask"].bool())
        labels.append(batch["label"])
        names.extend(batch["cls_name"])
    return FeatureCache(torch.cat(feats), torch.cat(toks), torch.cat(masks), torch.cat(labels),
                        names)


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def derive_seed(seed: int, epoch: int, rank: int, purpose: int) -> int:
    """A 32-bit seed for one purpose of one epoch on one rank."""
    return int(np.random.SeedSequence([int(seed) % 2**32, epoch, rank, purpose])
               .generate_state(1)[0])


@torch.no_grad()
def encode_images(clip, images: torch.Tensor, layers: Sequence[int], device: torch.device,
                  precision: str = "fp32") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Frozen CLIP: images [B, 3, S, S] -> global feature [B, D], layer tokens [B, G*G, V]
    (fp32)."""
    images = images.to(device, non_blocking=True)
    with autocast(device, precision):
        g, tokens = clip.encode_image(images, list(layers))
    return g.float(), [t.float() for t in tokens]


class TrainingStep(nn.Module):
    """The module DistributedDataParallel wraps: its forward is ``training_forward``.

    The frozen CLIP is held in a tuple so that it is neither registered nor broadcast."""

    def __init__(self, model: BayesPFL, clip):
        super().__init__()
        self.model = model
        self._clip = (clip,)

    def forward(self, image_features: torch.Tensor, tokens: list[torch.Tensor],
                class_names: Sequence[str], labels: torch.Tensor, masks: torch.Tensor,
                prompt_index: int, stage: int, noise: dict | None = None) -> dict:
        return self.model.training_forward(self._clip[0], image_features, tokens, class_names,
                                           labels, masks, prompt_index, stage, noise)


def optimisation_step(forward: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, image_features: torch.Tensor,
                      tokens: list[torch.Tensor], class_names: Sequence[str],
                      labels: torch.Tensor, masks: torch.Tensor, prompt_index: int, stage: int,
                      device: torch.device, precision: str = "fp32", noise: dict | None = None
                      ) -> dict[str, torch.Tensor]:
    """Forward, backward and one optimiser step; returns the detached loss terms (on device,
    no synchronisation)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = forward(image_features, tokens, class_names, labels.to(device, non_blocking=True),
                      masks.to(device, non_blocking=True), prompt_index, stage, noise)
    loss = out["loss"]
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return {k: out[k].detach().float() for k in LOSS_KEYS if k in out}


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@dataclass
class ValidationResult:
    pixel_ap: float
    image_ap: float
    per_class: dict[str, dict[str, float | None]]
    skipped: list[str] = field(default_factory=list)     # log lines of skipped figures


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


@torch.no_grad()
def validate(clip, model: BayesPFL, loader: Iterable[dict], config: TrainConfig, stage: int,
             seed: int, progress: Callable | None = None) -> ValidationResult:
    """Per class: AP of the raw maps over all pixels and AP of the text scores; then the mean
    over classes. Fresh image-agnostic samples, drawn from ``seed`` in a forked RNG (the
    caller's RNG state is untouched); the batch size does not change the samples."""
    device = next(model.parameters()).device
    detector = AnomalyDetector(clip, model, config.image_size, config.sample_num, stage,
                               config.features_list, precision=config.precision)
    detector.reset_samples()
    per_class: dict[str, dict[str, float | None]] = {}
    skipped: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for out in iterate_classes(detector, loader, progress=progress is not None,
                                   desc="validation", leave=False):
            pixel = image = None
            if out.masks.any() and not out.masks.all():
                pixel = average_precision(out.masks, out.maps)
            else:
                skipped.append(f"class {out.name}: no anomalous pixels, left out of the mean "
                               "pixel AP")
            if 0 < out.labels.sum() < len(out.labels):
                image = average_precision(out.labels, out.text_scores)
            else:
                skipped.append(f"class {out.name}: one image label only, left out of the mean "
                               "image AP")
            per_class[out.name] = {"pixel_ap": pixel, "image_ap": image}
    pixel_ap = _mean([v["pixel_ap"] for v in per_class.values() if v["pixel_ap"] is not None])
    image_ap = _mean([v["image_ap"] for v in per_class.values() if v["image_ap"] is not None])
    return ValidationResult(pixel_ap, image_ap, per_class, skipped)


# ------------------------------------------------------------------------------------------------
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


def _cpu_copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def read_resume_state(path: str) -> dict:
    """The contents of a ``last.pth`` written by :class:`Trainer`."""
    if not os.path.isfile(path):
        raise TrainingError(f"resume checkpoint {path} not found; train without --resume first "
                            f"or give the path of an existing last.pth")
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
    return state


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


class RunningLosses:
    """Running mean losses on a progress bar, without making the host wait for the device:
    each update copies the sums to the host without blocking (on CUDA, into pinned memory,
    with an event recorded after the copy) and shows the latest copy that has arrived, so the
    figures may lag one update behind. On the CPU they are shown at once."""

    def __init__(self, bar, device: torch.device):
        self.bar = bar
        self.device = device
        self.pending: list[tuple[list[str], torch.Tensor, int, Any]] = []

    def update(self, sums: dict[str, torch.Tensor], count: int) -> None:
        keys = list(sums)
        values = torch.stack([sums[k] for k in keys]).detach()
        if self.device.type != "cuda":
            self._show(keys, values, count)
            return
        event = torch.cuda.Event()
        host = values.to("cpu", non_blocking=True)
        event.record()
        self.pending.append((keys, host, count, event))
        ready = None
        while self.pending and self.pending[0][3].query():   # query() does not wait
            ready = self.pending.pop(0)
        if ready is not None:
            self._show(*ready[:3])

    def _show(self, keys: list[str], values: torch.Tensor, count: int) -> None:
        self.bar.set_postfix({k.replace("loss_", ""): f"{v / count:.4f}"
                              for k, v in zip(keys, values.tolist())})


def _progress(progress: Callable | None, iterable, desc: str, **kwargs):
    if progress is None:
        return iterable
    return progress(iterable, desc=desc, **kwargs)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the two-stage training.

    ``callback(record)`` is called after every epoch with that epoch's history record (a dict);
    returning True stops training after that epoch (resumable; with several processes rank 0's
    answer counts). ``progress(iterable, desc=..., total=..., leave=...)`` wraps loops in a
    progress bar (e.g. ``tqdm.tqdm``); a bar with ``set_postfix`` shows the running losses every
    ``print_freq`` steps. Subclasses may replace :meth:`validate`."""

    def __init__(self, config: TrainConfig, callback: Callable[[dict], Any] | None = None,
                 progress: Callable | None = None):
        self.config = config
        self.callback = callback
        self.progress = progress
        self.device = resolve_device(config.device, config.device_id)
        torch.backends.cuda.matmul.allow_tf32 = bool(config.tf32)
        info = dist_utils.env_info()
        if info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(self.device)
        self.dist = dist_utils.init_distributed(self.device)
        self.main = self.dist.is_main
        self._file_handler: logging.Handler | None = None
        self.ddp: nn.Module | None = None

    # -- logging ---------------------------------------------------------------------------

    def info(self, message: str) -> None:
        if self.main:
            log.info(message)

    def _open_log(self) -> None:
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
        if self.main:
            os.makedirs(self.config.save_path, exist_ok=True)
            handler = logging.FileHandler(os.path.join(self.config.save_path, "train.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                   "%Y-%m-%d %H:%M:%S"))
            log.addHandler(handler)
            self._file_handler = handler

    def _close_log(self) -> None:
        if self._file_handler is not None:
            log.removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        self.plan = plan_data(cfg)
        train_ds = AnomalyDataset(self.plan.train_root, self.plan.train_dataset, mode="train",
                                  image_size=cfg.image_size, class_names=self.plan.train_classes,
                                  seed=cfg.seed)
        self.val_ds = AnomalyDataset(self.plan.val_root, self.plan.val_dataset, mode="test",
                                     image_size=cfg.image_size, class_names=self.plan.val_classes)
        self.clip = load_clip(cfg.pretrained_path, image_size=cfg.image_size, device=self.device,
                              activation=cfg.activation, verify=cfg.verify_weights)
        torch.manual_seed(cfg.seed)
        self.spec = model_spec(cfg, self.clip)
        self.model = BayesPFL.from_clip(self.clip, **self.spec.bayes_pfl_kwargs())
        self.model.to(self.device)
        dist_utils.broadcast_module(self.model)
        self.step_module = TrainingStep(self.model, self.clip)

        if cfg.cache_features:
            plain = AnomalyDataset(self.plan.train_root, self.plan.train_dataset, mode="train",
                                   image_size=cfg.image_size,
                                   class_names=self.plan.train_classes, augment=False,
                                   mosaic_prob=0.0)
            self.train_set: Dataset = build_feature_cache(
                self.clip, plain, cfg, self.device, self.progress if self.main else None)
            workers = 0
        else:
            self.train_set = train_ds
            workers = cfg.num_workers
        self.sampler = None
        if self.dist.enabled:
            self.sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world_size,
                                              rank=self.dist.rank, shuffle=True, seed=cfg.seed,
                                              drop_last=False)
        self.loader = make_loader(self.train_set, batch_size=cfg.batch_size, shuffle=True,
                                  num_workers=workers, seed=cfg.seed, drop_last=False,
                                  sampler=self.sampler)
        self.val_loader = make_loader(self.val_ds, batch_size=cfg.val_batch_size, shuffle=False,
                                      num_workers=cfg.num_workers, seed=cfg.seed)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.controller = StageController(cfg.patience)
        self.remembered: dict[int, dict[str, torch.Tensor]] = {}
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=cfg.precision == "fp16" and self.device.type == "cuda")
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.checkpoints: list[str] = []
        self.best_path: str | None = None
        self._enter_stage(1)
        # read now, so that a bad file is reported before training starts; applied by run()
        self._resume_state = read_resume_state(cfg.resume) if cfg.resume else None

    def _enter_stage(self, stage: int) -> None:
        """Trainable parameters, optimiser, schedule (stage 1 only) and DDP wrapper of a stage."""
        set_trainable(self.model, stage)
        self.optimizer = make_optimizer(self.model, self.config, stage)
        self.scheduler = (make_scheduler(self.optimizer, self.total_steps, self.config.warmup_ratio)
                          if stage == 1 else None)
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.step_module, device_ids=ids)

    def _resume(self, path: str, state: dict) -> None:
        saved = state["config"]
        differs = {k: (saved.get(k), v) for k, v in self.config.to_dict().items()
                   if k not in ("resume", "stop_after", "device", "device_id", "num_workers",
                                "print_freq", "tf32") and saved.get(k) != v}
        if differs:
            self.info("resuming with settings that differ from the saved run (saved -> now): "
                      + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differs.items()))
        self.controller.load_state_dict(state["controller"])
        self.model.load_state_dict(state["model"])
        if self.controller.stage != 1:
            self._enter_stage(self.controller.stage)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.remembered = {int(k): v for k, v in state["remembered"].items()}
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.checkpoints = list(state["checkpoints"])
        self.best_path = state.get("best_path")
        set_rng_state(state["rng"])
        self.info(f"resumed from {path}: epoch {self.epoch} done, stage {self.controller.stage}, "
                  f"step {self.global_step}")

    # -- epochs ----------------------------------------------------------------------------

    def _seed_epoch(self, epoch: int) -> list[int]:
        cfg, rank = self.config, self.dist.rank
        set_seed(derive_seed(cfg.seed, epoch, rank, _SEED_GLOBAL))
        if isinstance(self.train_set, AnomalyDataset):
            self.train_set.set_epoch(epoch)           # per-sample draws of this epoch
        self.loader.generator.manual_seed(derive_seed(cfg.seed, epoch, rank, _SEED_LOADER))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        prompts = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 0, _SEED_PROMPT))
        return torch.randint(cfg.prompt_num, (self.steps_per_epoch,), generator=prompts).tolist()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of the current stage; returns the mean loss terms (over all ranks)."""
        cfg, device, stage = self.config, self.device, self.controller.stage
        prompt_indices = self._seed_epoch(epoch)
        self.model.train()
        forward = self.ddp if self.ddp is not None else self.step_module
        sums = {k: torch.zeros((), device=device) for k in LOSS_KEYS}
        count = 0
        bar = _progress(self.progress if self.main else None, self.loader,
                        f"epoch {epoch}/{cfg.epochs} stage {stage}", total=self.steps_per_epoch)
        display = RunningLosses(bar, device) if hasattr(bar, "set_postfix") else None
        for step, batch in enumerate(bar):
            if "global" in batch:                                  # cached features
                g = batch["global"].to(device, non_blocking=True)
                tokens = [t.to(device, non_blocking=True) for t in batch["tokens"].unbind(1)]
            else:
                g, tokens = encode_images(self.clip, batch["image"], cfg.features_list, device,
                                          cfg.precision)
            losses = optimisation_step(forward, self.optimizer, self.scaler, g, tokens,
                                       list(batch["cls_name"]), batch["label"], batch["mask"],
                                       prompt_indices[step], stage, device, cfg.precision)
            if self.scheduler is not None:
                self.scheduler.step()
            self.global_step += 1
            count += 1
            for k, v in losses.items():
                sums[k] += v
            if cfg.print_freq and (step + 1) % cfg.print_freq == 0 and display is not None:
                display.update({k: v for k, v in sums.items() if k in losses and k in SHOWN_LOSSES},
                               count)
        if hasattr(bar, "close"):
            bar.close()
        keys = [k for k in LOSS_KEYS if stage == 1 or k in ("loss", "loss_ce")]
        totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(count), device=device)])
        totals = dist_utils.all_reduce_sum(totals).tolist()
        return {k: totals[i] / totals[-1] for i, k in enumerate(keys)}

    def validate(self, epoch: int) -> ValidationResult:
        """Validation of the current parameters (rank 0 only)."""
        return validate(self.clip, self.model, self.val_loader, self.config,
                        self.controller.stage,
                        derive_seed(self.config.seed, epoch, 0, _SEED_VALIDATION), self.progress)

    def _save_last(self, finished: bool) -> str:
        path = os.path.join(self.config.save_path, "last.pth")
        atomic_save({
            "format": RESUME_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "controller": self.controller.state_dict(),
            "remembered": self.remembered,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "rng": rng_state(),
            "config": self.config.to_dict(),
            "history": self.history,
            "checkpoints": self.checkpoints,
            "best_path": self.best_path,
            "finished": finished,
            "stage": self.history[-1]["stage"] if self.history else 1,
            "model_spec": self.spec.to_dict(),
        }, path)
        return path

    def _learning_rates(self) -> dict[str, float]:
        return {g["group"]: g["lr"] for g in self.optimizer.param_groups}

    def _log_epoch(self, record: dict, result: ValidationResult) -> None:
        losses = " ".join(f"{k}={v:.4f}" for k, v in record["losses"].items())
        lrs = " ".join(f"{k}={v:.3g}" for k, v in record["lr"].items())
        self.info(f"epoch {record['epoch']} stage {record['stage']}: {losses} | "
                  f"pixel AP {result.pixel_ap:.4f} image AP {result.image_ap:.4f} | lr {lrs}")
        for name, figures in result.per_class.items():
            text = " ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in figures.items())
            self.info(f"  {name}: {text}")
        for line in result.skipped:
            self.info(f"  {line}")

    def run(self) -> TrainResult:
        cfg = self.config
        try:
            self.setup()            # data, weights, model: problems surface before any output
            self._open_log()
            self.info("arguments: " + json.dumps(cfg.to_dict(), sort_keys=True))
            self.info(f"training {self.plan.train_dataset} classes "
                      f"{self.plan.train_classes or 'all'}; validating on {self.plan.val_dataset} "
                      f"{self.plan.val_classes or 'all'}"
                      + (" (held out of training)" if self.plan.held_out else "")
                      + f"; {self.dist.world_size} process(es) x batch {cfg.batch_size}, "
                      f"{self.steps_per_epoch} steps per epoch, device {self.device}")
            if self._resume_state is not None:
                self._resume(cfg.resume, self._resume_state)
                self._resume_state = None
            return self._loop()
        finally:
            if hasattr(self, "model"):
                set_trainable(self.model, None)
            self._close_log()

    def _loop(self) -> TrainResult:
        cfg = self.config
        stopped_early = self.controller.finished
        last_path = os.path.join(cfg.save_path, "last.pth") if self.epoch else None
        if self.epoch and (stopped_early or self.epoch >= cfg.epochs):
            self.info(f"{last_path} is a finished run (epoch {self.epoch}); nothing to train")
        while not self.controller.finished and self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            stage = self.controller.stage
            losses = self.train_epoch(epoch)
            result = self.validate(epoch) if self.main else None
            result = dist_utils.broadcast_object(result)
            record = {"epoch": epoch, "stage": stage, "losses": losses,
                      "pixel_ap": result.pixel_ap, "image_ap": result.image_ap,
                      "per_class": result.per_class, "lr": self._learning_rates()}
            self._log_epoch(record, result)
            if self.main and epoch % cfg.save_freq == 0:
                path = os.path.join(cfg.save_path, f"epoch_post_{epoch}_{stage}.pth")
                save_checkpoint(self.model, path, stage, self.spec)
                self.checkpoints.append(path)
            decision = self.controller.update(epoch, result.pixel_ap, result.image_ap)
            if decision.improved:
                self.remembered[stage] = _cpu_copy(self.model.state_dict())
                if self.main:
                    self.best_path = os.path.join(cfg.save_path, "best.pth")
                    save_checkpoint(self.model, self.best_path, stage, self.spec)
                self.info(f"epoch {epoch}: best {'pixel' if stage == 1 else 'image'} AP so far "
                          f"({decision.value:.4f}); parameters remembered, best.pth written")
            if decision.restore:
                if stage in self.remembered:
                    self.model.load_state_dict(self.remembered[stage])
                dist_utils.broadcast_module(self.model)
                self.info(f"no better pixel AP for {decision.patience} epochs: restored the "
                          f"parameters of epoch {self.controller.best_epoch[stage]}")
            if decision.switch:
                self.remembered.pop(1, None)
                self._enter_stage(2)
                self.info(f"switching to stage 2 after epoch {epoch} (class_mapping, "
                          f"image_mapping, fuse at lr {group_learning_rates(cfg)['stage2']:g})")
            if decision.stop:
                stopped_early = True
                self.info(f"no better image AP for {decision.patience} epochs: stage 2 stopped "
                          f"after epoch {epoch}, keeping the current parameters; best image AP "
                          f"{self.controller.best[2]:.4f} at epoch {self.controller.best_epoch[2]}"
                          f" (best.pth)")
            record["decision"] = dataclasses.asdict(decision)
            self.history.append(record)
            self.epoch = epoch
            finished = decision.stop or epoch >= cfg.epochs
            if self.main:
                last_path = self._save_last(finished)
            dist_utils.barrier()
            wants_stop = bool(self.callback(record)) if self.callback is not None else False
            wants_stop = dist_utils.broadcast_object(wants_stop)
            if wants_stop or (cfg.stop_after is not None and epoch >= cfg.stop_after):
                if not finished:
                    self.info(f"stopping after epoch {epoch}; --resume continues from {last_path}")
                break
        if self.best_path and self.controller.best_epoch[2] is None and self.epoch >= cfg.epochs:
            self.info("best.pth holds stage-1 parameters (no stage-2 epoch was validated); "
                      "evaluate them as stage 1, e.g. with the matching epoch_post_*_1.pth")
        best = {k: (v if self.controller.best_epoch[k] is not None else None)
                for k, v in self.controller.best.items()}
        return TrainResult(
            best_pixel_ap=best[1], best_image_ap=best[2], best_epoch=dict(self.controller.best_epoch),
            switch_epoch=self.controller.switch_epoch, stopped_early=stopped_early,
            final_stage=self.controller.stage, epochs_run=self.epoch, history=self.history,
            checkpoints=list(self.checkpoints), best_path=self.best_path, last_path=last_path,
            model=self.model)


def train(config: TrainConfig, callback: Callable[[dict], Any] | None = None,
          progress: Callable | None = None) -> TrainResult:
    """Train Bayes-PFL as configured (see :class:`Trainer` for ``callback`` and ``progress``).

    Raises ``models.WeightsError`` (CLIP weights), ``dataset.data.DatasetError`` (data files) or
    :class:`TrainingError` (settings, resume file) for problems the user can fix."""
    return Trainer(config, callback, progress).run()
