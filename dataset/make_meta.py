"""Write the meta file of a standardised dataset.

    python -m dataset.make_meta --data_root dataset/mvisa/data --dataset mvtec
    python -m dataset.make_meta --data_root dataset/mvisa/data --all

run from the repository root (`python dataset/make_meta.py ...` works too once the project is
installed with `pip install -e .`), reads `<data_root>/<Name>/` (written by
`python -m dataset.make_dataset`) and writes `<data_root>/meta_<Name>.json`:

    {"train": {cls: [sample, ...]}, "test": {cls: [sample, ...]}}

with samples {img_path, mask_path, cls_name, specie_name, dataset_name, anomaly} in that order,
paths relative to `<data_root>`, 4-space indentation and a trailing newline. An empty train
folder gives one placeholder sample with empty paths. Classes follow the registry's fixed
official lists (mvtec, visa; dataset/registry.py) and sorted folder names otherwise;
sub-folders and files are sorted. Only image files (dataset/files.py, any case) are listed.
Every anomalous image of a dataset with ground truth needs its mask, of the image's size (read
from the file headers only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

if __package__ in (None, "") and importlib.util.find_spec("dataset") is None:   # a bare file
    sys.exit(f"{Path(__file__).stem}: the package 'dataset' cannot be imported: run 'python -m "
             f"dataset.{Path(__file__).stem} ...' from the repository root, or install the "
             "project with 'pip install -e .'.")
from dataset.errors import DatasetError
from PIL import Image

from dataset.files import find_dir, list_dirs, list_files, write_text_atomic
from dataset.registry import REGISTRY, dataset_info

DEFAULT_DATA_ROOT = Path("dataset") / "mvisa" / "data"
# The official fixed class lists, by dataset name (the other datasets list their folders).
FIXED_CLASSES = {name: info.classes for name, info in REGISTRY.items() if info.classes}
PHASES = ("train", "test")
REMAKE = "python -m dataset.make_dataset --dataset {name} --overwrite"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"Folder {path} not found: {what}.")
    return path


def _dataset_dir(data_root: Path, name: str) -> Path:
    """The dataset folder `name` under `data_root`, matched case-insensitively."""
    _require_dir(data_root, "pass --data_root pointing at the output of dataset.make_dataset")
    folder = find_dir(data_root, name)
    if folder is None:
        raise DatasetError(f"Folder {data_root / name} not found: run 'python -m "
                           f"dataset.make_dataset --dataset {name}' first, or pass the right "
                           f"--data_root.")
    return folder


def class_names(root: Path) -> List[str]:
    """The registry's fixed official list for the dataset of `root` when it has one (each class
    folder must exist), otherwise the sorted class folders of `root`."""
    fixed = dataset_info(root.name).classes
    if fixed is None:
        return list_dirs(root)
    for cls in fixed:
        _require_dir(root / cls, f"{root.name} has the classes {', '.join(fixed)}; re-run "
                                 f"'{REMAKE.format(name=root.name)}'")
    return list(fixed)


def _image_size(path: Path) -> Tuple[int, int]:
    """(width, height) of an image file, read from its header."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as error:   # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"Cannot read the image file {path} ({error.__class__.__name__}): "
                           f"re-run the conversion, or replace the file.") from error


def check_mask_size(image: Path, mask: Path, image_size: Optional[Tuple[int, int]] = None,
                    mask_size: Optional[Tuple[int, int]] = None) -> None:
    """A mask must have the size of its image (sizes read from the headers unless given):
    a clear error naming both files otherwise."""
    image_size = image_size or _image_size(image)
    mask_size = mask_size or _image_size(mask)
    if image_size != mask_size:
        raise DatasetError(f"Mask {mask} is {mask_size[0]} x {mask_size[1]} pixels but its image "
                           f"{image} is {image_size[0]} x {image_size[1]} (width x height): "
                           f"replace the mask or the image, or re-run the conversion.")


def meta_sample(img_path: str, mask_path: str, cls: str, specie: str, dataset_name: str) -> Dict:
    """One sample of a meta file, its keys in the official order; anomalous unless `specie` is
    "good"."""
    return {"img_path": img_path, "mask_path": mask_path, "cls_name": cls, "specie_name": specie,
            "dataset_name": dataset_name, "anomaly": int(specie != "good")}


