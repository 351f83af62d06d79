"""Export of one class's whole detector (both CLIP towers, the prompt flows, RCA, the heads
and the scoring) to one ONNX graph, run by :class:`utils.onnx_detector.OnnxDetector`.

The graph takes ``image`` [B, 3, S, S] float32 (preprocessed as ``models.imaging.preprocess``;
the batch axis dynamic) and returns ``image_score`` [B] and ``anomaly_map`` [B, S, S]: the text
score and the unsmoothed map of ``AnomalyDetector.predict(image, class_name,
noise=shared_noise(R, B, D, seed))``. Baked in as constants, because a deployed file scores
one class the same way every time:

* the class name's token embeddings (the text around the prompt vectors; the 49408-row token
  table itself stays out of the file);
* the image-specific noise ``shared_noise(R, 1, D, seed)``, the same draws for every image, so
  that an image's result depends neither on its batch nor on its position;
* the image-agnostic (normal, abnormal) state samples: they do not depend on the image, so
  their flows run once, at export;
* the stage, the layers, R, the image size and, with references, the few-shot memory bank
  (``anomaly_map`` is then the zero-shot map + ``fewshot_weight`` x ``fewshot_map``, and
  ``fewshot_map`` is an output too);
* with ``uncertainty``: ``anomaly_map_std``, ``image_score_std`` and ``score_std`` (the spread
  of the per-sample score 0.5 (text score + top-k map mean), k the class's official top-k).

:class:`ExportedDetector` is the traceable module: it calls the detector's own modules (the
CLIP towers, ``PFL_context``, ``prompt_vectors``, ``image_logits``, ``pixel_logits``) and
computes in its own, traceable, form what the PyTorch path computes with data-dependent Python
(the text cut read from the tokens, the chunked few-shot search, the per-image top-k); the
parity tests (tests/test_onnx.py) prove the two equal.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.bayes_pfl import encode_packed_pairs, packed_pair_layout
from models.detector import AnomalyDetector
from models.fewshot import DEFAULT_CHUNK_ELEMENTS, ReferenceBank
from models.noise import shared_noise
from models.weights import sha256_of
from models.wording import prompt_class_name
from utils.onnx_detector import encode_metadata, require_onnx
from utils.protocol import topk_for_class
from utils.provenance import code_version
from dataset.outputs import ONNX_DOC, check_writable
from utils.results import OutputError

log = logging.getLogger(__name__)

# A protobuf file holds at most 2 GiB: weights beyond this go to an external data file.
EXTERNAL_DATA_BYTES = 2**31 - 2**26
# --fp16: float32 initialisers of at least this many values (the weight matrices, the
# position grids, a reference bank) are stored as float16, with a Cast back to float32 in the
# graph; the smaller ones (biases, LayerNorms, the baked noise, state samples and prompt
# vectors: a few hundred kB in all) stay float32.
FP16_MIN_ELEMENTS = 1 << 16
# Example batch of the trace (sizes 0 and 1 would be specialised by torch.export).
TRACE_BATCH = 2


def graph_fewshot_map(tokens: list[torch.Tensor], bank: list[torch.Tensor], image_size: int,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """``models.fewshot.fewshot_map`` in a traceable form: layer tokens [B, G*G, V], one
    L2-normalised bank [M, V] per layer -> [B, S, S]. The bank is searched in blocks of at
    most ``chunk_elements`` / (G*G) rows (a static loop: M is fixed in the file)."""
    b, patches = tokens[0].shape[:2]
    g = math.isqrt(patches)
    total = None
    for layer_tokens, layer_bank in zip(tokens, bank):
        queries = F.normalize(layer_tokens.float(), dim=-1)               # [B, GG, V]
        rows = max(1, min(layer_bank.shape[0], chunk_elements // patches))
        best = None
        for start in range(0, layer_bank.shape[0], rows):
            sims = queries @ layer_bank[start:start + rows].T              # [B, GG, m']
            top = sims.amax(dim=-1)                                        # [B, GG]
            best = top if best is None else torch.maximum(best, top)
        distance = 1.0 - best
        total = distance if total is None else total + distance
    grid = (total / len(tokens)).reshape(b, 1, g, g)                       # [B, 1, G, G]
    return F.interpolate(grid, size=(image_size, image_size), mode="bilinear",
                         align_corners=True)[:, 0]


def graph_scores(image_logits: torch.Tensor, pixel_logits: list[torch.Tensor], prompt_num: int,
                 image_size: int, offset: torch.Tensor | None = None, uncertainty: bool = False,
                 topk: int | None = None) -> dict[str, torch.Tensor]:
    """``AnomalyDetector.score`` in a traceable form: image logits [B, 2NR], pixel logits per
    layer [B, 2NR, G, G] -> ``image_score`` [B], ``anomaly_map`` [B, S, S] (+ ``offset``, the
    weighted few-shot map) and, with ``uncertainty``, ``anomaly_map_std`` [B, S, S],
    ``image_score_std`` [B] and ``score_std`` [B] (ddof 0 over the R samples; the per-sample
    score uses the mean of the ``topk`` largest values of the per-sample map + ``offset``)."""
    pairs = image_logits.shape[1] // 2                                     # N R
    n, layers, s = prompt_num, len(pixel_logits), image_size
    samples = pairs // n
    pair_scores = torch.sigmoid(image_logits[:, pairs:] - image_logits[:, :pairs])  # [B, NR]
    out = {"image_score": pair_scores.mean(1)}
    diffs = [logits[:, pairs:] - logits[:, :pairs] for logits in pixel_logits]  # [B, NR, G, G]
    total = None
    sample_maps = []
    for r in range(samples):
        sample_sum = None
        for diff in diffs:
            up = F.interpolate(diff[:, r * n:(r + 1) * n], size=(s, s), mode="bilinear",
                               align_corners=True)                         # [B, N, S, S]
            part = torch.sigmoid(up).sum(1)                                # [B, S, S]
            sample_sum = part if sample_sum is None else sample_sum + part
        total = sample_sum if total is None else total + sample_sum
        if uncertainty:
            sample_maps.append(sample_sum / (n * layers))
    amap = total / (pairs * layers)                                        # [B, S, S]
    out["anomaly_map"] = amap if offset is None else amap + offset
    if uncertainty:
        maps = torch.stack(sample_maps, 1)                                 # [B, R, S, S]
        out["anomaly_map_std"] = ((maps - amap[:, None]) ** 2).mean(1).sqrt()
        sample_scores = pair_scores.reshape(-1, samples, n).mean(2)        # [B, R]
        out["image_score_std"] = _spread(sample_scores)
        shifted = maps if offset is None else maps + offset[:, None]
        top = shifted.flatten(2).topk(min(topk, s * s), dim=2).values.mean(2)  # [B, R]
        out["score_std"] = _spread(0.5 * (sample_scores + top))
    return out


def _spread(values: torch.Tensor) -> torch.Tensor:
    """Standard deviation (ddof 0) over dim 1 of [B, R] -> [B]."""
    return ((values - values.mean(1, keepdim=True)) ** 2).mean(1).sqrt()


class ExportedDetector(nn.Module):
    """One class's detector as a traceable module: ``forward(image [B, 3, S, S])`` -> the
    tuple of :attr:`output_names` (``image_score`` [B], ``anomaly_map`` [B, S, S], then
    ``fewshot_map`` with references, then the spreads with ``uncertainty``).

    It holds the detector's CLIP and Bayes-PFL modules (their parameters become the graph's
    weights) and, as buffers, the constants of the class and the seed."""

    def __init__(self, detector: AnomalyDetector, class_name: str, seed: int = 111,
                 references: ReferenceBank | None = None, uncertainty: bool = False):
        super().__init__()
        model, clip = detector.model, detector.clip
        device = detector.device
        self.clip, self.model = clip, model
        self.layers = list(detector.layers)
        self.stage = detector.stage
        self.image_size = detector.image_size
        self.sample_num = detector.sample_num
        self.prompt_num = model.prompt_num
        self.context_len = model.prompt_context_len
        self.fewshot_weight = detector.fewshot_weight
        self.fewshot_chunk = detector.fewshot_chunk
        self.uncertainty = bool(uncertainty)
        self.topk = min(topk_for_class(class_name), detector.image_size ** 2)
        self.class_name = class_name
        self.prompt_text = "X " + prompt_class_name(class_name, model.wording)

        # the class text around the prompt vectors: [SOS] and the name tokens onwards
        model.check_class_names([class_name])           # one SettingsError if it cannot fit
        tokens = model.class_tokens([class_name], device)                   # [1, 77]
        m = model.prompt_context_len + model.prompt_state_len
        t = model.text_positions(int(tokens[0].argmax()) + 1, m)            # positions run
        eot = t - 1                                                         # after insertion
        with torch.no_grad():
            emb = clip.token_embedding(tokens).float()                      # [1, 77, W]
        self.register_buffer("sos", emb[:, :1].clone())                     # [1, 1, W]
        self.register_buffer("name_tail", emb[:, 2:t - m + 1].clone())      # [1, T', W]
        positions, mask = packed_pair_layout(t, 1 + self.context_len, device)
        self.register_buffer("positions", positions)                        # [2t - 1 - P]
        self.register_buffer("mask", mask)                                  # [2t-1-P, 2t-1-P]
        suffix = t - 1 - self.context_len
        self.register_buffer("read", torch.tensor([[eot, eot + suffix]], device=device))

        # the noise of the seed; the image-agnostic samples drawn once, here
        dim = model.prompt_context.shape[-1]
        noise = shared_noise(self.sample_num, 1, dim, seed)
        with torch.no_grad():
            normal = model.PFL_normal(noise["normal"].to(device, torch.float32)).zk
            abnormal = model.PFL_abnormal(noise["abnormal"].to(device, torch.float32)).zk
        self.register_buffer("context_noise", noise["context"].to(device))  # [R, 1, D]
        self.register_buffer("normal_states", normal)                       # [R, 1, D]
        self.register_buffer("abnormal_states", abnormal)                   # [R, 1, D]

        self.reference_count = 0
        self.reference_paths: tuple[str, ...] = ()
        if references is not None:
            references.check_for(self.layers, self.image_size)
            self.reference_count = references.count
            self.reference_paths = tuple(references.paths)
            for i, bank in enumerate(references.tokens):
                self.register_buffer(f"bank_{i}", bank.to(device).float())  # [K GG, V]

    @property
    def output_names(self) -> list[str]:
        names = ["image_score", "anomaly_map"]
        if self.reference_count:
            names.append("fewshot_map")
        if self.uncertainty:
            names += ["anomaly_map_std", "image_score_std", "score_std"]
        return names

    def text_embeddings(self, context: torch.Tensor) -> torch.Tensor:
        """Context samples [R, B, D] -> N*R normal then N*R abnormal L2-normalised text
        embeddings per image, sample-major, [B, 2NR, D]: ``BayesPFL.encode_prompt_pairs``
        (packed pairs) with the class text's cut and end positions fixed."""
        prompts = self.model.prompt_vectors(context, self.normal_states,
                                            self.abnormal_states)           # [B, 2, R, N, m, W]
        b, r, n, m = prompts.shape[0], prompts.shape[2], prompts.shape[3], prompts.shape[4]
        feats = encode_packed_pairs(self.clip, prompts.reshape(b, 2, r * n, m, -1), self.sos,
                                    self.name_tail, self.context_len,
                                    self.read.expand(b * r * n, 2), self.positions,
                                    self.mask)                               # [B, n, 2, D]
        return feats.reshape(b, r, n, 2, -1).movedim(-2, 1).flatten(1, 3)  # [B, 2NR, D]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, tokens = self.clip.encode_image(image, self.layers)       # [B, D], [B, GG, V]
        b = features.shape[0]
        context = self.model.PFL_context(features,
                                         self.context_noise.expand(-1, b, -1)).zk  # [R, B, D]
        text = self.text_embeddings(context)                                 # [B, 2NR, D]
        image_logits = self.model.image_logits(features, tokens, text, self.stage)
        pixel_logits = self.model.pixel_logits(tokens, text)                 # [B, 2NR, G, G]
        fewshot = offset = None
        if self.reference_count:
            bank = [getattr(self, f"bank_{i}") for i in range(len(self.layers))]
            fewshot = graph_fewshot_map(tokens, bank, self.image_size, self.fewshot_chunk)
            offset = self.fewshot_weight * fewshot
        out = graph_scores(image_logits, pixel_logits, self.prompt_num, self.image_size,
                           offset, self.uncertainty, self.topk)
        if fewshot is not None:
            out["fewshot_map"] = fewshot
        return tuple(out[name] for name in self.output_names)


