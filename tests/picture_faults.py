"""Picture writers that fail, for the tests of utils.pictures (module-level, so that the
picture processes can import them)."""

import errno
import os
import time


def disk_full(path, image):
    """A disk without room: OSError ENOSPC, as a full disk raises it."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def broken(path, image):
    """A bug in the drawing or writing code."""
    raise ValueError(f"panel of shape {image.shape} cannot be written")


def killed(path, image):
    """The process ends at once (as when the system kills it)."""
    os._exit(9)


def slow(path, image):
    """A slow disk: each picture takes a while."""
    time.sleep(0.5)
