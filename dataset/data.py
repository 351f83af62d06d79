"""Meta-driven anomaly-detection dataset: preprocessing, joint augmentation, mosaic, loaders.

A dataset is described by ``<root>/meta_<name>.json`` (written by ``dataset/make_meta.py``):
``{"train": {cls: [sample, ...]}, "test": {cls: [sample, ...]}}`` where a sample is
``{img_path, mask_path, cls_name, specie_name, dataset_name, anomaly}`` with paths relative to
``root``. As in the official release, training and testing both read ``meta["test"]``: training
uses the test split of the auxiliary dataset.

Per-sample pipeline (train and test alike; steps 3-4 only when enabled):

1. image: open, convert to RGB, resize to S x S with PIL's bicubic filter (aspect not kept);
   mask: open as grey, binarise at full size (> 0 becomes 255), resize to S x S with PIL's
   bilinear filter, binarise again (> 0.5 after scaling to [0, 1]); normal images and
   classification-only datasets get an all-zero mask;
2. (alternatively, with probability ``mosaic_prob``) a 2 x 2 mosaic of four random anomalous
   images of the same class, each prepared as in step 1 at quadrant size, labelled anomalous;
3. joint augmentation of the S x S uint8 image and mask (:class:`JointAugment`);
4. image to [0, 1] and CLIP mean/std normalisation; mask to {0, 1}.

All random draws (mosaic choice and augmentation) come from Python's ``random`` module, which
the DataLoader seeds in every worker; :func:`make_loader` seeds ``random`` and ``numpy`` from
torch's per-worker seed as well. With ``num_workers=0`` the main process's ``random`` state is
used, so seed it (``random.seed``) for reproducible augmentation.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Datasets without pixel ground truth: anomalous images get an all-zero mask.
CLASSIFICATION_ONLY = frozenset({"HeadCT", "BrainMRI", "Br35H"})
# Mosaic probability used in train mode when the dataset is MVTec-AD (official protocol).
MVTEC_MOSAIC_PROB = 0.4

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLASSIFICATION_ONLY",
    "MVTEC_MOSAIC_PROB",
    "DatasetError",
    "AnomalyDataset",
    "JointAugment",
    "preprocess_image",
    "preprocess_mask",
    "load_meta",
    "collate",
    "make_loader",
    "seed_worker",
]


class DatasetError(ValueError):
    """A problem with dataset files that the user can fix (missing meta, unreadable image...)."""


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _resize_rgb(pil_image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 array [H, W, 3] of ``pil_image`` resized to ``size`` = (width, height), bicubic."""
    rgb = pil_image.convert("RGB")
    # torchvision's Resize on a PIL image calls PIL's resize with the bicubic filter.
    resized = TF.resize(rgb, [size[1], size[0]], interpolation=InterpolationMode.BICUBIC)
    return np.array(resized, dtype=np.uint8)


