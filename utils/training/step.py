"""One training step: frozen CLIP encoding, the module DistributedDataParallel wraps, and the
forward-backward-step."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models import BayesPFL
from models.precision import autocast

from .config import LOSS_KEYS


# Steps
# ------------------------------------------------------------------------------------------------


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
