"""The files of a labelled folder as dataset.folder reads them: the listing of a class, the
accounts of what is left out and why, and the walk below a folder (links followed, each real
folder once, a link back into the dataset refused). dataset/folder_layout.py decides what the
folders mean, dataset/folder_masks.py which file is whose mask."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
