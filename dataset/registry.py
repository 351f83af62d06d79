"""Every fact about a dataset, one row per dataset: everything else reads it from here.

A new dataset needs a converter module in ``dataset/converters/`` and one row below. The row
says how the dataset is named on disk, which converter writes it, its fixed class list (when
the official code fixes one), whether it has masks (classification-only) and normal test
images, which classes are scored with the top-20 map mean, how its class names are worded in
the prompts beyond the model's built-in official wording (``models/bayes_pfl.py``), the mosaic
probability and validation classes when it is the auxiliary training data, whether the paper's
tables include it, which released checkpoint evaluates it, and the paper's figures.

    python -m dataset.registry              # the names of the paper's test datasets
    python -m dataset.registry --all        # every known dataset

Pure data: importing this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                 "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                 "zipper")
VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
                "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")


# The paper's mean rows (Bayes-PFL, ViT-L/14-336 at 518 px, trained on VisA; on MVTec-AD for
# VisA), in percent, keyed by the metric columns of utils.protocol. These are the figures as
# quoted by later papers that copy the Bayes-PFL table; they were not read from the paper
# itself here. Cells left empty on purpose:
# - DAGM image AUROC: the quoting papers disagree (97.7 in two, 98.9 in one);
# - DTD-Synthetic image AUROC: they disagree too (95.1 in two, 97.2 in one);
# - KSDD2 pixel AUROC and PRO: the only source gives 96.1 and 70.8, far below every other
#   method there, which looks like a transcription error;
# - every figure not listed below (any pixel AP, F1-max or IoU, DAGM's image AP, the other
#   datasets): not quoted. An empty cell means unknown, not zero.
# The paper's PRO figures come from the official 200-threshold approximation (test.py
# --pro official), not from the exact AUPRO that test.py computes by default.
PAPER: dict[str, dict[str, float]] = {
    "mvtec": {"auroc_sp": 92.3, "ap_sp": 96.7, "auroc_px": 91.8, "aupro_px": 87.4},
    "visa": {"auroc_sp": 87.0, "ap_sp": 89.2, "auroc_px": 95.6, "aupro_px": 88.9},
    "BTAD": {"auroc_sp": 93.2, "ap_sp": 96.5, "auroc_px": 93.9, "aupro_px": 76.6},
    "RSDD": {"auroc_sp": 94.1, "ap_sp": 92.3, "auroc_px": 99.6, "aupro_px": 98.0},
    "DAGM": {"auroc_px": 99.3, "aupro_px": 98.0},
}


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset. ``name`` is the folder and meta-file name (``meta_<name>.json``)."""

    name: str
    title: str
    converter: str | None                     # module of dataset/converters (None: none)
    classes: tuple[str, ...] | None = None    # the fixed official class list, in order
    classification_only: bool = False         # no pixel ground truth
    no_normal: bool = False                   # test classes hold anomalous images only
    topk20_classes: frozenset[str] = frozenset()  # top-20 (not top-2000) map score
    wording: Mapping[str, str] = field(default_factory=dict)  # extra prompt wording
    mosaic_prob: float = 0.0                  # as auxiliary training data
    validation: tuple[str, tuple[str, ...]] | None = None  # official (dataset, classes)
    in_paper: bool = True                     # one of the paper's test datasets (test.sh)
    checkpoint: str = "train_visa.pth"        # the released checkpoint evaluating it
    paper: Mapping[str, float] = field(default_factory=dict)  # published mean row, percent

    def __post_init__(self):
        object.__setattr__(self, "wording", MappingProxyType(dict(self.wording)))
        object.__setattr__(self, "paper", MappingProxyType(dict(self.paper)))


REGISTRY: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("mvtec", "MVTec-AD", "mvtec", classes=MVTEC_CLASSES,
                topk20_classes=frozenset({"screw"}), mosaic_prob=0.4,
                validation=("visa", ("chewinggum", "cashew", "pipe_fryum", "capsules",
                                     "candle")),
                paper=PAPER["mvtec"]),
    DatasetInfo("visa", "VisA", "visa", classes=VISA_CLASSES,
                topk20_classes=frozenset({"capsules", "macaroni1", "macaroni2", "pipe_fryum",
                                          "cashew", "chewinggum"}),
                validation=("mvtec", ("bottle", "hazelnut", "wood", "zipper", "leather")),
                checkpoint="train_mvtec.pth", paper=PAPER["visa"]),
    DatasetInfo("BTAD", "BTAD", "btad", paper=PAPER["BTAD"]),
    DatasetInfo("KSDD2", "KSDD2", "ksdd2"),
    DatasetInfo("RSDD", "RSDD", "rsdd", paper=PAPER["RSDD"]),
    DatasetInfo("DAGM", "DAGM", "dagm", paper=PAPER["DAGM"]),
    DatasetInfo("DTD", "DTD-Synthetic", "dtd"),
    DatasetInfo("HeadCT", "HeadCT", "headct", classification_only=True),
    DatasetInfo("BrainMRI", "BrainMRI", "brainmri", classification_only=True),
    DatasetInfo("Br35H", "Br35H", "br35h", classification_only=True),
    DatasetInfo("ISIC", "ISIC", "isic", no_normal=True),
    DatasetInfo("ClinicDB", "CVC-ClinicDB", "clinicdb", no_normal=True),
    DatasetInfo("ColonDB", "CVC-ColonDB", "colondb", no_normal=True),
    DatasetInfo("Kvasir", "Kvasir", "kvasir", no_normal=True),
    DatasetInfo("Endo", "Endo", "endo", no_normal=True),
    DatasetInfo("TN3K", "TN3K", "tn3k", no_normal=True, in_paper=False),
)}


def dataset_info(name: str) -> DatasetInfo:
    """The row of ``name``; a dataset not listed (e.g. synthetic data) gets a plain row."""
    return REGISTRY.get(name) or DatasetInfo(name, name, None, in_paper=False)


def is_classification_only(name: str) -> bool:
    return dataset_info(name).classification_only


def paper_datasets() -> list[str]:
    """The paper's test datasets, in the order of its tables."""
    return [info.name for info in REGISTRY.values() if info.in_paper]


def topk20_classes() -> frozenset[str]:
    """Every class scored with the top-20 map mean (the official code keys k by class)."""
    return frozenset().union(*(info.topk20_classes for info in REGISTRY.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Dataset names known to this project")
    parser.add_argument("--all", action="store_true", help="every dataset, not only the "
                                                          "paper's test datasets")
    parser.add_argument("--checkpoint", metavar="DATASET",
                        help="print the released checkpoint that evaluates DATASET")
    args = parser.parse_args(argv)
    if args.checkpoint:
        print(dataset_info(args.checkpoint).checkpoint)
    else:
        print(" ".join(REGISTRY if args.all else paper_datasets()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
