"""The picture processes (utils.pictures): the same PNGs as drawing them in one process, and
every failure of a worker ending the run in one line, without a hang."""

import os
import time

import cv2
import numpy as np
import pytest

from tests import picture_faults
from utils import pictures
from utils.evaluate import ClassOutputs
from utils.pictures import PictureWriter, class_jobs, draw
from utils.results import OutputError
from utils.visualize import four_panel, read_rgb, save_rgb

SIZE = 40


def _class(tmp_path, name="wood", n=5, seed=0, spread=False):
    """A class of n images on disk (sizes other than SIZE, so that they are resized) with
    masks, smoothed maps and, on request, spreads."""
    rng = np.random.default_rng(seed)
    paths, species = [], []
    for i in range(n):
        path = str(tmp_path / "images" / f"{name}_{i:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        side = int(rng.integers(30, 70))
        cv2.imwrite(path, rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8))
        paths.append(path)
        species.append("good" if i % 2 else "crack")
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    masks[::2, 5:17, 9:20] = True
    smoothed = (rng.random((n, SIZE, SIZE)) * 0.3 + 0.5 * masks).astype(np.float32)
    outputs = ClassOutputs(name=name, labels=(np.arange(n) % 2 == 0).astype(np.int64),
                           masks=masks, text_scores=rng.random(n), maps=smoothed.copy(),
                           paths=paths, species=species,
                           maps_std=(rng.random((n, SIZE, SIZE)) * 0.3).astype(np.float32)
                           if spread else None)
    return outputs, smoothed


def _single_process(outputs, smoothed, threshold, out_dir):
    """The pictures as one process drew them before: per image, read, four panels, save."""
    lo, hi = float(smoothed.min()), float(smoothed.max())
    for i, path in enumerate(outputs.paths):
        image = read_rgb(path, SIZE)
        spread = None if outputs.maps_std is None else outputs.maps_std[i]
        panel = four_panel(image, smoothed[i], outputs.masks[i], threshold, lo, hi, spread)
        stem = os.path.splitext(os.path.basename(path))[0]
        save_rgb(os.path.join(out_dir, outputs.name, outputs.species[i], stem + ".png"), panel)


def _pngs(root):
    found = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            found[os.path.relpath(path, root)] = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return found


def test_pictures_equal_those_of_one_process(tmp_path):
    classes = [(_class(tmp_path, "wood", seed=0), 0.41),
               (_class(tmp_path, "pill", seed=1, spread=True), 0.6),
               (_class(tmp_path, "mesh", n=3, seed=2), None)]       # no threshold: no cut
    writer = PictureWriter(str(tmp_path / "pool"), SIZE, workers=2, queue_size=1)
    for (outputs, smoothed), threshold in classes:
        writer.submit(outputs, smoothed, threshold)
    writer.close()
    assert writer.submitted == 13
    for (outputs, smoothed), threshold in classes:
        _single_process(outputs, smoothed, threshold, str(tmp_path / "one"))
    pool, one = _pngs(tmp_path / "pool"), _pngs(tmp_path / "one")
    assert sorted(pool) == sorted(one) and len(one) == 13
    assert os.path.join("pill", "crack", "pill_000.png") in one
    for name in one:
        assert pool[name].shape == one[name].shape
        assert np.array_equal(pool[name], one[name]), name
    assert one[os.path.join("pill", "good", "pill_001.png")].shape == (SIZE, 5 * SIZE, 3)


def test_jobs_carry_the_class_scale_and_the_exact_mask(tmp_path):
    outputs, smoothed = _class(tmp_path)
    jobs = list(class_jobs(outputs, smoothed, 0.4, "out"))
    assert [j.out_path for j in jobs][:2] == [os.path.join("out", "wood", "crack", "wood_000.png"),
                                              os.path.join("out", "wood", "good", "wood_001.png")]
    for i, job in enumerate(jobs):
        assert (job.lo, job.hi) == (float(smoothed.min()), float(smoothed.max()))
        assert np.array_equal(job.mask(), outputs.masks[i]) and job.mask().dtype == bool
        assert job.mask_bits.nbytes == SIZE * SIZE // 8
        assert np.array_equal(job.smoothed, smoothed[i]) and job.smoothed.dtype == np.float32
    panel = draw(jobs[0], SIZE)
    assert panel.shape == (SIZE, 4 * SIZE, 3) and panel.dtype == np.uint8


def _ends_within(writer, outputs, smoothed, seconds=60):
    """Submit classes until the writer raises, then close; (the error, seconds taken)."""
    start = time.perf_counter()
    with pytest.raises(BaseException) as caught:
        try:
            for _ in range(20):
                writer.submit(outputs, smoothed, 0.4)
                time.sleep(0.05)
            writer.close()
        finally:
            writer.abort()
    took = time.perf_counter() - start
    assert took < seconds
    return caught.value, took


def test_a_full_disk_is_the_one_line_of_today(tmp_path, monkeypatch):
    outputs, smoothed = _class(tmp_path)
    monkeypatch.setattr(pictures, "save_rgb", picture_faults.disk_full)   # what workers get
    out = str(tmp_path / "vis")
    error, _ = _ends_within(PictureWriter(out, SIZE, workers=1), outputs, smoothed)
    assert isinstance(error, OutputError)
    assert str(error) == (f"cannot write the pictures under {out} (No space left on device): "
                          f"free some space or pass --no_vis")


def test_a_worker_that_raises_ends_the_run_with_its_traceback(tmp_path):
    outputs, smoothed = _class(tmp_path)
    writer = PictureWriter(str(tmp_path / "vis"), SIZE, workers=1, save=picture_faults.broken)
    error, _ = _ends_within(writer, outputs, smoothed)
    assert isinstance(error, ValueError) and "cannot be written" in str(error)
    assert "picture_faults.py" in str(error.__cause__)      # the worker's own traceback
    writer.close()                                          # closed already: nothing more


def test_a_killed_worker_ends_the_run_in_one_line(tmp_path):
    outputs, smoothed = _class(tmp_path)
    out = str(tmp_path / "vis")
    writer = PictureWriter(out, SIZE, workers=1, save=picture_faults.killed)
    error, _ = _ends_within(writer, outputs, smoothed)
    assert isinstance(error, OutputError)
    assert str(error) == (f"a picture process ended unexpectedly (exit code 9) while writing "
                          f"under {out}: rerun (with more free memory), or pass --no_vis")


def test_hand_over_waits_for_room_and_abort_does_not_wait(tmp_path):
    outputs, smoothed = _class(tmp_path, n=2)
    writer = PictureWriter(str(tmp_path / "vis"), SIZE, workers=1, queue_size=1,
                           pending_classes=1, save=picture_faults.slow)
    for _ in range(4):                    # 8 pictures of 0.5 s, 1 class + 1 image waiting
        writer.submit(outputs, smoothed, 0.4)
    assert writer.waited_s > 0.5
    start = time.perf_counter()
    writer.abort()                        # pictures still queued: stopped, not awaited
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="at least one worker"):
        PictureWriter(str(tmp_path / "vis"), SIZE, workers=0)
    assert pictures.default_picture_workers() == min(2, len(os.sched_getaffinity(0)))
