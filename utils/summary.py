"""One markdown table of every evaluated dataset's mean row, beside the paper's numbers.

    python -m utils.summary ./results            # reads results/<dataset>/results_<dataset>.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from dataset.registry import dataset_info, paper_datasets
from utils.protocol import COLUMNS

# The paper's figures (Bayes-PFL, ViT-L/14-336 at 518 px, in percent) and its dataset order
# come from the registry (dataset/registry.py).
SHOWN = [c for c in COLUMNS if c != "threshold"]


def collect(results_root: str) -> dict[str, dict]:
    found = {}
    for path in glob.glob(os.path.join(results_root, "**", "results_*.json"), recursive=True):
        with open(path) as f:
            res = json.load(f)
        found[res["dataset"]] = res["mean"]
    return found


def markdown(means: dict[str, dict]) -> str:
    order = paper_datasets()
    names = [d for d in order if d in means] + sorted(d for d in means if d not in order)
    head = "| dataset | " + " | ".join(SHOWN) + " |"
    lines = [head, "|" + "---|" * (len(SHOWN) + 1)]
    for name in names:
        cells = []
        for col in SHOWN:
            v = means[name].get(col)
            cell = "n/a" if v is None else f"{100 * v:.1f}"
            paper = dataset_info(name).paper.get(col)
            if paper is not None:
                cell += f" (paper {paper:.1f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_root", nargs="?", default="./results")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    means = collect(args.results_root)
    if not means:
        print(f"error: no results_*.json under '{args.results_root}': run test.py first",
              file=sys.stderr)
        return 1
    table = markdown(means)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
