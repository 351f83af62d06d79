"""Zero-shot evaluation of one dataset: inference class by class, the per-class protocol,
pictures and result files. ``test.py`` and the demo call this."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dataset.registry import is_classification_only
from models.noise import RunNoise
from utils.pictures import PictureWriter
from utils.protocol import COLUMNS, evaluate_class, gaussian_smooth
from utils.results import write_results

__all__ = ["ClassOutputs", "PictureWriter", "evaluate_dataset", "evaluate_runs",
           "iterate_classes", "iterate_runs", "write_results"]


@dataclass
class ClassOutputs:
    """Everything inference produced for the test images of one class (one run)."""
    name: str
    labels: np.ndarray            # [n] int
    masks: np.ndarray             # [n, S, S] bool
    text_scores: np.ndarray       # [n]
    maps: np.ndarray              # [n, S, S] float32, unsmoothed
    paths: list[str] = field(default_factory=list)
    species: list[str] = field(default_factory=list)
    maps_std: np.ndarray | None = None   # [n, S, S] spread over the samples (on request)


class _ClassBuffer:
    """The per-image pieces of one class in one run, until the class is complete."""

    def __init__(self, name: str):
        self.name = name
        self.parts: dict[str, list] = {k: [] for k in ("labels", "masks", "scores", "maps",
                                                        "stds", "paths", "species")}

    def add(self, **pieces) -> None:
        for key, value in pieces.items():
            self.parts[key].append(value)

    def finish(self) -> ClassOutputs:
        p = self.parts
        return ClassOutputs(
            name=self.name, labels=np.asarray(p["labels"], dtype=np.int64),
            masks=np.concatenate(p["masks"]), text_scores=np.concatenate(p["scores"]),
            maps=np.concatenate(p["maps"]), paths=p["paths"], species=p["species"],
            maps_std=np.concatenate(p["stds"]) if p["stds"] else None)


def iterate_runs(detector, loader, seeds: Sequence[int | None], progress: bool = True,
                 desc: str = "test", leave: bool = True, return_std: bool = False
                 ) -> Iterator[dict]:
    """Run the detector over a loader whose samples come class after class (as
    ``AnomalyDataset`` orders them), once per seed, and yield {seed: ClassOutputs} for each
    class once it is complete. The frozen image tower runs once per image for all seeds (its
    output does not depend on them); each seed's outputs equal those of a run with it alone.

    A seed draws the prompt samples image by image (``models.noise.RunNoise``), so a class's
    outputs depend neither on the other classes nor on the batch size; the seed None: the
    detector draws from the torch RNG. ``return_std``: the per-pixel spread too."""
    dim = detector.model.prompt_context.shape[-1]
    noises = {s: None if s is None else RunNoise(s, detector.sample_num, dim) for s in seeds}
    seen: dict[str, int] = {}                       # images of each class so far
    current: dict | None = None                     # seed -> _ClassBuffer
    bar = tqdm(total=len(loader.dataset), desc=desc, unit="img", disable=not progress,
               dynamic_ncols=True, leave=leave)
    for batch in loader:
        names = list(batch["cls_name"])
        indices = []
        for name in names:
            indices.append(seen.get(name, 0))
            seen[name] = indices[-1] + 1
        features, tokens = detector.encode_images(batch["image"].to(detector.device))
        outs = {}
        for seed, run_noise in noises.items():
            noise = None if run_noise is None else run_noise.batch(names, indices)
            out = detector.forward_features(features, tokens, names, noise, return_std)
            # the one device -> host copy of the batch
            outs[seed] = {k: out[k].float().cpu().numpy()
                          for k in ("image_score", "anomaly_map", "anomaly_map_std") if k in out}
        masks = (batch["mask"][:, 0] > 0.5).numpy()
        for i, name in enumerate(names):
            if current is None or next(iter(current.values())).name != name:
                if current is not None:
                    # the per-image pieces are dropped before the class is handed over, so
                    # that they do not stay alive while its metrics are computed
                    finished, current = {s: b.finish() for s, b in current.items()}, None
                    yield finished
                    del finished
                current = {seed: _ClassBuffer(name) for seed in seeds}
            for seed, buffer in current.items():
                out = outs[seed]
                buffer.add(labels=int(batch["label"][i]), masks=masks[i:i + 1],
                           scores=out["image_score"][i:i + 1], maps=out["anomaly_map"][i:i + 1],
                           paths=batch["img_path"][i], species=batch["specie_name"][i])
                if "anomaly_map_std" in out:
                    buffer.add(stds=out["anomaly_map_std"][i:i + 1])
        bar.update(len(names))
    bar.close()
    if current is not None:
        finished, current = {s: b.finish() for s, b in current.items()}, None
        yield finished


def iterate_classes(detector, loader, progress: bool = True, desc: str = "test",
                    leave: bool = True, seed: int | None = None, return_std: bool = False
                    ) -> Iterator[ClassOutputs]:
    """One run of :func:`iterate_runs`: each class's outputs once it is complete."""
    for outputs in iterate_runs(detector, loader, [seed], progress, desc, leave, return_std):
        yield outputs[seed]


