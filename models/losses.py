"""Bayes-PFL training losses (official definitions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """probs [B, 2, H, W] (softmax over normal/abnormal), target [B, H, W] in {0, 1}.

    Per pixel -(1 - p_t)^gamma log(p_t + 1e-8), averaged separately over foreground and
    background pixels; the two averages summed (an empty set contributes 0)."""
    target = target.long()
    p_t = probs.gather(1, target.unsqueeze(1)).squeeze(1)          # [B, H, W]
    loss = -((1 - p_t) ** gamma) * torch.log(p_t + 1e-8)
    fg = (target == 1).to(loss.dtype)
    bg = 1 - fg
    # masked means without a host sync; an empty set contributes 0 (its sum is 0)
    return ((loss * fg).sum() / fg.sum().clamp(min=1)
            + (loss * bg).sum() / bg.sum().clamp(min=1))


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """prob [B, H, W] abnormal probability, target [B, H, W]; over the whole batch:
    1 - (2 sum(p g) + 1e-5) / (sum p + sum g + 1e-5)."""
    inter = (prob * target).sum()
    return 1 - (2 * inter + 1e-5) / (prob.sum() + target.sum() + 1e-5)


def orthogonality_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """embeddings [B, N, D] (normalised): squared cosine similarities between the N prompts
    of each image, diagonal excluded, averaged over all B*N*N entries."""
    e = F.normalize(embeddings, dim=-1)
    sim = (e @ e.transpose(1, 2)) ** 2                              # [B, N, N]
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    return sim.masked_fill(eye, 0.0).mean()
