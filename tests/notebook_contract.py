"""The notebook contract: committed executed, top to bottom in one fresh kernel, with no stored errors.

nbval alone passes a notebook that has no stored outputs, so the project checks this itself.
"""
from __future__ import annotations

import re

# A compared output (a cell without NBVAL_IGNORE_OUTPUT) that prints a package version fails nbval for every
# reader with another version installed: versions belong in ignored cells.
VERSION = re.compile(r"\b(torch|numpy|triton|transformers|matplotlib|ipywidgets|python)\b[ =:v]+\d+\.\d+", re.I)


def contract_problems(nb: dict) -> list[str]:
    """Problems of one notebook (as parsed JSON); an empty list means the contract holds."""
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code" and "".join(c.get("source", "")).strip()]
    if not code:
        return ["has no code cells"]
    problems = []
    counts = [c.get("execution_count") for c in code]
    if any(n is None for n in counts):
        problems.append(f"{sum(n is None for n in counts)} of {len(code)} code cells never executed")
    elif counts != list(range(1, len(code) + 1)):
        problems.append(f"not executed top to bottom in one fresh kernel (execution counts {counts})")
    for i, cell in enumerate(code, 1):
        compared = "NBVAL_IGNORE_OUTPUT" not in "".join(cell.get("source", ""))
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"code cell {i} stored an error ({out.get('ename')})")
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            if compared and VERSION.search(text):
                problems.append(f"code cell {i} prints a package version in a compared output "
                                f"({VERSION.search(text).group(0)!r}): move it to an ignored cell")
    if not any(cell.get("outputs") for cell in code):
        problems.append("no code cell has stored outputs")
    return problems
