"""Which files count as images, and the sorted folder listings the dataset tools walk.

Standard library only: the converters, ``dataset/make_meta.py`` and the loaders share it
without pulling in OpenCV or torch. Every listing skips hidden entries (``.DS_Store``,
``.<Name>.partial``, ...) and is sorted by name, so the result does not depend on the file
system.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, os.PathLike]

# Extensions read as images, compared in lower case.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(name: PathLike) -> bool:
    """True when the extension of ``name`` is one of IMAGE_EXTENSIONS, in any case."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def stem(path: PathLike) -> str:
    """File name up to its first '.', the official notion of a source stem."""
    return Path(path).name.split(".", 1)[0]


def list_dirs(folder: Path) -> List[str]:
    """Names of the real sub-folders of ``folder``, sorted; files and hidden entries are skipped."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_files(folder: Path, pattern: Optional[str] = None) -> List[Path]:
    """Files in ``folder`` sorted by name; hidden files are skipped.

    With a glob ``pattern`` the match is case-sensitive on every platform (the official
    converters ran ``glob`` on Linux). With ``pattern=None`` every image file counts
    (:func:`is_image_file`).
    """
    folder = Path(folder)
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file() and not e.name.startswith(".")]
    if pattern is None:
        names = [n for n in names if is_image_file(n)]
    else:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [folder / n for n in sorted(names)]


def find_dir(root: Path, name: str) -> Optional[Path]:
    """``root/name``, or else the one sub-folder whose name matches ``name`` case-insensitively."""
    root = Path(root)
    if (root / name).is_dir():
        return root / name
    matches = [d for d in list_dirs(root) if d.lower() == name.lower()]
    return root / matches[0] if len(matches) == 1 else None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step: a hidden ``.<name>.partial`` beside it, then a
    rename, so an interruption leaves the previous file (OSErrors are the caller's)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
