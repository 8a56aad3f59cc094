"""Run chapters the way a reader on Colab does, offline: a fresh environment with Colab's kind of
packages, a kernel in which `google.colab` is imported, and the chapter's own setup cell installing
dsv3-lite. A chapter passes when no cell raises; outputs are not compared.

    python tools/simulate_colab.py                       # chapters 1 and 8, the committed HEAD
    python tools/simulate_colab.py --worktree            # the checkout as it is on disk
    python tools/simulate_colab.py --notebooks notebooks/04_mtp.ipynb --keep

What it does, in a new directory (under --workdir, else the system's temp dir; removed unless --keep):
1. A virtual environment with what Colab preinstalls and the chapters use (PREINSTALLED): a torch other
   than CI's 2.13.0 but inside the package's range (--torch, default 2.14.1; on the build machines its
   wheel lies on local disk, where pip's configuration points), ipykernel, nbclient, matplotlib, numpy,
   ipywidgets, tqdm. Not dsv3-lite: the setup cell installs it, as on Colab.
2. A kernel of that environment whose IPython startup file registers a stub `google.colab` module (the
   setup cell checks `"google.colab" in sys.modules`), and whose DSV3_LITE_REPO points at this
   checkout, so that the setup cell installs `dsv3-lite[notebooks]` from it instead of GitHub.
3. Each chapter, copied into the directory and re-stamped with the current setup cell
   (tools/notebook_cells.py), executed top to bottom in a fresh kernel started there (so the checkout's
   own dsv3_lite/ is not importable from the working directory). Before each chapter dsv3-lite is
   uninstalled, so that every setup cell really installs it; the dependencies the first one brought
   stay, which changes nothing, since every chapter installs the same requirement.

Which code is installed:
- By default `git+file://<checkout>@<HEAD commit>`: pip clones the repository, so this tests the
  committed HEAD exactly as a reader will get it once it is pushed (a file left uncommitted, or
  missing from the package data, fails here as it would on Colab). Uncommitted changes are NOT tested;
  the script lists them.
- With --worktree, the checkout's files as they are on disk (tracked and untracked, not ignored by
  git), copied into the directory and installed from there: for trying a change before committing it.

Prints one line per chapter (pass/FAIL, seconds, the environment's torch) and exits 1 if one fails.
The two default chapters take about 5 minutes on a 2-core CPU, 2 of them for the environment (which
needs about 6 GB of disk: torch 2.14.1 is a CUDA build, and runs on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from notebook_cells import KERNEL_ENV, ROOT, stamp  # noqa: E402

DEFAULT_NOTEBOOKS = [ROOT / "notebooks" / "01_glance.ipynb", ROOT / "notebooks" / "08_inference.ipynb"]
CI_TORCH = "2.13.0"
# Colab preinstalls these (and much more); the chapters use them.
PREINSTALLED = ["ipykernel", "nbclient", "nbformat", "matplotlib", "numpy", "ipywidgets", "tqdm"]
COLAB_STUB = '''\
# tools/simulate_colab.py: the chapters' setup cell takes this kernel for Colab's.
import sys
import types

sys.modules.setdefault("google.colab", types.ModuleType("google.colab"))
'''
# Not inherited by the kernel: the host's Python paths, and the one-thread, no-progress-bar settings of
# the tests (Colab sets none of them).
HOST_ONLY_ENV = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRITON_INTERPRET", *KERNEL_ENV}


def run(cmd: list[str], **kwargs) -> str:
    """Run a command; on failure, show its output and stop."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def git(*args: str) -> str:
    return run(["git", "-C", str(ROOT), *args])


def package_source(workdir: pathlib.Path, worktree: bool) -> str:
    """The pip URL DSV3_LITE_REPO gets: the committed HEAD, or a copy of the working tree."""
    if not worktree:
        changed = git("status", "--porcelain")
        if changed:
            print("not tested (uncommitted; --worktree tests them):\n" + changed.rstrip(), flush=True)
        return f"git+{ROOT.as_uri()}@{git('rev-parse', 'HEAD').strip()}"
    copy = workdir / "checkout"
    for name in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        source = ROOT / name
        if name and source.is_file():  # a tracked file deleted on disk is not copied
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    return copy.as_uri()


