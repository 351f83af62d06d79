"""Converters from the raw downloads to the standardised layout, one module per dataset.

Each module has `NAME` (the output folder name) and `plan(src) -> Plan`;
:func:`dataset.converters.common.execute` writes a plan. `CONVERTERS` maps the official
names to their modules, in the order of the registry (`dataset/registry.py`), which is the
order `make_dataset.py --all` processes them: a registry row names its converter module.
"""
from importlib import import_module

from dataset.errors import DatasetError
from dataset.registry import REGISTRY

from .common import execute

CONVERTERS = {info.name: import_module(f"{__name__}.{info.converter}")
              for info in REGISTRY.values() if info.converter is not None}

__all__ = ["CONVERTERS", "DatasetError", "execute"]
