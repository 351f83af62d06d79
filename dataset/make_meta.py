"""Write the meta file of a standardised dataset.

    python dataset/make_meta.py --data_root dataset/mvisa/data --dataset mvtec
    python dataset/make_meta.py --data_root dataset/mvisa/data --all

reads `<data_root>/<Name>/` (written by make_dataset.py) and writes
`<data_root>/meta_<Name>.json`:

    {"train": {cls: [sample, ...]}, "test": {cls: [sample, ...]}}

with samples {img_path, mask_path, cls_name, specie_name, dataset_name, anomaly} in that order,
paths relative to `<data_root>`, 4-space indentation and a trailing newline. An empty train
folder gives one placeholder sample with empty paths. Classes follow the fixed official lists
for mvtec and visa and sorted folder names otherwise; sub-folders and files are sorted. Only
image files (.bmp .png .jpg .jpeg .tif .tiff, any case) are listed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.converters import mvtec, visa  # noqa: E402
from dataset.converters.common import (DatasetError, find_dir, list_dirs, list_files,  # noqa: E402
                                       require_dir)
from dataset.data import CLASSIFICATION_ONLY  # noqa: E402

DEFAULT_DATA_ROOT = Path("dataset") / "mvisa" / "data"
FIXED_CLASSES = {mvtec.NAME: mvtec.CLASSES, visa.NAME: visa.CLASSES}
# Datasets without ground truth: their mask paths are written but the files do not exist.
PHASES = ("train", "test")


def _dataset_dir(data_root: Path, name: str) -> Path:
    """The dataset folder `name` under `data_root`, matched case-insensitively."""
    require_dir(data_root, "pass --data_root pointing at the output of make_dataset.py")
    folder = find_dir(data_root, name)
    if folder is None:
        raise DatasetError(f"Folder {data_root / name} not found: run dataset/make_dataset.py "
                           f"--dataset {name} first, or pass the right --data_root.")
    return folder


def class_names(root: Path) -> List[str]:
    """The fixed official list for mvtec/visa, otherwise the sorted class folders of `root`."""
    fixed = FIXED_CLASSES.get(root.name)
    if fixed is None:
        return list_dirs(root)
    for cls in fixed:
        require_dir(root / cls, f"{root.name} has the classes {', '.join(fixed)}; re-run "
                                f"dataset/make_dataset.py --dataset {root.name} --overwrite")
    return list(fixed)


def _sample(img_path: str, mask_path: str, cls: str, specie: str, dataset_name: str) -> Dict:
    return {"img_path": img_path, "mask_path": mask_path, "cls_name": cls, "specie_name": specie,
            "dataset_name": dataset_name, "anomaly": int(specie != "good")}


def make_meta(data_root, name: str) -> Dict[str, Dict[str, List[Dict]]]:
    """The meta dictionary of `data_root/<name>` (see the module docstring)."""
    root = _dataset_dir(Path(data_root), name)
    name = root.name
    has_masks = name not in CLASSIFICATION_ONLY
    classes = class_names(root)
    meta: Dict[str, Dict[str, List[Dict]]] = {}
    for phase in PHASES:
        meta[phase] = {}
        for cls in classes:
            phase_dir = require_dir(root / cls / phase, f"re-run dataset/make_dataset.py "
                                                        f"--dataset {name} --overwrite")
            species = list_dirs(phase_dir)
            if not species:  # a phase folder without sub-folders leaves the class out
                continue
            samples = meta[phase][cls] = []
            for specie in species:
                files = list_files(phase_dir / specie)
                if not files and phase == "train":
                    samples.append(_sample("", "", cls, "good", ""))
                for file in files:
                    mask_path = ""
                    if specie != "good":
                        mask_file = root / cls / "ground_truth" / specie / f"{file.stem}.png"
                        if has_masks and not mask_file.is_file():
                            raise DatasetError(f"Mask {mask_file} for anomalous image {file} not "
                                               f"found: re-run dataset/make_dataset.py --dataset "
                                               f"{name} --overwrite.")
                        mask_path = f"{name}/{cls}/ground_truth/{specie}/{mask_file.name}"
                    samples.append(_sample(f"{name}/{cls}/{phase}/{specie}/{file.name}", mask_path,
                                           cls, specie, file.name.split("_", 1)[0]))
    return meta


def write_meta(data_root, name: str, meta: Optional[Dict] = None) -> Path:
    """Write `data_root/meta_<Name>.json` (made with :func:`make_meta` unless given); returns its path."""
    data_root = Path(data_root)
    name = _dataset_dir(data_root, name).name
    if meta is None:
        meta = make_meta(data_root, name)
    path = data_root / f"meta_{name}.json"
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=4)
        handle.write("\n")
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
                        help="output root of make_dataset.py (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        names = list_dirs(require_dir(args.data_root, "pass --data_root pointing at the output "
                                                      "of make_dataset.py")) \
            if args.all else [args.dataset]
    except DatasetError as error:
        print(f"make_meta: {error}", file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        try:
            meta = make_meta(args.data_root, name)
            print(summary(write_meta(args.data_root, name, meta), meta))
        except DatasetError as error:
            print(f"make_meta: {error}", file=sys.stderr)
            failed += 1
    if not names:
        print(f"make_meta: No dataset folder under {args.data_root}: run dataset/make_dataset.py "
              f"first.", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
