"""A labelled folder of images as a dataset: write its meta file, leave the images where they are.

    python -m dataset.folder ROOT --dataset NAME [--normal_dir good] [--mask_dir DIR]
                             [--class_name "metal nut" | --wording FOLDER=WORDS ...]
                             [--n_train K --seed S]

writes ``ROOT/meta_NAME.json`` in make_meta's schema (dataset/make_meta.py), paths relative to
ROOT, so that ``python test.py --dataset NAME --data_path ROOT`` evaluates the folder and
``python train.py --dataset NAME --train_data_path ROOT`` trains on it.

Classes: each sub-folder of ROOT is a class, or ROOT itself is the one class (named after its
folder) when it holds a layout directly (``train/`` or ``test/``, or the normal folder). Each
class is in one of two layouts:

- ``mvtec`` (MVTec-AD's raw layout): ``train/good/``, ``test/good/``, ``test/<type>/``;
- ``flat`` (anomalib's Folder convention): ``good/`` and ``<type>/`` side by side; no train
  split unless ``--n_train``.

Images may lie at any depth below these folders and take their label. ``--normal_dir``
renames ``good``. Masks lie in ``ground_truth/``, ``masks/`` or ``mask/`` of the class folder
(with ``--mask_dir DIR``: in DIR only, relative to the class folder or absolute), as
``<type>/<stem>[_mask].<ext>`` (mirroring the image's sub-folders or not) or flat as
``<stem>[_mask].<ext>``. Without any mask the dataset is classification-only (pixel metrics
n/a); with some, every anomalous image needs one, of its size. Images with an EXIF orientation
are read upright (as predict.py and the page read them), so their masks are compared with the
upright size. The reading rules, and what stops because it reads two ways, are those of
dataset/folder_layout.py.

Besides ``train`` and ``test`` the file holds ``info``: ``{"source": "dataset.folder",
"layout": {cls: "mvtec" | "flat"}, "classification_only": bool, "wording": {cls: words},
"n_train": K, "seed": S or null, "left_out": [{"path", "reason"}]}``: every file under ROOT is
used or listed there with the reason it is not. Every file is checked (opened and decoded)
before anything is written; an existing meta file is replaced only when dataset.folder wrote
it, and names of the paper's datasets are refused (their protocol is applied by name).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image, ImageOps
from tqdm import tqdm

from dataset.draws import draw_indices
from dataset.errors import DatasetError
from dataset.folder_layout import (MASK_SUFFIX, Accounts, ClassListing, check_shared_mask_folders,
                                   find_classes, folder_entries, images_below, list_class,
                                   mask_folder_names, not_an_image)
from dataset.files import is_image_file
from dataset.make_meta import check_mask_size, meta_sample, write_meta_file
from dataset.registry import REGISTRY
from models.errors import InputError, SettingsError
from models.imaging import to_8bit
from models.noise import check_seed
from models.wording import OFFICIAL_WORDING

SOURCE = "dataset.folder"
NORMAL_SPECIE = "good"                       # specie_name of normal images in meta files
# Class names the result tables use for themselves (the CSV's mean row).
RESERVED_CLASS_NAMES = ("mean",)


@dataclass
class FolderMeta:
    """The meta dictionary of a folder and the class listings it was made of (train images
    moved by ``n_train`` included in ``train``)."""

    meta: Dict
    classes: List[ClassListing]


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
                    f"Anomalous image {path} has no mask ({path.stem}{MASK_SUFFIX}.<ext> or "
                    f"{path.stem}.<ext> in {where}, or flat in the mask folder; a mask named "
                    f"otherwise, e.g. {path.stem}_gt.png, is not found) while other images "
                    f"have masks: add it, or remove the image.")


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
            # as the dataset reads a folder's files: upright by their EXIF orientation
            return ImageOps.exif_transpose(opened).size
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
    if not normal:
        raise SettingsError(f"--n_train {n_train}: class {listing.name} ({listing.folder}) has "
                            f"no normal test image to move to the train split: add normal "
                            f"images, or drop --n_train.")
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
    registry = {key.lower(): key for key in REGISTRY}
    if name.lower() in registry:
        raise SettingsError(f"--dataset {name}: {registry[name.lower()]} names one of the "
                            f"paper's datasets, whose protocol (classification only, prompt "
                            f"words, image score) the tools apply by that name: choose another "
                            f"name for your folder.")


def folder_meta(root, name: str, normal_dir: str = "good", mask_dir: Optional[str] = None,
                class_name: Optional[str] = None, wording: Optional[Mapping[str, str]] = None,
                n_train: int = 0, seed: Optional[int] = None, progress: bool = False
                ) -> FolderMeta:
    """The meta dictionary of the labelled folder ``root`` (see the module docstring) and its
    class listings, every file checked; nothing is written. ``seed`` defaults to 0 when
    ``n_train`` is given."""
    if not os.fspath(root).strip():
        raise SettingsError(f"ROOT {os.fspath(root)!r}: pass the folder holding your class "
                            f"folders (or your good/ and anomaly folders).")
    root = Path(root)
    _check_settings(name, normal_dir, n_train, seed)
    if n_train and seed is None:
        seed = 0
    if mask_dir is not None and (not mask_dir.strip() or (not os.path.isabs(mask_dir) and (
            not Path(mask_dir).parts or Path(mask_dir).parts[0] == "."))):
        raise SettingsError(f"--mask_dir {mask_dir!r}: pass the folder of the masks inside each "
                            f"class folder (e.g. masks or labels/png), or an absolute folder.")
    accounts = Accounts(root=root)
    found = find_classes(root, normal_dir, mask_dir, accounts)
    if mask_dir and os.path.isabs(mask_dir) and len(found) > 1:
        raise SettingsError(f"--mask_dir {mask_dir} is absolute but {root} holds {len(found)} "
                            f"classes: pass a folder relative to each class folder.")
    for cls, _ in found:
        if cls.lower() in RESERVED_CLASS_NAMES:
            raise SettingsError(f"Class folder {root / cls if len(found) > 1 else root}: a class "
                                f"named '{cls}' would share the result tables' row of the mean "
                                f"over the classes: rename the folder.")
    check_shared_mask_folders(found, mask_dir)
    listings = [list_class(cls, folder, normal_dir, mask_dir, accounts) for cls, folder in found]
    if len(found) > 1 or found[0][1] != root:
        _account_root(root, [folder for _, folder in found], mask_dir, accounts)
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
    used = {p for listing in listings for p in (*listing.train, *(i for i, _ in listing.test),
                                                 *listing.masks.values())}
    listed: Dict[Path, str] = {}
    for path, reason in accounts.left_out:           # once each, and never a file used
        if path not in used:
            listed.setdefault(path, reason)
    left_out = [{"path": _relative(path, root), "reason": reason}
                for path, reason in sorted(listed.items(), key=lambda e: str(e[0]))]
    meta["info"] = {"source": SOURCE,
                    "layout": {listing.name: listing.layout for listing in listings},
                    "classification_only": not has_masks, "wording": words,
                    "n_train": int(n_train), "seed": seed if n_train else None,
                    "left_out": left_out}
    return FolderMeta(meta, listings)


def _account_root(root: Path, classes: Sequence[Path], mask_dir: Optional[str],
                  accounts: Accounts) -> None:
    """The entries of a ROOT that holds classes, besides the class folders: its own files (a
    loose image stops: it has no class) and mask folders outside every class (only non-image
    files there, or find_classes has stopped)."""
    subs, files = folder_entries(root, accounts)
    for path in files:
        if is_image_file(path.name):
            raise DatasetError(f"Image {path} lies directly in {root}, which holds the classes "
                               f"{', '.join(c.name for c in classes)}: move it into a class "
                               f"folder (into good/ or an anomaly folder), or out of {root}.")
        accounts.add(path, "a meta file" if path.name.startswith("meta_") and
                     path.suffix == ".json" else not_an_image(path))
    names = {c.name for c in classes}
    for d in subs:
        if d not in names and d in mask_folder_names(mask_dir):
            images_below(root / d, accounts)          # no images (find_classes checked)



def write_folder_meta(root, name: str, meta: Mapping) -> Path:
    """Write ``root/meta_<name>.json`` in one step; returns its path. An existing one is
    replaced only when dataset.folder wrote it (its ``info.source``): a converter's or the
    user's own meta file of that name stops with one line."""
    path = Path(root) / f"meta_{name}.json"
    if path.is_file() and not _written_here(path):
        raise DatasetError(f"{path} exists and was not written by dataset.folder (no info.source "
                           f"'{SOURCE}'): choose another --dataset name, or move the file away.")
    return write_meta_file(path, meta)


