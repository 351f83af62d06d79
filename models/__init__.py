"""Bayes-PFL: public API.

    from models import load_clip, tokenize, BayesPFL, AnomalyDetector
"""

from .bayes_pfl import BayesPFL
from .clip import CLIP, WeightsError, load_clip
from .detector import AnomalyDetector
from .tokenizer import tokenize

__all__ = ["AnomalyDetector", "BayesPFL", "CLIP", "WeightsError", "load_clip", "tokenize"]
