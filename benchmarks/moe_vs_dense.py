"""Forward + backward time of a DeepSeekMoE layer vs a dense SwiGLU FFN with the same activated parameters.

    python benchmarks/moe_vs_dense.py                       # defaults: 16 routed experts, 2 active, 1 shared
    python benchmarks/moe_vs_dense.py --experts 64 --active 6 --groups 8 --limit 4 --threads 2

The dense FFN's hidden size is (n_activated + n_shared) * moe_inter_dim, so both layers do the same expert
FLOPs per token; the MoE additionally routes, sorts, gathers and scatters, and runs each expert as its own
small matmul. The ratio says what that bookkeeping costs on this machine (on CPU the per-expert kernel
launches dominate at small sizes; on GPUs grouped GEMMs and the all-to-all of expert parallelism take over).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.moe import MLP, MoE


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one forward + backward (of the output; a MoE also returns its routing)."""
    samples = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = module(x)
        (out[0] if isinstance(module, MoE) else out).square().mean().backward()
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--moe-inter-dim", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--active", type=int, default=2)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--limit", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    args = ModelArgs.tiny(dim=opts.dim, moe_inter_dim=opts.moe_inter_dim, n_routed_experts=opts.experts,
                          n_activated_experts=opts.active, n_shared_experts=opts.shared,
                          n_expert_groups=opts.groups, n_limited_groups=opts.limit)
    torch.manual_seed(0)
    moe = MoE(args).train()
    dense = MLP(args.dim, (args.n_activated_experts + args.n_shared_experts) * args.moe_inter_dim)
    activated_moe = args.moe_params(activated=True) - args.gate_params()
    assert sum(p.numel() for p in dense.parameters()) == activated_moe
    x = torch.randn(opts.batch, opts.seq_len, args.dim)

    t_moe = time_fwd_bwd(moe, x, opts.repeats)
    t_dense = time_fwd_bwd(dense, x, opts.repeats)
    tokens = opts.batch * opts.seq_len
    print(f"tokens per step        {tokens}")
    print(f"MoE   {args.n_routed_experts} routed + {args.n_shared_experts} shared experts, "
          f"{args.n_activated_experts} active: {sum(p.numel() for p in moe.parameters()):,} parameters, "
          f"{activated_moe:,} activated (expert weights)")
    print(f"dense SwiGLU, hidden {(args.n_activated_experts + args.n_shared_experts) * args.moe_inter_dim}: "
          f"{sum(p.numel() for p in dense.parameters()):,} parameters")
    print(f"forward+backward  MoE {t_moe * 1e3:.2f} ms   dense {t_dense * 1e3:.2f} ms   "
          f"threads {torch.get_num_threads()}")
    print(f"MoE / dense time ratio: {t_moe / t_dense:.2f}")


if __name__ == "__main__":
    main()
