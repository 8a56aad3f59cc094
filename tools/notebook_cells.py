"""The two cells every chapter opens with, derived from the repository URL in `_config.yml`, and the
environment every notebook kernel runs in.

Used by tools/execute_notebooks.py (which stamps the cells and sets the environment) and by the tests
(which check the cells; conftest.py sets the same environment for the kernels nbval starts).
"""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BADGE_MARKER = "colab-badge"
# One torch thread (chapters that train pin it themselves too), and no progress bars: tqdm's own switch,
# so that no bar residue lands in stored or compared outputs.
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def repository() -> tuple[str, str]:
    """(url, branch) of the book's repository, read from _config.yml: the one place they are written."""
    import yaml  # here, so that conftest.py can read KERNEL_ENV without it

    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    return config["repository"]["url"].rstrip("/"), config["repository"].get("branch", "main")


def colab_badge(notebook: pathlib.Path) -> str:
    url, branch = repository()
    github_path = url.split("github.com/", 1)[1]
    target = f"https://colab.research.google.com/github/{github_path}/blob/{branch}/notebooks/{notebook.name}"
    return (f'<a href="{target}" target="_parent"><img src="https://colab.research.google.com/assets/'
            f'colab-badge.svg" alt="Open In Colab" class="{BADGE_MARKER}"/></a>')


def setup_source() -> str:
    """The setup cell. On Colab it installs the package from the book's repository, or from the URL in the
    environment variable DSV3_LITE_REPO: any URL pip takes after `dsv3-lite[notebooks] @`, such as
    `git+file:///path/to/checkout@main` or `file:///path/to/checkout`. tools/simulate_colab.py sets it to
    test the cell offline against a local checkout."""
    url, branch = repository()
    return (
        "# Setup: on Colab, install dsv3_lite from the book's repository\n"
        "# (or from $DSV3_LITE_REPO). Locally, the README's set-up has done it.\n"
        "import sys\n"
        "\n"
        "if \"google.colab\" in sys.modules:\n"
        "    import os\n"
        "    import subprocess\n"
        "\n"
        f"    default = \"git+{url}@{branch}\"\n"
        "    repo = os.environ.get(\"DSV3_LITE_REPO\", default)\n"
        "    pip = [sys.executable, \"-m\", \"pip\", \"install\", \"-q\"]\n"
        "    subprocess.run(pip + [f\"dsv3-lite[notebooks] @ {repo}\"], check=True)"
    )


def stamp(nb, notebook: pathlib.Path) -> None:
    """Rewrite the badge line of the title cell and the setup cell (cells 0 and 1) in place."""
    import nbformat

    title = nb.cells[0]
    if title.cell_type != "markdown" or not title.source.startswith("# "):
        raise ValueError(f"{notebook.name}: cell 0 must be the markdown title ('# Chapter ...')")
    heading, *rest = [ln for ln in title.source.splitlines() if BADGE_MARKER not in ln]
    while rest and not rest[0].strip():
        rest.pop(0)
    title.source = "\n".join([heading, "", colab_badge(notebook), ""] + rest).rstrip()
    if len(nb.cells) > 1 and nb.cells[1].cell_type == "code" and nb.cells[1].source.startswith("# Setup:"):
        nb.cells[1].source = setup_source()
    else:
        nb.cells.insert(1, nbformat.v4.new_code_cell(setup_source()))
