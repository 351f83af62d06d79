import math
import os

import pytest
import torch
import torch.nn.functional as F

from models import AnomalyDetector, BayesPFL, load_clip
from models.losses import dice_loss, focal_loss, orthogonality_loss
from models.prompt_flow import kl_term, planar_flows
from tests.clip_factory import standard_noise

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
LAYERS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def golden():
    case = torch.load(os.path.join(GOLDEN, "case.pt"), weights_only=True)
    exp = torch.load(os.path.join(GOLDEN, "expected.pt"), weights_only=True)
    clip = load_clip(os.path.join(GOLDEN, "clip_tiny_fp16.pt"), image_size=case["image_size"],
                     activation=case["activation"])
    model = BayesPFL.from_clip(clip, prompt_num=case["prompt_num"],
                               prompt_context_len=case["prompt_context_len"],
                               prompt_state_len=case["prompt_state_len"],
                               num_flows=case["num_flows"], layers=case["layers"])
    sd = torch.load(os.path.join(GOLDEN, "bayes_tiny.pth"), weights_only=True)["MyModel"]
    model.load_state_dict(sd, strict=True)
    return case, exp, clip, model


_noise = standard_noise


# ---------------------------------------------------------------------------------------------
# Golden: the official implementation's outputs, batch 1 per image as its test.py

