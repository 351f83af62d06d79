"""Reading a labelled folder: which sub-folders are classes, which images are normal or of
which anomaly type, which file is whose mask, and what is left out and why.

The rules (``python -m dataset.folder``'s documentation, dataset/folder.py):

- A class folder holds ``train/`` or ``test/`` (MVTec-AD's raw layout, ``mvtec``), or the
  normal folder (``good/``, ``--normal_dir``) and folders named after anomaly types (``flat``).
  Images may lie at any depth below ``train/good/``, ``test/<type>/``, ``good/`` or
  ``<type>/``: they take the label of that folder.
- ROOT is the one class when it holds such a layout itself, else each of its sub-folders is a
  class. A layout that reads two ways (ROOT a class and a sub-folder a class too; a folder of
  images that could be an anomaly type of ROOT or a class without layout; a folder whose name
  differs from ``good``, ``train`` or ``test`` only in case; a folder named like a mask folder
  beside the classes) stops with one line naming the folder and both readings.
- Masks lie in the class's ``ground_truth/``, ``masks/`` or ``mask/`` (or ``--mask_dir``):
  as ``<type>/<sub-folders>/<stem>[_mask].<ext>`` mirroring the image, as
  ``<type>/<stem>[_mask].<ext>``, or flat as ``<stem>[_mask].<ext>`` when the stem names one
  anomalous image only. A mask that could belong to two images, an image with two masks, a
  mask without image and a mask folder shared by two classes each stop with one line.
- Every file under ROOT is used (an image, a mask) or listed as left out with its reason:
  hidden files, files that are not images, masks of normal images, the meta files, an earlier
  run's outputs, mask folders not searched because ``--mask_dir`` names another.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from dataset.errors import DatasetError
from dataset.files import is_image_file, is_output_folder
from dataset.folder_files import (MASK_FOLDERS, MASK_SUFFIX, SPLITS, Accounts,  # noqa: F401
                                  ClassListing, folder_entries, images_below, not_an_image)
from dataset.folder_masks import (check_mask_names, check_shared_mask_folders,  # noqa: F401
                                  holds_mask_dir, mask_folder_names, mask_roots,
                                  masks_beside_images, match_masks)


def _same_but_case(names: Sequence[str], wanted: str) -> Optional[str]:
    return next((n for n in names if n != wanted and n.lower() == wanted.lower()), None)


def _check_case(folder: Path, names: Sequence[str], normal_dir: str) -> None:
    """A folder named like ``train``, ``test`` or the normal folder but for its case stops."""
    for wanted, meaning in ((normal_dir, "the normal images"), ("train", "the train split"),
                            ("test", "the test split")):
        odd = _same_but_case(names, wanted)
        if odd is not None and wanted not in names:
            raise DatasetError(
                f"Folder {folder / odd} differs from '{wanted}' ({meaning}) only in case: it "
                f"would be read as an anomaly type '{odd}' (every image in it anomalous), not "
                f"as {meaning}; rename it to {wanted}"
                + (f", or pass --normal_dir {odd}" if wanted == normal_dir else "") + ".")
        if odd is not None:
            raise DatasetError(f"Folders {folder / wanted} and {folder / odd} differ only in "
                               f"case: merge them into {wanted}.")


# ------------------------------------------------------------------------------------------------
# Classes
# ------------------------------------------------------------------------------------------------


def _has_images(folder: Path) -> bool:
    """True when ``folder`` or a folder below it holds an image file (hidden entries and
    output folders not counted)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and not is_output_folder(os.path.join(dirpath, d))]
        if any(is_image_file(n) and not n.startswith(".") for n in filenames):
            return True
    return False


