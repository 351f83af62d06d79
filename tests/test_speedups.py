"""Exact speed-ups: each equals the plain computation to float rounding."""

import pytest
import torch

from models import AnomalyDetector, BayesPFL, load_clip
from models.bayes_pfl import packed_pair_layout
from tests.clip_factory import standard_noise

LAYERS = [1, 2, 3, 4]
NAMES = ["bottle", "metal_nut", "pcb1", "a very long class name with many words"]


_noise = standard_noise


class _Mode:
    """Set the text mode for a block, restoring the default after."""

    def __init__(self, model, mode="packed"):
        self.model, self.mode = model, mode

    def __enter__(self):
        self.model.text_mode = self.mode

    def __exit__(self, *exc):
        self.model.text_mode = "packed"


def test_packed_pair_layout_against_its_definition():
    t, prefix = 7, 3
    positions, mask = packed_pair_layout(t, prefix)
    length = 2 * t - prefix
    assert positions.tolist() == list(range(t)) + list(range(prefix, t))
    for i in range(length):
        for j in range(length):
            # slot -> (sequence, position); the shared prefix belongs to both sequences
            seq_i = 0 if i < t else 1
            seq_j = None if j < prefix else (0 if j < t else 1)
            want = positions[j] <= positions[i] and seq_j in (None, seq_i)
            assert bool(mask[i, j]) == want, (i, j)


def test_shared_prefix_text_equals_plain_and_full(tiny):
    clip, model = tiny
    g = torch.Generator().manual_seed(0)
    b, r, n = len(NAMES), 3, model.prompt_num
    samples = model.sample(torch.randn(b, 64, generator=g), torch.randn(r, b, 64, generator=g),
                           torch.randn(r, 1, 64, generator=g), torch.randn(r, 1, 64, generator=g))
    with torch.no_grad():
        packed = model.text_embeddings(clip, samples, NAMES)
        with _Mode(model, "cut"):
            plain = model.text_embeddings(clip, samples, NAMES)
        with _Mode(model, "full"):
            full = model.text_embeddings(clip, samples, NAMES)
    assert packed.shape == (b, 2 * n * r, 64)
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(packed, full, rtol=0, atol=1e-6)


def test_shared_prefix_text_work(tiny):
    clip, model = tiny
    tokens = model.class_tokens(["bottle"])
    assert model.text_work(tokens, 30) == (30, 20)     # [SOS] + 5 shared + 2 x (5 + 1 + 1)
    with _Mode(model, "cut"):
        assert model.text_work(tokens, 30) == (60, 13)
    with _Mode(model, "full"):
        assert model.text_work(tokens, 30) == (60, 77)


def test_detector_outputs_equal_with_and_without_sharing(tiny):
    clip, model = tiny
    det = AnomalyDetector(clip, model, 32, sample_num=3, stage=2, layers=LAYERS)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = _noise(3, 4, 64, 2)
    packed = det.forward(images, NAMES, noise)
    with _Mode(model, "cut"):
        plain = det.forward(images, NAMES, noise)
    for key in ("text_embeddings", "image_score", "anomaly_map"):
        torch.testing.assert_close(packed[key], plain[key], rtol=0, atol=2e-6)


def test_training_losses_and_gradients_equal_with_and_without_sharing(tiny):
    clip, model = tiny
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 32, 32, generator=g)
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 4:12, 8:20] = 1
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        feats, tokens = clip.encode_image(images, LAYERS)
    noise = _noise(1, 2, 64, 4)

    def run():
        model.zero_grad()
        out = model.training_forward(clip, feats, tokens, ["bottle", "pcb1"], labels, masks, 1,
                                     stage=1, noise=noise)
        out["loss"].backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return out, grads

    model.train()
    try:
        packed, grads_packed = run()
        with _Mode(model, "cut"):
            plain, grads_plain = run()
    finally:
        model.zero_grad()
        model.eval()
    for key in ("loss", "loss_ce", "loss_seg", "loss_kl", "loss_orth"):
        torch.testing.assert_close(packed[key], plain[key], rtol=1e-5, atol=1e-6)
    assert grads_packed.keys() == grads_plain.keys()
    for k in grads_packed:
        torch.testing.assert_close(grads_packed[k], grads_plain[k], rtol=1e-4, atol=1e-6,
                                   msg=k)


