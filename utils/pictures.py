"""The four-panel test pictures, drawn and written by a small pool of worker processes, so
that the evaluation's main process only hands each image over and goes on with the next
batch.

Per image the main process sends what only it knows: the smoothed map (float32 [S, S], the
values the panels are drawn from, so the pictures are those of a single process), the mask
as packed bits, the spread map when asked for, the class's colour range and threshold, and
the image's path; a worker reads and resizes the image itself, draws the panels
(``utils.visualize.four_panel``) and writes the PNG. A class handed over waits in the main
process (two classes at most, then the hand-over waits) while a thread there splits it into
per-image jobs for a queue of a few images.

The workers are started with 'spawn': a fresh interpreter that inherits neither torch's
thread pools and CUDA context nor the locks that other threads of the main process (the
DataLoader's pin-memory thread, progress bars, logging) may hold at the moment of a fork,
and that behaves the same on every operating system. It costs each worker its imports
(about a second) once per run.

A worker's error ends the run at the next hand-over or at ``close``: an OSError (a full
disk) as the one OutputError line naming the folder, any other exception with the worker's
traceback, a worker that died (killed) as one line; nothing waits on a dead worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from utils.cli import available_cpus
from utils.results import OutputError
from utils.visualize import four_panel, read_rgb, save_rgb

START_METHOD = "spawn"
_POLL_S = 0.2                     # how often a waiting main process looks at the workers


def default_picture_workers() -> int:
    """Picture processes by default: 2, at most the available CPUs."""
    return min(2, available_cpus())


@dataclass
class PictureJob:
    """One picture: everything a worker needs besides the image file."""
    image_path: str
    out_path: str
    smoothed: np.ndarray          # [S, S] float32, the smoothed anomaly map
    mask_bits: np.ndarray         # np.packbits of the [S, S] ground-truth mask
    threshold: float | None       # the class's F1-max threshold (None: no cut)
    lo: float                     # the class's colour range: min and max of its smoothed maps
    hi: float
    spread: np.ndarray | None = None   # [S, S] float32 per-pixel spread (a fifth panel)

    def mask(self) -> np.ndarray:
        """The ground-truth mask, bool [S, S]."""
        height, width = self.smoothed.shape
        return np.unpackbits(self.mask_bits, count=height * width).reshape(height,
                                                                           width).view(bool)


def picture_names(samples: Sequence[dict]) -> dict[str, str]:
    """{image path: picture path relative to the pictures' folder} for a dataset's samples
    (``img_path``, ``cls_name``, ``specie_name``): ``<class>/<specie>/<image stem>.png``, and
    where two images of one class and specie share a stem (in any case: folders in other
    sub-folders, or other extensions) ``<stem>_<8 hex digits of the path's SHA-1>.png`` for
    each of them, so that no picture replaces another. A function of the whole list, the same
    in every process."""
    groups: dict[tuple, set] = {}
    for sample in samples:
        path = sample["img_path"]
        stem = os.path.splitext(os.path.basename(path))[0]
        groups.setdefault((sample["cls_name"], sample["specie_name"], stem.lower()),
                          set()).add(path)
    names = {}
    for (cls, specie, _), paths in groups.items():
        for path in paths:
            stem = os.path.splitext(os.path.basename(path))[0]
            if len(paths) > 1:
                stem += "_" + _digest(path)[:8]
            names[path] = os.path.join(cls, specie, stem + ".png")
    # a name made unique may equal another image's own name (a file called x_1a2b3c4d.png):
    # those take more digits of the path's digest until every name is unique
    for digits in (16, 40):
        taken: dict[str, list[str]] = {}
        for path, name in names.items():
            taken.setdefault(name.lower(), []).append(path)
        clashes = [paths for paths in taken.values() if len(paths) > 1]
        if not clashes:
            break
        for paths in clashes:
            for path in paths:
                head, tail = os.path.split(names[path])
                stem = os.path.splitext(os.path.basename(path))[0]
                names[path] = os.path.join(head, f"{stem}_{_digest(path)[:digits]}.png")
    return names


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while the workers start, so that they inherit it ignored: a Ctrl-C then
    interrupts the main process only (which stops the workers), instead of every worker
    printing a traceback of its own from wherever its start-up was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _digest(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()


def class_jobs(outputs, smoothed: np.ndarray, threshold: float | None, out_dir: str,
               colour_range: tuple[float, float] | None = None,
               names: Mapping[str, str] | None = None) -> Iterator[PictureJob]:
    """The jobs of one class: ``outputs`` (utils.evaluate.ClassOutputs: paths, species,
    masks [n, S, S], maps_std), ``smoothed`` [n, S, S]; pictures go to ``out_dir/<name>``,
    the name ``names[image path]`` (:func:`picture_names`) or else
    ``<class>/<specie>/<image stem>.png``. ``colour_range`` (lo, hi): the class's range when
    ``outputs`` hold only part of it (one process's share), else that of ``smoothed``."""
    lo, hi = (float(smoothed.min()), float(smoothed.max())) if colour_range is None \
        else colour_range
    spreads = outputs.maps_std
    for i, path in enumerate(outputs.paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        name = (names or {}).get(path) or os.path.join(outputs.name, outputs.species[i],
                                                        stem + ".png")
        yield PictureJob(path, os.path.join(out_dir, name),
                         np.ascontiguousarray(smoothed[i], dtype=np.float32),
                         np.packbits(outputs.masks[i]), threshold, lo, hi,
                         None if spreads is None else spreads[i])


def draw(job: PictureJob, image_size: int) -> np.ndarray:
    """The picture of one job: RGB uint8 [S, 4 S, 3] (or [S, 5 S, 3] with the spread)."""
    image = read_rgb(job.image_path, image_size)
    return four_panel(image, job.smoothed, job.mask(), job.threshold, job.lo, job.hi,
                      job.spread)


class _RemoteTraceback(Exception):
    """A worker's formatted traceback, attached as the cause of the error it raised."""

    def __str__(self) -> str:
        return self.args[0]


def _portable(error: BaseException):
    """The error itself when it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"{type(error).__name__}: {error}")


def _work(jobs, reports, image_size: int, save: Callable[[str, np.ndarray], None]) -> None:
    """A worker's loop: draw and write jobs until None, then report ("done", None); an error
    is reported as ("error", (exception, traceback text)) and the loop goes on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the main process stops us
    cv2.setNumThreads(1)              # one process per core: no thread pools inside
    while True:
        job = jobs.get()
        if job is None:
            reports.put(("done", None))
            return
        try:
            save(job.out_path, draw(job, image_size))
        except BaseException as error:  # noqa: BLE001 - handed to the main process
            reports.put(("error", (_portable(error), traceback.format_exc())))


class PictureWriter:
    """Writes the four-panel pictures of each class with ``workers`` processes (default
    :func:`default_picture_workers`).

    :meth:`submit` returns at once unless ``pending_classes`` classes are already waiting (as
    many classes' arrays are held meanwhile); a thread of the main process splits them into
    per-image jobs for a queue of at most ``queue_size`` images (default 2 per worker).
    ``save(path, rgb)`` writes one picture (default ``utils.visualize.save_rgb``; it must be
    importable by the workers); ``names``: see :func:`class_jobs`."""

    def __init__(self, out_dir: str, image_size: int, workers: int | None = None,
                 queue_size: int | None = None, pending_classes: int = 2,
                 save: Callable[[str, np.ndarray], None] | None = None,
                 names: Mapping[str, str] | None = None):
        self.out_dir = out_dir
        self.names = names
        self.image_size = image_size
        workers = default_picture_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"PictureWriter needs at least one worker, not {workers}")
        context = multiprocessing.get_context(START_METHOD)
        self._jobs = context.Queue(maxsize=queue_size or 2 * workers)
        self._reports = context.Queue()
        self._classes: queue.Queue = queue.Queue(maxsize=pending_classes)
        self._error: BaseException | None = None
        self._stopping = False
        self._closed = False
        self._done = 0
        self.waited_s = 0.0           # time the main process waited for room
        self.submitted = 0            # pictures handed over
        self._workers = [
            context.Process(target=_work, name=f"pictures-{i}", daemon=True,
                            args=(self._jobs, self._reports, image_size,
                                  save_rgb if save is None else save))
            for i in range(workers)]
        with _sigint_ignored():        # Ctrl-C is the main process's to handle
            for process in self._workers:
                process.start()
        self._dispatcher = threading.Thread(target=self._dispatch, name="pictures",
                                            daemon=True)
        self._dispatcher.start()

    # ------------------------------------------------------------------------------------
    # The main thread

    def submit(self, outputs, smoothed: np.ndarray, threshold: float | None,
               colour_range: tuple[float, float] | None = None) -> None:
        """Hand the pictures of one class over (``outputs``, ``smoothed``, ``colour_range``:
        see :func:`class_jobs`; the arrays must not change afterwards); raises a worker's
        earlier error."""
        self._hand_over((outputs, smoothed, threshold, colour_range))
        self.submitted += len(outputs.paths)

    def close(self) -> None:
        """Wait until every picture is written and stop the workers; raises the first error
        of a worker (an OSError as one OutputError line)."""
        if self._closed:
            return
        try:
            self._hand_over(None)
            while self._dispatcher.is_alive():
                self._dispatcher.join(_POLL_S)
            if self._error is not None:
                raise self._error
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the workers now, pictures still queued or not (no error is raised)."""
        if self._closed:
            return
        self._closed = self._stopping = True
        for process in self._workers:
            if process.is_alive():
                process.terminate()
        for process in self._workers:
            process.join()
        self._dispatcher.join()
        for q in (self._jobs, self._reports):
            q.cancel_join_thread()    # nothing to flush into workers that are gone
            q.close()

    def _hand_over(self, item) -> None:
        start = time.perf_counter()
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._classes.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                pass
        self.waited_s += time.perf_counter() - start

    # ------------------------------------------------------------------------------------
    # The dispatching thread: classes -> per-image jobs; the workers' reports

    def _dispatch(self) -> None:
        try:
            while True:
                try:
                    item = self._classes.get(timeout=_POLL_S)
                except queue.Empty:
                    self._check(wait=False)
                    continue
                if item is None:
                    break
                outputs, smoothed, threshold, colour_range = item
                for job in class_jobs(outputs, smoothed, threshold, self.out_dir, colour_range,
                                      self.names):
                    self._put(job)
                del item
            for _ in self._workers:
                self._put(None)
            while self._done < len(self._workers):
                self._check(wait=True)
        except BaseException as error:  # noqa: BLE001 - the main thread raises it
            if self._error is None:
                self._error = error

    def _put(self, job: PictureJob | None) -> None:
        while True:
            self._check(wait=False)
            try:
                self._jobs.put(job, timeout=_POLL_S)
                return
            except queue.Full:
                pass

    def _check(self, wait: bool) -> None:
        """Read the workers' reports (with ``wait``, waiting up to a poll interval for the
        first); raise the first error, or one line for a worker that died without
        reporting."""
        if self._stopping:
            raise RuntimeError("the picture writer was stopped")
        timeout = _POLL_S if wait else None
        while True:
            try:
                kind, payload = (self._reports.get_nowait() if timeout is None
                                 else self._reports.get(timeout=timeout))
            except queue.Empty:
                break
            timeout = None
            if kind == "done":
                self._done += 1
            elif self._error is None:
                self._error = self._as_error(*payload)
        if self._error is not None:
            raise self._error
        dead = [p for p in self._workers if not p.is_alive() and p.exitcode != 0]
        if dead:
            raise OutputError(
                f"a picture process ended unexpectedly (exit code {dead[0].exitcode}) while "
                f"writing under {self.out_dir}: rerun (with more free memory), or pass "
                f"--no_vis")

    def _as_error(self, error: BaseException, trace: str) -> BaseException:
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            return OutputError(f"cannot write the pictures under {self.out_dir} "
                               f"({error.strerror or error}): free some space or pass "
                               f"--no_vis")
        error.__cause__ = _RemoteTraceback(trace)
        return error
