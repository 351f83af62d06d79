"""DAGM (the authors' re-annotated release) -> `DAGM`, classes `Fabric1..5, Fabric7, Fabric8`.

Raw: `<src>/pos/*classesN*.jpg` and `<src>/neg/*classesN*.jpg`, each with its mask
`<stem>.png` beside it; classes 6, 9 and 10 are not used. Same procedure as KSDD2, class by
class with one running id. `classes1` does not match `classes10` files.
"""
from __future__ import annotations

from pathlib import Path

from .common import Plan, add_pos_neg_class, pos_neg_plan

NAME = "DAGM"
CLASS_NUMBERS = (1, 2, 3, 4, 5, 7, 8)


def plan(src: Path) -> Plan:
    out = pos_neg_plan()
    for number in CLASS_NUMBERS:
        add_pos_neg_class(out, src, f"Fabric{number}", f"classes{number}")
    return out
