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
    expected = {exercise: key_entry(exercise, a.value, a.rel_tol, a.traps) for exercise, a in ANSWERS.items()}
    assert json.loads(KEY_PATH.read_text(encoding="utf-8")) == expected, \
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


def test_the_key_shows_no_answer():
    """The key holds digests, kinds, tolerances and hints: no number but a tolerance, no answer's text."""
    def leaves(node, field=None):
        if isinstance(node, dict):
            for name, child in node.items():
                yield from leaves(child, name)
        elif isinstance(node, list):
            for child in node:
                yield from leaves(child, field)
        else:
            yield field, node

    answers = {str(x) for a in ANSWERS.values()
               for x in (a.value if isinstance(a.value, (set, tuple, dict)) else [a.value])}
    for field, value in leaves(json.loads(KEY_PATH.read_text(encoding="utf-8"))):
        if field == "rel_tol":
            assert isinstance(value, (int, float))
        elif field in ("digest", "items"):
            assert re.fullmatch(r"[0-9a-f]{64}", value)
        else:
            assert field in ("kind", "traps") and isinstance(value, str) and value not in answers, (field, value)


@pytest.mark.parametrize("value", [0.0349, 1.03, 57.06, 2.5725, 469.76, 1e-6, 3.2e9])
@pytest.mark.parametrize("rel_tol", [1e-3, 1e-2, 2e-2])
def test_numbers_within_the_tolerance_pass_and_far_ones_fail(value, rel_tol):
    entry = {"x": key_entry("x", value, rel_tol)}
    for factor in (1, 1 + rel_tol, 1 - rel_tol, 1 + rel_tol / 3):
        assert course_check(entry, value * factor).correct, factor
    for factor in (1 + 5.5 * rel_tol, 1 - 5.5 * rel_tol, 10, 0.1):
        assert not course_check(entry, value * factor).correct, factor


def course_check(key, answer, exercise="x"):
    return check(exercise, answer, key=key)


def test_hints_say_what_is_off_without_the_answer():
    key = {"n": key_entry("n", 31104, rel_tol=0), "f": key_entry("f", 0.0349),
           "s": key_entry("s", {1, 3}), "b": key_entry("b", False), "t": key_entry("t", (6.0, 8))}
    assert "power of ten" in course_check(key, 31.104, "n").hint
    assert "power of ten" in course_check(key, 3.49, "f").hint
    assert course_check(key, -0.0349, "f").hint == "check the sign"
    assert course_check(key, 31104.5, "n").hint == "the answer is a whole number"
    assert course_check(key, "31104", "n").hint == "the answer is a number"
    assert course_check(key, {1, 2}, "s").hint == "1 of your 2 items belong in the set, 1 is missing"
    assert course_check(key, [3, 1], "s").correct  # a set may be given as a list
    assert course_check(key, 0, "b").hint == "the answer is True or False"
    assert course_check(key, (6.0, 9), "t").hint == "item 2 of the tuple is off"
    assert course_check(key, (6, 8), "t").correct
    with pytest.raises(ValueError, match="not in the answer key"):
        check("0.0", 1)
    with pytest.raises(TypeError, match="answers are numbers"):
        key_entry("x", "a string")


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
