"""Few-shot references of a dataset: K good images of each class drawn from its **train** split
(meta "train"; never the test split that is evaluated).

The draw of a class depends only on the shot seed, the class name and the class's train list:
``numpy.random.default_rng([shot_seed, crc32(class name)])`` chooses K of them without
replacement, so a class's references are the same whatever other classes are evaluated.
"""

from __future__ import annotations

import os
from typing import Sequence

from dataset.data import load_meta, meta_path
from dataset.draws import draw_indices
from dataset.errors import DatasetError


def train_images(meta: dict, class_name: str) -> list[str]:
    """The good train images of ``class_name`` in a meta dict (their ``img_path``s, in meta
    order; the placeholder entries of train-less classes and anomalous entries left out)."""
    entries = (meta.get("train") or {}).get(class_name) or []
    return [e["img_path"] for e in entries
            if isinstance(e, dict) and e.get("img_path") and not e.get("anomaly")]


def draw_shots(paths: Sequence[str], k: int, shot_seed: int, class_name: str) -> list[str]:
    """``k`` of ``paths`` drawn without replacement by the generator of (shot seed, class)."""
    if k < 1:
        raise ValueError(f"cannot draw {k} of {len(paths)} images")
    return [paths[i] for i in draw_indices(len(paths), k, shot_seed, class_name)]


def draw_references(root: str, dataset_name: str, class_names: Sequence[str], k: int,
                    shot_seeds: Sequence[int]) -> dict[int, dict[str, list[str]]]:
    """{shot seed: {class: K image paths (joined with ``root``)}} for every class and shot
    seed, or one DatasetError naming the class (or the dataset) and what is available: K larger
    than a class's good train images, a dataset without train images."""
    meta = load_meta(root, dataset_name)
    available = {name: train_images(meta, name) for name in class_names}
    if not any(available.values()):
        folder = (meta.get("info") or {}).get("source") == "dataset.folder"
        how = (f"give it some with `python -m dataset.folder {root} --dataset {dataset_name} "
               f"--n_train K` (K normal test images moved to the train split), or evaluate it "
               f"zero-shot (without --k_shot)" if folder else
               "evaluate it zero-shot (without --k_shot)")
        raise DatasetError(f"{dataset_name} has no train images in {meta_path(root, dataset_name)}"
                           f" (its train split is empty, as for the medical datasets, KSDD2, "
                           f"RSDD and DAGM): few-shot references need good train images; "
                           f"{how}")
    for name, paths in available.items():
        tested = {os.path.normpath(e.get("img_path", "")) for e in
                  (meta.get("test") or {}).get(name) or [] if isinstance(e, dict)}
        both = [p for p in paths if os.path.normpath(p) in tested]
        if both:
            raise DatasetError(
                f"{meta_path(root, dataset_name)} lists {both[0]} (class {name}) in both the "
                f"train and the test split{f', and {len(both) - 1} more' if len(both) > 1 else ''}"
                f": a reference drawn from it would be scored against itself; remove it from one "
                f"split")
    short = {name: len(paths) for name, paths in available.items() if len(paths) < k}
    if short:
        listed = ", ".join(f"{name} {n}" for name, n in short.items())
        fewest = min(short.values())
        fix = (f"choose --k_shot {fewest} or less, or add train images" if fewest
               else "add good train images to those classes")
        raise DatasetError(f"--k_shot {k} needs {k} good train images per class, but "
                           f"{dataset_name} has fewer for: {listed}; {fix}")
    return {int(seed): {name: [os.path.join(root, p) for p in draw_shots(paths, k, seed, name)]
                        for name, paths in available.items()}
            for seed in shot_seeds}


def same_draws(drawn: dict[int, dict[str, list[str]]]) -> list[str]:
    """The classes whose references are the same set for every shot seed (e.g. K = all their
    train images): their spread over the shot seeds is 0 by construction."""
    seeds = list(drawn)
    if len(seeds) < 2:
        return []
    return [name for name in drawn[seeds[0]]
            if all(set(drawn[s][name]) == set(drawn[seeds[0]][name]) for s in seeds[1:])]
