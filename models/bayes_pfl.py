"""Bayes-PFL: the prompt bank, prompt insertion into CLIP's text tower, RCA and the heads.

The module holds only Bayes-PFL's own parameters (the checkpoint); the frozen CLIP is passed
to the methods that need it. Its state dict has the official keys and shapes
(``torch.load(f)["MyModel"]`` loads strictly).

Symbols: B images, R samples, N prompts in the bank, P context / Q state vectors, K flows,
D CLIP embed dim, W text width (== D), V vision width, L layers, G grid side, S image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SettingsError
from .heads import RCA, Fuse
from .losses import dice_loss, focal_loss, orthogonality_loss
from .prompt_flow import (Decoder, FlowSamples, GaussianEncoder, ImageAgnosticFlow,
                          ImageSpecificFlow, kl_term)
from .spec import OFFICIAL_LAYERS
from .tokenizer import CONTEXT_LENGTH, default_tokenizer, tokenize
from .wording import prompt_class_name

# How the text tower runs: "packed" (default): sequences cut after the last end token, each
# (normal, abnormal) prompt pair one packed sequence that computes their shared [SOS] +
# context prefix once; "cut": cut, one sequence per prompt; "full": all 77 positions, one
# sequence per prompt (the plain computation). All three are exact (causal mask).
TEXT_MODES = ("packed", "cut", "full")


def packed_pair_layout(t: int, prefix: int, device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout of two sequences of t positions that share their first ``prefix`` positions,
    packed as [prefix, rest of the first, rest of the second] (2t - prefix slots).

    Returns the position index of each slot [2t - prefix] and the attention mask
    [2t - prefix, 2t - prefix] (True: may attend): causal within each sequence, the second's
    slots never seeing the first's own. Built on ``device`` (no host-device copy)."""
    positions = torch.cat([torch.arange(t, device=device),
                           torch.arange(prefix, t, device=device)])
    slot = torch.arange(positions.numel(), device=device)
    part = (slot >= t).long() - (slot < prefix).long()         # -1 shared, 0 first, 1 second
    causal = positions[None, :] <= positions[:, None]
    visible = (part[None, :] == -1) | (part[None, :] == part[:, None])
    return positions, causal & visible


