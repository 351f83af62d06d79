"""Errors a user can fix. Their messages are one line: what is wrong, which file or setting,
and what to do. Scripts print such an error and exit; any other exception is a bug and keeps
its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad file, bad setting, bad input); one-line message.

    A DataLoader worker's error reaches the main process rebuilt from its formatted traceback
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."); the
    original one-line message is taken back from its last line, so the user sees the same
    line with any number of workers."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            last = args[0].rstrip().splitlines()[-1]
            name, sep, message = last.partition(": ")
            args = (message if sep and name.split(".")[-1] == type(self).__name__ else last,)
        super().__init__(*args)


class WeightsError(UserError, RuntimeError):
    """A weights file is missing, unreadable or does not match the model."""


class SettingsError(UserError, ValueError):
    """Settings that cannot work together (flags against a checkpoint, bad values)."""


class OutputError(UserError, OSError):
    """An output file or folder that cannot be written (read-only, a file in the way, full)."""


class InputError(UserError, ValueError):
    """Images given to the API or a script that cannot be scored (no image, an unreadable file,
    an array or tensor of a shape, type or range that is not an image)."""
