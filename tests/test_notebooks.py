"""Every chapter notebook keeps the contract, opens with the stamped badge and setup cell, and is in the
table of contents. (nbval, run by the same pytest command, re-executes each one and compares outputs.)"""
import copy
import json
import pathlib
import sys

import pytest
import yaml

from tests.notebook_contract import contract_problems

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from notebook_cells import colab_badge, repository, setup_source  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_contract(path):
    assert contract_problems(load(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_setup_cell_derive_from_config(path):
    cells = load(path)["cells"]
    assert colab_badge(path) in "".join(cells[0]["source"]), "run tools/execute_notebooks.py to stamp the badge"
    assert "".join(cells[1]["source"]) == setup_source()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_machine_specific_text_in_outputs(path):
    text = json.dumps([c.get("outputs", []) for c in load(path)["cells"]])
    for leak in (str(ROOT), str(pathlib.Path.home()), "site-packages"):
        assert leak not in text


def test_every_notebook_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert f"notebooks/{path.stem}" in toc, f"{path.name} is missing from _toc.yml"


def test_repository_url_is_written_once():
    url, _ = repository()
    assert url == yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    hits = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".py", ".yml", ".md", ".toml", ".txt"}
            and "_build" not in p.parts and url.split("//")[1] in p.read_text(encoding="utf-8", errors="ignore")]
    assert sorted(p.relative_to(ROOT).as_posix() for p in hits) == ["_config.yml"]


# The contract check itself must catch what nbval lets through.
EXECUTED = {"cells": [
    {"cell_type": "markdown", "source": "# T"},
    {"cell_type": "code", "source": "x = 1", "execution_count": 1, "outputs": []},
    {"cell_type": "code", "source": "x", "execution_count": 2,
     "outputs": [{"output_type": "execute_result", "data": {"text/plain": "1"}}]},
]}


def test_contract_accepts_an_executed_notebook():
    assert contract_problems(EXECUTED) == []


def test_contract_rejects_an_unexecuted_notebook():
    nb = copy.deepcopy(EXECUTED)
    for cell in nb["cells"][1:]:
        cell["execution_count"], cell["outputs"] = None, []
    assert contract_problems(nb) == ["2 of 2 code cells never executed", "no code cell has stored outputs"]


def test_contract_rejects_out_of_order_execution_and_errors():
    nb = copy.deepcopy(EXECUTED)
    nb["cells"][1]["execution_count"] = 3
    nb["cells"][2]["outputs"] = [{"output_type": "error", "ename": "ValueError"}]
    problems = contract_problems(nb)
    assert any("top to bottom" in p for p in problems) and any("ValueError" in p for p in problems)
