"""Kvasir (AnomalyCLIP copy) -> `Kvasir`, class `colon`: the raw layout of CVC-ColonDB
(`<src>/object/test/<def>/*.png`, masks of the same name in `<src>/object/ground_truth/<def>/`)
under its own prefix.
"""
from __future__ import annotations

from dataclasses import replace

from . import colondb

NAME = "Kvasir"
LAYOUT = replace(colondb.LAYOUT, prefix=NAME)

plan = LAYOUT.plan
