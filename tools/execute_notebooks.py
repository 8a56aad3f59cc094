"""Re-execute chapter notebooks in place, top to bottom in a fresh kernel, and print each one's wall time.

    python tools/execute_notebooks.py                  # every notebook in notebooks/
    python tools/execute_notebooks.py notebooks/02_mla.ipynb

Before executing, it stamps each notebook's Colab badge and setup cell from _config.yml. Budgets (book
guide): each notebook <= 2 min and the whole book <= 10 min on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from notebook_cells import ROOT, stamp  # noqa: E402

BUDGET_NOTEBOOK_S, BUDGET_BOOK_S = 120, 600


def execute(path: pathlib.Path) -> float:
    nb = nbformat.read(path, as_version=4)
    stamp(nb, path)
    os.environ["DSV3_LITE_PROGRESS"] = "0"  # no progress-bar residue in stored outputs
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:  # keep diffs small: no per-cell timing metadata
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path)
    paths = parser.parse_args().notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    total = 0.0
    for path in paths:
        seconds = execute(path)
        total += seconds
        flag = "" if seconds <= BUDGET_NOTEBOOK_S else f"  over the {BUDGET_NOTEBOOK_S} s budget"
        print(f"{path.name:40s} {seconds:7.1f} s{flag}", flush=True)
    flag = "" if total <= BUDGET_BOOK_S else f"  over the {BUDGET_BOOK_S} s budget"
    print(f"{'total':40s} {total:7.1f} s{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
