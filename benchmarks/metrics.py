"""Timing of the pixel metrics on one class-sized input.

    python benchmarks/metrics.py --n 150 --size 518 --seed 0
    python benchmarks/metrics.py --official_subset 20     # the official loop on 20 thresholds

Builds N smooth anomaly maps of SIZE x SIZE with elliptic blob masks (about a third of the
images normal), then times the exact AUPRO (utils.metrics.aupro), our vectorised form of the
official 200-threshold approximation (utils.metrics.aupro_official), the official function as
its code is written (``official_pro_loop``: per threshold, every map binarised, every mask
labelled, every region counted; minutes on a class of 150 maps), a plain exact AUPRO that
arg-sorts every pixel, and pixel AUROC / AP against scikit-learn.
"""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
from tabulate import tabulate

from utils.cli import Parser, positive_int
from utils.metrics import (
    aupro,
    aupro_official,
    auroc,
    average_precision,
    label_regions,
)


def make_class(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """masks bool [n, size, size] and float32 maps [n, size, size] that look like real ones."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    maps = np.empty((n, size, size), dtype=np.float32)
    coarse = max(4, size // 16)
    for i in range(n):
        if rng.random() > 1 / 3:
            for _ in range(rng.integers(1, 4)):
                center = tuple(int(c) for c in rng.integers(size // 10, size - size // 10, 2))
                axes = tuple(int(a) for a in rng.integers(size // 60 + 1, size // 8 + 2, 2))
                cv2.ellipse(masks[i], center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        noise = rng.normal(0.0, 1.0, (coarse, coarse)).astype(np.float32)
        background = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        fine = cv2.GaussianBlur(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (0, 0), 3)
        # Responses spill over the mask edges and miss parts of some regions.
        response = cv2.GaussianBlur(masks[i].astype(np.float32), (0, 0), size / 100)
        response *= rng.uniform(0.5, 3.0)
        maps[i] = 0.2 + 0.05 * background + 0.2 * fine + 0.15 * response
    return masks.astype(bool), maps


def aupro_sort_all(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO, plainly: arg-sort every pixel, accumulate both rates, collapse ties, cut."""
    region_of_pixel, sizes = label_regions(masks)
    anomalous = masks.reshape(-1)
    num_bg = anomalous.size - int(sizes.sum())
    labels = np.full(anomalous.size, -1, dtype=np.int64)  # -1 = background
    labels[anomalous] = region_of_pixel
    scores = maps.reshape(-1)
    order = np.argsort(scores, kind="stable")[::-1]  # descending
    scores, labels = scores[order], labels[order]
    fpr_step = np.where(labels < 0, 1.0 / num_bg, 0.0)
    pro_step = np.where(labels >= 0, 1.0 / (sizes.size * sizes[labels]), 0.0)
    last = np.r_[scores[1:] != scores[:-1], True]  # last pixel of each distinct score
    fpr = np.r_[0.0, np.cumsum(fpr_step)[last]]
    pro = np.r_[0.0, np.cumsum(pro_step)[last]]
    cut = int(np.searchsorted(fpr, fpr_limit, side="left"))
    x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
    y_cut = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
    x = np.r_[fpr[:cut], fpr_limit]
    y = np.r_[pro[:cut], y_cut]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0) / fpr_limit


def official_pro_loop(masks: np.ndarray, maps: np.ndarray, max_step: int = 200,
                      expect_fpr: float = 0.3, max_thresholds: int | None = None
                      ) -> tuple[float | None, int, int]:
    """The official PRO function, step by step as its code runs: for every threshold of
    np.arange(min, max, (max - min) / max_step), binarise all maps (> t), label each image's
    mask (8-connected; scipy.ndimage.label with a 3x3 structure in place of
    skimage.measure.label) and, region by region, append the covered fraction of its pixels;
    the FPR from logical_and(1 - masks, binary maps); then keep FPR < expect_fpr, min-max
    normalise the FPRs and take the trapezoidal area.

    ``max_thresholds``: run the first that many thresholds only (for timing); the value is
    then None. Returns (value, thresholds run, thresholds in all)."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=int)
    masks = masks.astype(np.uint8)
    binary_maps = np.zeros_like(maps, dtype=bool)
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / max_step
    thresholds = np.arange(min_th, max_th, delta)
    run = thresholds if max_thresholds is None else thresholds[:max_thresholds]
    pros, fprs = [], []
    for th in run:
        binary_maps[maps <= th] = 0
        binary_maps[maps > th] = 1
        pro = []
        for binary_map, mask in zip(binary_maps, masks):
            labelled, _ = ndimage.label(mask, structure=structure)
            for index, box in enumerate(ndimage.find_objects(labelled), start=1):
                rows, cols = np.nonzero(labelled[box] == index)        # the region's pixels
                tp_pixels = binary_map[box][rows, cols].sum()
                pro.append(tp_pixels / rows.size)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_maps).sum()
        fprs.append(fp_pixels / inverse_masks.sum())
        pros.append(np.array(pro).mean())
    if max_thresholds is not None and run.size < thresholds.size:
        return None, run.size, thresholds.size
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < expect_fpr
    fprs = fprs[kept]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    pros = pros[kept]
    area = np.sum(np.diff(fprs) * (pros[1:] + pros[:-1]) / 2.0)   # trapezoids
    return float(abs(area)), run.size, thresholds.size


def timed(fn, *args, repeat: int = 1):
    """(value, best wall time of `repeat` calls)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - start)
    return value, best


