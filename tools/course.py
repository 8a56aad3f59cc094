"""The course kit: student notebooks without solutions, an otter-grader autograder and slides, per chapter.

    python tools/course.py --out course                  # every chapter
    python tools/course.py --out course notebooks/01_glance.ipynb
    python tools/course.py --write-key                   # dsv3_lite/exercise_key.json from the answers

For each chapter it writes
    course/student/NN_topic.ipynb                the chapter as handed out: no solution, no stored output
    course/autograder/NN_topic.ipynb             the same with the worked solutions (the instructor's copy)
    course/autograder/NN_topic-autograder.zip    otter-grader's autograder for it
    course/slides/NN_topic.slides.html           reveal.js slides of the chapter's prose and figures (they
                                                 load reveal.js from a CDN when opened)

Grade a submission with `otter run -a course/autograder/NN_topic-autograder.zip submission.ipynb`.

The chapters follow one exercise format, which this tool reads (tests/test_course.py checks it):
  * an exercise is a markdown cell that starts with a bold number ("**2.**" or "**4. (misconception)**");
  * its worked solution is a `<details><summary>Solution</summary> ... </details>` block at the end of that
    cell, collapsed in Jupyter, VS Code, Colab and the web book alike; its ```python blocks, run in order in
    the chapter, set the exercise's answer variables;
  * a graded exercise has a code cell whose last lines are `check("C.N", answer)` self-checks (from
    `dsv3_lite.exercises`; all but the last of several in `print(...)`), which compare with the answer
    key's digests and show no expected value.
The master notebook given to `otter assign` puts the solution's code before the checks (between
`# BEGIN SOLUTION NO PROMPT` and `# END SOLUTION`, so the student keeps the chapter's own starting code) and
makes every check a public otter test (with the key's own `check`); exercises without a check become
manual questions of 0 points. A check cell that is not its exercise's, or a second one, is an error.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import nbformat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from notebook_cells import ROOT  # noqa: E402

EXERCISE = re.compile(r"^\*\*(\d+[a-z]?)\.")
DETAILS = re.compile(r"\n*<details>\s*<summary>Solution</summary>.*?</details>\s*", re.S)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
CHECK = re.compile(r'^(?:print\()?check\("(?P<id>[\w.]+)", (?P<answer>\w+)\)\)?\s*$', re.M)
ASSIGNMENT_CONFIG = """# ASSIGNMENT CONFIG
name: {name}
init_cell: false
check_all_cell: false
export_cell: false
run_tests: false
solutions_pdf: false
tests:
  files: false
"""
OTTER_INIT = """# Grading: otter-grader checks your answers (installed here if it is missing)
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("otter") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "otter-grader"],
                   check=True)
import otter

grader = otter.Notebook("{name}.ipynb")"""


def _base(number: str) -> str:
    """An exercise's number without its part letter: "4" for "4", "4a" or "2.4b"'s "4b"."""
    return re.match(r"\d+", number).group()


def exercises(nb) -> list[dict]:
    """The chapter's exercises in order: {"number", "cell" (index of its markdown cell), "question" (that
    cell without its solution), "details" (the solution block), "solution" (its code), "check_cell"
    (index, or None for a discussion), "checks" [(id, answer variable)]}."""
    found = []
    for i, cell in enumerate(nb.cells):
        exercise = EXERCISE.match(cell.source) if cell.cell_type == "markdown" else None
        if exercise:
            details = DETAILS.search(cell.source)
            if details is None:
                raise ValueError(f"exercise {exercise.group(1)} (cell {i}) has no "
                                 "<details><summary>Solution</summary> block")
            found.append({"number": exercise.group(1), "cell": i,
                          "question": DETAILS.sub("\n", cell.source).strip(),
                          "details": details.group(0).strip(),
                          "solution": "\n".join(PYTHON_BLOCK.findall(details.group(0))).strip(),
                          "check_cell": None, "checks": []})
        elif cell.cell_type == "code" and CHECK.search(cell.source):
            checks = [(m["id"], m["answer"]) for m in CHECK.finditer(cell.source)]
            number = found[-1]["number"] if found else None
            if number is None or any(_base(ex.split(".", 1)[1]) != _base(number) for ex, _ in checks):
                raise ValueError(f"cell {i}: checks {[ex for ex, _ in checks]} follow exercise {number}: a "
                                 "check cell comes after its own exercise, before the next one")
            if found[-1]["check_cell"] is not None:
                raise ValueError(f"cell {i}: exercise {number} already has its check cell "
                                 f"{found[-1]['check_cell']}: put all of its checks in one cell")
            found[-1]["check_cell"], found[-1]["checks"] = i, checks
    return found


def question_name(chapter: str, number: str) -> str:
    """otter-grader's name of exercise `number` of chapter "NN_topic": "q1_2"."""
    return f"q{int(chapter[:2])}_{number}"


def split_check_cell(source: str) -> tuple[str, str]:
    """(the student's starting code, the check lines at the end)."""
    first = CHECK.search(source).start()
    return source[:first].rstrip(), source[first:].rstrip()


