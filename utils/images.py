"""Reading user images of any mode into 8-bit RGB."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
    """An image file that cannot be read."""


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8, scaling 16-bit / float ranges to 0..255."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0 and a.min() >= 0.0:
        return np.round(a * 255).astype(np.uint8)
    hi = 65535.0 if a.size and a.max() > 255 else 255.0
    return np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)


def to_rgb(image) -> Image.Image:
    """A path, a PIL image of any mode (RGB, RGBA, L, P, I;16, I, F, CMYK...) or a numpy array
    ([H, W], [H, W, 3], [H, W, 4]; uint8, uint16 or float in [0, 1]) -> PIL RGB image.
    Files are turned upright by their EXIF orientation; alpha is dropped (the colour channels
    are kept as they are)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))  # as image viewers show it
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"cannot read image '{path}' ({type(e).__name__}): check that "
                                 "it is an image file and not damaged") from None
    if isinstance(image, Image.Image):
        if image.mode in ("RGB",):
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return to_rgb(np.array(image))
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ImageReadError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], "
                             f"not {list(a.shape)}")
    return Image.fromarray(_array_to_uint8(a))