def evaluate_runs(detector, loader, dataset_name: str, seeds: Sequence[int | None],
                  pro: str = "exact", vis_dir: str | None = None, progress: bool = True,
                  logger: logging.Logger | None = None,
                  on_class: Callable[[str, dict], None] | None = None,
                  save_uncertainty: bool = False, device=None) -> dict:
    """Per-class metrics of one dataset (SPEC §7) for each seed: {seed: {class: row}}, the
    image tower shared by the seeds (:func:`iterate_runs`). ``on_class(name, {seed: row})``
    gets each class's metrics before its pictures are written (test.py writes the result
    files there, so that no failure while writing pictures loses them). Pictures (the first
    seed's; with ``save_uncertainty`` a fifth panel of the per-pixel spread) go to
    ``vis_dir`` when given, written by worker processes (utils.pictures.PictureWriter).
    ``device``: where the class metrics run (default: the detector's device)."""
    runs: dict = {seed: {} for seed in seeds}
    device = detector.device if device is None else device
    writer = None      # started with the first pictures: after the loader's workers
    masks_used = not is_classification_only(dataset_name)
    try:
        for by_seed in iterate_runs(detector, loader, seeds, progress,
                                    return_std=bool(vis_dir) and save_uncertainty):
            rows, first = {}, None
            for seed, outputs in by_seed.items():
                metrics = evaluate_class(outputs.labels, outputs.masks if masks_used else None,
                                         outputs.text_scores, outputs.maps, outputs.name,
                                         dataset_name, pro=pro, device=device)
                rows[seed] = runs[seed][outputs.name] = {k: metrics.get(k) for k in COLUMNS}
                if logger:
                    logger.info("%s%s: %s", outputs.name,
                                "" if len(seeds) == 1 else f" (seed {seed})", ", ".join(
                                    f"{k} {v:.4f}" for k, v in rows[seed].items()
                                    if v is not None))
                if first is None:
                    first = (outputs, metrics.get("smoothed_maps"), rows[seed])
                del metrics
            name = next(iter(by_seed.values())).name
            if on_class:
                on_class(name, rows)
            if vis_dir:
                outputs, smoothed, row = first
                if smoothed is None:   # classification-only datasets: maps not scored
                    smoothed = gaussian_smooth(torch.from_numpy(outputs.maps)).numpy()
                writer = writer or PictureWriter(vis_dir, detector.image_size)
                writer.submit(outputs, smoothed, row.get("threshold"))
            # the next class is inferred without this one's arrays (the picture writer keeps
            # its own references until its pictures are handed to its processes)
            del by_seed, first
    except BaseException:
        if writer:
            writer.abort()      # the error at hand is the one to report
        raise
    if writer:
        writer.close()
    return runs


def evaluate_dataset(detector, loader, dataset_name: str, pro: str = "exact",
                     vis_dir: str | None = None, progress: bool = True,
                     logger: logging.Logger | None = None,
                     on_class: Callable[[str, dict], None] | None = None,
                     seed: int | None = None) -> dict[str, dict]:
    """Per-class metrics of one dataset, one run (see :func:`evaluate_runs`): {class: row};
    ``on_class(name, row)``."""
    def one(name: str, rows: dict) -> None:
        if on_class:
            on_class(name, rows[seed])

    return evaluate_runs(detector, loader, dataset_name, [seed], pro, vis_dir, progress, logger,
                         one)[seed]
