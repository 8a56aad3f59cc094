"""What the safety of a checkpoint costs: save and load times with and without the verification.

    python benchmarks/checkpoint.py                 # the small preset, 5 runs
    python benchmarks/checkpoint.py --quick         # the tiny preset, 3 runs (the CI smoke test)

A save (`dsv3_lite.checkpoint.save_checkpoint`) writes the weights, config, tokenizer and trainer state (after
one training step, so the AdamW moments exist) into a hidden folder and renames it into place. `durable`
adds what makes it safe: an fsync of every file and of the folder, and a manifest of SHA-256 hashes; without
it the rename alone remains. A load (`load_checkpoint`) with `verify` hashes every file against the manifest
first. Each figure is the median [min, max] over `--runs` runs, with the machine; the peak memory is the
Python heap the save allocates (tracemalloc: the files' bytes are built in memory before they are written),
beside the checkpoint's size on disk. Nothing is asserted: the figures are printed.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

from dsv3_lite.checkpoint import load_checkpoint, save_checkpoint
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


def measure(preset: str, runs: int, docs_per_domain: int) -> None:
    model, tokenizer, trainer = trained(preset, docs_per_domain)
    times: dict[str, list[float]] = {k: [] for k in ("save safe", "save bare", "load verified", "load bare")}
    peaks: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs + 1):  # the first round warms up and is not counted
            for durable in (True, False):
                name = "save safe" if durable else "save bare"
                folder = Path(tmp, f"{name.replace(' ', '-')}-{run}")
                tracemalloc.start()
                start = time.perf_counter()
                save_checkpoint(folder, model, tokenizer, trainer, durable=durable)
                elapsed = time.perf_counter() - start
                peaks[name] = max(peaks.get(name, 0), tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
                for verify in (True, False):
                    load = "load verified" if verify else "load bare"
                    start = time.perf_counter()
                    load_checkpoint(folder, verify=verify)
                    if run and durable:  # loads of the checkpoint with a manifest
                        times[load].append(time.perf_counter() - start)
                if run:
                    times[name].append(elapsed)
        size = sum(p.stat().st_size for p in Path(tmp, "save-safe-0").iterdir())
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {preset}: {params:,} parameters; checkpoint {size / 2**20:.2f} MiB on disk (weights, "
          "trainer state, config, tokenizer)")
    print(f"{'':14}{'ms: median [min, max]':>28}{'peak heap MiB':>15}")
    for name, values in times.items():
        peak = f"{peaks[name] / 2**20:.2f}" if name in peaks else ""
        print(f"{name:14}{spread([v * 1e3 for v in values], '.1f'):>28}{peak:>15}")
    for kind, safe, bare in (("save", "save safe", "save bare"), ("load", "load verified", "load bare")):
        cost = min(times[safe]) / min(times[bare]) - 1
        print(f"{kind}: the verification costs {cost:+.0%} of the bare {kind} (fastest runs)")


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
    print("safe = fsync of every file and folder + SHA-256 manifest; verified = hashes checked on load")
    measure(opts.preset, opts.runs, docs)


if __name__ == "__main__":
    main()
