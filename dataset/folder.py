"""A labelled folder of images as a dataset: write its meta file, leave the images where they are.

    python -m dataset.folder ROOT --dataset NAME [--normal_dir good] [--mask_dir DIR]
                             [--class_name "metal nut" | --wording FOLDER=WORDS ...]
                             [--n_train K --seed S]

writes ``ROOT/meta_NAME.json`` in make_meta's schema (dataset/make_meta.py), paths relative to
ROOT, so that ``python test.py --dataset NAME --data_path ROOT`` evaluates the folder and
``python train.py --dataset NAME --train_data_path ROOT`` trains on it.

Classes: each sub-folder of ROOT is a class, or ROOT itself is the one class (named after its
folder) when it holds a layout directly (``train/`` or ``test/``, the normal folder, or
sub-folders of images). Hidden entries, ``ground_truth/``, ``masks/`` and the mask folder are
never classes or anomaly types. Each class is in one of two layouts:

- ``mvtec`` (MVTec-AD's raw layout): ``train/good/``, ``test/good/``, ``test/<type>/``;
- ``flat`` (anomalib's Folder convention): ``good/`` and ``<type>/`` side by side; no train
  split unless ``--n_train``.

``--normal_dir`` renames ``good``. Masks lie in ``ground_truth/<type>/`` or ``masks/<type>/``
of the class folder (with ``--mask_dir DIR``: in ``DIR/<type>/`` only, DIR relative to the
class folder or absolute), named after their image's stem with or without ``_mask``, any image
extension. Without any mask the dataset is classification-only (pixel metrics n/a); with some,
every anomalous image needs one, of its size.

Besides ``train`` and ``test`` the file holds ``info``: ``{"source": "dataset.folder",
"layout": {cls: "mvtec" | "flat"}, "classification_only": bool, "wording": {cls: words},
"n_train": K, "seed": S or null}``. Every file is checked (opened and decoded) before anything
is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image
from tqdm import tqdm

from dataset.draws import draw_indices
from dataset.errors import DatasetError
from dataset.files import list_dirs, list_files
from dataset.make_meta import check_mask_size, meta_sample, write_meta_file
from models.errors import InputError, SettingsError
from models.imaging import to_8bit
from models.noise import check_seed
from models.wording import OFFICIAL_WORDING

SOURCE = "dataset.folder"
MASK_FOLDERS = ("ground_truth", "masks")     # searched when --mask_dir is not given
MASK_SUFFIX = "_mask"
NORMAL_SPECIE = "good"                       # specie_name of normal images in meta files
SPLITS = ("train", "test")                   # the folders of the mvtec layout


@dataclass
class ClassListing:
    """The files of one class. ``test``: (image, anomaly type or None for normal) in meta
    order; ``train``: normal images; ``masks``: anomalous image -> its mask file."""

    name: str
    folder: Path
    layout: str                                            # "mvtec" or "flat"
    train: List[Path] = field(default_factory=list)
    test: List[Tuple[Path, Optional[str]]] = field(default_factory=list)
    masks: Dict[Path, Path] = field(default_factory=dict)
    mask_roots: List[Path] = field(default_factory=list)   # where its masks were looked for

    @property
    def normal_test(self) -> List[Path]:
        return [path for path, kind in self.test if kind is None]

    @property
    def anomalous(self) -> List[Path]:
        return [path for path, kind in self.test if kind is not None]


@dataclass
class FolderMeta:
    """The meta dictionary of a folder and the class listings it was made of (train images
    moved by ``n_train`` included in ``train``)."""

    meta: Dict
    classes: List[ClassListing]


# ------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------


def _excluded_names(mask_dir: Optional[str]) -> set:
    """Folder names that are never a class or an anomaly type."""
    names = set(MASK_FOLDERS)
    if mask_dir and not os.path.isabs(mask_dir):
        names.add(Path(mask_dir).parts[0])
    return names


def _is_mask_folder(folder: Path, mask_dir: Optional[str]) -> bool:
    """True when ``folder`` is an absolute ``mask_dir`` or lies above it."""
    if not mask_dir or not os.path.isabs(mask_dir):
        return False
    target, folder = Path(mask_dir).resolve(), folder.resolve()
    return target == folder or folder in target.parents


def _sub_folders(folder: Path, mask_dir: Optional[str]) -> List[str]:
    excluded = _excluded_names(mask_dir)
    return [d for d in list_dirs(folder)
            if d not in excluded and not _is_mask_folder(folder / d, mask_dir)]


def _holds_layout(folder: Path, normal_dir: str, mask_dir: Optional[str]) -> bool:
    """True when ``folder`` is a class folder itself (train/ or test/, the normal folder, or a
    sub-folder holding images)."""
    subs = _sub_folders(folder, mask_dir)
    return any(d in SPLITS or d == normal_dir or list_files(folder / d) for d in subs)


def find_classes(root: Path, normal_dir: str = "good", mask_dir: Optional[str] = None
                 ) -> List[Tuple[str, Path]]:
    """(class name, class folder) of every class under ``root``, sorted by name: ``root``
    itself (named after its folder) when it holds a layout, else its sub-folders."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Folder {root} not found: pass the folder holding your class "
                           f"folders (or your good/ and anomaly folders) as ROOT.")
    if _holds_layout(root, normal_dir, mask_dir):
        return [(root.resolve().name, root)]
    classes = [(d, root / d) for d in _sub_folders(root, mask_dir)]
    if not classes:
        raise DatasetError(f"No class folder found in {root}: put each class in a sub-folder "
                           f"holding {normal_dir}/ and one folder per anomaly type (or "
                           f"MVTec-AD's train/ and test/).")
    return classes


