"""Endo (AnomalyCLIP copy) -> `Endo`, class `colon`.

Raw: `<src>/object/train/good/*.png`, `<src>/object/test/<good|def>/*.jpg`, masks
`<src>/object/ground_truth/<def>/<stem>.png`. The train and test globs differ, as in the
official converter.
"""
from __future__ import annotations

from .common import ObjectLayout, stem_with

NAME = "Endo"
LAYOUT = ObjectLayout(prefix=NAME, class_name="colon", train_glob="*.png", good_glob="*.jpg",
                      anomaly_glob="*.jpg", mask_rule=stem_with(".png"))

plan = LAYOUT.plan
