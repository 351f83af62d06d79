"""BrainMRI (AdaCLIP copy) -> `BrainMRI`, class `brain ct`.

Raw: `<src>/object/{train/good, test/good}/*.jpg` and `<src>/object/test/<def>/*.JPG`.
Classification only: anomalous images are written without masks.

By default the file set is the official one: the globs are case-sensitive and differ between
normal (`*.jpg`) and anomalous (`*.JPG`) folders, so images with another extension or case are
left out (the published meta file has 85 normal and 68 anomalous test images, against 98 and
155 in the Kaggle set). `any_case=True` (`make_dataset.py --brainmri-any-case`) takes every
image file (dataset/files.py: .png .jpg .jpeg .bmp .tif .tiff .webp, any case) in every folder
instead; when that adds files, counts and ids differ from the published data. Any test folder
other than `good` is anomalous and uses the anomalous glob.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .common import ObjectLayout, Plan

NAME = "BrainMRI"
LAYOUT = ObjectLayout(prefix=NAME, class_name="brain ct", train_glob="*.jpg", good_glob="*.jpg",
                      anomaly_glob="*.JPG")


def plan(src: Path, any_case: bool = False) -> Plan:
    layout = LAYOUT
    if any_case:
        layout = replace(LAYOUT, train_glob=None, good_glob=None, anomaly_glob=None)
    return layout.plan(src)
