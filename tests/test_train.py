"""Training: optimiser groups, schedule, stage logic, resume, DDP, checkpoints, CLI, train.sh.

Tiny and CPU-only: a random 32 px CLIP (patch 8, blocks 1-4) and a few 32 px synthetic images.
"""

from __future__ import annotations

import glob
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from dataset.data import AnomalyDataset, collate, make_loader
from models import BayesPFL, load_clip
from utils.checkpoint import load_checkpoint
from utils.training import (Trainer, TrainConfig, TrainingError, ValidationResult,
                            StageController, TrainingStep, build_feature_cache, encode_images,
                            group_parameter_names, make_optimizer, make_scheduler,
                            optimisation_step, plan_data, stage_parameter_names, train, validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [1, 2, 3, 4]


def make_config(save_path, synth_root, clip_path, **overrides) -> TrainConfig:
    settings = dict(dataset="synth", train_data_path=synth_root, val_data_path=synth_root,
                    val_dataset="synth", val_classes=["pill"], save_path=str(save_path),
                    pretrained_path=clip_path, features_list=LAYERS, image_size=32,
                    batch_size=4, val_batch_size=4, epochs=3, sample_num=2, num_workers=0,
                    device="cpu", print_freq=1, seed=5, patience=1)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def clip_and_batch(tiny_files, synth_root):
    clip = load_clip(tiny_files[0], image_size=32)
    ds = AnomalyDataset(synth_root, "synth", mode="train", image_size=32,
                        class_names=["wood", "mesh"], augment=False, mosaic_prob=0.0)
    batch = collate([ds[i] for i in (0, 2, 4, 6)])
    return clip, batch


def fresh_model(clip, seed=0) -> BayesPFL:
    torch.manual_seed(seed)
    return BayesPFL.from_clip(clip, layers=LAYERS)


# ------------------------------------------------------------------------------------------------
# Optimisation pieces
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_one_step_lowers_the_loss(clip_and_batch, stage):
    clip, batch = clip_and_batch
    model = fresh_model(clip)
    step = TrainingStep(model, clip)
    cfg = TrainConfig()
    optimizer = make_optimizer(model, cfg, stage)
    g, tokens = encode_images(clip, batch["image"], LAYERS, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    noise = {"context": torch.randn(1, 4, 64, generator=gen),
             "normal": torch.randn(1, 1, 64, generator=gen),
             "abnormal": torch.randn(1, 1, 64, generator=gen)}
    args = (g, tokens, batch["cls_name"], batch["label"], batch["mask"], 1, stage)
    before = step(*args, noise=noise)["loss"].item()
    losses = optimisation_step(step, optimizer, None, *args, torch.device("cpu"), noise=noise)
    after = step(*args, noise=noise)["loss"].item()
    assert losses["loss"].item() == pytest.approx(before)
    assert after < before


def test_optimizer_groups_follow_the_official_names(clip_and_batch):
    clip, _ = clip_and_batch
    model = fresh_model(clip)
    cfg = TrainConfig(learning_rate=1e-4, learning_rate_PFL=2e-3, learning_rate_prompt=3e-3,
                      temperature_lr=0.01, learning_rate_linear=5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, cfg, 1)
    assert optimizer.defaults["betas"] == (0.5, 0.999)
    got = {g["group"]: ({names[id(p)] for p in g["params"]}, g["lr"])
           for g in optimizer.param_groups}
    flows = {f"PFL_context.{k}" for k in ("p_mu.0.weight", "p_mu.0.bias", "amor_u.weight",
                                          "amor_u.bias", "amor_w.weight", "amor_w.bias",
                                          "amor_b.weight", "amor_b.bias")}
    for which in ("PFL_normal", "PFL_abnormal"):
        flows |= {f"{which}.{k}" for k in ("amor_u", "amor_w", "amor_b", "state",
                                            "p_mu.0.weight", "p_mu.0.bias")}
    assert got["prompt"] == ({"prompt_context", "prompt_state_normal",
                              "prompt_state_abnormal"}, 3e-3)
    assert got["temperature"] == ({"temperature_pixel", "temperature_image"}, 0.01)
    assert got["PFL"] == (flows, 2e-3)
    rest, lr = got["rest"]
    assert lr == 5e-4                  # --learning_rate_linear, as officially
    assert 1e-4 not in {g["lr"] for g in optimizer.param_groups}   # --learning_rate: no effect
    assert rest == set(names.values()) - flows - got["prompt"][0] - got["temperature"][0]
    # the shared encoder and decoders sit in "rest" under their first names
    assert "context_encoder.weight_mean.module.0.weight" in rest
    assert "state_decoder.weight_mean.module.4.bias" in rest
    assert not any(n.startswith("PFL") for n in rest)
    # every parameter exactly once
    listed = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    assert group_parameter_names(model)["PFL"] == [n for n, _ in model.named_parameters()
                                                   if n in flows]

    stage2 = make_optimizer(model, cfg, 2)
    assert stage2.defaults["betas"] == (0.5, 0.999)
    (group,) = stage2.param_groups
    assert group["lr"] == 5e-4
    assert {names[id(p)].split(".")[0] for p in group["params"]} == {
        "class_mapping", "image_mapping", "fuse"}
    assert len(group["params"]) == sum(1 for n in names.values()
                                       if n.split(".")[0] in ("class_mapping", "image_mapping",
                                                              "fuse"))


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_parameters_are_exactly_those_with_gradients(clip_and_batch, stage):
    clip, batch = clip_and_batch
    model = fresh_model(clip)
    g, tokens = encode_images(clip, batch["image"], LAYERS, torch.device("cpu"))
    out = model.training_forward(clip, g, tokens, batch["cls_name"], batch["label"],
                                 batch["mask"], 0, stage)
    out["loss"].backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad == stage_parameter_names(model, stage)


def test_schedule_warmup_and_cosine():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [p], "lr": 1e-3, "group": "prompt"}])
    scheduler = make_scheduler(optimizer, total_steps=100, warmup_ratio=0.1)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(99):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3)
    assert lrs[10] == pytest.approx(1e-3)                       # warm-up end
    assert lrs[55] == pytest.approx(0.5e-3)                     # half way through the cosine
    assert lrs[99] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))  # last step
    assert max(lrs) == pytest.approx(1e-3)


