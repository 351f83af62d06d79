"""Zero-shot evaluation of one dataset: inference class by class, the per-class protocol,
pictures and result files. ``test.py`` and the demo call this."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from tqdm import tqdm

from dataset.registry import is_classification_only
from models.noise import RunNoise
from utils.checks import mask_warnings
from utils.distributed import is_main
from utils.distributed_eval import ClassShards, for_each_class
from utils.pictures import PictureWriter, picture_names
from utils.protocol import COLUMNS, evaluate_class, gaussian_smooth
from utils.provenance import class_counts
from utils.results import write_results

log = logging.getLogger(__name__)
__all__ = ["ClassOutputs", "PictureWriter", "evaluate_dataset", "evaluate_runs",
           "iterate_classes", "iterate_runs", "reference_banks", "write_results"]


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
    """The per-image pieces of one class in one run, until the class is complete. With the
    class's ``size`` known, the arrays are allocated once and each image is written in place
    (no copy when the class is handed over)."""

    ARRAYS = ("masks", "scores", "maps", "stds")

    def __init__(self, name: str, size: int | None = None):
        self.name = name
        self.size = size
        self.count = 0                                  # images added
        self.parts: dict[str, list] = {k: [] for k in ("labels", "masks", "scores", "maps",
                                                        "stds", "paths", "species")}
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, **pieces) -> None:
        """One image's pieces (all in one call: the arrays are written at its position)."""
        for key, value in pieces.items():
            if self.size is not None and key in self.ARRAYS:
                if key not in self.arrays:
                    self.arrays[key] = np.empty((self.size,) + value.shape[1:], value.dtype)
                self.arrays[key][self.count:self.count + len(value)] = value
            else:
                self.parts[key].append(value)
        if "labels" in pieces:
            self.count += 1

    def _array(self, key: str) -> np.ndarray | None:
        if key in self.arrays:
            return self.arrays[key][:self.count]
        return np.concatenate(self.parts[key]) if self.parts[key] else None

    def finish(self) -> ClassOutputs:
        p = self.parts
        return ClassOutputs(
            name=self.name, labels=np.asarray(p["labels"], dtype=np.int64),
            masks=self._array("masks"), text_scores=self._array("scores"),
            maps=self._array("maps"), paths=p["paths"], species=p["species"],
            maps_std=self._array("stds"))


RunKey = Hashable     # a sampling seed, or (sampling seed, shot seed) with references


def _batch_fewshot(detector, tokens: list[torch.Tensor], names: list[str],
                   banks: dict[str, dict]) -> dict:
    """{shot seed: few-shot maps [B, S, S]} of a batch, each image against its own class's
    bank (a batch can hold the end of one class and the start of the next)."""
    out: dict = {}
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        sub = [t[rows] for t in tokens]
        for shot, bank in banks[name].items():
            fs = detector.fewshot(sub, bank)                               # [b, S, S]
            if shot not in out:
                out[shot] = fs.new_empty((len(names),) + fs.shape[1:])
            out[shot][rows] = fs
    return out