def test_text_tower_reads_several_positions_per_row(tiny):
    clip, _ = tiny
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, 64, generator=g)
    reads = torch.tensor([[2, 8], [0, 5], [7, 7]])
    with torch.no_grad():
        both = clip.encode_text_embeddings(x, reads)
        first = clip.encode_text_embeddings(x, reads[:, 0])
        second = clip.encode_text_embeddings(x, reads[:, 1])
    assert both.shape == (3, 2, 64)
    torch.testing.assert_close(both[:, 0], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(both[:, 1], second, rtol=0, atol=1e-6)


def test_text_tower_explicit_positions_and_causal_mask_equal_plain(tiny):
    clip, _ = tiny
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(6))
    eot = torch.tensor([4, 10])
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    with torch.no_grad():
        plain = clip.encode_text_embeddings(x, eot)
        explicit = clip.encode_text_embeddings(x, eot, positions=torch.arange(11),
                                               attn_mask=causal)
    torch.testing.assert_close(explicit, plain, rtol=0, atol=1e-6)


def test_lower_precision_leaves_fp32_untouched(tiny):
    """bf16 autocast is opt-in: an fp32 detector gives the same bits before and after a bf16
    run on the same module, and the bf16 result stays close."""
    clip, model = tiny
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    noise = _noise(2, 2, 64, 8)
    fp32 = AnomalyDetector(clip, model, 32, sample_num=2, stage=2, layers=LAYERS)
    assert fp32.precision == "fp32"
    before = fp32.predict(images, ["bottle", "pcb1"], noise)
    bf16 = AnomalyDetector(clip, model, 32, sample_num=2, stage=2, layers=LAYERS,
                           precision="bf16").predict(images, ["bottle", "pcb1"], noise)
    after = fp32.predict(images, ["bottle", "pcb1"], noise)
    for key in ("image_score", "anomaly_map"):
        assert torch.equal(before[key], after[key])
        assert before[key].dtype == bf16[key].dtype == torch.float32
        assert (before[key] - bf16[key]).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------
# GPU readiness: the per-batch work makes no host-device synchronisation

def test_running_losses_show_at_once_on_cpu():
    from utils.training import RunningLosses

    class Bar:
        postfix = None

        def set_postfix(self, values):
            self.postfix = values

    bar = Bar()
    display = RunningLosses(bar, torch.device("cpu"))
    display.update({"loss": torch.tensor(3.0), "loss_ce": torch.tensor(1.5)}, 3)
    assert bar.postfix == {"loss": "1.0000", "ce": "0.5000"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_in_inference_and_training_step(tiny_files):
    from utils.training import (RunningLosses, TrainConfig, TrainingStep, encode_images,
                                make_optimizer, optimisation_step, set_trainable)

    clip_path, ckpt = tiny_files
    device = torch.device("cuda")
    clip = load_clip(clip_path, image_size=32, device=device)
    model = BayesPFL.from_clip(clip, layers=LAYERS)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["MyModel"])
    det = AnomalyDetector(clip, model.eval(), 32, sample_num=2, stage=2, layers=LAYERS)
    images = torch.randn(2, 3, 32, 32, device=device)
    names = ["bottle", "pcb1"]
    masks = torch.zeros(2, 1, 32, 32, device=device)
    masks[0, :, 4:12, 4:12] = 1
    labels = torch.tensor([1, 0], device=device)
    set_trainable(model, 1)
    optimizer = make_optimizer(model, TrainConfig(), 1)
    step = TrainingStep(model.train(), clip)

    def work():
        det.predict(images, names)
        feats, tokens = encode_images(clip, images, LAYERS, device)
        return optimisation_step(step, optimizer, None, feats, tokens, names, labels, masks, 1,
                                 1, device)

    try:
        work()                                  # first calls: caches, optimiser state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        losses = work()
        RunningLosses(type("Bar", (), {"set_postfix": lambda self, v: None})(), device
                      ).update(losses, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        set_trainable(model, None)
        model.eval()
