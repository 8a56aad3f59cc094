"""The rendered book as readers see it: every page in headless Chromium at desktop and phone width.

The book is built first when `_build/html` is older than its sources (`jupyter-book build . -W
--keep-going`, as in the README), served on 127.0.0.1 and opened page by page at 1280 px and at 390 px
(phone emulation). Per page and width it checks the title, that every image the book serves loads, that
the page body never scrolls sideways, that nothing the book's own scripts run logs an error, the menu
buttons, and on desktop that code, outputs, equations and tables fit the column. Once per width it
searches for a term through the search button. From the HTML it checks the explorers' note, figure alt
text and that no exercise shows its answer. Screenshots (full pages, menus open, search results) and a
report of every measurement (`report.json`) go to `_build/screenshots/`.

Offline by design: every request that is not to the local server is blocked, so the outcome is the same
with or without a network. CDN failures are therefore expected and do not count as errors ("Failed to
load resource" for a URL off the local server); everything else logged at error level, and every
uncaught exception, counts. MathJax, which the book loads from a CDN, is served from a local copy when
`_build/vendor/mathjax` (or $DSV3_MATHJAX) holds one (`.ci/run` fetches it from npm), so that equations
are typeset and measured; without it, equation checks are skipped (failed on CI).

Browser: Playwright for Python (requirements-dev.txt) drives a system Chromium: $DSV3_CHROMIUM, else
`chromium` / `chromium-browser` / `google-chrome` on the PATH (Debian: `apt-get install chromium`, which
`.ci/run` does); Playwright's own browser download is used only if a developer installed it. Without any
browser the tests skip with that message, except on Linux CI, where they fail.

Exercise convention (chapter notebooks), checked in the HTML:
  * an exercise is a paragraph that starts with a bold number ("**2.** ..."), in the "Exercises" section;
  * its worked answer lives only in a collapsed solution right after it,
    `<details><summary>Solution</summary> ... </details>` (collapsed in Jupyter and Colab too, which show a
    MyST dropdown's content; tests/test_exercises.py checks the notebooks);
  * its self-check cell shows the reader's line and `check("3.2", answer_2)`: the exercise's id and the
    reader's answer, nothing else (dsv3_lite.exercises compares with the answer key's digests);
  * the self-check shows only its verdict: "not attempted yet", "correct" or "not quite, <a hint>";
  * no number of the solution (one with 2+ significant digits that the question does not state)
    appears in a visible cell of the exercise.
"""
from __future__ import annotations

import ast
import decimal
import functools
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import yaml

pytestmark = pytest.mark.slow  # every test here starts other processes

ROOT = pathlib.Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
MATHJAX = pathlib.Path(os.environ.get("DSV3_MATHJAX", ROOT / "_build" / "vendor" / "mathjax"))
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
BOOK_TITLE = CONFIG["title"]
WIDTHS = {"desktop": 1280, "phone": 390}
SEARCH = ("latent", "notebooks/02_mla.html")  # a term, and a page the results must link to
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ON_LINUX_CI = sys.platform.startswith("linux") and bool(os.environ.get("CI"))
CHECK_MESSAGE = re.compile(r"^Exercise [\w.]+: (not attempted yet.*|correct|not quite, .+)$")

# Expected failures of chapter content still to be fixed, keyed by page, then by test ("<test>" for
# every width, "<test>[phone]" for one width); every measurement is in _build/screenshots/report.json.
# Empty: every page passes every check. A new entry is a temporary, documented exception.
KNOWN_FAILURES: dict[str, dict[str, str]] = {}


# --- which pages ------------------------------------------------------------------------------------------

def _toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part.get("chapters", [])]
    return pages


TOC_PAGES = _toc_pages()
PAGES = TOC_PAGES + ["genindex", "search"]
CHAPTERS = [p for p in TOC_PAGES if p.startswith("notebooks/")]


def _source(page: str) -> pathlib.Path:
    for suffix in (".ipynb", ".md"):
        if (ROOT / f"{page}{suffix}").exists():
            return ROOT / f"{page}{suffix}"
    raise FileNotFoundError(page)


