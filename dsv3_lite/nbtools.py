"""Helpers for the chapter notebooks only: one plotting style, figures with alt text,
source display, widget explorers, and the `%%needs_triton` cell magic
(`%load_ext dsv3_lite.nbtools`). The exercises' self-checks are in
`dsv3_lite.exercises`.

The core package never imports this module (it pulls in matplotlib and IPython). The
book's Sphinx build loads it as an extension (`extra_extensions` in `_config.yml`,
see `setup`), so that the alt text a chapter gives a figure with `show_figure` becomes
that figure's `<img alt>` in the HTML.
"""
from __future__ import annotations

import base64
import hashlib
import html
import inspect
import io
import json
import pathlib
from typing import Any, Callable

import matplotlib as mpl
import matplotlib.pyplot as plt

PALETTE = ["#1f6feb", "#d1495b", "#2a9d8f", "#e9a23b", "#6f42c1", "#6c757d",
           "#8c564b", "#17becf"]

EXPLORER_NOTE = ("Interactive explorer ({names}): run this chapter in Jupyter or "
                 "Colab to use it. Here, without a live kernel, the figure below "
                 "shows the same relation.")


def use_book_style() -> None:
    """The one matplotlib style every figure of the book uses.

    Figures are laid out at 80 dpi (so `<Figure size 560x288 ...>`, the text nbval
    compares, stays put) and stored as PNG drawn at twice that resolution and shown
    at the 80-dpi size, so they are sharp on high-resolution screens; most are reduced
    to 256 colours, which keeps them smaller than a plain 1x PNG (see `_png_2x`).
    nbval does not compare PNGs.
    """
    mpl.rcParams.update({
        "figure.figsize": (7.0, 3.6), "figure.dpi": 80, "savefig.dpi": 80,
        "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False,
        "axes.prop_cycle": mpl.cycler(color=PALETTE), "font.size": 10,
        "axes.titlesize": 11, "legend.frameon": False,
    })
    shell = _ipython()
    if shell is not None:
        from matplotlib.figure import Figure

        # load the backend now: it sets IPython's figure formatters
        plt.switch_backend(mpl.get_backend())
        shell.display_formatter.formatters["image/png"].for_type(Figure, _png_2x)


