"""Self-speculative decoding with the MTP modules: acceptance rate, tokens per forward, wall-clock speed-up.

    python benchmarks/speculative_decoding.py                   # chapter 4's model: 6 blocks, D = 2, 400 steps
    python benchmarks/speculative_decoding.py --layers 12 --steps 1000 --threads 2

Trains a tiny DeepSeek-V3 with MTP on the book's corpus (lambda 0.3), then decodes validation prompts of
every domain greedily, each prompt alone, plain and speculative (draft depth 1 .. D), and prints the
report's two figures beside ours (report 5.4.3: 85-90% acceptance of the second-token draft, 1.8x tokens
per second). Timings are the fastest of --repeats runs per prompt. The speed-up depends on how cheap one
MTP block is next to the main model: raise --layers to see it approach tokens-per-forward.
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.generate import compare_decoding
from dsv3_lite.model import Transformer
from dsv3_lite.train import TrainingLoss, train_lm


def validation_prompts(corpus: Corpus, per_domain: int, length: int) -> torch.Tensor:
    """The first `length` tokens of the first `per_domain` validation documents of each domain."""
    starts = torch.cat([torch.tensor([0]), (corpus.val == corpus.tokenizer.eot_id).nonzero().flatten() + 1])
    starts = starts[starts + length < len(corpus.val)]
    rows = [corpus.val[s:s + length] for d in range(len(corpus.domains))
            for s in starts[corpus.val_domains[starts] == d][:per_domain].tolist()]
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="main-model blocks (the MTP block is one more)")
    parser.add_argument("--depth", type=int, default=2, help="MTP depth D")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--mtp-lambda", type=float, default=0.3)
    parser.add_argument("--prompts-per-domain", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    corpus = Corpus.default()
    args = ModelArgs.tiny(n_layers=opts.layers, mtp_depth=opts.depth)
    torch.manual_seed(opts.seed)
    model = Transformer(args)
    start = time.perf_counter()
    loss = TrainingLoss(opts.mtp_lambda)
    history = train_lm(model, corpus, steps=opts.steps, batch_size=16, seq_len=64, lr=5e-3, seed=opts.seed,
                       loss_fn=loss, on_step=loss.update_bias, progress=False)
    print(f"trained {model.num_params():,} + {opts.depth} x {args.mtp_module_params():,} (MTP) parameters "
          f"for {opts.steps} steps in {time.perf_counter() - start:.0f} s; main val loss "
          f"{history.final_val_loss:.3f} nats/byte")

    prompts = validation_prompts(corpus, opts.prompts_per_domain, 16)
    print(f"greedy decoding of {len(prompts)} validation prompts x {opts.new_tokens} tokens, one at a time "
          f"(report 5.4.3: 85-90% acceptance, 1.8x tokens/s)")
    print(f"{'draft depth':>11s} {'acceptance (per depth)':>26s} {'tokens/forward':>15s} {'plain tok/s':>12s} "
          f"{'spec tok/s':>11s} {'speed-up':>9s}")
    model.eval()
    for depth in range(1, opts.depth + 1):
        r = compare_decoding(model, prompts, opts.new_tokens, draft_depth=depth, repeats=opts.repeats)
        per_depth = " / ".join(f"{a:.1%}" for a in r.acceptance_by_depth)
        print(f"{depth:>11d} {per_depth:>26s} {r.tokens_per_forward:>15.3f} {r.plain_tokens_per_second:>12.0f} "
              f"{r.speculative_tokens_per_second:>11.0f} {r.speedup:>8.2f}x")


if __name__ == "__main__":
    main()
