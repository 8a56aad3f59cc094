"""Every script in benchmarks/ runs to the end in its smallest mode, as a reader would start it
(`python benchmarks/NAME.py ...` from the repository's root, so that benchmarks/ is first on the import
path, which is how a file there once shadowed a package transformers imports). Only the exit status and
the command echo are checked: the figures they print are measurements, never asserted."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))

# The smallest run of each script: a few steps, one seed where it allows one, tiny shapes.
SMALLEST = {
    "attention_variants.py": ["--seeds", "0", "1", "--steps", "2"],
    "checkpoint.py": ["--quick"],
    "corpus_learning_curve.py": ["--steps", "2", "--eval-every", "1", "--batch", "2", "--seq-len", "16"],
    "decoding.py": ["--questions", "8", "--prompts", "1", "--new-tokens", "4", "--batch", "2", "--reps", "1",
                    "--runs", "1"],
    "fp8.py": ["--quick"],
    "fp8_accumulation_gpu.py": [],
    "fp8_training.py": ["--quick"],
    "load_balancing.py": ["--seeds", "0", "1", "--steps", "2"],
    "mla_decode.py": ["--contexts", "16", "32", "--reps", "1"],
    "moe_vs_dense.py": ["--dim", "32", "--moe-inter-dim", "16", "--experts", "4", "--active", "2", "--groups",
                        "2", "--limit", "1", "--batch", "1", "--seq-len", "8", "--repeats", "1"],
    "mtp_effect.py": ["--seeds", "0", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "16"],
    "pipeline.py": ["--quick"],
    "release_memory.py": ["--dim", "64", "--layers", "2", "--experts", "8"],
    "speculative_decoding.py": ["--seeds", "0", "--steps", "2", "--batch-size", "2", "--prompts-per-domain",
                                "1", "--new-tokens", "4", "--repeats", "1"],
    "training.py": ["--presets", "tiny", "--steps", "1", "--reps", "1", "--runs", "1", "--batch", "2",
                    "--seq-len", "16"],
    "triton_kernels.py": ["--small"],
    "vs_transformers.py": ["--sizes", "tiny", "--reps", "1", "--runs", "1", "--new-tokens", "4",
                           "--prompt-len", "4", "--batch", "1"],
}


def test_every_benchmark_has_a_smallest_mode():
    assert sorted(SMALLEST) == BENCHMARKS, "add the new benchmark's smallest arguments to SMALLEST"


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_benchmark_runs_in_its_smallest_mode(name):
    done = subprocess.run([sys.executable, f"benchmarks/{name}", *SMALLEST.get(name, [])], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"python benchmarks/{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"benchmarks/{name} printed nothing"
