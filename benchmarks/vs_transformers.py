"""dsv3_lite vs transformers' DeepseekV3ForCausalLM on the same weights: a training step and greedy decoding.

    python benchmarks/vs_transformers.py                          # tiny, wide and moe48, one CPU thread
    python benchmarks/vs_transformers.py --sizes tiny --reps 10 --new-tokens 64 --batch 1

A random transformers model (every weight O(1)-scaled, so logits are meaningful and greedy choices are
not near-ties) is loaded into ours with `dsv3_lite.hf.from_hf`; both run in this one process on
`--threads` CPU threads (default 1). Two measurements, each the fastest of `reps` calls in CPU time of
the process (which, unlike wall time, does not grow when other programs share the cores), ours and
transformers' settings called alternately:

- train step: forward + backward of the next-token cross-entropy of the logits, on `batch` sequences of
  prompt_len + new_tokens tokens (the same batch on both sides);
- decode: greedy decoding with the KV cache of `new_tokens` tokens after a `prompt_len`-token prompt
  (ours: `dsv3_lite.generate.generate`; theirs: `model.generate(do_sample=False, use_cache=True)`),
  timed over the whole call, prefill included.

transformers is run with each attention implementation (eager, sdpa) and each experts implementation
(eager, grouped_mm, batched_mm; batched_mm not for training, where it is 10-30x slower); every column
compares against transformers' fastest setting, which is named.
The whole measurement repeats `--runs` times (default 3), and the ratios close with their median and range
over the runs, as the book quotes them, with the machine they ran on.
Ratios are theirs / ours: > 1 means dsv3_lite is faster. Nothing is asserted, except that the script exits
with status 1 if the greedy tokens of the two models differ.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import dsv3_lite
from dsv3_lite.generate import generate
from dsv3_lite.hf import from_hf
from dsv3_lite.timing import best_of, machine, spread

# transformers config fields per size, on top of COMMON (one dense layer first, one shared expert).
COMMON = dict(first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
              rope_interleave=True, tie_word_embeddings=False)
SIZES = {
    "tiny": dict(vocab_size=260, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                 num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 n_routed_experts=8, moe_intermediate_size=32, num_experts_per_tok=2,
                 n_group=4, topk_group=2),
    "wide": dict(vocab_size=1024, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=12, q_lora_rank=None, kv_lora_rank=128,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 n_routed_experts=64, moe_intermediate_size=96, num_experts_per_tok=6,
                 n_group=8, topk_group=4),
    "moe48": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=8, q_lora_rank=64, kv_lora_rank=64,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  n_routed_experts=48, moe_intermediate_size=48, num_experts_per_tok=6,
                  n_group=8, topk_group=4),
}
ATTN_IMPLS = ("eager", "sdpa")
EXPERTS_IMPLS = ("eager", "grouped_mm", "batched_mm")
SETTINGS = [f"{a}/{e}" for a, e in itertools.product(ATTN_IMPLS, EXPERTS_IMPLS)]  # attention/experts
TRAIN_SETTINGS = [s for s in SETTINGS if not s.endswith("batched_mm")]


def random_hf_model(size: str, max_len: int, seed: int = 0) -> DeepseekV3ForCausalLM:
    """transformers' model of `size` with random O(1)-scaled weights (as tests/test_hf.py's): norm weights
    around 1, a non-zero correction bias, matrices scaled by fan-in, router weights that separate experts."""
    fields = SIZES[size]
    config = DeepseekV3Config(**COMMON, **fields, num_key_value_heads=fields["num_attention_heads"],
                              max_position_embeddings=max_len)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:  # gate.weight: (E, dim); 3D experts (E, out, in); linears (out, in)
                p.normal_(0.0, (2.4 if "gate.weight" in name else 0.64) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    model.generation_config.eos_token_id = None  # never stop early: both sides decode new_tokens tokens
    model.generation_config.pad_token_id = 0
    return model


def set_hf_impl(model: DeepseekV3ForCausalLM, setting: str) -> None:
    attn, experts = setting.split("/")
    model.set_attn_implementation(attn)
    model.set_experts_implementation(experts)


def train_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, hf: bool) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(tokens, use_cache=False).logits if hf else model(tokens)
    F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()


def measure(size: str, opts: argparse.Namespace) -> dict:
    total = opts.prompt_len + opts.new_tokens
    hf = random_hf_model(size, total)
    ours = from_hf(hf, max_batch_size=opts.batch)
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(0, hf.config.vocab_size, (opts.batch, total + 1), generator=gen)
    prompt = seq[:, :opts.prompt_len]

    def setup(name: str) -> None:
        if name != "ours":
            set_hf_impl(hf, name)

    ours.train()
    hf.train()
    x, y = seq[:, :-1], seq[:, 1:]
    calls = {"ours": lambda: train_step(ours, x, y, hf=False)}
    calls.update({s: lambda: train_step(hf, x, y, hf=True) for s in TRAIN_SETTINGS})
    train_s = best_of(calls, opts.reps, clock=time.process_time, setup=setup)

    ours.eval()
    hf.eval()
    out: dict[str, torch.Tensor] = {}

    def ours_decode() -> None:
        result = generate(ours, prompt, opts.new_tokens)
        out["ours"] = result[0] if isinstance(result, tuple) else result

    def hf_decode(setting: str) -> None:
        with torch.no_grad():
            out[setting] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       use_cache=True, max_new_tokens=opts.new_tokens)

    calls = {"ours": ours_decode}
    calls.update({s: lambda s=s: hf_decode(s) for s in SETTINGS})
    decode_s = best_of(calls, opts.reps, clock=time.process_time, setup=setup)
    same = all(torch.equal(out["ours"], out[s]) for s in SETTINGS)

    hf_train = min(TRAIN_SETTINGS, key=train_s.get)
    hf_decode_best = min(SETTINGS, key=decode_s.get)
    n_new = opts.batch * opts.new_tokens
    return dict(size=size, params=ours.num_params(), train_s=train_s, decode_s=decode_s,
                train=(train_s["ours"], train_s[hf_train], hf_train),
                decode=(n_new / decode_s["ours"], n_new / decode_s[hf_decode_best], hf_decode_best),
                same=same)


def describe(size: str) -> str:
    c = {**COMMON, **SIZES[size]}
    return (f"{size}: dim {c['hidden_size']}, {c['num_hidden_layers']} layers ({c['first_k_dense_replace']} "
            f"dense, FFN {c['intermediate_size']}), {c['num_attention_heads']} heads, q_lora "
            f"{c['q_lora_rank'] or 0}, kv_lora {c['kv_lora_rank']}, nope/rope/v {c['qk_nope_head_dim']}/"
            f"{c['qk_rope_head_dim']}/{c['v_head_dim']}, {c['n_routed_experts']} routed experts of "
            f"{c['moe_intermediate_size']} (top {c['num_experts_per_tok']}, {c['n_group']} groups, "
            f"{c['topk_group']} kept) + {c['n_shared_experts']} shared, vocab {c['vocab_size']}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--reps", type=positive_int, default=5, help="timed calls each; the fastest counts")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--prompt-len", type=positive_int, default=32)
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences per train step and decode")
    parser.add_argument("--runs", type=positive_int, default=3, help="whole measurements; median and range")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"dsv3_lite from {dsv3_lite.__file__}; transformers {sys.modules['transformers'].__version__}")
    print(f"machine: {machine()}")
    print(f"train step: batch {opts.batch} x {opts.prompt_len + opts.new_tokens} tokens; decode: batch "
          f"{opts.batch}, prompt {opts.prompt_len}, {opts.new_tokens} new tokens; fastest of {opts.reps}")
    for size in opts.sizes:
        print(describe(size))
    runs = []
    for run in range(1, opts.runs + 1):
        rows = []
        for size in opts.sizes:
            r = measure(size, opts)
            rows.append(r)
            print(f"\nrun {run}, {size}: transformers per setting (attention/experts): train ms, decode tok/s")
            for s in SETTINGS:
                train = f"{1e3 * r['train_s'][s]:8.1f}" if s in r["train_s"] else f"{'-':>8s}"
                print(f"  {s:<18s} {train} {opts.batch * opts.new_tokens / r['decode_s'][s]:8.1f}", flush=True)

        print(f"\nrun {run}")
        print(f"{'size':<6s} {'params':>10s} {'train ms':>8s} {'theirs':>7s} {'ratio':>6s}  "
              f"{'decode tok/s':>12s} {'theirs':>7s} {'ratio':>6s}  {'same tokens':>11s}  "
              f"transformers' fastest (train; decode)")
        for r in rows:
            (t_ours, t_hf, t_set), (d_ours, d_hf, d_set) = r["train"], r["decode"]
            print(f"{r['size']:<6s} {r['params']:>10,d} {1e3 * t_ours:>8.1f} {1e3 * t_hf:>7.1f} "
                  f"{t_hf / t_ours:>6.2f}  {d_ours:>12.1f} {d_hf:>7.1f} {d_ours / d_hf:>6.2f}  "
                  f"{str(r['same']):>11s}  {t_set}; {d_set}")
        runs.append(rows)
    print("(train ms and decode tok/s: ours, then theirs; ratio = theirs' time / ours, > 1: ours is faster)")
    print(f"\nratio theirs / ours, median [min, max] over {opts.runs} run(s) ({machine()})")
    for i, size in enumerate(opts.sizes):
        train = [rows[i]["train"][1] / rows[i]["train"][0] for rows in runs]
        decode = [rows[i]["decode"][0] / rows[i]["decode"][1] for rows in runs]
        print(f"  {size:<6s} train step {spread(train)}; decoding {spread(decode)}")
    if not all(r["same"] for rows in runs for r in rows):
        print("greedy tokens differ between dsv3_lite and transformers", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
