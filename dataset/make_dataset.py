"""Convert raw anomaly-detection datasets into the standardised layout.

    python dataset/make_dataset.py --dataset mvtec --src /data/mvtec_anomaly_detection
    python dataset/make_dataset.py --all --src-root /data/raw     # each from /data/raw/<Name>

writes `<dst>/<Name>/<class>/{train/good, test/good, test/anomaly, ground_truth/anomaly}`
(`--dst` defaults to `dataset/mvisa/data`). An existing `<dst>/<Name>` is replaced only with
`--overwrite`, and only once the new conversion has succeeded: the files are written to
`<dst>/.<Name>.partial` first. Then run `dataset/make_meta.py`. See dataset/README.md for the
raw layouts.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.converters import CONVERTERS, DatasetError, execute  # noqa: E402
from dataset.converters.common import find_dir  # noqa: E402

DEFAULT_DST = Path("dataset") / "mvisa" / "data"
Counts = Dict[str, Dict[str, int]]


class UnknownDatasetError(DatasetError):
    """A dataset name that has no converter."""


def resolve_name(name: str) -> str:
    """The official folder name for `name`, matched case-insensitively."""
    for known in CONVERTERS:
        if known.lower() == name.lower():
            return known
    raise UnknownDatasetError(f"Unknown dataset '{name}': choose one of {', '.join(CONVERTERS)}.")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def convert(name: str, src, dst=DEFAULT_DST, overwrite: bool = False, progress: bool = True,
            brainmri_any_case: bool = False) -> Counts:
    """Convert the raw dataset at `src` into `dst/<Name>`.

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
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DatasetError(f"Output folder {out} already exists: pass --overwrite to replace it.")

    module = CONVERTERS[name]
    plan = module.plan(src, any_case=True) if (name == "BrainMRI" and brainmri_any_case) \
        else module.plan(src)
    staging = dst / f".{name}.partial"
    _remove(staging)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        counts = execute(plan, staging, progress=progress, desc=name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove(out)
    staging.rename(out)
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    options = dict(dst=args.dst, overwrite=args.overwrite,
                   brainmri_any_case=args.brainmri_any_case)
    if not args.all:
        name = resolve_name(args.dataset)
        try:
            print(summary(name, convert(name, args.src, **options), args.dst / name))
        except DatasetError as error:
            print(f"make_dataset: {error}", file=sys.stderr)
            return 1
        return 0

    if not args.src_root.is_dir():
        print(f"make_dataset: Source root {args.src_root} not found: pass --src-root pointing at "
              f"the folder holding the raw <Name> folders.", file=sys.stderr)
        return 1
    converted, failed = 0, 0
    for name in CONVERTERS:
        src = find_dir(args.src_root, name)
        if src is None:
            print(f"{name}: skipped, {args.src_root / name} not found")
            continue
        try:
            print(summary(name, convert(name, src, **options), args.dst / name))
            converted += 1
        except DatasetError as error:
            print(f"make_dataset: {error}", file=sys.stderr)
            failed += 1
    if converted == 0 and failed == 0:
        print(f"make_dataset: No raw dataset folder found under {args.src_root}: expected folders "
              f"named {', '.join(CONVERTERS)}.", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
