"""Image and mask files of datasets as network inputs and ground truth.

The image reader is :mod:`models.imaging` (one reader for every entry point, re-exported here
under the names the dataset code and notebooks use). This module adds the masks (SPEC section 6,
Preprocess): a mask is read as grey, binarised at full size (> 0 becomes 255), resized to S x S
with PIL's bilinear filter, scaled to [0, 1] and binarised again (> 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dataset.files import IMAGE_EXTENSIONS
from models.imaging import (CLIP_MEAN, CLIP_STD, ImageReadError, array_to_8bit,
                            is_high_bit_depth, normalise, preprocess, preprocess_image,
                            read_image, read_mask, resize_image, rgb_array, to_8bit,
                            to_pil_image)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGE_EXTENSIONS", "ImageReadError", "array_to_8bit",
           "binary_mask", "is_high_bit_depth", "normalise", "preprocess", "preprocess_image",
           "preprocess_mask", "read_image", "read_mask", "resize_image", "rgb_array",
           "to_8bit", "to_pil_image"]


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
