"""What the project writes, told apart from what it did not: the rules every script follows
for its outputs.

- **Apart from the inputs.** An output folder never overlaps an input or data folder: neither
  is the other nor lies inside it (:func:`check_apart`), so no output can land on an input and
  no later run reads an output as an input.
- **Only its own files are replaced or removed.** Every file the project writes carries its
  marker: the pictures (PNG) a ``tEXt`` chunk ``Software: Bayes-PFL`` (:func:`marked_png`),
  JSON files a ``"written_by"`` key, ONNX files their ``doc_string``, checkpoints their
  provenance record, CSV files their header, logs their line format (:func:`is_own_file`). An earlier run's files are removed only when they carry it
  (:func:`clear_own`), and a run whose output would land on a file without it stops before
  writing anything (:func:`check_writable`).

Standard library only (the dataset tools and the scripts share it).
"""
from __future__ import annotations

import json
import os
import zipfile
import re
import struct
import zlib
from typing import Iterable, List, Optional, Sequence, Tuple

from models.errors import OutputError

WRITTEN_BY = "Bayes-PFL"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KEYWORD = b"Software"
_PNG_CHUNK = b"tEXt" + _PNG_KEYWORD + b"\x00" + WRITTEN_BY.encode()
# The doc_string of the ONNX files export.py writes.
ONNX_DOC = f"{WRITTEN_BY} detector written by export.py"
ONNX_MARKER = ONNX_DOC.encode()
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def marked_png(data: bytes) -> bytes:
    """PNG bytes with the project's marker chunk inserted right after the header chunk."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not PNG data")
    (length,) = struct.unpack(">I", data[8:12])
    end = 8 + 12 + length                                  # signature + IHDR chunk
    payload = _PNG_CHUNK[4:]
    chunk = (struct.pack(">I", len(payload)) + _PNG_CHUNK
             + struct.pack(">I", zlib.crc32(_PNG_CHUNK) & 0xFFFFFFFF))
    return data[:end] + chunk + data[end:]


def is_marked_png(path: str) -> bool:
    """True when ``path`` is a PNG file carrying the project's marker chunk."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8 + 25 + 12 + len(_PNG_CHUNK))
    except OSError:
        return False
    return head.startswith(PNG_SIGNATURE) and head[37:37 + len(_PNG_CHUNK)] == _PNG_CHUNK


def write_marked_png(path: str, data: bytes) -> None:
    """Write PNG ``data`` to ``path`` with the marker, in one step (a hidden partial file, then
    a rename; OSErrors are the caller's)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(path)}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(marked_png(data))
        os.replace(partial, path)
    finally:
        if os.path.lexists(partial):
            os.remove(partial)


def is_own_file(path: str) -> bool:
    """True when the regular file ``path`` carries the project's marker (see the module
    docstring); a link, a folder or a missing file is never the project's."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".png":
            return is_marked_png(path)
        if ext == ".onnx":            # export.py's doc_string, serialised before the graph
            with open(path, "rb") as handle:
                return ONNX_MARKER in handle.read(1 << 16)
        if ext == ".pth":
            return is_own_checkpoint(path)
        if ext == ".data" and path.lower().endswith(".onnx.data"):
            return is_own_file(path[:-len(".data")])      # the weights of an own ONNX file
        if ext == ".json":
            with open(path, encoding="utf-8") as handle:
                obj = json.load(handle)
            if not isinstance(obj, dict):
                return False
            # files of versions before the marker: their provenance and settings records
            return (str(obj.get("written_by", "")).startswith(WRITTEN_BY)
                    or {"provenance", "settings"} <= set(obj))
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        if ext == ".csv":
            return first.startswith(("class,", "path,class_name,"))
        if ext == ".log":
            return bool(_LOG_LINE.match(first))
    except (OSError, ValueError):
        return False
    return False


def is_own_checkpoint(path: str) -> bool:
    """True when ``path`` is a torch zip archive whose pickle holds the records train.py
    writes beside the weights (``provenance``; ``global_step`` in a resumable last.pth): the
    released checkpoints and other files are not the project's."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None or archive.getinfo(name).file_size > (16 << 20):
                return False
            pickle = archive.read(name)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    return b"provenance" in pickle or b"global_step" in pickle


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """True when real path ``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(output: str, flag: str, folders: Iterable[Tuple[str, str]] = (),
                files: Iterable[Tuple[str, str]] = ()) -> None:
    """One OutputError unless the output folder ``output`` (named by ``flag``) overlaps none of
    ``folders`` ((flag, folder) read recursively: neither inside the other) and holds none of
    ``files`` ((flag, file)). Links are followed."""
    out = _real(output)
    for what, folder in folders:
        real = _real(folder)
        if _inside(real, out) or _inside(out, real):
            relation = ("is" if real == out else "lies inside" if _inside(out, real)
                        else "holds")
            raise OutputError(f"{flag} {output} {relation} the input folder {folder} ({what}): "
                              f"outputs never share a folder with inputs; choose an {flag} "
                              f"outside it")
    for what, path in files:
        if _inside(_real(path), out):
            raise OutputError(f"{flag} {output} holds the input file {path} ({what}): outputs "
                              f"never share a folder with inputs; choose an {flag} elsewhere")


def check_writable(paths: Iterable[str], flag: str, folder: str) -> None:
    """One OutputError, before anything is written, when one of the output ``paths`` exists
    and does not carry the project's marker (a file of the user's that the run would replace)."""
    for path in paths:
        if os.path.lexists(path) and not is_own_file(path):
            raise OutputError(
                f"{flag} {folder} holds {os.path.relpath(path, folder)}, which a run would "
                f"write over but which no run of this project wrote (it carries no "
                f"{WRITTEN_BY} marker): move it, or choose another {flag}")


def clear_own(paths: Sequence[str], folder: str) -> Tuple[List[str], List[str]]:
    """Remove the files among ``paths`` (files, or folders searched recursively) that carry
    the project's marker, and the folders left empty by that; returns (removed, kept), paths
    relative to ``folder``. What carries no marker is kept."""
    removed: List[str] = []
    kept: List[str] = []

    def rel(path: str) -> str:
        return os.path.relpath(path, folder)

    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, dirnames, filenames in os.walk(path, topdown=False):
                for name in sorted(filenames):
                    file = os.path.join(dirpath, name)
                    (removed if _remove_if_own(file) else kept).append(rel(file))
                for name in dirnames:
                    sub = os.path.join(dirpath, name)
                    if os.path.islink(sub):
                        kept.append(rel(sub))
                _remove_empty(dirpath)
        elif os.path.lexists(path):
            (removed if _remove_if_own(path) else kept).append(rel(path))
    return sorted(removed), sorted(kept)


def _remove_if_own(path: str) -> bool:
    if not is_own_file(path):
        return False
    try:
        os.remove(path)
    except OSError as error:
        raise OutputError(f"cannot remove {path}, an earlier run's file "
                          f"({error.strerror or error}): make its folder writable, or choose "
                          f"another output folder") from None
    return True


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass


def kept_note(kept: Sequence[str], flag: str, folder: str) -> Optional[str]:
    """The one line about files left in place (not the project's), or None."""
    if not kept:
        return None
    shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
    return (f"kept {len(kept)} file(s) in {flag} {folder} that no run of this project wrote: "
            f"{shown}")