def main(argv=None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, default=150, help="number of maps")
    parser.add_argument("--size", type=positive_int, default=518, help="map side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="calls of each fast function (best time kept); slow ones run once")
    parser.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn timings")
    parser.add_argument("--official_subset", type=int, default=None, metavar="K",
                        help="time the official loop on its first K thresholds only and "
                             "extrapolate linearly to all of them (default: run them all)")
    args = parser.parse_args(argv)
    if args.official_subset is not None and args.official_subset < 1:
        parser.error("--official_subset must be at least 1")

    masks, maps = make_class(args.n, args.size, args.seed)
    print(f"{args.n} maps of {args.size}x{args.size} = {maps.size / 1e6:.1f} M pixels, "
          f"{masks.mean() * 100:.2f} % anomalous, {label_regions(masks)[1].size} regions")
    small_masks, small_maps = make_class(4, 64, args.seed + 1)  # warm-up: imports, first calls
    for fn in (aupro, aupro_official, aupro_sort_all, auroc, average_precision,
               official_pro_loop):
        fn(small_masks, small_maps)

    rows = []
    exact, t_exact = timed(aupro, masks, maps, repeat=args.repeat)
    plain, t_plain = timed(aupro_sort_all, masks, maps)
    official, t_official = timed(aupro_official, masks, maps)
    rows.append(["aupro (exact)", exact, t_exact, 1.0])
    rows.append(["aupro, sorting all pixels (exact)", plain, t_plain, t_plain / t_exact])
    rows.append(["aupro_official (200 thresholds, vectorised)", official, t_official,
                 t_official / t_exact])
    loop_value, t_loop, done, total = time_official_loop(masks, maps, args.official_subset)
    label = "official loop (as its code runs)"
    if done < total:
        label += f", {done} of {total} thresholds timed, time x {total / done:.1f}"
    rows.append([label, loop_value, t_loop, t_loop / t_exact])

    value, t_auroc = timed(auroc, masks, maps, repeat=args.repeat)
    rows.append(["auroc", value, t_auroc, 1.0])
    value, t_ap = timed(average_precision, masks, maps, repeat=args.repeat)
    rows.append(["average_precision", value, t_ap, 1.0])
    if not args.no_sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score

        y, s = masks.reshape(-1), maps.reshape(-1)
        value, t = timed(roc_auc_score, y, s)
        rows.append(["sklearn roc_auc_score", value, t, t / t_auroc])
        value, t = timed(average_precision_score, y, s)
        rows.append(["sklearn average_precision_score", value, t, t / t_ap])

    print(tabulate(rows, headers=["metric", "value", "seconds", "time / ours"],
                   floatfmt=("", ".6f", ".3f", ".1f"), missingval="-"))
    extrapolated = " (extrapolated linearly from the timed thresholds)" if done < total else ""
    print(f"exact aupro is {t_loop / t_exact:.1f}x faster than the official function"
          f"{extrapolated} and {t_official / t_exact:.1f}x faster than its vectorised form")


def time_official_loop(masks: np.ndarray, maps: np.ndarray, subset: int | None
                       ) -> tuple[float | None, float, int, int]:
    """(value or None, seconds for all thresholds, thresholds timed, thresholds in all)."""
    start = time.perf_counter()
    value, done, total = official_pro_loop(masks, maps, max_thresholds=subset)
    seconds = time.perf_counter() - start
    return value, seconds * total / done, done, total


if __name__ == "__main__":
    main()
