"""BTAD -> `BTAD`.

Raw: `<src>/{01,02,03}/train/ok/`, `test/{ok,ko}/`, `ground_truth/ko/`; images `*.bmp` for
01 and 03, `*.png` for 02. Classes 01 -> metal1, 02 -> wood, 03 -> metal2. The mask has the
image's file name, with "bmp" replaced by "png" for 01 and 02 (03 keeps its `.bmp` masks).
Names: `BTAD_<stem>_<id>`, `BTAD_good_<stem>_<id>`, `BTAD_ko_<stem>_<id>`.
"""
from __future__ import annotations

from pathlib import Path

from .common import Plan, add_folder_class, require_dir, same_name

NAME = "BTAD"
# raw folder -> (class name, image glob, mask file name is the image's with bmp -> png)
CLASSES = (("01", "metal1", "*.bmp", True), ("02", "wood", "*.png", True),
           ("03", "metal2", "*.bmp", False))


def _png_name(gt: Path, image: Path) -> Path:
    return gt / image.name.replace("bmp", "png")


def plan(src: Path) -> Plan:
    out = Plan()
    for folder, cls, glob, to_png in CLASSES:
        class_dir = require_dir(Path(src) / folder, f"BTAD has the product folders 01, 02 and 03; "
                                                    f"unpack all of them into {src}")
        add_folder_class(out, cls, class_dir, prefix=NAME, train_glob=glob, good_glob=glob,
                         anomaly_glob=glob, mask_rule=_png_name if to_png else same_name,
                         normal="ok")
    return out