def _layout(folder: Path, normal_dir: str, mask_dir: Optional[str]) -> Optional[str]:
    """"mvtec" (train/ or test/), "flat" (the normal folder, or folders holding images that
    are not mask folders) or None."""
    names = [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    _check_case(folder, names, normal_dir)
    if any(n in SPLITS for n in names):
        return "mvtec"
    if normal_dir in names:
        return "flat"
    masks = mask_folder_names(mask_dir)
    if any(n not in masks and not holds_mask_dir(folder / n, mask_dir)
           and _has_images(folder / n) for n in names):
        return "flat"
    return None


def _strong(folder: Path, normal_dir: str) -> bool:
    names = {e.name for e in os.scandir(folder) if e.is_dir()}
    return bool(names & {*SPLITS, normal_dir})


def find_classes(root: Path, normal_dir: str = "good", mask_dir: Optional[str] = None,
                 accounts: Optional[Accounts] = None) -> List[Tuple[str, Path]]:
    """(class name, class folder) of every class under ``root``, sorted by name: ``root``
    itself (named after its folder) when it holds a layout, else its sub-folders."""
    root = Path(root)
    accounts = Accounts() if accounts is None else accounts
    if not root.is_dir():
        raise DatasetError(f"Folder {root} not found: pass the folder holding your class "
                           f"folders (or your good/ and anomaly folders) as ROOT.")
    probe = Accounts()                       # the root's entries are accounted for later
    subs, _ = folder_entries(root, probe)
    _check_case(root, subs, normal_dir)
    masks = mask_folder_names(mask_dir)
    if _strong(root, normal_dir):
        for d in subs:
            if d not in (*SPLITS, normal_dir) and d not in masks and _strong(root / d,
                                                                             normal_dir):
                raise DatasetError(
                    f"Folder {root / d} reads two ways: {root} holds a class layout of its own "
                    f"({normal_dir}/, train/ or test/), so {d}/ would be one of its anomaly "
                    f"types, yet {d}/ holds a class layout too; move {d}/ out of {root}, or the "
                    f"class layout of {root} into a class folder.")
        return [(root.resolve().name, root)]
    subs = [d for d in subs if not holds_mask_dir(root / d, mask_dir)]
    layouts = {d: _layout(root / d, normal_dir, mask_dir) for d in subs if d not in masks
               or _strong(root / d, normal_dir)}
    classes = [d for d, layout in layouts.items() if layout is not None]
    loose = [d for d, layout in layouts.items() if layout is None and _has_images(root / d)]
    if not classes:
        if loose:                            # anomaly-type folders of ROOT, no normal images
            return [(root.resolve().name, root)]
        raise DatasetError(f"No class folder found in {root}: put each class in a sub-folder "
                           f"holding {normal_dir}/ and one folder per anomaly type (or "
                           f"MVTec-AD's train/ and test/).")
    if loose:
        raise DatasetError(
            f"Folder {root / loose[0]} reads two ways: it holds images but no {normal_dir}/ or "
            f"anomaly folders, so it is either an anomaly type of {root} (then {root} is one "
            f"class, and {', '.join(classes)} would be anomaly types too) or a class without a "
            f"layout; give it {normal_dir}/ and anomaly folders, or move it out of {root}.")
    for d in subs:
        if d in masks and d not in layouts and _has_images(root / d):
            raise DatasetError(
                f"Folder {root / d} is named like a mask folder, but {root} holds classes "
                f"({', '.join(classes)}) and masks lie inside each class folder "
                f"(<class>/{d}/<type>/...): move it into the class its masks belong to, or "
                f"rename it (a class needs {normal_dir}/, train/ or test/).")
    return [(d, root / d) for d in subs if d in classes or (d not in masks and d in layouts)]


# ------------------------------------------------------------------------------------------------
# One class
# ------------------------------------------------------------------------------------------------


def _no_loose_images(files: Sequence[Path], folder: Path, where: str,
                     accounts: Accounts) -> None:
    for path in files:
        if is_image_file(path.name):
            raise DatasetError(f"Image {path} lies directly in {folder}: move it into {where}.")
        accounts.add(path, not_an_image(path))


def list_class(name: str, folder: Path, normal_dir: str = "good",
               mask_dir: Optional[str] = None, accounts: Optional[Accounts] = None
               ) -> ClassListing:
    """The images and masks of one class folder, in the mvtec or the flat layout; what is
    not used goes to ``accounts``."""
    folder = Path(folder)
    accounts = Accounts() if accounts is None else accounts
    masks_named = mask_folder_names(mask_dir)
    subs, files = folder_entries(folder, accounts)
    _check_case(folder, subs, normal_dir)
    check_mask_names(folder, [d for d in subs if d not in masks_named], "")
    kinds: List[Tuple[str, Path]] = []
    if any(d in SPLITS for d in subs):
        listing = ClassListing(name, folder, "mvtec")
        _no_loose_images(files, folder, f"{folder / 'train' / normal_dir}/ or {folder}/test/"
                                        f"<type>/", accounts)
        train_dir = folder / "train"
        if train_dir.is_dir():
            train_subs, train_files = folder_entries(train_dir, accounts)
            _check_case(train_dir, train_subs, normal_dir)
            _no_loose_images(train_files, train_dir, f"{train_dir / normal_dir}/", accounts)
            for kind in train_subs:
                if kind != normal_dir:
                    raise DatasetError(f"Folder {train_dir / kind}: the train split holds only "
                                       f"normal images ({train_dir / normal_dir}): move the "
                                       f"folder to {folder / 'test' / kind}.")
            if (train_dir / normal_dir).is_dir():
                listing.train = [p for p, _ in images_below(train_dir / normal_dir, accounts)]
        test_dir = folder / "test"
        if test_dir.is_dir():
            test_subs, test_files = folder_entries(test_dir, accounts)
            _check_case(test_dir, test_subs, normal_dir)
            check_mask_names(test_dir, test_subs, f"the anomaly types of {test_dir}")
            _no_loose_images(test_files, test_dir, f"{test_dir / normal_dir}/ or a folder named "
                                                   f"after its anomaly type", accounts)
            kinds = [(kind, test_dir / kind) for kind in test_subs]
        others = [d for d in subs if d not in SPLITS and d not in masks_named
                  and not holds_mask_dir(folder / d, mask_dir)]
        for d in others:
            for path, _ in images_below(folder / d, accounts):
                raise DatasetError(f"Image {path} lies in {folder / d}, which is neither train/ "
                                   f"nor test/ nor a mask folder of class folder {folder}: move "
                                   f"it into test/<type>/ or out of the class.")
    else:
        listing = ClassListing(name, folder, "flat")
        _no_loose_images(files, folder, f"{folder / normal_dir}/ (normal) or a folder named "
                                        f"after its anomaly type", accounts)
        kinds = [(d, folder / d) for d in subs if d not in masks_named
                 and not holds_mask_dir(folder / d, mask_dir)]
    if normal_dir != "good" and "good" in [k for k, _ in kinds]:
        raise DatasetError(f"Folder {dict(kinds)['good']} would be an anomaly type, but 'good' "
                           f"names normal images in meta files: rename it, or pass "
                           f"--normal_dir good.")
    found: Dict[Path, Tuple[Optional[str], Tuple[str, ...]]] = {}
    for kind, kind_dir in kinds:
        images = images_below(kind_dir, accounts)
        masks_beside_images(images)
        for path, sub in images:
            odd = next((part for part in sub if part.lower() in MASK_FOLDERS), None)
            if odd is not None:
                raise DatasetError(
                    f"Folder {kind_dir / Path(*sub[:sub.index(odd) + 1])} is named like a mask "
                    f"folder but lies inside the anomaly folder {kind_dir}, where its files "
                    f"would be read as images of '{kind}': move it into the class folder "
                    f"(<class>/{odd.lower()}/{kind}/...).")
            label = None if kind == normal_dir else kind
            listing.test.append((path, label))
            found[path] = (label, sub)
    if not listing.test:
        raise DatasetError(
            f"Class folder {folder} holds no test image: add {normal_dir}/ and one folder per "
            f"anomaly type (or MVTec-AD's test/), or move the folder out of the dataset.")
    listing.mask_roots = mask_roots(folder, mask_dir)
    match_masks(listing, found, normal_dir, accounts)
    if mask_dir:
        searched = listing.mask_roots[0].resolve()
        for d in MASK_FOLDERS:
            path = folder / d
            if path.is_dir() and path.resolve() != searched:
                for mask, _ in images_below(path, Accounts(), set()):
                    if searched not in mask.resolve().parents:
                        accounts.add(mask, f"in {d}/, not searched (--mask_dir {mask_dir})")
    return listing
