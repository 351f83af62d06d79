"""Reading image files and turning them into network inputs: the one reader and the one
preprocessing of every entry point (test.py, train.py, predict.py, the notebook API).

The official semantics (SPEC section 6, Preprocess):

* an image file is opened as it is, in its own mode (RGB, RGBA, P, L, I;16, ...);
* it is resized to S x S with PIL's bicubic filter **in that mode** (Pillow premultiplies the
  alpha of RGBA images while resizing and resizes palette images with nearest), aspect not
  kept, and only **then** converted to RGB, scaled to [0, 1] and normalised with CLIP's
  mean and std;
* a mask is read as grey, binarised at full size (> 0 becomes 255), resized to S x S with
  PIL's bilinear filter, scaled to [0, 1] and binarised again (> 0.5).

Photos from phones carry an EXIF orientation; the official code ignores it. ``read_image(...,
exif_transpose=True)`` turns such an image upright first (predict.py and the notebook API do
that on request); for a file without an orientation tag both readings are identical.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dataset.errors import DatasetError
from dataset.files import file_kind

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Errors Pillow raises for files that are not (complete) images.
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError,
                Image.DecompressionBombError)


class ImageReadError(DatasetError):
    """An image or mask file that cannot be read."""


def _open(path: str, what: str, exif_transpose: bool = False) -> Image.Image:
    """The loaded image of a file, independent of the (closed) file. Only a regular file is
    opened: a FIFO, socket or device would block or never end."""
    kind = file_kind(path)
    if kind not in ("regular file", "missing"):
        raise ImageReadError(f"cannot read {what} {path}: it is a {kind}, not a regular file; "
                             f"replace it with the image file")
    try:
        with Image.open(path) as handle:
            handle.load()
            return ImageOps.exif_transpose(handle) if exif_transpose else handle.copy()
    except _READ_ERRORS as error:
        raise ImageReadError(f"cannot read {what} {path} ({type(error).__name__}: {error}); "
                             f"check that it is an image file and not damaged") from None


def read_image(path: str | os.PathLike, exif_transpose: bool = False) -> Image.Image:
    """The image file as a PIL image in its own mode (nothing converted). With
    ``exif_transpose`` the EXIF orientation is applied (as image viewers show the file)."""
    return _open(os.fspath(path), "image", exif_transpose)


def read_mask(path: str | os.PathLike) -> Image.Image:
    """A mask file as a PIL image in its own mode."""
    return _open(os.fspath(path), "mask")


def to_pil_image(image, exif_transpose: bool = False) -> Image.Image:
    """A path, a PIL image or a numpy array as a PIL image for :func:`preprocess_image`.

    Paths are read with :func:`read_image`; PIL images are taken as they are; arrays become
    images with ``Image.fromarray`` ([H, W] uint8 or uint16, [H, W, 3] or [H, W, 4] uint8);
    other arrays (bool, float in [0, 1], wider integers) are scaled to uint8 first."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, exif_transpose)
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageReadError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], "
                             f"not {list(array.shape)}")
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)                    # mode I;16, as a 16-bit PNG opens
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating) and values.size and 0.0 <= values.min() \
            and values.max() <= 1.0:
        return np.round(values * 255).astype(np.uint8)
    top = 65535.0 if values.size and values.max() > 255 else 255.0
    return np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)


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
    """The network input of a PIL image (any mode): float32 [3, S, S]."""
    return normalise(np.asarray(resize_image(image, image_size), dtype=np.uint8))


def binary_mask(mask: Image.Image) -> np.ndarray:
    """uint8 {0, 255} [H, W] of a mask at full size: grey, > 0 becomes 255."""
    grey = np.asarray(mask if mask.mode == "L" else mask.convert("L"))
    return np.where(grey > 0, 255, 0).astype(np.uint8)


def preprocess_mask(mask: Image.Image | np.ndarray, image_size: int) -> torch.Tensor:
    """Ground truth of a mask (PIL image, or a full-size {0, 255} array from
    :func:`binary_mask`): float32 {0, 1} [1, S, S] (bilinear resize of the binarised mask,
    > 0.5)."""
    binary = mask if isinstance(mask, np.ndarray) else binary_mask(mask)
    resized = Image.fromarray(binary).resize((image_size, image_size),
                                             Image.Resampling.BILINEAR)
    scaled = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).to(torch.float32) / 255
    return (scaled > 0.5).to(torch.float32)[None]