# ------------------------------------------------------------------------------------------------
# One class
# ------------------------------------------------------------------------------------------------


def _images(folder: Path) -> List[Path]:
    """The image files of ``folder``, sorted; two with one stem are an error."""
    files = list_files(folder)
    seen: Dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise DatasetError(f"Images {seen[path.stem]} and {path} share the stem "
                               f"'{path.stem}' (masks are matched by stem): rename or remove "
                               f"one.")
        seen[path.stem] = path
    return files


def _no_loose_images(folder: Path, where: str) -> None:
    loose = list_files(folder)
    if loose:
        raise DatasetError(f"Image {loose[0]} lies directly in {folder}: move it into {where}.")


def _mask_roots(folder: Path, mask_dir: Optional[str]) -> List[Path]:
    if mask_dir:
        return [Path(mask_dir) if os.path.isabs(mask_dir) else folder / mask_dir]
    return [folder / name for name in MASK_FOLDERS]


def _match_masks(listing: ClassListing, normal_dir: str) -> None:
    """Fill ``listing.masks`` from its mask roots: ``<root>/<type>/<stem>[_mask].<ext>``."""
    by_type: Dict[str, Dict[str, Path]] = {}
    for path, kind in listing.test:
        if kind is not None:
            by_type.setdefault(kind, {})[path.stem] = path
    for mask_root in listing.mask_roots:
        if not mask_root.is_dir():
            continue
        for kind in list_dirs(mask_root):
            if kind == normal_dir:       # masks of normal images: all zero, not needed
                continue
            images = by_type.get(kind, {})
            for mask in list_files(mask_root / kind):
                stem = mask.stem
                image = images.get(stem)
                if image is None and stem.endswith(MASK_SUFFIX):
                    image = images.get(stem[:-len(MASK_SUFFIX)])
                if image is None:
                    raise DatasetError(
                        f"Mask {mask} has no image {kind}/{stem.removesuffix(MASK_SUFFIX)}.* in "
                        f"{listing.folder}: remove the mask, or add its image.")
                if image in listing.masks:
                    raise DatasetError(f"Image {image} has two masks, {listing.masks[image]} "
                                       f"and {mask}: keep one.")
                listing.masks[image] = mask


def _check_types(folder: Path, kinds: Sequence[str], normal_dir: str) -> None:
    if normal_dir != NORMAL_SPECIE and NORMAL_SPECIE in kinds:
        raise DatasetError(f"Folder {folder / NORMAL_SPECIE} would be an anomaly type, but "
                           f"'{NORMAL_SPECIE}' names normal images in meta files: rename it, or "
                           f"pass --normal_dir {NORMAL_SPECIE}.")


