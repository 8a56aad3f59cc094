"""The answers to the chapters' graded exercises, in plain form: the instructor's key.

`python tools/course.py --write-key` turns them into dsv3_lite/exercise_key.json, which holds digests
only; the chapters' self-checks compare with that. Where the package computes an answer directly it is
computed here, independently of the chapter's worked solution; the rest are the values the worked
solutions produce (the course kit's autograder runs those solutions and must give them full marks, and
tests/test_exercises.py recomputes what it can). `traps` name known wrong answers with a hint that tells
the student what is off.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from dsv3_lite import ModelArgs
from dsv3_lite.checkpoint import BOOK_CHECKPOINT
from dsv3_lite.fp8 import act_dequant, act_quant, limited_accumulation_matmul
from dsv3_lite.moe import balance_loss
from dsv3_lite.pipeline import Costs, Op, OverlapCosts, build, exposed_communication, overlap_pair, simulate


@dataclasses.dataclass(frozen=True)
class Answer:
    value: Any
    rel_tol: float = 1e-3          # numbers within this relative distance are correct
    traps: dict[str, Any] = dataclasses.field(default_factory=dict)   # hint -> wrong answer


V3 = ModelArgs.deepseek_v3()


def _fp8_answers() -> tuple[float, float, float]:
    """Chapter 5, exercises 2-4, on the inputs their cells build."""
    x2 = torch.randn(64, 1024, generator=torch.Generator().manual_seed(2))
    error = {pow2: (act_dequant(*act_quant(x2, pow2_scale=pow2)) - x2).norm() for pow2 in (False, True)}
    g3 = torch.Generator().manual_seed(3)
    a3, _ = act_quant(torch.rand(16, 4096, generator=g3))
    b3, _ = act_quant(torch.rand(16, 4096, generator=g3))
    exact = a3.double() @ b3.double().T
    limited = limited_accumulation_matmul(a3, b3, promote_every=512, mma_k=32).double()
    x4 = torch.randn(256, 512, generator=torch.Generator().manual_seed(4))
    back = act_dequant(*act_quant(x4))
    again = act_dequant(*act_quant(back.T.contiguous()))
    return ((error[True] / error[False]).item(), ((limited - exact).abs() / exact).max().item(),
            (again != back.T).float().mean().item())


def _all_forwards_first(n_ranks: int, n_micro_batches: int):
    """GPipe's order on 1F1B's placement: every forward, then every backward."""
    ranks = [[Op("F", j, r) for j in range(n_micro_batches)] + [Op("B", j, r) for j in range(n_micro_batches)]
             for r in range(n_ranks)]
    return build("1F1B", n_ranks, n_micro_batches).with_ranks(ranks)


def _limited_sets(n_groups: int = 8, per_group: int = 32, k: int = 8, limit: int = 4) -> int:
    """Chapter 3, exercise 1: sets of k experts that touch at most `limit` of the groups (inclusion-
    exclusion over the groups each set touches)."""
    def onto(j: int) -> int:  # k-sets within j given groups that touch each of them
        return sum((-1) ** i * math.comb(j, i) * math.comb(per_group * (j - i), k) for i in range(j + 1))
    return sum(math.comb(n_groups, j) * onto(j) for j in range(1, limit + 1))


def _sequence_balance_loss() -> float:
    """Chapter 3, exercise 4: the sequence-wise balance loss of the exercise's scores."""
    torch.manual_seed(4)
    scores = torch.rand(3 * 8, 16)
    return balance_loss(scores, scores.topk(4, dim=-1).indices, n_sequences=3).item()


def _merged_l() -> float:
    """Chapter 9, exercise 2: head 0's softmax denominator over the chapter's 150 cached positions."""
    tiny = ModelArgs.tiny()
    g = torch.Generator().manual_seed(3)
    q_latent, q_pe, kv, pe = (torch.randn(shape, generator=g) for shape in (
        (tiny.n_heads, tiny.kv_lora_rank), (tiny.n_heads, tiny.qk_rope_head_dim),
        (150, tiny.kv_lora_rank), (150, tiny.qk_rope_head_dim)))
    s0 = (torch.cat([q_latent, q_pe], dim=1) * 0.3 @ torch.cat([kv, pe], dim=1).T)[0]
    return torch.exp(s0 - s0.max()).sum().item()


ROUTED = [23, 0, 5, 17, 1, 0, 9, 31, 2, 0, 12, 4, 0, 3, 20, 1]  # chapter 9's tokens per expert
FP8_2, FP8_3, FP8_4 = _fp8_answers()
ONE_F_ONE_B = simulate(build("1F1B", 16, 64), Costs(1, 2, 1))
GPIPE = simulate(_all_forwards_first(4, 8), Costs(f=1, b=2, w=1))
SKEWED = OverlapCosts(attn=1.6, mlp=0.4, dispatch=1, combine=1, pp=0.2)
DUALPIPE_4_8 = {f"rank {r} slot {i}": str(slot)  # chapter 6, exercise 6: the package's schedule
                for r, slots in enumerate(build("DualPipe", 4, 8).ranks) for i, slot in enumerate(slots)}

