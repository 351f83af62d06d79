"""Defects of the synthetic dataset, each painted with the exact binary mask of the pixels
it changed (about 0.4-5 % of the image): ``crack`` (jagged dark/bright polyline with a branch),
``hole`` (disc in a contrasting tone), ``scratch`` (thin, slightly curved line), ``stain``
(irregular colour blob, textures) and ``missing`` (part of the object erased to the
background, objects); and ``render_sample``, one deterministic image and mask.
"""

from __future__ import annotations

import math
import zlib

import cv2
import numpy as np

from dataset.synthetic_scenes import (MAX_AREA, MIN_AREA, RENDERERS, check_classes, defects_of,
                                      erode, inner, random_point, smooth_noise, to_uint8)

# ----------------------------------------------------------------------------------------------
# Defects. Each returns (proposed boolean mask, paint float32 [S, S, 3]); pixels outside the
# mask keep the normal image.
# ----------------------------------------------------------------------------------------------


def _contrast_tone(rng, image: np.ndarray, where: np.ndarray, threshold: float) -> np.ndarray:
    """A dark tone on bright surroundings, a bright tone on dark ones."""
    mean = float(image[where].mean()) if where.any() else 128.0
    if mean > threshold:
        return np.full(3, rng.uniform(15, 40), np.float32) + rng.normal(0, 3, 3).astype(np.float32)
    return np.full(3, rng.uniform(215, 245), np.float32) + rng.normal(0, 3, 3).astype(np.float32)


def _hole(rng, image, background, region, size):
    radius = size * rng.uniform(0.045, 0.075)
    cx, cy = random_point(rng, inner(region, int(radius * 0.6)))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    distance = np.hypot(xs - cx, ys - cy) / radius
    mask = distance <= 1.0
    tone = _contrast_tone(rng, image, mask, 100)
    shading = (0.85 + 0.15 * distance)[..., None]
    return mask, np.clip(tone * shading, 0, 255)


def _random_walk(rng, start, direction, steps, turn_sd, step_range, size):
    """A jagged polyline: each step turns by N(0, turn_sd) and advances by a uniform fraction
    of the image size. Returns the points and the final direction."""
    x, y = start
    points = [(x, y)]
    for _ in range(steps):
        direction += rng.normal(0, turn_sd)
        step = size * rng.uniform(*step_range)
        x, y = x + step * math.cos(direction), y + step * math.sin(direction)
        points.append((x, y))
    return points, direction


def _draw_polyline(canvas, points, thickness):
    cv2.polylines(canvas, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], False, 255,
                  thickness, lineType=cv2.LINE_8)


def _crack(rng, image, background, region, size):
    canvas = np.zeros((size, size), np.uint8)
    thickness = max(2, int(round(0.012 * size)))
    start = random_point(rng, region)
    direction = rng.uniform(0, 2 * np.pi)
    points, direction = _random_walk(rng, start, direction, int(rng.integers(7, 12)), 0.6,
                                     (0.04, 0.07), size)
    _draw_polyline(canvas, points, thickness)
    fork = points[int(rng.integers(1, len(points) - 1))]
    branch_direction = direction + rng.choice((-1, 1)) * rng.uniform(0.6, 1.2)
    branch, _ = _random_walk(rng, fork, branch_direction, int(rng.integers(2, 4)), 0.5,
                             (0.03, 0.05), size)
    _draw_polyline(canvas, branch, max(1, thickness - 1))
    mask = (canvas > 0) & region
    tone = _contrast_tone(rng, image, mask, 100)
    return mask, np.broadcast_to(tone, image.shape)


def _scratch(rng, image, background, region, size):
    canvas = np.zeros((size, size), np.uint8)
    thickness = max(2, int(round(0.011 * size)))
    length = size * rng.uniform(0.3, 0.5)
    x0, y0 = random_point(rng, region)
    direction = rng.uniform(0, 2 * np.pi)
    x2, y2 = x0 + length * math.cos(direction), y0 + length * math.sin(direction)
    bend = length * rng.uniform(-0.12, 0.12)
    x1 = (x0 + x2) / 2 - bend * math.sin(direction)
    y1 = (y0 + y2) / 2 + bend * math.cos(direction)
    t = np.linspace(0, 1, 24)[:, None]
    curve = (1 - t) ** 2 * [x0, y0] + 2 * (1 - t) * t * [x1, y1] + t ** 2 * [x2, y2]
    cv2.polylines(canvas, [np.round(curve).astype(np.int32).reshape(-1, 1, 2)], False, 255,
                  thickness, lineType=cv2.LINE_8)
    mask = (canvas > 0) & region
    tone = _contrast_tone(rng, image, mask, 170)
    return mask, np.broadcast_to(tone, image.shape)