def _png_2x(fig) -> tuple[str, dict] | None:
    """A figure as base64 PNG drawn at twice its dpi, with its 1x size as metadata.

    Line, bar and text figures are reduced to 256 colours (no visible change at
    2x, a third of the bytes); figures with a colour map or transparency keep full
    colour, for their smooth gradients.
    """
    from PIL import Image

    if not fig.axes and not fig.lines:
        # an empty figure shows nothing, as with the inline backend's own formatter
        return None
    buffer = io.BytesIO()
    fig.canvas.print_figure(buffer, format="png", dpi=2 * fig.dpi,
                            bbox_inches="tight", facecolor=fig.get_facecolor(),
                            edgecolor=fig.get_edgecolor())
    image = Image.open(buffer)
    width, height = image.size
    colour_mapped = bool(fig.findobj(lambda a: isinstance(a, mpl.cm.ScalarMappable)
                                     and a.get_array() is not None))
    if colour_mapped or (image.mode == "RGBA" and image.getextrema()[3][0] < 255):
        png = buffer.getvalue()
    else:
        reduced = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        colours = reduced.getpalette()[:768]
        whitest = max(range(len(colours) // 3),
                      key=lambda i: sum(colours[3 * i:3 * i + 3]))
        if sum(colours[3 * whitest:3 * whitest + 3]) >= 3 * 250:
            # a white background stays exactly white
            colours[3 * whitest:3 * whitest + 3] = [255, 255, 255]
            reduced.putpalette(colours)
        out = io.BytesIO()
        reduced.save(out, format="png", optimize=True)
        png = out.getvalue()
    return base64.b64encode(png).decode("ascii"), {"width": width // 2,
                                                   "height": height // 2}


def show_figure(alt: str, fig: Any = None) -> None:
    """Show `fig` (default: the current figure) with alt text; use it in
    place of `plt.show()`.

    `alt` says what the figure shows, in a sentence or two, for readers who cannot
    see it (screen readers, or a figure that failed to load): the quantities on the
    axes and the point it makes, e.g. "KV cache per token against context length:
    MLA's line stays 57 times below MHA's". The rendered book puts it in the figure's
    `<img alt>`; in Jupyter it travels in the output's metadata. The outputs nbval
    compares are exactly those of `plt.show()`.
    """
    from IPython.display import display

    if not isinstance(alt, str) or not alt.strip():
        raise ValueError("alt must be a non-empty sentence that says what the "
                         "figure shows")
    fig = plt.gcf() if fig is None else fig
    display(fig, metadata={"image/png": {"alt": " ".join(alt.split())}})
    # shown once: the inline backend would display a figure left open again
    plt.close(fig)


def show_source(obj: Any) -> None:
    """Display the real source of a dsv3_lite function or class, highlighted,
    in the notebook."""
    from IPython.display import Markdown, display

    display(Markdown(f"```python\n{inspect.getsource(obj).rstrip()}\n```"))


def explorer(describe: Callable[..., str], **sliders: Any):
    """Sliders plus a read-out that shows `describe(**slider_values)`
    and updates as they move.

    It writes nothing to the cell's output stream (unlike `ipywidgets.interact`,
    whose printing leaks into stdout when a notebook runs headless), so executed
    notebooks stay deterministic. Where no widget can run (the static book, which
    drops widget views; a viewer without a kernel) its output shows a short note
    instead, as text/html and text/plain (deterministic: nbval compares them):
    run the chapter in Jupyter or Colab to use the explorer; the static figure
    after it shows the same relation.
    """
    import ipywidgets as widgets

    class Explorer(widgets.VBox):
        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            note = EXPLORER_NOTE.format(names=", ".join(sliders))
            bundle["text/plain"] = note
            bundle["text/html"] = ('<div class="dsv3-explorer-note" role="note">'
                                   f'<p>{html.escape(note)}</p></div>')
            return bundle

    readout = widgets.HTML()

    def update(_change=None) -> None:
        text = describe(**{name: s.value for name, s in sliders.items()})
        readout.value = f"<pre>{html.escape(text)}</pre>"

    for name, slider in sliders.items():
        slider.description = slider.description or name
        slider.observe(update, names="value")
    update()
    return Explorer([*sliders.values(), readout])


def sig(x: float, digits: int = 4) -> str:
    """`x` rounded to `digits` significant digits, for outputs that nbval compares."""
    return f"{x:.{digits}g}"


def needs_triton(line: str, cell: str) -> None:
    """Cell magic `%%needs_triton`: run the cell where Triton is installed (Linux,
    with or without a GPU), else say that it is skipped.

    macOS and Windows have no Triton; there a chapter's reference cells still run.
    An error in the cell is raised, as it would be without the magic.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        print("Skipped: this cell needs Triton (pip install triton, Linux only).")
        return
    _ipython().run_cell(cell).raise_error()


def load_ipython_extension(shell) -> None:
    """`%load_ext dsv3_lite.nbtools` registers `%%needs_triton`."""
    shell.register_magic_function(needs_triton, magic_kind="cell")


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


# --- The book's Sphinx build (Jupyter Book loads this module as an extension) -------

def _image_alt_texts(notebook: pathlib.Path) -> dict[str, str]:
    """sha256 of each image output's bytes -> its alt text (myst-nb names
    image files by that hash)."""
    alts = {}
    for cell in json.loads(notebook.read_text(encoding="utf-8")).get("cells", []):
        for output in cell.get("outputs", []):
            for mime, meta in (output.get("metadata") or {}).items():
                data = output.get("data", {}).get(mime)
                if (mime in {"image/png", "image/jpeg"} and isinstance(meta, dict)
                        and meta.get("alt") and data):
                    raw = base64.b64decode("".join(data) if isinstance(data, list)
                                           else data)
                    alts[hashlib.sha256(raw).hexdigest()] = meta["alt"]
    return alts


def _set_image_alt_texts(app, doctree) -> None:
    from docutils import nodes

    source = pathlib.Path(app.env.doc2path(app.env.docname))
    if source.suffix != ".ipynb":
        return
    alts = _image_alt_texts(source)
    for image in doctree.findall(nodes.image):
        alt = alts.get(pathlib.PurePosixPath(image["uri"]).stem)
        if alt:
            image["alt"] = alt


def _drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    # Sphinx 7 writes an inline script that an extension adds while reading
    # twice; sphinx-thebe's `const THEBE_JS_URL = ...` then throws "already
    # declared" on every page.
    seen, scripts = set(), []
    for script in context.get("script_files", []):
        key = (script.filename or "", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            scripts.append(script)
    context["script_files"] = scripts


def setup(app) -> dict:
    """Sphinx extension: figure alt text from `show_figure`, and each inline
    script written once."""
    app.connect("doctree-read", _set_image_alt_texts)
    app.connect("html-page-context", _drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["PALETTE", "use_book_style", "show_figure", "show_source", "explorer",
           "sig", "needs_triton", "plt"]
