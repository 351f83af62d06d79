"""Checks of the ground truth of one evaluated class: masks that cannot be what their labels
say. Pure functions over arrays; the evaluation logs what they return."""

from __future__ import annotations

import numpy as np

# An anomalous image whose mask marks more than this fraction of its pixels is suspected of an
# inverted mask (defect 0, background 255).
INVERTED_FRACTION = 0.5


def mask_warnings(class_name: str, labels, masks) -> list[str]:
    """Warning lines (one per kind of problem, with its count) about the masks of one class.

    labels [n] (1 = anomalous image); masks [n, S, S] bool, or None (a dataset without
    ground truth: nothing to check). Anomalous images whose mask is empty (all 0), full
    (all 1) or marks more than half of the image (inverted?), and normal images whose mask
    is not empty. Returns [] when nothing is wrong."""
    if masks is None:
        return []
    labels = np.asarray(labels).reshape(-1).astype(bool)
    masks = np.asarray(masks)
    if masks.shape[0] != labels.size:
        raise ValueError(f"{labels.size} labels for {masks.shape[0]} masks in class "
                         f"{class_name}")
    fraction = masks.reshape(masks.shape[0], -1).mean(axis=1) if masks.size else \
        np.zeros(labels.size)                                           # [n] foreground share
    anomalous = int(labels.sum())
    lines = []
    empty = int((labels & (fraction == 0)).sum())
    full = int((labels & (fraction == 1)).sum())
    most = int((labels & (fraction > INVERTED_FRACTION) & (fraction < 1)).sum())
    stained = int((~labels & (fraction > 0)).sum())
    if empty:
        lines.append(f"class {class_name}: {empty} of {anomalous} anomalous images have an empty "
                     f"mask (all 0): their defects count as normal pixels; check the masks")
    if full:
        lines.append(f"class {class_name}: {full} of {anomalous} anomalous images have a mask "
                     f"covering the whole image (all 255): every pixel counts as defective; "
                     f"check the masks")
    if most:
        lines.append(f"class {class_name}: {most} of {anomalous} anomalous images have a mask "
                     f"covering more than half of the image: inverted (defect 0, background "
                     f"255)? check the masks")
    if stained:
        lines.append(f"class {class_name}: {stained} of {labels.size - anomalous} normal images "
                     f"have a non-empty mask: check the labels")
    return lines
