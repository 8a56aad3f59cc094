"""What the safety of a checkpoint costs: save and load times with and without it.

    python benchmarks/checkpoint.py                 # the small preset, 5 runs
    python benchmarks/checkpoint.py --quick         # the tiny preset, 3 runs (the CI smoke test)

A training run saves with `dsv3_lite.checkpoint.save_step`: the weights, config, tokenizer and trainer state
(after one training step, so the AdamW moments exist) go into a hidden folder that is renamed into place.
`durable` adds what makes it safe: a manifest of SHA-256 hashes (made while the files are written), and a
flush of every file and folder to the disk (fsync), which runs in a background thread while training goes
on (older checkpoints are removed only after it). "save" is the time the training loop waits; "+ flush" the
time until the checkpoint is on the disk; "save_checkpoint" the synchronous save of the API (flushed before
the rename), against the same files without manifest or fsync. A load (`load_checkpoint`) with `verify`
hashes every file against the manifest first. Each figure is the median [min, max] over `--runs` runs, with
the machine; the peak memory is the Python heap the save allocates (tracemalloc, in the warm-up round: the
files' bytes are built in memory before they are written), beside the checkpoint's size on disk. Nothing is
asserted: the figures are printed.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from dsv3_lite.checkpoint import flushed, load_checkpoint, save_checkpoint, save_step
from dsv3_lite.data import Corpus, build_documents
from dsv3_lite.model import Transformer
from dsv3_lite.timing import machine, spread
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.train import PRESETS
from dsv3_lite.trainer import Trainer, TrainArgs


def trained(preset: str, docs_per_domain: int) -> tuple[Transformer, BPETokenizer, Trainer]:
    """The preset's model after one training step, its tokenizer (learned from the book's corpus, which may
    yield fewer tokens than the preset's vocabulary) and trainer."""
    args = PRESETS[preset]()
    documents = build_documents(docs_per_domain)
    tokenizer = BPETokenizer.train((d.text for d in documents), args.vocab_size)
    args = args.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(args)
    corpus = Corpus(documents, tokenizer=tokenizer, fim_rate=0.1, seed=0)
    trainer = Trainer(model, corpus, TrainArgs(steps=2, seq_len=32, batch_size=2, batch_size_start=2,
                                               warmup_steps=1, eval_batches=1), progress=False)
    trainer.train(until=1)
    return model, tokenizer, trainer


def timed(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def measure(preset: str, runs: int, docs_per_domain: int) -> None:
    model, tokenizer, trainer = trained(preset, docs_per_domain)
    times: dict[str, list[float]] = {k: [] for k in (
        "save safe", "save bare", "save + flush", "save_checkpoint safe", "save_checkpoint bare",
        "load verified", "load bare")}
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs + 1):  # the first round warms up and is not counted
            trainer.step = run + 1  # the step folder's name
            figures = {}
            for durable in (True, False):
                name = "save safe" if durable else "save bare"
                if not run:  # the warm-up round measures the memory (tracemalloc slows what it traces)
                    tracemalloc.start()
                figures[name] = timed(save_step, Path(tmp, name), model, tokenizer, trainer, durable=durable)
                if not run:
                    peaks[name] = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                if durable:
                    figures["save + flush"] = figures[name] + timed(flushed, Path(tmp, name))
                folder = Path(tmp, f"single-{durable}-{run}")
                figures[f"save_checkpoint {name.split()[1]}"] = timed(
                    save_checkpoint, folder, model, tokenizer, trainer, durable=durable)
            folder = Path(tmp, "save safe", f"step-{trainer.step:08d}")
            figures["load verified"] = timed(load_checkpoint, folder, verify=True)
            figures["load bare"] = timed(load_checkpoint, folder, verify=False)
            if run:
                for name, value in figures.items():
                    times[name].append(value)
        size = sum(p.stat().st_size for p in folder.iterdir())
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {preset}: {params:,} parameters; checkpoint {size / 2**20:.2f} MiB on disk (weights, "
          "trainer state, config, tokenizer)")
    print(f"{'':22}{'ms: median [min, max]':>28}{'peak heap MiB':>15}")
    for name, values in times.items():
        peak = f"{peaks[name] / 2**20:.2f}" if name in peaks else ""
        print(f"{name:22}{spread([v * 1e3 for v in values], '.1f'):>28}{peak:>15}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for what, safe, bare in (
            ("the training loop's save: the manifest (the flush runs behind training)", "save safe", "save bare"),
            ("until the checkpoint is on the disk", "save + flush", "save bare"),
            ("save_checkpoint, flushed before the rename", "save_checkpoint safe", "save_checkpoint bare"),
            ("load: the verification", "load verified", "load bare")):
        print(f"{what}: {median[safe] / median[bare] - 1:+.0%} of the bare time (medians)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (>= 3)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 3 runs")
    opts = parser.parse_args(argv)
    if opts.runs < 3:
        parser.error(f"--runs ({opts.runs}) must be >= 3: a figure is a median and range")
    docs = 200
    if opts.quick:
        opts.preset, opts.runs, docs = "tiny", 3, 8
    print("$ python benchmarks/checkpoint.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {machine()}")
    print("safe = SHA-256 manifest + fsync of every file and folder; verified = hashes checked on load")
    measure(opts.preset, opts.runs, docs)


if __name__ == "__main__":
    main()