def _written_here(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("info"), dict) and \
        meta["info"].get("source") == SOURCE


def used_summary(result: "FolderMeta") -> str:
    """"312 images used (train 12, test 300), 150 masks; 4 left out: 3 not an image file, ..."."""
    train = sum(len(listing.train) for listing in result.classes)
    test = sum(len(listing.test) for listing in result.classes)
    masks = sum(len(listing.masks) for listing in result.classes)
    line = f"{train + test} images used (train {train}, test {test}), {masks} masks"
    left = result.meta["info"]["left_out"]
    if not left:
        return line + "; nothing left out"
    counts: Dict[str, int] = {}
    for entry in left:
        reason = entry["reason"].split(" (")[0]
        counts[reason] = counts.get(reason, 0) + 1
    parts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return (line + f"; {len(left)} left out: " + ", ".join(f"{n} {why}" for why, n in parts)
            + " (listed in the meta file's info.left_out)")


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


class _WordingPairs(argparse.Action):
    """--wording FOLDER=WORDS, repeatable; a folder given twice is refused (which would win?)."""

    def __call__(self, parser, namespace, value, option_string=None):
        pairs = list(getattr(namespace, self.dest) or [])
        if value[0] in dict(pairs):
            parser.error(f"--wording names the folder {value[0]} twice: give each folder its "
                         f"words once")
        setattr(namespace, self.dest, pairs + [value])


def _wording_pair(text: str) -> Tuple[str, str]:
    folder, sep, words = text.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FOLDER=WORDS, e.g. "
                                         f"metal_nut='metal nut'")
    return folder, words


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dataset.folder",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the folder of classes (or of one class)")
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
    words.add_argument("--wording", type=_wording_pair, action=_WordingPairs, default=None,
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
    print(used_summary(result))
    note = ("; classification only (no masks: pixel metrics n/a)"
            if result.meta["info"]["classification_only"] else "")
    print(f"wrote {path}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
