"""Machinery shared by the dataset converters.

A converter does not write anything itself. It turns a raw download into a
:class:`Plan`: the list of class folders and, in processing order, one
:class:`Job` per source image, each with its final output name (running id
included). :func:`execute` then reads, checks, binarises and writes the files.
Planning first means a missing mask or a malformed raw layout is reported
before any file is written, and the progress bar knows its total.

Output layout (the official one)::

    <out>/<class>/train/good/<name>.bmp
    <out>/<class>/test/good/<name>.bmp
    <out>/<class>/test/anomaly/<name>.bmp
    <out>/<class>/ground_truth/anomaly/<name>.png

All four folders are created for every class, even when they stay empty.
Images are written as 8-bit, 3-channel BMP, masks as single-channel PNG with
values 0 and 255, both at the source resolution; a mask whose size differs from
its image's is an error, as are a missing or unreadable file. Errors are
:class:`dataset.errors.DatasetError` (re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

# DatasetError and the listings are re-exported: converters and tests import them from here.
from dataset.errors import DatasetError  # noqa: F401
from dataset.files import IMAGE_EXTENSIONS, find_dir, list_dirs, list_files, stem  # noqa: F401

IMAGE_EXTS = IMAGE_EXTENSIONS   # the one list of image extensions (dataset/files.py)

# Output sub-folders of a class, by job kind.
SPLIT_DIRS = {
    "train": ("train", "good"),
    "good": ("test", "good"),
    "anomaly": ("test", "anomaly"),
}
MASK_DIR = ("ground_truth", "anomaly")

# Mask checks of the pos/neg releases (KSDD2, RSDD, DAGM).
DEFECT_MASK = "defect"   # values exactly {0, 255}
CLEAN_MASK = "clean"     # all zero


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"Folder {path} not found: {what}.")
    return path


# ----------------------------------------------------------------------------- plan

class IdCounter:
    """The running image id of one dataset, zero-padded to `digits`."""

    def __init__(self, digits: int = 6, start: int = 0):
        self.digits = digits
        self.value = start

    def next(self) -> str:
        text = f"{self.value:0{self.digits}d}"
        self.value += 1
        return text


@dataclass(frozen=True)
class Job:
    """One source image. `kind` is train, good, anomaly, or check (mask checked, nothing written)."""
    cls: str
    kind: str
    image: Path
    name: str = ""                      # output stem, id included
    mask: Optional[Path] = None         # source mask, if any
    mask_check: Optional[str] = None    # DEFECT_MASK / CLEAN_MASK for the pos/neg releases


def _require_mask(mask: Path, image: Path) -> None:
    if not mask.is_file():
        raise DatasetError(f"Mask {mask} for image {image} not found: restore it from the "
                           f"original download (every image of this kind needs its mask).")


@dataclass
class Plan:
    """Everything :func:`execute` needs to write one dataset."""
    digits: int = 6
    threshold: int = 128                 # mask pixel > threshold -> 255
    png_level: Optional[int] = None      # PNG compression level for masks (None: OpenCV default)
    read_flags: int = cv2.IMREAD_COLOR
    classes: List[str] = field(default_factory=list)
    jobs: List[Job] = field(default_factory=list)
    counter: IdCounter = field(init=False, repr=False)

    def __post_init__(self):
        self.counter = IdCounter(self.digits)

    def add_class(self, cls: str) -> None:
        if cls not in self.classes:
            self.classes.append(cls)

    def add(self, cls: str, kind: str, image: Path, parts: Sequence[str],
            mask: Optional[Path] = None, mask_check: Optional[str] = None) -> None:
        """Append a written image; its name is `parts` joined by '_' with the next id appended."""
        if mask is not None:
            _require_mask(mask, image)
        name = "_".join([*parts, self.counter.next()])
        self.jobs.append(Job(cls, kind, image, name, mask, mask_check))

    def add_check(self, cls: str, image: Path, mask: Path, mask_check: str) -> None:
        """Append a mask check that writes nothing and takes no id."""
        _require_mask(mask, image)
        self.jobs.append(Job(cls, "check", image, "", mask, mask_check))

    def counts(self) -> Dict[str, Dict[str, int]]:
        """Images written per class: {cls: {"train": n, "good": n, "anomaly": n}}."""
        out = {cls: {"train": 0, "good": 0, "anomaly": 0} for cls in self.classes}
        for job in self.jobs:
            if job.kind in SPLIT_DIRS:
                out[job.cls][job.kind] += 1
        return out


# ----------------------------------------------------------------------------- pixels

def read_image(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """8-bit, 3-channel BGR image (grey sources get 3 channels, 16-bit is scaled to 8 bits,
    a multi-page TIFF gives its first page)."""
    image = cv2.imread(str(path), flags)
    if image is None:
        raise DatasetError(f"Cannot read image {path}: the file is missing, truncated or not an "
                           f"image; replace it with the file from the original download.")
    return image


def read_mask(path: Path) -> np.ndarray:
    """Single-channel 8-bit mask."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"Cannot read mask {path}: the file is missing, truncated or not an "
                           f"image; replace it with the file from the original download.")
    return mask