def make_meta(data_root, name: str, classes: Optional[Sequence[str]] = None
              ) -> Dict[str, Dict[str, List[Dict]]]:
    """The meta dictionary of `data_root/<name>` (see the module docstring).

    `classes` lists the class folders to describe, in this order, instead of the registry's
    fixed list or the sorted folders (dataset/synthetic.py names its own classes).
    """
    root = _dataset_dir(Path(data_root), name)
    name = root.name
    # Classification-only datasets have no masks: their mask paths point at absent files.
    has_masks = not dataset_info(name).classification_only
    classes = class_names(root) if classes is None else list(classes)
    meta: Dict[str, Dict[str, List[Dict]]] = {}
    for phase in PHASES:
        meta[phase] = {}
        for cls in classes:
            phase_dir = _require_dir(root / cls / phase, f"re-run '{REMAKE.format(name=name)}'")
            species = list_dirs(phase_dir)
            if not species:  # a phase folder without sub-folders leaves the class out
                continue
            samples = meta[phase][cls] = []
            for specie in species:
                files = list_files(phase_dir / specie)
                if not files and phase == "train":
                    samples.append(meta_sample("", "", cls, "good", ""))
                for file in files:
                    mask_path = ""
                    if specie != "good":
                        mask_file = root / cls / "ground_truth" / specie / f"{file.stem}.png"
                        if mask_file.is_file():
                            check_mask_size(file, mask_file)
                        elif has_masks:
                            raise DatasetError(f"Mask {mask_file} for anomalous image {file} not "
                                               f"found: re-run '{REMAKE.format(name=name)}'.")
                        mask_path = f"{name}/{cls}/ground_truth/{specie}/{mask_file.name}"
                    samples.append(meta_sample(f"{name}/{cls}/{phase}/{specie}/{file.name}",
                                               mask_path, cls, specie, file.name.split("_", 1)[0]))
    return meta


def write_meta(data_root, name: str, meta: Optional[Dict] = None) -> Path:
    """Write `data_root/meta_<Name>.json` (made with :func:`make_meta` unless given); returns its
    path. The file is replaced in one step, so an interruption leaves the previous one."""
    data_root = Path(data_root)
    name = _dataset_dir(data_root, name).name
    if meta is None:
        meta = make_meta(data_root, name)
    return write_meta_file(data_root / f"meta_{name}.json", meta)


def write_meta_file(path: Path, meta: Mapping) -> Path:
    """Write the meta file ``path`` in one step (an existing one is replaced; an interruption
    leaves it as it was); returns the path. A folder in the way or a failed write is one
    DatasetError."""
    if path.is_dir():
        raise DatasetError(f"{path} is a folder: move it away so the meta file can be written.")
    try:
        write_text_atomic(path, json.dumps(meta, indent=4) + "\n")
    except OSError as error:
        raise DatasetError(f"Cannot write the meta file {path} ({error.strerror or error}): "
                           f"make {path.parent} writable, or free some space.") from None
    return path


def summary(path: Path, meta: Dict) -> str:
    train = sum(1 for samples in meta["train"].values() for s in samples if s["img_path"])
    test = [s for samples in meta["test"].values() for s in samples]
    anomalous = sum(s["anomaly"] for s in test)
    return (f"{path}: {len(meta['test'])} classes, {train} train, {len(test)} test "
            f"({anomalous} anomalous)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", help="dataset folder name under --data_root (any case)")
    which.add_argument("--all", action="store_true", help="every dataset folder under --data_root")
    parser.add_argument("--data_root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="output root of dataset.make_dataset (default: %(default)s)")
    return parser.parse_args(argv)


def _write_and_report(data_root: Path, name: str) -> bool:
    """Write one meta file, print its summary line or its one error line; True on success."""
    try:
        meta = make_meta(data_root, name)
        print(summary(write_meta(data_root, name, meta), meta))
    except DatasetError as error:
        print(f"make_meta: {error}", file=sys.stderr)
        return False
    except OSError as error:   # unreadable folder, read-only data root, full disk, ...
        print(f"make_meta: Cannot write the meta file of {name}: {error}", file=sys.stderr)
        return False
    return True


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        names = [args.dataset]
        if args.all:
            names = list_dirs(_require_dir(args.data_root, "pass --data_root pointing at the "
                                                           "output of dataset.make_dataset"))
    except (DatasetError, OSError) as error:
        print(f"make_meta: {error}", file=sys.stderr)
        return 1
    if not names:
        print(f"make_meta: No dataset folder under {args.data_root}: run 'python -m "
              f"dataset.make_dataset' first.", file=sys.stderr)
        return 1
    try:
        failed = sum(not _write_and_report(args.data_root, name) for name in names)
    except KeyboardInterrupt:
        print("make_meta: Interrupted; the meta files written so far are complete, the others "
              "unchanged.", file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