def master_notebook(nb, name: str):
    """The otter-grader assign-format master of one chapter (outputs cleared)."""
    raw, md, code = nbformat.v4.new_raw_cell, nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    found = {e["cell"]: e for e in exercises(nb)}
    by_check = {e["check_cell"]: e for e in found.values() if e["check_cell"] is not None}
    cells = [raw(ASSIGNMENT_CONFIG.format(name=name))]
    for i, cell in enumerate(nb.cells):
        cell = copy.deepcopy(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if i in found:
            e = found[i]
            graded = e["check_cell"] is not None
            header = (f"# BEGIN QUESTION\nname: {question_name(name, e['number'])}\n"
                      + ("points: 1" if graded else "manual: true\npoints: 0"))
            cells += [raw(header), md(e["question"])]
            if not graded:  # the question closes here; a graded one closes after its check cell
                cells += [raw("# BEGIN SOLUTION"), md(e["details"]), raw("# END SOLUTION"),
                          raw("# END QUESTION")]
            continue
        if i in by_check:
            e = by_check[i]
            start, checks = split_check_cell(cell.source)
            solution = f"# BEGIN SOLUTION NO PROMPT\n{e['solution']}\n# END SOLUTION"
            # the key's own check, whatever the notebook may have named `check`
            test = "\n".join(["from dsv3_lite.exercises import check as key_check"] + [
                f'assert key_check("{ex}", {answer}).correct' for ex, answer in e["checks"]])
            cells += [raw("# BEGIN SOLUTION"), md(e["details"]),
                      code("\n".join(part for part in (start, solution, checks) if part)),
                      raw("# END SOLUTION"), raw("# BEGIN TESTS"), code(test), raw("# END TESTS"),
                      raw("# END QUESTION")]
            continue
        cells.append(cell)
        if cell.cell_type == "code" and cell.source.startswith("# Setup:"):  # the chapter's setup cell
            cells.append(code(OTTER_INIT.format(name=name)))
    return nbformat.v4.new_notebook(cells=cells, metadata=copy.deepcopy(nb.metadata))


def slides(nb, out: pathlib.Path) -> None:
    """reveal.js slides from the executed chapter: each heading opens a slide (### a sub-slide); prose and
    figures follow; code, exercises' solutions and text outputs stay in the notebook."""
    from nbconvert import SlidesExporter

    deck = copy.deepcopy(nb)
    for cell in deck.cells:
        kind = "skip"
        if cell.cell_type == "markdown":
            cell.source = DETAILS.sub("\n", cell.source)
            heading = re.match(r"#+ ", cell.source)
            kind = {"# ": "slide", "## ": "slide", "### ": "subslide"}.get(heading and heading.group(0), "-")
        elif cell.cell_type == "code" and any("image/png" in o.get("data", {}) for o in cell.outputs):
            cell.outputs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            kind = "subslide"
        cell.metadata["slideshow"] = {"slide_type": kind}
    body, _ = SlidesExporter(exclude_input=True, exclude_input_prompt=True,
                             exclude_output_prompt=True).from_notebook_node(deck)
    out.write_text(body, encoding="utf-8")


def build(notebooks: list[pathlib.Path], out: pathlib.Path) -> None:
    for sub in ("student", "autograder", "slides"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        name = path.stem
        with tempfile.TemporaryDirectory() as tmp:
            master = pathlib.Path(tmp, f"{name}.ipynb")
            nbformat.write(master_notebook(nb, name), master)
            assign = subprocess.run(["otter", "assign", str(master), str(pathlib.Path(tmp, "dist"))],
                                    capture_output=True, text=True)
            if assign.returncode:
                raise RuntimeError(f"otter assign failed on {path.name}:\n{assign.stdout}{assign.stderr}")
            dist = pathlib.Path(tmp, "dist")
            shutil.copy(dist / "student" / f"{name}.ipynb", out / "student" / f"{name}.ipynb")
            shutil.copy(dist / "autograder" / f"{name}.ipynb", out / "autograder" / f"{name}.ipynb")
            (zipped,) = (dist / "autograder").glob(f"{name}-autograder_*.zip")
            shutil.copy(zipped, out / "autograder" / f"{name}-autograder.zip")
        slides(nb, out / "slides" / f"{name}.slides.html")
        print(f"{name}: student, autograder and slides written", flush=True)


def key_from_answers() -> dict:
    """The answer key of tools/exercise_answers.py's answers (digests only)."""
    from exercise_answers import ANSWERS

    from dsv3_lite.exercises import key_entry

    return {exercise: key_entry(exercise, a.value, a.rel_tol, a.traps) for exercise, a in ANSWERS.items()}


def write_key() -> pathlib.Path:
    from dsv3_lite.exercises import KEY_PATH

    KEY_PATH.write_text(json.dumps(key_from_answers(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return KEY_PATH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path,
                        help="chapters (default: every notebook in notebooks/)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("course"),
                        help="where the kit goes (default: course)")
    parser.add_argument("--write-key", action="store_true",
                        help="write dsv3_lite/exercise_key.json from tools/exercise_answers.py, then stop")
    opts = parser.parse_args(argv)
    if opts.write_key:
        print(f"wrote {write_key().relative_to(ROOT)}")
        return 0
    build(opts.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")), opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