def list_class(name: str, folder: Path, normal_dir: str = "good",
               mask_dir: Optional[str] = None) -> ClassListing:
    """The images and masks of one class folder, in the mvtec or the flat layout."""
    folder = Path(folder)
    subs = _sub_folders(folder, mask_dir)
    if any(d in SPLITS for d in subs):
        listing = ClassListing(name, folder, "mvtec")
        for split in SPLITS:
            if (folder / split).is_dir():
                _no_loose_images(folder / split, f"{folder / split}/{normal_dir}/ or a folder "
                                                 f"named after its anomaly type")
        train_dir = folder / "train"
        if train_dir.is_dir():
            for kind in list_dirs(train_dir):
                if kind != normal_dir:
                    raise DatasetError(f"Folder {train_dir / kind}: the train split holds only "
                                       f"normal images ({train_dir / normal_dir}): move the "
                                       f"folder to {folder / 'test' / kind}.")
            if (train_dir / normal_dir).is_dir():
                listing.train = _images(train_dir / normal_dir)
        test_dir = folder / "test"
        kinds = list_dirs(test_dir) if test_dir.is_dir() else []
        kind_dirs = [(kind, test_dir / kind) for kind in kinds]
    else:
        listing = ClassListing(name, folder, "flat")
        _no_loose_images(folder, f"{folder / normal_dir}/ (normal) or a folder named after its "
                                 f"anomaly type")
        kinds = [d for d in subs if list_files(folder / d)]
        kind_dirs = [(kind, folder / kind) for kind in kinds]
    _check_types(folder, kinds, normal_dir)
    for kind, kind_dir in kind_dirs:
        listing.test.extend((path, None if kind == normal_dir else kind)
                            for path in _images(kind_dir))
    if not listing.test:
        raise DatasetError(
            f"Class folder {folder} holds no test image: add {normal_dir}/ and one folder per "
            f"anomaly type (or MVTec-AD's test/), or move the folder out of the dataset.")
    listing.mask_roots = _mask_roots(folder, mask_dir)
    _match_masks(listing, normal_dir)
    return listing


# ------------------------------------------------------------------------------------------------
# Checks of the whole dataset
# ------------------------------------------------------------------------------------------------


def _require_masks(listings: Sequence[ClassListing], normal_dir: str) -> None:
    """With a mask anywhere, every anomalous image needs its own."""
    if not any(listing.masks for listing in listings):
        return
    for listing in listings:
        for path, kind in listing.test:
            if kind is not None and path not in listing.masks:
                where = " or ".join(str(r / kind) for r in listing.mask_roots)
                raise DatasetError(
                    f"Anomalous image {path} has no mask ({path.stem}{MASK_SUFFIX}.png or "
                    f"{path.stem}.png in {where}) while other images have masks: add it, or "
                    f"remove the image.")


