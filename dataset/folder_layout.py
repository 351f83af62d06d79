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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from dataset.errors import DatasetError
from dataset.files import OUTPUT_MARKER, is_image_file, is_output_folder

MASK_FOLDERS = ("ground_truth", "masks", "mask")   # searched when --mask_dir is not given
MASK_SUFFIX = "_mask"
SPLITS = ("train", "test")                          # the folders of the mvtec layout


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
class Accounts:
    """The files under ROOT that are not used, each with its reason; and the real paths of
    the files read so far (``root``: the dataset's folder, which a link may not point into)."""

    left_out: List[Tuple[Path, str]] = field(default_factory=list)
    root: Optional[Path] = None
    read: Dict[str, Path] = field(default_factory=dict)

    def add(self, path: Path, reason: str) -> None:
        self.left_out.append((Path(path), reason))

    def check_link(self, path: Path) -> None:
        """A link (to a file or a folder) that points back into the dataset stops: it would
        read an image a second time, under another folder's label."""
        if self.root is None or not os.path.islink(path):
            return
        target = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.root))
        if target == root or root in target.parents:
            raise DatasetError(
                f"{path} is a link to {target}, which lies in the dataset {self.root} already: "
                f"it would be read twice, with the label of the link's folder too; remove the "
                f"link (links to files and folders outside the dataset are followed).")

    def claim(self, path: Path) -> None:
        """Record that ``path`` is read; the same file reached twice (a hard link, a link from
        outside the dataset) stops."""
        real = os.path.realpath(path)
        try:
            stat = os.stat(real)
            key = f"{stat.st_dev}:{stat.st_ino}"
        except OSError:
            key = real
        if key in self.read and self.read[key] != Path(path):
            raise DatasetError(f"{self.read[key]} and {path} are the same file (a link): it "
                               f"would be read twice; keep one.")
        self.read[key] = Path(path)


# ------------------------------------------------------------------------------------------------
# Folder entries
# ------------------------------------------------------------------------------------------------


def folder_entries(folder: Path, accounts: Accounts) -> Tuple[List[str], List[Path]]:
    """(visible sub-folder names, visible regular files) of ``folder``, sorted; hidden entries,
    entries that are not regular files and an earlier run's output folders go to ``accounts``."""
    dirs: List[str] = []
    files: List[Path] = []
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        path = folder / entry.name
        if entry.name == OUTPUT_MARKER:
            accounts.add(path, "the marker of a folder a run wrote into")
        elif entry.name.startswith("."):
            accounts.add(path, "a hidden " + ("folder" if entry.is_dir() else "file"))
        elif entry.is_dir():
            if is_output_folder(path):
                accounts.add(path, "an earlier run's outputs (a folder marked by "
                                   f"{OUTPUT_MARKER})")
            else:
                dirs.append(entry.name)
        elif entry.is_file():
            files.append(path)
        else:
            accounts.add(path, "not a regular file")
    return dirs, files


def not_an_image(path: Path) -> str:
    if path.name.startswith("meta_") and path.suffix == ".json":
        return "a meta file"
    ext = path.suffix
    return f"not an image file (extension {ext})" if ext else "not an image file (no extension)"


def images_below(folder: Path, accounts: Accounts,
                 seen: Optional[set] = None) -> List[Tuple[Path, Tuple[str, ...]]]:
    """Every image at any depth below ``folder`` with the sub-folders between them, sorted
    folder by folder; links to folders are followed, each real folder once. Other files go to
    ``accounts``. Two images of one folder with one stem stop (masks are matched by stem)."""
    seen = set() if seen is None else seen
    accounts.check_link(folder)
    real = os.path.realpath(folder)
    if real in seen:
        accounts.add(folder, "a link to a folder read already")
        return []
    seen.add(real)
    dirs, files = folder_entries(folder, accounts)
    found: List[Tuple[Path, Tuple[str, ...]]] = []
    stems: Dict[str, Path] = {}
    for path in files:
        if not is_image_file(path.name):
            accounts.add(path, not_an_image(path))
            continue
        accounts.check_link(path)
        accounts.claim(path)
        if path.stem.lower() in stems:
            raise DatasetError(f"Images {stems[path.stem.lower()]} and {path} share the stem "
                               f"'{path.stem}' (masks are matched by stem): rename or remove "
                               f"one.")
        stems[path.stem.lower()] = path
        found.append((path, ()))
    for name in dirs:
        found += [(p, (name, *sub)) for p, sub in images_below(folder / name, accounts, seen)]
    return found


def _same_but_case(names: Sequence[str], wanted: str) -> Optional[str]:
    return next((n for n in names if n != wanted and n.lower() == wanted.lower()), None)


def _check_mask_names(folder: Path, names: Sequence[str], where: str) -> None:
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


def _masks_beside_images(images: Sequence[Tuple[Path, Tuple[str, ...]]]) -> None:
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


def mask_roots(folder: Path, mask_dir: Optional[str]) -> List[Path]:
    if mask_dir:
        return [Path(mask_dir) if os.path.isabs(mask_dir) else folder / mask_dir]
    return [folder / name for name in MASK_FOLDERS]


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
    _check_mask_names(folder, [d for d in subs if d not in masks_named], "")
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
            _check_mask_names(test_dir, test_subs, f"the anomaly types of {test_dir}")
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
        _masks_beside_images(images)
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
    _match_masks(listing, found, normal_dir, accounts)
    if mask_dir:
        searched = listing.mask_roots[0].resolve()
        for d in MASK_FOLDERS:
            path = folder / d
            if path.is_dir() and path.resolve() != searched:
                for mask, _ in images_below(path, Accounts(), set()):
                    if searched not in mask.resolve().parents:
                        accounts.add(mask, f"in {d}/, not searched (--mask_dir {mask_dir})")
    return listing


def _match_masks(listing: ClassListing, found: Dict, normal_dir: str,
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
