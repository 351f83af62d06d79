"""Which files count as images, and the sorted folder listings the dataset tools walk.

Standard library only: the converters, ``dataset/make_meta.py`` and the loaders share it
without pulling in OpenCV or torch. Every listing skips hidden entries (``.DS_Store``,
``.<Name>.partial``, ...) and is sorted by name, so the result does not depend on the file
system. Only regular files are listed (a FIFO, socket or device named ``x.png`` is not: opening
one would block or read forever), and never the pictures of an output folder (below).

Output folders: every folder a script writes its results into (``--out``, ``--save_path``)
holds the marker file ``OUTPUT_MARKER`` (``utils.results.make_output_folder`` writes it). The
scripts write their pictures into the sub-folders ``OUTPUT_PICTURE_DIRS`` of such a folder
(predict.py's ``overlays/`` and ``uncertainty/``, test.py's ``imgs/``) and no picture directly
into it, so the files below those sub-folders are outputs, never inputs, while the user's own
images may share the output folder itself (``--out`` inside or equal to an input folder).
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import List, Optional, Union

from models.filekind import file_kind  # noqa: F401  (re-exported: one definition)

PathLike = Union[str, os.PathLike]

# Extensions read as images, compared in lower case: the still-image formats Pillow reads
# (JPEG's other names, GIF's first frame, the Netpbm family, TGA included).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff",
                    ".webp", ".gif", ".pgm", ".ppm", ".pbm", ".pnm", ".tga")


# The marker file of an output folder, and the sub-folders where the scripts write pictures.
OUTPUT_MARKER = ".bayes-pfl-output"
OUTPUT_PICTURE_DIRS = ("overlays", "uncertainty", "imgs")
MARKER_TEXT = ("Written by Bayes-PFL: this folder holds the outputs of a run. The pictures under "
               "its sub-folders " + ", ".join(f"{d}/" for d in OUTPUT_PICTURE_DIRS) + " are never "
               "read as input images.\n")


def is_output_folder(path: PathLike) -> bool:
    """True when ``path`` is a folder holding the output marker (a folder a script wrote its
    results into)."""
    return os.path.isfile(os.path.join(os.fspath(path), OUTPUT_MARKER))


def mark_output_folder(path: PathLike) -> None:
    """Write the output marker into the existing folder ``path`` (kept when present, also when
    two runs mark the folder at once; OSErrors are the caller's)."""
    try:
        fd = os.open(os.path.join(os.fspath(path), OUTPUT_MARKER),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(MARKER_TEXT)


def is_output_pictures(path: PathLike) -> bool:
    """True when ``path`` is a picture sub-folder (``OUTPUT_PICTURE_DIRS``) of an output
    folder."""
    path = os.path.abspath(os.fspath(path))
    return (os.path.basename(path) in OUTPUT_PICTURE_DIRS
            and is_output_folder(os.path.dirname(path)))


def output_pictures_holding(path: PathLike) -> Optional[str]:
    """The picture sub-folder of an output folder that ``path`` (a file or a folder) lies in,
    following symbolic links, or None when it lies in none."""
    folder = os.path.realpath(os.fspath(path))
    while True:
        if is_output_pictures(folder):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def is_image_file(name: PathLike) -> bool:
    """True when the extension of ``name`` is one of IMAGE_EXTENSIONS, in any case."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def stem(path: PathLike) -> str:
    """File name up to its first '.', the official notion of a source stem."""
    return Path(path).name.split(".", 1)[0]


def list_dirs(folder: Path) -> List[str]:
    """Names of the real sub-folders of ``folder``, sorted; files, hidden entries and the
    picture sub-folders of an output folder are skipped."""
    if output_pictures_holding(folder) is not None:
        return []
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if names and is_output_folder(folder):
        names = [n for n in names if n not in OUTPUT_PICTURE_DIRS]
    return names


def list_files(folder: Path, pattern: Optional[str] = None) -> List[Path]:
    """Regular files in ``folder`` sorted by name (symbolic links to regular files count);
    hidden files are skipped, and a picture sub-folder of an output folder lists nothing.

    With a glob ``pattern`` the match is case-sensitive on every platform (the official
    converters ran ``glob`` on Linux). With ``pattern=None`` every image file counts
    (:func:`is_image_file`).
    """
    folder = Path(folder)
    if output_pictures_holding(folder) is not None:
        return []
    with os.scandir(folder) as entries:
        # DirEntry.is_file follows links and is False for FIFOs, sockets and devices
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