@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("batched", [False, True])
def test_golden(golden, stage, batched):
    case, exp, clip, model = golden
    det = AnomalyDetector(clip, model, image_size=case["image_size"],
                          sample_num=case["sample_num"], stage=stage, layers=case["layers"])
    noise = case["noise"]
    if batched:
        outs = [det.forward(case["images"], case["class_names"], noise)]
    else:
        outs = [det.forward(case["images"][i:i + 1], [case["class_names"][i]],
                            {"context": noise["context"][:, i:i + 1],
                             "normal": noise["normal"], "abnormal": noise["abnormal"]})
                for i in range(4)]

    def cat(key):
        return torch.cat([o[key] for o in outs])

    suffix = "" if stage == 2 else "_stage1"
    torch.testing.assert_close(cat("global"), exp["global"], rtol=0, atol=1e-5)
    tokens = torch.cat([torch.stack(o["tokens"], 1) for o in outs])
    torch.testing.assert_close(tokens, exp["tokens"], rtol=0, atol=2e-5)
    torch.testing.assert_close(cat("text_embeddings"), exp["text_embeddings"], rtol=0, atol=1e-5)
    torch.testing.assert_close(cat("image_score"), exp["image_score" + suffix], rtol=0, atol=1e-5)
    torch.testing.assert_close(cat("anomaly_map"), exp["anomaly_map" + suffix], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoint format

def _expected_shapes(d, v, n, p, q, k, n_layers):
    """Key -> shape at any geometry, from the key set of the official tiny checkpoint."""
    sd = torch.load(os.path.join(GOLDEN, "bayes_tiny.pth"), weights_only=True)["MyModel"]
    h = v // 2
    out = {}
    for key in sd:
        if key == "prompt_context":
            s = (n, p, d)
        elif key.startswith("prompt_state"):
            s = (n, q, d)
        elif key.startswith("temperature"):
            s = ()
        elif ".module." in key:
            idx = int(key.split(".module.")[1].split(".")[0])
            ins, outs = {0: (d, h), 2: (h, h), 4: (h, d)}[idx]
            s = (outs, ins) if key.endswith("weight") else (outs,)
        elif key.startswith("PFL_context.amor"):
            o = {"u": k * d, "w": k * d, "b": k}[key.split(".")[1][-1]]
            s = (o, d) if key.endswith("weight") else (o,)
        elif key.endswith(".amor_u"):
            s = (1, k, d, 1)
        elif key.endswith(".amor_w"):
            s = (1, k, 1, d)
        elif key.endswith(".amor_b"):
            s = (1, k, 1, 1)
        elif key.endswith(".state"):
            s = (1, d)
        elif ".p_mu.0." in key or key.startswith(("class_mapping", "image_mapping")):
            s = (d, d) if key.endswith("weight") else (d,)
        elif key.startswith("fuse."):
            s = {"fuse.fuse_modules.weight": (h, n_layers * v), "fuse.fuse_modules.bias": (h,),
                 "fuse.compress.weight": (1, h), "fuse.compress.bias": (1,),
                 "fuse.post_process.weight": (d, h), "fuse.post_process.bias": (d,)}[key]
        elif key == "RCA.q_proj_pre.weight":
            s = (d, d, 1)
        elif key == "RCA.q_proj_pre.bias":
            s = (d,)
        elif key.startswith("RCA.linear_proj"):
            s = (d, v)
        else:
            raise AssertionError(f"unexpected key {key}")
        out[key] = s
    return out


def test_state_dict_keys_and_shapes_at_vit_l14():
    with torch.device("meta"):
        model = BayesPFL(768, 768, 1024, 4, prompt_num=3, prompt_context_len=5,
                         prompt_state_len=5, num_flows=10)
    sd = model.state_dict()
    assert len(sd) == 131
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_shapes(768, 1024, 3, 5, 5, 10, 4)
    assert sum(p.numel() for p in model.parameters()) == 27_370_017
    # keys in the official order
    official = torch.load(os.path.join(GOLDEN, "bayes_tiny.pth"), weights_only=True)["MyModel"]
    assert list(sd) == list(official)


def test_shared_encoders_are_one_module(golden):
    _, _, _, model = golden
    assert model.PFL_normal.encoder is model.PFL_abnormal.encoder is model.state_encoder
    assert model.PFL_context.encoder is model.context_encoder
    sd = model.state_dict()
    assert torch.equal(sd["state_encoder.weight_mean.module.0.weight"],
                       sd["PFL_abnormal.encoder.weight_mean.module.0.weight"])


def test_strict_round_trip(tiny, tmp_path):
    clip, model = tiny
    path = tmp_path / "ckpt.pth"
    torch.save({"MyModel": model.state_dict()}, path)
    fresh = BayesPFL.from_clip(clip, layers=LAYERS)
    fresh.load_state_dict(torch.load(path, weights_only=True)["MyModel"], strict=True)
    images = torch.randn(2, 3, 32, 32)
    noise = _noise(3, 2, 64, 0)
    a = AnomalyDetector(clip, model, 32, 3, 2, LAYERS).predict(images, ["a", "b"], noise)
    b = AnomalyDetector(clip, fresh, 32, 3, 2, LAYERS).predict(images, ["a", "b"], noise)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_initialisation():
    torch.manual_seed(0)
    m = BayesPFL(64, 64, 128, 4)
    assert abs(m.prompt_state_normal.mean().item() - 0.5) < 0.01
    assert abs(m.prompt_state_abnormal.mean().item() + 0.5) < 0.01
    assert abs(m.prompt_context.mean().item()) < 0.01
    assert m.temperature_pixel.item() == pytest.approx(math.log(1 / 0.07))
    assert m.class_mapping.bias.abs().max() == 0
    assert 0.015 < m.class_mapping.weight.std().item() < 0.025
    assert 0.8 < m.PFL_normal.amor_u.std().item() < 1.2
    with pytest.raises(ValueError, match="equal"):
        BayesPFL(64, 96, 128, 4)


# ---------------------------------------------------------------------------------------------
# Batched inference

def test_batch_invariance(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=4, stage=2, layers=LAYERS)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = ["bottle", "metal_nut", "pcb1", "a very long class name with many words"]
    noise = _noise(4, 4, 64, 2)
    full = det.forward(images, names, noise)
    for i in range(4):
        one = det.forward(images[i:i + 1], names[i:i + 1],
                          {"context": noise["context"][:, i:i + 1], "normal": noise["normal"],
                           "abnormal": noise["abnormal"]})
        for key in ("image_score", "anomaly_map", "text_embeddings"):
            torch.testing.assert_close(one[key][0], full[key][i], rtol=0, atol=2e-6)


def test_rng_draws_do_not_depend_on_batch_size(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=3, stage=2, layers=LAYERS)
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    det.reset_samples()
    full = det.predict(images, "bottle")
    torch.manual_seed(5)
    det.reset_samples()
    parts = [det.predict(images[i:i + 1], "bottle") for i in range(4)]
    torch.testing.assert_close(torch.cat([p["image_score"] for p in parts]),
                               full["image_score"], rtol=0, atol=2e-6)
    # the official order: per image R context, R normal, R abnormal draws of [1, D]
    torch.manual_seed(5)
    draws = [torch.randn(1, 64) for _ in range(3 * 3 * 4)]
    noise = {"context": torch.stack([torch.cat(draws[9 * i:9 * i + 3]) for i in range(4)], 1),
             "normal": torch.stack(draws[3:6]), "abnormal": torch.stack(draws[6:9])}
    explicit = det.predict(images, "bottle", noise)
    torch.testing.assert_close(explicit["image_score"], full["image_score"], rtol=0, atol=2e-6)


def test_state_samples_cached_until_reset(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=2, stage=2, layers=LAYERS)
    images = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    det.predict(images, "x")
    states = det._states
    det.predict(images, "x")
    assert det._states is states
    det.reset_samples()
    det.predict(images, "x")
    assert not torch.equal(det._states[0].zk, states[0].zk)


def test_same_noise_same_output_different_noise_different(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=3, stage=1, layers=LAYERS)
    images = torch.randn(2, 3, 32, 32)
    a = det.predict(images, ["a", "b"], _noise(3, 2, 64, 0))
    b = det.predict(images, ["a", "b"], _noise(3, 2, 64, 0))
    c = det.predict(images, ["a", "b"], _noise(3, 2, 64, 1))
    assert torch.equal(a["anomaly_map"], b["anomaly_map"])
    assert torch.equal(a["image_score"], b["image_score"])
    assert (a["anomaly_map"] - c["anomaly_map"]).abs().max() > 1e-4
    assert (a["image_score"] - c["image_score"]).abs().max() > 1e-5


def test_cut_text_equals_full_77(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=2, stage=2, layers=LAYERS)
    images = torch.randn(2, 3, 32, 32)
    names = ["bottle", "printed circuit board with a long name"]
    noise = _noise(2, 2, 64, 3)
    cut = det.forward(images, names, noise)
    model.text_mode = "full"
    try:
        full = det.forward(images, names, noise)
    finally:
        model.text_mode = "packed"
    torch.testing.assert_close(cut["text_embeddings"], full["text_embeddings"], rtol=0, atol=2e-6)
    torch.testing.assert_close(cut["anomaly_map"], full["anomaly_map"], rtol=0, atol=2e-6)


def test_maps_equal_softmax_after_upsampling(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=3, stage=2, layers=LAYERS, map_chunk=2)
    images = torch.randn(2, 3, 32, 32)
    noise = _noise(3, 2, 64, 4)
    out = det.forward(images, ["a", "b"], noise)
    # the plain official computation: upsample every map, softmax each pair, mean
    with torch.no_grad():
        logits = model.pixel_logits(out["tokens"], out["text_embeddings"])
        pairs = out["text_embeddings"].shape[1] // 2
        acc = []
        for lg in logits:
            up = F.interpolate(lg, size=(32, 32), mode="bilinear", align_corners=True)
            for i in range(pairs):
                acc.append(torch.stack([up[:, i], up[:, pairs + i]], 1).softmax(1)[:, 1])
        plain = torch.stack(acc).mean(0)
        text_logits = model.image_logits(out["global"], out["tokens"], out["text_embeddings"], 2)
        score = torch.stack([torch.stack([text_logits[:, i], text_logits[:, pairs + i]], 1)
                             .softmax(1)[:, 1] for i in range(pairs)]).mean(0)
    torch.testing.assert_close(out["anomaly_map"], plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["image_score"], score, rtol=0, atol=1e-6)


def test_detector_argument_checks(tiny):
    clip, model = tiny
    long_name = model.class_tokens([" ".join(["word"] * 70)], "cpu")
    with pytest.raises(ValueError, match="class name is too long"):
        model.encode_prompts(clip, torch.zeros(1, 10, 64), long_name)
    with pytest.raises(ValueError, match="stage"):
        AnomalyDetector(clip, model, 32, stage=3, layers=LAYERS)
    with pytest.raises(ValueError, match="px"):
        AnomalyDetector(clip, model, 64, layers=LAYERS)
    with pytest.raises(ValueError, match="layers"):
        AnomalyDetector(clip, model, 32, layers=[1, 2])
    det = AnomalyDetector(clip, model, 32, layers=LAYERS)
    with pytest.raises(ValueError, match="class names"):
        det.predict(torch.zeros(2, 3, 32, 32), ["a"])


# ---------------------------------------------------------------------------------------------
# Flows and losses

def test_planar_flow_log_det_against_autograd_jacobian():
    torch.manual_seed(0)
    d, k = 5, 3
    u, w, b = torch.randn(k, d), torch.randn(k, d), torch.randn(k)
    z = torch.randn(d)
    zk, log_det = planar_flows(z, u, w, b)
    # each flow's Jacobian determinant by autograd, chained
    total, x = 0.0, z
    for i in range(k):
        f = lambda v, i=i: v + u[i] * torch.tanh(w[i] @ v + b[i])  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, x)
        total += torch.log(torch.abs(torch.det(jac)) + 1e-5)
        x = f(x)
    torch.testing.assert_close(zk, x)
    torch.testing.assert_close(log_det.sum(), torch.as_tensor(total), atol=1e-5, rtol=1e-5)


