"""Batched zero-shot inference with a frozen CLIP and a Bayes-PFL module."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .bayes_pfl import BayesPFL, FlowSamples, Samples
from .checkpoint import load_state, open_checkpoint
from .weights import load_clip, require_clip_file
from .errors import InputError, SettingsError
from .fewshot import DEFAULT_CHUNK_ELEMENTS, ReferenceBank, fewshot_map
from .imaging import preprocess
from .noise import official_order_noise
from .precision import autocast
from .spec import OFFICIAL_LAYERS, ModelSpec, check_layers, resolve_spec

log = logging.getLogger(__name__)
# What ``predict`` returns (when computed).
PREDICTED = ("image_score", "anomaly_map", "image_score_std", "anomaly_map_std", "score_std",
             "fewshot_map")
# Reference images encoded per image-tower call when a bank is built.
REFERENCE_BATCH = 8


class AnomalyDetector:
    """Scores images with R Monte Carlo prompt samples (official inference path, any batch
    size).

    Image-agnostic (normal / abnormal state) samples are drawn once per evaluation run and
    reused for every image, as the official code does; ``reset_samples()`` starts a new run.
    With ``noise=None`` the standard-normal draws come from the torch RNG in the official
    order (per image: R context draws, then R normal, then R abnormal, each shaped [1, D]),
    so a seeded run gives the same samples whatever the batch size."""

    def __init__(self, clip, model: BayesPFL, image_size: int = 518, sample_num: int = 10,
                 stage: int = 2, layers: Sequence[int] = OFFICIAL_LAYERS,
                 precision: str = "fp32", map_chunk: int = 8, fewshot_weight: float = 1.0):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {stage!r}")
        if len(layers) != model.num_layers:
            raise ValueError(f"{len(layers)} layers given for a Bayes-PFL module built for "
                             f"{model.num_layers}")
        check_layers(layers, clip.geometry.vision_layers)
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
        # the anomaly map with references: zero-shot map + fewshot_weight * few-shot map
        self.fewshot_weight = float(fewshot_weight)
        self.fewshot_chunk = DEFAULT_CHUNK_ELEMENTS   # similarity block bound (elements)
        self._states: tuple[FlowSamples, FlowSamples] | None = None
        # the settings the detector was built with, when known (``from_files`` sets them)
        self.spec: ModelSpec | None = None

    # --------------------------------------------------------------------------------------
    # Convenience API for notebooks and predict.py

    @classmethod
    def from_files(cls, clip_path: str, checkpoint_path: str, image_size: int | None = None,
                   device: str | torch.device | None = None, sample_num: int = 10,
                   stage: int | None = None, layers: Sequence[int] | None = None,
                   prompt_num: int | None = None, prompt_context_len: int | None = None,
                   prompt_state_len: int | None = None, num_flows: int | None = None,
                   activation: str | None = None, precision: str = "fp32",
                   verify: bool = True) -> "AnomalyDetector":
        """Load OpenAI's CLIP file and a Bayes-PFL checkpoint and build a detector.

        Model settings left at None come from the checkpoint when it records them (files this
        project writes), else the official defaults (518 px, layers 6 12 18 24, N = 3, P = Q =
        5, K = 10, GELU); settings given must agree with the record. ``stage`` None: the
        recorded stage, else the file-name rule ``epoch_post_{e}_{stage}.pth``, else 2 (the
        released files). ``device`` None: CUDA when available, else CPU. The log says where
        the stage and the settings came from."""
        require_clip_file(clip_path)              # the first file first, before any reading
        checkpoint = open_checkpoint(checkpoint_path)
        spec = resolve_spec({"image_size": image_size, "layers": layers, "prompt_num": prompt_num,
                             "prompt_context_len": prompt_context_len,
                             "prompt_state_len": prompt_state_len, "num_flows": num_flows,
                             "activation": activation}, checkpoint.spec, checkpoint_path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        clip = load_clip(clip_path, image_size=spec.image_size, device=device,
                         activation=spec.activation, verify=verify)
        if spec.backbone is not None and spec.backbone != clip.geometry.name:
            raise SettingsError(f"{checkpoint_path} was trained on CLIP {spec.backbone} (recorded "
                                f"in the file) but {clip_path} is {clip.geometry.name}: pass "
                                f"the CLIP file it was trained with")
        spec = dataclasses.replace(spec, backbone=clip.geometry.name)
        model = BayesPFL.from_clip(clip, **spec.bayes_pfl_kwargs())
        load_state(model, checkpoint.state_dict, checkpoint_path)
        model.eval()
        settings = ("recorded in the checkpoint" if checkpoint.spec is not None else
                    "the official defaults (the checkpoint records none)")
        log.info("model settings %s: %s", settings, spec.to_dict())
        if stage is None:
            stage = checkpoint.stage
            log.info("stage %d: %s", stage, checkpoint.stage_source)
        else:
            log.info("stage %d: asked for", stage)
        detector = cls(clip, model, image_size=spec.image_size, sample_num=sample_num,
                       stage=stage, layers=spec.layers, precision=precision)
        detector.spec = spec
        return detector

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset_samples(self) -> None:
        """Forget the cached image-agnostic samples: the next call draws new ones."""
        self._states = None

    def _autocast(self):
        return autocast(self.device, self.precision)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | str,
                noise: dict[str, torch.Tensor] | None = None, return_std: bool = False,
                topk: Sequence[int] | None = None, references: ReferenceBank | None = None
                ) -> dict[str, torch.Tensor]:
        """images [B, 3, S, S] (preprocessed) -> {"image_score": [B], "anomaly_map": [B, S, S]}
        (maps unsmoothed). ``noise``: {"context": [R, B, D], "normal": [R, 1, D],
        "abnormal": [R, 1, D]} standard-normal draws used instead of the RNG (the state
        draws given here are used as they are and not cached).

        ``return_std``: also the spread over the R posterior samples (ddof 0) of the
        per-sample map (the mean over the N prompts and the layers, as the mean map is built,
        before smoothing) and of the per-sample image score: ``anomaly_map_std`` [B, S, S],
        ``image_score_std`` [B]. With ``topk`` (one k per image) also ``score_std`` [B], the
        spread of the per-sample score 0.5 (image score + mean of the k largest map values).

        ``references`` (a bank from :meth:`reference_bank`): also ``fewshot_map`` [B, S, S]
        (unsmoothed), and ``anomaly_map`` is the zero-shot map plus ``fewshot_weight`` times
        it (the image score stays the text score)."""
        out = self.forward(images, class_names, noise, return_std, topk, references)
        return {k: v for k, v in out.items() if k in PREDICTED}

    @torch.no_grad()
    def reference_bank(self, images, chunk: int = REFERENCE_BATCH,
                       exif_transpose: bool = True) -> ReferenceBank:
        """The memory bank of K good reference images: a preprocessed [K, 3, S, S] batch, or
        a sequence of paths, PIL images or arrays (read by range, ``models.imaging``; turned
        upright by their EXIF orientation unless ``exif_transpose`` is False, as
        ``predict_images`` reads the images it scores) or preprocessed [3, S, S] tensors. The
        image tower runs ``chunk`` images at a time."""
        paths: tuple[str, ...] = ()
        if isinstance(images, torch.Tensor):
            batch = self.check_images(images, "the reference batch")
        else:
            if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
                images = [images]
            images = list(images)
            if not images:
                raise InputError("no reference images: give at least one good image")
            if all(isinstance(im, (str, os.PathLike)) for im in images):
                paths = tuple(os.fspath(im) for im in images)
            batch = torch.stack([
                self.check_images(im[None], "a reference tensor")[0] if isinstance(
                    im, torch.Tensor) else preprocess(im, self.image_size, exif_transpose)
                for im in images])
        if batch.shape[0] == 0:
            raise InputError("no reference images: give at least one good image")
        parts: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for start in range(0, batch.shape[0], chunk):
            _, tokens = self.encode_images(batch[start:start + chunk].to(self.device))
            for layer, t in enumerate(tokens):
                parts[layer].append(t)                                  # [k, G*G, V]
        return ReferenceBank.from_tokens([torch.cat(p) for p in parts], self.layers,
                                         self.image_size, paths)

    def check_images(self, images, what: str = "the images") -> torch.Tensor:
        """``images`` if it is a preprocessed batch this detector takes (a finite floating
        tensor [B, 3, S, S], B >= 1), else one InputError saying what it is."""
        s = self.image_size
        if not isinstance(images, torch.Tensor):
            raise InputError(f"{what} must be a preprocessed float tensor [B, 3, {s}, {s}], not "
                             f"a {type(images).__name__}: use utils.inference.predict_images "
                             f"for paths, PIL images and arrays")
        shape = list(images.shape)
        if not images.is_floating_point():
            raise InputError(f"{what} are a {images.dtype} tensor {shape}: AnomalyDetector.predict "
                             f"takes preprocessed float batches (models.imaging.preprocess, or "
                             f"utils.inference.predict_images for raw images)")
        if images.dim() != 4 or images.shape[1] != 3 or shape[2:] != [s, s]:
            hint = " (add the batch axis: images[None])" if images.dim() == 3 else ""
            raise InputError(f"{what} have the shape {shape}: expected [B, 3, {s}, {s}]{hint}")
        if images.shape[0] == 0:
            raise InputError(f"{what} are an empty batch: give at least one image")
        if not torch.isfinite(images).all():
            raise InputError(f"{what} hold NaN or infinite values")
        return images

    # --------------------------------------------------------------------------------------
    # The stages of one forward (the benchmarks time them one by one)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Frozen image tower: images [B, 3, S, S] -> global features [B, D], layer tokens
        [B, G*G, V] (fp32 whatever the precision)."""
        with self._autocast():
            features, tokens = self.clip.encode_image(images, self.layers)
        return features.float(), [t.float() for t in tokens]

    def draw_samples(self, features: torch.Tensor, noise: dict[str, torch.Tensor] | None
                     ) -> Samples:
        """Prompt samples: context [R, B, D] from the image features, states [R, 1, D]
        (cached per evaluation run when drawn from the RNG)."""
        model = self.model
        if noise is None:
            drawn = official_order_noise(self.sample_num, features.shape[0], features.shape[1],
                                         self.device)
            eps_ctx = drawn["context"]
            if self._states is None:
                self._states = (model.PFL_normal(drawn["normal"]),
                                model.PFL_abnormal(drawn["abnormal"]))
            normal, abnormal = self._states
        else:
            eps_ctx = noise["context"].to(self.device, torch.float32)
            normal = model.PFL_normal(noise["normal"].to(self.device, torch.float32))
            abnormal = model.PFL_abnormal(noise["abnormal"].to(self.device, torch.float32))
        return Samples(model.PFL_context(features, eps_ctx), normal, abnormal)

    def encode_text(self, samples: Samples, class_names: Sequence[str]) -> torch.Tensor:
        """Text tower over all prompts: N*R normal then N*R abnormal embeddings per image,
        [B, 2NR, D] fp32."""
        with self._autocast():
            text = self.model.text_embeddings(self.clip, samples, class_names)
        return text.float()

    def head_logits(self, features: torch.Tensor, tokens: list[torch.Tensor],
                    text: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image logits [B, 2NR] and per-layer pixel logits [B, 2NR, G, G] (fp32)."""
        image = self.model.image_logits(features, tokens, text, self.stage)
        return image, self.model.pixel_logits(tokens, text)

    def score(self, image_logits: torch.Tensor, pixel_logits: list[torch.Tensor],
              return_std: bool = False, topk: Sequence[int] | None = None,
              offset: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean abnormal probability over the prompt pairs: ``image_score`` [B] and, over
        layers too, the upsampled ``anomaly_map`` [B, S, S] (see :meth:`predict` for the
        spreads). A 2-way softmax is the sigmoid of the difference and bilinear upsampling is
        linear, so each pair's difference is upsampled once. The maps are built sample by
        sample (pairs are sample-major): the spread of the per-sample maps is a running
        (Welford) sum, without holding the R per-sample maps. ``offset`` [B, S, S] (the
        weighted few-shot map) is added to the map and to every per-sample map (so the
        per-sample scores of ``score_std`` see it; the spread of the maps does not change)."""
        pairs = image_logits.shape[1] // 2                                  # N R
        n = self.model.prompt_num
        samples, layers = pairs // n, len(pixel_logits)
        pair_scores = torch.sigmoid(image_logits[:, pairs:] - image_logits[:, :pairs])
        out = {"image_score": pair_scores.mean(1)}
        b, s = image_logits.shape[0], self.image_size
        diffs = [logits[:, pairs:] - logits[:, :pairs] for logits in pixel_logits]  # [B, NR, G, G]
        total = torch.zeros(b, s, s, device=image_logits.device)
        mean = m2 = fused = None
        if return_std:
            mean, m2 = torch.zeros_like(total), torch.zeros_like(total)
            sample_scores = pair_scores.view(b, samples, n).mean(2)        # [B, R]
            out["image_score_std"] = sample_scores.std(1, correction=0)
            fused = []
        for r in range(samples):
            sample_map = torch.zeros_like(total)
            for diff in diffs:
                for start in range(r * n, (r + 1) * n, self.map_chunk):
                    stop = min(start + self.map_chunk, (r + 1) * n)
                    up = F.interpolate(diff[:, start:stop], size=(s, s), mode="bilinear",
                                       align_corners=True)
                    sample_map += torch.sigmoid(up).sum(1)
            total += sample_map
            if return_std:
                sample_map /= n * layers                                     # [B, S, S]
                delta = sample_map - mean
                mean += delta / (r + 1)
                m2 += delta * (sample_map - mean)
                if topk is not None:
                    flat = (sample_map if offset is None else sample_map + offset).flatten(1)
                    top = torch.stack([flat[i].topk(min(k, flat.shape[1])).values.mean()
                                       for i, k in enumerate(topk)])
                    fused.append(0.5 * (sample_scores[:, r] + top))
        out["anomaly_map"] = total / (pairs * layers)
        if offset is not None:
            out["anomaly_map"] = out["anomaly_map"] + offset
        if return_std:
            out["anomaly_map_std"] = (m2 / samples).clamp(min=0).sqrt()
            if topk is not None:
                out["score_std"] = torch.stack(fused, 1).std(1, correction=0)
        return out

    def fewshot(self, tokens: list[torch.Tensor], references: ReferenceBank) -> torch.Tensor:
        """The few-shot map [B, S, S] of layer tokens [B, G*G, V] against a bank made by this
        detector's image tower (its layers and image size; checked)."""
        references.check_for(self.layers, self.image_size)
        bank = references if references.device == tokens[0].device else references.to(
            tokens[0].device)
        return fewshot_map(tokens, bank, self.image_size, self.fewshot_chunk)

    @torch.no_grad()
    def forward_features(self, features: torch.Tensor, tokens: list[torch.Tensor],
                         class_names: Sequence[str], noise: dict[str, torch.Tensor] | None = None,
                         return_std: bool = False, topk: Sequence[int] | None = None,
                         references: ReferenceBank | None = None,
                         fewshot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything after the frozen image tower, from its outputs (global features [B, D],
        layer tokens [B, G*G, V]): the scores, maps (and spreads) and the text embeddings. The
        image tower's outputs do not depend on the prompt samples, so several runs (seeds)
        over the same images can share one image-tower pass; ``fewshot`` (the few-shot map of
        these images against ``references``, [B, S, S]) can likewise be computed once for
        them and passed here instead of ``references``."""
        if fewshot is None and references is not None:
            fewshot = self.fewshot(tokens, references)
        return self.forward_features_shots(features, tokens, class_names, {None: fewshot},
                                           noise, return_std, topk)[None]

    @torch.no_grad()
    def forward_features_shots(self, features: torch.Tensor, tokens: list[torch.Tensor],
                               class_names: Sequence[str], fewshots: Mapping,
                               noise: dict[str, torch.Tensor] | None = None,
                               return_std: bool = False, topk: Sequence[int] | None = None
                               ) -> dict:
        """:meth:`forward_features` for several few-shot maps of the same images ({key:
        [B, S, S] map, or None for zero-shot}): the prompt samples, the text tower, the heads
        and the zero-shot maps are computed once, and each map's weighted few-shot offset is
        added to them (:meth:`score`: the offset changes nothing else, but for the per-sample
        fused scores of ``score_std``, scored once per map). Returns {key: outputs}."""
        samples = self.draw_samples(features, noise)
        text = self.encode_text(samples, class_names)                       # [B, 2NR, D]
        image_logits, pixel_logits = self.head_logits(features, tokens, text)
        per_map = return_std and topk is not None
        shared = None if per_map else self.score(image_logits, pixel_logits, return_std)
        outs = {}
        for key, fewshot in fewshots.items():
            offset = None if fewshot is None else self.fewshot_weight * fewshot
            if per_map:
                out = self.score(image_logits, pixel_logits, return_std, topk, offset)
            else:
                out = dict(shared)
                if offset is not None:
                    out["anomaly_map"] = shared["anomaly_map"] + offset
            if fewshot is not None:
                out["fewshot_map"] = fewshot
            outs[key] = {**out, "text_embeddings": text}
        return outs

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str] | str,
                noise: dict[str, torch.Tensor] | None = None, return_std: bool = False,
                topk: Sequence[int] | None = None, references: ReferenceBank | None = None
                ) -> dict[str, torch.Tensor]:
        """``predict`` plus the intermediates: image features, layer tokens, text
        embeddings."""
        images = self.check_images(images)
        class_names = self.class_names_of(class_names, images.shape[0])
        self.model.check_class_names(class_names)     # one SettingsError before any work
        if references is not None and not isinstance(references, ReferenceBank):
            raise InputError(f"references must be a bank from AnomalyDetector.reference_bank(), "
                             f"not a {type(references).__name__}")
        images = images.to(self.device, non_blocking=True)
        features, tokens = self.encode_images(images)
        out = self.forward_features(features, tokens, class_names, noise, return_std, topk,
                                    references)
        return {**out, "global": features, "tokens": tokens}

    @staticmethod
    def class_names_of(class_names: Sequence[str] | str, batch: int) -> list[str]:
        """One class name per image (a single name is repeated); each a non-empty string."""
        if isinstance(class_names, str):
            names = [class_names] * batch
        elif isinstance(class_names, (list, tuple)):
            names = list(class_names)
        else:
            raise InputError(f"the class name must be a string (or one per image), not "
                             f"{class_names!r}")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"a class name must be a non-empty string, not {name!r}")
        if len(names) != batch:
            raise InputError(f"{len(names)} class names for {batch} images")
        return names