def _source_heading(page: str) -> str:
    path = _source(page)
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    else:
        text = path.read_text(encoding="utf-8")
    heading = next(line[2:] for line in text.splitlines() if line.startswith("# "))
    return re.sub(r"[`*]", "", heading).strip()


def _cases(test: str, pages: list[str], widths=tuple(WIDTHS)) -> list:
    """(page, width) parameters, with the page's known failure for this test marked xfail."""
    cases = []
    for page in pages:
        known = KNOWN_FAILURES.get(page, {})
        for width in widths:
            reason = known.get(f"{test}[{width}]") or known.get(test)
            marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
            cases.append(pytest.param(page, width, marks=marks, id=f"{page}-{width}"))
    return cases


# --- build, serve, browse ---------------------------------------------------------------------------------

def _sources_mtime() -> float:
    paths = [ROOT / "_config.yml", ROOT / "_toc.yml", ROOT / "dsv3_lite" / "nbtools.py"]
    for folder, pattern in (("book", "*.md"), ("notebooks", "*.ipynb"), ("_static", "*")):
        paths += (ROOT / folder).rglob(pattern)
    return max(p.stat().st_mtime for p in paths if p.is_file())


@pytest.fixture(scope="session")
def built_book() -> pathlib.Path:
    """_build/html, rebuilt in full (warnings are errors, as in the README) when older than its sources."""
    stamp = HTML / ".buildinfo"
    if not stamp.exists() or stamp.stat().st_mtime < _sources_mtime():
        build = subprocess.run(
            [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
             "build", str(ROOT), "--all", "-W", "--keep-going"],  # --all: Sphinx 7.4 keeps stale _static copies
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert build.returncode == 0, f"the book build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    return HTML


@pytest.fixture(scope="session")
def server(built_book):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a page closed mid-request
                super().handle_error(request, client_address)

    httpd = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(built_book)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _chromium_executable() -> str | None:
    if os.environ.get("DSV3_CHROMIUM"):
        return os.environ["DSV3_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _no_browser(why: str):
    message = (f"no browser for the book's browser test ({why}). Install Playwright for Python "
               "(requirements-dev.txt) and Chromium (Debian/Ubuntu: apt-get install chromium; .ci/run does), "
               "or point DSV3_CHROMIUM at a Chromium or Chrome binary.")
    if ON_LINUX_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _no_browser("playwright is not installed")
    executable = _chromium_executable()
    with sync_playwright() as playwright:
        try:  # Playwright hides scrollbars by default; a reader's desktop browser shows them
            if executable:
                chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                                      ignore_default_args=["--hide-scrollbars"])
            else:  # a developer's own `playwright install chromium`, if any
                chromium = playwright.chromium.launch(args=CHROMIUM_ARGS, ignore_default_args=["--hide-scrollbars"])
        except Error as err:
            _no_browser(f"Chromium did not start: {str(err).splitlines()[0]}")
        yield chromium
        chromium.close()


def _context(browser, width: str):
    if width == "phone":
        context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    else:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(30_000)

    def route(request_route):
        url = request_route.request.url
        if url.startswith(MATHJAX_CDN) and (MATHJAX / "es5").is_dir():
            local = MATHJAX / "es5" / urllib.parse.urlparse(url).path.split("/es5/", 1)[1]
            if local.is_file():
                types = {".js": "application/javascript", ".woff": "font/woff"}
                return request_route.fulfill(path=str(local), content_type=types.get(local.suffix))
        request_route.abort()

    context.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), route)
    return context


def _slug(page: str) -> str:
    return page.replace("/", "__")


