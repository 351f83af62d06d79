"""The official optimisers: four Adam groups by parameter name in stage 1, class_mapping /
image_mapping / fuse in stage 2, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ADAM_BETAS, GROUPS, STAGE2_MODULES, TrainConfig


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
