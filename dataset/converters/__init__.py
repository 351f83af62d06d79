"""Converters from the raw downloads to the standardised layout, one module per dataset.

Each module has `NAME` (the output folder name) and `plan(src) -> Plan`;
:func:`dataset.converters.common.execute` writes a plan. `CONVERTERS` maps the official
names, in the order `make_dataset.py --all` processes them, to their modules.
"""
from . import (br35h, brainmri, btad, clinicdb, colondb, dagm, dtd, endo, headct, isic, ksdd2,
               kvasir, mvtec, rsdd, tn3k, visa)
from .common import DatasetError, execute

CONVERTERS = {module.NAME: module for module in (
    mvtec, visa, btad, ksdd2, rsdd, dagm, dtd, headct, brainmri, br35h, isic, clinicdb, colondb,
    endo, kvasir, tn3k)}

__all__ = ["CONVERTERS", "DatasetError", "execute"]
