"""Pictures of anomaly maps: heat-map overlays and the four-panel test figure."""

from __future__ import annotations


import cv2
import numpy as np

from dataset.outputs import write_marked_png
from dataset.transforms import read_image, resize_image


def read_rgb(path: str, size: int | None = None) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3], optionally resized to size x size exactly as the
    network input was (``dataset.transforms``: bicubic in the file's own mode, then RGB)."""
    image = read_image(path)
    return np.asarray(resize_image(image, size) if size is not None else
                      image.convert("RGB"), dtype=np.uint8)


def heat_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5,
                 vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """RGB uint8 image [H, W, 3] with a jet heat map of ``amap`` [h, w] blended on top.

    The map is scaled to [0, 1] with ``vmin``/``vmax`` (default: its own range) and resized
    to the image when the sizes differ."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape != image.shape[:2]:
        amap = cv2.resize(amap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    lo = float(amap.min()) if vmin is None else vmin
    hi = float(amap.max()) if vmax is None else vmax
    norm = np.clip((amap - lo) / (hi - lo + 1e-8), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return (alpha * heat + (1 - alpha) * image).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0),
                 alpha: float = 0.5) -> np.ndarray:
    """Binary mask painted in ``colour`` over the image."""
    out = image.copy()
    sel = np.asarray(mask) > 0
    out[sel] = (alpha * np.array(colour) + (1 - alpha) * out[sel]).astype(np.uint8)
    return out


def draw_contour(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0),
                 thickness: int = 1) -> np.ndarray:
    out = np.ascontiguousarray(image.copy())
    contours, _ = cv2.findContours((np.asarray(mask) > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def four_panel(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None,
               threshold: float | None, vmin: float, vmax: float,
               spread: np.ndarray | None = None, spread_max: float = 0.25) -> np.ndarray:
    """original | heat map | heat map cut at the threshold (pixels strictly above it, as the
    IoU counts them) with the ground-truth contour | ground truth, side by side (RGB uint8);
    with ``spread`` a fifth panel: the per-pixel spread over the prompt samples on the scale
    0..``spread_max``."""
    heat = heat_overlay(image, amap, vmin=vmin, vmax=vmax)
    gt = np.zeros(image.shape[:2], np.uint8) if mask is None else (np.asarray(mask) > 0)
    if threshold is None:
        cut = heat.copy()
    else:
        cut = image.copy()
        sel = amap > threshold
        cut[sel] = heat[sel]
    cut = draw_contour(cut, gt)
    panels = [image, heat, cut, mask_overlay(image, gt)]
    if spread is not None:
        panels.append(heat_overlay(image, spread, vmin=0.0, vmax=spread_max))
    return np.concatenate(panels, axis=1)


def save_rgb(path: str, image: np.ndarray) -> None:
    """An RGB picture as a PNG file carrying the project's marker (dataset.outputs), written in
    one step."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode the picture '{path}'")
    write_marked_png(path, data.tobytes())