# ------------------------------------------------------------------------------------------------
# Stage logic
# ------------------------------------------------------------------------------------------------


def test_stage_controller_follows_the_official_counter():
    """The official rule: the counter is compared with 3 before it is incremented, so stage 1
    switches at the 4th consecutive epoch without a better pixel AP (here after epoch 6, not 5)
    and stage 2, whose best image AP starts again at 0, stops at its 4th (after epoch 12)."""
    c = StageController(patience=3)
    stage1 = [0.1, 0.3, 0.3, 0.2, 0.25, 0.29, 0.28]  # epoch 3 ties epoch 2: counts as better
    decisions = [c.update(e, p, 0.0) for e, p in enumerate(stage1[:6], start=1)]
    assert [d.improved for d in decisions] == [True, True, True, False, False, False]
    assert [d.patience for d in decisions] == [0, 0, 0, 1, 2, 3]
    assert not any(d.switch or d.restore for d in decisions) and c.stage == 1
    last = c.update(7, stage1[6], 0.0)
    assert last.restore and last.switch and not last.stop and last.stage == 1
    assert last.patience == 4
    assert c.stage == 2 and c.switch_epoch == 7 and c.best_epoch[1] == 3 and c.best[1] == 0.3

    # stage 2 selects on image AP from 0: its first epoch improves even at 0.0
    stage2 = [0.0, 0.6, 0.55, float("nan"), 0.59, 0.58]   # NaN never improves
    decisions = [c.update(e, 0.9, i) for e, i in enumerate(stage2, start=8)]
    assert [d.improved for d in decisions] == [True, True, False, False, False, False]
    assert [d.patience for d in decisions] == [0, 0, 1, 2, 3, 4]
    assert decisions[-1].stop and not decisions[-1].restore and not decisions[-1].switch
    assert not any(d.stop for d in decisions[:-1])
    assert c.finished and c.best_epoch[2] == 9 and c.best[2] == 0.6
    with pytest.raises(RuntimeError):
        c.update(14, 0.0, 0.0)

    clone = StageController()
    clone.load_state_dict(c.state_dict())
    assert clone.state_dict() == c.state_dict()