# Everything measured on one page, in the page. `details` are opened first: a solution must fit too.
MEASURE_JS = r"""
() => {
  const cw = document.documentElement.clientWidth;
  const shown = (e) => e.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
  const name = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
                      [...e.classList].slice(0, 3).map((c) => '.' + c).join('');
  const text = (e, n = 90) => (e.innerText || e.textContent || '').trim().replace(/\s+/g, ' ').slice(0, n);
  const where = (e) => { const s = e.closest('section[id]'); return s ? s.id : ''; };
  const tex = (e) => {
    try { return window.MathJax.startup.document.getMathItemsWithin(e)[0].math.trim(); } catch (err) { return ''; }
  };
  const scrollbar = (e) => { const cs = getComputedStyle(e);
    return e.offsetHeight - e.clientHeight - parseFloat(cs.borderTopWidth) - parseFloat(cs.borderBottomWidth); };
  const cue = (e) => { const cs = getComputedStyle(e);
    return cs.backgroundImage.includes('gradient') && cs.backgroundAttachment.includes('local'); };
  const out = {cw, overflow: document.documentElement.scrollWidth - cw, offenders: [], boxes: [],
               math_problems: [], images: []};
  // elements that stick out of the viewport on the right, outermost first, ignoring what a scrolling or
  // clipping ancestor contains and the off-canvas (fixed) menus
  const sticksOut = (e) => {
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.right <= cw + 1 || !shown(e)) return false;
    for (let p = e; p && p !== document.body; p = p.parentElement) {
      const cs = getComputedStyle(p);
      if (cs.position === 'fixed') return false;
      if (p !== e && cs.overflowX !== 'visible' && p.getBoundingClientRect().right <= cw + 1) return false;
    }
    return true;
  };
  if (out.overflow > 1) {
    for (const e of document.body.querySelectorAll('*')) {
      if (sticksOut(e) && !(e.parentElement && sticksOut(e.parentElement))) {
        out.offenders.push({element: name(e), section: where(e), right: Math.round(e.getBoundingClientRect().right),
                            text: text(e), tex: tex(e)});
      }
    }
  }
  // boxes of the article that scroll sideways: do they fit, and do they show it
  for (const e of document.querySelectorAll('.bd-article pre, .bd-article div.math mjx-container[display="true"], ' +
                                            '.bd-article .pst-scrollable-table-container')) {
    if (!shown(e) || e.scrollWidth <= e.clientWidth + 1) continue;
    const kind = e.tagName === 'PRE' ? (e.closest('.cell_output') ? 'output' : 'code')
                 : e.tagName === 'MJX-CONTAINER' ? 'equation' : 'table';
    const lines = (e.textContent || '').split('\n');
    const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
    out.boxes.push({kind, section: where(e), in_solution: !!e.closest('details'),
                    scroll_width: e.scrollWidth, width: e.clientWidth, scrollbar_px: scrollbar(e), scroll_cue: cue(e),
                    longest_line_chars: e.tagName === 'PRE' ? longest.length : null,
                    text: kind === 'equation' ? tex(e) : (kind === 'table' ? text(e) : longest.trim().slice(0, 90))});
  }
  // typesetting errors, and TeX that MathJax shows literally (e.g. "\_" inside \texttt)
  for (const c of document.querySelectorAll('mjx-container')) {
    const bad = c.querySelector('mjx-merror') ? 'a typesetting error' :
                c.querySelector('mjx-mtext mjx-c.mjx-c5C') ||  // CHTML draws a text backslash as this glyph
                [...c.querySelectorAll('mjx-utext')].some((t) => t.textContent.includes('\\'))
                    ? 'a literal backslash' : '';
    if (bad) out.math_problems.push({section: where(c), tex: tex(c), shows: bad});
  }
  for (const img of document.images) {
    const local = new URL(img.currentSrc || img.src, location.href).origin === location.origin;
    out.images.push({src: img.getAttribute('src'), local, loaded: img.complete && img.naturalWidth > 0,
                     alt: img.getAttribute('alt'), in_output: !!img.closest('.cell_output')});
  }
  out.explorer_notes = [...document.querySelectorAll('.dsv3-explorer-note')].filter(shown).length;
  out.widget_views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  out.dead_widget_reprs = [...document.querySelectorAll('.cell_output')]
    .filter((o) => /^(VBox|HBox|Box|interactive)\(/.test((o.innerText || '').trim())).map((o) => where(o));
  return out;
}
"""

