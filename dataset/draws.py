"""The seeded draws of a class's images: ``dataset.folder --n_train`` (normal test images moved
to the train split) and ``test.py --k_shot`` (references from the train split).

A draw is K of N indices without replacement by NumPy's generator seeded from (seed, CRC-32 of
the class name), so a class's draw depends on its name and the seed only, not on the other
classes or their order.
"""

from __future__ import annotations

import zlib

import numpy as np


def draw_indices(n: int, k: int, seed: int, class_name: str) -> list[int]:
    """``k`` distinct indices of ``range(n)`` in the order drawn (``seed`` taken modulo 2**32)."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} of {n} images")
    rng = np.random.default_rng([int(seed) % 2**32, zlib.crc32(class_name.encode("utf-8"))])
    return rng.choice(n, size=k, replace=False).tolist()
