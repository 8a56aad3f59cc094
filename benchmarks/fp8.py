"""FP8 as DeepSeek-V3 uses it (report 3.3), measured on this CPU with `dsv3_lite.fp8`.

    python benchmarks/fp8.py                       # about 30 s on 2 cores
    python benchmarks/fp8.py --seed 1 --threads 1 --reps 3
    python benchmarks/fp8.py --quick               # small shapes, K <= 1024: a smoke test (~10 s)

(a) act_quant throughput: 1x128-tile E4M3 quantization of FP32 activations (the PyTorch reference of
    `dsv3_lite.fp8`), median [min, max] over `reps` timed calls after one untimed call, on the machine
    named. GB/s counts the FP32 input read (4 bytes per value); the FP8 output and the scales add
    1 + 4/128 bytes per value. A CPU simulation: a GPU kernel does this in one pass.
(b) Quantization error of per-tensor, per-tile (1x128, activations) and per-block (128x128, weights)
    scales, and per-tile with power-of-two scales (DeepGEMM's UE8M0): on N(0, 1) activations with one
    channel made 100x and 1000x larger, and on N(0, 0.02) weights. Columns: relative RMS error
    ||x' - x|| / ||x||; max |x' - x| / max |x|; the 99th percentile of |x' - x| / |x| over the other
    channels; the share of their nonzero values stored as FP8 subnormals or zero. Random data stands in
    for the activations of a trained model, which chapter 5 measures.
(c) Accumulation error of `limited_accumulation_matmul` (13 fraction bits, truncated) vs K: maximum
    relative error over 32x32 outputs, entries of both operands uniform in [0, 1) stored as E4M3, with
    each product truncated into the running sum (mma_k 1) or 32 at a time (mma_k 32), with and without
    promotion into FP32 every 128. The report measured nearly 2% at K = 4096 on H800 without promotion.
Prints figures; nothing here is asserted.
"""
from __future__ import annotations

import argparse
import functools
import shlex
import statistics
import sys
import time
from typing import Callable

import torch

from dsv3_lite.fp8 import (E4M3, act_dequant, act_quant, limited_accumulation_matmul, per_tensor_quant,
                           weight_dequant, weight_quant)
from dsv3_lite.timing import machine, spread

THROUGHPUT_SHAPES = [(1024, 7168), (4096, 7168), (16384, 2048)]
ACCUMULATION_K = [256, 1024, 4096, 16384]
ERROR_TOKENS = 4096
QUICK = {"shapes": [(256, 2048)], "k": [256, 1024], "tokens": 512}  # --quick

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = per_tensor_quant(x)
    return q, q.float() * scale


def per_tile(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = act_quant(x, pow2_scale=pow2_scale)
    return q, act_dequant(q, scale)


def per_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = weight_quant(x)
    return q, weight_dequant(q, scale)


SCHEMES: dict[str, Quantizer] = {
    "per tensor": per_tensor,
    "per tile 1x128": per_tile,
    "per block 128x128": per_block,
    "per tile, pow2 scale": functools.partial(per_tile, pow2_scale=True),
}


def throughput(shapes: list[tuple[int, int]], reps: int) -> None:
    print("\n(a) act_quant, FP32 -> E4M3 in 1x128 tiles, median [min, max] over runs")
    print(f"{'shape':>12s} {'MB in':>6s}  {'ms':<26s} {'GB/s (median)':>13s}")
    for rows, cols in shapes:
        x = torch.randn(rows, cols)
        act_quant(x)  # untimed: the first call pays for allocation
        ms = []
        for _ in range(reps):
            start = time.perf_counter()
            act_quant(x)
            ms.append(1e3 * (time.perf_counter() - start))
        megabytes = x.numel() * 4 / 1e6
        print(f"{f'{rows}x{cols}':>12s} {megabytes:>6.1f}  {spread(ms, '.1f'):<26s} "
              f"{megabytes / statistics.median(ms):>13.2f}", flush=True)


def error_table(title: str, x: torch.Tensor, outlier: int | None) -> None:
    print(f"\n{title}")
    print(f"{'scales':>21s} {'rel RMS':>9s} {'max/amax':>9s} {'p99 rel':>9s} {'sub/zero':>9s}")
    others = torch.ones(x.shape[1], dtype=torch.bool)
    if outlier is not None:
        others[outlier] = False
    rest = x[:, others]
    for name, quantize in SCHEMES.items():
        q, dequantized = quantize(x)
        error = dequantized - x
        relative = (error[:, others].abs() / rest.abs())[rest != 0]
        stored = q.float()[:, others]
        small = (stored.abs() < E4M3.smallest_normal)[rest != 0]
        print(f"{name:>21s} {(error.norm() / x.norm()).item():>9.2e} "
              f"{(error.abs().max() / x.abs().max()).item():>9.2e} "
              f"{relative.quantile(0.99).item():>9.2e} {small.float().mean().item():>9.2%}")


def accumulation(k_values: list[int]) -> None:
    print("\n(c) 13-bit truncated accumulation: max rel. error, 32x32 GEMM, U[0, 1) as E4M3")
    print(f"{'K':>6s} {'mma_k 1':>9s} {'promoted':>9s} {'mma_k 32':>9s} {'promoted':>9s}")
    for k in k_values:
        a, _ = act_quant(torch.rand(32, k))
        b, _ = act_quant(torch.rand(32, k))
        exact = a.double() @ b.double().T
        row = []
        for mma_k in (1, 32):
            for promote in (None, 128):
                out = limited_accumulation_matmul(a, b, promote_every=promote, mma_k=mma_k)
                row.append(((out.double() - exact).abs() / exact).max().item())
        print(f"{k:>6d} " + " ".join(f"{e:>9.3%}" for e in row), flush=True)
    print("report (H800, K = 4096, no promotion): nearly 2%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per shape (>= 3)")
    parser.add_argument("--quick", action="store_true", help="small shapes, K <= 1024, 3 reps")
    opts = parser.parse_args()
    if opts.threads < 1 or opts.reps < 3:
        parser.error(f"--threads ({opts.threads}) must be >= 1 and --reps ({opts.reps}) >= 3")
    if opts.quick:
        opts.reps = 3
    shapes, k_values, tokens = ((QUICK["shapes"], QUICK["k"], QUICK["tokens"]) if opts.quick
                                else (THROUGHPUT_SHAPES, ACCUMULATION_K, ERROR_TOKENS))
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"machine: {machine()}; seed {opts.seed}")

    throughput(shapes, opts.reps)
    print("\n(b) quantization error, E4M3")
    for factor in (100, 1000):
        x = torch.randn(tokens, 1024)
        x[:, 7] *= factor
        error_table(f"activations {tokens}x1024, N(0, 1), channel 7 x{factor}", x, outlier=7)
    error_table(f"weights {tokens // 2}x1024, N(0, 0.02)", torch.randn(tokens // 2, 1024) * 0.02,
                outlier=None)
    accumulation(k_values)


if __name__ == "__main__":
    main()
