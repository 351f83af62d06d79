"""The standard-normal draws behind the prompt samples, as the dicts ``AnomalyDetector``
takes: ``{"context": [R, B, D], "normal": [R, 1, D], "abnormal": [R, 1, D]}``.

``context`` drives the image-specific distribution (one column per image), ``normal`` and
``abnormal`` the two image-agnostic ones (shared by every image of an evaluation run).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from models.errors import SettingsError

# Seeds: NumPy's seed range (np.random.seed takes 0 .. 2**32 - 1), for every script's seed.
SEED_MAX = 2**32 - 1


def check_seed(value, what: str = "--seed") -> int:
    """``value`` as a seed (a whole number within 0 .. SEED_MAX), or one SettingsError naming
    ``what`` and the range."""
    try:
        seed = int(value)
        whole = seed == value and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or not 0 <= seed <= SEED_MAX:
        raise SettingsError(f"{what} {value}: a seed is a whole number within 0..{SEED_MAX}")
    return seed


def standard_noise(sample_num: int, batch: int, dim: int, seed: int | None = None,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Independent draws, context then normal then abnormal, from ``generator`` (or a CPU
    generator seeded with ``seed``; neither: the torch RNG)."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    draws = {"context": torch.randn(sample_num, batch, dim, generator=generator),
             "normal": torch.randn(sample_num, 1, dim, generator=generator),
             "abnormal": torch.randn(sample_num, 1, dim, generator=generator)}
    return {k: v.to(device) for k, v in draws.items()} if device is not None else draws


def shared_noise(sample_num: int, batch: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """The same draws for every image of the batch (from ``seed``), so that an image's result
    depends neither on the other images nor on its position."""
    one = standard_noise(sample_num, 1, dim, seed=seed)
    return {**one, "context": one["context"].expand(sample_num, batch, dim)}


def official_order_noise(sample_num: int, batch: int, dim: int,
                         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Draws from the torch RNG in the official order, one image after the other: its R
    context draws, then R normal, then R abnormal, each [1, D]. The state draws of the first
    image are the ones kept (the official code caches them), so a seeded run gives the same
    samples whatever the batch size."""
    ctx, normal, abnormal = [], None, None
    for _ in range(batch):
        ctx.append(torch.stack([torch.randn(1, dim, device=device)
                                for _ in range(sample_num)])[:, 0])
        nrm = torch.stack([torch.randn(1, dim, device=device) for _ in range(sample_num)])
        abn = torch.stack([torch.randn(1, dim, device=device) for _ in range(sample_num)])
        if normal is None:
            normal, abnormal = nrm, abn                                     # [R, 1, D]
    return {"context": torch.stack(ctx, dim=1), "normal": normal, "abnormal": abnormal}


def _generator(*entropy: int) -> torch.Generator:
    state = np.random.SeedSequence([int(e) % 2**32 for e in entropy]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) | int(state[1]) << 32)


class RunNoise:
    """The draws of one evaluation run from its seed, image by image: the image-agnostic
    (normal, abnormal) draws once for the run, the image-specific draws of each image from
    (seed, class, index of the image within its class). A class's draws are therefore the
    same whatever other classes are evaluated, in any order and at any batch size (its results
    too, bit for bit at the same batch composition, to float rounding otherwise)."""

    def __init__(self, seed: int, sample_num: int, dim: int):
        self.seed, self.sample_num, self.dim = int(seed), sample_num, dim
        g = _generator(self.seed, 0)
        self.normal = torch.randn(sample_num, 1, dim, generator=g)
        self.abnormal = torch.randn(sample_num, 1, dim, generator=g)

    def image(self, class_name: str, index: int) -> torch.Tensor:
        """The image-specific draws [R, D] of image ``index`` of ``class_name``."""
        g = _generator(self.seed, 1, zlib.crc32(class_name.encode("utf-8")), index)
        return torch.randn(self.sample_num, self.dim, generator=g)

    def batch(self, class_names: list[str], indices: list[int]) -> dict[str, torch.Tensor]:
        """The noise dict of a batch of images."""
        context = torch.stack([self.image(c, i) for c, i in zip(class_names, indices)], dim=1)
        return {"context": context, "normal": self.normal, "abnormal": self.abnormal}