def test_kl_against_direct_density():
    torch.manual_seed(0)
    model = BayesPFL(8, 8, 16, 2, num_flows=3)
    x = torch.randn(3, 8)
    eps = torch.randn(1, 3, 8)
    s = model.PFL_context(x, eps)
    var = torch.exp(0.5 * s.h)
    q = torch.distributions.Normal(s.mean, var.sqrt())
    p = torch.distributions.Normal(torch.zeros(8), torch.ones(8))
    const = 0.5 * math.log(2 * math.pi) * 8
    log_q = q.log_prob(s.z0).sum(-1) + const + 1e-8
    log_p = p.log_prob(s.zk).sum(-1) + const + 1e-8
    want = ((log_q - log_p).sum() - s.log_det.sum()) / 3
    torch.testing.assert_close(kl_term(s, 3), want)
    # an image-agnostic distribution (one row shared by the batch): the official code
    # broadcasts its density term over the B images, and divides its log-det by B
    ss = model.PFL_normal(torch.randn(1, 1, 8))
    var = torch.exp(0.5 * ss.h)
    q = torch.distributions.Normal(ss.mean, var.sqrt())
    density = (q.log_prob(ss.z0).sum() - p.log_prob(ss.zk).sum())
    torch.testing.assert_close(kl_term(ss, 3), density - ss.log_det.sum() / 3)
    torch.testing.assert_close(kl_term(ss, 1), density - ss.log_det.sum())