def iterate_runs(detector, loader, seeds: Sequence[int | None], progress: bool = True,
                 desc: str = "test", leave: bool = True, return_std: bool = False,
                 references: Callable[[str], dict] | None = None,
                 on_high_bit: Callable[[str, int], None] | None = None,
                 first_index: dict[str, int] | None = None,
                 keys: Sequence | None = None,
                 counts: dict[str, int] | None = None) -> Iterator[dict]:
    """Run the detector over a loader whose samples come class after class (as
    ``AnomalyDataset`` orders them), once per seed, and yield {run: ClassOutputs} for each
    class once it is complete. The frozen image tower runs once per image for all runs (its
    output does not depend on them); each run's outputs equal those of a run of it alone.

    A seed draws the prompt samples image by image (``models.noise.RunNoise``), so a class's
    outputs depend neither on the other classes nor on the batch size; the seed None: the
    detector draws from the torch RNG. ``return_std``: the per-pixel spread too.

    ``references(class name) -> {shot seed: ReferenceBank}``: the few-shot mode; the runs are
    then every (seed, shot seed) pair, a class's banks are built when its first image comes
    and each image's few-shot map is computed once for all seeds. ``on_high_bit(class, n)``:
    called for each class with the number of its files of more than 8 bits read officially.
    ``first_index[class]``: the index within its class of the loader's first image of it (a
    process's share of the class, utils.distributed_eval.ClassShards; default 0). ``keys``:
    the runs, when known beforehand (else the seeds, or the (seed, shot seed) pairs of the
    first class's banks). ``counts[class]``: the loader's number of images of each class, so
    that a class is handed over with its last image (else with the next class's first)."""
    dim = detector.model.prompt_context.shape[-1]
    noises = {s: None if s is None else RunNoise(s, detector.sample_num, dim) for s in seeds}
    banks: dict[str, dict] = {}                     # class -> shot seed -> bank
    keys = list(keys) if keys is not None else (None if references else list(seeds))
    seen: dict[str, int] = {}                       # images of each class so far
    high_bit: dict[str, int] = {}
    current: dict | None = None                     # run -> _ClassBuffer
    sampler = getattr(loader, "sampler", None)
    bar = tqdm(total=len(sampler if sampler is not None else loader.dataset), desc=desc, unit="img", disable=not progress,
               dynamic_ncols=True, leave=leave)

    def finish() -> dict:
        name = next(iter(current.values())).name
        if on_high_bit is not None:
            on_high_bit(name, high_bit.pop(name, 0))
        banks.pop(name, None)                       # the bank is not needed any more
        return {k: b.finish() for k, b in current.items()}

    for batch in loader:
        done = 0                                    # images of the batch already counted
        names = list(batch["cls_name"])
        flags = batch["high_bit_depth"].tolist() if "high_bit_depth" in batch else [0] * len(names)
        indices = []
        for name, flag in zip(names, flags):
            indices.append(seen.get(name, (first_index or {}).get(name, 0)))
            seen[name] = indices[-1] + 1
            high_bit[name] = high_bit.get(name, 0) + int(flag)
        features, tokens = detector.encode_images(batch["image"].to(detector.device))
        fewshot: dict = {}
        if references is not None:
            for name in dict.fromkeys(names):
                if name not in banks:
                    banks[name] = references(name)
            fewshot = _batch_fewshot(detector, tokens, names, banks)
            if keys is None:
                keys = [(seed, shot) for seed in seeds for shot in fewshot]
        by_seed: dict = {}          # a seed's runs share its prompt samples, text and maps
        for key in keys:
            seed, shot = key if references is not None else (key, None)
            by_seed.setdefault(seed, {})[key] = fewshot.get(shot)
        outs = {}
        for seed, shots in by_seed.items():
            run_noise = noises[seed]
            noise = None if run_noise is None else run_noise.batch(names, indices)
            for key, out in detector.forward_features_shots(features, tokens, names, shots,
                                                            noise, return_std).items():
                # the one device -> host copy of the batch
                outs[key] = {k: out[k].float().cpu().numpy() for k in
                             ("image_score", "anomaly_map", "anomaly_map_std") if k in out}
        masks = (batch["mask"][:, 0] > 0.5).numpy()
        for i, name in enumerate(names):
            if current is None or next(iter(current.values())).name != name:
                if current is not None:
                    # the per-image pieces are dropped before the class is handed over, so
                    # that they do not stay alive while its metrics are computed
                    finished, current = finish(), None
                    yield finished
                    del finished
                size = None if counts is None else counts.get(name)
                current = {key: _ClassBuffer(name, size) for key in keys}
            for key, buffer in current.items():
                out = outs[key]
                spread = ({"stds": out["anomaly_map_std"][i:i + 1]}
                          if "anomaly_map_std" in out else {})
                buffer.add(labels=int(batch["label"][i]), masks=masks[i:i + 1],
                           scores=out["image_score"][i:i + 1], maps=out["anomaly_map"][i:i + 1],
                           paths=batch["img_path"][i], species=batch["specie_name"][i],
                           **spread)
            if counts is not None and next(iter(current.values())).count == counts.get(name):
                # the class's last image: handed over now, not with the next class's first
                bar.update(i + 1 - done)
                done = i + 1
                finished, current = finish(), None
                yield finished
                del finished
        bar.update(len(names) - done)
    bar.close()
    if current is not None:
        finished, current = finish(), None
        yield finished