def binarise(mask: np.ndarray, threshold: int = 128) -> np.ndarray:
    """0/255 mask: a pixel is foreground when its value is above `threshold`."""
    return np.where(mask > threshold, 255, 0).astype(np.uint8)


def check_mask(mask: np.ndarray, rule: Optional[str], path: Path) -> None:
    """The pos/neg releases' mask contract: defect masks hold exactly {0, 255}, clean ones only 0."""
    if rule is None:
        return
    values = np.unique(mask)
    if rule == DEFECT_MASK and not np.array_equal(values, [0, 255]):
        raise DatasetError(f"Mask {path} has values {values.tolist()[:8]}, expected exactly 0 and "
                           f"255 for a defective image: use the masks of the authors' release.")
    if rule == CLEAN_MASK and values.tolist() != [0]:
        raise DatasetError(f"Mask {path} of a defect-free image is not all zero: the image belongs "
                           f"in pos/, or the mask is wrong.")


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path,
                    mask_path: Path) -> None:
    """A mask must cover its image pixel for pixel (nothing is resized)."""
    if image.shape[:2] != mask.shape[:2]:
        (ih, iw), (mh, mw) = image.shape[:2], mask.shape[:2]
        raise DatasetError(f"Mask {mask_path} is {mw} x {mh} pixels but its image {image_path} is "
                           f"{iw} x {ih} (width x height): replace the mask or the image with the "
                           f"file from the original download.")


def write_file(path: Path, array: np.ndarray, params: Sequence[int] = ()) -> None:
    if not cv2.imwrite(str(path), array, list(params)):
        raise DatasetError(f"Cannot write {path}: check that the output folder is writable and "
                           f"the disk is not full.")


def class_dirs(out: Path, cls: str) -> Dict[str, Path]:
    """Create the four output folders of a class; returns them by job kind (plus "mask")."""
    dirs = {kind: out.joinpath(cls, *parts) for kind, parts in SPLIT_DIRS.items()}
    dirs["mask"] = out.joinpath(cls, *MASK_DIR)
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    return dirs


def execute(plan: Plan, out: Path, progress: bool = True, desc: str = "") -> Dict[str, Dict[str, int]]:
    """Write the plan under `out` (which becomes `<dst>/<Name>`); returns :meth:`Plan.counts`."""
    from tqdm import tqdm

    dirs = {cls: class_dirs(out, cls) for cls in plan.classes}
    png_params = [cv2.IMWRITE_PNG_COMPRESSION, plan.png_level] if plan.png_level is not None else []
    for job in tqdm(plan.jobs, desc=desc, unit="img", disable=not progress, leave=False):
        mask = None
        if job.mask is not None:
            mask = read_mask(job.mask)
            check_mask(mask, job.mask_check, job.mask)
        if job.kind == "check":     # a skipped neg image: its mask is checked, nothing written
            continue
        image = read_image(job.image, plan.read_flags)
        if mask is not None:
            check_same_size(image, mask, job.image, job.mask)
        write_file(dirs[job.cls][job.kind] / f"{job.name}.bmp", image)
        if mask is not None and job.kind == "anomaly":
            write_file(dirs[job.cls]["mask"] / f"{job.name}.png", binarise(mask, plan.threshold),
                       png_params)
    return plan.counts()


# ----------------------------------------------------------------------------- folder layouts

MaskRule = Callable[[Path, Path], Path]   # (ground_truth/<def> folder, image) -> mask path


