"""Decode time per token of MLA's naive path (per-head K/V cache) vs its absorbed path (latent cache).

    python benchmarks/mla_decode.py                       # contexts 256 .. 8192, one CPU thread
    python benchmarks/mla_decode.py --contexts 1024 4096 --threads 2 --reps 15

One MLA layer with DeepSeek-V3's per-head shapes (d_c 512, d_rope 64, nope 128, v 128) and 16 heads,
batch 1. The cache is filled with random values up to the context length (the contents do not change the
work), then one new token is decoded at that position. The two paths are called alternately and each
one's fastest call over `reps` is reported (`dsv3_lite.timing.best_of`, which chapter 2 uses too), which
with a single thread keeps the figures stable on a shared machine. Prints figures; nothing here is asserted.
The ratios are those of 16 heads on a CPU: V3's 128 heads share each cached latent 8 times more, and a GPU
has another balance of arithmetic to memory bandwidth (chapter 2 derives V3's).
"""
from __future__ import annotations

import argparse
import functools
import shlex
import sys

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.mla import MLA
from dsv3_lite.timing import best_of


def bench_args(max_context: int) -> ModelArgs:
    return ModelArgs.deepseek_v3(dim=2048, n_heads=16, q_lora_rank=512, max_seq_len=max_context + 1,
                                 original_seq_len=max_context + 1, max_batch_size=1)


def decode_ms(modules: dict[str, MLA], x: torch.Tensor, context: int, reps: int) -> dict[str, float]:
    """Fastest wall time (ms) of decoding one token at position `context` over a filled cache, per module;
    the modules are called alternately (`dsv3_lite.timing.best_of`) so that both see the same load."""
    with torch.no_grad():
        best = best_of({name: functools.partial(module, x, context) for name, module in modules.items()},
                       reps=reps)
    return {name: 1e3 * t for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    opts = parser.parse_args()
    if opts.threads < 1:
        parser.error(f"--threads ({opts.threads}) must be >= 1")
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)

    args = bench_args(max(opts.contexts))
    modules = {}
    for impl in ("naive", "absorb"):
        modules[impl] = MLA(args.replace(attn_impl=impl))
        modules[impl].allocate_cache(1)
        for name, buf in modules[impl].named_buffers():
            if name.startswith("cache_"):
                buf.normal_()
    x = torch.randn(1, 1, args.dim)

    per_token = {impl: m.cache_bytes_per_token(bytes_per_element=4) for impl, m in modules.items()}
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"one MLA layer, {args.n_heads} heads, d_c {args.kv_lora_rank}, d_rope {args.qk_rope_head_dim}, "
          f"FP32, batch 1, {opts.threads} thread(s)")
    print(f"cache per token: naive {per_token['naive']:,} B, absorb {per_token['absorb']:,} B "
          f"({per_token['naive'] / per_token['absorb']:.1f}x smaller)")
    print(f"{'context':>8s} {'naive ms':>10s} {'absorb ms':>10s} {'naive/absorb':>13s}  ({args.n_heads} heads, CPU)")
    for context in opts.contexts:
        ms = decode_ms(modules, x, context, opts.reps)
        naive, absorb = ms["naive"], ms["absorb"]
        print(f"{context:>8d} {naive:>10.2f} {absorb:>10.2f} {naive / absorb:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
