"""Helpers for the chapter notebooks only: one plotting style, source display, exercise checks.

The core package never imports this module (it pulls in matplotlib and IPython).
"""
from __future__ import annotations

import html
import inspect
import math
from typing import Any, Callable

import matplotlib as mpl
import matplotlib.pyplot as plt

PALETTE = ["#1f6feb", "#d1495b", "#2a9d8f", "#e9a23b", "#6f42c1", "#6c757d", "#8c564b", "#17becf"]


def use_book_style() -> None:
    """The one matplotlib style every figure of the book uses (modest dpi keeps notebooks light)."""
    mpl.rcParams.update({
        "figure.figsize": (7.0, 3.6), "figure.dpi": 80, "savefig.dpi": 80,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "axes.prop_cycle": mpl.cycler(color=PALETTE), "font.size": 10, "axes.titlesize": 11,
        "legend.frameon": False,
    })


def show_source(obj: Any) -> None:
    """Display the real source of a dsv3_lite function or class, highlighted, in the notebook."""
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


def check(label: str, answer: Any, expected: Any, rel_tol: float = 1e-3) -> None:
    """Self-check for an exercise: prints whether `answer` matches `expected` (numbers within rel_tol)."""
    if answer is None:
        print(f"{label}: not attempted yet (set your answer and re-run this cell)")
        return
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        ok = math.isclose(answer, expected, rel_tol=rel_tol)
    else:
        ok = answer == expected
    print(f"{label}: {'correct' if ok else 'not quite, try again'}")


def explorer(describe: Callable[..., str], **sliders: Any):
    """Sliders plus a read-out that shows `describe(**slider_values)` and updates as they move.

    It writes nothing to the cell's output stream (unlike `ipywidgets.interact`, whose printing leaks into
    stdout when a notebook runs headless), so executed notebooks stay deterministic.
    """
    import ipywidgets as widgets

    readout = widgets.HTML()

    def update(_change=None) -> None:
        text = describe(**{name: s.value for name, s in sliders.items()})
        readout.value = f"<pre>{html.escape(text)}</pre>"

    for name, slider in sliders.items():
        slider.description = slider.description or name
        slider.observe(update, names="value")
    update()
    return widgets.VBox([*sliders.values(), readout])


def sig(x: float, digits: int = 4) -> str:
    """`x` rounded to `digits` significant digits, for outputs that nbval compares."""
    return f"{x:.{digits}g}"


__all__ = ["PALETTE", "use_book_style", "show_source", "check", "explorer", "sig", "plt"]