# Before any interaction: what the reader sees first.
FIRST_VIEW_JS = r"""
() => {
  const shown = (e) => e.checkVisibility({checkOpacity: true, checkVisibilityCSS: true}) &&
                       e.getBoundingClientRect().width > 0 && e.getBoundingClientRect().right > 0 &&
                       e.getBoundingClientRect().left < document.documentElement.clientWidth;
  const h1 = document.querySelector('.bd-article h1');
  return {
    title: document.title,
    h1: h1 ? h1.textContent.replace(/#\s*$/, '').trim() : null,
    search_entries: [...document.querySelectorAll('.search-button-field, button.search-button, form.bd-search')]
      .filter((e) => shown(e) && !e.closest('.bd-search-container')).map((e) => e.className),
  };
}
"""


def _wait_until_rendered(page) -> str:
    """Wait for images and, on a page with equations, for MathJax: "no math", "typeset" or "not typeset"."""
    page.evaluate("""() => Promise.all([...document.images].map((img) => {
        img.loading = 'eager';
        return img.complete ? 0 : new Promise((done) => { img.onload = img.onerror = done; });
    }))""")
    if not page.query_selector(".bd-article .math"):
        return "no math"
    try:
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=10_000)
        page.evaluate("() => MathJax.startup.promise")
    except Exception:
        return "not typeset"
    return "typeset" if page.evaluate("() => document.querySelectorAll('mjx-container').length > 0") else "not typeset"


def _menus(page, width: str, shot) -> dict:
    """Use the menu buttons as a reader would; record what each click did."""
    state = """(sel) => { const e = document.querySelector(sel); if (!e) return null;
        const r = e.getBoundingClientRect();
        return {open: !!e.open, shown: e.checkVisibility() && r.right > 0 && r.left < innerWidth && r.width > 0}; }"""
    result = {}
    toggle = page.locator("button.primary-toggle:visible")
    if width == "desktop":
        if toggle.count() == 0:
            return {"primary": "no visible menu button"}
        before = page.evaluate(state, ".bd-sidebar-primary")
        toggle.first.click()
        page.wait_for_timeout(400)
        hidden = page.evaluate(state, ".bd-sidebar-primary")
        shot("menu-hidden")
        toggle.first.click()
        page.wait_for_timeout(400)
        after = page.evaluate(state, ".bd-sidebar-primary")
        result["primary"] = {"before": before["shown"], "after_click": hidden["shown"],
                             "after_second_click": after["shown"]}
        return result
    cw = page.evaluate("() => document.documentElement.clientWidth")
    for side, dialog, outside in (("primary", "#pst-primary-sidebar-modal", (cw - 15, 420)),
                                  ("secondary", "#pst-secondary-sidebar-modal", (15, 420))):
        button = page.locator(f"button.{side}-toggle:visible")
        if button.count() == 0:
            result[side] = "no visible button"
            continue
        button.first.click()
        page.wait_for_timeout(400)
        opened = page.evaluate(state, dialog)
        links = page.locator(f"{dialog} a:visible").count()
        shot(f"{side}-open")
        page.mouse.click(*outside)  # a tap outside the panel closes it
        page.wait_for_timeout(400)
        closed = page.evaluate(state, dialog)
        result[side] = {"opened": bool(opened and opened["open"] and opened["shown"]), "links": links,
                        "closed": bool(closed and not closed["open"] and not closed["shown"])}
    return result


def _visit(browser, base: str, page_name: str, width: str) -> dict:
    context = _context(browser, width)
    page = context.new_page()
    console, page_errors = [], []
    page.on("console", lambda m: console.append({"type": m.type, "text": m.text, "url": m.location.get("url", "")}))
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    started = time.perf_counter()
    page.goto(base + page_name + ".html", wait_until="load")
    record = {"page": page_name, "width": width, "math": _wait_until_rendered(page)}
    page.wait_for_timeout(200)
    record.update(page.evaluate(FIRST_VIEW_JS))

    def shot(suffix: str = "", full_page: bool = False) -> None:
        name = f"{_slug(page_name)}-{width}{'-' + suffix if suffix else ''}.png"
        page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)

    shot(full_page=True)
    record["menus"] = _menus(page, width, shot)
    page.evaluate("() => document.querySelectorAll('details').forEach((d) => { d.open = true; })")
    page.wait_for_timeout(100)
    record.update(page.evaluate(MEASURE_JS))
    record["console_errors"] = [
        m for m in console
        if m["type"] == "error" and not (m["text"].startswith("Failed to load resource")
                                         and not m["url"].startswith(base))
    ] + [{"type": "pageerror", "text": e} for e in page_errors]
    record["seconds"] = round(time.perf_counter() - started, 1)
    context.close()
    return record