def check_readable(path: Path, image: bool = True) -> Tuple[int, int]:
    """Open and decode a file, and return its (width, height); a DatasetError naming it when
    it cannot be read (a truncated file included, which its header alone does not show) or,
    for an ``image``, when the dataset could not map it to 8 bits (``models.imaging.to_8bit``:
    a floating-point image outside [0, 1], a 32-bit one outside 0..65535)."""
    try:
        with Image.open(path) as opened:
            opened.load()
            if image:
                to_8bit(opened, f"image {path}")
            return opened.size
    except InputError as error:                 # to_8bit's line names the file and the fix
        raise DatasetError(str(error)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = (str(error).splitlines() or [""])[0]
        raise DatasetError(f"Cannot read the image file {path} ({type(error).__name__}: "
                           f"{reason}): replace or remove the file.") from None


def _check_files(listings: Sequence[ClassListing], progress: bool) -> None:
    files = [(listing, path) for listing in listings
             for path in [*listing.train, *(p for p, _ in listing.test)]]
    for listing, path in tqdm(files, desc="checking images", disable=not progress or None,
                              leave=False):
        size = check_readable(path)
        mask = listing.masks.get(path)
        if mask is not None:
            check_mask_size(path, mask, size, check_readable(mask, image=False))


def _draw_train(listing: ClassListing, n_train: int, seed: int) -> List[Path]:
    """``n_train`` normal test images of the class, drawn without replacement by a generator
    seeded from (seed, class name); in listing order."""
    normal = listing.normal_test
    if n_train >= len(normal):
        raise SettingsError(f"--n_train {n_train}: class {listing.name} ({listing.folder}) has "
                            f"{len(normal)} normal test images; pass --n_train below "
                            f"{len(normal)}, so that some stay for testing.")
    return [normal[i] for i in sorted(draw_indices(len(normal), n_train, seed, listing.name))]


def default_wording(name: str) -> str:
    """The prompt words of class folder ``name``: the official wording when it has one, else
    the name with '_' read as a space."""
    return OFFICIAL_WORDING.get(name, name.replace("_", " "))


def _wording(names: Sequence[str], class_name: Optional[str],
             wording: Optional[Mapping[str, str]]) -> Dict[str, str]:
    if class_name is not None and wording:
        raise SettingsError("--class_name and --wording both set the prompt words: pass one.")
    unknown = sorted(set(wording or {}) - set(names))
    if unknown:
        raise SettingsError(f"--wording names no class folder {', '.join(unknown)}; the classes "
                            f"are {', '.join(names)}.")
    words = {name: default_wording(name) for name in names}
    if class_name is not None:
        words = dict.fromkeys(names, class_name)
    words.update(wording or {})
    for name, text in words.items():
        if not text.strip():
            raise SettingsError(f"The prompt words of class {name} are empty: pass some words.")
    return words


# ------------------------------------------------------------------------------------------------
# The meta dictionary
# ------------------------------------------------------------------------------------------------


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with '/' separators, or absolute when outside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _check_settings(name: str, normal_dir: str, n_train: int, seed: Optional[int]) -> None:
    if not name or name != Path(name).name or name.startswith("."):
        raise SettingsError(f"--dataset {name!r}: pass a plain name (the meta file is "
                            f"meta_<name>.json in ROOT).")
    if not normal_dir or normal_dir != Path(normal_dir).name:
        raise SettingsError(f"--normal_dir {normal_dir!r}: pass the name of the folder of normal "
                            f"images (e.g. good), not a path.")
    if n_train < 0:
        raise SettingsError(f"--n_train {n_train}: pass a count of 0 or more.")
    if seed is not None:
        check_seed(seed)
    if seed is not None and not n_train:
        raise SettingsError("--seed draws the images of --n_train: pass --n_train K as well.")


def folder_meta(root, name: str, normal_dir: str = "good", mask_dir: Optional[str] = None,
                class_name: Optional[str] = None, wording: Optional[Mapping[str, str]] = None,
                n_train: int = 0, seed: Optional[int] = None, progress: bool = False
                ) -> FolderMeta:
    """The meta dictionary of the labelled folder ``root`` (see the module docstring) and its
    class listings, every file checked; nothing is written. ``seed`` defaults to 0 when
    ``n_train`` is given."""
    root = Path(root)
    _check_settings(name, normal_dir, n_train, seed)
    if n_train and seed is None:
        seed = 0
    found = find_classes(root, normal_dir, mask_dir)
    if mask_dir and os.path.isabs(mask_dir) and len(found) > 1:
        raise SettingsError(f"--mask_dir {mask_dir} is absolute but {root} holds {len(found)} "
                            f"classes: pass a folder relative to each class folder.")
    listings = [list_class(cls, folder, normal_dir, mask_dir) for cls, folder in found]
    if mask_dir and not any(r.is_dir() for listing in listings for r in listing.mask_roots):
        raise SettingsError(f"--mask_dir {mask_dir}: no such folder in "
                            f"{', '.join(str(listing.folder) for listing in listings)}: pass the "
                            f"folder of the masks, relative to the class folder or absolute.")
    _require_masks(listings, normal_dir)
    words = _wording([listing.name for listing in listings], class_name, wording)
    moved = {listing.name: _draw_train(listing, n_train, seed) if n_train else []
             for listing in listings}
    _check_files(listings, progress)

    has_masks = any(listing.masks for listing in listings)
    meta: Dict = {"train": {}, "test": {}}
    for listing in listings:
        cls = listing.name
        taken = set(moved[cls])
        listing.train = [*listing.train, *moved[cls]]
        train = [meta_sample(_relative(p, root), "", cls, NORMAL_SPECIE, name)
                 for p in listing.train]
        meta["train"][cls] = train or [meta_sample("", "", cls, NORMAL_SPECIE, "")]
        meta["test"][cls] = [
            meta_sample(_relative(path, root),
                        _relative(listing.masks[path], root) if path in listing.masks else "",
                        cls, NORMAL_SPECIE if kind is None else kind, name)
            for path, kind in listing.test if path not in taken]
        listing.test = [(path, kind) for path, kind in listing.test if path not in taken]
    meta["info"] = {"source": SOURCE,
                    "layout": {listing.name: listing.layout for listing in listings},
                    "classification_only": not has_masks, "wording": words,
                    "n_train": int(n_train), "seed": seed if n_train else None}
    return FolderMeta(meta, listings)


def write_folder_meta(root, name: str, meta: Mapping) -> Path:
    """Write ``root/meta_<name>.json`` in one step (an existing one is replaced); returns its
    path."""
    return write_meta_file(Path(root) / f"meta_{name}.json", meta)


def class_summary(listing: ClassListing) -> str:
    """One line: the class, its layout, image counts and masks."""
    normal = len(listing.train) + len(listing.normal_test)
    anomalous = len(listing.anomalous)
    return (f"{listing.name} ({listing.layout}): {normal + anomalous} images, {normal} normal / "
            f"{anomalous} anomalous, {len(listing.masks)} masks; train {len(listing.train)}, "
            f"test {len(listing.test)}")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _wording_pair(text: str) -> Tuple[str, str]:
    folder, sep, words = text.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FOLDER=WORDS, e.g. "
                                         f"metal_nut='metal nut'")
    return folder, words


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dataset.folder",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the folder of classes (or of one class)")
    parser.add_argument("--dataset", required=True,
                        help="dataset name: writes ROOT/meta_<dataset>.json")
    parser.add_argument("--normal_dir", default="good",
                        help="folder name of the normal images (default: %(default)s)")
    parser.add_argument("--mask_dir", default=None,
                        help="folder of the masks, <mask_dir>/<type>/<stem>[_mask].<ext>, "
                             "relative to each class folder or absolute (default: "
                             "ground_truth/ or masks/)")
    words = parser.add_mutually_exclusive_group()
    words.add_argument("--class_name", default=None,
                       help="the words of every class in the prompts, e.g. 'metal nut'")
    words.add_argument("--wording", type=_wording_pair, action="append", default=None,
                       metavar="FOLDER=WORDS",
                       help="the words of one class in the prompts (repeatable); default: the "
                            "official wording of the name, else the folder name with '_' read "
                            "as a space")
    parser.add_argument("--n_train", type=int, default=0,
                        help="move this many normal test images of each class to the train "
                             "split (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the --n_train draw (default: 0)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = folder_meta(args.root, args.dataset, args.normal_dir, args.mask_dir,
                             args.class_name, dict(args.wording or []), args.n_train, args.seed,
                             progress=not args.no_progress)
        path = write_folder_meta(args.root, args.dataset, result.meta)
    except (DatasetError, SettingsError) as error:
        print(f"dataset.folder: {error}", file=sys.stderr)
        return 1
    except OSError as error:          # an unreadable folder
        print(f"dataset.folder: Cannot read {getattr(error, 'filename', '') or args.root} "
              f"({error.strerror or error}): check its permissions.", file=sys.stderr)
        return 1
    for listing in result.classes:
        print(class_summary(listing))
    note = ("; classification only (no masks: pixel metrics n/a)"
            if result.meta["info"]["classification_only"] else "")
    print(f"wrote {path}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
