"""Random-weight CLIP checkpoints in OpenAI's exact key layout, for tests and benchmarks."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from models.noise import standard_noise  # noqa: F401  (the tests' noise builder)
from models.random_clip import GEOMETRIES as _G, clip_shapes, make_clip_state_dict  # noqa: F401

GEOMETRIES = dict(_G, tiny=(64, 4, 16, 2, 64, 2, 64))


class _Holder(nn.Module):
    """Holds tensors under dotted names, for writing TorchScript archives."""

    def __init__(self, sd):
        super().__init__()
        for key, value in sd.items():
            *path, leaf = key.split(".")
            mod = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        # OpenAI's archives carry these non-weight entries.
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript(path, sd) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_Holder(sd)), str(path))


def write_state_dict(path, sd) -> None:
    torch.save(sd, str(path))


TINY_GEOMETRY = dict(vision_width=64, vision_layers=4, patch=8, grid=4, text_width=64,
                     text_layers=2, embed_dim=64)
TINY_LAYERS = [1, 2, 3, 4]


def write_tiny_checkpoints(directory, seed=0, image_size=32, layers=TINY_LAYERS,
                           geometry=None):
    """A random CLIP state dict file and a random official-format Bayes-PFL checkpoint.

    Returns (clip_path, checkpoint_path). The Bayes-PFL weights get a larger spread than the
    official initialisation so that scores and maps vary visibly between images."""
    import os

    from models.bayes_pfl import BayesPFL
    from models.weights import build_clip

    geometry = dict(geometry or TINY_GEOMETRY)
    sd = make_clip_state_dict(seed=seed, **geometry)
    clip_path = os.path.join(str(directory), "clip_tiny.pt")
    write_state_dict(clip_path, sd)
    clip = build_clip(sd, image_size=image_size)
    torch.manual_seed(seed)
    model = BayesPFL.from_clip(clip, layers=layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("RCA.", "class_mapping", "image_mapping", "fuse.")) and p.dim() > 1:
                p.normal_(0, 0.2)
        model.temperature_pixel.fill_(2.5)
        model.temperature_image.fill_(3.0)
    ckpt_path = os.path.join(str(directory), "bayes_tiny.pth")
    torch.save({"MyModel": model.state_dict()}, ckpt_path)
    return clip_path, ckpt_path


def load_tiny(files, layers=TINY_LAYERS, image_size=32):
    """(clip, model in eval mode) from the (clip_path, checkpoint_path) of
    ``write_tiny_checkpoints``."""
    from models import BayesPFL, load_clip

    clip_path, ckpt = files
    clip = load_clip(clip_path, image_size=image_size)
    model = BayesPFL.from_clip(clip, layers=layers)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["MyModel"])
    return clip, model.eval()
