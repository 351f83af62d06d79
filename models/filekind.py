"""What kind of file system entry a path is, without opening it (standard library only): the
readers open regular files only, since a FIFO, socket or device named like an image would
block or never end."""

from __future__ import annotations

import os
import stat
from typing import Union

PathLike = Union[str, os.PathLike]


def file_kind(path: PathLike) -> str:
    """What kind of file system entry ``path`` is, in a word or two ("regular file", "folder",
    "FIFO", "socket", "character device", "block device", "missing"), following symbolic
    links; never opens it."""
    try:
        mode = os.stat(os.fspath(path)).st_mode
    except OSError:
        return "missing"
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"
