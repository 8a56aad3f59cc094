"""The book's text keeps two promises: every term a chapter sets in bold is in the glossary, and no page or
chapter calls an existing chapter "planned".

The bold convention. In chapter markdown, **bold** marks a term the chapter defines, and that term is in
book/glossary.md. Two other uses of bold are allowed: a bold lead-in of a paragraph or list item, which
ends with "." or ":" ("**In the report:**", "**Packing.**"), and an exercise label ("**1.**",
"**4. (misconception)**", "**2a.**"). Emphasis uses *italics*. A MyST definition list (a line, then a line
that starts with ": ") defines its term too, so that term must be in the glossary as well.

Glossary terms are the first cells of the glossary's table rows. A cell may list other names of the same
entry: "Top-p (nucleus sampling)" answers to "top-p" and to "nucleus sampling", "Prefill / decode" to
"prefill" and to "decode". Terms match ignoring case, backticks, hyphens and a plural "s".

"Planned". Every sentence of a page (book/*.md, README.md) or a chapter (markdown and code) that says
"planned", "upcoming", "future chapter", "coming chapter" or "later chapter" may name only topics that are
still planned (long context with YaRN, post-training with SFT, GRPO and distillation, expert parallelism
and serving, an OpenAI-compatible chat API); naming the topic of an existing chapter (FP8, DualPipe,
Triton, FIM, MTP, ...) fails.
"""
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAGES = sorted((ROOT / "book").glob("*.md")) + [ROOT / "README.md"]
GLOSSARY = ROOT / "book" / "glossary.md"


# ---------------------------------------------------------------------------------------------- reading
def cell_sources(path: pathlib.Path, kind: str) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells if c["cell_type"] == kind]


FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1[ \t]*$", re.M | re.S)
DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", re.S)


def prose(markdown: str) -> str:
    """Markdown without fenced code blocks and display math, where `**` is an operator, not bold."""
    return DISPLAY_MATH.sub("", FENCE.sub("", markdown))


# ------------------------------------------------------------------------------------------ the glossary
def normalize(term: str) -> str:
    term = term.replace("`", "").replace("-", " ").lower()
    term = " ".join(term.split())
    return term[:-1] if term.endswith("s") and len(term) > 2 else term


def names_of(cell: str) -> set[str]:
    """The names one glossary term cell answers to: the whole cell, the cell without its parentheses, each
    part of that split at " / ", and each name inside the parentheses (split at "," and " / ")."""
    cell = cell.strip()
    names = {cell}
    outside = re.sub(r"\s*\([^)]*\)", "", cell).strip()
    names.add(outside)
    names.update(outside.split(" / "))
    for inside in re.findall(r"\(([^)]*)\)", cell):
        names.update(re.split(r",\s*| / ", inside))
    return {normalize(n) for n in names if n.strip()}


def glossary_terms(text: str) -> set[str]:
    """Every name of every entry: first cells of table rows, without header and separator rows."""
    terms = set()
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        first = line.strip("|").split("|")[0].strip()
        if not first or set(first) <= set("-: ") or first == "Term":
            continue
        terms |= names_of(first)
    return terms


# ------------------------------------------------------------------------------------- the bold convention
BOLD = re.compile(r"\*\*(.+?)\*\*", re.S)
EXERCISE_LABEL = re.compile(r"^\d+[a-z]?\.")


def bold_terms(markdown: str) -> list[str]:
    """Bold spans that are neither lead-ins nor exercise labels: the terms the text defines."""
    terms = []
    for match in BOLD.finditer(prose(markdown)):
        span = " ".join(match.group(1).split())
        if span.endswith((".", ":")) or EXERCISE_LABEL.match(span):
            continue
        terms.append(span)
    return terms


def deflist_terms(markdown: str) -> list[str]:
    """Terms of MyST definition lists: a non-blank line followed by a line that starts with ": "."""
    lines = prose(markdown).splitlines()
    return [lines[i].strip() for i in range(len(lines) - 1)
            if lines[i].strip() and lines[i + 1].startswith(": ")]


def undefined_terms(markdown: str, glossary: set[str]) -> list[str]:
    return [t for t in bold_terms(markdown) + deflist_terms(markdown) if normalize(t) not in glossary]


# ------------------------------------------------------------------------------------------- "planned"
TRIGGER = re.compile(r"\bplanned\b|\bupcoming\b|\b(?:future|coming|later) chapters?\b", re.I)
# The topics of the existing chapters 1-9. A sentence about what is planned must not name them.
EXISTING = {
    "FP8": r"\bFP8\b", "E4M3/E5M2": r"\bE[45]M[23]\b", "quantization": r"\bquanti[sz]",
    "DualPipe": r"\bDualPipe", "pipeline": r"\bpipelin", "1F1B": r"\b1F1B\b", "ZB1P": r"\bZB1P\b",
    "Zero Bubble": r"\bzero[ -]bubble", "Triton": r"\bTriton\b", "kernel": r"\bkernels?\b",
    "GEMM": r"\bGEMMs?\b", "roofline": r"\broofline",
    "FIM": r"\bFIM\b", "fill-in-the-middle": r"\bfill[ -]in[ -]the[ -]middle",
    "MTP": r"\bMTP\b", "multi-token prediction": r"\bmulti[ -]token prediction",
    "speculative decoding": r"\bspeculative\b", "MLA": r"\bMLA\b", "latent attention": r"\blatent attention",
    "MoE": r"\b(?:DeepSeek)?MoE\b", "mixture of experts": r"\bmixture[ -]of[ -]experts",
    "load balancing": r"\b(?:load balancing|auxiliary[ -]loss)", "training": r"(?<!post-)\btraining\b",
    "inference": r"\binference\b", "tokenizer": r"\btokeni[sz]", "BPE": r"\bBPE\b",
    "packing": r"\bpacking\b", "checkpoint": r"\bcheckpoint",
}
EXISTING_RE = {name: re.compile(rx, re.I) for name, rx in EXISTING.items()}
BLOCK_START = re.compile(r"^(?:#|[-*+] |\d+\. |\||:::|%)")