def _search(browser, base: str, width: str) -> dict:
    """Search the way a reader does: the search button, the term, Enter; then the results page."""
    context = _context(browser, width)
    page = context.new_page()
    page.goto(base + TOC_PAGES[0] + ".html", wait_until="load")
    page.locator(".search-button-field:visible, button.search-button:visible").first.click()
    field = page.locator("#pst-search-dialog input[type=search]")
    field.wait_for(state="visible")
    field.fill(SEARCH[0])
    field.press("Enter")
    page.wait_for_url(re.compile(r"search\.html\?q="))
    try:
        page.wait_for_selector("#search-results li", timeout=20_000)
    except Exception:
        pass
    links = page.eval_on_selector_all("#search-results li a", "(as) => as.map((a) => a.getAttribute('href'))")
    page.screenshot(path=str(SCREENSHOTS / f"search-{width}.png"))
    context.close()
    return {"url": page.url, "links": links}


@pytest.fixture(scope="session")
def report(browser, server) -> dict:
    """Visit every page at every width once; the tests below read the records."""
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    records = {(page, width): _visit(browser, server, page, width) for page in PAGES for width in WIDTHS}
    searches = {width: _search(browser, server, width) for width in WIDTHS}
    context = _context(browser, "desktop")
    tab = context.new_page()
    tab.goto(server + "index.html")
    tab.wait_for_url(re.compile(re.escape(TOC_PAGES[0]) + r"\.html"))
    landing = tab.url
    context.close()
    out = {"pages": list(records.values()), "search": searches, "index_lands_on": landing,
           "mathjax": str(MATHJAX) if (MATHJAX / "es5").is_dir() else None}
    (SCREENSHOTS / "report.json").write_text(json.dumps(out, indent=1, ensure_ascii=False), encoding="utf-8")
    return {"records": records, "search": searches, "landing": landing}


# --- per page and width -----------------------------------------------------------------------------------

@pytest.mark.parametrize("page,width", _cases("test_title", PAGES))
def test_title(report, page, width):
    record = report["records"][page, width]
    if page in TOC_PAGES:
        assert record["h1"] == _source_heading(page)
        assert record["title"] == f"{record['h1']} \u2014 {BOOK_TITLE}"
    else:
        assert record["title"].endswith(BOOK_TITLE)


@pytest.mark.parametrize("page,width", _cases("test_images_load", PAGES))
def test_images_load(report, page, width):
    broken = [img["src"] for img in report["records"][page, width]["images"] if img["local"] and not img["loaded"]]
    assert broken == []


@pytest.mark.parametrize("page,width", _cases("test_no_sideways_scrolling", PAGES))
def test_no_sideways_scrolling(report, page, width):
    record = report["records"][page, width]
    assert record["overflow"] <= 1, f"the page is {record['overflow']} px too wide: {record['offenders']}"


@pytest.mark.parametrize("page,width", _cases("test_content_fits_the_column", PAGES, widths=("desktop",)))
def test_content_fits_the_column(report, page, width):
    """On a desktop, code, outputs, equations and tables fit the column (80 characters of code do)."""
    boxes = [f"{b['kind']} in #{b['section']}: {b['scroll_width']} px in {b['width']} px: {b['text']!r}"
             for b in report["records"][page, width]["boxes"]]
    assert boxes == []


@pytest.mark.parametrize("page,width", _cases("test_boxes_that_scroll_show_it", PAGES))
def test_boxes_that_scroll_show_it(report, page, width):
    """A box wider than the column shows a shadow at its cut edge; on desktop also a scrollbar (phones use
    overlay scrollbars that no page can keep visible)."""
    boxes = report["records"][page, width]["boxes"]
    hidden = [b for b in boxes if not b["scroll_cue"] or (width == "desktop" and b["scrollbar_px"] <= 0)]
    assert hidden == []


