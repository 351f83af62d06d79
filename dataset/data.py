"""Meta-driven anomaly-detection dataset: samples, the official training pipeline, loaders.

A dataset is described by ``<root>/meta_<name>.json`` (written by ``dataset/make_meta.py``):
``{"train": {cls: [sample, ...]}, "test": {cls: [sample, ...]}}`` where a sample is
``{img_path, mask_path, cls_name, specie_name, dataset_name, anomaly}`` with paths relative to
``root``. As in the official release, training and testing both read ``meta["test"]``: training
uses the test split of the auxiliary dataset.

Per sample (SPEC section 6), test and train alike unless said:

1. (train, MVTec-AD: with probability 0.4) the sample is replaced by a 2 x 2 mosaic of four
   anomalous images of its class drawn with replacement, pasted at their original size into a
   canvas twice the first one's width and height, their binarised masks likewise; anomalous;
2. (train) the official augmentation (``dataset/augment.py``, albumentations 1.3.1 semantics)
   of the image at its **original resolution** and its full-size {0, 255} mask;
3. the preprocessing of ``dataset/transforms.py``: bicubic resize to S x S in the image's own
   mode, then RGB, [0, 1], CLIP mean/std; the mask binarised, bilinear resize, > 0.5. Normal
   images and classification-only datasets get an all-zero mask.

Randomness (mosaic and augmentation) comes from a ``random.Random`` seeded from (``seed``,
epoch, sample index): a sample's draws do not depend on the DataLoader's worker count or on
the other samples, and ``set_epoch`` gives each epoch its own draws.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from dataset.augment import augment_rgb
from dataset.errors import DatasetError
from dataset.files import file_kind
from dataset.registry import REGISTRY, dataset_info
from dataset.transforms import (CLIP_MEAN, CLIP_STD, ImageReadError, binary_mask,
                                is_high_bit_depth, preprocess_image, preprocess_mask, read_image,
                                read_mask, rgb_array, to_8bit)
from models.errors import InputError

log = logging.getLogger(__name__)
# Modes of mask files read as they are meant: one grey channel (binarised at > 0). Any other
# (RGB, RGBA, palette, grey + alpha, ...) is converted to grey first and warned about.
GREY_MASK_MODES = frozenset({"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
IMAGE_METRIC_NAMES = "auroc_sp, ap_sp, f1_sp"

# Kept for code that imports them from here; the registry is the source.
CLASSIFICATION_ONLY = frozenset(n for n, i in REGISTRY.items() if i.classification_only)
MVTEC_MOSAIC_PROB = REGISTRY["mvtec"].mosaic_prob

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLASSIFICATION_ONLY",
    "MVTEC_MOSAIC_PROB",
    "DatasetError",
    "AnomalyDataset",
    "preprocess_image",
    "preprocess_mask",
    "load_meta",
    "collate",
    "make_loader",
    "sample_seed",
    "seed_worker",
]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random draws in one epoch."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(index)])
               .generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Meta file
# ----------------------------------------------------------------------------------------------


def meta_path(root: str, dataset_name: str) -> str:
    return os.path.join(root, f"meta_{dataset_name}.json")


class _DuplicateKey(ValueError):
    """A JSON object of a meta file with one key twice (the message names the key)."""


def _unique_keys(pairs: list) -> dict:
    """json's object hook: the object, or _DuplicateKey when a key comes twice (json.load
    would silently keep the last, dropping e.g. the first section of a class)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"'{key}'")
        out[key] = value
    return out


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
            meta = json.load(handle, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        raise DatasetError(f"Meta file {path} lists {error} twice (a JSON object keeps only "
                           f"the last of two equal keys): merge the two into one, or recreate "
                           f"the file with `python dataset/make_meta.py --data_root {root} "
                           f"--dataset {dataset_name}`.") from None
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


def mask_file_mode(path: str) -> str | None:
    """The PIL mode of an image file, read from its header (None when it cannot be read)."""
    if file_kind(path) != "regular file":
        return None
    try:
        with Image.open(path) as handle:
            return handle.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class AnomalyDataset(Dataset):
    """Images, masks and labels of one standardised dataset, read from its meta file.

    Args:
        root: data root holding ``meta_<dataset_name>.json`` and the ``<dataset_name>/`` tree.
        dataset_name: e.g. ``mvtec``, ``visa``, ``BTAD``.
        mode: ``"test"`` or ``"train"``; both read ``meta["test"]``. The mode only selects the
            defaults of ``augment`` (on in train) and ``mosaic_prob`` (the registry's in train:
            0.4 on mvtec).
        image_size: side S of the square network input.
        class_names: classes to keep (default: all classes of the meta file).
        augment: ``None`` (mode default) or a bool: the official augmentation.
        mosaic_prob: ``None`` (mode default) or the probability of replacing a sample by a
            2 x 2 mosaic of anomalous images of its class.
        classification_only: ``None`` (the registry's: HeadCT, BrainMRI, Br35H; for a dataset
            the registry does not know, the meta file's ``info["classification_only"]``) or a
            bool; when true, masks are never read and every mask is zero.
        seed: seed of the per-sample random draws (with the epoch and the sample index).

    Items are dicts: ``image`` float32 [3, S, S], ``mask`` float32 [1, S, S] in {0, 1},
    ``label`` int (0 normal, 1 anomalous), ``cls_name``, ``img_path`` (joined with root),
    ``specie_name``, ``high_bit_depth`` (1 for a file of more than 8 bits read officially).
    Classes come in sorted order; within a class the meta file's order is kept. ``info`` is the meta file's ``info`` dict (written by dataset/folder.py; {} otherwise) and
    ``wording`` its prompt words by class ({} without it).

    The augmentation expects three-channel images, as the official code (which fails on
    others); a training image of another mode (grey, palette, RGBA, 16-bit) is converted to
    RGB first.
    """

    def __init__(
        self,
        root: str,
        dataset_name: str,
        mode: str = "test",
        image_size: int = 518,
        class_names: Iterable[str] | None = None,
        augment: bool | None = None,
        mosaic_prob: float | None = None,
        classification_only: bool | None = None,
        seed: int = 0,
    ):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}.")
        if int(image_size) < 2:
            raise ValueError(f"image_size must be at least 2, got {image_size}.")
        self.root = str(root)
        self.dataset_name = dataset_name
        self.mode = mode
        self.image_size = int(image_size)
        self.augment = mode == "train" if augment is None else bool(augment)
        if mosaic_prob is None:           # the registry's, when training on the dataset
            mosaic_prob = dataset_info(dataset_name).mosaic_prob if mode == "train" else 0.0
        if not 0.0 <= float(mosaic_prob) <= 1.0:
            raise ValueError(f"mosaic_prob must be in [0, 1], got {mosaic_prob}.")
        self.mosaic_prob = float(mosaic_prob)
        self.seed = int(seed)
        self.epoch = 0

        self.meta_file = meta_path(self.root, dataset_name)
        meta = load_meta(self.root, dataset_name)
        test_split = meta["test"]
        # what dataset/folder.py records beside the splits ({} in the other meta files)
        info = meta.get("info")
        self.info: dict = info if isinstance(info, dict) else {}
        self.wording: dict[str, str] = dict(self.info.get("wording") or {})
        # a folder's meta file (dataset/folder.py) states its own facts, which win over the
        # registry's even where the folder took a registry dataset's name
        self.from_folder = self.info.get("source") == "dataset.folder"
        if classification_only is None:   # the registry's, else the meta file's
            classification_only = (dataset_info(dataset_name).classification_only
                                   if dataset_name in REGISTRY and not self.from_folder
                                   else self.info.get("classification_only", False))
        self.classification_only = bool(classification_only)
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
            kept = [self._check_sample(entry, cls_name, index)
                    for index, entry in enumerate(entries)]
            self._warn_repeated(kept, cls_name)
            if mode == "test":
                self._warn_normal_masks(entries, cls_name)
            if not kept:
                raise DatasetError(
                    f"Class {cls_name!r} of {dataset_name} has no test images in "
                    f"{self.meta_file}; check the converted data and rerun dataset/make_meta.py."
                )
            self.samples.extend(kept)
        self.class_names = selected
        # Anomalous samples of each class, for the mosaic.
        self.anomalous_indices: dict[str, list[int]] = {}
        for index, sample in enumerate(self.samples):
            pool = self.anomalous_indices.setdefault(sample["cls_name"], [])
            if sample["label"] == 1:
                pool.append(index)
        if self.mode == "test":
            self._warn_one_kind()
        if not self.classification_only:
            self._warn_colour_masks()

    def _check_sample(self, entry, cls_name: str, index: int) -> dict:
        """One test-split entry as a sample, or one DatasetError naming the meta file, the
        class and the entry's index. (Placeholder entries with empty paths belong to the
        "train" split, which is never read.)"""
        where = f"Entry {index} of class {cls_name!r} in {self.meta_file}"
        remake = "recreate the meta file with dataset/make_meta.py"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} is a {type(entry).__name__}, not a sample "
                               f"{{img_path, mask_path, cls_name, anomaly}}; {remake}.")
        img_path = entry.get("img_path")
        if not isinstance(img_path, str) or not img_path:
            raise DatasetError(
                f"{where} has {'no' if not img_path else 'a non-text'} img_path "
                f"({img_path!r}): every test entry needs its image (empty paths are "
                f"placeholders of the 'train' split only); fix the entry or {remake}.")
        own = entry.get("cls_name")
        if own not in (None, "") and own != cls_name:
            raise DatasetError(
                f"{where} ({img_path}) says cls_name {own!r}: an entry belongs to the class it "
                f"is listed under ({cls_name!r}); move it under {own!r} or fix its cls_name.")
        anomaly = entry.get("anomaly")
        if isinstance(anomaly, bool):
            anomaly = int(anomaly)
        if anomaly not in (0, 1):
            raise DatasetError(
                f"Sample {img_path} ({where}) has anomaly={anomaly!r} (expected 0 or 1); "
                f"{remake}."
            )
        mask_path = entry.get("mask_path") or ""
        if not isinstance(mask_path, str):
            raise DatasetError(f"{where} ({img_path}) has a non-text mask_path "
                               f"({mask_path!r}); fix the entry or {remake}.")
        return {
            "img_path": os.path.join(self.root, img_path),
            "mask_path": os.path.join(self.root, mask_path) if mask_path else "",
            "cls_name": cls_name,
            "specie_name": entry.get("specie_name") or ("anomaly" if anomaly else "good"),
            "label": int(anomaly),
        }

    def _warn_normal_masks(self, entries: list, cls_name: str) -> None:
        """One warning line for a class whose normal entries carry a mask_path: normal images
        get all-zero masks (SPEC), so those files are not read."""
        named = [e.get("mask_path") for e in entries if isinstance(e, dict)
                 and e.get("anomaly") == 0 and e.get("mask_path")]
        if named:
            log.warning("class %s of %s: %d normal entr%s in %s name a mask (e.g. %s); normal "
                        "images are scored against an all-zero mask, so the file is not read: "
                        "move the image among the anomalous ones if it has a defect",
                        cls_name, self.dataset_name, len(named), "y" if len(named) == 1 else
                        "ies", self.meta_file, named[0])

    def _warn_repeated(self, samples: list[dict], cls_name: str) -> None:
        """One warning line for a class whose entries repeat an image (each copy is scored
        and counted)."""
        counts = Counter(s["img_path"] for s in samples)
        repeated = {path: n for path, n in counts.items() if n > 1}
        if repeated:
            first = next(iter(repeated))
            log.warning("class %s of %s: %d image(s) are listed more than once in %s (e.g. %s, "
                        "%d times); each copy is scored and counted in the metrics",
                        cls_name, self.dataset_name, len(repeated), self.meta_file, first,
                        repeated[first])

    def _warn_one_kind(self) -> None:
        """One warning line for each class whose test images are all normal or all
        anomalous: the metrics that need both kinds will be n/a."""
        for cls_name in self.class_names:
            labels = [s["label"] for s in self.samples if s["cls_name"] == cls_name]
            anomalous = sum(labels)
            normal = len(labels) - anomalous
            if anomalous and normal:
                continue
            na = (f"its image metrics ({IMAGE_METRIC_NAMES}) and pixel metrics will be n/a"
                  if not anomalous else f"its image metrics ({IMAGE_METRIC_NAMES}) will be n/a")
            log.warning("class %s of %s has %d normal and %d anomalous test images: %s",
                        cls_name, self.dataset_name, normal, anomalous, na)

    def _warn_colour_masks(self) -> None:
        """One warning line for each class whose mask files are not single-channel images
        (read from the file headers; files that cannot be opened are reported when read)."""
        for cls_name in self.class_names:
            modes: Counter = Counter()
            paths = [s["mask_path"] for s in self.samples
                     if s["cls_name"] == cls_name and s["label"] == 1 and s["mask_path"]]
            for path in paths:
                mode = mask_file_mode(path)
                if mode is not None and mode not in GREY_MASK_MODES:
                    modes[mode] += 1
            if modes:
                log.warning(
                    "class %s of %s: %d of %d masks are not single-channel images (%s): they "
                    "are converted to grey and every non-zero pixel counts as a defect; check "
                    "them, or save them as one-channel 0/255 images", cls_name,
                    self.dataset_name, sum(modes.values()), len(paths),
                    ", ".join(f"{m} {n}" for m, n in sorted(modes.items())))

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, dataset_name={self.dataset_name!r}, "
                f"mode={self.mode!r}, image_size={self.image_size}, samples={len(self)}, "
                f"classes={len(self.class_names)})")

    def set_epoch(self, epoch: int) -> None:
        """Give the random draws of the coming epoch (workers started afterwards see it)."""
        self.epoch = int(epoch)

    # -- reading files ---------------------------------------------------------------------

    def _has_mask(self, sample: dict) -> bool:
        return sample["label"] == 1 and not self.classification_only

    def _mask_file(self, sample: dict) -> str:
        path = sample["mask_path"]
        if not path:
            raise DatasetError(
                f"Anomalous image {sample['img_path']} has no mask_path in {self.meta_file}; "
                f"{self._no_mask_fix}")
        if not os.path.isfile(path):
            raise DatasetError(
                f"Mask file {path} of anomalous image {sample['img_path']} not found; "
                f"{self._no_mask_fix}")
        return path

    @property
    def _no_mask_fix(self) -> str:
        """What to do about a missing mask: the data's own tool, and for data without masks
        the way to classification only (a folder's meta file written without masks; the
        registry's classification-only datasets)."""
        if self.from_folder:
            return ("write the meta file again with `python -m dataset.folder` (with masks for "
                    "every anomalous image, or none at all: classification only)")
        return (f"convert the dataset again (dataset/make_dataset.py, dataset/make_meta.py); "
                f"data without masks: describe your folder with `python -m dataset.folder ROOT "
                f"--dataset NAME` (classification only without masks) instead of "
                f"--dataset {self.dataset_name}")

    @property
    def reading(self) -> str:
        """How images of more than 8 bits are read (``models.imaging``): "official" for the
        project's datasets (as the official code), "range" for a user's folder dataset
        (dataset/folder.py: mapped to 8 bits by their range)."""
        return "range" if self.info.get("source") == "dataset.folder" else "official"

    def read_file(self, path: str) -> Image.Image:
        """An image file of this dataset as read for it (its own mode, or for folder datasets
        mapped to 8 bits by range and turned upright by its EXIF orientation, as predict.py,
        the page and the API read a user's files); an unreadable file is a DatasetError."""
        try:
            image = read_image(path, exif_transpose=self.from_folder)
            return to_8bit(image, f"image {path}") if self.reading == "range" else image
        except InputError as error:   # in a dataset, an unreadable file is a dataset error
            raise DatasetError(str(error)) from None

    def input_of(self, path: str) -> torch.Tensor:
        """The network input [3, S, S] of an image file read as this dataset's images are (the
        few-shot references of test.py)."""
        return preprocess_image(self.read_file(path), self.image_size)

    def read_full_mask(self, index: int) -> np.ndarray | None:
        """The full-size {0, 255} mask [H, W] of sample ``index`` alone (None for normal
        samples and classification-only data), without reading its image."""
        sample = self.samples[index]
        if not self._has_mask(sample):
            return None
        return binary_mask(self._read_mask(self._mask_file(sample)))

    def _read_mask(self, path: str) -> Image.Image:
        """A mask file as opened (a folder dataset's upright by its EXIF orientation, as its
        images); an unreadable one is a DatasetError, as an image is."""
        try:
            mask = read_mask(path)
            return ImageOps.exif_transpose(mask) if self.from_folder else mask
        except ImageReadError as error:
            raise DatasetError(str(error)) from None

    def read_sample(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """The image of sample ``index`` as opened, and its full-size {0, 255} mask (None for
        normal samples and classification-only data). A mask whose size differs from its
        image's is an error naming both files."""
        sample = self.samples[index]
        image = self.read_file(sample["img_path"])
        if not self._has_mask(sample):
            return image, None
        path = self._mask_file(sample)
        mask = self._read_mask(path)
        if mask.size != image.size:
            raise DatasetError(
                f"Mask {path} is {mask.size[0]} x {mask.size[1]} but its image "
                f"{sample['img_path']} is {image.size[0]} x {image.size[1]} (width x height); "
                f"convert the dataset again or fix the mask.")
        return image, binary_mask(mask)

    def mosaic(self, indices: Sequence[int]) -> tuple[Image.Image, np.ndarray]:
        """2 x 2 mosaic of four samples (top-left, top-right, bottom-left, bottom-right), each
        pasted at its original size into an RGB canvas twice the first one's width and height
        (larger images are cut at the canvas border, smaller ones leave black). Returns the
        canvas and its {0, 255} mask."""
        if len(indices) != 4:
            raise ValueError(f"a mosaic needs 4 samples, got {len(indices)}.")
        first = None
        for position, index in enumerate(indices):
            image, mask = self.read_sample(index)
            if first is None:
                width, height = first = image.size
                canvas = Image.new("RGB", (2 * width, 2 * height))
                canvas_mask = np.zeros((2 * height, 2 * width), dtype=np.uint8)
            row, col = divmod(position, 2)
            top, left = row * first[1], col * first[0]
            canvas.paste(image.convert("RGB"), (left, top))
            if mask is not None:
                h = min(mask.shape[0], canvas_mask.shape[0] - top)
                w = min(mask.shape[1], canvas_mask.shape[1] - left)
                canvas_mask[top:top + h, left:left + w] = mask[:h, :w]
        return canvas, canvas_mask

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        cls_name = sample["cls_name"]
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        pool = self.anomalous_indices[cls_name]
        if self.mosaic_prob > 0 and pool and rng.random() < self.mosaic_prob:
            chosen = [rng.choice(pool) for _ in range(4)]          # with replacement
            image, mask = self.mosaic(chosen)
            label, specie_name = 1, "mosaic"
            img_path = "|".join(self.samples[i]["img_path"] for i in chosen)
        else:
            image, mask = self.read_sample(index)
            label, specie_name = sample["label"], sample["specie_name"]
            img_path = sample["img_path"]
        if self.augment:
            rgb = rgb_array(image)
            if mask is None:
                mask = np.zeros(rgb.shape[:2], dtype=np.uint8)
            rgb, mask, _ = augment_rgb(rgb, mask, rng)
            image = Image.fromarray(rgb)
        size = self.image_size
        return {
            "image": preprocess_image(image, size),  # [3, S, S]
            "mask": (torch.zeros(1, size, size) if mask is None
                     else preprocess_mask(mask, size)),  # [1, S, S]
            "cls_name": cls_name,
            "label": label,
            "img_path": img_path,
            "specie_name": specie_name,
            # read officially although of more than 8 bits (counted in the evaluation log)
            "high_bit_depth": int(is_high_bit_depth(image)),
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
