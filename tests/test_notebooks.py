"""Every chapter notebook keeps the contract, opens with the stamped badge and setup cell, and is in the
table of contents. (nbval, run by the same pytest command, re-executes each one and compares outputs.)"""
import copy
import json
import os
import pathlib
import sys

import pytest
import yaml

from tests.notebook_contract import contract_problems

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from notebook_cells import KERNEL_ENV, colab_badge, repository, setup_source  # noqa: E402

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


def machine_specific_text() -> list[str]:
    """Text that would tie a stored output to this machine: the repository's path, the home directory
    (unless it is the filesystem root, as in some containers: "/" is in every path) and site-packages."""
    home = pathlib.Path.home()
    return [str(ROOT), "site-packages"] + ([str(home)] if home != pathlib.Path(home.anchor) else [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_machine_specific_text_in_outputs(path):
    text = json.dumps([c.get("outputs", []) for c in load(path)["cells"]])
    for leak in machine_specific_text():
        assert leak not in text


def test_machine_specific_text_skips_a_home_at_the_root(monkeypatch):
    monkeypatch.setenv("HOME", "/")
    assert "/" not in machine_specific_text()
    monkeypatch.setenv("HOME", "/home/reader")
    assert "/home/reader" in machine_specific_text()


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


# tools/execute_notebooks.py, on tiny notebooks (never on the chapters: re-executing them is a commit)
@pytest.fixture
def executor():
    pytest.importorskip("nbclient")
    import execute_notebooks

    return execute_notebooks


def test_executor_merges_consecutive_pieces_of_a_stream(executor):
    import nbformat

    out = nbformat.v4.new_output
    outputs = [out("stream", name="stdout", text="a\n"), out("stream", name="stdout", text="b\n"),
               out("display_data", data={"text/plain": "'x'"}), out("stream", name="stdout", text="c\n"),
               out("stream", name="stderr", text="w1\n"), out("stream", name="stderr", text="w2\n")]
    merged = executor.merge_streams(outputs)
    assert [(o.output_type, o.get("name"), o.get("text")) for o in merged] == [
        ("stream", "stdout", "a\nb\n"), ("display_data", None, None), ("stream", "stdout", "c\n"),
        ("stream", "stderr", "w1\nw2\n")]


@pytest.mark.parametrize("seconds,warn_only,status", [
    ([10, 20], False, 0), ([130], False, 1), ([130], True, 0), ([100, 100, 100, 100, 100, 100, 100], False, 1)])
def test_executor_exits_non_zero_over_a_budget(executor, monkeypatch, capsys, seconds, warn_only, status):
    times = iter(seconds)
    monkeypatch.setattr(executor, "execute", lambda path: next(times))
    paths = [f"n{i}.ipynb" for i in range(len(seconds))]
    assert executor.main(paths + ["--warn-only"] * warn_only) == status
    assert ("over the" in capsys.readouterr().out) == (max(seconds) > 120 or sum(seconds) > 600)


def test_executor_runs_this_interpreter_in_the_kernel_environment(executor, tmp_path, monkeypatch):
    """A 'python3' kernelspec pointing elsewhere is ignored, the kernel gets KERNEL_ENV, and one cell's
    prints are stored as one stream output (a display between them keeps the order)."""
    import nbformat
    from notebook_cells import KERNEL_ENV

    fake = tmp_path / "jupyter" / "kernels" / "python3"
    fake.mkdir(parents=True)
    (fake / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/python", "-f", "{connection_file}"],
                                                  "display_name": "elsewhere", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for name in KERNEL_ENV:
        monkeypatch.setenv(name, "inherited")  # restored after the test; the executor sets its own values
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Tiny"),
        nbformat.v4.new_code_cell("import os, sys, time\n"
                                  "print(sys.executable)\n"
                                  "print(*(os.environ[name] for name in " + repr(sorted(KERNEL_ENV)) + "))"),
        nbformat.v4.new_code_cell("for i in range(3):\n"
                                  "    print(i, flush=True)\n"
                                  "    time.sleep(0.05)\n"
                                  "display('between')\n"
                                  "print('after')"),
    ]), path)
    executor.execute(path)
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert cells[0].source.startswith("# Setup:")  # stamped
    assert cells[1].outputs[0].text.split("\n")[:2] == [sys.executable,
                                                          " ".join(KERNEL_ENV[n] for n in sorted(KERNEL_ENV))]
    assert [(o.output_type, o.get("text")) for o in cells[2].outputs] == [
        ("stream", "0\n1\n2\n"), ("display_data", None), ("stream", "after\n")]
    assert all("execution" not in c.metadata for c in cells)


def test_contract_rejects_a_version_in_a_compared_output():
    nb = copy.deepcopy(EXECUTED)
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "torch 2.13.0\n"}]
    assert any("prints a package version" in p for p in contract_problems(nb))
    nb["cells"][2]["source"] = "# NBVAL_IGNORE_OUTPUT\nx"
    assert contract_problems(nb) == []


def test_chapter_9_runs_without_triton(executor, tmp_path, monkeypatch):
    """macOS and Windows have no Triton: chapter 9's reference cells run there, and each cell marked
    %%needs_triton says that it is skipped instead of failing."""
    import nbformat

    blocker = tmp_path / "no_triton" / "triton"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("no Triton on this system")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(blocker.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for name, value in KERNEL_ENV.items():
        monkeypatch.setenv(name, value)
    path = ROOT / "notebooks" / "09_kernels.ipynb"
    nb = nbformat.read(path, as_version=4)
    executor.run(nb, path.parent)  # raises on a cell's error
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = ["".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in c.outputs)
            for c in code]
    needs = [t for c, t in zip(code, text) if c.source.startswith("%%needs_triton")]
    assert len(needs) >= 10 and all(t.startswith("Skipped: this cell needs Triton") for t in needs)
    assert any("no Triton here" in t for t in text)
    assert sum(t.count("not attempted yet") for t in text) == sum(t.count("Exercise 9.") for t in text) == 6
