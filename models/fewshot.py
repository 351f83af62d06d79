"""Few-shot references: a memory bank of normal patch tokens and the map of each patch's
distance to it (the k-shot mode of APRIL-GAN / WinCLIP+, averaged over Bayes-PFL's layers).

The bank holds, for each of the model's layers, the patch tokens of the K reference images as
the image tower returns them for that layer (residual stream, no ``ln_post``, no projection,
class token excluded), L2-normalised. The few-shot map of a test image: per layer, for each
patch, 1 minus its largest cosine similarity to that layer's bank; the mean over the layers;
upsampled bilinearly (``align_corners=True``) to the image size. Nothing uses statistics of the
test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import SettingsError

# Largest similarity block computed at once (query rows x bank rows), float32: 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ReferenceBank:
    """The normal patch tokens of K reference images, one [K * G * G, V] L2-normalised tensor
    per layer, on the device they were computed on."""

    tokens: tuple[torch.Tensor, ...]
    count: int                          # K reference images
    layers: tuple[int, ...]             # the CLIP blocks the tokens come from
    image_size: int                     # S of the images they were computed from
    paths: tuple[str, ...] = ()         # the reference files, where known

    @classmethod
    def from_tokens(cls, tokens: Sequence[torch.Tensor], layers: Sequence[int],
                    image_size: int, paths: Sequence[str] = ()) -> "ReferenceBank":
        """From the image tower's layer tokens of the references, each [K, G*G, V]."""
        if len(tokens) != len(layers):
            raise ValueError(f"{len(tokens)} token tensors for {len(layers)} layers")
        count = tokens[0].shape[0]
        bank = tuple(F.normalize(t.float().flatten(0, 1), dim=-1) for t in tokens)  # [K GG, V]
        return cls(bank, count, tuple(int(x) for x in layers), int(image_size), tuple(paths))

    @property
    def device(self) -> torch.device:
        return self.tokens[0].device

    def to(self, device: torch.device | str) -> "ReferenceBank":
        return ReferenceBank(tuple(t.to(device) for t in self.tokens), self.count, self.layers,
                             self.image_size, self.paths)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens)

    def without(self, index: int) -> "ReferenceBank":
        """The bank of the other K - 1 references (leave one out)."""
        if self.count < 2 or not 0 <= index < self.count:
            raise ValueError(f"cannot leave out reference {index} of {self.count}")
        rows = self.tokens[0].shape[0] // self.count                    # G * G per image
        keep = tuple(torch.cat([t[:index * rows], t[(index + 1) * rows:]]) for t in self.tokens)
        paths = self.paths[:index] + self.paths[index + 1:] if self.paths else ()
        return ReferenceBank(keep, self.count - 1, self.layers, self.image_size, paths)

    def check_for(self, layers: Sequence[int], image_size: int) -> None:
        """One SettingsError unless the bank was made from ``layers`` at ``image_size``."""
        if tuple(self.layers) != tuple(layers) or self.image_size != image_size:
            raise SettingsError(f"the reference bank was made from layers {list(self.layers)} "
                                f"at {self.image_size} px, this detector uses layers "
                                f"{list(layers)} at {image_size} px: build it with this "
                                f"detector's reference_bank()")


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """1 - the largest cosine similarity of each query to the bank.

    queries [N, V] (any scale: normalised here), bank [M, V] L2-normalised -> [N] float32. The
    similarity blocks are at most ``chunk_elements`` entries (query and bank rows both chunked),
    so the memory does not grow with N or M."""
    queries = F.normalize(queries.float(), dim=-1)
    n, m = queries.shape[0], bank.shape[0]
    bank_rows = max(1, min(m, chunk_elements))
    query_rows = max(1, chunk_elements // bank_rows)
    best = torch.full((n,), -float("inf"), device=queries.device)
    for q0 in range(0, n, query_rows):
        q = queries[q0:q0 + query_rows]
        top = best[q0:q0 + query_rows]
        for b0 in range(0, m, bank_rows):
            sims = q @ bank[b0:b0 + bank_rows].T                  # [n', m']
            torch.maximum(top, sims.amax(dim=1), out=top)
    return 1.0 - best


def fewshot_map(tokens: Sequence[torch.Tensor], bank: ReferenceBank, image_size: int,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """The few-shot map of a batch: layer tokens [B, G*G, V] (one tensor per layer of the bank)
    -> [B, S, S], the mean over the layers of each patch's distance to that layer's bank,
    upsampled bilinearly with ``align_corners=True`` (unsmoothed)."""
    if len(tokens) != len(bank.tokens):
        raise ValueError(f"{len(tokens)} layers of tokens for a bank of {len(bank.tokens)}")
    b, patches = tokens[0].shape[:2]
    g = int(round(patches ** 0.5))
    total = torch.zeros(b * patches, device=tokens[0].device)
    for layer_tokens, layer_bank in zip(tokens, bank.tokens):
        total += nearest_distance(layer_tokens.flatten(0, 1), layer_bank, chunk_elements)
    grid = (total / len(tokens)).view(b, 1, g, g)                       # [B, 1, G, G]
    return F.interpolate(grid, size=(image_size, image_size), mode="bilinear",
                         align_corners=True)[:, 0]
