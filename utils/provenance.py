"""What a result was computed from: the code, the libraries, the machine, the files (by their
SHA-256) and the data (the meta file and its images per class). Every results JSON
(test.py, predict.py) and every training log and checkpoint records it, so that two results
that disagree can be told apart (``python -m utils.summary --compare A.json B.json``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from functools import lru_cache
from importlib import metadata

import numpy as np
import torch

from models.weights import sha256_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def file_sha256(path: str | None) -> str | None:
    """The SHA-256 of a file (computed once per file version), None when there is none."""
    return sha256_of(path) if path and os.path.isfile(path) else None


@lru_cache(maxsize=None)
def code_version() -> dict:
    """The project's version and, in a git checkout, its commit (and whether files differ)."""
    try:
        version = metadata.version("bayes-pfl")
    except metadata.PackageNotFoundError:
        version = None
    out = {"version": version, "commit": None, "modified": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=10)
            out["modified"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def environment(device: torch.device | str | None = None, precision: str | None = None) -> dict:
    """Libraries and machine."""
    env = {"python": platform.python_version(), "torch": str(torch.__version__),
           "numpy": str(np.__version__), "platform": platform.platform(),
           "device": None if device is None else str(device), "precision": precision}
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def data_record(root: str, dataset: str, class_counts: dict[str, int] | None = None) -> dict:
    """The meta file of a dataset (path, SHA-256) and the images of each class used."""
    path = os.path.join(root, f"meta_{dataset}.json")
    return {"dataset": dataset, "meta_file": os.path.abspath(path),
            "meta_sha256": file_sha256(path), "images_per_class": class_counts}


def provenance(settings: dict, clip_path: str | None = None,
               checkpoint_path: str | None = None, data: list[dict] | None = None,
               device: torch.device | str | None = None, precision: str | None = None,
               started: float | None = None) -> dict:
    """The provenance record of a result: code, environment, weight files, data, every
    setting, the command line, and the wall time since ``started`` (``time.time()``)."""
    record = {"code": code_version(), "environment": environment(device, precision),
              "weights": {"clip": clip_path and os.path.abspath(clip_path),
                          "clip_sha256": file_sha256(clip_path),
                          "checkpoint": checkpoint_path and os.path.abspath(checkpoint_path),
                          "checkpoint_sha256": file_sha256(checkpoint_path)},
              "data": data or [], "settings": json.loads(json.dumps(settings, default=str)),
              "command": " ".join(sys.argv),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if started is not None:
        record["wall_time_s"] = round(time.time() - started, 3)
    return json.loads(json.dumps(record, default=str))       # plain data: loads weights_only


def class_counts(samples: list[dict]) -> dict[str, int]:
    """Images per class of a Dataset's samples."""
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample["cls_name"]] = counts.get(sample["cls_name"], 0) + 1
    return counts
