"""Does MTP help the main model? Chapter 4's with/without comparison over several seeds.

    python benchmarks/mtp_effect.py                       # chapter 4's setting, seeds 0 1 2
    python benchmarks/mtp_effect.py --seeds 0 1 2 3 4 --steps 1000 --depth 1

Per seed, two tiny DeepSeek-V3 models start from the same main-model weights and see the same batches;
one also trains D MTP modules with weight lambda (report 2.2, eq. 25). The table compares the MAIN
model's validation loss, what remains once the modules are dropped (report 4.5.1, Table 4). One seed
is noise: the same run moved by several percent between CPUs, so the mean, the spread and the range
over seeds are what a claim can rest on.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.model import Transformer
from dsv3_lite.train import TrainingLoss, train_lm


def main_val_loss(args: ModelArgs, corpus: Corpus, mtp_lambda: float, opts: argparse.Namespace,
                  seed: int) -> float:
    """Train one model (the chapter's optimizer settings) and return its main validation loss."""
    torch.manual_seed(seed)
    model = Transformer(args).to(opts.device)
    loss = TrainingLoss(mtp_lambda)
    history = train_lm(model, corpus, steps=opts.steps, batch_size=opts.batch_size, seq_len=opts.seq_len,
                       lr=opts.lr, seed=seed, loss_fn=loss, on_step=loss.update_bias, progress=False)
    return history.final_val_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layers", type=int, default=4, help="main-model blocks")
    parser.add_argument("--depth", type=int, default=2, help="MTP depth D of the MTP model")
    parser.add_argument("--mtp-lambda", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default="cpu", help="e.g. cuda; batches are drawn on the CPU either way")
    opts = parser.parse_args()
    if len(opts.seeds) < 2:
        parser.error("--seeds needs at least two seeds to give a spread")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    corpus = Corpus.default()
    base_args = ModelArgs.tiny(n_layers=opts.layers, mtp_depth=0)
    mtp_args = base_args.replace(mtp_depth=opts.depth)
    print("command:", " ".join(["python benchmarks/mtp_effect.py", *sys.argv[1:]]))
    print(f"{opts.layers} blocks, D = {opts.depth}, lambda = {opts.mtp_lambda}, {opts.steps} steps of "
          f"{opts.batch_size} x {opts.seq_len} tokens, torch {torch.__version__}, {opts.device}")
    print(f"{'seed':>4s} {'val loss, no MTP':>17s} {'val loss, MTP':>14s} {'change':>8s} {'time':>6s}")
    changes = []
    for seed in opts.seeds:
        start = time.perf_counter()
        base = main_val_loss(base_args, corpus, 0.0, opts, seed)
        mtp = main_val_loss(mtp_args, corpus, opts.mtp_lambda, opts, seed)
        changes.append(100 * (mtp / base - 1))
        print(f"{seed:>4d} {base:>17.4f} {mtp:>14.4f} {changes[-1]:>+7.1f}% "
              f"{time.perf_counter() - start:>5.0f}s", flush=True)
    mean, spread = statistics.mean(changes), statistics.stdev(changes)
    print(f"MTP's change of the main val loss over {len(changes)} seeds: mean {mean:+.1f}%, "
          f"std {spread:.1f} points, range {min(changes):+.1f}% .. {max(changes):+.1f}%")
    better = sum(c < 0 for c in changes)
    print(f"MTP model lower in {better} of {len(changes)} seeds")


if __name__ == "__main__":
    main()