def encode_packed_pairs(clip, pairs: torch.Tensor, sos: torch.Tensor, tail: torch.Tensor,
                        context_len: int, read: torch.Tensor, positions: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """The text tower on packed prompt pairs (:func:`packed_pair_layout`): pairs
    [B, 2, n, P+Q, W] (normal, abnormal; the same P context vectors in both), the [SOS]
    embedding [B or 1, 1, W] and the class text's embeddings after "X" [B or 1, T', W]; read
    [B n, 2]: the slots of the normal and the abnormal [EOT]. Returns L2-normalised
    embeddings [B, n, 2, D]."""
    b, _, n = pairs.shape[:3]
    p = context_len
    tail = tail[:, None].expand(b, n, -1, -1)
    seq = torch.cat([
        sos[:, None].expand(b, n, 1, -1),                       # [SOS]
        pairs[:, 0, :, :p],                                     # shared context vectors
        pairs[:, 0, :, p:], tail,                               # normal states, name, EOT...
        pairs[:, 1, :, p:], tail,                               # abnormal states, name, EOT...
    ], dim=2)                                                   # [B, n, 1 + P + 2s, W]
    feats = clip.encode_text_embeddings(seq.flatten(0, 1), read, positions=positions,
                                        attn_mask=mask)         # [B n, 2, D]
    return F.normalize(feats, dim=-1).reshape(b, n, 2, -1)


@dataclass
class Samples:
    """Prompt offsets of one forward: context [R, B, D]; states [R, 1, D]."""
    context: FlowSamples
    normal: FlowSamples
    abnormal: FlowSamples


class BayesPFL(nn.Module):
    def __init__(self, embed_dim: int, text_width: int, vision_width: int, num_layers: int,
                 prompt_num: int = 3, prompt_context_len: int = 5, prompt_state_len: int = 5,
                 num_flows: int = 10):
        super().__init__()
        if embed_dim != text_width:
            raise ValueError(f"Bayes-PFL adds prompt samples of dimension {embed_dim} (CLIP "
                             f"embed dim) to prompt vectors of the text width {text_width}: "
                             "the two must be equal")
        d, v = embed_dim, vision_width
        self.prompt_num = prompt_num
        self.prompt_context_len = prompt_context_len
        self.prompt_state_len = prompt_state_len
        self.num_flows = num_flows
        self.num_layers = num_layers
        # How the text tower runs (all exact, by the causal mask; see TEXT_MODES).
        self.text_mode = "packed"

        self.prompt_context = nn.Parameter(torch.empty(prompt_num, prompt_context_len, d))
        self.prompt_state_normal = nn.Parameter(torch.empty(prompt_num, prompt_state_len, d))
        self.prompt_state_abnormal = nn.Parameter(torch.empty(prompt_num, prompt_state_len, d))
        self.temperature_pixel = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.temperature_image = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        # Shared modules: registered under several names, as in the official checkpoints.
        self.context_encoder = GaussianEncoder(d, v // 2)
        self.context_decoder = Decoder(d, v // 2)
        self.state_encoder = GaussianEncoder(d, v // 2)
        self.state_decoder = Decoder(d, v // 2)
        self.PFL_context = ImageSpecificFlow(self.context_encoder, self.context_decoder, d,
                                             num_flows)
        self.PFL_normal = ImageAgnosticFlow(self.state_encoder, self.state_decoder, d,
                                            num_flows)
        self.PFL_abnormal = ImageAgnosticFlow(self.state_encoder, self.state_decoder, d,
                                              num_flows)
        self.fuse = Fuse(num_layers * v, v // 2, d)
        self.RCA = RCA(d, v, num_layers)
        self.class_mapping = nn.Linear(d, d)
        self.image_mapping = nn.Linear(d, d)
        self.reset_parameters()
        # class name -> prompt words beyond the official wording (a dataset's registry row)
        self.wording: dict[str, str] = {}
        self._class_tokens: dict[str, torch.Tensor] = {}
        self._text_tokens: dict[str, int] = {}          # class text -> its token count

    @property
    def text_mode(self) -> str:
        return self._text_mode

    @text_mode.setter
    def text_mode(self, mode: str) -> None:
        if mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {', '.join(TEXT_MODES)}, not {mode!r}")
        self._text_mode = mode

    @classmethod
    def from_clip(cls, clip, prompt_num: int = 3, prompt_context_len: int = 5,
                  prompt_state_len: int = 5, num_flows: int = 10,
                  layers: Sequence[int] = OFFICIAL_LAYERS) -> "BayesPFL":
        model = cls(clip.embed_dim, clip.text_width, clip.vision_width, len(layers),
                    prompt_num, prompt_context_len, prompt_state_len, num_flows)
        return model.to(next(clip.parameters()).device)

    def reset_parameters(self) -> None:
        """The official initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for flow in (self.PFL_normal, self.PFL_abnormal):
            for p in (flow.amor_u, flow.amor_w, flow.amor_b, flow.state):
                nn.init.normal_(p)
        nn.init.trunc_normal_(self.prompt_context, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.prompt_state_normal, mean=0.5, std=0.02)
        nn.init.trunc_normal_(self.prompt_state_abnormal, mean=-0.5, std=0.02)
        with torch.no_grad():
            self.temperature_pixel.fill_(math.log(1 / 0.07))
            self.temperature_image.fill_(math.log(1 / 0.07))

    # ---------------------------------------------------------------------------------------
    # Sampling

    def sample(self, image_features: torch.Tensor, eps_context: torch.Tensor,
               eps_normal: torch.Tensor, eps_abnormal: torch.Tensor) -> Samples:
        """Draws given the standard-normal noise: context [R, B, D], states [R, 1, D]."""
        return Samples(self.PFL_context(image_features, eps_context),
                       self.PFL_normal(eps_normal), self.PFL_abnormal(eps_abnormal))

    # ---------------------------------------------------------------------------------------
    # Text side

    def class_tokens(self, class_names: Sequence[str],
                     device: torch.device | str = "cpu") -> torch.Tensor:
        """Token ids [B, 77] of "X <class name>" for each image (cached per name)."""
        rows = []
        for name in class_names:
            text = "X " + prompt_class_name(name, self.wording)
            if text not in self._class_tokens:
                self._class_tokens[text] = tokenize([text])[0]
            rows.append(self._class_tokens[text])
        return torch.stack(rows).to(device)

    def prompt_vectors(self, context: torch.Tensor, normal: torch.Tensor,
                       abnormal: torch.Tensor) -> torch.Tensor:
        """Prompt offsets -> prompt vectors [B, 2, R, N, P+Q, W].

        context [R, B, D]: added to the P context vectors; normal / abnormal [R, 1, D] or
        [R, B, D]: added to the Q state vectors of the normal / abnormal prompts."""
        ctx = self.prompt_context[None, None] + context.transpose(0, 1)[:, :, None, None]
        r, b = context.shape[:2]

        def state(bank: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            z = z.transpose(0, 1).expand(b, r, -1)              # [B, R, D]
            return bank[None, None] + z[:, :, None, None]       # [B, R, N, Q, W]

        normal_p = torch.cat([ctx, state(self.prompt_state_normal, normal)], dim=3)
        abnormal_p = torch.cat([ctx, state(self.prompt_state_abnormal, abnormal)], dim=3)
        return torch.stack([normal_p, abnormal_p], dim=1)

    @staticmethod
    def text_positions(n_tokens: int, m: int) -> int:
        """Positions the text tower runs for a class text of ``n_tokens`` tokens ([SOS], "X",
        the name, [EOT]) once its "X" is replaced by ``m`` prompt vectors."""
        return n_tokens + m - 1

    def name_token_limit(self, context_length: int = CONTEXT_LENGTH) -> int:
        """The most tokens a worded class name may have: the text tower's positions hold
        [SOS], the P+Q prompt vectors (in place of "X"), the name and [EOT]."""
        m = self.prompt_context_len + self.prompt_state_len
        return context_length - self.text_positions(3, m)

    def _too_long(self, what: str, n_name: int, context_length: int) -> str:
        m = self.prompt_context_len + self.prompt_state_len
        limit = self.name_token_limit(context_length)
        return (f"{what} is too long for the text tower: it is {n_name} tokens, and beside "
                f"[SOS], the {m} prompt vectors and [EOT] at most {limit} tokens fit in its "
                f"{context_length} positions (a common word is one token, a long or rare one "
                f"several); use a shorter class name")

    def _text_length(self, tokens: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
        """End-token index of each row after inserting m prompt vectors (CPU) and the number
        of positions the text tower runs (the cut, or the full context)."""
        ctx_len = tokens.shape[1]
        counts = tokens.cpu().argmax(dim=-1) + 1                # [B] tokens up to [EOT]
        eot = self.text_positions(counts, m) - 1                # [B] end token after insertion
        last = int(eot.max())                                   # from CPU tokens: no device sync
        if last >= ctx_len:
            raise SettingsError(self._too_long("a class name", int(counts.max()) - 3, ctx_len))
        return eot, (ctx_len if self.text_mode == "full" else last + 1)

    def check_class_names(self, class_names: Sequence[str] | str) -> None:
        """Raise one SettingsError naming the first class name (as worded in the prompt:
        ``wording``, the official rewording, lower case) that is not text or whose prompt
        does not fit the text tower's context with the P+Q prompt vectors; returns None when
        every name fits. Cheap: each text is tokenized once per model."""
        names = [class_names] if isinstance(class_names, str) else list(class_names)
        for name in dict.fromkeys(names):
            if not isinstance(name, str):
                raise SettingsError(f"a class name must be text, not {type(name).__name__} "
                                    f"{name!r}")
            words = prompt_class_name(name, self.wording)
            text = "X " + words
            if text not in self._text_tokens:
                self._text_tokens[text] = len(default_tokenizer().encode(text)) + 2
            n_tokens = self._text_tokens[text]
            m = self.prompt_context_len + self.prompt_state_len
            if self.text_positions(n_tokens, m) > CONTEXT_LENGTH:
                shown = name if len(name) <= 60 else name[:57] + "..."
                said = "" if words == name.lower() else f" (worded {words[:40]!r})"
                raise SettingsError(self._too_long(f"class name {shown!r}{said}", n_tokens - 3,
                                                   CONTEXT_LENGTH))

    def encode_prompts(self, clip, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Prompt vectors [B, ..., P+Q, W] inserted at the "X" token of each image's class
        text (tokens [B, 77]) -> L2-normalised text embeddings [B, ..., D] (one text tower
        call for all of them)."""
        b = prompts.shape[0]
        lead = prompts.shape[1:-2]
        m = prompts.shape[-2]
        n_per = math.prod(lead)
        eot, t = self._text_length(tokens, m)
        tokens = tokens.to(prompts.device, non_blocking=True)
        eot = eot.to(prompts.device, non_blocking=True)
        emb = clip.token_embedding(tokens).to(prompts.dtype)    # [B, 77, W]
        # [SOS] + prompts + the name tokens onwards, cut to t (<= 77) positions
        tail = emb[:, 2:t - m + 1] if t - m + 1 > 2 else emb[:, 2:2]
        seq = torch.cat([
            emb[:, None, :1].expand(b, n_per, 1, -1),
            prompts.reshape(b, n_per, m, -1),
            tail[:, None].expand(b, n_per, -1, -1),
        ], dim=2)[:, :, :t]                                     # [B, n, t, W]
        feats = clip.encode_text_embeddings(seq.reshape(b * n_per, t, -1),
                                            eot.repeat_interleave(n_per))
        return F.normalize(feats, dim=-1).reshape(b, *lead, -1)

    def encode_prompt_pairs(self, clip, prompts: torch.Tensor, tokens: torch.Tensor
                            ) -> torch.Tensor:
        """Normal and abnormal prompt vectors [B, 2, ..., P+Q, W] (dim 1: normal, abnormal;
        the first P vectors the same for both kinds, as ``prompt_vectors`` makes them) ->
        L2-normalised text embeddings [B, 2, ..., D], equal to ``encode_prompts``.

        In the "packed" text mode, each pair is one packed sequence
        [SOS, context (P), normal states (Q), name..., abnormal states (Q), name...]: the
        abnormal part takes the positions of the normal part and sees the prefix and itself
        only, so each part's hidden states are those of its own plain sequence."""
        if self.text_mode != "packed":
            return self.encode_prompts(clip, prompts, tokens)
        b, kinds = prompts.shape[:2]
        if kinds != 2:
            raise ValueError(f"prompt pairs need dim 1 of size 2 (normal, abnormal), not {kinds}")
        lead = prompts.shape[2:-2]
        m, p = prompts.shape[-2], self.prompt_context_len
        n_per = math.prod(lead)
        eot, t = self._text_length(tokens, m)
        s = t - 1 - p                                           # suffix: states, name, EOT
        dev = prompts.device
        tokens = tokens.to(dev, non_blocking=True)
        eot = eot.to(dev, non_blocking=True)
        emb = clip.token_embedding(tokens).to(prompts.dtype)    # [B, 77, W]
        positions, mask = packed_pair_layout(t, 1 + p, dev)
        read = torch.stack([eot, eot + s], dim=1)               # [B, 2] normal, abnormal EOT
        feats = encode_packed_pairs(clip, prompts.reshape(b, 2, n_per, m, -1), emb[:, :1],
                                    emb[:, 2:t - m + 1], p, read.repeat_interleave(n_per, 0),
                                    positions, mask)            # [B, n, 2, D]
        return feats.reshape(b, *lead, 2, -1).movedim(-2, 1)    # [B, 2, ..., D]

    def text_work(self, tokens: torch.Tensor, pairs: int) -> tuple[int, int]:
        """(sequences, positions per sequence) that the text tower runs for one image with
        ``pairs`` (normal, abnormal) prompt pairs, for a batch with class-text tokens [B, 77]."""
        _, t = self._text_length(tokens, self.prompt_context_len + self.prompt_state_len)
        if self.text_mode == "packed":
            return pairs, 2 * t - 1 - self.prompt_context_len
        return 2 * pairs, t

    def text_embeddings(self, clip, samples: Samples, class_names: Sequence[str]
                        ) -> torch.Tensor:
        """All N*R normal then N*R abnormal embeddings per image, sample-major:
        [B, 2NR, D]."""
        context = samples.context.zk
        tokens = self.class_tokens(class_names)
        prompts = self.prompt_vectors(context, samples.normal.zk, samples.abnormal.zk)
        emb = self.encode_prompt_pairs(clip, prompts, tokens)  # [B, 2, R, N, D]
        return emb.flatten(1, 3)

    # ---------------------------------------------------------------------------------------
    # Heads

    def pixel_logits(self, tokens: Sequence[torch.Tensor], text: torch.Tensor
                     ) -> list[torch.Tensor]:
        """Per layer: exp(t_pixel) * F_s @ RCA(text)^T -> [B, T, G, G] (not upsampled)."""
        out = []
        scale = self.temperature_pixel.exp()
        for layer, tok in enumerate(tokens):
            patches = self.RCA.patch_features(tok, layer)      # [B, GG, W]
            updated = self.RCA(text, patches)                  # [B, T, W]
            logits = scale * patches @ updated.transpose(1, 2) # [B, GG, T]
            g = int(round(math.sqrt(logits.shape[1])))
            out.append(logits.transpose(1, 2).reshape(logits.shape[0], -1, g, g))
        return out

    def image_logits(self, image_features: torch.Tensor, tokens: Sequence[torch.Tensor],
                     text: torch.Tensor, stage: int) -> torch.Tensor:
        """[B, T] image-level logits; stage 2 adds the fused patch tokens and image_mapping."""
        text = F.normalize(self.class_mapping(text), dim=-1)   # [B, T, D]
        scale = self.temperature_image.exp()
        if stage == 1:
            image = F.normalize(image_features, dim=-1)
        else:
            # stage 2 trains class_mapping, image_mapping and fuse only
            image = F.normalize(self.image_mapping(image_features + self.fuse(tokens)), dim=-1)
            scale = scale.detach()
        return scale * (text @ image.unsqueeze(-1)).squeeze(-1)

    # ---------------------------------------------------------------------------------------
    # Training

    def training_forward(self, clip, image_features: torch.Tensor,
                         tokens: Sequence[torch.Tensor], class_names: Sequence[str],
                         labels: torch.Tensor, masks: torch.Tensor, prompt_index: int,
                         stage: int, noise: dict | None = None) -> dict:
        """One training step's forward (R = 1 sample per image and per state distribution).

        Returns the image logits of the chosen prompt pair [B, 2], the full-size map logits
        per layer [B, 2, S, S] (stage 1), and the loss terms."""
        b, d = image_features.shape
        dev, dt = image_features.device, image_features.dtype
        if noise is None:
            noise = {"context": torch.randn(1, b, d, device=dev, dtype=dt),
                     "normal": torch.randn(1, 1, d, device=dev, dtype=dt),
                     "abnormal": torch.randn(1, 1, d, device=dev, dtype=dt)}
        n = self.prompt_num
        i = prompt_index
        with torch.set_grad_enabled(stage == 1 and torch.is_grad_enabled()):
            samples = self.sample(image_features, noise["context"], noise["normal"],
                                  noise["abnormal"])
            text = self.text_embeddings(clip, samples, class_names)   # [B, 2N, D] (R = 1)
            pair = text[:, i::n]                   # [B, 2, D]: prompts i and N + i (a view)
        logits = self.image_logits(image_features, tokens, pair, stage)  # [B, 2]
        out = {"image_logits": logits,
               "loss_ce": F.cross_entropy(logits, labels.long())}
        if stage != 1:
            out["loss"] = out["loss_ce"]
            return out
        size = masks.shape[-1]
        maps = [F.interpolate(m, size=(size, size), mode="bilinear", align_corners=True)
                for m in self.pixel_logits(tokens, pair)]
        target = masks.reshape(b, size, size)
        focal = sum(focal_loss(m.softmax(1), target) for m in maps)
        dice = sum(dice_loss(m.softmax(1)[:, 1], target) for m in maps)
        kls = {kind: kl_term(getattr(samples, kind), b)
               for kind in ("context", "normal", "abnormal")}
        kl = kls["context"] + kls["normal"] + kls["abnormal"]
        ortho = (orthogonality_loss(text[:, :n]) + orthogonality_loss(text[:, n:]))
        out.update(maps=maps, loss_focal=focal, loss_dice=dice, loss_seg=focal + dice,
                   loss_kl=kl, loss_kl_context=kls["context"], loss_kl_normal=kls["normal"],
                   loss_kl_abnormal=kls["abnormal"], loss_orth=ortho,
                   loss=out["loss_ce"] + (focal + dice) + 0.01 * kl + ortho)
        return out
