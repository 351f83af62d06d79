"""Procedural images of the synthetic dataset (``dataset/synthetic.py``): the normal textures
and objects, drawn with vectorised numpy/OpenCV with small pose and colour variation.

- textures: ``weave`` (over-under fabric), ``wood`` (grain rings), ``mesh`` (wire grid),
  ``gravel`` (granular stone), ``checker`` (tiles with grout);
- objects on plain backgrounds: ``pill`` (speckled ellipse), ``bolt`` (threaded bar with head),
  ``ring`` (bottle top seen from above).
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

TEXTURES = ("weave", "wood", "mesh", "gravel", "checker")
OBJECTS = ("pill", "bolt", "ring")
CATEGORIES = TEXTURES + OBJECTS
TEXTURE_DEFECTS = ("crack", "hole", "scratch", "stain")
OBJECT_DEFECTS = ("crack", "hole", "missing", "scratch")
# Accepted defect area as a fraction of the image.
MIN_AREA = 0.004
MAX_AREA = 0.05

def defects_of(category: str) -> tuple[str, ...]:
    """Defect types painted on ``category``."""
    return OBJECT_DEFECTS if category in OBJECTS else TEXTURE_DEFECTS


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------


def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
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


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.erode(mask.astype(np.uint8), kernel).astype(bool)


def inner(region: np.ndarray, radius: int) -> np.ndarray:
    """``region`` eroded by ``radius`` pixels, or ``region`` itself when nothing would remain."""
    eroded = erode(region, radius)
    return eroded if eroded.any() else region


def random_point(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
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
    t += 0.06 * smooth_noise(rng, size, size / 16)
    image = _lerp(_palette(rng, (85, 75, 60)), _palette(rng, (215, 200, 165)), np.clip(t, 0, 1))
    return image, None, _texture_region(size)


def _wood(rng, size):
    period = size * rng.uniform(0.05, 0.07)
    u, v = _grid(size, rng.uniform(-6, 6), tuple(rng.uniform(0, 100, 2)))
    warp = 0.06 * size * smooth_noise(rng, size, size / 3)
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
    shade = 0.85 + 0.15 * smooth_noise(rng, size, size / 4)
    image = _lerp(_palette(rng, (38, 42, 48)), _palette(rng, (175, 180, 185)), wire * shade)
    return image, None, _texture_region(size)


def _gravel(rng, size):
    t = (0.5 * smooth_noise(rng, size, size / 24) + 0.3 * smooth_noise(rng, size, size / 8)
         + 0.25 * rng.standard_normal((size, size)).astype(np.float32))
    grains = smooth_noise(rng, size, size / 40) > 1.3
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
    return base + 4.0 * smooth_noise(rng, size, size / 3)[..., None]


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
    specks = (smooth_noise(rng, size, size / 50) > 2.0) & erode(body, 2)
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


RENDERERS = {
    "weave": _weave,
    "wood": _wood,
    "mesh": _mesh,
    "gravel": _gravel,
    "checker": _checker,
    "pill": _pill,
    "bolt": _bolt,
    "ring": _ring,
}


def check_classes(classes: Sequence[str] | None) -> list[str]:
    """The categories asked for (all when None), each once; unknown ones are an error."""
    if classes is None:
        return list(CATEGORIES)
    if isinstance(classes, str):
        classes = [classes]
    unknown = [name for name in classes if name not in RENDERERS]
    if unknown:
        raise ValueError(f"unknown synthetic class(es) {', '.join(unknown)}; "
                         f"available: {', '.join(CATEGORIES)}.")
    return list(dict.fromkeys(classes))
