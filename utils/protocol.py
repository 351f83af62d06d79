"""The per-class scoring protocol of the zero-shot evaluation (SPEC section 7).

Per class: the anomaly maps are smoothed by a Gaussian (scipy semantics) for the pixel metrics;
the image score fuses the min-max normalised text score with the min-max normalised mean of the
top-k values of the unsmoothed map; classification-only datasets use the text score alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from tabulate import tabulate

from dataset.registry import is_classification_only, topk20_classes
from utils import metrics, metrics_torch
from utils.metrics import aupro_official, label_regions

TOPK_20_CLASSES = topk20_classes()          # capsules, macaroni1/2, pipe_fryum, screw, ...

PIXEL_METRICS = ("auroc_px", "aupro_px", "ap_px", "f1_px", "iou", "threshold")
IMAGE_METRICS = ("auroc_sp", "ap_sp", "f1_sp")
COLUMNS = (
    "auroc_px", "aupro_px", "ap_px", "f1_px", "iou", "auroc_sp", "ap_sp", "f1_sp", "threshold"
)
PRO_MODES = ("exact", "official", "off")


# ---------------------------------------------------------------------------------------------
# Gaussian smoothing


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype=torch.float64) -> torch.Tensor:
    """Normalised Gaussian taps [2r + 1] with r = int(truncate * sigma + 0.5) (scipy's radius)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def _reflect_index(n: int, radius: int) -> torch.Tensor:
    """Source index of each position of a line of n padded by `radius` on both sides, with the
    edge pixel repeated (d c b a | a b c d | d c b a), reflecting again as often as needed."""
    i = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """[n, n] float64 matrix of the 1D filter on a line of n with the reflected border folded in:
    filtered line = matrix @ line."""
    taps = gaussian_kernel1d(sigma, truncate)
    radius = (taps.numel() - 1) // 2
    source = _reflect_index(n, radius).unfold(0, taps.numel(), 1)  # [n, 2r + 1]
    matrix = torch.zeros(n, n, dtype=torch.float64)
    return matrix.scatter_add_(1, source, taps.expand(n, -1))


# Output columns (rows) filtered per matrix product: each takes the BLOCK + 2 r input columns
# it depends on, instead of all of them (a quarter of the work at 518 px, sigma 8).
BLOCK = 32


def _banded(n: int, radius: int) -> list[tuple[int, int, int, int]]:
    """(output start, output stop, input start, input stop) of each block of a line of n filtered
    with ``radius``: the input span an output block depends on (the reflected border folds
    back within it). One block for lines too short to gain from blocks."""
    if n <= 2 * (BLOCK + 2 * radius):
        return [(0, n, 0, n)]
    return [(a, min(n, a + BLOCK), max(0, a - radius), min(n, a + BLOCK + radius))
            for a in range(0, n, BLOCK)]


def gaussian_smooth(maps: torch.Tensor, sigma: float = 8.0, truncate: float = 4.0,
                    chunk: int = 16, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian filter of each map, equal to scipy.ndimage.gaussian_filter(map, sigma) (mode
    'reflect', truncate 4) per image, to float rounding.

    maps: [N, H, W] (or [H, W]) floating tensor on any device. Separable: the 1D filter along W
    then along H, each as matrix products with the border reflection folded into the matrix
    (maps of any size, even smaller than the filter radius); the matrices are banded, so each
    block of output lines multiplies only the input lines within the filter's reach. Images go
    `chunk` at a time, so temporaries stay small; `out` (which may be `maps` itself, to smooth
    in place) receives the result.
    """
    if not torch.is_floating_point(maps):
        raise TypeError(f"gaussian_smooth needs floating maps, got {maps.dtype}.")
    if maps.dim() not in (2, 3):
        raise ValueError(f"maps must be [N, H, W] or [H, W], got shape {tuple(maps.shape)}.")
    if out is None:
        out = torch.empty_like(maps)
    if sigma <= 0:
        return out.copy_(maps)
    radius = int(truncate * sigma + 0.5)
    height, width = maps.shape[-2:]
    along_h = gaussian_matrix(height, sigma, truncate).to(maps.device, maps.dtype)  # [H, H]
    along_w = gaussian_matrix(width, sigma, truncate).T.to(maps.device, maps.dtype)  # [W, W]
    rows, cols = _banded(height, radius), _banded(width, radius)
    batch = maps[None] if maps.dim() == 2 else maps
    result = out[None] if maps.dim() == 2 else out
    rows_filtered = batch.new_empty((min(chunk, batch.shape[0]), height, width))
    for start in range(0, batch.shape[0], chunk):
        x = batch[start:start + chunk]
        filtered = rows_filtered[:x.shape[0]]                   # [n, H, W], rows filtered
        for a, b, lo, hi in cols:
            torch.matmul(x[..., lo:hi], along_w[lo:hi, a:b], out=filtered[..., a:b])
        target = result[start:start + chunk]
        for a, b, lo, hi in rows:                               # columns filtered
            torch.matmul(along_h[a:b, lo:hi], filtered[:, lo:hi], out=target[:, a:b])
    return out


# ---------------------------------------------------------------------------------------------
# Image scores


def topk_for_class(name: str) -> int:
    """k of the top-k map score: 20 for the classes with small defects, 2000 otherwise."""
    return 20 if name in TOPK_20_CLASSES else 2000


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-8)


def fuse_image_scores(text_scores, maps, class_name: str) -> torch.Tensor:
    """0.5 * minmax(text score) + 0.5 * minmax(mean of the k highest values of each map).

    text_scores: [N]; maps: [N, H, W] unsmoothed (numpy or torch). The min-max runs over the N
    images of the class. Returns float64 [N] on the maps' device.
    """
    maps = torch.as_tensor(maps)
    text = torch.as_tensor(text_scores).to(device=maps.device, dtype=torch.float64).reshape(-1)
    flat = maps.reshape(maps.shape[0], -1)  # [N, H*W]
    k = min(topk_for_class(class_name), flat.shape[1])
    map_scores = top_values(flat, k).to(torch.float64).mean(dim=1)  # [N]
    return 0.5 * _minmax(text) + 0.5 * _minmax(map_scores)


def top_values(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row of ``flat`` [N, M], descending: [N, k], equal to
    ``flat.topk(k).values``. On the CPU numpy's partition finds them (about twice as fast),
    then only they are sorted."""
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        return flat.topk(k, dim=1).values
    rows = flat.detach().numpy()
    part = np.partition(rows, rows.shape[1] - k, axis=1)[:, rows.shape[1] - k:]  # [N, k]
    part.sort(axis=1)
    return torch.from_numpy(np.ascontiguousarray(part[:, ::-1]))


# ---------------------------------------------------------------------------------------------
# One class


def _image_metrics(labels, scores, m=metrics) -> dict:
    """Image AUROC, AP, F1-max with the metric module ``m`` (``utils.metrics`` on numpy
    arrays, ``utils.metrics_torch`` on tensors)."""
    if labels.all() or not labels.any():  # one kind of image only: not applicable
        return dict.fromkeys(IMAGE_METRICS)
    ss = m.sort_by_label(labels, scores)
    return {"auroc_sp": m.auroc_sorted(ss), "ap_sp": m.average_precision_sorted(ss),
            "f1_sp": m.f1_max_sorted(ss)[0]}


def _pixel_metrics(masks: np.ndarray, smoothed: np.ndarray, pro: str) -> dict:
    """Pixel metrics with the numpy reference, one sort shared by all of them."""
    if masks.all() or not masks.any():  # no anomalous (or no normal) pixel: not applicable
        return dict.fromkeys(PIXEL_METRICS)
    if pro == "exact":                   # the sort keeps each region pixel's region
        regions = metrics.sort_by_region(masks, smoothed)
        ss = regions.scores
    else:
        ss = metrics.sort_by_label(masks, smoothed)
    f1, threshold = metrics.f1_max_sorted(ss)
    return {"auroc_px": metrics.auroc_sorted(ss),
            "aupro_px": (metrics.aupro_sorted(regions) if pro == "exact" else
                         aupro_official(masks, smoothed) if pro == "official" else None),
            "ap_px": metrics.average_precision_sorted(ss), "f1_px": f1,
            "iou": metrics.iou_above(ss, threshold),      # official: strictly greater
            "threshold": threshold}


def _pixel_metrics_torch(masks: torch.Tensor, smoothed: torch.Tensor, pro: str,
                         host_masks: np.ndarray, host_smoothed: np.ndarray) -> dict:
    """Pixel metrics as torch code on the tensors' device (``utils.metrics_torch``); the
    region labels and the official AUPRO from the host copies."""
    if masks.all() or not masks.any():
        return dict.fromkeys(PIXEL_METRICS)
    m = metrics_torch
    ss = m.sort_by_label(masks, smoothed)
    f1, threshold = m.f1_max_sorted(ss)
    result = {"auroc_px": m.auroc_sorted(ss), "ap_px": m.average_precision_sorted(ss),
              "f1_px": f1}
    del ss
    if pro == "exact":
        result["aupro_px"] = m.aupro(masks, smoothed, regions=label_regions(host_masks))
    elif pro == "official":
        result["aupro_px"] = aupro_official(host_masks, host_smoothed)
    else:
        result["aupro_px"] = None
    result["iou"] = m.iou(masks, smoothed > threshold)            # official: strictly greater
    result["threshold"] = threshold
    return {k: result[k] for k in PIXEL_METRICS}


def _metrics_on_device(device: torch.device) -> bool:
    """Whether the class metrics run as torch code on ``device`` (every device but the CPU,
    where the numpy reference is the faster)."""
    return device.type != "cpu"


@contextmanager
def _ieee_matmul(device: torch.device):
    """float32 matmuls on a CUDA ``device`` without TF32 (test.py --tf32 allows it for the
    model), so that the smoothing there equals the CPU's to float rounding."""
    if device.type != "cuda":
        yield
        return
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def evaluate_class(labels, masks, text_scores, maps, class_name: str, dataset_name: str,
                   pro: str = "exact", sigma: float = 8.0, device=None) -> dict:
    """Metrics of one class (fractions in [0, 1]; None where not applicable).

    labels [N] (1 = anomalous image), masks [N, H, W] binary or None, text_scores [N],
    maps [N, H, W] unsmoothed; numpy arrays or torch tensors (the inputs are not modified),
    the whole class (e.g. gathered from several processes).
    pro: "exact" (utils.metrics.aupro), "official" (the paper's 200-threshold approximation) or
    "off" (aupro_px None). device: where the smoothing, the fusion and the metrics run
    (default: the maps' device; numpy maps: the CPU). On the CPU the metrics are the numpy
    reference (utils.metrics); elsewhere their torch form (utils.metrics_torch, the same
    values to float summation order); the official AUPRO always runs on the CPU.

    Pixel metrics on the smoothed maps: auroc_px, aupro_px, ap_px, f1_px (F1-max), iou (masks
    against smoothed > the F1-max threshold, as officially) and threshold. Image metrics on
    the fused score: auroc_sp, ap_sp, f1_sp. Classification-only datasets: the text score
    alone is the image score and the pixel metrics are None; so are the image metrics of a
    class whose images are all anomalous (or all normal), and the pixel metrics of a class
    without anomalous pixels.

    Besides the metrics the dict holds "image_scores" (float64 numpy [N], the scores the image
    metrics used) and "smoothed_maps" (float32 numpy [N, H, W], or None when the maps were not
    used).
    """
    if pro not in PRO_MODES:
        raise ValueError(f"pro must be one of {PRO_MODES}, got {pro!r}.")
    if device is None:
        device = maps.device if isinstance(maps, torch.Tensor) else "cpu"
    device = torch.device(device)
    on_device = _metrics_on_device(device)
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1).astype(bool)
    text = torch.as_tensor(text_scores).detach().to(device, torch.float64).reshape(-1)
    if text.numel() != labels.size:
        raise ValueError(
            f"{labels.size} labels for {text.numel()} text scores in class {class_name}."
        )

    pixel = dict.fromkeys(PIXEL_METRICS)
    smoothed_np = None
    if is_classification_only(dataset_name) or maps is None:
        image_scores = text
    else:
        maps_t = torch.as_tensor(maps).detach().to(device)
        image_scores = fuse_image_scores(text, maps_t, class_name)
        with _ieee_matmul(device):
            smoothed = gaussian_smooth(maps_t.float(), sigma)  # one new [N, H, W] array
        smoothed_np = smoothed.cpu().numpy()
        if masks is not None:
            masks_np = np.asarray(torch.as_tensor(masks).cpu()).astype(bool, copy=False)
            if on_device:
                pixel = _pixel_metrics_torch(torch.from_numpy(masks_np).to(device), smoothed,
                                             pro, masks_np, smoothed_np)
            else:
                pixel = _pixel_metrics(masks_np, smoothed_np, pro)
        del smoothed
    if on_device:
        image = _image_metrics(torch.from_numpy(labels).to(device), image_scores, metrics_torch)
    else:
        image = _image_metrics(labels, image_scores.numpy())

    return {**pixel, **image, "image_scores": image_scores.cpu().numpy(),
            "smoothed_maps": smoothed_np}


# ---------------------------------------------------------------------------------------------
# Tables


def _cell(column: str, value, spread=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if column == "threshold":
        return f"{value:.4f}" + ("" if spread is None else f" ± {spread:.4f}")
    return f"{100.0 * value:.1f}" + ("" if spread is None else f" ± {100.0 * spread:.1f}")


def mean_row_of(rows: dict) -> dict:
    """The mean over classes of each column's available values (None where none is)."""
    mean_row = {}
    for column in COLUMNS:
        values = [r.get(column) for r in rows.values()]
        values = [v for v in values if v is not None and not math.isnan(v)]
        mean_row[column] = float(np.mean(values)) if values else None
    return mean_row


def summarise(rows: dict, spreads: dict | None = None, mean_row: dict | None = None,
              mean_spread: dict | None = None) -> tuple[str, dict]:
    """Table of the per-class metrics and their mean.

    rows: class name -> metrics dict (as from evaluate_class; other keys ignored). Values are
    shown in percent with one decimal, the threshold raw with four; None as "n/a". The last row,
    "mean", averages the available values of each column (or is ``mean_row``). With
    ``spreads`` (class -> column -> std) and ``mean_spread``, every cell reads "mean ± std".
    Returns (table text, mean row with raw values, None where no class has the metric).
    """
    mean_row = mean_row_of(rows) if mean_row is None else mean_row
    spreads = spreads or {}
    body = [[name] + [_cell(c, r.get(c), (spreads.get(name) or {}).get(c)) for c in COLUMNS]
            for name, r in rows.items()]
    body.append(["mean"] + [_cell(c, mean_row[c], (mean_spread or {}).get(c))
                            for c in COLUMNS])
    table = tabulate(body, headers=["class", *COLUMNS], tablefmt="pipe", disable_numparse=True,
                     colalign=("left",) + ("right",) * len(COLUMNS))
    return table, mean_row