def add_folder_class(plan: Plan, cls: str, class_dir: Path, *, prefix: str,
                     train_glob: Optional[str], good_glob: Optional[str],
                     anomaly_glob: Optional[str], mask_rule: Optional[MaskRule],
                     normal: str = "good", keep_stem: bool = True,
                     min_test_dirs: int = 1) -> None:
    """Plan one class of an MVTec-style folder layout.

    `class_dir` holds train/<normal>/, test/<normal|def>/ and ground_truth/<def>/.
    Train images are taken only when train/ holds exactly the one folder `normal`; the
    test folders are walked in sorted order when there are at least `min_test_dirs`
    of them. Names are `<prefix>[_<good|def>][_<stem>]_<id>`.
    """
    plan.add_class(cls)
    train = require_dir(class_dir / "train", "the raw class folder needs a train/ folder (it may be empty)")
    test = require_dir(class_dir / "test", "the raw class folder needs a test/ folder")

    def parts(image: Path, *infix: str) -> List[str]:
        return [prefix, *infix, *([stem(image)] if keep_stem else [])]

    if list_dirs(train) == [normal]:
        for image in list_files(train / normal, train_glob):
            plan.add(cls, "train", image, parts(image))

    species = list_dirs(test)
    if len(species) < min_test_dirs:
        return
    for specie in species:
        if specie == normal:
            for image in list_files(test / specie, good_glob):
                plan.add(cls, "good", image, parts(image, "good"))
            continue
        gt = class_dir / "ground_truth" / specie
        for image in list_files(test / specie, anomaly_glob):
            mask = mask_rule(gt, image) if mask_rule is not None else None
            plan.add(cls, "anomaly", image, parts(image, specie), mask)


@dataclass(frozen=True)
class ObjectLayout:
    """A medical dataset in the AdaCLIP / AnomalyCLIP layout: one class under `<src>/object/`.

    A glob of None means any image file, extension matched case-insensitively.
    """
    prefix: str
    class_name: str
    train_glob: Optional[str]
    good_glob: Optional[str]
    anomaly_glob: Optional[str]
    mask_rule: Optional[MaskRule] = None
    read_flags: int = cv2.IMREAD_COLOR

    def plan(self, src: Path) -> Plan:
        plan = Plan(read_flags=self.read_flags)
        class_dir = require_dir(Path(src) / "object",
                                f"the raw {self.prefix} download keeps its images under object/")
        add_folder_class(plan, self.class_name, class_dir, prefix=self.prefix,
                         train_glob=self.train_glob, good_glob=self.good_glob,
                         anomaly_glob=self.anomaly_glob, mask_rule=self.mask_rule)
        return plan


def same_name(gt: Path, image: Path) -> Path:
    """Mask with the image's file name."""
    return gt / image.name


def stem_with(suffix: str) -> MaskRule:
    """Mask named `<stem><suffix>`, e.g. '_mask.png'."""
    return lambda gt, image: gt / f"{stem(image)}{suffix}"


# ----------------------------------------------------------------------------- pos/neg releases

def _has_key(name: str, key: str) -> bool:
    """`key` occurs in `name` not followed by a digit (so classes1 does not match classes10)."""
    start = name.find(key)
    while start >= 0:
        end = start + len(key)
        if end == len(name) or not name[end].isdigit():
            return True
        start = name.find(key, start + 1)
    return False


def add_pos_neg_class(plan: Plan, src: Path, cls: str, key: str) -> None:
    """Plan one class of the authors' KSDD2/RSDD/DAGM releases.

    `<src>/pos/*<key>*.jpg` are defective, `<src>/neg/*<key>*.jpg` defect-free, each with
    its mask `<stem>.png` beside it. All pos images go to test/anomaly; the first A neg
    images in sorted order (A = number of pos images) go to test/good. Every mask is
    checked, the skipped neg ones included.
    """
    plan.add_class(cls)
    pos_dir = require_dir(Path(src) / "pos", "the raw release keeps defective images in pos/")
    neg_dir = require_dir(Path(src) / "neg", "the raw release keeps defect-free images in neg/")
    pos = [p for p in list_files(pos_dir, "*.jpg") if _has_key(p.name, key)]
    neg = [p for p in list_files(neg_dir, "*.jpg") if _has_key(p.name, key)]
    for image in pos:
        plan.add(cls, "anomaly", image, [stem(image)], image.with_name(f"{stem(image)}.png"), DEFECT_MASK)
    for index, image in enumerate(neg):
        mask = image.with_name(f"{stem(image)}.png")
        if index < len(pos):
            plan.add(cls, "good", image, [stem(image)], mask, CLEAN_MASK)
        else:
            plan.add_check(cls, image, mask, CLEAN_MASK)


def pos_neg_plan() -> Plan:
    """Settings of the pos/neg releases: 10-digit ids, masks written at PNG level 9
    (the official level 10 is clamped to 9 by OpenCV)."""
    return Plan(digits=10, png_level=9)