def test_focal_and_dice_hand_computed():
    probs_abn = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])           # [1, 2, 2]
    probs = torch.stack([1 - probs_abn, probs_abn], 1)             # [1, 2, 2, 2]
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    fg = [0.9, 0.6]
    bg = [0.8, 0.9]
    f = lambda p: -((1 - p) ** 2) * math.log(p + 1e-8)             # noqa: E731
    want = sum(f(p) for p in fg) / 2 + sum(f(p) for p in bg) / 2
    assert focal_loss(probs, target).item() == pytest.approx(want, rel=1e-5)
    inter = 0.9 + 0.6
    want_dice = 1 - (2 * inter + 1e-5) / (1.8 + 2 + 1e-5)
    assert dice_loss(probs_abn, target).item() == pytest.approx(want_dice, rel=1e-5)
    # no foreground: only the background average
    assert focal_loss(probs, torch.zeros(1, 2, 2)).item() == pytest.approx(
        sum(f(1 - p) for p in [0.9, 0.2, 0.6, 0.1]) / 4, rel=1e-5)


def test_orthogonality_hand_computed():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])       # [1, 3, 2]
    c = 1 / math.sqrt(2)
    want = (4 * c ** 2) / 9                                         # 4 off-diagonal entries 0.5
    assert orthogonality_loss(e).item() == pytest.approx(want, rel=1e-6)


