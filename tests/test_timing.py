"""dsv3_lite.timing: the alternating best-of timer, checked on its behaviour with a fake clock (never on
wall-clock values)."""
import pytest

from dsv3_lite.timing import best_of, machine, spread


class FakeClock:
    """A clock that advances only when a candidate runs, by the duration scripted for that call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def scripted(clock, log, name, durations):
    """A candidate that logs its name and advances the clock by its next scripted duration."""
    it = iter(durations)

    def call():
        log.append(name)
        clock.now += next(it)
    return call


def test_calls_alternate_and_the_fastest_call_is_kept():
    clock, log = FakeClock(), []
    calls = {"a": scripted(clock, log, "a", [9.0, 3.0, 5.0, 4.0]),
             "b": scripted(clock, log, "b", [9.0, 2.0, 1.0, 7.0])}
    best = best_of(calls, reps=3, warmup=1, clock=clock)
    assert log == ["a", "b"] * 4          # one untimed round, then three alternating rounds
    assert best == {"a": 3.0, "b": 1.0}   # the warm-up call (9.0) is never counted
    assert list(best) == ["a", "b"]


def test_without_warmup_every_call_is_timed():
    clock, log = FakeClock(), []
    best = best_of({"only": scripted(clock, log, "only", [0.5, 0.25])}, reps=2, warmup=0, clock=clock)
    assert log == ["only", "only"] and best == {"only": 0.25}


def test_real_clock_returns_non_negative_seconds():
    best = best_of({"noop": lambda: None}, reps=2)
    assert set(best) == {"noop"} and best["noop"] >= 0.0


@pytest.mark.parametrize("kwargs, error, words", [
    ({"reps": 0}, ValueError, "reps (0) must be >= 1"),
    ({"warmup": -1}, ValueError, "warmup (-1) must be >= 0"),
    ({"reps": 2.0}, TypeError, "reps must be an int"),
    ({"reps": True}, TypeError, "reps must be an int"),
])
def test_bad_settings_name_the_field(kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        best_of({"noop": lambda: None}, **kwargs)


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="calls is empty"):
        best_of({})


def test_setup_runs_untimed_before_every_call():
    clock, log = FakeClock(), []
    calls = {"a": scripted(clock, log, "a", [1.0, 2.0]), "b": scripted(clock, log, "b", [3.0, 1.0])}

    def setup(name):
        log.append(f"setup {name}")
        clock.now += 100.0  # slow set-up time must not be counted

    best = best_of(calls, reps=1, warmup=1, clock=clock, setup=setup)
    assert log == ["setup a", "a", "setup b", "b"] * 2
    assert best == {"a": 2.0, "b": 1.0}


def test_spread_is_the_median_and_range():
    assert spread([3.0, 1.0, 2.0, 10.0]) == "2.50 [1.00, 10.00]"
    assert spread([1.234], fmt=".1f") == "1.2 [1.2, 1.2]"
    with pytest.raises(ValueError, match="values is empty"):
        spread([])


def test_machine_names_the_threads_and_torch():
    text = machine()
    assert "torch thread(s)" in text and text.endswith(f"torch {__import__('torch').__version__}")
