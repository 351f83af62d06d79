"""One markdown table of every evaluated dataset's mean row, beside the paper's numbers; or two
results files side by side with what differs between them.

    python -m utils.summary ./results            # reads results/<dataset>/results_<dataset>.json
    python -m utils.summary --compare results/mvtec/results_mvtec.json other/results_mvtec.json
"""

from __future__ import annotations

import glob
import json
import os
import sys

from tabulate import tabulate

from dataset.registry import dataset_info, paper_datasets
from utils.cli import Parser, fail
from utils.protocol import COLUMNS

# The paper's figures (Bayes-PFL, ViT-L/14-336 at 518 px, in percent) and its dataset order
# come from the registry (dataset/registry.py).
SHOWN = [c for c in COLUMNS if c != "threshold"]
NOTE = ("The paper's figures are as quoted by later papers copying its table; – where none "
        "is known. Its PRO figures come from the official 200-threshold approximation "
        "(test.py --pro official).")


def collect(results_root: str) -> dict[str, dict]:
    """Dataset -> its results JSON, for every results_<dataset>.json under ``results_root``
    (each seed's own file, seed<k>_results_<dataset>.json, is not one of them)."""
    found = {}
    for path in glob.glob(os.path.join(results_root, "**", "results_*.json"), recursive=True):
        with open(path) as f:
            res = json.load(f)
        found[res["dataset"]] = res
    return found


def _cell(value, spread) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" + ("" if spread is None else f" ± {100 * spread:.1f}")


def markdown(results: dict[str, dict]) -> str:
    """One row per dataset: its mean row (mean ± std over the seeds when it has several),
    each cell followed by the paper's figure in brackets, "(paper –)" where none is known
    (dataset/registry.py says which are); a note on the PRO figures below the table."""
    order = paper_datasets()
    names = [d for d in order if d in results] + sorted(d for d in results if d not in order)
    head = "| dataset | seeds | " + " | ".join(SHOWN) + " |"
    lines = [head, "|" + "---|" * (len(SHOWN) + 2)]
    for name in names:
        res = results[name]
        spread = res.get("mean_std") or {}
        cells = []
        for col in SHOWN:
            cell = _cell(res["mean"].get(col), spread.get(col))
            paper = dataset_info(name).paper.get(col)
            cells.append(cell + (" (paper –)" if paper is None else f" (paper {paper:.1f})"))
        seeds = " ".join(map(str, res.get("seeds") or [res.get("settings", {}).get("seed")]))
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + NOTE + "\n"


def _flat(record, prefix: str = "") -> dict[str, object]:
    if isinstance(record, dict):
        out: dict[str, object] = {}
        for key, value in record.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: record}


def compare(first: dict, second: dict, names: tuple[str, str]) -> str:
    """Two results files side by side: their mean rows, then every setting and provenance
    entry that differs (the reasons two tables can disagree)."""
    rows = [[col, _cell(first["mean"].get(col), (first.get("mean_std") or {}).get(col)),
             _cell(second["mean"].get(col), (second.get("mean_std") or {}).get(col))]
            for col in SHOWN]
    text = tabulate(rows, headers=["mean row", *names], tablefmt="github")
    a = _flat({"settings": first.get("settings", {}),
               "provenance": first.get("provenance", {}), "seeds": first.get("seeds")})
    b = _flat({"settings": second.get("settings", {}),
               "provenance": second.get("provenance", {}), "seeds": second.get("seeds")})
    skip = ("provenance.finished", "provenance.wall_time_s", "provenance.command")
    differ = [[k, str(a.get(k, "-")), str(b.get(k, "-"))] for k in sorted(set(a) | set(b))
              if a.get(k) != b.get(k) and not k.startswith(skip)]
    if differ:
        text += "\n\nwhat differs:\n" + tabulate(differ, headers=["", *names],
                                                     tablefmt="github", maxcolwidths=50)
    else:
        text += "\n\nsame settings, same files, same code and environment"
    return text + "\n"


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("results_root", nargs="?", default="./results")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two results files side by side with what differs between them")
    args = p.parse_args(argv)
    if args.compare:
        loaded = []
        for path in args.compare:
            try:
                with open(path) as f:
                    loaded.append(json.load(f))
            except (OSError, ValueError) as error:
                return fail(f"cannot read the results file {path} ({error}): give two "
                            f"results_<dataset>.json written by test.py")
        print(compare(*loaded, names=tuple(args.compare)), end="")
        return 0
    results = collect(args.results_root)
    if not results:
        return fail(f"no results_*.json under '{args.results_root}': run test.py first")
    table = markdown(results)
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
