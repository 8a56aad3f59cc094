"""FP8 training against higher precision: chapter 5's comparison over several seeds (report 3.3).

    python benchmarks/fp8_training.py                       # chapter 5's setting, seeds 0-4
    python benchmarks/fp8_training.py --seeds 0 1 2 --steps 600
    python benchmarks/fp8_training.py --quick               # one seed, 10 steps: a smoke test

Per seed, three tiny DeepSeek-V3 models (`ModelArgs.tiny(mtp_depth=0)`) start from the same weights and
see the same batches: FP32 throughout; BF16 mixed precision (the report's baseline: FP32 master weights,
matmuls under `torch.autocast(bfloat16)`, also when evaluated); and FP8 (`ModelArgs.fp8`: every linear
layer of the blocks runs Fprop, Dgrad and Wgrad as FP8 GEMMs with 1x128 / 128x128 scales, while the
embedding, head, gate, norms and attention stay FP32). The report validates FP8 against BF16 at 16B and
230B parameters and finds "the relative loss error ... consistently below 0.25%". We print, for each pair
(BF16 and FP8 against FP32, and FP8 against BF16, the report's comparison):

    val   relative difference of the final validation loss (`dsv3_lite.train.evaluate`: 8 fixed batches)
    train relative difference of the mean training loss over the last 20% of steps (same batches)
    step0 relative difference of the very first training loss (same weights, same batch): the forward
          pass's rounding alone, before training has amplified anything

and, for scale, how far the FP32 validation loss itself moves from seed to seed, and the time per
training step of each precision: median [min, max] over the seeds (one run each), on the machine named
(on a CPU the FP8 GEMMs are simulated by PyTorch operations of `dsv3_lite.fp8`). At `ModelArgs.tiny`'s
dim of 64, a 1x128 tile is a whole token row and a 128x128 block a whole weight matrix: the run tests
FP8 arithmetic with per-token and per-matrix scales, not the benefit of finer tiles.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.model import Transformer
from dsv3_lite.timing import machine, spread
from dsv3_lite.train import History, TrainingLoss, train_lm

PRECISIONS = ("fp32", "bf16", "fp8")
# (run, reference) -> what is compared; at step 0 FP8 against BF16 adds nothing new
PAIRS = {("bf16", "fp32"): ("val", "train", "step0"), ("fp8", "fp32"): ("val", "train", "step0"),
         ("fp8", "bf16"): ("val", "train")}


class BF16Autocast(nn.Module):
    """A Transformer whose forward and loss run under CPU autocast to bfloat16 (matmuls in BF16, FP32
    master weights and optimizer), the way mixed-precision training runs a model."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            return self.model(tokens).float()

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, mtp_lambda: float = 0.0):
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            return self.model.loss(tokens, targets, mtp_lambda)

    def update_bias(self, expert_load: torch.Tensor) -> None:
        self.model.update_bias(expert_load)


def train(precision: str, seed: int, corpus: Corpus, opts: argparse.Namespace) -> History:
    """One run with the chapter's settings; the model's initial weights depend only on the seed."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.tiny(mtp_depth=0, fp8=precision == "fp8"))
    if precision == "bf16":
        model = BF16Autocast(model)
    loss = TrainingLoss()
    return train_lm(model, corpus, steps=opts.steps, batch_size=opts.batch_size, seq_len=opts.seq_len,
                    lr=opts.lr, seed=seed, loss_fn=loss, on_step=loss.update_bias, progress=False)


def relative(ours: float, reference: float) -> float:
    return 100 * (ours / reference - 1)


def summary(label: str, values: list[float]) -> str:
    std = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "n/a"
    return (f"{label:15s} mean {statistics.mean(values):+.3f}, std {std}, "
            f"range {min(values):+.3f} .. {max(values):+.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only, 10 steps (a smoke test)")
    opts = parser.parse_args()
    if opts.quick:
        opts.seeds, opts.steps = [0], 10
    elif len(opts.seeds) < 2:
        parser.error("--seeds needs at least two seeds to give a spread")
    if opts.steps < 5:
        parser.error(f"--steps ({opts.steps}) must be >= 5")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    corpus = Corpus.default()
    tail = max(1, opts.steps // 5)
    print("command:", " ".join(["python benchmarks/fp8_training.py", *sys.argv[1:]]))
    print(f"ModelArgs.tiny(mtp_depth=0), {opts.steps} steps of {opts.batch_size} x {opts.seq_len} tokens, "
          f"lr {opts.lr}")
    print(f"machine: {machine()}")
    print("relative differences in %: val = final validation loss, train = mean")
    print(f"training loss of the last {tail} steps, step0 = the first training loss")
    print("(rounding alone: same weights, same batch)")
    print(f"{'':4s} {'val loss':>8s}  {'BF16 vs FP32':^21s}  {'FP8 vs FP32':^21s}  {'FP8 vs BF16':^14s}")
    print(f"{'seed':>4s} {'FP32':>8s}  " + "  ".join([f"{'val':>7s}{'train':>7s}{'step0':>7s}"] * 2)
          + f"  {'val':>7s}{'train':>7s}")
    diffs = {pair: {key: [] for key in keys} for pair, keys in PAIRS.items()}
    fp32_val, ms_per_step = [], {p: [] for p in PRECISIONS}
    for seed in opts.seeds:
        runs = {}
        for precision in PRECISIONS:
            start = time.perf_counter()
            runs[precision] = train(precision, seed, corpus, opts)
            ms_per_step[precision].append(1e3 * (time.perf_counter() - start) / opts.steps)
        fp32_val.append(runs["fp32"].final_val_loss)
        for (ours, ref), keys in PAIRS.items():
            run, base = runs[ours], runs[ref]
            measures = {"val": (run.final_val_loss, base.final_val_loss),
                        "train": (sum(run.train_loss[-tail:]), sum(base.train_loss[-tail:])),
                        "step0": (run.train_loss[0], base.train_loss[0])}
            for key in keys:
                diffs[ours, ref][key].append(relative(*measures[key]))
        cells = "  ".join("".join(f"{values[-1]:>+7.3f}" for values in diffs[pair].values()) for pair in PAIRS)
        print(f"{seed:>4d} {fp32_val[-1]:>8.4f}  {cells}", flush=True)
    print(f"over {len(opts.seeds)} seeds (%):")
    for (ours, ref), measures in diffs.items():
        for key, values in measures.items():
            print("  " + summary(f"{ours.upper()}/{ref.upper()} {key}", values))
    if len(fp32_val) > 1:
        moves = [relative(v, statistics.mean(fp32_val)) for v in fp32_val]
        print(f"for scale, FP32 val loss across seeds: mean {statistics.mean(fp32_val):.4f}, std "
              f"{100 * statistics.stdev(fp32_val) / statistics.mean(fp32_val):.2f}% of it,")
        print(f"  seeds from {min(moves):+.2f}% to {max(moves):+.2f}% of the mean")
    print("ms per training step (incl. evaluation), median [min, max] over the seeds' runs:")
    for p in PRECISIONS:
        print(f"  {p.upper():4s} {spread(ms_per_step[p], '.0f')}")
    print("report (3.3, FP8 vs BF16 at 16B and 230B): relative loss error below 0.25%")


if __name__ == "__main__":
    main()