def _resize_mask(pil_mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Binary uint8 mask {0, 255} [H, W] of ``pil_mask`` resized to ``size`` = (width, height).

    Binarised at full size (> 0), resized with PIL's bilinear filter, binarised again at 0.5.
    """
    grey = np.array(pil_mask.convert("L"), dtype=np.uint8)
    binary = Image.fromarray(np.where(grey > 0, 255, 0).astype(np.uint8))  # mode "L"
    resized = TF.resize(binary, [size[1], size[0]], interpolation=InterpolationMode.BILINEAR)
    scaled = torch.from_numpy(np.array(resized, dtype=np.uint8)).to(torch.float32).div(255)
    return np.where(scaled.numpy() > 0.5, 255, 0).astype(np.uint8)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1], CLIP-normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    tensor = tensor.to(torch.float32).div(255)
    return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """uint8 {0, 255} [H, W] -> float32 {0, 1} [1, H, W]."""
    return torch.from_numpy((mask > 127).astype(np.float32))[None]


def preprocess_image(pil_image: Image.Image, image_size: int) -> torch.Tensor:
    """CLIP preprocessing of a PIL image: RGB, bicubic resize to S x S, [0, 1], mean/std.

    Returns float32 [3, S, S].
    """
    return _image_tensor(_resize_rgb(pil_image, (image_size, image_size)))


def preprocess_mask(pil_mask: Image.Image, image_size: int) -> torch.Tensor:
    """Ground-truth mask: grey, > 0 at full size, bilinear resize to S x S, > 0.5.

    Returns float32 [1, S, S] with values in {0, 1}.
    """
    return _mask_tensor(_resize_mask(pil_mask, (image_size, image_size)))


# ----------------------------------------------------------------------------------------------
# Joint augmentation
# ----------------------------------------------------------------------------------------------


class JointAugment:
    """Training augmentation applied jointly to a uint8 image [H, W, 3] and mask [H, W].

    Applied in this order, each independently with its probability (official protocol):

    1. rotation by a uniform angle in [-max_angle, max_angle] degrees about the image centre
       (image bilinear, mask nearest, borders reflected as OpenCV's BORDER_REFLECT_101) - p_rotate;
    2. rotation by k * 90 degrees, k uniform in {1, 2, 3} (image and mask) - p_rot90;
    3. brightness/contrast: x * (1 + c) + b * 255, c ~ U(-contrast_limit, contrast_limit),
       b ~ U(-brightness_limit, brightness_limit), clipped to [0, 255] - p_brightness_contrast;
    4. Gaussian noise of variance ~ U(noise_var) on the 0-255 scale, per pixel and channel,
       clipped - p_noise;
    5. one of, chosen uniformly: box blur with a 3 x 3 kernel; colour jitter (brightness,
       contrast, saturation factors in [0.8, 1.2], hue shift in [-0.2, 0.2], in random order);
       Gaussian blur with an odd kernel in {3, 5, 7} and sigma derived from it - p_blur.

    Geometric steps (1, 2) move image and mask together; photometric ones touch the image only.
    Every random draw uses Python's ``random`` module (noise via a numpy Generator seeded from it).
    """

    def __init__(
        self,
        p_rotate: float = 0.5,
        max_angle: float = 30.0,
        p_rot90: float = 0.5,
        p_brightness_contrast: float = 0.5,
        brightness_limit: float = 0.2,
        contrast_limit: float = 0.2,
        p_noise: float = 0.5,
        noise_var: tuple[float, float] = (10.0, 50.0),
        p_blur: float = 0.5,
    ):
        self.p_rotate = p_rotate
        self.max_angle = max_angle
        self.p_rot90 = p_rot90
        self.p_brightness_contrast = p_brightness_contrast
        self.brightness_limit = brightness_limit
        self.contrast_limit = contrast_limit
        self.p_noise = p_noise
        self.noise_var = noise_var
        self.p_blur = p_blur

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if random.random() < self.p_rotate:
            angle = random.uniform(-self.max_angle, self.max_angle)
            image, mask = rotate(image, mask, angle)
        if random.random() < self.p_rot90:
            k = random.randint(1, 3)
            image = np.ascontiguousarray(np.rot90(image, k))
            mask = np.ascontiguousarray(np.rot90(mask, k))
        if random.random() < self.p_brightness_contrast:
            contrast = 1.0 + random.uniform(-self.contrast_limit, self.contrast_limit)
            brightness = random.uniform(-self.brightness_limit, self.brightness_limit)
            image = brightness_contrast(image, brightness, contrast)
        if random.random() < self.p_noise:
            variance = random.uniform(*self.noise_var)
            image = gaussian_noise(image, math.sqrt(variance), random.getrandbits(64))
        if random.random() < self.p_blur:
            choice = random.randrange(3)
            if choice == 0:
                image = cv2.blur(image, (3, 3))
            elif choice == 1:
                image = color_jitter(image)
            else:
                ksize = random.choice((3, 5, 7))
                image = cv2.GaussianBlur(image, (ksize, ksize), 0)
        return image, mask


def rotate(image: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate image (bilinear) and mask (nearest) by ``angle`` degrees counter-clockwise."""
    height, width = mask.shape
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    image = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_REFLECT_101)
    return image, mask


def brightness_contrast(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """``image * contrast + brightness * 255``, clipped to uint8."""
    table = np.arange(256, dtype=np.float32) * contrast + brightness * 255.0
    table = np.clip(np.rint(table), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def gaussian_noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Add N(0, sigma^2) noise (0-255 scale) per pixel and channel, clipped to uint8."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=image.shape)
    return np.clip(np.rint(image.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def color_jitter(image: np.ndarray, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2, hue: float = 0.2) -> np.ndarray:
    """Random brightness, contrast, saturation and hue changes in random order (uint8 RGB)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W] uint8
    steps = [
        (F2.adjust_brightness, random.uniform(1 - brightness, 1 + brightness)),
        (F2.adjust_contrast, random.uniform(1 - contrast, 1 + contrast)),
        (F2.adjust_saturation, random.uniform(1 - saturation, 1 + saturation)),
        (F2.adjust_hue, random.uniform(-hue, hue)),
    ]
    random.shuffle(steps)
    for function, factor in steps:
        tensor = function(tensor, factor)
    return np.ascontiguousarray(tensor.permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------------------------
# Meta file
# ----------------------------------------------------------------------------------------------


def meta_path(root: str, dataset_name: str) -> str:
    return os.path.join(root, f"meta_{dataset_name}.json")


def load_meta(root: str, dataset_name: str) -> dict:
    """Read ``<root>/meta_<dataset_name>.json``; clear errors when it is missing or malformed."""
    path = meta_path(root, dataset_name)
    if not os.path.isfile(path):
        raise DatasetError(
            f"Meta file {path} not found; run `python dataset/make_meta.py --data_root {root} "
            f"--dataset {dataset_name}` to create it."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(
            f"Meta file {path} cannot be read ({error}); recreate it with `python "
            f"dataset/make_meta.py --data_root {root} --dataset {dataset_name}`."
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("test"), dict):
        raise DatasetError(
            f"Meta file {path} has no 'test' section of classes; recreate it with `python "
            f"dataset/make_meta.py --data_root {root} --dataset {dataset_name}`."
        )
    return meta


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class AnomalyDataset(Dataset):
    """Images, masks and labels of one standardised dataset, read from its meta file.

    Args:
        root: data root holding ``meta_<dataset_name>.json`` and the ``<dataset_name>/`` tree.
        dataset_name: e.g. ``mvtec``, ``visa``, ``BTAD``.
        mode: ``"test"`` or ``"train"``; both read ``meta["test"]``. The mode only selects the
            defaults of ``augment`` (on in train) and ``mosaic_prob`` (0.4 in train on mvtec).
        image_size: side S of the square network input.
        class_names: classes to keep (default: all classes of the meta file).
        augment: ``None`` (mode default), ``True``/``False``, or a :class:`JointAugment`.
        mosaic_prob: ``None`` (mode default) or the probability of replacing a sample by a
            2 x 2 mosaic of anomalous images of its class.
        classification_only: ``None`` (true for HeadCT, BrainMRI, Br35H) or a bool; when true,
            masks are never read and every mask is zero.

    Items are dicts: ``image`` float32 [3, S, S], ``mask`` float32 [1, S, S] in {0, 1},
    ``label`` int (0 normal, 1 anomalous), ``cls_name``, ``img_path`` (joined with root),
    ``specie_name``. Classes come in sorted order; within a class the meta file's order is kept.
    """

    def __init__(
        self,
        root: str,
        dataset_name: str,
        mode: str = "test",
        image_size: int = 518,
        class_names: Iterable[str] | None = None,
        augment: bool | JointAugment | None = None,
        mosaic_prob: float | None = None,
        classification_only: bool | None = None,
    ):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}.")
        if int(image_size) < 2:
            raise ValueError(f"image_size must be at least 2, got {image_size}.")
        self.root = str(root)
        self.dataset_name = dataset_name
        self.mode = mode
        self.image_size = int(image_size)
        self.classification_only = (
            dataset_name in CLASSIFICATION_ONLY if classification_only is None
            else bool(classification_only)
        )
        if augment is None:
            augment = mode == "train"
        if isinstance(augment, JointAugment):
            self.augmentation: JointAugment | None = augment
        else:
            self.augmentation = JointAugment() if augment else None
        if mosaic_prob is None:
            mvtec_training = mode == "train" and dataset_name == "mvtec"
            mosaic_prob = MVTEC_MOSAIC_PROB if mvtec_training else 0.0
        if not 0.0 <= float(mosaic_prob) <= 1.0:
            raise ValueError(f"mosaic_prob must be in [0, 1], got {mosaic_prob}.")
        self.mosaic_prob = float(mosaic_prob)

        self.meta_file = meta_path(self.root, dataset_name)
        test_split = load_meta(self.root, dataset_name)["test"]
        available = sorted(test_split)
        if class_names is None:
            selected = available
        else:
            if isinstance(class_names, str):
                class_names = [class_names]
            requested = list(dict.fromkeys(class_names))
            unknown = [name for name in requested if name not in test_split]
            if unknown:
                raise DatasetError(
                    f"Unknown class(es) {', '.join(map(repr, unknown))} for dataset "
                    f"{dataset_name} in {self.meta_file}; available classes: "
                    f"{', '.join(available)}."
                )
            selected = sorted(requested)
        if not selected:
            raise DatasetError(f"Meta file {self.meta_file} lists no test classes; recreate it "
                               f"with `python dataset/make_meta.py`.")

        self.samples: list[dict] = []
        for cls_name in selected:
            entries = test_split[cls_name]
            if not isinstance(entries, list):
                raise DatasetError(f"Class {cls_name!r} in {self.meta_file} is not a list of "
                                   f"samples; recreate the meta file with dataset/make_meta.py.")
            kept = [self._check_sample(entry, cls_name) for entry in entries
                    if isinstance(entry, dict) and entry.get("img_path")]
            if not kept:
                raise DatasetError(
                    f"Class {cls_name!r} of {dataset_name} has no test images in "
                    f"{self.meta_file}; check the converted data and rerun dataset/make_meta.py."
                )
            self.samples.extend(kept)
        self.class_names = selected
        # Anomalous samples of each class, for the mosaic.
        self.anomalous_indices: dict[str, list[int]] = {name: [] for name in selected}
        for index, sample in enumerate(self.samples):
            if sample["label"] == 1:
                self.anomalous_indices[sample["cls_name"]].append(index)

    def _check_sample(self, entry: dict, cls_name: str) -> dict:
        anomaly = entry.get("anomaly")
        if isinstance(anomaly, bool):
            anomaly = int(anomaly)
        if anomaly not in (0, 1):
            raise DatasetError(
                f"Sample {entry.get('img_path')} in {self.meta_file} has anomaly={anomaly!r} "
                f"(expected 0 or 1); recreate the meta file with dataset/make_meta.py."
            )
        mask_path = entry.get("mask_path") or ""
        return {
            "img_path": os.path.join(self.root, entry["img_path"]),
            "mask_path": os.path.join(self.root, mask_path) if mask_path else "",
            "cls_name": entry.get("cls_name") or cls_name,
            "specie_name": entry.get("specie_name") or ("anomaly" if anomaly else "good"),
            "label": int(anomaly),
        }

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, dataset_name={self.dataset_name!r}, "
                f"mode={self.mode!r}, image_size={self.image_size}, samples={len(self)}, "
                f"classes={len(self.class_names)})")

    # -- reading files ---------------------------------------------------------------------

    @staticmethod
    def _open_resized(path: str, size: tuple[int, int], resize, what: str) -> np.ndarray:
        """``resize(PIL image, size)`` of the file, or a DatasetError naming it."""
        try:
            with Image.open(path) as handle:
                return resize(handle, size)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DatasetError(
                f"Cannot read {what} {path} ({type(error).__name__}: {error}); check the file or "
                f"convert the dataset again with dataset/make_dataset.py."
            ) from None

    def _read_image(self, path: str, size: tuple[int, int]) -> np.ndarray:
        return self._open_resized(path, size, _resize_rgb, "image")

    def _read_mask(self, sample: dict, size: tuple[int, int]) -> np.ndarray:
        """uint8 {0, 255} [H, W]; zeros for normal samples and classification-only data."""
        if sample["label"] == 0 or self.classification_only:
            return np.zeros((size[1], size[0]), dtype=np.uint8)
        path = sample["mask_path"]
        if not path:
            raise DatasetError(
                f"Anomalous image {sample['img_path']} has no mask_path in {self.meta_file}; "
                f"recreate the meta file, or pass classification_only=True for data without masks."
            )
        if not os.path.isfile(path):
            raise DatasetError(
                f"Mask file {path} of anomalous image {sample['img_path']} not found; convert the "
                f"dataset again, or pass classification_only=True for data without masks."
            )
        return self._open_resized(path, size, _resize_mask, "mask")

    def load_arrays(self, index: int, size: tuple[int, int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed uint8 image [H, W, 3] and mask {0, 255} [H, W] of sample ``index``."""
        sample = self.samples[index]
        size = size or (self.image_size, self.image_size)
        return self._read_image(sample["img_path"], size), self._read_mask(sample, size)

    def mosaic(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """2 x 2 mosaic of four samples: quadrants top-left, top-right, bottom-left, bottom-right.

        Each source is preprocessed at its quadrant's size (S // 2 or S - S // 2 per side).
        Returns uint8 image [S, S, 3] and mask {0, 255} [S, S].
        """
        if len(indices) != 4:
            raise ValueError(f"a mosaic needs 4 samples, got {len(indices)}.")
        size = self.image_size
        cuts = (0, size // 2, size)
        image = np.zeros((size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        for position, index in enumerate(indices):
            row, col = divmod(position, 2)
            top, bottom = cuts[row], cuts[row + 1]
            left, right = cuts[col], cuts[col + 1]
            tile_image, tile_mask = self.load_arrays(index, (right - left, bottom - top))
            image[top:bottom, left:right] = tile_image
            mask[top:bottom, left:right] = tile_mask
        return image, mask

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        cls_name = sample["cls_name"]
        pool = self.anomalous_indices[cls_name]
        if self.mosaic_prob > 0 and pool and random.random() < self.mosaic_prob:
            chosen = random.sample(pool, 4) if len(pool) >= 4 else random.choices(pool, k=4)
            image, mask = self.mosaic(chosen)
            label, specie_name = 1, "mosaic"
            img_path = "|".join(self.samples[i]["img_path"] for i in chosen)
        else:
            image, mask = self.load_arrays(index)
            label, specie_name = sample["label"], sample["specie_name"]
            img_path = sample["img_path"]
        if self.augmentation is not None:
            image, mask = self.augmentation(image, mask)
        return {
            "image": _image_tensor(image),  # [3, S, S]
            "mask": _mask_tensor(mask),  # [1, S, S]
            "cls_name": cls_name,
            "label": label,
            "img_path": img_path,
            "specie_name": specie_name,
        }


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def collate(batch: list[dict]) -> dict:
    """Stack tensors, turn ints into a tensor, keep strings (and anything else) as lists."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, int, np.integer)):
            out[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            out[key] = values
    return out


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and ``numpy`` of a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    pin_memory: bool | None = None,
    drop_last: bool = False,
    sampler=None,
) -> DataLoader:
    """DataLoader with seeded shuffling and workers; ``shuffle`` is ignored when a sampler is given.

    ``pin_memory`` defaults to True only when CUDA is available.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(shuffle) if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
    )