def make_environment(workdir: pathlib.Path, torch: str) -> pathlib.Path:
    """A virtual environment with Colab's kind of packages; returns its python."""
    venv = workdir / "venv"
    run([sys.executable, "-m", "venv", "--upgrade-deps", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", f"torch=={torch}", *PREINSTALLED])
    return python


def kernel_environment(python: pathlib.Path, workdir: pathlib.Path, repo: str) -> dict[str, str]:
    ipython_dir = workdir / "ipython"
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-google-colab.py").write_text(COLAB_STUB, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in HOST_ONLY_ENV}
    env.update(IPYTHONDIR=str(ipython_dir), DSV3_LITE_REPO=repo,
               PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def kernel_manager(python: pathlib.Path, workdir: pathlib.Path) -> AsyncKernelManager:
    """A manager whose kernel 'python3' is the environment's ipykernel."""
    spec_dir = workdir / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (Colab simulation)", "language": "python"}), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)


def run_chapter(source: pathlib.Path, python: pathlib.Path, workdir: pathlib.Path,
                env: dict[str, str]) -> tuple[bool, float, str]:
    """(passed, seconds, what failed) for one chapter, executed from a re-stamped copy; the seconds include
    the setup cell's install. What the kernel process itself prints (pip's output from the setup cell;
    on Colab it goes to the runtime's log) goes to <chapter>.log."""
    run([str(python), "-m", "pip", "uninstall", "-q", "-y", "dsv3-lite"])
    folder = workdir / "notebooks"
    folder.mkdir(exist_ok=True)
    path = folder / source.name
    nb = nbformat.read(source, as_version=4)
    stamp(nb, path)  # the current setup cell, not the one stored with the outputs
    client = NotebookClient(nb, timeout=900, km=kernel_manager(python, workdir),
                            resources={"metadata": {"path": str(folder)}})
    start = time.perf_counter()
    try:
        with open(path.with_suffix(".log"), "w", encoding="utf-8") as log:
            # cleanup_kc: shut the kernel down afterwards (nbclient leaves a kernel it did not start)
            client.execute(env=env, stdout=log, stderr=log, cleanup_kc=True)
        passed, failure = True, ""
    except CellExecutionError as error:
        passed, failure = False, f"{error.ename}: {error.evalue}"
    except Exception:  # the kernel died or timed out
        passed, failure = False, traceback.format_exc().strip().splitlines()[-1]
    seconds = time.perf_counter() - start
    installed = subprocess.run([str(python), "-m", "pip", "show", "-q", "dsv3-lite"], capture_output=True)
    if passed and installed.returncode:
        passed, failure = False, "the setup cell did not install dsv3-lite"
    nbformat.write(nb, path)  # kept with --keep, with the log, to read what a failing cell printed
    return passed, seconds, failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", nargs="+", type=pathlib.Path, default=DEFAULT_NOTEBOOKS,
                        help="chapters to run (default: 01_glance and 08_inference)")
    parser.add_argument("--workdir", type=pathlib.Path,
                        help="where to create the run's directory (default: the system's temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's directory (environment, executed notebooks)")
    parser.add_argument("--worktree", action="store_true",
                        help="install the checkout as it is on disk instead of the committed HEAD")
    parser.add_argument("--torch", default="2.14.1", help="the environment's torch (default: 2.14.1)")
    opts = parser.parse_args(argv)
    if opts.torch == CI_TORCH:
        parser.error(f"--torch {CI_TORCH} is CI's: the point is another version")
    sources = [path.resolve() for path in opts.notebooks]
    for path in sources:
        if not path.is_file():
            parser.error(f"no such notebook: {path}")
    if opts.workdir:
        opts.workdir.mkdir(parents=True, exist_ok=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="dsv3-colab-", dir=opts.workdir))
    start = time.perf_counter()
    try:
        repo = package_source(workdir, opts.worktree)
        python = make_environment(workdir, opts.torch)
        torch = run([str(python), "-c", "import torch; print(torch.__version__)"]).strip()
        print(f"environment ready in {time.perf_counter() - start:.0f} s: torch {torch}; "
              f"DSV3_LITE_REPO={repo}", flush=True)
        env = kernel_environment(python, workdir, repo)
        failed = 0
        for source in sources:
            passed, seconds, failure = run_chapter(source, python, workdir, env)
            failed += not passed
            print(f"{source.name:24s} {'pass' if passed else 'FAIL'} {seconds:6.1f} s  torch {torch}"
                  + (f"\n    {failure}" if failure else ""), flush=True)
        print(f"{'total':24s} {len(sources) - failed}/{len(sources)} passed in "
              f"{time.perf_counter() - start:.0f} s (environment included)")
        if failed and not opts.keep:
            print("--keep keeps each executed notebook and its kernel's log")
        return int(failed > 0)
    finally:
        if opts.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
