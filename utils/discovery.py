"""Finding the images a user names: files, folders (searched recursively) and glob patterns,
each file once, with the class name put in its prompt and the relative path that names its
overlay."""

from __future__ import annotations

import glob
import os
from typing import Callable, NamedTuple, Sequence

from dataset.files import is_image_file


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
    """Image files under ``root`` (recursively, sorted; hidden entries and ``exclude``
    folders left out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not _inside(os.path.join(dirpath, d), exclude))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and is_image_file(f))
    return found


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

    A file is taken as it is (whatever its extension: it was named on purpose); a folder is
    searched recursively for image extensions (case-insensitive); anything else is a glob
    pattern (``**`` allowed), whose matching folders are searched as folders are."""
    exclude = [os.path.realpath(e) for e in exclude]
    if os.path.isfile(spec):
        return [(spec, os.path.basename(spec))]
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
        elif os.path.isfile(match) and is_image_file(match):
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
    if os.path.isdir(spec):
        return "the folder holds no image file"
    if glob.has_magic(spec):
        return "the pattern matches no image file"
    return "no such file or folder"
