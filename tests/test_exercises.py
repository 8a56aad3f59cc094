"""The exercises' self-checks: every exercise passes its right answer and fails a wrong one, the answer key
shows no answer and matches the instructor's answers, the chapters follow the exercise format, and the
exercise bugs found by readers stay fixed."""
import json
import math
import pathlib
import re
import sys

import nbformat
import pytest

from dsv3_lite.exercises import KEY_PATH, CheckResult, check, key_entry

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import course  # noqa: E402
from exercise_answers import ANSWERS  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def wrong_answers(value, rel_tol):
    """Answers near `value` that must be marked wrong."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, (int, float)):
        if rel_tol == 0:
            return [value + 1, value - 1]
        return [value * (1 + 6 * rel_tol), value * (1 - 6 * rel_tol), -value or 1.0]
    if isinstance(value, (set, frozenset)):
        return [set(value) | {"an item not in the set"}, set(list(value)[1:])]
    if isinstance(value, dict):
        first = next(iter(value))
        return [{**value, first: not value[first]}]
    if isinstance(value, tuple):
        return [(*wrong_answers(value[0], rel_tol)[:1], *value[1:])]
    raise TypeError(value)


def test_the_key_is_written_from_the_answers():
    assert json.loads(KEY_PATH.read_text(encoding="utf-8")) == course.key_from_answers(), \
        "run python tools/course.py --write-key"


@pytest.mark.parametrize("exercise", sorted(ANSWERS))
def test_the_check_passes_the_right_answer_and_fails_wrong_ones(exercise):
    answer = ANSWERS[exercise]
    result = check(exercise, answer.value)
    assert result.correct and result.score == 1.0 and repr(result) == f"Exercise {exercise}: correct"
    for wrong in wrong_answers(answer.value, answer.rel_tol):
        verdict = check(exercise, wrong)
        assert not verdict.correct and verdict.attempted and verdict.score == 0.0, wrong
        assert repr(verdict).startswith(f"Exercise {exercise}: not quite")
    assert not check(exercise, None).attempted and not check(exercise, ...).attempted
    for hint, trap in answer.traps.items():
        assert repr(check(exercise, trap)) == f"Exercise {exercise}: not quite, {hint}"


def shown_forms(value) -> set[str]:
    """How an answer would read in text: a number with 2+ significant digits as written, or rounded."""
    if isinstance(value, bool):
        return set()
    if isinstance(value, str):
        return {value}
    forms = {f"{value:.3g}", f"{value:.4g}", f"{value:,.0f}", str(int(value)) if value == int(value) else ""}
    return {f for f in forms if len(f.strip("0.-")) >= 2}


def test_the_key_shows_no_answer():
    """The key holds digests, kinds, tolerances and hints: no number but a tolerance, and no hint that
    spells out an answer."""
    def leaves(node, field=None):
        if isinstance(node, dict):
            for name, child in node.items():
                yield from leaves(child, name)
        elif isinstance(node, list):
            for child in node:
                yield from leaves(child, field)
        else:
            yield field, node

    def parts(value):
        if isinstance(value, dict):
            return [*value, *value.values()]
        return value if isinstance(value, (set, tuple)) else [value]

    shown = {form for a in ANSWERS.values() for x in parts(a.value) for form in shown_forms(x)}
    for field, value in leaves(json.loads(KEY_PATH.read_text(encoding="utf-8"))):
        if field == "rel_tol":
            assert isinstance(value, (int, float))
        elif field in ("digest", "items"):
            assert re.fullmatch(r"[0-9a-f]{64}", value)
        else:
            assert field in ("kind", "traps") and isinstance(value, str)
            assert not any(form in value for form in shown), (field, value)


@pytest.mark.parametrize("value", [0.0349, 1.03, 57.06, 2.5725, 469.76, 1e-6, 3.2e9])
@pytest.mark.parametrize("rel_tol", [1e-3, 5e-3, 1e-2, 2e-2])
def test_numbers_within_the_tolerance_pass_and_far_ones_fail(value, rel_tol):
    """Within rel_tol always passes; more than about 3 rel_tol away never does."""
    entry = {"x": key_entry("x", value, rel_tol)}
    for factor in (1, 1 + rel_tol, 1 - rel_tol, 1 + rel_tol / 3, 1 - rel_tol / 2):
        assert check("x", value * factor, key=entry).correct, factor
    for factor in (1 + 3.2 * rel_tol, 1 - 3.2 * rel_tol, 10, 0.1):
        assert not check("x", value * factor, key=entry).correct, factor


def test_hints_say_what_is_off_without_the_answer():
    key = {"n": key_entry("n", 31104, rel_tol=0), "f": key_entry("f", 0.0349),
           "s": key_entry("s", {1, 3}), "b": key_entry("b", False), "t": key_entry("t", (6.0, 8)),
           "d": key_entry("d", {"reads": False, "sees": True}), "c": key_entry("c", 1, rel_tol=0)}
    assert "power of ten" in check("n", 31.104, key=key).hint
    assert "power of ten" in check("f", 3.49, key=key).hint
    assert check("c", 10, key=key).hint == ""  # a small count's power of ten would give it away
    assert check("f", -0.0349, key=key).hint == "check the sign"
    assert check("n", 31104.5, key=key).hint == "the answer is a whole number"
    assert check("n", "31104", key=key).hint == "the answer is a number"
    assert check("n", float("nan"), key=key).hint == "the answer is a finite number"
    assert check("s", {1, 2}, key=key).hint == "1 of your 2 items belong in the set of 2"
    assert check("s", [3, 1], key=key).correct  # a set may be given as a list
    assert check("s", {None, 1}, key=key).hint == "1 of your 2 items belong in the set of 2"
    assert check("b", 0, key=key).hint == "the answer is True or False"
    assert check("t", (6.0, 9), key=key).hint == "item 2 is off"
    assert check("t", (60.0, 8), key=key).hint.startswith("item 1 is off: the digits look right")
    assert check("t", (6, 8), key=key).correct
    assert check("d", {"reads": True, "sees": True}, key=key).hint == "1 of your 2 entries are right"


def test_tensors_and_numpy_scalars_count_as_the_numbers_they_hold():
    import numpy as np
    import torch

    key = {"s": key_entry("s", {1, 3}), "t": key_entry("t", (9.0, 8)), "b": key_entry("b", True),
           "f": key_entry("f", 0.2075)}
    assert check("s", set(torch.tensor([1, 3])), key=key).correct
    assert check("t", (torch.tensor(9.0), np.int64(8)), key=key).correct
    assert check("b", np.bool_(True), key=key).correct
    assert check("f", torch.tensor(0.2075), key=key).correct


def test_a_check_result_is_what_a_grader_scores():
    right, unanswered = CheckResult("1.1", True, True), CheckResult("1.1", False, False)
    assert (right.score, bool(right), unanswered.score, bool(unanswered)) == (1.0, True, 0.0, False)
    assert "not attempted yet" in repr(unanswered)


# --- the chapters follow the exercise format (tools/course.py reads it) ------------------------------

def chapter_exercises(path):
    return course.exercises(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_show_no_answer_in_jupyter(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        assert ":::{dropdown}" not in cell.source, "Jupyter and Colab show a MyST dropdown's answer"
        assert "remove-cell" not in cell.metadata.get("tags", []), \
            "a remove-cell cell is hidden only in the web book"
        for line in cell.source.splitlines() if cell.cell_type == "code" else []:
            if re.search(r"(?<![\w.])check\(", line):  # a self-check names its exercise and answer only
                assert course.CHECK.fullmatch(line), line
    found = chapter_exercises(path)
    assert len(found) >= 3 and sum(e["check_cell"] is not None for e in found) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_graded_exercise_has_a_solution_that_sets_its_answer(path):
    chapter = str(int(path.name[:2]))
    for e in chapter_exercises(path):
        for exercise, variable in e["checks"]:
            assert exercise.split(".")[0] == chapter and exercise in ANSWERS
            assert re.search(rf"\b{variable}\b[^=\n]*=(?!=)", e["solution"]), \
                f"exercise {exercise}: the solution's code does not set {variable}"


def tiny_chapter(*cells):
    make = {"md": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    return nbformat.v4.new_notebook(cells=[make[kind](source) for kind, source in cells])


def solved(question: str, solution: str) -> str:
    return f"{question}\n\n<details>\n<summary>Solution</summary>\n\n{solution}\n\n</details>"


SOLVED = solved("**1.** Two times three?", "```python\nanswer_1 = 6\n```")


def test_the_course_tool_reads_the_exercise_format_and_rejects_a_misplaced_check():
    nb = tiny_chapter(("md", "# Chapter 1"), ("code", "# Setup: nothing"), ("md", SOLVED),
                      ("code", 'answer_1 = None\ncheck("1.1", answer_1)'),
                      ("md", solved("**2.** Why?", "Because.")))
    (first, second) = course.exercises(nb)
    assert first["checks"] == [("1.1", "answer_1")] and first["solution"] == "answer_1 = 6"
    assert second["checks"] == []
    master = [c.source.split("\n")[0] for c in course.master_notebook(nb, "01_tiny").cells]
    assert master.count("# BEGIN QUESTION") == 2 and master.count("# BEGIN TESTS") == 1
    assert master[master.index("# BEGIN QUESTION") - 1].startswith("# Grading: otter-grader")
    with pytest.raises(ValueError, match="follow exercise 2"):
        course.exercises(tiny_chapter(*[("md", SOLVED), ("md", SOLVED.replace("**1.**", "**2.**")),
                                        ("code", 'check("1.1", answer_1)')]))
    with pytest.raises(ValueError, match="already has its check cell"):
        course.exercises(tiny_chapter(("md", SOLVED), ("code", 'check("1.1", answer_1)'),
                                      ("code", 'check("1.1", answer_1)')))
    with pytest.raises(ValueError, match="has no <details>"):
        course.exercises(tiny_chapter(("md", "**1.** A question without its solution")))


def test_every_answer_is_checked_in_exactly_one_chapter():
    ids = [exercise for path in NOTEBOOKS for e in chapter_exercises(path) for exercise, _ in e["checks"]]
    assert sorted(ids) == sorted(ANSWERS)


# --- the exercise bugs readers found --------------------------------------------------------------------

def test_chapter_7_exercise_1_counts_a_batch_that_grows_linearly_over_tokens():
    """The batch grows from 3,072 to 15,360 sequences of 4,096 tokens over 469B tokens, linearly in the
    tokens seen: count the steps one by one."""
    tokens, steps = 0.0, 0
    while tokens < 469e9:
        tokens += (3072 + (15360 - 3072) * tokens / 469e9) * 4096
        steps += 1
    assert math.isclose(steps, 469e9 / (4096 * 12288) * math.log(5), rel_tol=1e-3)
    assert check("7.1", steps).correct
    linear_per_step = 469e9 / ((3072 + 15360) / 2 * 4096)  # the old expected value, about 12,424
    assert not check("7.1", linear_per_step).correct


def test_chapter_2_exercise_4_follows_the_questions_rule():
    """(b) returns cache False, weights False, output None; the question counts only False as failing."""
    question = next(c.source for c in nbformat.read(NOTEBOOKS[1], as_version=4).cells
                    if c.source.startswith("**4. (misconception)**"))
    assert "fails when it returns `False`; `None` means it could not run" in " ".join(question.split())
    outcome = {"cache": False, "weights": False, "output": None}
    assert check("2.4b", {name for name, ok in outcome.items() if ok is False}).correct


def test_chapter_5_exercise_2_accepts_the_value_as_the_solution_rounds_it():
    assert check("5.2", 1.03).correct
    assert not check("5.2", 1.0).correct  # "power-of-two scales change nothing" is the wrong answer
