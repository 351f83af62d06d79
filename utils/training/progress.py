"""Progress display: the run's log (console and ``train.log``) and running losses on a
progress bar without making the host wait."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger("bayes_pfl.train")


class RunLog:
    """Log lines of the main process, to the console and to ``<save_path>/train.log``."""

    def __init__(self, main: bool):
        self.main = main
        self._handler: logging.Handler | None = None

    def open(self, save_path: str) -> None:
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
        if self.main:
            os.makedirs(save_path, exist_ok=True)
            handler = logging.FileHandler(os.path.join(save_path, "train.log"))
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                   "%Y-%m-%d %H:%M:%S"))
            log.addHandler(handler)
            self._handler = handler

    def close(self) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def info(self, message: str) -> None:
        if self.main:
            log.info(message)

    def warning(self, message: str) -> None:
        if self.main:
            log.warning(message)

    def epoch(self, record: dict, skipped: list[str]) -> None:
        """One epoch's losses, figures, per-class figures and learning rates."""
        losses = " ".join(f"{k}={v:.4f}" for k, v in record["losses"].items())
        lrs = " ".join(f"{k}={v:.3g}" for k, v in record["lr"].items())
        self.info(f"epoch {record['epoch']} stage {record['stage']}: {losses} | pixel AP "
                  f"{record['pixel_ap']:.4f} image AP {record['image_ap']:.4f} | lr {lrs}")
        for name, figures in record["per_class"].items():
            text = " ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in figures.items())
            self.info(f"  {name}: {text}")
        for line in skipped:
            self.info(f"  {line}")


class RunningLosses:
    """Running mean losses on a progress bar, without making the host wait for the device:
    each update copies the sums to the host without blocking (on CUDA, into pinned memory,
    with an event recorded after the copy) and shows the latest copy that has arrived, so the
    figures may lag one update behind. On the CPU they are shown at once."""

    def __init__(self, bar, device: torch.device):
        self.bar = bar
        self.device = device
        self.pending: list[tuple[list[str], torch.Tensor, int, Any]] = []

    def update(self, sums: dict[str, torch.Tensor], count: int) -> None:
        keys = list(sums)
        values = torch.stack([sums[k] for k in keys]).detach()
        if self.device.type != "cuda":
            self._show(keys, values, count)
            return
        event = torch.cuda.Event()
        host = values.to("cpu", non_blocking=True)
        event.record()
        self.pending.append((keys, host, count, event))
        ready = None
        while self.pending and self.pending[0][3].query():   # query() does not wait
            ready = self.pending.pop(0)
        if ready is not None:
            self._show(*ready[:3])

    def _show(self, keys: list[str], values: torch.Tensor, count: int) -> None:
        self.bar.set_postfix({k.replace("loss_", ""): f"{v / count:.4f}"
                              for k, v in zip(keys, values.tolist())})


def progress_bar(progress: Callable | None, iterable, desc: str, **kwargs):
    """``progress(iterable, desc=..., **kwargs)`` (e.g. tqdm), or the iterable itself."""
    if progress is None:
        return iterable
    return progress(iterable, desc=desc, **kwargs)