def _train_batch(clip, b=2):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, 32, 32, generator=g)
    masks = torch.zeros(b, 1, 32, 32)
    masks[0, :, 8:16, 8:20] = 1
    labels = torch.tensor([1, 0][:b])
    with torch.no_grad():
        feats, tokens = clip.encode_image(images, LAYERS)
    return feats, tokens, labels, masks


def _backward(clip, model, stage: int, prompt: int) -> tuple[dict, set[str]]:
    """One training forward and backward; (outputs, names of parameters with a gradient)."""
    feats, tokens, labels, masks = _train_batch(clip)
    model.zero_grad()
    out = model.training_forward(clip, feats, tokens, ["a", "b"], labels, masks, prompt, stage)
    out["loss"].backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad()
    return out, got


def test_stage1_gradients_reach_every_group(tiny):
    clip, model = tiny
    out, got = _backward(clip, model, stage=1, prompt=1)
    for name in ("prompt_context", "prompt_state_normal", "prompt_state_abnormal",
                 "temperature_pixel", "temperature_image", "context_encoder.weight_mean.module.0.weight",
                 "state_encoder.weight_log_variance.module.4.bias", "PFL_context.amor_u.weight",
                 "PFL_normal.amor_w", "PFL_abnormal.state", "RCA.q_proj_pre.weight",
                 "RCA.linear_proj.2.weight", "class_mapping.weight"):
        assert name in got, name
    assert not any("decoder" in n for n in got)
    assert not any(n.startswith(("fuse.", "image_mapping")) for n in got)
    for key in ("loss_ce", "loss_seg", "loss_kl", "loss_orth"):
        assert torch.isfinite(out[key])
    torch.testing.assert_close(out["loss"], out["loss_ce"] + out["loss_seg"]
                               + 0.01 * out["loss_kl"] + out["loss_orth"])


def test_stage2_gradients_only_heads(tiny):
    clip, model = tiny
    out, got = _backward(clip, model, stage=2, prompt=0)
    assert {n.split(".")[0] for n in got} == {"class_mapping", "image_mapping", "fuse"}
    torch.testing.assert_close(out["loss"], out["loss_ce"])


def test_training_forward_matches_inference_pieces(tiny):
    """The training forward's pair logits equal the detector's, given the same noise."""
    clip, model = tiny
    feats, tokens, labels, masks = _train_batch(clip)
    noise = _noise(1, 2, 64, 9)
    with torch.no_grad():
        out = model.training_forward(clip, feats, tokens, ["a", "b"], labels, masks, 2, 1,
                                     noise=noise)
        s = model.sample(feats, noise["context"], noise["normal"], noise["abnormal"])
        text = model.text_embeddings(clip, s, ["a", "b"])
        logits = model.image_logits(feats, tokens, text, 1)
    torch.testing.assert_close(out["image_logits"], logits[:, [2, 5]])
