"""Self-checks for the chapters' exercises, against a key that shows no answer.

Each exercise's cell ends with `check("2.3", answer_3)`. The key (`exercise_key.json`
beside this module) holds, per exercise, a salted SHA-256 digest of the answer's
canonical form, never the answer: a number is bucketed on a log scale, so that an
answer within the exercise's relative tolerance shares its digest or a neighbour's; a
set, a dict and a bool have an exact form, and a tuple's items are checked one by
one. The result is what a grader scores (`.correct`,
`.score`) and reads "correct", "not quite" with a hint at what is off, or "not
attempted yet". Hints come from the key too: an answer off by a power of ten, a wrong
sign, how many of a set's items are right, or a known mistake named by the key.

The key is written by `tools/course.py --write-key` from the answers in
`tools/exercise_answers.py`; instructors grade with the same check
(`tools/course.py` builds an otter-grader autograder around it).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import pathlib
from typing import Any

KEY_PATH = pathlib.Path(__file__).with_name("exercise_key.json")
UNANSWERED = "not attempted yet (set your answer and re-run this cell)"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One exercise's verdict; `score` is 1.0 when correct, else 0.0."""

    exercise: str
    correct: bool
    attempted: bool
    hint: str = ""

    @property
    def score(self) -> float:
        return float(self.correct)

    def __bool__(self) -> bool:
        return self.correct

    def __repr__(self) -> str:
        if not self.attempted:
            return f"Exercise {self.exercise}: {UNANSWERED}"
        if self.correct:
            return f"Exercise {self.exercise}: correct"
        return f"Exercise {self.exercise}: not quite, {self.hint or 'try again'}"


def _digest(exercise: str, canonical: str) -> str:
    return hashlib.sha256(f"dsv3-lite/{exercise}/{canonical}".encode()).hexdigest()


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _bucket_width(rel_tol: float) -> float:
    """Width of the log-scale buckets: a little over the log of 1 - rel_tol, so that
    answers within rel_tol of each other are never more than one bucket apart."""
    return -1.01 * math.log1p(-rel_tol)


def _number_forms(x: float, rel_tol: float) -> list[str]:
    """Canonical forms of the finite number `x`: its own first, then the neighbours.

    Exact (rel_tol 0): an integer's decimal form. Otherwise buckets on a log scale:
    an answer within rel_tol of the key's value is in the same or a neighbouring
    bucket, so it is always accepted; one more than about 3 rel_tol away never is.
    """
    if rel_tol == 0:
        return [f"int:{int(x)}"] if x == int(x) else [f"num:{float(x)!r}"]
    if x == 0:
        return ["num:0"]
    sign = "-" if x < 0 else "+"
    bucket = round(math.log(abs(x)) / _bucket_width(rel_tol))
    return [f"num:{sign}{b}" for b in (bucket, bucket - 1, bucket + 1)]


