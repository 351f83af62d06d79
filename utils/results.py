"""Result files of an evaluation: ``results_<dataset>.csv`` and ``.json``, written atomically
(a temporary file, then a rename); a folder that cannot be written is one clear error."""

from __future__ import annotations

import csv
import io
import json
import os

from models.errors import UserError
from utils.protocol import COLUMNS, summarise


class OutputError(UserError, OSError):
    """An output file or folder that cannot be written (read-only, a file in the way, full)."""


def write_text(path: str, text: str) -> None:
    """``text`` into ``path`` atomically; an OSError becomes one OutputError line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"cannot write {path} ({error.strerror or error}): free some space "
                          f"or choose another output folder") from None


def make_output_folder(path: str, flag: str = "--save_path") -> None:
    """Create the output folder ``path`` (and check it takes files), or one OutputError."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a file, not a folder: choose another {flag}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise OutputError(f"cannot write into {flag} {path} ({error.strerror or error}): choose "
                          f"another {flag}") from None


def write_results(rows: dict[str, dict], save_path: str, dataset_name: str,
                  settings: dict | None = None) -> tuple[str, dict]:
    """Table (returned), ``results_<dataset>.csv`` and ``results_<dataset>.json``."""
    table, mean_row = summarise(rows)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["class", *COLUMNS])
    for name, row in list(rows.items()) + [("mean", mean_row)]:
        w.writerow([name] + ["" if row.get(k) is None else f"{row[k]:.6f}" for k in COLUMNS])
    write_text(os.path.join(save_path, f"results_{dataset_name}.csv"), text.getvalue())
    result = {"dataset": dataset_name, "classes": rows, "mean": mean_row,
              "settings": settings or {}}
    write_text(os.path.join(save_path, f"results_{dataset_name}.json"),
               json.dumps(result, indent=2) + "\n")
    return table, mean_row
