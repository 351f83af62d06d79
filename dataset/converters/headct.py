"""HeadCT (AdaCLIP copy) -> `HeadCT`, class `head ct`.

Raw: `<src>/object/{train/good, test/good, test/<def>}/*.png`. Classification only: anomalous
images are written without masks.
"""
from __future__ import annotations

from .common import ObjectLayout

NAME = "HeadCT"
LAYOUT = ObjectLayout(prefix=NAME, class_name="head ct", train_glob="*.png", good_glob="*.png",
                      anomaly_glob="*.png")

plan = LAYOUT.plan