def _plain(x: Any) -> Any:
    """`x` with 0-d tensors and NumPy scalars (anywhere in a set, tuple, list or
    dict) turned into the Python numbers and bools they hold."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset, list, tuple)):
        return type(x)(_plain(v) for v in x)
    if getattr(x, "shape", None) == () and hasattr(x, "item"):
        return x.item()
    return x


def _is_finite_number(x: Any) -> bool:
    return _is_number(x) and math.isfinite(x)


def _item_form(x: Any) -> str:
    if isinstance(x, bool) or _is_finite_number(x) and x == int(x):
        return json.dumps(x if isinstance(x, bool) else int(x))
    if _is_finite_number(x):
        return json.dumps(float(x))
    return json.dumps(x if isinstance(x, str) else repr(x))


def _scaled(x: float, k: int, rel_tol: float) -> float:
    """x * 10**k, an integer again when a whole answer is wanted and it is one."""
    y = x * 10.0 ** k
    return round(y) if rel_tol == 0 and abs(y - round(y)) <= 1e-9 * abs(y) else y


def _set_forms(answer: Any) -> list[str]:
    """A set's items, or a dict's (key, value) pairs, in canonical form."""
    if isinstance(answer, dict):
        return sorted(f"[{json.dumps(str(k))},{_item_form(v)}]"
                      for k, v in answer.items())
    return sorted({_item_form(x) for x in answer})


def key_entry(exercise: str, answer: Any, rel_tol: float = 1e-3,
              traps: dict[str, Any] | None = None) -> dict:
    """The key's entry for one exercise: digests of `answer`, never its value.

    `traps` maps a hint to a known wrong answer, so that a student who gives it
    is told what is off.
    """
    if isinstance(answer, bool):
        entry = {"kind": "bool", "digest": _digest(exercise, f"bool:{answer}")}
    elif _is_finite_number(answer):
        entry = {"kind": "number", "rel_tol": rel_tol,
                 "digest": _digest(exercise, _number_forms(answer, rel_tol)[0])}
    elif isinstance(answer, (set, frozenset, dict)):
        items = _set_forms(answer)
        entry = {"kind": "dict" if isinstance(answer, dict) else "set",
                 "digest": _digest(exercise, "set:" + ",".join(items)),
                 "items": sorted(_digest(exercise, "item:" + x) for x in items)}
    elif isinstance(answer, tuple):
        entry = {"kind": "tuple", "items": [
            key_entry(f"{exercise}[{i}]", x, rel_tol) for i, x in enumerate(answer)]}
    else:
        raise TypeError(f"exercise {exercise}: answers are finite numbers, bools, "
                        f"sets, dicts or tuples, not {answer!r}")
    if traps:
        entry["traps"] = [[key_entry(exercise, wrong, rel_tol), hint]
                          for hint, wrong in traps.items()]
    return entry


def _number_matches(exercise: str, entry: dict, answer: Any) -> tuple[bool, str]:
    if not _is_number(answer):
        return False, "the answer is a number"
    if not math.isfinite(answer):
        return False, "the answer is a finite number"
    rel_tol = entry["rel_tol"]

    def same(x: float) -> bool:
        return any(_digest(exercise, f) == entry["digest"]
                   for f in _number_forms(x, rel_tol))

    if same(answer):
        return True, ""
    scaled = (_scaled(answer, k, rel_tol) for k in range(-12, 13) if k)
    # the power of ten is hinted at only where it cannot give a small count away
    if any(same(y) for y in scaled if rel_tol or abs(y) >= 100):
        return False, "the digits look right but the power of ten is off (units?)"
    if answer and same(-answer):
        return False, "check the sign"
    if rel_tol == 0 and answer != int(answer):
        return False, "the answer is a whole number"
    return False, ""


def _collection_matches(exercise: str, entry: dict, answer: Any) -> tuple[bool, str]:
    kind = entry["kind"]
    if kind == "dict" and not isinstance(answer, dict):
        return False, "the answer is a dict"
    if kind == "set" and not isinstance(answer, (set, frozenset, list, tuple)):
        return False, "the answer is a set, e.g. {1, 2}"
    items = _set_forms(answer)
    if _digest(exercise, "set:" + ",".join(items)) == entry["digest"]:
        return True, ""
    right = sum(_digest(exercise, "item:" + x) in entry["items"] for x in items)
    if kind == "dict":
        return False, f"{right} of your {len(items)} entries are right"
    return False, (f"{right} of your {len(items)} items belong in the set of "
                   f"{len(entry['items'])}")


def _matches(exercise: str, entry: dict, answer: Any) -> tuple[bool, str]:
    """(correct, hint) of `answer` against one key entry."""
    kind = entry["kind"]
    if kind == "bool":
        if not isinstance(answer, bool):
            return False, "the answer is True or False"
        return _digest(exercise, f"bool:{answer}") == entry["digest"], ""
    if kind == "number":
        return _number_matches(exercise, entry, answer)
    if kind in ("set", "dict"):
        return _collection_matches(exercise, entry, answer)
    # a tuple: each item on its own
    if not isinstance(answer, (tuple, list)) or len(answer) != len(entry["items"]):
        return False, f"the answer is a tuple of {len(entry['items'])} items"
    wrong = []
    for i, (item, x) in enumerate(zip(entry["items"], answer)):
        ok, hint = _matches(f"{exercise}[{i}]", item, x)
        if not ok:
            wrong.append(f"item {i + 1} is off" + (f": {hint}" if hint else ""))
    return not wrong, "; ".join(wrong)


@functools.lru_cache(maxsize=1)
def answer_key() -> dict:
    """The key: exercise id -> entry (see `key_entry`)."""
    return json.loads(KEY_PATH.read_text(encoding="utf-8"))


def check(exercise: str, answer: Any, key: dict | None = None) -> CheckResult:
    """Check `answer` to exercise `exercise` ("chapter.number", e.g. "3.2") against
    the key (default: the book's), without showing the expected answer.

    `None` or `...` count as not attempted. A number within the exercise's relative
    tolerance is right (one up to about three times as far may pass too); a set may
    be given as a list, and 0-d tensors and NumPy scalars count as the numbers they
    hold.
    """
    key = answer_key() if key is None else key
    if exercise not in key:
        raise ValueError(f"exercise {exercise!r} is not in the answer key "
                         f"(ids look like '1.2' or '2.4a')")
    if answer is None or answer is Ellipsis:
        return CheckResult(exercise, correct=False, attempted=False)
    answer = _plain(answer)
    entry = key[exercise]
    correct, hint = _matches(exercise, entry, answer)
    if not correct:  # a known mistake names itself
        hint = next((trap_hint for trap, trap_hint in entry.get("traps", [])
                     if _matches(exercise, trap, answer)[0]), hint)
    return CheckResult(exercise, correct=correct, attempted=True, hint=hint)


__all__ = ["CheckResult", "check", "key_entry", "answer_key", "KEY_PATH"]
