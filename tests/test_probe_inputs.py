"""tools/probe_inputs.py, the catalogue of bad inputs and faults the closing notes count, still runs: every probe
of a quick area classifies (none fails in its own set-up), and the table adds up."""
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here starts other processes

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_probe_catalogue_runs_and_classifies_every_probe():
    done = subprocess.run([sys.executable, "tools/probe_inputs.py", "-k", "tokenizer"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    row = re.search(r"^all +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)$", done.stdout, re.MULTILINE)
    assert row, done.stdout
    total, *classes = map(int, row.groups())
    assert total >= 10 and sum(classes) == total