@pytest.mark.parametrize("page,width", _cases("test_equations_typeset", PAGES, widths=("desktop",)))
def test_equations_typeset(report, page, width):
    """Equations are typeset (by a local MathJax, see the module docstring) without errors or literal TeX."""
    record = report["records"][page, width]
    if record["math"] == "not typeset" and not (MATHJAX / "es5").is_dir():
        message = f"no local MathJax in {MATHJAX} (.ci/run fetches it): equations not typeset, not measured"
        if ON_LINUX_CI:
            pytest.fail(message)
        pytest.skip(message)
    assert record["math"] != "not typeset"
    assert record["math_problems"] == []


@pytest.mark.parametrize("page,width", _cases("test_no_console_errors", PAGES))
def test_no_console_errors(report, page, width):
    assert report["records"][page, width]["console_errors"] == []


@pytest.mark.parametrize("page,width", _cases("test_menu_buttons", PAGES))
def test_menu_buttons(report, page, width):
    """Phone: the menu and "Contents" buttons open their panel, a tap outside closes it. Desktop: the
    menu button hides the sidebar and shows it again."""
    menus = report["records"][page, width]["menus"]
    if width == "desktop":
        assert menus["primary"] == {"before": True, "after_click": False, "after_second_click": True}
    else:
        assert menus["primary"]["opened"] and menus["primary"]["links"] > 0 and menus["primary"]["closed"]
        if isinstance(menus["secondary"], dict):
            assert menus["secondary"]["opened"] and menus["secondary"]["closed"]


@pytest.mark.parametrize("page,width", _cases("test_one_search_entry", PAGES))
def test_one_search_entry(report, page, width):
    assert len(report["records"][page, width]["search_entries"]) == 1


@pytest.mark.parametrize("width", list(WIDTHS))
def test_search_finds_a_known_term(report, width):
    search = report["search"][width]
    assert f"q={SEARCH[0]}" in search["url"]
    assert any(link and link.split("?")[0].split("#")[0].endswith(SEARCH[1]) for link in search["links"]), search


def test_index_lands_on_the_first_page(report):
    assert report["landing"].split("?")[0].endswith(TOC_PAGES[0] + ".html")


# --- chapters, from the records and the HTML --------------------------------------------------------------

