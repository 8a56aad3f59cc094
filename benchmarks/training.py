"""Training throughput on this CPU: dsv3_lite's trainer for the tiny and small presets in FP32 and BF16, and
the same training step of transformers' DeepseekV3ForCausalLM on the same weights.

    python benchmarks/training.py                         # tiny and small, 1 CPU thread
    python benchmarks/training.py --presets small --threads 2 --steps 20

Two measurements:

1. Trainer tokens/s: `dsv3_lite.trainer.Trainer` steps (the whole recipe: packed BPE sequences, main + MTP +
   balance loss, backward, clipping, AdamW, bias update) for each preset (tiny as the command line builds it,
   with a 1,024-token vocabulary) and precision; the median over `--steps` steps after two warm-up steps.
2. The same step, ours vs transformers: a random transformers model of the preset's shape (MTP off: transformers
   does not train MTP) is loaded into ours with `dsv3_lite.hf.from_hf`; a step is forward, next-token
   cross-entropy, backward and an AdamW update, on the same batch of `batch` x `seq_len` tokens. Each side is
   the fastest of `--reps` steps in process CPU time, called alternately (`dsv3_lite.timing.best_of`);
   transformers runs with every attention / experts implementation that trains (benchmarks/vs_transformers.py)
   and its fastest is compared. Ratio = theirs / ours: > 1 means dsv3_lite is faster.

Both repeat `--runs` times (default 3) and close with the median and range over the runs of each figure, with
the machine they ran on (the book quotes these). Nothing is asserted: the figures are printed.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vs_transformers as vs  # benchmarks/: the random transformers model and its implementations
from dsv3_lite import ModelArgs
from dsv3_lite.data import Corpus, build_documents
from dsv3_lite.hf import from_hf
from dsv3_lite.model import Transformer
from dsv3_lite.timing import best_of, machine, spread
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.train import PRESETS
from dsv3_lite.trainer import Trainer, TrainArgs


def hf_fields(args: ModelArgs) -> dict:
    """The preset's shape in transformers' DeepseekV3Config names (on top of vs_transformers.COMMON)."""
    return dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.inter_dim,
                num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
                qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
                v_head_dim=args.v_head_dim, n_routed_experts=args.n_routed_experts,
                moe_intermediate_size=args.moe_inter_dim, num_experts_per_tok=args.n_activated_experts,
                n_group=args.n_expert_groups, topk_group=args.n_limited_groups)


def trainer_tokens_per_s(args: ModelArgs, corpus: Corpus, precision: str, opts: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = Transformer(args)
    steps = opts.steps + 3  # two warm-up steps, the timed ones, and a last step that is not run (it evaluates)
    run = TrainArgs(steps=steps, seq_len=opts.seq_len, batch_size=opts.batch, batch_size_start=opts.batch,
                    warmup_steps=1, precision=precision)
    trainer = Trainer(model, corpus, run, progress=False)
    trainer.train(until=steps - 1)
    return statistics.median(trainer.history.tokens_per_s[2:])


def same_step(name: str, args: ModelArgs, opts: argparse.Namespace) -> dict:
    """Fastest step of ours and of each transformers setting, on the same weights and batch."""
    vs.SIZES[name] = hf_fields(args)
    hf = vs.random_hf_model(name, opts.seq_len).train()
    ours = from_hf(hf).train()
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95)) for m in (ours, hf)}

    def step(model: torch.nn.Module, is_hf: bool) -> None:
        vs.train_step(model, x, y, hf=is_hf)  # zero_grad, forward, cross-entropy, backward
        optimizers[model].step()

    def setup(setting: str) -> None:
        if setting != "ours":
            vs.set_hf_impl(hf, setting)

    calls = {"ours": lambda: step(ours, False)}
    calls.update({s: lambda: step(hf, True) for s in vs.TRAIN_SETTINGS})
    seconds = best_of(calls, opts.reps, clock=time.process_time, setup=setup)
    fastest = min(vs.TRAIN_SETTINGS, key=seconds.get)
    with torch.no_grad():  # same weights: the same loss before the timed updates changed them
        same = torch.allclose(F.cross_entropy(from_hf(hf)(x).flatten(0, 1), y.flatten()),
                              F.cross_entropy(hf(x, use_cache=False).logits.flatten(0, 1), y.flatten()),
                              rtol=1e-4)
    return dict(ours=seconds["ours"], theirs=seconds[fastest], setting=fastest, same=same,
                params=ours.num_params())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--threads", type=vs.positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--steps", type=vs.positive_int, default=8, help="trainer steps timed per setting")
    parser.add_argument("--reps", type=vs.positive_int, default=5, help="same-step calls each; the fastest counts")
    parser.add_argument("--batch", type=vs.positive_int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=vs.positive_int, default=128)
    parser.add_argument("--runs", type=vs.positive_int, default=3, help="whole measurements; median and range")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"transformers {sys.modules['transformers'].__version__}; batch {opts.batch} x {opts.seq_len} tokens")
    print(f"machine: {machine()}")

    documents = build_documents(1000)
    presets = {}
    for name in opts.presets:
        args = PRESETS[name]()
        tokenizer = BPETokenizer.train((d.text for d in documents), args.vocab_size)
        args = args.replace(vocab_size=tokenizer.vocab_size, max_seq_len=max(args.max_seq_len, opts.seq_len))
        presets[name] = args, Corpus(documents, tokenizer=tokenizer, fim_rate=0.1)
    speeds = {(name, p): [] for name in presets for p in ("fp32", "bf16")}
    ratios = {name: [] for name in presets}
    for run in range(1, opts.runs + 1):
        print(f"\nrun {run}. 1. Trainer tokens/s (whole recipe, median of {opts.steps} steps)")
        print(f"{'preset':8s} {'params':>10s} {'FP32':>8s} {'BF16':>8s}")
        for name, (args, corpus) in presets.items():
            for p in ("fp32", "bf16"):
                speeds[name, p].append(trainer_tokens_per_s(args, corpus, p, opts))
            n_params = Transformer(args).num_params(mtp=True)
            print(f"{name:8s} {n_params:>10,d} {speeds[name, 'fp32'][-1]:>8,.0f} {speeds[name, 'bf16'][-1]:>8,.0f}",
                  flush=True)

        print(f"\nrun {run}. 2. The same step (forward, cross-entropy, backward, AdamW; no MTP), fastest of "
              f"{opts.reps}")
        print(f"{'preset':8s} {'params':>10s} {'ours ms':>8s} {'theirs':>8s} {'ratio':>6s} {'ours tok/s':>11s} "
              f"{'same loss':>9s}  transformers' fastest")
        for name, (args, _) in presets.items():
            r = same_step(name, args.replace(mtp_depth=0), opts)
            ratios[name].append(r["theirs"] / r["ours"])
            print(f"{name:8s} {r['params']:>10,d} {1e3 * r['ours']:>8.1f} {1e3 * r['theirs']:>8.1f} "
                  f"{ratios[name][-1]:>6.2f} {opts.batch * opts.seq_len / r['ours']:>11,.0f} "
                  f"{str(r['same']):>9s}  {r['setting']}", flush=True)
    print("(ratio = transformers' time / ours: > 1 means dsv3_lite is faster)")

    print(f"\nmedian [min, max] over {opts.runs} run(s) ({machine()})")
    for name in presets:
        fp32, bf16 = speeds[name, "fp32"], speeds[name, "bf16"]
        print(f"{name}: trainer tokens/s FP32 {spread(fp32, ',.0f')}; BF16 {spread(bf16, ',.0f')}")
        print(f"{' ' * len(name)}  BF16 / FP32 {spread([b / f for b, f in zip(bf16, fp32)])}; "
              f"same step, transformers / ours {spread(ratios[name])}")


if __name__ == "__main__":
    main()
