"""Small shared helpers: seeding, logging, devices and precision."""

from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch

from models.errors import SettingsError
from models.precision import PRECISIONS, autocast  # noqa: F401  (re-exported)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | None = None, device_id: int | None = None) -> torch.device:
    """"auto"/None -> cuda if available else cpu; "cuda" with ``device_id`` -> cuda:ID."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and device_id is not None:
        device = f"cuda:{device_id}"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda was asked for but no CUDA device is available; "
                            "use --device cpu")
    return dev


def setup_logging(log_file: str | None = None, level: int = logging.INFO,
                  name: str = "bayes_pfl", mode: str = "a") -> logging.Logger:
    """A logger writing to stderr and, when given, to ``log_file`` (appending; ``mode="w"``:
    replacing an earlier run's log). The project packages' own log lines (models, dataset,
    utils) go to the same places."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file, mode=mode)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    # the library's own log lines (e.g. the position-grid resize, a dataset's warnings) go to
    # the same places
    for package in ("models", "dataset", "utils"):
        package_log = logging.getLogger(package)
        package_log.handlers = logger.handlers
        package_log.setLevel(level)
    logging.getLogger("models").propagate = False
    return logger


def log_to_files(logger: logging.Logger, message: str) -> None:
    """Write ``message`` to the logger's files only (for text also printed to stdout)."""
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