@dataclass
class TracedDetector:
    """An exported graph in memory, before it is written: the ONNX ``ModelProto`` and the
    metadata it will record."""
    proto: object
    metadata: dict
    seconds: float                   # the trace and the conversion to ONNX


@dataclass
class ExportResult:
    """What :func:`write_onnx` wrote."""
    path: str
    files: list[str]                 # the .onnx file, then its external data file if any
    size_bytes: int                  # all files together
    seconds: float                   # trace, conversion and writing
    metadata: dict = field(default_factory=dict)


def export_metadata(module: ExportedDetector, detector: AnomalyDetector, seed: int,
                    clip_path: str | None, checkpoint_path: str | None,
                    opset: int | None) -> dict:
    """The settings a deployed file records (``metadata_props``; read back by OnnxDetector)."""
    version = code_version()
    spec = detector.spec.to_dict() if detector.spec is not None else None
    return {
        "class_name": module.class_name, "prompt": module.prompt_text, "seed": int(seed),
        "sample_num": module.sample_num, "image_size": module.image_size,
        "stage": module.stage, "layers": module.layers,
        "embed_dim": int(detector.model.prompt_context.shape[-1]),
        "prompt_num": module.prompt_num, "topk": module.topk,
        "uncertainty": module.uncertainty, "fp16_weights": False,
        "references": module.reference_count, "reference_paths": list(module.reference_paths),
        "fewshot_weight": module.fewshot_weight, "outputs": module.output_names,
        "backbone": detector.clip.geometry.name, "model_spec": spec,
        "clip_file": clip_path and os.path.basename(clip_path),
        "clip_sha256": sha256_of(clip_path) if clip_path else None,
        "checkpoint_file": checkpoint_path and os.path.basename(checkpoint_path),
        "checkpoint_sha256": sha256_of(checkpoint_path) if checkpoint_path else None,
        "version": version["version"], "commit": version["commit"], "opset": opset,
    }


