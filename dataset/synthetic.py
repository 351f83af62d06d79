"""Procedural anomaly-detection dataset in MVTec-AD layout (textures and objects with defects).

Categories (all rendered with vectorised numpy/OpenCV, small pose and colour variation):

- textures: ``weave`` (over-under fabric), ``wood`` (grain rings), ``mesh`` (wire grid),
  ``gravel`` (granular stone), ``checker`` (tiles with grout);
- objects on plain backgrounds: ``pill`` (speckled ellipse), ``bolt`` (threaded bar with head),
  ``ring`` (bottle top seen from above).

Defects (each painted with the exact binary mask of the pixels it changed, about 0.4-5 % of the
image): ``crack`` (jagged dark/bright polyline with a branch), ``hole`` (disc in a contrasting
tone), ``scratch`` (thin, slightly curved line), ``stain`` (irregular colour blob, textures) and
``missing`` (part of the object erased to the background, objects). Every category has cracks
and holes.

Two layouts:

- raw MVTec-AD (``generate_raw``): ``<out>/<cls>/train/good/000.png``, ``test/good/*.png``,
  ``test/<defect>/*.png``, ``ground_truth/<defect>/<stem>_mask.png``;
- standard (``write_standard`` / ``--standard``): ``<out>/<Name>/<cls>/{train/good, test/good,
  test/anomaly, ground_truth/anomaly}`` with ``.bmp`` images and ``.png`` masks named as the MVTec
  converter names them, plus ``<out>/meta_<Name>.json`` (written by ``dataset/make_meta.py``).

Everything is deterministic for a seed: each image has its own numpy Generator seeded from
(seed, category, split, defect, index).

    python -m dataset.synthetic --out DIR [--classes ...] [--seed 0] [--size 256] [--standard]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import zlib
from typing import Iterator, Sequence

import cv2
import numpy as np

from dataset.make_meta import make_meta, write_meta

TEXTURES = ("weave", "wood", "mesh", "gravel", "checker")
OBJECTS = ("pill", "bolt", "ring")
CATEGORIES = TEXTURES + OBJECTS
TEXTURE_DEFECTS = ("crack", "hole", "scratch", "stain")
OBJECT_DEFECTS = ("crack", "hole", "missing", "scratch")
# Accepted defect area as a fraction of the image.
MIN_AREA = 0.004
MAX_AREA = 0.05

__all__ = [
    "CATEGORIES",
    "TEXTURES",
    "OBJECTS",
    "defects_of",
    "render_sample",
    "generate_raw",
    "write_standard",
    "main",
]


def defects_of(category: str) -> tuple[str, ...]:
    """Defect types painted on ``category``."""
    return OBJECT_DEFECTS if category in OBJECTS else TEXTURE_DEFECTS


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field [size, size] with features about ``scale`` pixels wide."""
    cells = max(2, int(round(size / max(scale, 1.0))) + 1)
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    return field / (field.std() + 1e-6)


