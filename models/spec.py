"""The settings that define a Bayes-PFL model and the CLIP it runs on, in one place.

A checkpoint written by this project records its :class:`ModelSpec` beside ``MyModel`` (the
official loader reads only ``MyModel``), so readers rebuild the model it was trained as. The
released checkpoints record nothing: the official defaults apply. Settings asked for
explicitly (command-line flags, keyword arguments) must agree with what a file records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import SettingsError

OFFICIAL_LAYERS = (6, 12, 18, 24)
ACTIVATIONS = ("gelu", "quick_gelu")

# Command-line flag of each setting (the official flag names).
FLAGS = {"prompt_num": "--prompt_num", "prompt_context_len": "--prompt_context_len",
         "prompt_state_len": "--prompt_state_len", "num_flows": "--num_flows",
         "layers": "--features_list", "image_size": "--image_size",
         "activation": "--activation", "backbone": "--pretrained_path"}


@dataclass(frozen=True)
class ModelSpec:
    """Bayes-PFL and backbone settings (SPEC symbols: N, P, Q, K, L, S).

    ``backbone`` names the CLIP geometry the module was built for (e.g. "ViT-L/14@336px",
    see ``CLIPGeometry.name``); None when unknown."""

    prompt_num: int = 3
    prompt_context_len: int = 5
    prompt_state_len: int = 5
    num_flows: int = 10
    layers: tuple[int, ...] = field(default=OFFICIAL_LAYERS)
    image_size: int = 518
    activation: str = "gelu"
    backbone: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        for name in ("prompt_num", "prompt_context_len", "prompt_state_len", "num_flows"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"{FLAGS[name]} must be at least 1, not "
                                    f"{getattr(self, name)}")
        if not self.layers:
            raise SettingsError("--features_list needs at least one layer")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 1:
            raise SettingsError(f"--features_list must list distinct blocks from 1 up, not "
                                f"{' '.join(map(str, self.layers))}")
        if int(self.image_size) < 1:
            raise SettingsError(f"--image_size must be positive, not {self.image_size}")
        if self.activation not in ACTIVATIONS:
            raise SettingsError(f"--activation must be one of {', '.join(ACTIVATIONS)}, not "
                                f"{self.activation!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def bayes_pfl_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``BayesPFL.from_clip``."""
        return {"prompt_num": self.prompt_num, "prompt_context_len": self.prompt_context_len,
                "prompt_state_len": self.prompt_state_len, "num_flows": self.num_flows,
                "layers": list(self.layers)}


def _show(name: str, value) -> str:
    if name == "layers":
        return " ".join(map(str, value))
    return str(value)


def resolve_spec(requested: Mapping[str, Any], recorded: ModelSpec | None,
                 source: str) -> ModelSpec:
    """The settings to build: each one asked for in ``requested`` (None: not asked for) must
    agree with what ``source`` records; those not asked for come from the record, else the
    official defaults. A disagreement is one error naming every differing setting."""
    base = recorded or ModelSpec()
    wanted = {k: v for k, v in requested.items() if v is not None}
    if "layers" in wanted:
        wanted["layers"] = tuple(int(x) for x in wanted["layers"])
    if recorded is not None:
        differ = [k for k, v in wanted.items()
                  if getattr(recorded, k) is not None and getattr(recorded, k) != v]
        if differ:
            had = ", ".join(f"{FLAGS[k]} {_show(k, getattr(recorded, k))}" for k in differ)
            asked = ", ".join(f"{FLAGS[k]} {_show(k, wanted[k])}" for k in differ)
            raise SettingsError(f"{source} was trained with {had} (recorded in the file), but "
                                f"{asked} was asked for: drop these settings to use the "
                                f"recorded ones, or use a checkpoint trained with them")
    return dataclasses.replace(base, **wanted)


def check_layers(layers, depth: int) -> None:
    """The 1-based blocks ``layers`` exist in an image tower of ``depth`` blocks."""
    wrong = [layer for layer in layers if not 1 <= layer <= depth]
    if wrong:
        raise SettingsError(f"--features_list {' '.join(map(str, wrong))} is outside the CLIP "
                            f"image tower's blocks 1..{depth}")
