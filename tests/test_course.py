"""The course kit (tools/course.py) with otter-grader: every chapter's student notebook shows no solution,
its autograder gives the solution notebook full marks, and the student notebook as handed out runs top to
bottom without an error and scores nothing.

Building the kit and grading 18 notebooks takes several minutes (each grading executes a whole chapter), so
the kit is built once per session and graded two notebooks at a time."""
import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402
from notebook_cells import KERNEL_ENV  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
pytestmark = [pytest.mark.slow,  # every test here starts other processes
              pytest.mark.skipif(shutil.which("otter") is None, reason="otter-grader is not installed "
                                 "(pip install -r requirements-dev.txt)")]


def grade(autograder: pathlib.Path, submission: pathlib.Path, out: pathlib.Path) -> dict:
    """otter run, failing on any error in the submission's cells (--debug); its results and exit status."""
    out.mkdir(parents=True)
    done = subprocess.run(["otter", "run", "--debug", "-a", str(autograder), "-o", str(out), str(submission)],
                          capture_output=True, text=True, env={**os.environ, **KERNEL_ENV})
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    scores = {t["name"]: (t["score"], t["max_score"]) for t in results.get("tests", []) if "score" in t}
    return {"returncode": done.returncode, "scores": scores, "log": done.stdout[-3000:] + done.stderr[-3000:]}


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("course")
    course.build(NOTEBOOKS, out)
    jobs = {(path.stem, who): (out / "autograder" / f"{path.stem}-autograder.zip",
                               out / who / f"{path.stem}.ipynb", out / "results" / who / path.stem)
            for path in NOTEBOOKS for who in ("autograder", "student")}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        graded = dict(zip(jobs, pool.map(lambda job: grade(*job), jobs.values())))
    return out, graded


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_solution_notebook_gets_full_marks(kit, path):
    result = kit[1][(path.stem, "autograder")]
    assert result["returncode"] == 0, result["log"]
    graded = {course.question_name(path.stem, e["number"])
              for e in course.exercises(nbformat.read(path, as_version=4)) if e["checks"]}
    assert set(result["scores"]) == graded and len(graded) >= 2
    assert all(score == top == 1 for score, top in result["scores"].values()), result["scores"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_student_notebook_runs_and_scores_nothing(kit, path):
    result = kit[1][(path.stem, "student")]
    assert result["returncode"] == 0, result["log"]  # --debug: an error in any cell fails the run
    assert result["scores"] and all(score == 0 for score, _ in result["scores"].values()), result["scores"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_student_notebook_shows_no_solution(kit, path):
    student = nbformat.read(kit[0] / "student" / f"{path.stem}.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in student.cells)
    assert "<details>" not in text and "SOLUTION" not in text
    assert not any(cell.get("outputs") for cell in student.cells if cell.cell_type == "code")
    for e in course.exercises(nbformat.read(path, as_version=4)):
        answers = "|".join(answer for _, answer in e["checks"]) or "(?!)"
        for line in e["solution"].splitlines():  # the lines that set an answer
            if re.match(rf"\s*({answers})\b[^=]*=", line):
                assert line.strip() not in text, f"exercise {e['number']}: the solution's {line!r} is there"
    # every graded exercise is an otter question the student can check
    checks = [c.source for c in student.cells if c.source.startswith("grader.check(")]
    assert len(checks) == sum(1 for e in course.exercises(nbformat.read(path, as_version=4)) if e["checks"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_slides_hold_the_chapters_headings_and_no_solution(kit, path):
    html = (kit[0] / "slides" / f"{path.stem}.slides.html").read_text(encoding="utf-8")
    headings = [c.source.splitlines()[0].lstrip("# ") for c in nbformat.read(path, as_version=4).cells
                if c.cell_type == "markdown" and re.match(r"#{1,3} ", c.source)]
    assert html.count("<section") >= len(headings) > 5
    assert "Solution</summary>" not in html
