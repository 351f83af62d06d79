"""Procedural anomaly-detection dataset in MVTec-AD layout (textures and objects with defects).

Categories (all rendered with vectorised numpy/OpenCV, small pose and colour variation):

- textures: ``weave`` (over-under fabric), ``wood`` (grain rings), ``mesh`` (wire grid),
  ``gravel`` (granular stone), ``checker`` (tiles with grout);
- objects on plain backgrounds: ``pill`` (speckled ellipse), ``bolt`` (threaded bar with head),
  ``ring`` (bottle top seen from above).

Defects (``dataset/synthetic_defects.py``; the normal images: ``dataset/synthetic_scenes.py``;
each defect painted with the exact binary mask of the pixels it changed, about 0.4-5 % of the
image): ``crack`` (jagged dark/bright polyline with a branch), ``hole`` (disc in a contrasting
tone), ``scratch`` (thin, slightly curved line), ``stain`` (irregular colour blob, textures) and
``missing`` (part of the object erased to the background, objects). Every category has cracks
and holes.

Two layouts:

- raw MVTec-AD (``generate_raw``): ``<out>/<cls>/train/good/000.png``, ``test/good/*.png``,
  ``test/<defect>/*.png``, ``ground_truth/<defect>/<stem>_mask.png``;
- standard (``write_standard`` / ``--standard``): ``<out>/<Name>/<cls>/{train/good, test/good,
  test/anomaly, ground_truth/anomaly}`` with ``.bmp`` images and ``.png`` masks named as the MVTec
  converter names them, plus ``<out>/meta_<Name>.json`` (written by ``dataset/make_meta.py``).

Everything is deterministic for a seed: each image has its own numpy Generator seeded from
(seed, category, split, defect, index).

    python -m dataset.synthetic --out DIR [--classes ...] [--seed 0] [--size 256] [--standard]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Iterator, Sequence

import cv2
import numpy as np

from dataset.make_meta import make_meta, write_meta
from dataset.synthetic_defects import make_sample, render_sample, sample_rng
from dataset.synthetic_scenes import CATEGORIES, OBJECTS, TEXTURES, check_classes, defects_of

__all__ = [
    "CATEGORIES",
    "TEXTURES",
    "OBJECTS",
    "defects_of",
    "render_sample",
    "generate_raw",
    "write_standard",
    "main",
]


def _iter_class(category: str, seed: int, size: int, n_train: int, n_test_good: int,
                n_test_anomaly: int
                ) -> Iterator[tuple[str, str, int, np.ndarray, np.ndarray | None]]:
    """(phase, specie, index, image RGB uint8, mask bool or None) in converter order.

    Train first, then the test sub-folders in sorted name order, indices ascending.
    """
    for index in range(n_train):
        _, image, _ = make_sample(category, None, sample_rng(seed, category, "train", "good", index), size)
        yield "train", "good", index, image, None
    defects = defects_of(category)
    counts = {name: 0 for name in defects}
    for k in range(n_test_anomaly):
        counts[defects[k % len(defects)]] += 1
    counts["good"] = n_test_good
    for specie in sorted(counts):
        for index in range(counts[specie]):
            defect = None if specie == "good" else specie
            _, image, mask = make_sample(category, defect, sample_rng(seed, category, "test", specie, index),
                                   size)
            yield "test", specie, index, image, mask


def _write(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    params = [cv2.IMWRITE_PNG_COMPRESSION, 6] if path.endswith(".png") else []
    if not cv2.imwrite(path, data, params):
        raise OSError(f"Cannot write {path}; check that the folder is writable.")


def _prepare(path: str, overwrite: bool) -> None:
    """Refuse to mix with existing files unless ``overwrite``, then remove them."""
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists and is not empty; choose another --out "
                                  f"or pass --overwrite to replace it.")
        shutil.rmtree(path)
    elif os.path.isfile(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; choose another --out or pass "
                                  f"--overwrite to replace it.")
        os.remove(path)


def generate_raw(out: str, classes: Sequence[str] | None = None, seed: int = 0, size: int = 256,
                 n_train: int = 6, n_test_good: int = 6, n_test_anomaly: int = 12,
                 overwrite: bool = False) -> list[str]:
    """Write the raw MVTec-AD layout under ``out``; returns the classes written."""
    classes = check_classes(classes)
    for category in classes:
        root = os.path.join(out, category)
        _prepare(root, overwrite)
        for phase in ("train", "test"):
            os.makedirs(os.path.join(root, phase, "good"), exist_ok=True)
        for phase, specie, index, image, mask in _iter_class(category, seed, size, n_train,
                                                             n_test_good, n_test_anomaly):
            stem = f"{index:03d}"
            _write(os.path.join(root, phase, specie, f"{stem}.png"), image)
            if mask is not None and specie != "good":
                _write(os.path.join(root, "ground_truth", specie, f"{stem}_mask.png"),
                       mask.astype(np.uint8) * 255)
    return classes


def write_standard(out_root: str, name: str = "synthetic", classes: Sequence[str] | None = None,
                   seed: int = 0, size: int = 256, n_train: int = 6, n_test_good: int = 6,
                   n_test_anomaly: int = 12, overwrite: bool = False) -> str:
    """Write ``<out_root>/<name>/<cls>/...`` in the standard layout and its meta file.

    File names follow the MVTec converter with ``name`` as prefix: ``{P}_{id:06d}.bmp`` (train),
    ``{P}_good_{id:06d}.bmp``, ``{P}_{defect}_{id:06d}.bmp`` + ``.png`` mask; one running id over
    the classes in sorted order, train before test, test sub-folders sorted. Returns the path of
    ``<out_root>/meta_<name>.json``.
    """
    classes = sorted(check_classes(classes))
    data_dir = os.path.join(out_root, name)
    meta_file = os.path.join(out_root, f"meta_{name}.json")
    _prepare(data_dir, overwrite)
    _prepare(meta_file, overwrite)
    counter = 0
    for category in classes:
        root = os.path.join(data_dir, category)
        for folder in ("train/good", "test/good", "test/anomaly", "ground_truth/anomaly"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        for phase, specie, _, image, mask in _iter_class(category, seed, size, n_train,
                                                         n_test_good, n_test_anomaly):
            if phase == "train":
                _write(os.path.join(root, "train", "good", f"{name}_{counter:06d}.bmp"), image)
            elif specie == "good":
                _write(os.path.join(root, "test", "good", f"{name}_good_{counter:06d}.bmp"), image)
            else:
                stem = f"{name}_{specie}_{counter:06d}"
                _write(os.path.join(root, "test", "anomaly", f"{stem}.bmp"), image)
                _write(os.path.join(root, "ground_truth", "anomaly", f"{stem}.png"),
                       mask.astype(np.uint8) * 255)
            counter += 1
    # The meta file as dataset/make_meta.py writes it, of these classes (a name such as "mvtec"
    # would otherwise ask for the official class list).
    write_meta(out_root, name, make_meta(out_root, name, classes=classes))
    return meta_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate a small procedural anomaly-detection dataset (MVTec-AD layout).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", nargs="+", default=None,
                        help=f"categories (default: all of {' '.join(CATEGORIES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--n_train", type=int, default=6, help="train good images per class")
    parser.add_argument("--n_test_good", type=int, default=6, help="test good images per class")
    parser.add_argument("--n_test_anomaly", type=int, default=12,
                        help="test anomalous images per class")
    parser.add_argument("--standard", action="store_true",
                        help="write the standard layout <out>/<name>/... and "
                             "<out>/meta_<name>.json")
    parser.add_argument("--name", default="synthetic",
                        help="dataset name (and file prefix) for --standard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output folders of the same classes")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error("--size must be at least 32.")
    start = time.perf_counter()
    try:
        if args.standard:
            meta_file = write_standard(args.out, args.name, args.classes, args.seed, args.size,
                                       args.n_train, args.n_test_good, args.n_test_anomaly,
                                       overwrite=args.overwrite)
            where = f"{os.path.join(args.out, args.name)} and {meta_file}"
        else:
            generate_raw(args.out, args.classes, args.seed, args.size, args.n_train,
                         args.n_test_good, args.n_test_anomaly, overwrite=args.overwrite)
            where = args.out
    except (ValueError, FileExistsError, OSError) as error:   # DatasetError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; the output under {args.out} is incomplete: run again with "
              f"--overwrite.", file=sys.stderr)
        return 130
    classes = check_classes(args.classes)
    total = len(classes) * (args.n_train + args.n_test_good + args.n_test_anomaly)
    print(f"Wrote {total} images of {len(classes)} classes ({', '.join(classes)}) to {where} "
          f"in {time.perf_counter() - start:.2f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
