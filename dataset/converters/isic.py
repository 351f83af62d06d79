"""ISIC (AdaCLIP copy) -> `ISIC`, class `skin`.

Raw: `<src>/object/test/<def>/*.jpg` with masks `<src>/object/ground_truth/<def>/<stem>_Segmentation.png`
(and `train/`, `test/good/` in the same layout, empty in the release).
"""
from __future__ import annotations

from .common import ObjectLayout, stem_with

NAME = "ISIC"
LAYOUT = ObjectLayout(prefix=NAME, class_name="skin", train_glob="*.jpg", good_glob="*.jpg",
                      anomaly_glob="*.jpg", mask_rule=stem_with("_Segmentation.png"))

plan = LAYOUT.plan