def _grid(size: int, angle_deg: float, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Rotated and shifted pixel coordinates (u, v), each [size, size] float32."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    u = cos * xs + sin * ys + shift[0]
    v = -sin * xs + cos * ys + shift[1]
    return u, v


def _lerp(dark, light, t: np.ndarray) -> np.ndarray:
    """Per-pixel colour between ``dark`` and ``light``: [H, W] weights -> [H, W, 3] float32."""
    dark = np.asarray(dark, dtype=np.float32)
    light = np.asarray(light, dtype=np.float32)
    return dark + (light - dark) * t[..., None]


def _palette(rng: np.random.Generator, colour) -> np.ndarray:
    """``colour`` with a small random brightness and tint change."""
    return np.asarray(colour, np.float32) * rng.uniform(0.92, 1.08) + rng.normal(0.0, 4.0, 3)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.erode(mask.astype(np.uint8), kernel).astype(bool)


def _inner(region: np.ndarray, radius: int) -> np.ndarray:
    """``region`` eroded by ``radius`` pixels, or ``region`` itself when nothing would remain."""
    eroded = _erode(region, radius)
    return eroded if eroded.any() else region


def _random_point(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
    """(x, y) of a random pixel of the boolean ``region``."""
    ys, xs = np.nonzero(region)
    pick = int(rng.integers(len(ys)))
    return int(xs[pick]), int(ys[pick])


# ----------------------------------------------------------------------------------------------
# Normal images. Each returns (image float32 [S, S, 3] RGB, background or None, defect region).
# ----------------------------------------------------------------------------------------------


def _texture_region(size: int) -> np.ndarray:
    region = np.zeros((size, size), dtype=bool)
    margin = max(2, int(round(0.1 * size)))
    region[margin:size - margin, margin:size - margin] = True
    return region


def _weave(rng, size):
    period = size * rng.uniform(0.07, 0.09)
    u, v = _grid(size, rng.uniform(-5, 5), tuple(rng.uniform(0, 100, 2)))
    fu, fv = u / period, v / period
    over = (np.floor(fu) + np.floor(fv)) % 2 == 0
    across = np.sin(np.pi * (fv % 1.0))  # horizontal thread profile
    along = np.sin(np.pi * (fu % 1.0)) * 0.85  # vertical thread profile
    t = 0.3 + 0.7 * np.where(over, across, along)
    t += 0.06 * _smooth_noise(rng, size, size / 16)
    image = _lerp(_palette(rng, (85, 75, 60)), _palette(rng, (215, 200, 165)), np.clip(t, 0, 1))
    return image, None, _texture_region(size)


def _wood(rng, size):
    period = size * rng.uniform(0.05, 0.07)
    u, v = _grid(size, rng.uniform(-6, 6), tuple(rng.uniform(0, 100, 2)))
    warp = 0.06 * size * _smooth_noise(rng, size, size / 3)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (v + warp + 0.04 * size * np.sin(u / size * 5)) / period)
    streaks = cv2.resize(rng.standard_normal((size, max(2, size // 32))).astype(np.float32),
                         (size, size), interpolation=cv2.INTER_LINEAR)
    t = np.clip(0.15 + 0.65 * rings ** 1.5 + 0.08 * streaks, 0, 1)
    image = _lerp(_palette(rng, (115, 70, 38)), _palette(rng, (205, 155, 100)), t)
    return image, None, _texture_region(size)


def _mesh(rng, size):
    period = size * rng.uniform(0.08, 0.1)
    half_width = max(0.8, 0.008 * size)
    u, v = _grid(size, rng.uniform(-8, 8), tuple(rng.uniform(0, 100, 2)))
    du = np.abs((u / period) % 1.0 - 0.5) * period  # distance to the wire centre line
    dv = np.abs((v / period) % 1.0 - 0.5) * period
    wire = np.clip(half_width + 1.0 - np.minimum(du, dv), 0, 1)
    shade = 0.85 + 0.15 * _smooth_noise(rng, size, size / 4)
    image = _lerp(_palette(rng, (38, 42, 48)), _palette(rng, (175, 180, 185)), wire * shade)
    return image, None, _texture_region(size)


def _gravel(rng, size):
    t = (0.5 * _smooth_noise(rng, size, size / 24) + 0.3 * _smooth_noise(rng, size, size / 8)
         + 0.25 * rng.standard_normal((size, size)).astype(np.float32))
    grains = _smooth_noise(rng, size, size / 40) > 1.3
    t = np.clip(0.55 + 0.18 * t - 0.25 * grains, 0, 1)
    image = _lerp(_palette(rng, (40, 38, 35)), _palette(rng, (225, 220, 205)), t)
    return image, None, _texture_region(size)


def _checker(rng, size):
    tile = size * rng.uniform(0.11, 0.14)
    u, v = _grid(size, rng.uniform(-3, 3), tuple(rng.uniform(0, 100, 2)))
    iu, iv = np.floor(u / tile).astype(np.int64), np.floor(v / tile).astype(np.int64)
    iu -= iu.min()
    iv -= iv.min()
    shades = rng.normal(1.0, 0.05, (iu.max() + 1, iv.max() + 1)).astype(np.float32)
    light = _palette(rng, (225, 215, 190))
    dark = _palette(rng, (160, 75, 50))
    image = np.where(((iu + iv) % 2 == 0)[..., None], light, dark) * shades[iu, iv][..., None]
    grout_width = max(1.0, 0.012 * size)
    du = np.minimum((u / tile) % 1.0, 1 - (u / tile) % 1.0) * tile
    dv = np.minimum((v / tile) % 1.0, 1 - (v / tile) % 1.0) * tile
    grout = np.clip(grout_width - np.minimum(du, dv) + 0.5, 0, 1)[..., None]
    image = image * (1 - grout) + _palette(rng, (120, 120, 115)) * grout
    return image.astype(np.float32), None, _texture_region(size)


def _plain(rng, size, colour) -> np.ndarray:
    base = np.broadcast_to(_palette(rng, colour), (size, size, 3)).astype(np.float32)
    return base + 4.0 * _smooth_noise(rng, size, size / 3)[..., None]


def _pill(rng, size):
    centre = size / 2 + rng.normal(0, 0.02 * size, 2)
    a, b = size * rng.uniform(0.3, 0.34), size * rng.uniform(0.17, 0.2)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = math.radians(rng.uniform(-12, 12))
    dx, dy = xs - centre[0], ys - centre[1]
    pu = math.cos(angle) * dx + math.sin(angle) * dy
    pv = -math.sin(angle) * dx + math.cos(angle) * dy
    r2 = (pu / a) ** 2 + (pv / b) ** 2
    body = r2 <= 1.0
    shade = np.clip(1.0 - 0.22 * r2, 0.7, 1.0)
    colour = _palette(rng, (232, 226, 205))
    background = _plain(rng, size, (45, 45, 52))
    image = np.where(body[..., None], colour * shade[..., None], background)
    specks = (_smooth_noise(rng, size, size / 50) > 2.0) & _erode(body, 2)
    image = np.where(specks[..., None], _palette(rng, (170, 60, 55)), image)
    return image.astype(np.float32), background, body


def _bolt(rng, size):
    centre = size / 2 + rng.normal(0, 0.02 * size, 2)
    angle = math.radians(rng.uniform(-15, 15))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    pu = math.cos(angle) * dx + math.sin(angle) * dy  # along the shaft
    pv = -math.sin(angle) * dx + math.cos(angle) * dy
    length, width = size * rng.uniform(0.3, 0.33), size * rng.uniform(0.07, 0.08)
    head_width = size * rng.uniform(0.13, 0.15)
    shaft = (np.abs(pu) <= length) & (np.abs(pv) <= width)
    head = (pu >= -length - 0.1 * size) & (pu < -length) & (np.abs(pv) <= head_width)
    body = shaft | head
    pitch = size * 0.035
    thread = 0.75 + 0.25 * np.sin(2 * np.pi * (pu + 0.3 * pv) / pitch)
    cylinder = 1.0 - 0.35 * (pv / head_width) ** 2
    shade = np.where(head, cylinder * 0.95, cylinder * np.where(pu > -0.6 * length, thread, 1.0))
    background = _plain(rng, size, (205, 205, 198))
    image = np.where(body[..., None], _palette(rng, (140, 142, 150)) * shade[..., None],
                     background)
    return image.astype(np.float32), background, body


def _ring(rng, size):
    centre = size / 2 + rng.normal(0, 0.015 * size, 2)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = np.hypot(xs - centre[0], ys - centre[1])
    outer, inner = size * rng.uniform(0.37, 0.4), size * rng.uniform(0.2, 0.22)
    body = (radius <= outer) & (radius >= inner)
    relative = (radius - inner) / (outer - inner)
    shade = 0.7 + 0.3 * np.sin(np.pi * np.clip(relative, 0, 1))
    background = _plain(rng, size, (28, 28, 32))
    opening = np.where((radius < inner)[..., None], _palette(rng, (70, 62, 55)), background)
    image = np.where(body[..., None], _palette(rng, (190, 182, 165)) * shade[..., None], opening)
    return image.astype(np.float32), background, body


_RENDERERS = {
    "weave": _weave,
    "wood": _wood,
    "mesh": _mesh,
    "gravel": _gravel,
    "checker": _checker,
    "pill": _pill,
    "bolt": _bolt,
    "ring": _ring,
}


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
    cx, cy = _random_point(rng, _inner(region, int(radius * 0.6)))
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
    start = _random_point(rng, region)
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
    x0, y0 = _random_point(rng, region)
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
    cx, cy = _random_point(rng, region)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / radius ** 2
    field = 1.0 - d2 + 0.35 * _smooth_noise(rng, size, radius / 1.5)
    mask = (field > 0.3) & (d2 < 1.6)
    local = image[mask].mean(axis=0) if mask.any() else np.full(3, 128, np.float32)
    distances = np.linalg.norm(_STAIN_COLOURS - local, axis=1)
    colour = _STAIN_COLOURS[np.argsort(distances)[-1 - int(rng.integers(2))]]
    alpha = rng.uniform(0.65, 0.8)
    paint = image * (1 - alpha) + colour * alpha
    return mask, paint


def _missing(rng, image, background, region, size):
    boundary = region & ~_erode(region, 2)
    cx, cy = _random_point(rng, boundary)
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
    normal = _to_uint8(image)
    best = None
    for _ in range(40):
        proposed, paint = _DEFECTS[defect](rng, image, background, region, size)
        painted = np.where(proposed[..., None], _to_uint8(paint), normal)
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


def _rng(seed: int, category: str, phase: str, specie: str, index: int) -> np.random.Generator:
    return np.random.default_rng(
        [int(seed), zlib.crc32(category.encode()), _SPLIT_CODES[phase],
         zlib.crc32(specie.encode()), int(index)]
    )


def _make(category: str, defect: str | None, rng: np.random.Generator, size: int):
    """(normal uint8 [S, S, 3], image uint8 [S, S, 3], mask bool [S, S]) in RGB."""
    image, background, region = _RENDERERS[category](rng, size)
    normal = _to_uint8(image)
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
    _check_classes([category])
    if defect is not None and defect not in defects_of(category):
        raise ValueError(f"defect {defect!r} is not painted on {category}; "
                         f"choose one of {', '.join(defects_of(category))}.")
    rng = _rng(seed, category, phase, defect or "good", index)
    normal, image, mask = _make(category, defect, rng, size)
    return {"normal": normal, "image": image, "mask": mask}


def _check_classes(classes: Sequence[str] | None) -> list[str]:
    if classes is None:
        return list(CATEGORIES)
    if isinstance(classes, str):
        classes = [classes]
    unknown = [name for name in classes if name not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown synthetic class(es) {', '.join(unknown)}; "
                         f"available: {', '.join(CATEGORIES)}.")
    return list(dict.fromkeys(classes))


def _iter_class(category: str, seed: int, size: int, n_train: int, n_test_good: int,
                n_test_anomaly: int
                ) -> Iterator[tuple[str, str, int, np.ndarray, np.ndarray | None]]:
    """(phase, specie, index, image RGB uint8, mask bool or None) in converter order.

    Train first, then the test sub-folders in sorted name order, indices ascending.
    """
    for index in range(n_train):
        _, image, _ = _make(category, None, _rng(seed, category, "train", "good", index), size)
        yield "train", "good", index, image, None
    defects = defects_of(category)
    counts = {name: 0 for name in defects}
    for k in range(n_test_anomaly):
        counts[defects[k % len(defects)]] += 1
    counts["good"] = n_test_good
    for specie in sorted(counts):
        for index in range(counts[specie]):
            defect = None if specie == "good" else specie
            _, image, mask = _make(category, defect, _rng(seed, category, "test", specie, index),
                                   size)
            yield "test", specie, index, image, mask


def _write(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    params = [cv2.IMWRITE_PNG_COMPRESSION, 6] if path.endswith(".png") else []
    if not cv2.imwrite(path, data, params):
        raise OSError(f"Cannot write {path}; check that the folder is writable.")


def _prepare(path: str, overwrite: bool) -> None:
    """Refuse to mix with existing files unless ``overwrite``, then remove them."""
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists and is not empty; choose another --out "
                                  f"or pass --overwrite to replace it.")
        shutil.rmtree(path)
    elif os.path.isfile(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; choose another --out or pass "
                                  f"--overwrite to replace it.")
        os.remove(path)


def generate_raw(out: str, classes: Sequence[str] | None = None, seed: int = 0, size: int = 256,
                 n_train: int = 6, n_test_good: int = 6, n_test_anomaly: int = 12,
                 overwrite: bool = False) -> list[str]:
    """Write the raw MVTec-AD layout under ``out``; returns the classes written."""
    classes = _check_classes(classes)
    for category in classes:
        root = os.path.join(out, category)
        _prepare(root, overwrite)
        for phase in ("train", "test"):
            os.makedirs(os.path.join(root, phase, "good"), exist_ok=True)
        for phase, specie, index, image, mask in _iter_class(category, seed, size, n_train,
                                                             n_test_good, n_test_anomaly):
            stem = f"{index:03d}"
            _write(os.path.join(root, phase, specie, f"{stem}.png"), image)
            if mask is not None and specie != "good":
                _write(os.path.join(root, "ground_truth", specie, f"{stem}_mask.png"),
                       mask.astype(np.uint8) * 255)
    return classes


def write_standard(out_root: str, name: str = "synthetic", classes: Sequence[str] | None = None,
                   seed: int = 0, size: int = 256, n_train: int = 6, n_test_good: int = 6,
                   n_test_anomaly: int = 12, overwrite: bool = False) -> str:
    """Write ``<out_root>/<name>/<cls>/...`` in the standard layout and its meta file.

    File names follow the MVTec converter with ``name`` as prefix: ``{P}_{id:06d}.bmp`` (train),
    ``{P}_good_{id:06d}.bmp``, ``{P}_{defect}_{id:06d}.bmp`` + ``.png`` mask; one running id over
    the classes in sorted order, train before test, test sub-folders sorted. Returns the path of
    ``<out_root>/meta_<name>.json``.
    """
    classes = sorted(_check_classes(classes))
    data_dir = os.path.join(out_root, name)
    meta_file = os.path.join(out_root, f"meta_{name}.json")
    _prepare(data_dir, overwrite)
    _prepare(meta_file, overwrite)
    counter = 0
    for category in classes:
        root = os.path.join(data_dir, category)
        for folder in ("train/good", "test/good", "test/anomaly", "ground_truth/anomaly"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        for phase, specie, _, image, mask in _iter_class(category, seed, size, n_train,
                                                         n_test_good, n_test_anomaly):
            if phase == "train":
                _write(os.path.join(root, "train", "good", f"{name}_{counter:06d}.bmp"), image)
            elif specie == "good":
                _write(os.path.join(root, "test", "good", f"{name}_good_{counter:06d}.bmp"), image)
            else:
                stem = f"{name}_{specie}_{counter:06d}"
                _write(os.path.join(root, "test", "anomaly", f"{stem}.bmp"), image)
                _write(os.path.join(root, "ground_truth", "anomaly", f"{stem}.png"),
                       mask.astype(np.uint8) * 255)
            counter += 1
    # The meta file as dataset/make_meta.py writes it, of these classes (a name such as "mvtec"
    # would otherwise ask for the official class list).
    write_meta(out_root, name, make_meta(out_root, name, classes=classes))
    return meta_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate a small procedural anomaly-detection dataset (MVTec-AD layout).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", nargs="+", default=None,
                        help=f"categories (default: all of {' '.join(CATEGORIES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--n_train", type=int, default=6, help="train good images per class")
    parser.add_argument("--n_test_good", type=int, default=6, help="test good images per class")
    parser.add_argument("--n_test_anomaly", type=int, default=12,
                        help="test anomalous images per class")
    parser.add_argument("--standard", action="store_true",
                        help="write the standard layout <out>/<name>/... and "
                             "<out>/meta_<name>.json")
    parser.add_argument("--name", default="synthetic",
                        help="dataset name (and file prefix) for --standard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output folders of the same classes")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error("--size must be at least 32.")
    start = time.perf_counter()
    try:
        if args.standard:
            meta_file = write_standard(args.out, args.name, args.classes, args.seed, args.size,
                                       args.n_train, args.n_test_good, args.n_test_anomaly,
                                       overwrite=args.overwrite)
            where = f"{os.path.join(args.out, args.name)} and {meta_file}"
        else:
            generate_raw(args.out, args.classes, args.seed, args.size, args.n_train,
                         args.n_test_good, args.n_test_anomaly, overwrite=args.overwrite)
            where = args.out
    except (ValueError, FileExistsError, OSError) as error:   # DatasetError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; the output under {args.out} is incomplete: run again with "
              f"--overwrite.", file=sys.stderr)
        return 130
    classes = _check_classes(args.classes)
    total = len(classes) * (args.n_train + args.n_test_good + args.n_test_anomaly)
    print(f"Wrote {total} images of {len(classes)} classes ({', '.join(classes)}) to {where} "
          f"in {time.perf_counter() - start:.2f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
