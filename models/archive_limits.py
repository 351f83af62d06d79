"""Bounds on what a weights file can make its reader allocate, checked before any tensor is
read.

``torch.save`` and ``torch.jit.save`` write zip archives whose entries are *stored*, never
compressed (zip method 0: each entry's size equals its compressed size, tensors and pickles
alike). The readers allocate every entry at the size the archive declares, and a deflated entry
can declare about a thousand times the bytes it occupies: a 262 KB file inflating to 256 MiB.
So before reading, the sizes the zip's central directory declares (``zipfile``'s
``infolist``: ``file_size``, ``compress_size``) are checked against the file's size and a
limit:

* no entry above ``LARGE_ENTRY`` bytes may inflate more than ``MAX_COMPRESSION_RATIO`` times
  (torch's own files: 1);
* all entries together may declare at most ``MAX_COMPRESSION_RATIO`` times the file's size
  (plus ``LARGE_ENTRY``), and at most the limit of the kind of file: ``MAX_CHECKPOINT_BYTES``
  (4 GiB) for Bayes-PFL checkpoints and training states (the module for ViT-L/14 is about 150
  MB in fp32, a ``last.pth`` with its Adam state about three times that), ``MAX_CLIP_BYTES`` (4 GiB)
  for CLIP files (OpenAI's largest supported archive, ViT-L/14-336, is about 0.9 GB, its fp32
  state dict about 1.7 GB).

Files in torch's legacy (non-zip) format hold their storages uncompressed after the pickle and
torch reads each one from the file itself, so what they can make it fill is bounded by their
size: such a file must not be larger than the limit.
"""

from __future__ import annotations

import os
import zipfile

from .errors import WeightsError

MAX_COMPRESSION_RATIO = 10
LARGE_ENTRY = 1 << 20                    # 1 MiB: smaller entries may be compressed at will
MAX_CHECKPOINT_BYTES = 4 << 30           # Bayes-PFL checkpoints and last.pth
MAX_CLIP_BYTES = 4 << 30                 # CLIP archives and state dicts

__all__ = ["LARGE_ENTRY", "MAX_CHECKPOINT_BYTES", "MAX_CLIP_BYTES", "MAX_COMPRESSION_RATIO",
           "archive_problem", "check_archive"]


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n:,} bytes"


def archive_problem(path: str | os.PathLike, max_total: int) -> str | None:
    """Why the file at ``path`` may not be read (its declared sizes exceed the bounds above),
    in words that follow its name, or None when it may. Reads the zip's central directory
    only, never an entry; a file that is not a readable zip is checked by its size alone (its
    reader reports any other problem)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        if not zipfile.is_zipfile(path):
            infos = None
        else:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
    except (OSError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile):
        infos = None
    if infos is None:
        if size > max_total:
            return (f"is {size:,} bytes, more than the {_size(max_total)} a weights file of this "
                    f"kind may hold")
        return None
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > LARGE_ENTRY \
                and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            return (f"declares its entry {info.filename[:80]} as {info.file_size:,} bytes "
                    f"compressed into {info.compress_size:,} (more than {MAX_COMPRESSION_RATIO}"
                    f" times; torch stores tensors uncompressed)")
    if total > MAX_COMPRESSION_RATIO * size + LARGE_ENTRY:
        return (f"declares {total:,} bytes of entries in a file of {size:,} (more than "
                f"{MAX_COMPRESSION_RATIO} times; torch stores tensors uncompressed)")
    if total > max_total:
        return (f"declares {total:,} bytes of entries, more than the {_size(max_total)} a "
                f"weights file of this kind may hold")
    return None


def check_archive(path: str | os.PathLike, max_total: int, what: str) -> None:
    """One WeightsError naming the file (``what``: e.g. "Bayes-PFL checkpoint") when
    :func:`archive_problem` finds one; nothing is read beyond the zip's directory."""
    problem = archive_problem(path, max_total)
    if problem is not None:
        raise WeightsError(f"{what} '{os.fspath(path)}' {problem}: refused before reading any "
                           f"tensor (a damaged or crafted file); download or save it again")
