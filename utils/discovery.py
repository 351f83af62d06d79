"""Finding the images a user names: files, folders (searched recursively) and glob patterns,
each file once, with the class name put in its prompt and the relative path that names its
overlay.

Only regular files are ever yielded (symbolic links to regular files count): a FIFO, socket or
device named ``x.png`` would block the reader or never end. Pictures an earlier run wrote (the
picture sub-folders of an output folder, ``dataset.files.OUTPUT_PICTURE_DIRS``) are never
yielded either, however they are named: by a folder above them, a glob or the file's own path.
A named file or folder that gives nothing for one of these reasons is reported by
:func:`why_no_images`; every other file under a named folder that is not scored is listed with
its reason (:class:`LeftOut`), so that each file under the inputs is accounted for.
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


class LeftOut(NamedTuple):
    """A file (or a folder, for all the files under it) under an input that is not scored,
    and why."""
    path: str
    reason: str


def file_key(path: str) -> tuple:
    """What makes two paths one file: (device, inode), so that hard and symbolic links to one
    file compare equal (the real path where the file cannot be stat'ed)."""
    try:
        stat = os.stat(path)
        return (stat.st_dev, stat.st_ino)
    except OSError:
        return (os.path.realpath(path),)


def _inside(path: str, folders: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == f or real.startswith(f + os.sep) for f in folders)


def _not_an_image(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return (f"not an image file (extension {ext})" if ext else
            "not an image file (no extension)")


def _walk_images(root: str, exclude: Sequence[str], left_out: list[LeftOut]) -> list[str]:
    """Regular image files under ``root`` (recursively, sorted; links to folders followed,
    each real folder searched once); everything else under it goes to ``left_out`` with its
    reason: hidden entries, files that are not images or not regular files, ``exclude``
    folders and the pictures of an earlier run (the picture sub-folders of output folders)."""
    pictures = output_pictures_holding(root)
    if pictures is not None:
        left_out.append(LeftOut(root, f"an earlier run's pictures (in {pictures})"))
        return []
    found = []
    searched = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        marked = OUTPUT_MARKER in filenames                # an output folder: skip its pictures
        keep = []
        for d in sorted(dirnames):
            path = os.path.join(dirpath, d)
            real = os.path.realpath(path)
            if d.startswith("."):
                left_out.append(LeftOut(path, "a hidden folder (not searched)"))
            elif (marked and d in OUTPUT_PICTURE_DIRS) or output_pictures_holding(path):
                left_out.append(LeftOut(path, "an earlier run's pictures"))
            elif _inside(path, exclude):
                left_out.append(LeftOut(path, "an output folder of this run"))
            elif real in searched:
                left_out.append(LeftOut(path, "a link to a folder searched already"))
            else:
                searched.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                if not (marked and name == OUTPUT_MARKER):
                    left_out.append(LeftOut(path, "a hidden file"))
            elif not os.path.isfile(path):
                kind = file_kind(path)
                left_out.append(LeftOut(path, f"not a regular file but a {kind}"))
            elif not is_image_file(name):
                left_out.append(LeftOut(path, _not_an_image(name)))
            elif os.path.islink(path) and output_pictures_holding(path) is not None:
                left_out.append(LeftOut(path, "a link to an earlier run's picture"))
            else:
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


def expand_input(spec: str, exclude: Sequence[str] = (),
                 left_out: list[LeftOut] | None = None) -> list[tuple[str, str]]:
    """One --input value -> [(image path, path relative to the input)].

    A regular file is taken as it is (whatever its extension: it was named on purpose), unless
    an earlier run wrote it (a picture of an output folder); a folder is searched recursively
    for image extensions (case-insensitive), links to folders followed; anything else is a
    glob pattern (``**`` allowed), whose matching folders are searched as folders are and
    whose matching files are taken when they have an image extension. Any other kind of entry
    (a FIFO, a socket, a device) gives nothing and is never opened. What a folder holds besides
    its images, and the files a pattern matches that are not images, go to ``left_out``."""
    exclude = [os.path.realpath(e) for e in exclude]
    left_out = [] if left_out is None else left_out
    if os.path.isfile(spec):
        return [(spec, os.path.basename(spec))] if _readable_file(spec) else []
    if os.path.exists(spec) and not os.path.isdir(spec):
        return []
    if os.path.isdir(spec):
        return [(p, os.path.relpath(p, spec)) for p in _walk_images(spec, exclude, left_out)]
    if not glob.has_magic(spec):
        return []
    root = _glob_root(spec)
    found = []
    for match in sorted(glob.glob(spec, recursive=True)):
        if _inside(match, exclude):
            continue
        if os.path.isdir(match):
            found.extend((p, os.path.relpath(p, root))
                         for p in _walk_images(match, exclude, left_out))
        elif not _readable_file(match):
            pictures = output_pictures_holding(match)
            left_out.append(LeftOut(match, "an earlier run's picture" if pictures else
                                    f"not a regular file but a {file_kind(match)}"))
        elif is_image_file(match):
            found.append((match, os.path.relpath(match, root)))
        else:
            left_out.append(LeftOut(match, _not_an_image(match)))
    return found


def collect_images(inputs: Sequence[str], class_name: str | None = None,
                   exclude: Sequence[str] = (),
                   on_unmatched: Callable[[str], None] | None = None,
                   left_out: list[LeftOut] | None = None) -> list[ImageItem]:
    """The images named by ``inputs`` (files, folders, glob patterns), each file once, in the
    order found. ``class_name`` None: each image's parent folder name. ``on_unmatched`` is
    called with each input that names no image; ``left_out`` receives every other file under
    the inputs that is not scored, with its reason (:class:`LeftOut`; a file named twice is
    scored once and not listed)."""
    items, seen = [], set()
    left: list[LeftOut] = []
    for spec in inputs:
        found = expand_input(spec, exclude, left)
        if not found and on_unmatched is not None:
            on_unmatched(spec)
        for path, rel in found:
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            items.append(ImageItem(path, class_name or folder_class_name(path), rel))
    if left_out is not None:
        done = set()
        for entry in left:
            if entry.path not in done:
                done.add(entry.path)
                left_out.append(entry)
    return items


def left_out_summary(left_out: Sequence[LeftOut]) -> str:
    """"3 left out: 2 not an image file (extension .txt), 1 a hidden file": the counts by
    reason, most frequent first ("" when nothing was left out)."""
    if not left_out:
        return ""
    counts: dict[str, int] = {}
    for entry in left_out:
        reason = entry.reason.split(" (")[0]
        counts[reason] = counts.get(reason, 0) + 1
    parts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"{len(left_out)} left out: " + ", ".join(f"{n} {why}" for why, n in parts)


def overlay_names(items: Sequence[ImageItem]) -> list[str]:
    """Relative overlay file names: the image's relative path with a .png extension; the full
    file name is kept (a.jpg -> a.jpg.png) where two images would share one name, or where a
    name would be a folder of another image's overlay (x.jpg beside a folder x.png/), then a
    number; compared without case, as case-insensitive file systems do."""
    folders = set()                                  # every folder the overlays will need
    for item in items:
        parts = os.path.normpath(item.relpath).split(os.sep)[:-1]
        folders.update(os.path.join(*parts[:k]).lower() for k in range(1, len(parts) + 1))
    names, taken = [], set()

    def free(name: str) -> bool:
        return name.lower() not in taken and name.lower() not in folders

    for item in items:
        stem = os.path.splitext(item.relpath)[0]
        candidates = [stem + ".png", item.relpath + ".png"]
        name = next((c for c in candidates if free(c)), None)
        n = 1
        while name is None:
            if free(f"{stem}_{n}.png"):
                name = f"{stem}_{n}.png"
            n += 1
        taken.add(name.lower())
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
