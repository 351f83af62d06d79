"""Errors a user can fix. Their messages are one line: what is wrong, which file or setting,
and what to do. Scripts print such an error and exit; any other exception is a bug and keeps
its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad file, bad setting, bad input); one-line message."""


class WeightsError(UserError, RuntimeError):
    """A weights file is missing, unreadable or does not match the model."""


class SettingsError(UserError, ValueError):
    """Settings that cannot work together (flags against a checkpoint, bad values)."""
