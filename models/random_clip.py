"""Random-weight CLIP state dicts in OpenAI's exact key layout.

No pretrained weights can be bundled with the project; a random CLIP exercises the whole
method (the demo, the tests and the benchmarks use it). Geometry keywords: vision_width,
vision_layers, patch, grid, text_width, text_layers, embed_dim, context_length, vocab_size.
"""

from __future__ import annotations

import torch

GEOMETRIES = {
    # name: (vision_width, vision_layers, patch, grid, text_width, text_layers, embed_dim)
    "ViT-B-16": (768, 12, 16, 14, 512, 12, 512),
    "ViT-L-14": (1024, 24, 14, 16, 768, 12, 768),
    "ViT-L-14-336": (1024, 24, 14, 24, 768, 12, 768),
}


def geometry_kwargs(name: str) -> dict:
    vw, vl, patch, grid, tw, tl, dim = GEOMETRIES[name]
    return dict(vision_width=vw, vision_layers=vl, patch=patch, grid=grid, text_width=tw,
                text_layers=tl, embed_dim=dim)


def clip_shapes(vision_width=64, vision_layers=4, patch=16, grid=2, text_width=64,
                text_layers=2, embed_dim=64, context_length=77, vocab_size=49408):
    """Key -> shape of an OpenAI CLIP ViT state dict (in the order of OpenAI's files)."""
    s = {
        "positional_embedding": (context_length, text_width),
        "text_projection": (text_width, embed_dim),
        "logit_scale": (),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": (grid * grid + 1, vision_width),
        "visual.proj": (vision_width, embed_dim),
        "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.ln_pre.weight": (vision_width,),
        "visual.ln_pre.bias": (vision_width,),
    }

    def blocks(prefix, width, layers):
        for i in range(layers):
            p = f"{prefix}resblocks.{i}."
            s[p + "attn.in_proj_weight"] = (3 * width, width)
            s[p + "attn.in_proj_bias"] = (3 * width,)
            s[p + "attn.out_proj.weight"] = (width, width)
            s[p + "attn.out_proj.bias"] = (width,)
            s[p + "ln_1.weight"] = (width,)
            s[p + "ln_1.bias"] = (width,)
            s[p + "mlp.c_fc.weight"] = (4 * width, width)
            s[p + "mlp.c_fc.bias"] = (4 * width,)
            s[p + "mlp.c_proj.weight"] = (width, 4 * width)
            s[p + "mlp.c_proj.bias"] = (width,)
            s[p + "ln_2.weight"] = (width,)
            s[p + "ln_2.bias"] = (width,)

    blocks("visual.transformer.", vision_width, vision_layers)
    s["visual.ln_post.weight"] = (vision_width,)
    s["visual.ln_post.bias"] = (vision_width,)
    blocks("transformer.", text_width, text_layers)
    s["token_embedding.weight"] = (vocab_size, text_width)
    s["ln_final.weight"] = (text_width,)
    s["ln_final.bias"] = (text_width,)
    return s


def make_clip_state_dict(seed=0, dtype=torch.float32, device="cpu", **geometry):
    """Random weights of sensible scale; values are fp16-representable so that fp32 and fp16
    files of the same checkpoint hold identical numbers."""
    shapes = clip_shapes(**geometry)
    if device == "meta":
        return {k: torch.empty(v, device="meta", dtype=dtype) for k, v in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight",
                       "ln_final.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k == "logit_scale":
            t = torch.tensor(4.6052)
        elif k.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif k in ("visual.proj", "text_projection"):
            t = torch.randn(shape, generator=g) * shape[0] ** -0.5
        elif k.endswith("embedding") or k == "token_embedding.weight":
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] if len(shape) == 2 else (shape[1] * shape[2] * shape[3])
            t = torch.randn(shape, generator=g) * fan_in ** -0.5
        sd[k] = t.half().to(dtype)
    return sd