def test_stage_controller_epochs_of_the_issue_sequence():
    """Improvements at epochs 1-2 and 7-8 only: the switch after epoch 6, the stop at 12."""
    c = StageController(patience=3)
    pixel = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.3, 5: 0.3, 6: 0.3}
    image = {7: 0.5, 8: 0.6, 9: 0.5, 10: 0.5, 11: 0.5, 12: 0.5, 13: 0.5}
    events = []
    for epoch in range(1, 14):
        d = c.update(epoch, pixel.get(epoch, 0.0), image.get(epoch, 0.0))
        events += [("switch", epoch)] * d.switch + [("stop", epoch)] * d.stop
        if c.finished:
            break
    assert events == [("switch", 6), ("stop", 12)]


class ScriptedTrainer(Trainer):
    """Validation replaced by a fixed sequence of (pixel AP, image AP) per epoch."""

    figures: dict[int, tuple[float, float]] = {}

    def validate(self, epoch):
        pixel, image = self.figures[epoch]
        return ValidationResult(pixel, image, {"pill": {"pixel_ap": pixel, "image_ap": image}})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trainer_switches_restores_and_stops(tmp_path, synth_root, tiny_files):
    """patience 2: the switch at the 3rd epoch in a row without a better pixel AP restores the
    best stage-1 parameters; the stop at the 3rd without a better image AP keeps the current
    ones."""
    cfg = make_config(tmp_path / "run", synth_root, tiny_files[0], epochs=12, patience=2)
    trainer = ScriptedTrainer(cfg, callback=lambda record: snapshots.append(_state(trainer.model)))
    trainer.figures = {1: (0.2, 0.0), 2: (0.5, 0.0), 3: (0.4, 0.0), 4: (0.45, 0.0),
                       5: (0.3, 0.0), 6: (0.0, 0.3), 7: (0.0, 0.2), 8: (0.0, 0.1),
                       9: (0.0, 0.25), 10: (0.0, 0.9)}
    snapshots: list[dict] = []
    result = trainer.run()

    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "run" / "epoch_post_*")))
    assert names == [f"epoch_post_{e}_1.pth" for e in range(1, 6)] + [
        f"epoch_post_{e}_2.pth" for e in range(6, 10)]
    assert [r["stage"] for r in result.history] == [1] * 5 + [2] * 4
    assert result.switch_epoch == 5 and result.stopped_early and result.final_stage == 2
    assert result.epochs_run == 9 and result.best_epoch == {1: 2, 2: 6}
    assert result.best_pixel_ap == 0.5 and result.best_image_ap == 0.3

    def saved(name):
        return torch.load(tmp_path / "run" / name, weights_only=True)["MyModel"]

    # epochs 3-4 kept training from their own parameters; after epoch 5, epoch 2's came back
    _assert_same(snapshots[3], saved("epoch_post_4_1.pth"))
    _assert_same(snapshots[4], saved("epoch_post_2_1.pth"))
    # stage 2 changes only class_mapping, image_mapping and fuse
    stage2_keys = {k for k in snapshots[5] if k.split(".")[0] in ("class_mapping",
                                                                   "image_mapping", "fuse")}
    for k, v in snapshots[5].items():
        assert torch.equal(v, snapshots[4][k]) == (k not in stage2_keys), k
    # the stop keeps the current parameters; best.pth holds the best stage-2 ones
    _assert_same(snapshots[8], saved("epoch_post_9_2.pth"))
    _assert_same(_state(result.model), saved("epoch_post_9_2.pth"))
    _assert_same(saved("best.pth"), saved("epoch_post_6_2.pth"))
    assert all(p.requires_grad for p in result.model.parameters())
    log = (tmp_path / "run" / "train.log").read_text()
    assert "switching to stage 2 after epoch 5" in log and "stage 2 stopped after epoch 9" in log


# ------------------------------------------------------------------------------------------------
# Full runs: resume, checkpoints, cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, synth_root, tiny_files):
    """One go of at most 10 epochs (real validation, augmentation on, patience 1): stage 1
    switches after epoch 4 and stage 2 stops after epoch 7 (the official counter: at the 2nd
    epoch in a row without improvement)."""
    save = tmp_path_factory.mktemp("straight")
    cfg = make_config(save, synth_root, tiny_files[0], epochs=10)
    return cfg, train(cfg)


