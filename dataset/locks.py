"""A lock file that keeps two processes from writing one folder (make_dataset's outputs,
train.py's run folders).

The lock file is created exclusively and holds "<pid> <host>". A lock whose process no longer
runs on this machine is taken over, with a log line; a lock of a running process, or of another
machine (which cannot be checked), is one clear error.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def _lock_owner(path: Path) -> tuple[int | None, str] | None:
    """(pid, host) written in the lock file `path`, None when there is no lock file; the pid is
    None when the file holds none (a lock being created, or a damaged one)."""
    try:
        words = path.read_text(encoding="utf-8", errors="replace").split()
    except FileNotFoundError:
        return None
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, (words[1] if len(words) > 1 else "")


def _is_running(pid: int) -> bool:
    """Whether process `pid` of this machine runs. This very process counts as not running:
    its own lock is released on exit, so such a lock was left under a pid reused since."""
    if pid == os.getpid():
        return False
    if os.name == "nt":  # os.kill(pid, 0) would signal the process there; assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:      # e.g. PermissionError: it runs under another user
        return True
    return True


def _take_over_stale_lock(path: Path, busy: str, idle: str, error: type[Exception]) -> None:
    """Remove the lock file `path` if the process that wrote it no longer runs; otherwise raise
    ``error`` with the one-line message ``busy`` (who holds it, the lock file, what to do)."""
    owner = _lock_owner(path)
    if owner is None:          # released meanwhile
        return
    pid, owner_host = owner
    if pid is None or owner_host != socket.gethostname() or _is_running(pid):
        who = "another process" if pid is None else f"process {pid}"
        if pid is not None and owner_host != socket.gethostname():
            who += f" on {owner_host or 'another machine'}"
        raise error(f"{busy} ({who}, lock file {path}): wait for it to finish, or delete the "
                    f"lock file if {idle}.")
    if _lock_owner(path) == owner:   # unchanged: no other run took it over meanwhile
        path.unlink(missing_ok=True)
        log.warning("Took over the lock %s of process %d, which no longer runs.", path, pid)


@contextmanager
def folder_lock(path: Path, busy: str, idle: str, error: type[Exception]) -> Iterator[Path]:
    """Hold the lock file ``path`` for the body. ``busy``: the start of the error when another
    running process holds it ("Output folder X is being written by another make_dataset");
    ``idle``: when deleting it by hand is safe ("no conversion is running")."""
    path, host = Path(path), socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_stale_lock(path, busy, idle, error)
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {host}\n")
            yield path
        finally:
            if _lock_owner(path) in ((os.getpid(), host), (None, "")):
                path.unlink(missing_ok=True)
        return
    raise error(f"Cannot take the lock {path}: other processes keep taking it; run one at a "
                f"time.")
