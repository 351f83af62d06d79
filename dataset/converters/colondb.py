"""CVC-ColonDB (AdaCLIP copy) -> `ColonDB`, class `colon`.

Raw: `<src>/object/test/<def>/*.png` with masks of the same name in
`<src>/object/ground_truth/<def>/`.
"""
from __future__ import annotations

from .common import ObjectLayout, same_name

NAME = "ColonDB"
LAYOUT = ObjectLayout(prefix=NAME, class_name="colon", train_glob="*.png", good_glob="*.png",
                      anomaly_glob="*.png", mask_rule=same_name)

plan = LAYOUT.plan
