"""Evaluation across processes: ``torchrun --nproc_per_node N test.py ...``.

Each class's test images are split over the ranks in contiguous blocks (rank r takes images
``n r / N`` to ``n (r + 1) / N`` of a class of n, classes in order, :class:`ClassShards`), so
that every rank scores its share with the same per-image draws as one process (the noise
comes from the seed, the class and the image's index within its class, ``RunNoise``), and the
ranks' outputs put side by side in rank order are the class's outputs in the one-process order.
Class by class, the ranks' outputs are gathered on rank 0, which computes the class metrics
(on exactly the arrays one process would have) and writes the result files; it sends every rank
the class's picture threshold and colour range, and each rank writes the pictures of its own
images.

No rank is left waiting for another that failed: every class starts with an agreement in which
each rank says whether its share failed (a user error's one line, or an exception), rank 0's
metrics come with their own error, and all ranks then raise the same one line.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from models.errors import UserError
from utils import distributed


class DistributedEvaluationError(UserError):
    """One rank's failure, raised on every rank with the same one line."""


class ClassShards(Sampler):
    """This process's share of a dataset ordered class by class: for each class (in the
    dataset's order) the contiguous block of its images ``[n r // N, n (r + 1) // N)``.
    ``offsets[class]`` is the index within its class of this rank's first image of it."""

    def __init__(self, class_of: Sequence[str], rank: int, world_size: int):
        blocks: dict[str, list[int]] = {}
        for index, name in enumerate(class_of):
            block = blocks.setdefault(name, [index, index])
            if block[1] != index:
                raise ValueError(f"the images of class {name!r} are not contiguous in the "
                                 f"dataset: evaluation across processes needs them class "
                                 f"after class")
            block[1] = index + 1
        self.class_names = list(blocks)
        self.indices: list[int] = []
        self.offsets: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        for name, (start, stop) in blocks.items():
            n = stop - start
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            self.indices.extend(range(start + lo, start + hi))
            self.offsets[name], self.counts[name] = lo, hi - lo

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def agree(error: str | None) -> None:
    """Every rank says whether it failed (``error``: its one line, else None); when any did,
    every rank raises DistributedEvaluationError with the first failure's line. In one
    process: raises when ``error`` is given."""
    if not distributed.is_distributed():
        if error is not None:
            raise DistributedEvaluationError(error)
        return
    said = [None] * distributed.world_size()
    torch.distributed.all_gather_object(said, error)
    failed = [(rank, line) for rank, line in enumerate(said) if line is not None]
    if failed:
        rank, line = failed[0]
        raise DistributedEvaluationError(line if rank == distributed.rank()
                                         else f"rank {rank} failed: {line}")


def failure_line(error: BaseException) -> str:
    """The one line that stands for ``error`` on every rank."""
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _concatenate(parts: list, template):
    """The ranks' ClassOutputs of one run side by side (rank order), as one ClassOutputs."""
    parts = [p for p in parts if p is not None]
    out = template.__class__(
        name=template.name,
        labels=np.concatenate([p.labels for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        text_scores=np.concatenate([p.text_scores for p in parts]),
        maps=np.concatenate([p.maps for p in parts]),
        paths=[path for p in parts for path in p.paths],
        species=[s for p in parts for s in p.species],
        maps_std=(np.concatenate([p.maps_std for p in parts])
                  if template.maps_std is not None else None))
    return out


def gather_class(part: dict | None, keys: Sequence) -> dict | None:
    """Rank 0: {run: ClassOutputs of the whole class} from every rank's ``part`` ({run:
    ClassOutputs} of its share, None when it has no image of the class); other ranks: None.
    ``keys`` lists the runs."""
    parts = [None] * distributed.world_size() if distributed.is_main() else None
    torch.distributed.gather_object(part, parts, dst=0)
    if not distributed.is_main():
        return None
    given = [p for p in parts if p is not None]
    if not given:
        return None
    return {key: _concatenate([p[key] if p is not None else None for p in parts], given[0][key])
            for key in keys}


def share(value):
    """Rank 0's ``value`` on every rank."""
    return distributed.broadcast_object(value, src=0)


def for_each_class(local: Iterator[dict], class_names: Sequence[str], keys: Sequence,
                   score: Callable[[dict], object],
                   handle: Callable[[str, dict | None, object], None],
                   finish: Callable[[], None] = lambda: None) -> None:
    """Class by class on every rank: this rank's share of the class from ``local`` (its
    {run: ClassOutputs}, or None when it has no image of it; ``local`` yields its classes in
    order, utils.evaluate.iterate_runs), the whole class gathered on rank 0 and ``score(whole)``
    computed there, then ``handle(name, share, result)`` on every rank with rank 0's result;
    ``finish()`` on every rank at the end. A failure anywhere (scoring a share, rank 0's
    scoring, a rank's ``handle`` or ``finish``) reaches every rank at the next agreement, and
    every rank raises the same one line; Ctrl-C goes through at once (torchrun stops every
    rank)."""
    pending: dict | None = None          # this rank's next class, once inferred
    exhausted = False
    error: str | None = None             # this rank's failure since the last agreement
    for name in class_names:
        part = None
        if error is None:
            try:
                if pending is None and not exhausted:
                    pending = next(local, None)       # infers this rank's next class
                    exhausted = pending is None
                if pending is not None and next(iter(pending.values())).name == name:
                    part, pending = pending, None
            except Exception as exc:  # noqa: BLE001 - every rank hears of it, then raises
                error = failure_line(exc)
        agree(error)
        whole = gather_class(part, keys)
        result, failed = None, None
        if distributed.is_main() and whole is not None:
            try:
                result = score(whole)
            except Exception as exc:  # noqa: BLE001 - shared below, raised everywhere
                failed = failure_line(exc)
        shared = share({"result": result, "error": failed})
        if shared["error"] is not None:
            raise DistributedEvaluationError(shared["error"] if distributed.is_main()
                                             else f"rank 0 failed: {shared['error']}")
        try:
            handle(name, part, shared["result"])
        except Exception as exc:  # noqa: BLE001 - reported at the next agreement
            error = failure_line(exc)
    if error is None:
        try:
            finish()
        except Exception as exc:  # noqa: BLE001 - reported below
            error = failure_line(exc)
    agree(error)
