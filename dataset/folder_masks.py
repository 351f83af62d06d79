"""Which file is whose mask in a labelled folder (dataset.folder): mask folders and their
names, the match of each mask to its anomalous image (mirrored, typed or flat), and the layouts
of masks that read two ways."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from dataset.errors import DatasetError
from dataset.folder_files import MASK_FOLDERS, MASK_SUFFIX, Accounts, ClassListing, images_below


def mask_folder_names(mask_dir: Optional[str]) -> set:
    """Folder names that are mask folders, never classes or anomaly types."""
    names = set(MASK_FOLDERS)
    if mask_dir and not os.path.isabs(mask_dir) and Path(mask_dir).parts:
        names.add(Path(mask_dir).parts[0])
    return names


def holds_mask_dir(folder: Path, mask_dir: Optional[str]) -> bool:
    """True when an absolute ``mask_dir`` is ``folder`` or lies below it."""
    if not mask_dir or not os.path.isabs(mask_dir):
        return False
    target, folder = Path(mask_dir).resolve(), Path(folder).resolve()
    return target == folder or folder in target.parents


def check_mask_names(folder: Path, names: Sequence[str], where: str) -> None:
    """A folder named like a mask folder but for its case, or a mask folder where anomaly types
    lie (``where``: what the folder holds), stops: it would become an anomaly type."""
    for name in names:
        lower = name.lower()
        if lower in MASK_FOLDERS and name not in MASK_FOLDERS:
            raise DatasetError(
                f"Folder {folder / name} differs from '{lower}' (a mask folder) only in case: it "
                f"would be read as an anomaly type '{name}' (its masks scored as anomalous "
                f"images); rename it to {lower}, or pass --mask_dir {name}.")
        if where and lower in MASK_FOLDERS:
            raise DatasetError(
                f"Folder {folder / name} is named like a mask folder but lies among {where}, "
                f"where it would be read as an anomaly type: move it into the class folder "
                f"(<class>/{lower}/<type>/...), or pass --mask_dir.")


def masks_beside_images(images: Sequence[Tuple[Path, Tuple[str, ...]]]) -> None:
    """An image named ``<stem>_mask`` beside an image ``<stem>`` reads two ways (an anomalous
    image, or that image's mask): stop."""
    by_folder: Dict[Path, set] = {}
    for path, _ in images:
        by_folder.setdefault(path.parent, set()).add(path.stem)
    for path, _ in images:
        stem = path.stem
        if stem.endswith(MASK_SUFFIX) and stem[:-len(MASK_SUFFIX)] in by_folder[path.parent]:
            raise DatasetError(
                f"Image {path} reads two ways: an image of its folder's label, or the mask of "
                f"{stem[:-len(MASK_SUFFIX)]}.* beside it; masks go into the class's "
                f"ground_truth/<type>/ (or masks/, mask/): move it there, or rename it.")


def mask_roots(folder: Path, mask_dir: Optional[str]) -> List[Path]:
    if mask_dir:
        return [Path(mask_dir) if os.path.isabs(mask_dir) else folder / mask_dir]
    return [folder / name for name in MASK_FOLDERS]


def match_masks(listing: ClassListing, found: Dict, normal_dir: str,
                 accounts: Accounts) -> None:
    """Fill ``listing.masks`` from its mask roots (see the module docstring)."""
    exact: Dict[Tuple, Path] = {}            # (type, sub-folders, stem) -> anomalous image
    by_type: Dict[Tuple[str, str], List[Path]] = {}     # (type, stem) -> anomalous images
    by_stem: Dict[str, List[Path]] = {}                  # stem -> anomalous images
    for path, (kind, sub) in found.items():
        if kind is None:
            continue
        exact[(kind, sub, path.stem)] = path
        by_type.setdefault((kind, path.stem), []).append(path)
        by_stem.setdefault(path.stem, []).append(path)
    kinds = {kind for kind, _ in found.values() if kind is not None}

    def only(owners: List[Path], mask: Path, where: str) -> Optional[Path]:
        if len(owners) > 1:
            raise DatasetError(
                f"Mask {mask} lies {where} and its name fits {len(owners)} anomalous images "
                f"({owners[0]} and {owners[1]}): put the masks in folders mirroring the "
                f"images' folders, or rename the images apart.")
        return owners[0] if owners else None

    for root in listing.mask_roots:
        if not root.is_dir():
            continue
        for mask, sub in images_below(root, accounts):
            stem = mask.stem
            names = (stem, stem[:-len(MASK_SUFFIX)]) if stem.endswith(MASK_SUFFIX) else (stem,)
            bare = names[-1]
            if sub and sub[0] == normal_dir:
                if _has_defect(mask):
                    raise DatasetError(
                        f"Mask {mask} of the normal images marks defect pixels: an image with a "
                        f"defect is not normal; move its image into an anomaly folder (and the "
                        f"mask beside the other masks), or remove the mask.")
                accounts.add(mask, "a mask of normal images (not needed: all zero)")
                continue
            image = None
            where = f"{'/'.join((*sub, bare))}.*"
            if sub and sub[0] in kinds:
                image = next((exact[k] for k in ((sub[0], tuple(sub[1:]), n) for n in names)
                              if k in exact), None)
                if image is None and len(sub) == 1:
                    image = only([p for n in names for p in by_type.get((sub[0], n), [])],
                                 mask, f"in {root / sub[0]}")
            elif not sub:
                image = only([p for n in names for p in by_stem.get(n, [])], mask,
                             f"flat in {root}")
                where = f"<type>/{bare}.*"
            if image is None:
                raise DatasetError(
                    f"Mask {mask} has no image {where} in {listing.folder}: remove the mask, "
                    f"or add its image. (Masks are named after their image's stem, with or "
                    f"without '{MASK_SUFFIX}', in <type>/ folders or flat.)")
            if image in listing.masks:
                raise DatasetError(f"Image {image} has two masks, {listing.masks[image]} and "
                                   f"{mask}: keep one.")
            listing.masks[image] = mask


def _has_defect(mask: Path) -> bool:
    """True when the mask file has a pixel above 0 (an unreadable one: the size check says so
    later)."""
    try:
        with Image.open(mask) as opened:
            return opened.convert("L").getbbox() is not None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def check_shared_mask_folders(classes: Sequence[Tuple[str, Path]],
                              mask_dir: Optional[str]) -> None:
    """Two classes ((name, class folder)) reading one mask folder stop: masks are matched by
    file name, so one class could take the other's masks."""
    owner: Dict[str, str] = {}
    for name, folder in classes:
        for root in mask_roots(folder, mask_dir):
            if not root.is_dir():
                continue
            real = os.path.realpath(root)
            if real in owner:
                raise DatasetError(
                    f"Classes {owner[real]} and {name} read their masks from the same folder "
                    f"{root}" + (f" (--mask_dir {mask_dir})" if mask_dir else "")
                    + ": masks are matched by file name, so one class could take the other's; "
                      "give each class its own mask folder.")
            owner[real] = name
