"""Batched zero-shot inference with a frozen CLIP and a Bayes-PFL module."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from .bayes_pfl import BayesPFL, FlowSamples


class AnomalyDetector:
    """Scores images with R Monte Carlo prompt samples (official inference path, any batch
    size).

    Image-agnostic (normal / abnormal state) samples are drawn once per evaluation run and
    reused for every image, as the official code does; ``reset_samples()`` starts a new run.
    With ``noise=None`` the standard-normal draws come from the torch RNG in the official
    order (per image: R context draws, then R normal, then R abnormal, each shaped [1, D]),
    so a seeded run gives the same samples whatever the batch size."""

    def __init__(self, clip, model: BayesPFL, image_size: int = 518, sample_num: int = 10,
                 stage: int = 2, layers: Sequence[int] = (6, 12, 18, 24),
                 precision: str = "fp32", map_chunk: int = 8):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {stage!r}")
        if len(layers) != model.num_layers:
            raise ValueError(f"{len(layers)} layers given for a Bayes-PFL module built for "
                             f"{model.num_layers}")
        if clip.image_size != image_size:
            raise ValueError(f"CLIP was loaded for {clip.image_size} px, not {image_size}: "
                             f"load_clip(..., image_size={image_size})")
        self.clip = clip
        self.model = model
        self.image_size = image_size
        self.sample_num = sample_num
        self.stage = stage
        self.layers = list(layers)
        self.precision = precision
        self.map_chunk = map_chunk
        self._states: tuple[FlowSamples, FlowSamples] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset_samples(self) -> None:
        """Forget the cached image-agnostic samples: the next call draws new ones."""
        self._states = None

    def _autocast(self):
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _draw_noise(self, batch: int, dim: int) -> dict[str, torch.Tensor]:
        """Standard-normal draws in the official order, one image after the other."""
        dev, r = self.device, self.sample_num
        ctx, normal, abnormal = [], None, None
        for _ in range(batch):
            ctx.append(torch.stack([torch.randn(1, dim, device=dev) for _ in range(r)])[:, 0])
            nrm = torch.stack([torch.randn(1, dim, device=dev) for _ in range(r)])
            abn = torch.stack([torch.randn(1, dim, device=dev) for _ in range(r)])
            if normal is None:
                normal, abnormal = nrm, abn                     # [R, 1, D]
        return {"context": torch.stack(ctx, dim=1), "normal": normal, "abnormal": abnormal}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | str,
                noise: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """images [B, 3, S, S] (preprocessed) -> {"image_score": [B], "anomaly_map": [B, S, S]}
        (maps unsmoothed). ``noise``: {"context": [R, B, D], "normal": [R, 1, D],
        "abnormal": [R, 1, D]} standard-normal draws used instead of the RNG (the state
        draws given here are used as they are and not cached)."""
        out = self.forward(images, class_names, noise)
        return {"image_score": out["image_score"], "anomaly_map": out["anomaly_map"]}

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | str,
                noise: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``predict`` plus the intermediates: image features, layer tokens, text
        embeddings."""
        model, clip = self.model, self.clip
        images = images.to(self.device, non_blocking=True)
        b = images.shape[0]
        if isinstance(class_names, str):
            class_names = [class_names] * b
        if len(class_names) != b:
            raise ValueError(f"{len(class_names)} class names for {b} images")
        with self._autocast():
            features, tokens = clip.encode_image(images, self.layers)
        features = features.float()
        tokens = [t.float() for t in tokens]
        d = features.shape[1]

        if noise is None:
            drawn = self._draw_noise(b, d)
            eps_ctx = drawn["context"]
            if self._states is None:
                self._states = (model.PFL_normal(drawn["normal"]),
                                model.PFL_abnormal(drawn["abnormal"]))
            normal, abnormal = self._states
        else:
            eps_ctx = noise["context"].to(self.device, torch.float32)
            normal = model.PFL_normal(noise["normal"].to(self.device, torch.float32))
            abnormal = model.PFL_abnormal(noise["abnormal"].to(self.device, torch.float32))
        context = model.PFL_context(features, eps_ctx)          # [R, B, D]

        with self._autocast():
            tokens_ids = model.class_tokens(class_names, self.device)
            prompts = model.prompt_vectors(context.zk, normal.zk, abnormal.zk)
            text = model.encode_prompts(clip, prompts, tokens_ids).flatten(1, 3)  # [B, 2NR, D]
        text = text.float()
        pairs = text.shape[1] // 2

        logits = model.image_logits(features, tokens, text, self.stage)           # [B, 2NR]
        image_score = torch.sigmoid(logits[:, pairs:] - logits[:, :pairs]).mean(1)

        anomaly_map = torch.zeros(b, self.image_size, self.image_size, device=self.device)
        for layer_logits in model.pixel_logits(tokens, text):                     # [B, 2NR, G, G]
            diff = layer_logits[:, pairs:] - layer_logits[:, :pairs]               # [B, NR, G, G]
            for start in range(0, pairs, self.map_chunk):
                up = F.interpolate(diff[:, start:start + self.map_chunk],
                                   size=(self.image_size, self.image_size),
                                   mode="bilinear", align_corners=True)
                anomaly_map += torch.sigmoid(up).sum(1)
        anomaly_map /= pairs * len(tokens)
        return {"image_score": image_score, "anomaly_map": anomaly_map,
                "global": features, "tokens": tokens, "text_embeddings": text}
