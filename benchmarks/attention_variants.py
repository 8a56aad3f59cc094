"""Chapter 2's quality comparison over several seeds: tiny decoders that differ only in their attention.

    python benchmarks/attention_variants.py                  # seeds 0-4, 150 steps (about 3 min, 1 thread)
    python benchmarks/attention_variants.py --seeds 0 1 2 --steps 300

Each variant is the book's `Transformer` (dense SwiGLU FFNs, no MTP, 2 layers, dim 64, 4 heads, byte
vocabulary) with one attention module in every block: MHA (16-dim heads), GQA (2 key-value heads of 16),
MLA at the tiny shape (d_c 32, 8-dim RoPE key) and MLA with a 16-dim RoPE key taken from the content part
(nope 8). A seed fixes both the weights (torch.manual_seed) and the data order (train_lm's seed); every
variant of a seed sees the same batches. Prints each seed's final validation loss, then per variant the
mean, standard deviation and range, and which pairwise orderings held in every seed: the chapter asserts
only those. One thread, so a run is reproducible on one machine (other CPUs differ in the last digits).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from typing import Callable

import torch
from torch import nn

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.mla import GQA, MHA, MLA
from dsv3_lite.model import Transformer
from dsv3_lite.train import train_lm

STEPS, BATCH, SEQ, LR = 150, 16, 128, 3e-3
BASE = ModelArgs.tiny(n_layers=2)  # dim 64, 4 heads, d_c 32, nope 16 + rope 8


def tiny_lm(args: ModelArgs, make_attention: Callable[[ModelArgs], nn.Module]) -> Transformer:
    """The book's Transformer with dense FFNs, no MTP, and `make_attention(args)` in every block; every
    weight then drawn again from N(0, init_std). The model hands each layer RoPE rows of width
    `args.qk_rope_head_dim`, so a GQA/MHA variant needs it equal to its head_dim."""
    model = Transformer(args.replace(n_dense_layers=args.n_layers, mtp_depth=0))
    for layer in model.layers:
        layer.attn = make_attention(model.args)
    model.init_weights()
    return model


# name -> (model configuration, attention constructor); chapter 2 trains the same four
VARIANTS: dict[str, tuple[ModelArgs, Callable[[ModelArgs], nn.Module]]] = {
    "MHA": (BASE.replace(qk_rope_head_dim=16), lambda a: MHA(a, head_dim=16)),
    "GQA-2": (BASE.replace(qk_rope_head_dim=16), lambda a: GQA(a, n_kv_heads=2, head_dim=16)),
    "MLA": (BASE, MLA),
    "MLA, rope 16": (BASE.replace(qk_nope_head_dim=8, qk_rope_head_dim=16), MLA),
}


def run_seed(seed: int, corpus: Corpus, steps: int) -> dict[str, float]:
    """Final validation loss of every variant trained with `seed`."""
    losses = {}
    for name, (args, make) in VARIANTS.items():
        torch.manual_seed(seed)
        model = tiny_lm(args, make)
        history = train_lm(model, corpus, steps=steps, batch_size=BATCH, seq_len=SEQ, lr=LR, seed=seed,
                           eval_every=0, progress=False)
        losses[name] = history.final_val_loss
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    if len(opts.seeds) < 2:
        parser.error("give at least 2 seeds (--seeds 0 1 2): the point is the spread")
    if opts.threads < 1:
        parser.error(f"--threads ({opts.threads}) must be >= 1")
    torch.set_num_threads(opts.threads)
    corpus = Corpus.default()

    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"{opts.steps} steps, batch {BATCH} x {SEQ} bytes, lr {LR}; final validation loss (nats/byte)")
    names = list(VARIANTS)
    print("seed " + "".join(f"{n:>14s}" for n in names))
    results = {n: [] for n in names}
    for seed in opts.seeds:
        losses = run_seed(seed, corpus, opts.steps)
        for n in names:
            results[n].append(losses[n])
        print(f"{seed:>4d} " + "".join(f"{losses[n]:>14.3f}" for n in names), flush=True)

    print(f"\n{'variant':14s}{'mean':>8s}{'std':>8s}{'min':>8s}{'max':>8s}   over {len(opts.seeds)} seeds")
    for n in names:
        v = results[n]
        print(f"{n:14s}{statistics.mean(v):>8.3f}{statistics.stdev(v):>8.3f}{min(v):>8.3f}{max(v):>8.3f}")
    print("\norderings that held in every seed (loss margin, smallest .. largest):")
    for a in names:
        for b in names:
            margins = [y - x for x, y in zip(results[a], results[b])]
            if a != b and min(margins) > 0:
                print(f"  {a} < {b}   (margin {min(margins):.3f} .. {max(margins):.3f})")


if __name__ == "__main__":
    main()
