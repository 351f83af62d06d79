"""Convert raw anomaly-detection datasets into the standardised layout.

    python -m dataset.make_dataset --dataset mvtec --src /data/mvtec_anomaly_detection
    python -m dataset.make_dataset --all --src-root /data/raw     # each from /data/raw/<Name>

run from the repository root (`python dataset/make_dataset.py ...` works too once the project is
installed with `pip install -e .`), writes `<dst>/<Name>/<class>/{train/good, test/good,
test/anomaly, ground_truth/anomaly}` (`--dst` defaults to `dataset/mvisa/data`). Then run
`python -m dataset.make_meta`. See dataset/README.md for the raw layouts.

The files are written to `<dst>/.<Name>.partial` first. An existing `<dst>/<Name>` is replaced
only with `--overwrite`, and only once the new conversion has succeeded, by two renames (the old
output aside to `<dst>/.<Name>.old-<pid>`, the new one in) before the old copy is deleted. If a
run is killed between the two renames, the next run restores the old output; it also removes
what an interrupted run left behind, with a log line for each repair. The lock file
`<dst>/.<Name>.lock` (holding the pid) stops two conversions writing one output at once; a lock
whose process no longer runs is taken over.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

if __package__ in (None, "") and importlib.util.find_spec("dataset") is None:   # a bare file
    sys.exit(f"{Path(__file__).stem}: the package 'dataset' cannot be imported: run 'python -m "
             f"dataset.{Path(__file__).stem} ...' from the repository root, or install the "
             "project with 'pip install -e .'.")
from dataset.errors import DatasetError
from dataset.converters import CONVERTERS, execute
from dataset.files import find_dir
from dataset.locks import folder_lock

DEFAULT_DST = Path("dataset") / "mvisa" / "data"
Counts = Dict[str, Dict[str, int]]
LOG = logging.getLogger("dataset.make_dataset")


class UnknownDatasetError(DatasetError):
    """A dataset name that has no converter."""


def resolve_name(name: str) -> str:
    """The official folder name for `name`, matched case-insensitively."""
    for known in CONVERTERS:
        if known.lower() == name.lower():
            return known
    raise UnknownDatasetError(f"Unknown dataset '{name}': choose one of {', '.join(CONVERTERS)}.")


# ----------------------------------------------------------------------------- output folder

def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


@contextmanager
def output_lock(dst: Path, name: str) -> Iterator[Path]:
    """Hold `<dst>/.<name>.lock` for the body (see `dataset.locks.folder_lock`)."""
    with folder_lock(dst / f".{name}.lock",
                     f"Output folder {dst / name} is being written by another make_dataset",
                     "no conversion is running", DatasetError) as path:
        yield path


def recover(dst: Path, name: str) -> None:
    """Repair what an interrupted run left in `dst` for `name` (call it holding the lock).

    If `<dst>/<name>` is missing but an old copy `.<name>.old-<pid>` exists (a run killed between
    the two renames of the swap), the old copy is restored; old copies beside an existing output
    and the staging folder `.<name>.partial` of an unfinished conversion are removed.
    """
    out, prefix = dst / name, f".{name}.old-"
    with os.scandir(dst) as entries:
        backups = [Path(entry.path) for entry in entries if entry.name.startswith(prefix)]
    backups.sort(key=lambda path: path.lstat().st_mtime)
    if backups and not _exists(out):
        newest = backups.pop()
        os.rename(newest, out)
        LOG.warning("Restored %s from %s, left by an interrupted --overwrite.", out, newest)
    for backup in backups:
        _remove(backup)
        LOG.warning("Removed %s, the old output left by an interrupted --overwrite.", backup)
    staging = dst / f".{name}.partial"
    if _exists(staging):
        _remove(staging)
        LOG.warning("Removed %s, the unfinished output of an interrupted conversion.", staging)


def _swap_in(staging: Path, out: Path) -> None:
    """Make `staging` the folder `out`; an existing `out` is renamed aside first and deleted
    last, so an interruption leaves either output in place or the old one for :func:`recover`."""
    backup = None
    if _exists(out):
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, backup)
    try:
        os.rename(staging, out)
    except BaseException:
        if backup is not None and not _exists(out):
            os.rename(backup, out)    # put the old output back at once
        raise
    if backup is not None:
        _remove(backup)


# ----------------------------------------------------------------------------- conversion

def convert(name: str, src, dst=DEFAULT_DST, overwrite: bool = False, progress: bool = True,
            brainmri_any_case: bool = False) -> Counts:
    """Convert the raw dataset at `src` into `dst/<Name>` (see the module docstring).

    Returns the images written per class, {cls: {"train": n, "good": n, "anomaly": n}}.
    `brainmri_any_case` widens BrainMRI's file matching (see dataset/converters/brainmri.py).
    """
    name = resolve_name(name)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetError(f"Source folder {src} not found: pass --src pointing at the raw {name} "
                           f"download (layouts in dataset/README.md).")
    out = dst / name
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise DatasetError(f"Output folder {out} contains the source {src}: choose another --dst.")
    if _exists(dst) and not dst.is_dir():
        raise DatasetError(f"Output root {dst} is a file, not a folder: choose another --dst.")
    dst.mkdir(parents=True, exist_ok=True)

    with output_lock(dst, name):
        recover(dst, name)
        if _exists(out) and not overwrite:
            raise DatasetError(f"Output folder {out} already exists: pass --overwrite to "
                               f"replace it.")
        module = CONVERTERS[name]
        plan = module.plan(src, any_case=True) if (name == "BrainMRI" and brainmri_any_case) \
            else module.plan(src)
        staging = dst / f".{name}.partial"
        try:
            counts = execute(plan, staging, progress=progress, desc=name)
            _swap_in(staging, out)
        finally:
            if _exists(staging):
                shutil.rmtree(staging, ignore_errors=True)
    return counts


def summary(name: str, counts: Counts, out: Path) -> str:
    train = sum(c["train"] for c in counts.values())
    good = sum(c["good"] for c in counts.values())
    anomaly = sum(c["anomaly"] for c in counts.values())
    return (f"{name}: {len(counts)} classes, {train} train, {good + anomaly} test "
            f"({anomaly} anomalous) -> {out}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--dataset", help=f"one of {', '.join(CONVERTERS)} (any case)")
    which.add_argument("--all", action="store_true", help="convert every dataset found under --src-root")
    parser.add_argument("--src", type=Path, help="raw download of --dataset")
    parser.add_argument("--src-root", type=Path, help="with --all: folder holding one raw <Name> folder per dataset")
    parser.add_argument("--dst", type=Path, default=DEFAULT_DST, help="output root (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <dst>/<Name>")
    parser.add_argument("--brainmri-any-case", action="store_true",
                        help="BrainMRI: take every image file, extension in any case "
                             "(changes counts and ids from the published data)")
    args = parser.parse_args(argv)
    if args.dataset is not None:
        try:
            resolve_name(args.dataset)
        except UnknownDatasetError as error:  # one line, before any usage message
            print(f"make_dataset: {error}", file=sys.stderr)
            sys.exit(2)
        if args.src is None:
            parser.error("--dataset needs --src")
    if args.all and args.src_root is None:
        parser.error("--all needs --src-root")
    return args


def _convert_and_report(name: str, src: Path, args: argparse.Namespace) -> bool:
    """Convert one dataset, print its summary line or its one error line; True on success."""
    try:
        counts = convert(name, src, args.dst, overwrite=args.overwrite,
                         brainmri_any_case=args.brainmri_any_case)
    except DatasetError as error:
        print(f"make_dataset: {error}", file=sys.stderr)
        return False
    except OSError as error:   # unreadable source, full disk, no permission, ...
        print(f"make_dataset: Cannot convert {name}: {error}", file=sys.stderr)
        return False
    print(summary(name, counts, args.dst / name))
    return True


def _convert_all(args: argparse.Namespace) -> int:
    if not args.src_root.is_dir():
        print(f"make_dataset: Source root {args.src_root} not found: pass --src-root pointing at "
              f"the folder holding the raw <Name> folders.", file=sys.stderr)
        return 1
    converted, failed = 0, 0
    for name in CONVERTERS:
        src = find_dir(args.src_root, name)
        if src is None:
            print(f"{name}: skipped, {args.src_root / name} not found")
        elif _convert_and_report(name, src, args):
            converted += 1
        else:
            failed += 1
    if converted == 0 and failed == 0:
        print(f"make_dataset: No raw dataset folder found under {args.src_root}: expected folders "
              f"named {', '.join(CONVERTERS)}.", file=sys.stderr)
        return 1
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="make_dataset: %(message)s")
    try:
        if args.all:
            return _convert_all(args)
        return 0 if _convert_and_report(resolve_name(args.dataset), args.src, args) else 1
    except KeyboardInterrupt:
        print("make_dataset: Interrupted; existing outputs are kept, and the next run removes "
              "what this one left half-written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
