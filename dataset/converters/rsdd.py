"""RSDD (the authors' pre-processed release) -> `RSDD`, class `Metal15`.

Raw: `<src>/pos/*metal*.jpg` (defective, types I and II) and `<src>/neg/*metal*.jpg`
(defect-free), each with its mask `<stem>.png` beside it. Same procedure as KSDD2.
"""
from __future__ import annotations

from pathlib import Path

from .common import Plan, add_pos_neg_class, pos_neg_plan

NAME = "RSDD"


def plan(src: Path) -> Plan:
    out = pos_neg_plan()
    add_pos_neg_class(out, src, "Metal15", "metal")
    return out
