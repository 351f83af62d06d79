"""Br35H (AdaCLIP copy) -> `Br35H`, class `brain`.

Raw: `<src>/object/{train/good, test/good, test/<def>}/*.jpg`. Classification only:
anomalous images are written without masks.
"""
from __future__ import annotations

from .common import ObjectLayout

NAME = "Br35H"
LAYOUT = ObjectLayout(prefix=NAME, class_name="brain", train_glob="*.jpg", good_glob="*.jpg",
                      anomaly_glob="*.jpg")

plan = LAYOUT.plan