def _has_explorer(page: str) -> bool:
    cells = json.loads(_source(page).read_text(encoding="utf-8"))["cells"]
    return any(re.search(r"^explorer\(", "".join(c["source"]), re.M) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("page,width", _cases("test_explorers_show_a_note", [p for p in CHAPTERS if _has_explorer(p)],
                                              widths=("desktop",)))
def test_explorers_show_a_note(report, page, width):
    """No kernel in the static book: a note, not a dead widget, where the notebook has an explorer."""
    record = report["records"][page, width]
    assert record["widget_views"] == 0 and record["dead_widget_reprs"] == []
    assert record["explorer_notes"] >= 1


@pytest.mark.parametrize("page,width", _cases("test_figures_have_alt_text", CHAPTERS, widths=("desktop",)))
def test_figures_have_alt_text(report, page, width):
    missing = [img["src"] for img in report["records"][page, width]["images"]
               if img["in_output"] and (not img["alt"] or img["alt"].endswith(pathlib.PurePosixPath(img["src"]).name))]
    assert missing == [], "give each figure alt text: nbtools.show_figure(alt) in place of plt.show()"


def _numbers(text: str) -> set[decimal.Decimal]:
    text = re.sub(r"\{,\}|\\,|(?<=\d)[,_\u202f\u2009](?=\d{3})", "", text)
    return {decimal.Decimal(n).normalize() for n in re.findall(r"\d+(?:\.\d+)?", text)}


def _significant_digits(number: decimal.Decimal) -> int:
    return len(number.as_tuple().digits)


def _expected_argument_problem(code: str) -> str | None:
    """A check() call takes the exercise's id and the reader's answer (a name), nothing that shows an
    expected value."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "the self-check cell does not parse"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "check":
            plain = (len(node.args) == 2 and not node.keywords and isinstance(node.args[0], ast.Constant)
                     and isinstance(node.args[1], ast.Name))
            if not plain:
                return f"check() takes more than the exercise and the answer: {ast.unparse(node)}"
    return None


def _is_cell(element) -> bool:
    return "cell" in (element.get("class") or [])


def exercise_problems(html: str) -> list[str]:
    """Every way the page's exercises show an answer outside their collapsed solution (the convention in
    this module's docstring)."""
    from bs4 import BeautifulSoup, Tag

    soup = BeautifulSoup(html, "html.parser")
    section = soup.find("section", id=re.compile(r"^exercises"))
    if section is None:
        return ["no Exercises section"]
    exercises: list[list[Tag]] = []
    for element in section.find_all(recursive=False):
        strong = element.find("strong") if element.name == "p" else None
        if (strong is not None and element.contents and element.contents[0] is strong
                and re.fullmatch(r"\d+\.", strong.get_text(strip=True))):
            exercises.append([element])
        elif exercises and element.name not in {"h2"}:
            exercises[-1].append(element)
    if not exercises:
        return ["no exercises found (a paragraph starting with a bold number, e.g. **1.**)"]
    problems = []
    for region in exercises:
        label = f"exercise {region[0].find('strong').get_text(strip=True).rstrip('.')}"
        solutions = [e for e in region if e.name == "details" or e.find("details")]
        solution_text = " ".join(e.get_text(" ") for e in solutions)
        if not solutions:
            problems.append(f"{label}: no collapsed solution (:::{{dropdown}} Solution or <details>)")
        if any(e.name == "details" and e.has_attr("open") for e in region):
            problems.append(f"{label}: its solution is open")
        question = " ".join(e.get_text(" ") for e in region
                            if e.name != "details" and not _is_cell(e) and not e.find("details"))
        answers = {n for n in _numbers(solution_text) - _numbers(question) if _significant_digits(n) >= 2}
        for cell in (e for e in region if _is_cell(e)):
            code = "\n".join(pre.get_text() for pre in cell.select(".cell_input pre"))
            output = "\n".join(o.get_text() for o in cell.select(".cell_output"))
            if re.search(r"\bcheck\(", code):
                problem = _expected_argument_problem(code)
                if problem:
                    problems.append(f"{label}: {problem}")
                for line in (text.strip() for text in output.splitlines()):
                    if line and not CHECK_MESSAGE.match(line):
                        problems.append(f"{label}: the self-check prints more than its verdict: {line[:80]!r}")
            shown = sorted(format(n, "f") for n in answers & _numbers(code + "\n" + output))
            if shown:
                problems.append(f"{label}: a visible cell shows the solution's number(s) {', '.join(shown)}")
    return problems


@pytest.mark.parametrize("page,width", _cases("test_exercises_hide_their_answers", CHAPTERS, widths=("html",)))
def test_exercises_hide_their_answers(built_book, page, width):
    html = (built_book / f"{page}.html").read_text(encoding="utf-8")
    assert exercise_problems(html) == []


def test_the_exercise_check_catches_a_revealed_answer():
    """The HTML check itself: a self-check that computes its answer in sight, or prints it, is caught."""
    def page(code: str, output: str) -> str:
        return f"""<section id="exercises"><h2>Exercises</h2>
        <p><strong>1.</strong> How many bytes for 27 layers?</p>
        <details><summary>Solution</summary><p>\\((512 + 64) \\times 27 \\times 2 = 31{{,}}104\\)</p></details>
        <div class="cell docutils container"><div class="cell_input"><pre>{code}</pre></div>
        <div class="cell_output"><pre>{output}</pre></div></div></section>"""

    good = page('answer_1 = None\ncheck("2.1", answer_1)',
                "Exercise 2.1: not attempted yet (set your answer and re-run this cell)")
    assert exercise_problems(good) == []
    assert exercise_problems(page('answer_1 = None\ncheck("2.1", answer_1, 576 * 27 * 2)',
                                  "Exercise 2.1: correct")) == [
        "exercise 1: check() takes more than the exercise and the answer: "
        "check('2.1', answer_1, 576 * 27 * 2)"]
    assert exercise_problems(page('check("2.1", answer_1)', "expected 31104")) == [
        "exercise 1: the self-check prints more than its verdict: 'expected 31104'",
        "exercise 1: a visible cell shows the solution's number(s) 31104"]
