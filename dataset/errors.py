"""The error of dataset files a user can fix (missing meta file, unreadable image, ...)."""

from __future__ import annotations

from models.errors import UserError


class DatasetError(UserError, ValueError):
    """A problem with dataset files that the user can fix; the message says what to do."""