def _comparable(history):
    return [{k: r[k] for k in ("epoch", "stage", "losses", "pixel_ap", "image_ap", "lr",
                               "decision")} for r in history]


def test_resume_continues_exactly(tmp_path, straight_run, synth_root, tiny_files):
    cfg, straight = straight_run
    assert [r["stage"] for r in straight.history] == [1, 1, 1, 1, 2, 2, 2]
    assert straight.switch_epoch == 4 and straight.stopped_early
    # stop inside stage 1, then right after the switch, then run to the end
    first = train(make_config(tmp_path, synth_root, tiny_files[0], epochs=10, stop_after=1))
    assert first.epochs_run == 1 and first.final_stage == 1
    last = str(tmp_path / "last.pth")
    second = train(make_config(tmp_path, synth_root, tiny_files[0], epochs=10, stop_after=4,
                               resume=last))
    assert second.epochs_run == 4 and second.final_stage == 2
    resumed = train(make_config(tmp_path, synth_root, tiny_files[0], epochs=10, resume=last))
    assert resumed.epochs_run == straight.epochs_run == 7 and resumed.stopped_early
    assert _comparable(resumed.history) == _comparable(straight.history)
    _assert_same(_state(resumed.model), _state(straight.model))
    last_a = torch.load(os.path.join(cfg.save_path, "last.pth"), weights_only=True)
    last_b = torch.load(tmp_path / "last.pth", weights_only=True)
    assert last_a["global_step"] == last_b["global_step"] == 7 * 2
    for a, b in zip(last_a["optimizer"]["state"].values(), last_b["optimizer"]["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
    # the augmentation is on, and epochs differ in data order and prompt choices
    assert straight.history[0]["losses"] != straight.history[1]["losses"]


def test_checkpoint_files(straight_run, tiny_files):
    cfg, result = straight_run
    files = sorted(os.listdir(cfg.save_path))
    assert not [f for f in files if ".tmp" in f]
    assert {"best.pth", "last.pth", "train.log", "epoch_post_1_1.pth"} <= set(files)
    assert result.checkpoints == [os.path.join(cfg.save_path, f"epoch_post_{r['epoch']}_"
                                               f"{r['stage']}.pth") for r in result.history]
    clip = load_clip(tiny_files[0], image_size=32)
    for path in result.checkpoints + [result.best_path]:
        obj = torch.load(path, weights_only=True)
        assert set(obj) == {"MyModel", "stage", "model_spec", "provenance"}
        assert len(obj["MyModel"]) == 131
        assert obj["provenance"]["data"][0]["meta_sha256"]          # what it was trained on
        assert obj["model_spec"]["layers"] == LAYERS and obj["model_spec"]["image_size"] == 32
        load_checkpoint(fresh_model(clip, seed=1), path)             # strict
    last = torch.load(os.path.join(cfg.save_path, "last.pth"), weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "controller", "remembered", "epoch",
            "global_step", "rng", "config", "history", "finished"} <= set(last)
    assert set(last["rng"]) >= {"python", "numpy", "torch"}
    assert last["epoch"] == 7 and last["finished"] and last["config"] == cfg.to_dict()
    assert last["controller"]["stage"] == result.final_stage
    _assert_same(last["model"], _state(result.model))
    load_checkpoint(fresh_model(clip, seed=1), os.path.join(cfg.save_path, "last.pth"))
    log = open(os.path.join(cfg.save_path, "train.log")).read()
    assert "arguments:" in log and "epoch 7 stage 2" in log and "pixel AP" in log and "lr " in log


def test_resume_errors(tmp_path, synth_root, tiny_files):
    with pytest.raises(TrainingError, match="not found"):
        train(make_config(tmp_path, synth_root, tiny_files[0],
                          resume=str(tmp_path / "nothing.pth")))
    with pytest.raises(TrainingError, match="not a resumable"):
        train(make_config(tmp_path, synth_root, tiny_files[0], resume=tiny_files[1]))


def _opencv_warnings(save_path) -> list[str]:
    log = (save_path / "train.log").read_text().splitlines()
    return [line for line in log if " WARNING " in line and "OpenCV" in line]


def test_training_warns_once_when_opencv_is_not_the_official_major(tmp_path, synth_root,
                                                                   tiny_files, monkeypatch):
    """The augmentation is bit-equal to the official pipeline with OpenCV 4.10 to 4.13 only: a
    run that augments with another version installed says so once, in the log; with one of
    those it says nothing."""
    import dataset.augment as augment

    monkeypatch.setattr(augment.cv2, "__version__", "5.1.0")
    result = train(make_config(tmp_path / "five", synth_root, tiny_files[0], epochs=2,
                               stop_after=1))
    assert result.epochs_run == 1
    warnings = _opencv_warnings(tmp_path / "five")
    assert len(warnings) == 1, warnings
    assert ("OpenCV 5.1.0 is installed, not OpenCV 4.10 to 4.13 (OpenCV 4, the official "
            "code's): the training augmentation is not bit-equal to the official pipeline; pip "
            "install 'opencv-python-headless>=4.10,<4.14' restores it") in warnings[0]
    monkeypatch.setattr(augment.cv2, "__version__", "4.13.0")
    train(make_config(tmp_path / "four", synth_root, tiny_files[0], epochs=2, stop_after=1))
    assert _opencv_warnings(tmp_path / "four") == []


def test_cached_features_run(tmp_path, synth_root, tiny_files, monkeypatch):
    import dataset.augment as augment

    # cached features: no augmentation runs, so no OpenCV warning even with OpenCV 5
    monkeypatch.setattr(augment.cv2, "__version__", "5.1.0")
    cfg = make_config(tmp_path, synth_root, tiny_files[0], epochs=2, stop_after=1,
                      cache_features=True,
                      cache_size=6, lr_overrides={"rest": 1e-3})
    result = train(cfg)
    assert result.epochs_run == 1 and result.history[0]["lr"]["rest"] > 1e-4
    assert _opencv_warnings(tmp_path) == []
    clip = load_clip(tiny_files[0], image_size=32)
    plain = AnomalyDataset(synth_root, "synth", mode="train", image_size=32,
                           class_names=["mesh", "wood"], augment=False, mosaic_prob=0.0)
    cache = build_feature_cache(clip, plain, cfg, torch.device("cpu"))
    assert len(cache) == 6
    item = cache[0]
    assert item["tokens"].shape == (4, 16, 64) and item["mask"].shape == (1, 32, 32)
    images = torch.stack([plain[i]["image"] for i in range(len(plain))])
    g, _ = encode_images(clip, images, LAYERS, torch.device("cpu"))
    for row in cache.features:
        assert any(torch.allclose(row, other, atol=1e-5) for other in g)


def test_validation_does_not_depend_on_batch_size(synth_root, tiny_files):
    clip = load_clip(tiny_files[0], image_size=32)
    model = fresh_model(clip)
    ds = AnomalyDataset(synth_root, "synth", mode="test", image_size=32,
                        class_names=["pill", "wood"])
    cfg = make_config("unused", synth_root, tiny_files[0])
    figures = []
    for batch_size in (1, 3):
        loader = make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=0, seed=0)
        figures.append(validate(clip, model, loader, cfg, 1, seed=7))
    assert figures[0].per_class.keys() == {"pill", "wood"}
    # the maps of the two batchings agree to float32 rounding: each class's AP lies inside the
    # interval that this noise allows around batch 1's raw maps and text scores (tests/noise.py)
    from models import AnomalyDetector
    from tests.noise import MAP_NOISE, metric_interval
    from utils.evaluate import iterate_classes

    detector = AnomalyDetector(clip, model, 32, cfg.sample_num, 1, cfg.features_list)
    detector.reset_samples()
    loader = make_loader(ds, batch_size=1, shuffle=False, num_workers=0, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        outputs = list(iterate_classes(detector, loader, progress=False))
    for out in outputs:
        interval = metric_interval(out.labels, out.masks, out.maps, out.text_scores, MAP_NOISE,
                                   MAP_NOISE)
        for f in figures:
            lo, hi = interval["ap_px"]
            assert lo <= f.per_class[out.name]["pixel_ap"] <= hi, (out.name, lo, hi)
            lo, hi = interval["ap_sp"]
            assert lo <= f.per_class[out.name]["image_ap"] <= hi, (out.name, lo, hi)


def test_plan_data(synth_root):
    visa = plan_data(TrainConfig())
    assert (visa.val_dataset, visa.val_classes) == (
        "mvtec", ["bottle", "hazelnut", "wood", "zipper", "leather"])
    mvtec = plan_data(TrainConfig(dataset="mvtec"))
    assert (mvtec.val_dataset, mvtec.val_classes) == (
        "visa", ["chewinggum", "cashew", "pipe_fryum", "capsules", "candle"])
    assert visa.train_classes is None and not visa.held_out
    held = plan_data(TrainConfig(dataset="synth", train_data_path=synth_root,
                                 val_dataset="synth", val_classes=["pill"]))
    assert held.held_out and held.train_classes == ["mesh", "wood"]
    with pytest.raises(TrainingError, match="--val_classes"):
        plan_data(TrainConfig(dataset="synth", train_data_path=synth_root, val_dataset="synth"))
    with pytest.raises(TrainingError, match="no official validation"):
        plan_data(TrainConfig(dataset="synth", train_data_path=synth_root))


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel: two Gloo processes on CPU
# ------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world, port, config, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from utils import distributed

    trainer = ScriptedTrainer(config)
    # patience 1: the switch after epoch 3, stage 2 in epoch 4
    trainer.figures = {1: (0.5, 0.0), 2: (0.4, 0.0), 3: (0.3, 0.0), 4: (0.0, 0.5)}
    try:
        result = trainer.run()
        torch.save({"state": result.model.state_dict(), "history": result.history,
                    "steps": trainer.steps_per_epoch}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_stay_identical(tmp_path, synth_root, tiny_files):
    cfg = make_config(tmp_path / "run", synth_root, tiny_files[0], batch_size=2, epochs=4)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)),
                                nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["steps"] == b["steps"] == 2                  # 8 images, 2 ranks, batch 2
    assert [r["stage"] for r in a["history"]] == [1, 1, 1, 2]
    assert a["history"] == b["history"]
    _assert_same(a["state"], b["state"])
    initial = fresh_model(load_clip(tiny_files[0], image_size=32), seed=cfg.seed).state_dict()
    assert not torch.equal(a["state"]["prompt_context"], initial["prompt_context"])
    assert not torch.equal(a["state"]["fuse.compress.weight"], initial["fuse.compress.weight"])
    # rank 0 alone writes files
    assert os.path.isfile(tmp_path / "run" / "last.pth")
    assert os.path.isfile(tmp_path / "run" / "epoch_post_4_2.pth")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _run(args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def test_cli_user_errors_are_one_line(tmp_path, synth_root):
    common = [sys.executable, "train.py", "--dataset", "synth", "--val_dataset", "synth",
              "--val_classes", "pill", "--image_size", "32", "--features_list", "1", "2", "3",
              "4", "--device", "cpu", "--save_path", str(tmp_path / "run")]
    missing = str(tmp_path / "ViT-L-14-336px.pt")
    proc = _run(common + ["--train_data_path", synth_root, "--val_data_path", synth_root,
                          "--pretrained_path", missing])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and "openaipublic" in lines[0]

    proc = _run(common + ["--train_data_path", str(tmp_path / "nowhere"),
                          "--pretrained_path", missing])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1
    assert "meta_synth.json" in lines[0] and "make_meta.py" in lines[0]


def test_train_sh_reports_missing_files(tmp_path):
    env = dict(os.environ, PRETRAINED=str(tmp_path / "ViT-L-14-336px.pt"),
               DATA_ROOT=str(tmp_path / "data"), EXP_ROOT=str(tmp_path / "exps"),
               PYTHON=sys.executable)
    proc = _run(["bash", "train.sh"], env=env)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "ViT-L-14-336px.pt" in out and "openaipublic.azureedge.net" in out
    for name in ("meta_visa.json", "meta_mvtec.json", "make_dataset.py", "make_meta.py",
                 str(tmp_path / "data" / "visa"), str(tmp_path / "data" / "mvtec")):
        assert name in out
    assert not os.path.exists(tmp_path / "exps")
