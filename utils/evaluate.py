"""Zero-shot evaluation of one dataset: inference class by class, the per-class protocol,
pictures and result files. ``test.py`` and the demo call this."""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from dataset.registry import is_classification_only
from models.noise import RunNoise
from utils.protocol import COLUMNS, evaluate_class, gaussian_smooth
from utils.results import OutputError, write_results
from utils.visualize import four_panel, read_rgb, save_rgb

__all__ = ["ClassOutputs", "PictureWriter", "evaluate_dataset", "iterate_classes",
           "write_results"]


@dataclass
class ClassOutputs:
    """Everything inference produced for the test images of one class."""
    name: str
    labels: np.ndarray            # [n] int
    masks: np.ndarray             # [n, S, S] bool
    text_scores: np.ndarray       # [n]
    maps: np.ndarray              # [n, S, S] float32, unsmoothed
    paths: list[str] = field(default_factory=list)
    species: list[str] = field(default_factory=list)


def iterate_classes(detector, loader, progress: bool = True, desc: str = "test",
                    leave: bool = True, seed: int | None = None) -> Iterator[ClassOutputs]:
    """Run the detector over a loader whose samples come class after class (as
    ``AnomalyDataset`` orders them) and yield each class's outputs once it is complete.

    ``seed``: the prompt samples come from it image by image (``models.noise.RunNoise``), so
    that a class's outputs do not depend on the other classes or the batch size; None: the
    detector draws from the torch RNG."""
    run_noise = None
    if seed is not None:
        run_noise = RunNoise(seed, detector.sample_num, detector.model.prompt_context.shape[-1])
    seen: dict[str, int] = {}                       # images of each class so far
    current: dict | None = None
    bar = tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress,
               dynamic_ncols=True, leave=leave)

    def finish(c: dict) -> ClassOutputs:
        return ClassOutputs(
            name=c["name"], labels=np.asarray(c["labels"], dtype=np.int64),
            masks=np.concatenate(c["masks"]), text_scores=np.concatenate(c["scores"]),
            maps=np.concatenate(c["maps"]), paths=c["paths"], species=c["species"])

    for batch in loader:
        names = batch["cls_name"]
        noise = None
        if run_noise is not None:
            indices = []
            for name in names:
                indices.append(seen.get(name, 0))
                seen[name] = indices[-1] + 1
            noise = run_noise.batch(list(names), indices)
        out = detector.predict(batch["image"], names, noise)
        # the one device -> host copy of the batch
        scores = out["image_score"].float().cpu().numpy()
        maps = out["anomaly_map"].float().cpu().numpy()
        masks = (batch["mask"][:, 0] > 0.5).numpy()
        for i, name in enumerate(names):
            if current is None or current["name"] != name:
                if current is not None:
                    # the per-image pieces are dropped before the class is handed over, so
                    # that they do not stay alive while its metrics are computed
                    outputs, current = finish(current), None
                    yield outputs
                    del outputs
                current = {"name": name, "labels": [], "masks": [], "scores": [], "maps": [],
                           "paths": [], "species": []}
            current["labels"].append(int(batch["label"][i]))
            current["masks"].append(masks[i:i + 1])
            current["scores"].append(scores[i:i + 1])
            current["maps"].append(maps[i:i + 1])
            current["paths"].append(batch["img_path"][i])
            current["species"].append(batch["specie_name"][i])
        bar.update(len(names))
    bar.close()
    if current is not None:
        outputs, current = finish(current), None
        yield outputs


class PictureWriter:
    """Writes the four-panel pictures of a class in a background thread, so that inference
    of the next class goes on meanwhile."""

    def __init__(self, out_dir: str, image_size: int):
        self.out_dir = out_dir
        self.image_size = image_size
        self._jobs: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, outputs: ClassOutputs, smoothed: np.ndarray, threshold: float | None
               ) -> None:
        self._jobs.put((outputs, smoothed, threshold))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            outputs, smoothed, threshold = job
            try:
                lo, hi = float(smoothed.min()), float(smoothed.max())
                for i, path in enumerate(outputs.paths):
                    image = read_rgb(path, self.image_size)
                    panel = four_panel(image, smoothed[i], outputs.masks[i], threshold, lo, hi)
                    stem = os.path.splitext(os.path.basename(path))[0]
                    save_rgb(os.path.join(self.out_dir, outputs.name, outputs.species[i],
                                          stem + ".png"), panel)
            except OSError as e:
                self._error = OutputError(f"cannot write the pictures under {self.out_dir} "
                                          f"({e.strerror or e}): free some space or pass "
                                          f"--no_vis")
            except BaseException as e:  # noqa: BLE001 - reported by close()
                self._error = e

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def evaluate_dataset(detector, loader, dataset_name: str, pro: str = "exact",
                     vis_dir: str | None = None, progress: bool = True,
                     logger: logging.Logger | None = None,
                     on_class: Callable[[str, dict], None] | None = None,
                     seed: int | None = None) -> dict[str, dict]:
    """Per-class metrics of one dataset (SPEC §7). Pictures go to ``vis_dir`` when given,
    each class's after ``on_class`` got its metrics (test.py writes the result files there, so
    that no failure while writing pictures loses them). ``seed``: see :func:`iterate_classes`."""
    rows: dict[str, dict] = {}
    writer = PictureWriter(vis_dir, detector.image_size) if vis_dir else None
    try:
        for outputs in iterate_classes(detector, loader, progress, seed=seed):
            metrics = evaluate_class(
                outputs.labels, None if is_classification_only(dataset_name) else outputs.masks,
                outputs.text_scores, outputs.maps, outputs.name, dataset_name, pro=pro)
            row = {k: metrics.get(k) for k in COLUMNS}
            rows[outputs.name] = row
            if logger:
                logger.info("%s: %s", outputs.name, ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if v is not None))
            if on_class:
                on_class(outputs.name, row)
            if writer:
                smoothed = metrics.get("smoothed_maps")
                if smoothed is None:   # classification-only datasets: maps not scored
                    smoothed = gaussian_smooth(torch.from_numpy(outputs.maps)).numpy()
                writer.submit(outputs, smoothed, row.get("threshold"))
                del smoothed
            # the next class is inferred without this one's arrays (the picture writer keeps
            # its own references until its pictures are written)
            del outputs, metrics
    finally:
        if writer:
            writer.close()
    return rows
