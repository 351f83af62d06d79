"""TN3K -> `TN3K`, class `thyroid`.

Raw: `<src>/object/test/<def>/*.jpg` with masks of the same name (JPEG files) in
`<src>/object/ground_truth/<def>/`; the >128 threshold removes the JPEG noise of the masks.
"""
from __future__ import annotations

from .common import ObjectLayout, same_name

NAME = "TN3K"
LAYOUT = ObjectLayout(prefix=NAME, class_name="thyroid", train_glob="*.jpg", good_glob="*.jpg",
                      anomaly_glob="*.jpg", mask_rule=same_name)

plan = LAYOUT.plan
