"""The package's shape: imports run one way, the core stays light, every name has one home, no module
overrides torch's private methods, and the repository passes its lint (ruff)."""
import ast
import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dsv3_lite"

# Layers, lowest first: a module may import only from strictly lower layers (book guide: config <-
# components <- the assembled model <- its users <- notebooks).
LAYERS = [
    {"cache_size", "norm", "data", "fp8", "exercises"},
    {"tokenizer"},
    {"config"},
    {"rope", "kernels"},
    {"fp8_linear"},
    {"mla", "moe"},
    {"block"},
    {"mtp"},
    {"model"},
    {"trainer"},
    {"checkpoint"},
    {"generate", "hf", "pipeline", "timing", "train"},
    {"client"},
    {"chat"},
    {"nbtools"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
NOTEBOOK_ONLY = {"matplotlib", "ipywidgets", "IPython", "transformers"}
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imports_of(name: str) -> set[str]:
    """Top-level names of every module `name` imports, anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LEVEL)


@pytest.mark.parametrize("name", MODULES)
def test_imports_run_one_way(name):
    for imported in imports_of(name):
        if imported.startswith("dsv3_lite."):
            target = imported.split(".")[1]
            assert LEVEL[target] < LEVEL[name], f"{name} (layer {LEVEL[name]}) imports {target} (layer {LEVEL[target]})"


@pytest.mark.parametrize("name", [m for m in MODULES if m != "nbtools"])
def test_the_core_does_not_import_notebook_or_peer_libraries(name):
    heavy = {i.split(".")[0] for i in imports_of(name)} & NOTEBOOK_ONLY
    assert not heavy, f"dsv3_lite.{name} imports {heavy}"


@pytest.mark.parametrize("name", MODULES)
def test_each_name_is_exported_from_the_module_that_defines_it(name):
    module = importlib.import_module(f"dsv3_lite.{name}")
    for exported in getattr(module, "__all__", []):
        obj = getattr(module, exported)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == module.__name__, f"{name} re-exports {exported} from {obj.__module__}"


@pytest.mark.parametrize("name", MODULES)
def test_no_private_torch_method_is_overridden(name):
    module = importlib.import_module(f"dsv3_lite.{name}")
    private = {attr for attr in vars(nn.Module) if attr.startswith("_") and not attr.startswith("__")}
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, nn.Module) and cls.__module__ == module.__name__:
            assert not private & set(vars(cls)), f"{cls.__name__} overrides {private & set(vars(cls))}"


# The book shows the package's real source (nbtools.show_source) in a code column about 86
# characters wide: a longer line scrolls sideways there.
BOOK_CODE_COLUMN = 86


def test_every_line_fits_the_books_code_column():
    too_long = [
        f"dsv3_lite/{path.name}:{number}: {len(line)} characters"
        for path in sorted(PACKAGE.glob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if len(line) > BOOK_CODE_COLUMN
    ]
    assert not too_long, f"lines longer than {BOOK_CODE_COLUMN} characters:\n" + "\n".join(too_long)


def test_the_repository_passes_its_lint():
    """ruff, as configured in pyproject.toml, over the package, tests, benchmarks, tools and notebooks."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
