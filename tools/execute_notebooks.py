"""Re-execute chapter notebooks in place, top to bottom in a fresh kernel, and print each one's wall time.

    python tools/execute_notebooks.py                  # every notebook in notebooks/
    python tools/execute_notebooks.py notebooks/02_mla.ipynb
    python tools/execute_notebooks.py --warn-only      # report time over budget, but exit 0

Before executing, it stamps each notebook's Colab badge and setup cell from _config.yml. The kernel is this
interpreter's (as `pytest --nbval-current-env` runs), in the environment conftest.py gives nbval's kernels
(`notebook_cells.KERNEL_ENV`). Consecutive pieces of one output stream are stored as one, so a re-execution
does not differ only in how a print was split. Budgets (book guide): each notebook <= 2 min and the whole
book <= 10 min on a 2-core CPU; the exit status is 1 when one is exceeded, unless --warn-only.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import ipykernel.kernelspec
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from traitlets import default

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from notebook_cells import KERNEL_ENV, ROOT, stamp  # noqa: E402

BUDGET_NOTEBOOK_S, BUDGET_BOOK_S = 120, 600


class CurrentEnvironmentSpecs(KernelSpecManager):
    """Every kernel name resolves to this interpreter's ipykernel, not to whichever Python the machine's
    'python3' kernelspec points at."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                      **ipykernel.kernelspec.get_kernel_dict())


class CurrentEnvironmentKernel(AsyncKernelManager):
    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return CurrentEnvironmentSpecs(data_dir=self.data_dir)


def merge_streams(outputs: list) -> list:
    """Consecutive stream outputs of one name (stdout or stderr) as one output: how many pieces a cell's
    prints arrive in depends on timing."""
    merged = []
    for out in outputs:
        last = merged[-1] if merged else None
        if last and out.output_type == last.output_type == "stream" and out.name == last.name:
            last.text += out.text
        else:
            merged.append(out)
    return merged


def run(nb, folder: pathlib.Path) -> None:
    """Execute `nb` in place, top to bottom in a fresh kernel of this interpreter started in `folder`;
    a cell's error is raised. The kernel inherits this process's environment."""
    NotebookClient(nb, timeout=900, kernel_name="python3", kernel_manager_class=CurrentEnvironmentKernel,
                   resources={"metadata": {"path": str(folder)}}).execute()


def execute(path: pathlib.Path) -> float:
    nb = nbformat.read(path, as_version=4)
    stamp(nb, path)
    os.environ.update(KERNEL_ENV)  # the kernel inherits it
    start = time.perf_counter()
    run(nb, path.parent)
    elapsed = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # keep diffs small: no per-cell timing metadata
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path)
    parser.add_argument("--warn-only", action="store_true", help="exit 0 even when over a time budget")
    opts = parser.parse_args(argv)
    paths = opts.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    total, over = 0.0, False
    for path in paths:
        seconds = execute(path)
        total += seconds
        over |= seconds > BUDGET_NOTEBOOK_S
        flag = "" if seconds <= BUDGET_NOTEBOOK_S else f"  over the {BUDGET_NOTEBOOK_S} s budget"
        print(f"{path.name:40s} {seconds:7.1f} s{flag}", flush=True)
    over |= total > BUDGET_BOOK_S
    flag = "" if total <= BUDGET_BOOK_S else f"  over the {BUDGET_BOOK_S} s budget"
    print(f"{'total':40s} {total:7.1f} s{flag}")
    return int(over and not opts.warn_only)


if __name__ == "__main__":
    sys.exit(main())
