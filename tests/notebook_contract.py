"""The notebook contract: committed executed, top to bottom in one fresh kernel, with no stored errors.

nbval alone passes a notebook that has no stored outputs, so the project checks this itself.
"""
from __future__ import annotations


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
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"code cell {i} stored an error ({out.get('ename')})")
    if not any(cell.get("outputs") for cell in code):
        problems.append("no code cell has stored outputs")
    return problems
