"""VisA -> `visa`.

Raw: `<src>/split_csv/1cls.csv` with the columns object, split, label, image, mask (read by
position); image and mask paths are relative to `<src>`. For each class the train rows come
first, then the test rows, each in CSV row order. Names: `visa_<stem>_<id>` in all three image
folders, the mask with the same name. Mask pixels above 0 are foreground.
"""
from __future__ import annotations

import csv
from pathlib import Path

from dataset.errors import DatasetError
from dataset.registry import VISA_CLASSES

from .common import Plan, stem

NAME = "visa"
CLASSES = VISA_CLASSES   # the fixed official order (dataset/registry.py)
SPLIT_CSV = Path("split_csv") / "1cls.csv"


def read_rows(csv_path: Path) -> list:
    """Rows of the split file without its header, each as (object, split, label, image, mask)."""
    if not csv_path.is_file():
        raise DatasetError(f"Split file {csv_path} not found: point --src at the unpacked VisA "
                           f"folder, which contains split_csv/1cls.csv.")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    for number, row in enumerate(rows, start=2):
        if row and len(row) < 5:
            raise DatasetError(f"Line {number} of {csv_path} has {len(row)} columns, expected 5 "
                               f"(object, split, label, image, mask): restore the original file.")
    return [tuple(cell.strip() for cell in row[:5]) for row in rows if row]


def plan(src: Path) -> Plan:
    src = Path(src)
    csv_path = src / SPLIT_CSV
    rows = read_rows(csv_path)
    out = Plan(threshold=0)
    for cls in CLASSES:
        out.add_class(cls)
        for split in ("train", "test"):
            for obj, row_split, label, image, mask in rows:
                if obj != cls or row_split != split:
                    continue
                image_path = src / image
                if not image_path.is_file():
                    raise DatasetError(f"Image {image_path} listed in {csv_path} not found: "
                                       f"unpack the complete VisA archive into {src}.")
                anomalous = label == "anomaly"
                if split == "train":
                    if anomalous:
                        raise DatasetError(f"{csv_path} lists the anomalous image {image} in the "
                                           f"train split: restore the original split file.")
                    out.add(cls, "train", image_path, [NAME, stem(image)])
                elif anomalous:
                    if not mask:
                        raise DatasetError(f"{csv_path} gives no mask for the anomalous image "
                                           f"{image}: restore the original split file.")
                    out.add(cls, "anomaly", image_path, [NAME, stem(image)], src / mask)
                else:
                    out.add(cls, "good", image_path, [NAME, stem(image)])
    return out
