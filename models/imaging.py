"""Reading images and turning them into network inputs: the one reader of every entry point
(test.py, train.py, predict.py, the notebook API, the page, few-shot references).

The official semantics (SPEC section 6, Preprocess), kept by :func:`preprocess_image`:

* an image file is opened as it is, in its own mode (RGB, RGBA, P, L, I;16, ...);
* it is resized to S x S with PIL's bicubic filter **in that mode** (Pillow premultiplies the
  alpha of RGBA images while resizing and resizes palette images with nearest), aspect not
  kept, and only **then** converted to RGB, scaled to [0, 1] and normalised with CLIP's
  mean and std.

Two readings, which differ only for images of more than 8 bits per channel:

* **official** (the paper's datasets, read by test.py and train.py): the file in its own mode,
  as above. Pillow's conversion of a 16-bit grey image to RGB clips every value above 255, so
  such a file reads almost white; the official code read it that way and so does this one, and
  the evaluation log counts the files read so (:func:`is_high_bit_depth`).
* **by range** (:func:`to_pil_image`: every image a user brings - predict.py, the API, the
  page, references, folder datasets): values are mapped to 8 bits by the range of their type
  first, then read as above. 16-bit integers (PNG/TIFF ``I;16``, ``uint16`` arrays): value / 257,
  rounded; 32-bit integer files (``I``): values must lie in 0..65535 and are read as 16-bit;
  floating-point files (``F``) and arrays: intensities in [0, 1], times 255, rounded; other
  integer arrays: values must lie in 0..255 (read as 8-bit); booleans: 0 or 255. Anything else
  (NaN, negative values, floats outside [0, 1], an empty array, a shape that is not an image)
  is one :class:`~models.errors.InputError`.

Photos from phones carry an EXIF orientation; the official code ignores it. ``read_image(...,
exif_transpose=True)`` turns such an image upright first (predict.py and the notebook API do
that on request); for a file without an orientation tag both readings are identical.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .filekind import file_kind

log = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL modes of more than 8 bits per channel (16-bit grey, 32-bit integer, 32-bit float).
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Errors Pillow raises for files that are not (complete) images.
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError,
                Image.DecompressionBombError)


class ImageReadError(InputError):
    """An image or mask file that cannot be read."""


def _open(path: str, what: str, exif_transpose: bool = False) -> Image.Image:
    """The loaded image of a file, independent of the (closed) file. Only regular files are
    opened (a FIFO or a device named like an image would block or never end)."""
    kind = file_kind(path)
    if kind not in ("regular file", "missing"):
        raise ImageReadError(f"cannot read {what} {path}: it is a {kind}, not a regular file; "
                             f"replace it with the image file")
    try:
        with Image.open(path) as handle:
            handle.load()
            if exif_transpose:
                try:
                    return ImageOps.exif_transpose(handle)
                except _READ_ERRORS + (KeyError, TypeError, struct.error) as error:
                    # an EXIF block that cannot be read holds no orientation one could apply
                    log.warning("%s %s: its EXIF data cannot be read (%s: %s); read as stored",
                                what, path, type(error).__name__, error)
            return handle.copy()
    except _READ_ERRORS as error:
        raise ImageReadError(f"cannot read {what} {path} ({type(error).__name__}: {error}); "
                             f"check that it is an image file and not damaged") from None


def read_image(path: str | os.PathLike, exif_transpose: bool = False) -> Image.Image:
    """The image file as a PIL image in its own mode (nothing converted: the official
    reading). With ``exif_transpose`` the EXIF orientation is applied (as image viewers show
    the file)."""
    return _open(os.fspath(path), "image", exif_transpose)


def read_mask(path: str | os.PathLike) -> Image.Image:
    """A mask file as a PIL image in its own mode."""
    return _open(os.fspath(path), "mask")


def is_high_bit_depth(image: Image.Image) -> bool:
    """True for images of more than 8 bits per channel, which the two readings read
    differently."""
    return image.mode in HIGH_BIT_MODES


# --------------------------------------------------------------------------------------------
# The reading by range


def _range(values: np.ndarray) -> str:
    return f"{values.min():g}..{values.max():g}"


def _uint16_to_8(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255: value / 257, rounded half up (exact for 257 * k)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _float_to_8(values: np.ndarray, name: str) -> np.ndarray:
    """Intensities in [0, 1] -> 0..255 (rounded); anything else is an InputError."""
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise InputError(f"{name} holds NaN or infinite values: give finite intensities in "
                         f"[0, 1]")
    if values.min() < 0.0 or values.max() > 1.0:
        raise InputError(f"{name} holds floating-point values {_range(values)}, outside [0, 1]: "
                         f"floating-point images are read as intensities in [0, 1] (divide "
                         f"8-bit values by 255, 16-bit ones by 65535)")
    return np.round(values * 255.0).astype(np.uint8)


def array_to_8bit(array: np.ndarray, name: str = "the image array") -> np.ndarray:
    """An image array ([H, W], [H, W, 1], [H, W, 3] or [H, W, 4]) as uint8 by the range of its
    type (see the module docstring); an InputError naming ``name`` otherwise."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"{name} has the shape {list(array.shape)}: an image array must be "
                         f"[H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty ({array.shape[0]} x {array.shape[1]} pixels)")
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _uint16_to_8(array)
    if kind == "f":
        return _float_to_8(array, name)
    if kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"{name} is {array.dtype} with values {_range(array)}: give uint8 "
                             f"(0..255), uint16 (16-bit, 0..65535) or floats in [0, 1]")
        return array.astype(np.uint8)
    raise InputError(f"{name} is of type {array.dtype}: give uint8, uint16, bool or "
                     f"floating-point intensities in [0, 1]")


