"""Result files of an evaluation: ``results_<dataset>.csv`` and ``.json``, written atomically
(a temporary file, then a rename); a folder that cannot be written is one clear error. Every
output folder is marked as one (``dataset.files.OUTPUT_MARKER``), so that the pictures written
into it are never read back as input images."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from dataset.files import mark_output_folder, write_text_atomic
from dataset.outputs import WRITTEN_BY
from models.errors import OutputError
from utils.protocol import COLUMNS, mean_row_of, summarise

__all__ = ["OutputError", "make_output_folder", "over_seeds", "write_results", "write_text"]


def write_text(path: str, text: str) -> None:
    """``text`` into ``path`` atomically; an OSError becomes one OutputError line."""
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise OutputError(f"cannot write {path} ({error.strerror or error}): free some space "
                          f"or choose another output folder") from None


def make_output_folder(path: str, flag: str = "--save_path") -> None:
    """Create the output folder ``path`` (and check it takes files) and mark it as an output
    folder (``dataset.files.OUTPUT_MARKER``), or one OutputError."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a file, not a folder: choose another {flag}")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
        mark_output_folder(path)
    except OSError as error:
        raise OutputError(f"cannot write into {flag} {path} ({error.strerror or error}): choose "
                          f"another {flag}") from None


def over_seeds(runs: dict) -> dict:
    """Per-class results of several seeds ({seed: {class: row}}) summed up: ``classes`` and
    ``std`` (each column's mean and std over the seeds, ddof 0), ``mean`` and ``mean_std``
    (the mean and std over the seeds of each seed's mean row)."""
    seeds = list(runs)
    classes: dict[str, dict] = {}
    spreads: dict[str, dict] = {}
    for name in runs[seeds[0]]:
        classes[name], spreads[name] = {}, {}
        for column in COLUMNS:
            values = [runs[s][name].get(column) for s in seeds]
            values = [v for v in values if v is not None]
            classes[name][column] = float(np.mean(values)) if values else None
            spreads[name][column] = float(np.std(values)) if values else None
    means = [mean_row_of(runs[s]) for s in seeds]
    mean_row, mean_spread = {}, {}
    for column in COLUMNS:
        values = [m[column] for m in means if m[column] is not None]
        mean_row[column] = float(np.mean(values)) if values else None
        mean_spread[column] = float(np.std(values)) if values else None
    return {"classes": classes, "std": spreads, "mean": mean_row, "mean_std": mean_spread}


def run_name(key, dataset: str) -> str:
    """The files of one run of several: seed<S>_results_<dataset>, or
    seed<S>_shot<T>_results_<dataset> for a (seed, shot seed) run."""
    if isinstance(key, tuple):
        return f"seed{key[0]}_shot{key[1]}_results_{dataset}"
    return f"seed{key}_results_{dataset}"


def write_runs(runs: dict, save_path: str, dataset: str, settings: dict, extra: dict,
               suffix: str = "", with_mean: bool = True) -> tuple[dict, dict, dict]:
    """``results_<dataset><suffix>``: the single run of ``runs`` ({seed or (seed, shot seed):
    {class: row}}), or mean ± std over the runs beside each run's own files
    (:func:`run_name`). ``settings`` holds "seeds"; ``extra`` goes into every JSON;
    ``with_mean`` False leaves the mean rows out of the files (the files of a run whose
    classes are not all in: a mean over some classes would read as the dataset's). Returns
    ({None: the main table, run: each run's}, the main mean row, its std over the runs ({}
    for one run))."""
    keys = list(runs)
    main = f"results_{dataset}{suffix}"
    if len(keys) == 1:
        table, mean = write_results(runs[keys[0]], save_path, dataset, settings, name=main,
                                    extra={"seeds": settings["seeds"], **extra},
                                    with_mean=with_mean)
        return {None: table}, mean, {}
    tables = {}
    for key in keys:
        seed, shot = key if isinstance(key, tuple) else (key, None)
        tables[key], _ = write_results(
            runs[key], save_path, dataset,
            {**settings, "seed": seed, **({} if shot is None else {"shot_seed": shot})},
            name=run_name(key, dataset) + suffix, extra={"seeds": [seed], **extra},
            with_mean=with_mean)
    summary = over_seeds(runs)
    tables[None], mean = write_results(
        summary["classes"], save_path, dataset, settings, summary["std"], summary["mean"],
        summary["mean_std"], name=main,
        extra={"seeds": settings["seeds"],
               "runs": [list(k) if isinstance(k, tuple) else k for k in keys], **extra},
        with_mean=with_mean)
    return tables, mean, summary["mean_std"]


def write_results(rows: dict[str, dict], save_path: str, dataset_name: str,
                  settings: dict | None = None, spreads: dict | None = None,
                  mean_row: dict | None = None, mean_spread: dict | None = None,
                  name: str | None = None, extra: dict | None = None,
                  with_mean: bool = True) -> tuple[str, dict]:
    """Table (returned), ``<name>.csv`` and ``<name>.json`` (``name``: results_<dataset>).

    With ``spreads`` (class -> column -> std over seeds) and ``mean_spread`` the CSV gets a
    ``<column>_std`` column beside each column, the JSON ``std`` and ``mean_std``; ``extra``
    goes into the JSON as it is (the seeds, the provenance); ``with_mean`` False: no mean row in
    the CSV, and the JSON's mean (and mean_std) null."""
    table, mean_row = summarise(rows, spreads, mean_row, mean_spread)
    name = name or f"results_{dataset_name}"
    columns = [c for column in COLUMNS for c in ((column, f"{column}_std") if spreads
                                                  else (column,))]
    every = {k: ({**r, **{f"{c}_std": v for c, v in (spreads or {}).get(k, {}).items()}})
             for k, r in rows.items()}
    if with_mean:
        every["mean"] = {**mean_row, **{f"{c}_std": v for c, v in (mean_spread or {}).items()}}
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["class", *columns])
    for key, row in every.items():
        w.writerow([key] + ["" if row.get(c) is None else f"{row[c]:.6f}" for c in columns])
    write_text(os.path.join(save_path, f"{name}.csv"), text.getvalue())
    result = {"written_by": WRITTEN_BY, "dataset": dataset_name, "classes": rows,
              "mean": mean_row if with_mean else None, "settings": settings or {}}
    if spreads is not None:
        result.update(std=spreads, mean_std=mean_spread if with_mean else None)
    result.update(extra or {})
    write_text(os.path.join(save_path, f"{name}.json"), json.dumps(result, indent=2) + "\n")
    return table, mean_row
