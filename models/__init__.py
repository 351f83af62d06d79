"""Bayes-PFL: public API.

    from models import load_clip, tokenize, BayesPFL, AnomalyDetector

The names are loaded on first use, so that the light modules of the package (``models.errors``,
``models.spec``, ``models.wording``) can be imported without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {"AnomalyDetector": "detector", "BayesPFL": "bayes_pfl", "CLIP": "clip",
            "ModelSpec": "spec", "SettingsError": "errors", "UserError": "errors",
            "WeightsError": "errors", "load_clip": "weights", "tokenize": "tokenizer"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .bayes_pfl import BayesPFL
    from .clip import CLIP
    from .detector import AnomalyDetector
    from .errors import SettingsError, UserError, WeightsError
    from .spec import ModelSpec
    from .tokenizer import tokenize
    from .weights import load_clip


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
