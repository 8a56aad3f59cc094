"""Self-speculative decoding with the MTP modules: acceptance rate, tokens per forward, wall-clock speed-up.

    python benchmarks/speculative_decoding.py                  # chapter 4's model (4 blocks, D = 2), seeds 0 1 2
    python benchmarks/speculative_decoding.py --layers 12 --steps 1000 --threads 2 --seeds 0

Per seed, trains a tiny DeepSeek-V3 with MTP on the book's corpus (lambda 0.3, chapter 4's optimizer
settings), then decodes validation prompts of every domain greedily, each prompt alone, plain and
speculative (draft depth 1 .. D), and prints the report's two figures beside ours (report 5.4.3: 85-90%
acceptance of the second-token draft, 1.8x tokens per second). Timings are the fastest of --repeats runs
per prompt. The speed-up depends on how cheap a draft is next to a main-model step: raise --layers to see
it approach tokens-per-forward, and --steps to see the acceptance rate rise. The last lines summarise
depth 1 over the seeds (mean and range).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.generate import SpeedComparison, compare_decoding
from dsv3_lite.model import Transformer
from dsv3_lite.train import TrainingLoss, train_lm


def validation_prompts(corpus: Corpus, per_domain: int, length: int) -> torch.Tensor:
    """The first `length` tokens of the first `per_domain` validation documents of each domain."""
    starts = torch.cat([torch.tensor([0]), (corpus.val == corpus.tokenizer.eot_id).nonzero().flatten() + 1])
    starts = starts[starts + length < len(corpus.val)]
    rows = [corpus.val[s:s + length] for d in range(len(corpus.domains))
            for s in starts[corpus.val_domains[starts] == d][:per_domain].tolist()]
    return torch.stack(rows)


def run_seed(corpus: Corpus, args: ModelArgs, opts: argparse.Namespace, seed: int) -> list[SpeedComparison]:
    """Train one MTP model and compare plain with speculative decoding at every draft depth."""
    torch.manual_seed(seed)
    model = Transformer(args).to(opts.device)
    start = time.perf_counter()
    loss = TrainingLoss(opts.mtp_lambda)
    history = train_lm(model, corpus, steps=opts.steps, batch_size=opts.batch_size, seq_len=64, lr=5e-3,
                       seed=seed, loss_fn=loss, on_step=loss.update_bias, progress=False)
    print(f"seed {seed}: trained for {opts.steps} steps in {time.perf_counter() - start:.0f} s; main val loss "
          f"{history.final_val_loss:.3f}, MTP train losses per depth "
          + " / ".join(f"{d:.3f}" for d in loss.mtp_depths[-1]))
    prompts = validation_prompts(corpus, opts.prompts_per_domain, 16).to(opts.device)
    model.eval()
    results = []
    for depth in range(1, opts.depth + 1):
        r = compare_decoding(model, prompts, opts.new_tokens, draft_depth=depth, repeats=opts.repeats)
        per_depth = " / ".join(f"{a:.1%}" for a in r.acceptance_by_depth)
        print(f"{seed:>4d} {depth:>6d} {per_depth:>24s} {r.tokens_per_forward:>15.3f} "
              f"{r.plain_tokens_per_second:>12.0f} {r.speculative_tokens_per_second:>11.0f} {r.speedup:>8.2f}x",
              flush=True)
        results.append(r)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layers", type=int, default=4, help="main-model blocks (each MTP block is one more)")
    parser.add_argument("--depth", type=int, default=2, help="MTP depth D")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mtp-lambda", type=float, default=0.3)
    parser.add_argument("--prompts-per-domain", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48,
                        help="tokens per prompt (48: prompt + new tokens = the 64 the model trained on)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default="cpu", help="e.g. cuda; timings then include kernel launches")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    corpus = Corpus.default()
    args = ModelArgs.tiny(n_layers=opts.layers, mtp_depth=opts.depth)
    print("command:", " ".join(["python benchmarks/speculative_decoding.py", *sys.argv[1:]]))
    print(f"{args.num_params():,} + {opts.depth} x {args.mtp_module_params():,} (MTP) parameters; greedy decoding "
          f"of {opts.prompts_per_domain} validation prompts per domain x {opts.new_tokens} tokens, one at a time "
          f"(report 5.4.3: 85-90% acceptance, 1.8x tokens/s)")
    print(f"{'seed':>4s} {'drafts':>6s} {'acceptance (per depth)':>24s} {'tokens/forward':>15s} "
          f"{'plain tok/s':>12s} {'spec tok/s':>11s} {'speed-up':>9s}")
    depth1 = [run_seed(corpus, args, opts, seed)[0] for seed in opts.seeds]
    if len(depth1) > 1:
        for name, values, fmt in [("acceptance", [r.acceptance_rate for r in depth1], ".1%"),
                                  ("tokens per forward", [r.tokens_per_forward for r in depth1], ".3f"),
                                  ("wall-clock speed-up", [r.speedup for r in depth1], ".2f")]:
            print(f"depth 1, {len(values)} seeds: {name} mean {statistics.mean(values):{fmt}}, "
                  f"range {min(values):{fmt}} .. {max(values):{fmt}}")


if __name__ == "__main__":
    main()