ANSWERS = {
    # 1: DeepSeek-V3 at a glance
    "1.1": Answer(V3.block_params(moe=True), rel_tol=0),
    "1.2": Answer(V3.replace(n_activated_experts=16).num_activated_params(include_embedding=False) / 1e9,
                  traps={"count as the chapter does, without the input embedding":
                         V3.replace(n_activated_experts=16).num_activated_params() / 1e9}),
    "1.3": Answer(ModelArgs.deepseek_v3(n_layers=27).kv_cache_bytes_per_token(), rel_tol=0),
    "1.4": Answer(80e9 // (2 * 8 * 128 * 64 * 2), rel_tol=0,
                  traps={"a factor of 2 is missing: a key and a value per head, 2 bytes each in BF16":
                         80e9 // (8 * 128 * 64 * 2)}),
    # 2: Multi-head Latent Attention
    "2.1": Answer((512 + 64) * 60 * 2, rel_tol=0),  # DeepSeek-V2: 60 layers
    "2.2": Answer(10, rel_tol=0),
    "2.3": Answer(V3.dim * V3.n_heads * V3.kv_lora_rank / 1e6),
    # a check fails when it returns False; None means it could not run (the question says so)
    "2.4a": Answer({"cache"}),
    "2.4b": Answer({"cache", "weights"},
                   traps={"a check that returns None could not run: it has not failed":
                          {"cache", "weights", "output"}}),
    # 3: DeepSeekMoE
    "3.1": Answer(_limited_sets(), rel_tol=0),
    "3.2": Answer({1, 3},
                  traps={"an expert exactly at the mean load keeps its bias (sign(0) = 0)": {1, 2, 3}}),
    "3.3": Answer(50 / 25 - 1),
    "3.4": Answer(_sequence_balance_loss()),
    "3.5": Answer({4}),
    # 4: Multi-Token Prediction and speculative decoding
    "4.1": Answer(1 + 0.85 + 0.85**2),
    # emitted with probability min(p, q) + (1 - sum min(p, q)) p: 0.05 + 0.45 * 0.35
    "4.2": Answer(0.05 + 0.45 * 0.35, rel_tol=0.02),   # a histogram of 200,000 draws is close enough
    "4.3": Answer(0.3 + 0.3 + 0.1, rel_tol=0.01),       # so is the rate over 100,000 verified drafts
    # the MTP chain fed its own argmax: it still never reads t_(i+k), and never sees t_(i+k+1)
    "4.4": Answer({"reads t_(i+k)": False, "never sees t_(i+k+1)": True}),
    # 5: FP8 training
    "5.1": Answer(1000 / 448 * 2.0**-6),
    "5.2": Answer(FP8_2, rel_tol=0.005,  # "about 1.03", as the solution rounds it, is right
                  traps={"power-of-two scales do change the error: compare the two norms": 1.0}),
    "5.3": Answer(FP8_3),
    "5.4": Answer(FP8_4),
    # 6: DualPipe
    "6.1": Answer(max(ONE_F_ONE_B.bubble) / ONE_F_ONE_B.makespan,
                  traps={"that is the bubble over the compute time; the question asks for its share "
                                "of the whole step": 15 / 64}),
    "6.2": Answer((max(GPIPE.bubble), GPIPE.peak_activations[0])),
    "6.3": Answer(exposed_communication(overlap_pair(SKEWED, n_layers=10)) / 10),
    "6.6": Answer(DUALPIPE_4_8),
    # 7: Training the whole model
    # the batch grows linearly in the tokens seen: steps = T / (4096 (b1 - b0)) ln(b1 / b0)
    "7.1": Answer(469e9 / (4096 * (15360 - 3072)) * math.log(15360 / 3072), rel_tol=0.02,
                  traps={"that batch grows linearly per step; this one grows linearly with the tokens seen, "
                         "so its small batches last longer": 469e9 / ((3072 + 15360) / 2 * 4096)}),
    "7.2": Answer(1_971_200, rel_tol=0),  # the chapter's RUN over 1,000 steps, as its solution prints
    "7.3": Answer(False),
    # 8: Inference
    "8.1": Answer(2 / 3600 / 1000 * 1e6, rel_tol=0.01),
    "8.2": Answer(1, rel_tol=0),  # the book's checkpoint, sampled with seed 0: its solution's count
    "8.3": Answer(sum(p.stat().st_size for p in BOOK_CHECKPOINT.iterdir()) / V3.kv_cache_bytes_per_token(),
                  rel_tol=0.01),
    # 9: GPU-path kernels in Triton (values of the chapter's own inputs, as its solutions compute them)
    "9.1": Answer(1 - sum(ROUTED) / (64 * sum(math.ceil(n / 64) for n in ROUTED))),
    "9.2": Answer(_merged_l()),
    # the default split count is ceil(1000 / 256) = 4: 4 split programs per sequence, one combine per head
    "9.3a": Answer(2 * math.ceil(1000 / 256) + 2 * 16, rel_tol=0),
    "9.3b": Answer(math.ceil(math.ceil(1000 / 4) / 32), rel_tol=0),
    # H800: 1,979 TFLOP/s FP8 and 3.35 TB/s; a token's expert GEMM does 2 FLOPs per FP8 weight byte
    "9.4": Answer(math.ceil(1979e12 / 3.35e12 / 2), rel_tol=0),
    # V3's hidden size in a block of the next power of two: masked lanes / lanes
    "9.5": Answer(1 - V3.dim / 2 ** math.ceil(math.log2(V3.dim)),
                  traps={"that is the share of real lanes; the question asks for the masked ones":
                         V3.dim / 2 ** math.ceil(math.log2(V3.dim))}),
}
