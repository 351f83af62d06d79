"""The paper's figures in the registry and in results/summary.md; the official layers written
once."""

from __future__ import annotations

import inspect
import os
import re

from dataset.registry import REGISTRY, dataset_info, paper_datasets
from models.bayes_pfl import BayesPFL
from models.detector import AnomalyDetector
from models.spec import OFFICIAL_LAYERS
from utils import summary
from utils.training.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The figures as the issue lists them (image AUROC, image AP, pixel AUROC, PRO), typed again
# here rather than read from the registry.
KNOWN = {
    "mvtec": (92.3, 96.7, 91.8, 87.4),
    "visa": (87.0, 89.2, 95.6, 88.9),
    "BTAD": (93.2, 96.5, 93.9, 76.6),
    "RSDD": (94.1, 92.3, 99.6, 98.0),
    "DAGM": (None, None, 99.3, 98.0),
}
ORDER = ("auroc_sp", "ap_sp", "auroc_px", "aupro_px")


def test_registry_holds_the_known_figures_and_no_others():
    for name, info in REGISTRY.items():
        expected = {k: v for k, v in zip(ORDER, KNOWN.get(name, (None,) * 4)) if v is not None}
        assert dict(info.paper) == expected, name
    # the cells the quoting papers disagree on (or that look wrong) stay empty
    assert "auroc_sp" not in dataset_info("DAGM").paper
    assert not dataset_info("DTD").paper and not dataset_info("KSDD2").paper


def test_summary_shows_each_known_figure_beside_the_measured_one():
    results = {name: {"mean": {c: 0.5 for c in summary.SHOWN}, "seeds": [333]}
               for name in paper_datasets() + ["synthetic"]}
    results["RSDD"]["mean"]["iou"] = None
    table = summary.markdown(results)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2:]
            for line in table.splitlines() if line.startswith("| ")}
    for name in results:
        cells = dict(zip(summary.SHOWN, (c.rstrip(" |") for c in rows[name])))
        for column, cell in cells.items():
            measured = "n/a" if results[name]["mean"][column] is None else "50.0"
            figure = dataset_info(name).paper.get(column)
            paper = "–" if figure is None else f"{figure:.1f}"
            assert cell == f"{measured} (paper {paper})", (name, column, cell)
    assert "| DAGM | 333 | 50.0 (paper 99.3) | 50.0 (paper 98.0) | 50.0 (paper –) |" in table
    assert "official 200-threshold approximation" in table.split("\n\n", 1)[1]


def test_official_layers_have_one_name():
    assert inspect.signature(BayesPFL.from_clip).parameters["layers"].default is OFFICIAL_LAYERS
    assert inspect.signature(AnomalyDetector).parameters["layers"].default is OFFICIAL_LAYERS
    assert TrainConfig().features_list == list(OFFICIAL_LAYERS)
    literal = re.compile(r"[\[(]\s*6,\s*12,\s*18,\s*24\s*[\])]")
    found = []
    for package in ("models", "dataset", "utils"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    if literal.search(open(path, encoding="utf-8").read()):
                        found.append(os.path.relpath(path, ROOT))
    assert found == [os.path.join("models", "spec.py")]
