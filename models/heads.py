"""Bayes-PFL's heads on CLIP's patch tokens: residual cross-modal attention (RCA) and the
attention pooling of all layers' tokens (``fuse``) of the stage-2 image score."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Fuse(nn.Module):
    """Patch tokens of all layers -> one image-level vector (attention pooling)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fuse_modules = nn.Linear(in_dim, hidden)
        self.compress = nn.Linear(hidden, 1)
        self.post_process = nn.Linear(hidden, out_dim)

    def forward(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.fuse_modules(torch.cat(list(tokens), dim=-1))   # [B, G*G, V/2]
        weights = self.compress(x).softmax(dim=1)                 # [B, G*G, 1]
        pooled = (weights * x).sum(dim=1)                         # [B, V/2]
        return self.post_process(pooled)                          # [B, W]


class RCA(nn.Module):
    """Residual cross-modal attention: text embeddings attend to one layer's patch tokens."""

    def __init__(self, width: int, vision_width: int, num_layers: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q_proj_pre = nn.Conv1d(width, width, kernel_size=1)
        self.linear_proj = nn.ModuleList(
            nn.Linear(vision_width, width, bias=False) for _ in range(num_layers))

    def patch_features(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        """Raw tokens [B, G*G, V] -> F_s [B, G*G, W], L2-normalised."""
        return F.normalize(self.linear_proj[layer](tokens), dim=-1)

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """text [B, T, W] (normalised), patches F_s [B, G*G, W] -> updated text [B, T, W]."""
        b, t, w = text.shape
        h = self.heads
        q = self.q_proj_pre(text.transpose(1, 2)).transpose(1, 2)     # [B, T, W]
        q = q.reshape(b, t, h, w // h).transpose(1, 2)                # [B, h, T, W/h]
        kv = patches.reshape(b, -1, h, w // h).transpose(1, 2)        # [B, h, GG, W/h]
        att = (q @ kv.transpose(-1, -2) * w ** -0.5).softmax(-1)      # [B, h, T, GG]
        out = (att @ kv).transpose(1, 2).reshape(b, t, w)             # [B, T, W]
        return F.normalize(out + text, dim=-1)