def iterate_classes(detector, loader, progress: bool = True, desc: str = "test",
                    leave: bool = True, seed: int | None = None, return_std: bool = False
                    ) -> Iterator[ClassOutputs]:
    """One run of :func:`iterate_runs`: each class's outputs once it is complete."""
    for outputs in iterate_runs(detector, loader, [seed], progress, desc, leave, return_std):
        yield outputs[seed]


def run_label(key) -> str:
    """A run of several: "seed S" or "seed S, shot seed T"."""
    return f"seed {key[0]}, shot seed {key[1]}" if isinstance(key, tuple) else f"seed {key}"


def evaluate_runs(detector, loader, dataset_name: str, seeds: Sequence[int | None],
                  pro: str = "exact", vis_dir: str | None = None, progress: bool = True,
                  logger: logging.Logger | None = None,
                  on_class: Callable[[str, dict], None] | None = None,
                  save_uncertainty: bool = False,
                  references: Callable[[str], dict] | None = None, device=None,
                  shot_seeds: Sequence[int] | None = None) -> dict:
    """Per-class metrics of one dataset (SPEC §7) for each run: {run: {class: row}}, the
    image tower shared by the runs (:func:`iterate_runs`); a run is a seed, or with
    ``references`` (class -> {shot seed: ReferenceBank}) a (seed, shot seed) pair.
    ``on_class(name, {run: row})`` gets each class's metrics before its pictures are written
    (test.py writes the result files there, so that no failure while writing pictures loses
    them). Pictures (the first run's; with ``save_uncertainty`` a fifth panel of the per-pixel
    spread) go to ``vis_dir`` when given, written by worker processes
    (utils.pictures.PictureWriter). ``device``: where the class metrics run (default: the
    detector's device).

    Without ground truth (the loader's dataset ``classification_only``: the registry's
    classification-only datasets, or a folder dataset without masks) the pixel metrics are
    n/a; the registry's classification-only datasets also score images by the text score
    alone (the official protocol), the others by the fused score.

    Across processes (torchrun; the loader's sampler a ``utils.distributed_eval.ClassShards``,
    ``shot_seeds`` given with ``references``): each rank infers its share of every class, rank
    0 computes the metrics of the gathered class (the runs it returns; other ranks return {})
    and calls ``on_class``, and each rank writes its own images' pictures."""
    runs: dict = {}
    device = detector.device if device is None else device
    writer = None      # started with the first pictures: after the loader's workers
    # the registry's protocol of a dataset name (text scores only for the classification-only
    # datasets), unless the data are a folder's, whose meta file states its own facts
    protocol = "" if getattr(loader.dataset, "from_folder", False) else dataset_name
    text_only = is_classification_only(protocol)
    masks_used = not getattr(loader.dataset, "classification_only", text_only)
    say = logger or log                 # warnings go to the run's log when it has one
    shards = getattr(loader, "sampler", None)
    shards = shards if isinstance(shards, ClassShards) else None

    def high_bit(name: str, count: int) -> None:
        if count:
            say.warning("%s: %d image file(s) of more than 8 bits per channel read as the "
                        "official code reads them (Pillow's conversion to RGB clips 16-bit "
                        "values at 255)", name, count)

    def score(by_run: dict) -> dict:
        """The metrics of one class in every run: {"rows": {run: row}, "threshold",
        "colour_range", "smoothed"} (the first run's picture settings and smoothed maps)."""
        rows, first = {}, None
        for key, outputs in by_run.items():
            metrics = evaluate_class(outputs.labels, outputs.masks if masks_used else None,
                                     outputs.text_scores, None if text_only else outputs.maps,
                                     outputs.name, protocol, pro=pro, device=device)
            rows[key] = runs.setdefault(key, {})[outputs.name] = {
                k: metrics.get(k) for k in COLUMNS}
            if logger:
                logger.info("%s%s: %s", outputs.name,
                            "" if len(by_run) == 1 else f" ({run_label(key)})", ", ".join(
                                f"{k} {v:.4f}" for k, v in rows[key].items() if v is not None))
            if first is None:
                smoothed = metrics.get("smoothed_maps")
                if smoothed is None and vis_dir:   # maps not scored (classification-only)
                    smoothed = gaussian_smooth(torch.from_numpy(outputs.maps)).numpy()
                first = {"threshold": rows[key].get("threshold"), "smoothed": smoothed,
                         "colour_range": None if smoothed is None or not vis_dir else (
                             float(smoothed.min()), float(smoothed.max()))}   # pictures
                for line in mask_warnings(outputs.name, outputs.labels,
                                          outputs.masks if masks_used else None):
                    say.warning("%s", line)
            del metrics
        return {"rows": rows, **first}

    def pictures(part: dict, threshold, colour_range, smoothed=None) -> None:
        nonlocal writer
        outputs = next(iter(part.values()))
        if smoothed is None:                      # this rank's share of the class
            smoothed = gaussian_smooth(torch.from_numpy(outputs.maps)).numpy()
        samples = getattr(loader.dataset, "samples", None)
        writer = writer or PictureWriter(vis_dir, detector.image_size,
                                         names=picture_names(samples) if samples else None)
        writer.submit(outputs, smoothed, threshold, colour_range)

    local = iterate_runs(detector, loader, seeds, progress,
                         return_std=bool(vis_dir) and save_uncertainty, references=references,
                         on_high_bit=high_bit,
                         first_index=None if shards is None else shards.offsets,
                         keys=_run_keys(seeds, references, shot_seeds),
                         counts=shards.counts if shards is not None else _class_counts(loader))
    try:
        if shards is None:
            for by_run in local:
                scored = score(by_run)
                if on_class:
                    on_class(next(iter(by_run.values())).name, scored["rows"])
                if vis_dir:
                    pictures(by_run, scored["threshold"], scored["colour_range"],
                             scored["smoothed"])
                # the next class is inferred without this one's arrays (the picture writer
                # keeps its own references until its pictures are handed to its processes)
                del by_run, scored
        else:
            def shared(whole: dict) -> dict:
                scored = score(whole)
                return {k: scored[k] for k in ("rows", "threshold", "colour_range")}

            def handle(name: str, part: dict | None, scored: dict | None) -> None:
                if scored is None:                    # no rank has an image of the class
                    return
                if on_class and is_main():
                    on_class(name, scored["rows"])
                if vis_dir and part is not None:
                    pictures(part, scored["threshold"], scored["colour_range"])

            for_each_class(local, shards.class_names, _run_keys(seeds, references, shot_seeds),
                           shared, handle, finish=lambda: writer.close() if writer else None)
    except BaseException:
        if writer:
            writer.abort()      # the error at hand is the one to report
        raise
    if writer:
        writer.close()
    return runs


