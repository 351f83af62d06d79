"""MVTec AD -> `mvtec`.

Raw: `<src>/<cls>/train/good/*.png`, `<src>/<cls>/test/<good|defect>/*.png`,
`<src>/<cls>/ground_truth/<defect>/<stem>_mask.png`. Output names drop the source stem:
`mvtec_<id>` (train), `mvtec_good_<id>`, `mvtec_<defect>_<id>` (+ `.png` mask).
The test folder is read only when it holds more than one sub-folder, as in the official code.
"""
from __future__ import annotations

from pathlib import Path

from dataset.registry import MVTEC_CLASSES

from .common import Plan, add_folder_class, require_dir, stem_with

NAME = "mvtec"
CLASSES = MVTEC_CLASSES   # the fixed official order (dataset/registry.py)


def plan(src: Path) -> Plan:
    out = Plan()
    for cls in CLASSES:
        class_dir = require_dir(Path(src) / cls, f"MVTec AD has {len(CLASSES)} classes; "
                                                 f"unpack all of them into {src}")
        add_folder_class(out, cls, class_dir, prefix=NAME, train_glob="*.png", good_glob="*.png",
                         anomaly_glob="*.png", mask_rule=stem_with("_mask.png"),
                         keep_stem=False, min_test_dirs=2)
    return out
