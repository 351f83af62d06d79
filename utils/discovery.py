"""Finding the images a user names: files, folders (searched recursively) and glob patterns,
each file once, with the class name put in its prompt and the relative path that names its
overlay.

Only regular files are ever yielded (symbolic links to regular files count): a FIFO, socket or
device named ``x.png`` would block the reader or never end. Pictures an earlier run wrote (the
picture sub-folders of an output folder, ``dataset.files.OUTPUT_PICTURE_DIRS``) are never
yielded either, however they are named: by a folder above them, a glob or the file's own path.
A named file or folder that gives nothing for one of these reasons is reported by
:func:`why_no_images`.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, NamedTuple, Sequence

from dataset.files import (OUTPUT_MARKER, OUTPUT_PICTURE_DIRS, file_kind, is_image_file,
                           output_pictures_holding)


class ImageItem(NamedTuple):
    """One image to score: its path, the class name put in the prompts, and its path
    relative to the input it was found under (names the overlay)."""
    path: str
    class_name: str
    relpath: str


def folder_class_name(path: str) -> str:
    """The name of the folder holding ``path`` (underscores kept: the prompt wording maps
    e.g. metal_nut to "metal nut")."""
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or "object"


def _inside(path: str, folders: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == f or real.startswith(f + os.sep) for f in folders)


def _walk_images(root: str, exclude: Sequence[str]) -> list[str]:
    """Regular image files under ``root`` (recursively, sorted; hidden entries, ``exclude``
    folders and the picture sub-folders of output folders left out)."""
    if output_pictures_holding(root) is not None:
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        marked = OUTPUT_MARKER in filenames                # an output folder: skip its pictures
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (marked and d in OUTPUT_PICTURE_DIRS)
                             and not _inside(os.path.join(dirpath, d), exclude))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or not is_image_file(name) or not os.path.isfile(path):
                continue
            if os.path.islink(path) and output_pictures_holding(path) is not None:
                continue                                   # a link to an earlier run's picture
            found.append(path)
    return found


def _readable_file(path: str) -> bool:
    """A regular file (or a link to one) outside the pictures of every output folder."""
    return os.path.isfile(path) and output_pictures_holding(path) is None


def _glob_root(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard component."""
    parts = os.path.normpath(pattern).split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = os.sep.join(fixed)
    if pattern.startswith(os.sep) and not root.startswith(os.sep):
        root = os.sep + root
    return root or "."


def expand_input(spec: str, exclude: Sequence[str] = ()) -> list[tuple[str, str]]:
    """One --input value -> [(image path, path relative to the input)].

    A regular file is taken as it is (whatever its extension: it was named on purpose), unless
    an earlier run wrote it (a picture of an output folder); a folder is searched recursively
    for image extensions (case-insensitive); anything else is a glob pattern (``**`` allowed),
    whose matching folders are searched as folders are. Any other kind of entry (a FIFO, a
    socket, a device) gives nothing and is never opened."""
    exclude = [os.path.realpath(e) for e in exclude]
    if os.path.isfile(spec):
        return [(spec, os.path.basename(spec))] if _readable_file(spec) else []
    if os.path.exists(spec) and not os.path.isdir(spec):
        return []
    if os.path.isdir(spec):
        return [(p, os.path.relpath(p, spec)) for p in _walk_images(spec, exclude)]
    if not glob.has_magic(spec):
        return []
    root = _glob_root(spec)
    found = []
    for match in sorted(glob.glob(spec, recursive=True)):
        if _inside(match, exclude):
            continue
        if os.path.isdir(match):
            found.extend((p, os.path.relpath(p, root)) for p in _walk_images(match, exclude))
        elif is_image_file(match) and _readable_file(match):
            found.append((match, os.path.relpath(match, root)))
    return found


def collect_images(inputs: Sequence[str], class_name: str | None = None,
                   exclude: Sequence[str] = (),
                   on_unmatched: Callable[[str], None] | None = None) -> list[ImageItem]:
    """The images named by ``inputs`` (files, folders, glob patterns), each file once, in the
    order found. ``class_name`` None: each image's parent folder name. ``on_unmatched`` is
    called with each input that names no image."""
    items, seen = [], set()
    for spec in inputs:
        found = expand_input(spec, exclude)
        if not found and on_unmatched is not None:
            on_unmatched(spec)
        for path, rel in found:
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            items.append(ImageItem(path, class_name or folder_class_name(path), rel))
    return items


def overlay_names(items: Sequence[ImageItem]) -> list[str]:
    """Relative overlay file names: the image's relative path with a .png extension; the full
    file name is kept (a.jpg -> a.jpg.png) where two images would share one name."""
    names, taken = [], set()
    for item in items:
        stem = os.path.splitext(item.relpath)[0]
        candidates = [stem + ".png", item.relpath + ".png"]
        name = next((c for c in candidates if c not in taken), None)
        n = 1
        while name is None:
            if f"{stem}_{n}.png" not in taken:
                name = f"{stem}_{n}.png"
            n += 1
        taken.add(name)
        names.append(name)
    return names


def group_by_class(items: Sequence[ImageItem]) -> list[ImageItem]:
    """Items reordered class after class (classes in order of first appearance, images in
    their found order within a class)."""
    order: dict[str, list[ImageItem]] = {}
    for item in items:
        order.setdefault(item.class_name, []).append(item)
    return [item for group in order.values() for item in group]


def why_no_images(spec: str) -> str:
    """Why an --input value named no image, in a few words."""
    kind = file_kind(spec)
    if kind not in ("missing", "regular file", "folder"):
        return f"not a regular file but a {kind}: only regular files are read"
    pictures = output_pictures_holding(spec) if kind != "missing" else None
    if pictures is None and kind == "missing" and glob.has_magic(spec):
        pictures = next(filter(None, map(output_pictures_holding,
                                         glob.glob(spec, recursive=True))), None)
    if pictures is not None:
        what = {"regular file": "the file is a picture", "folder": "the folder holds pictures"
                }.get(kind, "the pattern matches pictures")
        return (f"{what} that an earlier run wrote (in {pictures}, the pictures of an output "
                f"folder marked by {OUTPUT_MARKER}): outputs are never read as inputs")
    if kind == "folder":
        return "the folder holds no image file"
    if glob.has_magic(spec):
        return "the pattern matches no image file"
    return "no such file or folder"