def _class_counts(loader) -> dict[str, int] | None:
    """The images of each class a loader yields when it reads a whole dataset in order (an
    ``AnomalyDataset`` with its default sampler), else None."""
    samples = getattr(loader.dataset, "samples", None)
    if samples is None or not isinstance(getattr(loader, "sampler", None), SequentialSampler):
        return None
    return class_counts(samples)


def _run_keys(seeds: Sequence, references, shot_seeds: Sequence[int] | None) -> list | None:
    """The runs: the seeds, or (seed, shot seed) pairs; None when the shot seeds are known only
    from the first class's banks (one process)."""
    if references is None:
        return list(seeds)
    if shot_seeds is None:
        return None
    return [(seed, shot) for seed in seeds for shot in shot_seeds]


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


def reference_banks(detector, dataset, drawn: dict) -> Callable[[str], dict]:
    """The few-shot banks of test.py: ``drawn`` {shot seed: {class: reference paths}} (from
    ``dataset.shots.draw_references``) -> a function class -> {shot seed: ReferenceBank},
    each reference read as the dataset reads its images."""
    def banks(name: str) -> dict:
        out = {}
        for shot, per_class in drawn.items():
            images = torch.stack([dataset.input_of(path) for path in per_class[name]])
            out[shot] = dataclasses.replace(detector.reference_bank(images),
                                            paths=tuple(per_class[name]))
        return out

    return banks