def fp16_initializers(model_proto, min_elements: int = FP16_MIN_ELEMENTS) -> int:
    """Store the float32 initialisers of at least ``min_elements`` values as float16, each
    followed by a Cast back to float32 under its old name (the graph computes in float32 and
    its nodes are unchanged), in place. Returns how many were converted."""
    onnx = require_onnx()
    from onnx import numpy_helper

    graph = model_proto.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or math.prod(init.dims) < min_elements:
            kept.append(init)
            continue
        half = numpy_helper.to_array(init).astype("float16")
        stored = numpy_helper.from_array(half, init.name + "__fp16")
        kept.append(stored)
        casts.append(onnx.helper.make_node("Cast", [stored.name], [init.name],
                                           to=onnx.TensorProto.FLOAT,
                                           name=init.name + "__cast"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return len(casts)


def initializer_bytes(model_proto) -> int:
    """The bytes of the graph's weights (initialisers)."""
    total = 0
    for init in model_proto.graph.initializer:
        total += len(init.raw_data) if init.raw_data else 4 * math.prod(init.dims)
    return total


def trace_detector(detector: AnomalyDetector, class_name: str, seed: int = 111,
                   references: ReferenceBank | None = None, uncertainty: bool = False,
                   clip_path: str | None = None, checkpoint_path: str | None = None,
                   opset: int | None = None) -> TracedDetector:
    """Trace :class:`ExportedDetector` with ``torch.onnx.export(dynamo=True)`` (the batch axis
    dynamic) and return the ONNX graph in memory with its metadata. ``clip_path`` /
    ``checkpoint_path``: the files the detector was loaded from, recorded by name and
    SHA-256."""
    require_onnx()
    started = time.perf_counter()
    module = ExportedDetector(detector, class_name, seed, references, uncertainty).eval()
    s = detector.image_size
    example = torch.randn(TRACE_BATCH, 3, s, s, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example.to(detector.device),), None,
                                    input_names=["image"], output_names=module.output_names,
                                    dynamic_shapes={"image": {0: batch}}, dynamo=True,
                                    opset_version=opset, optimize=True, verbose=False)
    proto = program.model_proto
    used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    metadata = export_metadata(module, detector, seed, clip_path, checkpoint_path, used)
    proto.doc_string = (f"Bayes-PFL anomaly detector for the class '{class_name}' (seed {seed}, "
                        f"{module.sample_num} samples, {s} px)")
    return TracedDetector(proto, metadata, time.perf_counter() - started)


def write_onnx(traced: TracedDetector, path: str, fp16: bool = False,
               external_data: bool | None = None) -> ExportResult:
    """Write a traced graph to ``path`` with its metadata. ``fp16``: the weights stored as
    float16 (a copy of the graph is converted; the computation stays float32).
    ``external_data``: the weights in ``path + ".data"`` beside the graph; None: only when
    they exceed what one protobuf file holds (2 GiB)."""
    onnx = require_onnx()
    started = time.perf_counter()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"--out {path}: the folder {folder} does not exist; create it or "
                          f"choose another --out")
    proto = traced.proto
    if fp16:
        proto = onnx.ModelProto()
        proto.CopyFrom(traced.proto)
        log.info("stored %d weight tensors as float16", fp16_initializers(proto))
    if external_data is None:
        external_data = initializer_bytes(proto) > EXTERNAL_DATA_BYTES
    if external_data and proto is traced.proto:
        # saving as external data moves the weights out of the proto: keep the traced one
        proto = onnx.ModelProto()
        proto.CopyFrom(traced.proto)
    metadata = {**traced.metadata, "fp16_weights": bool(fp16)}
    proto.doc_string = ONNX_DOC                   # the project's marker (dataset.outputs)
    del proto.metadata_props[:]
    for key, value in encode_metadata(metadata).items():
        proto.metadata_props.add(key=key, value=value)
    data_name = os.path.basename(path) + ".data"
    files = [path] + ([os.path.join(folder, data_name)] if external_data else [])
    check_writable([path, os.path.join(folder, data_name)], "--out", folder)
    try:
        for stale in files[1:]:
            if os.path.exists(stale):
                os.remove(stale)            # external data is appended to: start empty
        onnx.save_model(proto, path, save_as_external_data=external_data,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    except OSError as error:
        raise OutputError(f"cannot write {path} ({error.strerror or error}): free some space "
                          f"or choose another --out") from None
    seconds = traced.seconds + time.perf_counter() - started
    size = sum(os.path.getsize(f) for f in files)
    log.info("wrote %s (%.1f MB)", path, size / 1e6)
    return ExportResult(path, files, size, seconds, metadata)


def export_onnx(detector: AnomalyDetector, class_name: str, path: str, seed: int = 111,
                references: ReferenceBank | None = None, uncertainty: bool = False,
                fp16: bool = False, external_data: bool | None = None,
                clip_path: str | None = None, checkpoint_path: str | None = None,
                opset: int | None = None) -> ExportResult:
    """Export ``detector`` for ``class_name`` to the ONNX file ``path``: :func:`trace_detector`
    then :func:`write_onnx` (see the module docstring for the graph)."""
    traced = trace_detector(detector, class_name, seed, references, uncertainty, clip_path,
                            checkpoint_path, opset)
    return write_onnx(traced, path, fp16, external_data)
