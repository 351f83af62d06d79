"""CVC-ClinicDB (AdaCLIP copy) -> `ClinicDB`, class `colon`.

Raw: `<src>/object/test/<def>/*.tif` with masks of the same name in
`<src>/object/ground_truth/<def>/`. The official converter read the TIFF images as RGB with
scikit-image and converted them to BGR before writing; OpenCV reads BGR directly, so the
written pixels are the same. OpenCV's reader also copes with the cases the official one did
not: a grey or RGBA TIFF gives 3 channels, a 16-bit one is scaled to 8 bits, a multi-page one
gives its first page. The EXIF orientation tag is ignored, as scikit-image ignores it.
"""
from __future__ import annotations

import cv2

from .common import ObjectLayout, same_name

NAME = "ClinicDB"
LAYOUT = ObjectLayout(prefix=NAME, class_name="colon", train_glob="*.tif", good_glob="*.tif",
                      anomaly_glob="*.tif", mask_rule=same_name,
                      read_flags=cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)

plan = LAYOUT.plan
