"""KSDD2 (the authors' pre-processed release) -> `KSDD2`, class `Metal`.

Raw: `<src>/pos/*metal*.jpg` (defective) and `<src>/neg/*metal*.jpg` (defect-free), each with
its mask `<stem>.png` beside it. All defective images go to test/anomaly, the first as many
defect-free images in sorted order to test/good; no train split. Names `<stem>_<10-digit id>`.
"""
from __future__ import annotations

from pathlib import Path

from .common import Plan, add_pos_neg_class, pos_neg_plan

NAME = "KSDD2"


def plan(src: Path) -> Plan:
    out = pos_neg_plan()
    add_pos_neg_class(out, src, "Metal", "metal")
    return out
