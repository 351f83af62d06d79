"""DTD-Synthetic -> `DTD`.

Raw: `<src>/<Texture_NNN>/train/good/*.png`, `test/{good,bad}/*.png`,
`ground_truth/bad/<stem>_mask.png`. Names: `DTD_<stem>_<id>`, `DTD_good_<stem>_<id>`,
`DTD_bad_<stem>_<id>`.

The official converter took the textures in raw directory-listing order, which differs between
file systems; the running id depends on it. The fixed order below is the one of the released
data, so names match them on every machine. Files in the listing are ignored; a folder that is
not one of the twelve textures is an error.
"""
from __future__ import annotations

from pathlib import Path

from dataset.errors import DatasetError

from .common import Plan, add_folder_class, list_dirs, require_dir, stem_with

NAME = "DTD"
# Raw texture folder -> class name, in the processing order of the released data.
TEXTURES = (
    ("Woven_125", "woven2"), ("Mesh_114", "mesh"), ("Woven_104", "woven3"),
    ("Woven_127", "woven1"), ("Woven_001", "woven5"), ("Fibrous_183", "fibrous"),
    ("Marbled_078", "marbled2"), ("Perforated_037", "perforated"),
    ("Stratified_154", "stratified"), ("Woven_068", "woven4"), ("Matted_069", "matted1"),
    ("Blotchy_099", "blotchy"),
)


def plan(src: Path) -> Plan:
    src = Path(src)
    known = dict(TEXTURES)
    unknown = [name for name in list_dirs(src) if name not in known]
    if unknown:
        raise DatasetError(f"Folder {src / unknown[0]} is not a DTD-Synthetic texture "
                           f"(expected {', '.join(known)}): move it out of {src}.")
    out = Plan()
    for folder, cls in TEXTURES:
        class_dir = require_dir(src / folder, f"DTD-Synthetic has {len(TEXTURES)} textures; "
                                              f"unpack all of them into {src}")
        add_folder_class(out, cls, class_dir, prefix=NAME, train_glob="*.png", good_glob="*.png",
                         anomaly_glob="*.png", mask_rule=stem_with("_mask.png"))
    return out