_STAIN_COLOURS = np.array([(125, 65, 20), (40, 85, 170), (165, 30, 35), (55, 125, 40),
                           (30, 30, 30)], dtype=np.float32)


def _stain(rng, image, background, region, size):
    radius = size * rng.uniform(0.065, 0.1)
    cx, cy = random_point(rng, region)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / radius ** 2
    field = 1.0 - d2 + 0.35 * smooth_noise(rng, size, radius / 1.5)
    mask = (field > 0.3) & (d2 < 1.6)
    local = image[mask].mean(axis=0) if mask.any() else np.full(3, 128, np.float32)
    distances = np.linalg.norm(_STAIN_COLOURS - local, axis=1)
    colour = _STAIN_COLOURS[np.argsort(distances)[-1 - int(rng.integers(2))]]
    alpha = rng.uniform(0.65, 0.8)
    paint = image * (1 - alpha) + colour * alpha
    return mask, paint


def _missing(rng, image, background, region, size):
    boundary = region & ~erode(region, 2)
    cx, cy = random_point(rng, boundary)
    radius = size * rng.uniform(0.09, 0.13)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    mask = (np.hypot(xs - cx, ys - cy) <= radius) & region
    return mask, background


_DEFECTS = {
    "crack": _crack,
    "hole": _hole,
    "scratch": _scratch,
    "stain": _stain,
    "missing": _missing,
}


def _paint_defect(rng, defect, image, background, region, size):
    """Apply ``defect`` to float ``image``; returns (uint8 image, exact mask of changed pixels)."""
    normal = to_uint8(image)
    best = None
    for _ in range(40):
        proposed, paint = _DEFECTS[defect](rng, image, background, region, size)
        painted = np.where(proposed[..., None], to_uint8(paint), normal)
        changed = np.any(painted != normal, axis=-1)
        area = changed.mean()
        if MIN_AREA <= area <= MAX_AREA:
            return painted, changed
        gap = MIN_AREA - area if area < MIN_AREA else area - MAX_AREA
        if best is None or gap < best[0]:
            best = (gap, painted, changed)
    return best[1], best[2]


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------

_SPLIT_CODES = {"train": 0, "test": 1}


def sample_rng(seed: int, category: str, phase: str, specie: str, index: int) -> np.random.Generator:
    return np.random.default_rng(
        [int(seed), zlib.crc32(category.encode()), _SPLIT_CODES[phase],
         zlib.crc32(specie.encode()), int(index)]
    )


def make_sample(category: str, defect: str | None, rng: np.random.Generator, size: int):
    """(normal uint8 [S, S, 3], image uint8 [S, S, 3], mask bool [S, S]) in RGB."""
    image, background, region = RENDERERS[category](rng, size)
    normal = to_uint8(image)
    if defect is None:
        return normal, normal.copy(), np.zeros((size, size), dtype=bool)
    painted, mask = _paint_defect(rng, defect, normal.astype(np.float32), background, region, size)
    return normal, painted, mask


def render_sample(category: str, defect: str | None = None, seed: int = 0, size: int = 256,
                  index: int = 0, phase: str = "test") -> dict:
    """One image of ``category`` as written by the generators, with its defect-free version.

    Returns ``{"normal": uint8 [S, S, 3], "image": uint8 [S, S, 3], "mask": bool [S, S]}`` (RGB);
    ``mask`` is exactly the set of pixels where ``image`` differs from ``normal``.
    """
    check_classes([category])
    if defect is not None and defect not in defects_of(category):
        raise ValueError(f"defect {defect!r} is not painted on {category}; "
                         f"choose one of {', '.join(defects_of(category))}.")
    rng = sample_rng(seed, category, phase, defect or "good", index)
    normal, image, mask = make_sample(category, defect, rng, size)
    return {"normal": normal, "image": image, "mask": mask}