def units(text: str) -> list[str]:
    """Paragraphs, list items, headings and table cells of `text`, each cut into sentences. A table cell
    comes with its row's first cell, so that "| DualPipe | ... | planned |" reads as one statement."""
    blocks, current = [], []
    for line in text.splitlines():
        if not line.strip() or BLOCK_START.match(line.lstrip()):
            blocks.append(current)
            current = []
        if line.strip():
            current.append(line.strip())
    blocks.append(current)
    pieces = []
    for block in filter(None, blocks):
        joined = " ".join(block)
        if joined.startswith("|"):  # a table row: each cell, read with the row's first cell (its subject)
            first, *others = [c.strip() for c in joined.strip().strip("|").split("|")]
            pieces.extend([first] + [f"{first} | {c}" for c in others])
        else:
            pieces.append(joined)
    return [s for piece in pieces for s in re.split(r"(?<=[.!?;])\s+", piece) if s.strip()]


def planned_problems(text: str) -> list[str]:
    """Sentences that say "planned" (or "upcoming", "later chapter", ...) and name an existing chapter's
    topic, each with the topics it names."""
    problems = []
    for sentence in units(text):
        if TRIGGER.search(sentence):
            named = [name for name, rx in EXISTING_RE.items() if rx.search(sentence)]
            if named:
                problems.append(f"{sentence!r} names {', '.join(named)}")
    return problems


# ------------------------------------------------------------------------------------------------ tests
def test_there_are_chapters_and_pages():
    assert NOTEBOOKS and GLOSSARY in PAGES


def test_glossary_term_names():
    assert names_of("Top-p (nucleus sampling)") == {"top p (nucleus sampling)", "top p", "nucleus sampling"}
    assert {"prefill", "decode"} <= names_of("Prefill / decode")
    assert {"mqa", "gqa", "grouped query attention"} <= names_of("Multi-query / grouped-query attention (MQA / GQA)")
    table = "| Term | 中文 | Meaning |\n|---|---|---|\n| Checkpoint | 检查点 | A saved run. |\n"
    assert glossary_terms(table) == {"checkpoint"}
    assert normalize("`Checkpoints`") == normalize("checkpoint")
    assert normalize("Mixture-of-Experts") == normalize("mixture of experts")


def test_bold_checker_tells_terms_from_lead_ins_and_labels():
    text = ("**In the report:** section 3. **Packing.** Documents are **packed** with **top-p**.\n\n"
            "**1.** An exercise. **4. (misconception)** Another. **2a.** A third.\n\n"
            "```python\nx = 2 ** 3 ** 2\n```\n\n$$a^{**} b^{**}$$\n")
    assert bold_terms(text) == ["packed", "top-p"]
    glossary = glossary_terms("| Top-p (nucleus sampling) | 核采样 | ... |\n")
    assert undefined_terms(text, glossary) == ["packed"]  # must fail: "packed" is no entry
    assert undefined_terms("With **nucleus sampling** and **Top-P**.", glossary) == []  # must pass


def test_deflist_terms_are_terms():
    text = "Roofline\n: The bound on a kernel's speed.\n\nA plain paragraph.\n"
    assert deflist_terms(text) == ["Roofline"]
    assert undefined_terms(text, {"roofline"}) == []
    assert undefined_terms(text, set()) == ["Roofline"]


def test_planned_checker():
    # must fail: existing chapters called planned, in prose, in a table row, and as a "later chapter"
    assert planned_problems("The planned FP8 and DualPipe chapters show how.")
    assert planned_problems("| DualPipe | how blocks are scheduled | 3.2.1 | planned | |")
    assert planned_problems("Two chat roles for a later chapter on inference.")
    assert planned_problems("# a comment: the Triton kernels are upcoming")
    # must pass: only planned topics, and existing topics in other sentences or table cells
    assert planned_problems("Planned: long context with YaRN (chapter 10), post-training (chapter 11), "
                            "expert parallelism (chapter 12), an OpenAI-compatible chat API.") == []
    assert planned_problems("FP8 training is chapter 5. Post-training is planned.") == []
    assert planned_problems("| GRPO | RL without a value model; used in training. | – (planned chapter 11) |") == []
    assert planned_problems("Every later chapter builds on `ModelArgs` and `train_lm`.") == []


@pytest.fixture(scope="module")
def glossary() -> set[str]:
    terms = glossary_terms(GLOSSARY.read_text(encoding="utf-8"))
    assert len(terms) > 50, "the glossary's tables were not found"
    return terms


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_bold_terms_are_in_the_glossary(path, glossary):
    missing = sorted({t for md in cell_sources(path, "markdown") for t in undefined_terms(md, glossary)})
    assert not missing, (f"bold terms not in book/glossary.md: {missing}. Add them to the glossary, or use "
                         f"*italics* for emphasis and end a bold lead-in with '.' or ':'")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapters_call_no_existing_chapter_planned(path):
    problems = [p for src in cell_sources(path, "markdown") + cell_sources(path, "code")
                for p in planned_problems(src)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_call_no_existing_chapter_planned(path):
    problems = planned_problems(path.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
