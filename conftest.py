"""Shared pytest set-up: one torch thread, no progress bars, and strict nbval over notebooks/ when installed.

The environment set here, before torch or tqdm is imported, is inherited by the notebook kernels nbval
starts, so the unit tests, nbval and `tools/execute_notebooks.py` (which sets the same variables) all run
in one configuration. Chapters that train pin their own thread count, so their outputs do not depend on it.
"""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from notebook_cells import KERNEL_ENV  # noqa: E402

# The tests' matmuls are tiny: more threads only contend with each other and with other jobs. On a 2-core
# machine one thread ran the unit tests in 20 s instead of 36 s idle, and 2 min instead of 15 under load.
# A non-empty OMP_NUM_THREADS is respected.
for name, value in KERNEL_ENV.items():
    if not os.environ.get(name):
        os.environ[name] = value

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU, the Triton kernels (dsv3_lite.kernels) run in Triton's interpreter. The variable must be
# set before that module defines them, so here, before any test imports the package's model code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NBVAL_SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"


def pytest_configure(config):
    """`pytest` validates the notebooks with strict nbval, as `--nbval --nbval-current-env
    --nbval-sanitize-with tests/nbval_sanitize.cfg` would, when the plugin is installed; without it (or with
    `-p no:nbval`) the unit tests run alone. Options given on the command line (`--nbval-lax`,
    `--nbval-kernel-name`, another sanitize file) are kept."""
    option = config.option
    if not config.pluginmanager.hasplugin("nbval") or option.nbval_lax:
        return
    option.nbval = True
    if not (option.nbval_kernel_name or option.current_env):
        option.nbval_current_env = True
    if not (option.nbval_sanitize_with or option.sanitize_with):
        option.nbval_sanitize_with = str(NBVAL_SANITIZE)


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(module, *names) wraps each named function of `module` for the test and returns
    {name: calls so far}: which kernels a code path really launched."""
    def count(module, *names):
        calls = dict.fromkeys(names, 0)
        for name in names:
            def counted(*args, _name=name, _fn=getattr(module, name), **kwargs):
                calls[_name] += 1
                return _fn(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
        return calls
    return count
