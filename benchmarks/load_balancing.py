"""Chapter 3's balancing experiment over several seeds: four ways to balance a small MoE language model.

    python benchmarks/load_balancing.py                    # seeds 0 1 2, 300 steps: a few minutes on 2 cores
    python benchmarks/load_balancing.py --seeds 0 1 2 3 4 --steps 600

Methods (the same model and data; only the balancing changes):
  none       no balancing at all
  batch aux  auxiliary loss alpha * sum_i f_i P_i over the whole batch (Switch-style, alpha 0.01)
  seq aux    the same loss per sequence, averaged over the batch (DeepSeek-V2's expert-level scope,
             alpha 0.01)
  loss-free  DeepSeek-V3: bias update gamma 0.001 plus the complementary sequence-wise loss alpha 1e-4

For each run it measures the validation loss, MaxVio on the training batches (mean over the last 100 steps
and the MoE layers), MaxVio of the validation windows (all routed at once, mean over layers), and domain
specialization: the mutual information between a routed token's domain and the expert it is sent to, in
bits (0: every domain uses the experts in the same proportions), mean over layers. Then it prints each
metric's mean, standard deviation and range over the seeds, and which orderings held on every seed.

Seed 0 is the run that notebooks/03_moe.ipynb trains and plots. Training amplifies last-bit differences
between CPUs: the same seed gives results a few percent apart on another machine (more for an unbalanced
router), so read the spread, not the digits.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import time

import torch

from dsv3_lite import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.model import Transformer
from dsv3_lite.moe import expert_load, max_violation
from dsv3_lite.train import TrainingLoss, train_lm

BATCH, SEQ, LR = 16, 64, 3e-3
METRICS = ("val_loss", "batch_vio", "val_vio", "special")
HEADERS = {"val_loss": "val loss", "batch_vio": "MaxVio batch", "val_vio": "MaxVio val",
           "special": "domain MI (bits)"}


def methods(vocab_size: int) -> dict[str, ModelArgs]:
    """The chapter's model (2 blocks of MLA + DeepSeekMoE, 16 routed experts in 4 groups, 2 groups per
    token, 4 experts per token, 1 shared) with each balancing method switched on."""
    base = ModelArgs.tiny(
        vocab_size=vocab_size, dim=64, n_layers=2, n_dense_layers=0, mtp_depth=0, n_heads=4,
        max_seq_len=SEQ, moe_inter_dim=16, n_routed_experts=16, n_shared_experts=1,
        n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, route_scale=1.0, init_std=0.02,
        bias_update_speed=0.0, seq_aux_alpha=0.0, aux_loss_alpha=0.0)
    return {
        "none": base,
        "batch aux": base.replace(aux_loss_alpha=0.01),
        "seq aux": base.replace(seq_aux_alpha=0.01),
        "loss-free": base.replace(bias_update_speed=0.001, seq_aux_alpha=0.0001),
    }


def validation_windows(corpus: Corpus, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """n windows of SEQ tokens spread evenly over the validation split, and each token's domain."""
    starts = torch.linspace(0, len(corpus.val) - SEQ - 1, n).long()
    span = starts[:, None] + torch.arange(SEQ)
    return corpus.val[span], corpus.val_domains[span].flatten().long()


def domain_information(indices: torch.Tensor, domain: torch.Tensor, n_experts: int, n_domains: int) -> float:
    """Mutual information (bits) between the domain of a (token, expert) pair and its expert."""
    pairs = domain[:, None].expand_as(indices) * n_experts + indices
    joint = torch.bincount(pairs.flatten(), minlength=n_domains * n_experts).view(n_domains, n_experts)
    p = joint.double() / joint.sum()
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    return (p[nz] * (p[nz] / outer[nz]).log2()).sum().item()


def run(args: ModelArgs, corpus: Corpus, steps: int, seed: int, val_x: torch.Tensor,
        val_domain: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(seed)
    model = Transformer(args)
    loss = TrainingLoss()
    history = train_lm(model, corpus, steps=steps, batch_size=BATCH, seq_len=SEQ, lr=LR, seed=seed,
                       loss_fn=loss, on_step=loss.update_bias, progress=False)
    loads = torch.stack(loss.expert_loads).float()  # (step, layer, expert)
    batch_vio = (loads.amax(-1) / loads.mean(-1) - 1).mean(-1)  # per step, mean over layers
    model.eval()
    with torch.no_grad():
        routings = model.hidden_states(val_x)[1]
    n = args.n_routed_experts
    val_vio = [max_violation(expert_load(r.indices, n)) for r in routings]
    special = [domain_information(r.indices, val_domain, n, len(corpus.domains)) for r in routings]
    return {"val_loss": history.final_val_loss, "batch_vio": batch_vio[-100:].mean().item(),
            "val_vio": statistics.mean(val_vio), "special": statistics.mean(special)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the chapter uses 1)")
    opts = parser.parse_args()
    if len(opts.seeds) < 2:
        parser.error("give at least two seeds (--seeds 0 1 2): the point is the spread")
    torch.set_num_threads(opts.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))

    corpus = Corpus.default()
    val_x, val_domain = validation_windows(corpus)
    configs = methods(corpus.tokenizer.vocab_size)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    print(f"{len(configs)} methods x {len(opts.seeds)} seeds, {opts.steps} steps of {BATCH} x {SEQ} tokens")
    print(f"{'seed':>4s}  {'method':10s}" + "".join(f"{HEADERS[m]:>17s}" for m in METRICS))
    start = time.perf_counter()
    for seed in opts.seeds:
        for name, args in configs.items():
            r = run(args, corpus, opts.steps, seed, val_x, val_domain)
            results[name].append(r)
            print(f"{seed:>4d}  {name:10s}" + "".join(f"{r[m]:>17.3g}" for m in METRICS), flush=True)

    print(f"\nmean +- standard deviation [min, max] over seeds {' '.join(map(str, opts.seeds))}")
    for metric in METRICS:
        print(f"{HEADERS[metric]}:")
        for name, rows in results.items():
            values = [r[metric] for r in rows]
            print(f"  {name:10s} {statistics.mean(values):7.3g} +- {statistics.stdev(values):<8.2g}"
                  f"[{min(values):.3g}, {max(values):.3g}]")

    print("\npairwise orderings that held on every seed (a < b: a lower on each seed):")
    for metric in METRICS:
        held = []
        for a, b in itertools.permutations(results, 2):
            if all(ra[metric] < rb[metric] for ra, rb in zip(results[a], results[b])):
                held.append(f"{a} < {b}")
        print(f"  {HEADERS[metric]}: {'; '.join(held) if held else 'none'}")
    print(f"\n{time.perf_counter() - start:.0f} s, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
