"""The training step against the official implementation's own outputs (golden/train_step.pt):
three stage-1 and two stage-2 steps on the tiny geometry with fixed noise and prompt indices.

Every loss term, every gradient, the learning rate of every group and the optimiser groups are
compared with the official numbers. Parameters are compared on the official gradients injected
into this project's optimiser and schedule, which must reproduce the official parameters to
the last bit or two (torch Adam given the same inputs); each step then starts from exactly the
official parameters and Adam moments, so that no float32 drift accumulates between steps.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from models import BayesPFL, load_clip
from utils.training import (TrainConfig, TrainingStep, encode_images, make_optimizer,
                            make_scheduler, optimisation_step, set_trainable)

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
LOSSES = {"ce": "loss_ce", "focal": "loss_focal", "dice": "loss_dice", "seg": "loss_seg",
          "kl_context": "loss_kl_context", "kl_normal": "loss_kl_normal",
          "kl_abnormal": "loss_kl_abnormal", "orth": "loss_orth", "total": "loss"}


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(GOLDEN, "train_step.pt"), weights_only=True)


@pytest.fixture(scope="module")
def setting(golden):
    s = golden["settings"]
    clip = load_clip(os.path.join(GOLDEN, "clip_tiny_fp16.pt"), image_size=s["image_size"],
                     activation="gelu")
    model = BayesPFL.from_clip(clip, prompt_num=s["prompt_num"],
                               prompt_context_len=s["prompt_context_len"],
                               prompt_state_len=s["prompt_state_len"], num_flows=s["num_flows"],
                               layers=s["features_list"])
    model.load_state_dict(golden["init_state_dict"], strict=True)
    images = golden["inputs"]["images"]
    g, tokens = encode_images(clip, images, s["features_list"], torch.device("cpu"))
    return clip, model, g, tokens


def _config(golden) -> TrainConfig:
    s = golden["settings"]
    # the official argparse defaults; --learning_rate is deliberately off: it has no effect
    return TrainConfig(learning_rate=123.0, learning_rate_prompt=s["learning_rate_prompt"],
                       learning_rate_PFL=s["learning_rate_PFL"],
                       learning_rate_linear=s["learning_rate_linear"])


def _named(model):
    return dict(model.named_parameters())


def _group_names(optimizer, model):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [[ids[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _grad_allowance(golden, k, name, g_gold):
    rel = golden["float64_replay"][k]["grad_rel"].get(name, 0.0) or 0.0
    scale = float(g_gold.abs().max())
    return max(1e-5, 10 * rel) * max(scale, 1e-30)


def _inject(optimizer, params, grads):
    """One Adam step of ``optimizer`` with the given gradients (None: no gradient)."""
    for name, p in params.items():
        g = grads.get(name)
        p.grad = None if g is None else g.clone()
    optimizer.step()


def test_optimizer_groups_and_learning_rates(golden, setting):
    _, model, _, _ = setting
    model = copy.deepcopy(model)
    cfg = _config(golden)
    for stage, key in ((1, "stage1"), (2, "stage2")):
        opt = make_optimizer(model, cfg, stage)
        want = golden["optimizer_groups"][key]
        assert _group_names(opt, model) == [g["params"] for g in want]
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in want]
        adam = golden["settings"]["adam"]
        for group in opt.param_groups:
            assert tuple(group["betas"]) == tuple(adam["betas"])
            assert group["eps"] == adam["eps"] and group["weight_decay"] == adam["weight_decay"]
    assert sorted(_named(model)) == sorted(golden["param_names"])


def test_training_steps_match_the_official_code(golden, setting):
    clip, model0, g, tokens = setting
    s, inputs = golden["settings"], golden["inputs"]
    device = torch.device("cpu")
    cfg = _config(golden)
    model = copy.deepcopy(model0)                   # runs this project's steps
    shadow = copy.deepcopy(model0)                  # receives the official gradients
    step_module = TrainingStep(model, clip)
    params, shadow_params = _named(model), _named(shadow)
    total = s["loader_len"] * s["epochs"]

    optimizer = scheduler = shadow_opt = shadow_sched = None
    for k, record in enumerate(golden["steps"]):
        stage = record["stage"]
        if record["step_in_stage"] == 1:
            set_trainable(model, stage)
            set_trainable(shadow, stage)
            optimizer, shadow_opt = make_optimizer(model, cfg, stage), make_optimizer(shadow, cfg,
                                                                                      stage)
            scheduler = shadow_sched = None
            if stage == 1:
                scheduler = make_scheduler(optimizer, total, 0.1)
                shadow_sched = make_scheduler(shadow_opt, total, 0.1)
        assert [grp["lr"] for grp in optimizer.param_groups] == pytest.approx(record["lr_used"],
                                                                             rel=1e-12)
        before = {n: p.detach().clone() for n, p in params.items()}
        out = optimisation_step(step_module, optimizer, None, g, tokens, inputs["class_names"],
                                inputs["labels"], inputs["masks"].float()[:, None],
                                record["prompt_index"], stage, device, "fp32", record["noise"])

        # loss terms
        names = ["ce", "total"] if stage == 2 else list(LOSSES)
        for name in names:
            want = record["losses"][name]
            got = float(out[LOSSES[name]])
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (k, name, got, want)

        # gradients
        for name, g_gold in record["grads"].items():
            g_ours = params[name].grad
            if g_gold is None:
                assert g_ours is None or not g_ours.any(), (k, name)
                continue
            assert g_ours is not None, (k, name)
            err = float((g_ours - g_gold).abs().max())
            assert err <= _grad_allowance(golden, k, name, g_gold), (k, name, err)
        if stage == 1:
            with_grad = {n for n, v in record["grads"].items() if v is not None}
            assert {n for n, p in params.items() if p.grad is not None} == with_grad

        # which tensors this project's own step changed
        changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
        assert changed == set(record["changed"]), (k, changed ^ set(record["changed"]))

        # the official gradients through this project's optimiser: the official parameters
        previous = {n: p.detach().clone() for n, p in shadow_params.items()}
        _inject(shadow_opt, {n: shadow_params[n] for n in record["grads"]}, record["grads"])
        for name, p in shadow_params.items():
            want = record["params_after"].get(name)
            if want is None:                              # unchanged tensors are stored once
                continue
            # to the last bit or two of the operands (README: 2 ulp + 1e-5 of the largest update)
            ulp = torch.finfo(torch.float32).eps * torch.maximum(want.abs(), previous[name].abs())
            update = float((want - previous[name]).abs().max())
            err = (p.detach() - want).abs()
            assert (err <= 2 * ulp + 1e-5 * update).all(), (k, name, float(err.max()))
        if scheduler is not None:
            scheduler.step()
            shadow_sched.step()
            assert [grp["lr"] for grp in optimizer.param_groups] == pytest.approx(
                record["lr_after"], rel=1e-12)

        # the next step starts from the official parameters and Adam moments
        with torch.no_grad():
            for name, p in params.items():
                want = record["params_after"].get(name)
                if want is not None:
                    shadow_params[name].copy_(want)
                p.copy_(shadow_params[name])
        optimizer.load_state_dict(copy.deepcopy(shadow_opt.state_dict()))   # own moments