def to_8bit(image: Image.Image, name: str = "the image") -> Image.Image:
    """``image`` with more than 8 bits per channel mapped to 8 bits by its range (``I;16*``:
    / 257; ``I``: 0..65535 as 16-bit; ``F``: [0, 1] times 255) as a grey ``L`` image; other
    modes are returned as they are (8-bit, palette, alpha: the official reading)."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    values = np.asarray(image)
    if image.mode == "F":
        return Image.fromarray(_float_to_8(values, name), mode="L")
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(f"{name} is a 32-bit integer image with values {_range(values)}: only "
                         f"0..65535 (16-bit) is read; save it as 8- or 16-bit")
    return Image.fromarray(_uint16_to_8(values), mode="L")


def to_pil_image(image, exif_transpose: bool = False) -> Image.Image:
    """A user's image - a path, a PIL image or a numpy array - as an 8-bit PIL image for
    :func:`preprocess_image` (the reading by range, module docstring). Paths are read with
    :func:`read_image` (``exif_transpose``: turned upright first)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return to_8bit(read_image(path, exif_transpose), f"image {path}")
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"the image is empty ({image.width} x {image.height} pixels)")
        return to_8bit(image)
    if isinstance(image, torch.Tensor):
        raise InputError("a tensor is not an image file, PIL image or array: pass preprocessed "
                         "[B, 3, S, S] batches to AnomalyDetector.predict, or convert it with "
                         ".numpy() ([H, W] or [H, W, 3])")
    if not isinstance(image, np.ndarray):
        raise InputError(f"cannot read an image from a {type(image).__name__}: give a path, a "
                         f"PIL image or a numpy array")
    return Image.fromarray(array_to_8bit(image))


# --------------------------------------------------------------------------------------------
# Network input


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a PIL image (Pillow's conversion of its mode)."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to size x size in the image's own mode (torchvision's Resize on a PIL
    image does exactly this), then conversion to RGB."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return resized if resized.mode == "RGB" else resized.convert("RGB")


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float32 [3, H, W]: [0, 1], then CLIP's mean and std."""
    tensor = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (tensor / 255 - mean) / std


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """The network input of a PIL image (any mode, read officially): float32 [3, S, S]."""
    return normalise(np.asarray(resize_image(image, image_size), dtype=np.uint8))


def preprocess(image, image_size: int, exif_transpose: bool = False) -> torch.Tensor:
    """A user's image (path, PIL image or array; the reading by range) -> the network input
    [3, S, S]."""
    return preprocess_image(to_pil_image(image, exif_transpose), image_size)
