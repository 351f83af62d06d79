"""OpenAI CLIP (ViT) towers and their geometry (reading the weight files: ``models/weights.py``).

Parameter names are exactly OpenAI's, so their TorchScript archives and plain state dicts load
with strict key and shape checks. The geometry is read from the tensor shapes. The patch
position grid is resized once, at load time, to the requested input size.

Tensors are batch-first inside ([B, T, C]); attention runs through
``F.scaled_dot_product_attention``. LayerNorm is computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SettingsError, WeightsError

# --------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, result cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                           self.bias.float(), self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """OpenAI's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}: use 'gelu' or 'quick_gelu'")


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's parameter names (packed q, k, v)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; ``attn_mask`` [T, T] bool (True: may attend) replaces
        ``causal``."""
        b, t, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, T, 3C]
        qkv = qkv.view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask,
                                             is_causal=causal and attn_mask is None)
        out = out.transpose(1, 2).reshape(b, t, c)  # [B, T, C]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", make_activation(activation))
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool = False,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, activation) for _ in range(layers))


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class CLIPGeometry:
    embed_dim: int
    vision_width: int
    vision_layers: int
    patch_size: int
    grid_size: int            # patches per side of the stored position grid
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64 if self.vision_width >= 64 else 1

    @property
    def text_heads(self) -> int:
        return self.text_width // 64 if self.text_width >= 64 else 1

    @property
    def native_image_size(self) -> int:
        return self.patch_size * self.grid_size

    @property
    def name(self) -> str:
        """OpenAI's name of the image tower, e.g. "ViT-L/14@336px" ("ViT-B/16" at its native
        224 px), or its shape for other geometries."""
        known = {(768, 12): "B", (1024, 24): "L", (1280, 32): "H"}
        size = known.get((self.vision_width, self.vision_layers),
                         f"{self.vision_width}x{self.vision_layers}")
        name = f"ViT-{size}/{self.patch_size}"
        return name if self.native_image_size == 224 else f"{name}@{self.native_image_size}px"

    @classmethod
    def from_state_dict(cls, sd: dict) -> "CLIPGeometry":
        """Infer the geometry of an OpenAI-layout ViT CLIP from its tensor shapes."""
        needed = ("visual.conv1.weight", "visual.positional_embedding", "text_projection",
                  "token_embedding.weight", "positional_embedding", "ln_final.weight")
        missing = [k for k in needed if k not in sd]
        if missing:
            raise WeightsError(
                "not a CLIP ViT checkpoint in OpenAI's layout: missing "
                + ", ".join(missing))

        def count(prefix: str) -> int:
            pat = re.compile(re.escape(prefix) + r"(\d+)\.attn\.in_proj_weight$")
            return len({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})

        conv = sd["visual.conv1.weight"]
        n_pos = sd["visual.positional_embedding"].shape[0] - 1
        grid = int(round(math.sqrt(n_pos)))
        if grid * grid != n_pos:
            raise WeightsError(f"visual.positional_embedding has {n_pos} patch positions, "
                               "not a square grid")
        return cls(
            embed_dim=sd["text_projection"].shape[1],
            vision_width=conv.shape[0],
            vision_layers=count("visual.transformer.resblocks."),
            patch_size=conv.shape[-1],
            grid_size=grid,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            text_width=sd["ln_final.weight"].shape[0],
            text_layers=count("transformer.resblocks."),
        )


# --------------------------------------------------------------------------------------------
# Towers


class VisionTransformer(nn.Module):
    def __init__(self, g: CLIPGeometry, grid_size: int, activation: str):
        super().__init__()
        w = g.vision_width
        self.patch_size = g.patch_size
        self.grid_size = grid_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=g.patch_size, stride=g.patch_size, bias=False)
        scale = w ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid_size ** 2 + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, g.vision_layers, g.vision_heads, activation)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, g.embed_dim))

    def forward(self, x: torch.Tensor, layers: Sequence[int] = ()
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        g = self.grid_size
        if x.shape[-2:] != (g * self.patch_size, g * self.patch_size):
            raise ValueError(
                f"images of {tuple(x.shape[-2:])} pixels given to a vision tower loaded for "
                f"{g * self.patch_size} x {g * self.patch_size}: load_clip(..., image_size="
                f"{x.shape[-1]}) or resize the images")
        n_blocks = len(self.transformer.resblocks)
        for idx in layers:
            if not 1 <= idx <= n_blocks:
                raise ValueError(f"layer {idx} out of range: the vision tower has blocks "
                                 f"1..{n_blocks}")
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, V, G, G]
        x = x.flatten(2).transpose(1, 2)               # [B, G*G, V]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        wanted = set(layers)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if i in wanted:
                taken[i] = x[:, 1:, :]                 # [B, G*G, V], raw residual stream
        pooled = self.ln_post(x[:, 0, :]) @ self.proj  # [B, D]
        return pooled, [taken[i] for i in layers]


class CLIP(nn.Module):
    """OpenAI's CLIP with ViT image tower; parameter names as in OpenAI's checkpoints."""

    def __init__(self, geometry: CLIPGeometry, image_size: int | None = None,
                 activation: str = "gelu"):
        super().__init__()
        g = geometry
        image_size = image_size or g.native_image_size
        if image_size % g.patch_size:
            raise SettingsError(f"--image_size {image_size} is not a multiple of the CLIP patch "
                                f"size {g.patch_size}; use a multiple such as "
                                f"{max(1, round(image_size / g.patch_size)) * g.patch_size}")
        self.geometry = g
        self.activation = activation
        self.image_size = image_size
        self.visual = VisionTransformer(g, image_size // g.patch_size, activation)
        self.token_embedding = nn.Embedding(g.vocab_size, g.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(g.context_length, g.text_width))
        self.transformer = Transformer(g.text_width, g.text_layers, g.text_heads, activation)
        self.ln_final = LayerNorm(g.text_width)
        self.text_projection = nn.Parameter(torch.empty(g.text_width, g.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=g.text_width ** -0.5)

    # geometry shortcuts
    @property
    def grid_size(self) -> int:
        return self.visual.grid_size

    @property
    def patch_size(self) -> int:
        return self.geometry.patch_size

    @property
    def embed_dim(self) -> int:
        return self.geometry.embed_dim

    @property
    def vision_width(self) -> int:
        return self.geometry.vision_width

    @property
    def text_width(self) -> int:
        return self.geometry.text_width

    @property
    def context_length(self) -> int:
        return self.geometry.context_length

    def encode_image(self, images: torch.Tensor, layers: Sequence[int] = ()
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images [B, 3, S, S] -> (global feature [B, D], tokens after each listed 1-based
        block [B, G*G, V], class token dropped, no norm or projection)."""
        return self.visual(images, list(layers))

    def encode_text_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor,
                               positions: torch.Tensor | None = None,
                               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, W] (T <= context length, before the position embedding)
        and the end-token position of each row [B] -> text features [B, D]; or several read
        positions per row [B, k] -> [B, k, D].

        Positions after the end token never influence it (causal mask), so callers may cut
        the sequence right after the largest end-token index. Packed sequences: ``positions``
        [T] (position-embedding index of each slot) and ``attn_mask`` [T, T] (bool, True: may
        attend) replace the plain 0..T-1 and the causal mask."""
        t = x.shape[1]
        if positions is None:
            if t > self.context_length:
                raise ValueError(f"text of {t} positions is longer than the context length "
                                 f"{self.context_length}")
            x = x + self.positional_embedding[:t].to(x.dtype)
        else:
            x = x + self.positional_embedding[positions].to(x.dtype)
        for block in self.transformer.resblocks:
            x = block(x, causal=attn_mask is None, attn_mask=attn_mask)
        x = self.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if eot_index.dim() == 2:
            rows = rows[:, None]                                      # [B, k] read positions
        return x[rows, eot_index] @ self.text_projection.to(x.dtype)  # [B, D] or [B, k, D]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] (end token = the largest id of a row) -> [B, D]."""
        eot = tokens.argmax(dim=-1)
        t = int(eot.max()) + 1 if tokens.numel() else 1
        return self.encode_text_embeddings(self.token_embedding(tokens[:, :t]), eot)
