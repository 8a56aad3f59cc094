"""DeepSeekMoE: routing against a brute-force reference, dispatch against a per-token loop, balancing,
and parity with transformers' DeepseekV3MoE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3_lite.config import ModelArgs
from dsv3_lite.moe import (MLP, Experts, Gate, MoE, Routing, balance_loss, expert_load, grouped_linear,
                           groups_touched, max_violation)


def small_args(**overrides) -> ModelArgs:
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=12, n_shared_experts=1, n_activated_experts=3,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5, init_std=0.2)
    base.update(overrides)
    return ModelArgs.tiny(**base)


def random_moe(args: ModelArgs, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(args)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, args.init_std)
        moe.gate.bias.normal_(0.0, 0.1)
    return moe


def brute_force_route(gate: Gate, x: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    """Per token in plain Python: group scores, eligible experts, top-K by biased score, weights."""
    scores = F.linear(x.double(), gate.weight.double())
    scores = scores.sigmoid() if gate.score_func == "sigmoid" else scores.softmax(-1)
    size = gate.n_experts // gate.n_groups
    all_indices, all_weights = [], []
    for s in scores.tolist():
        biased = [si + bi for si, bi in zip(s, gate.bias.tolist())]
        best = 1 if gate.score_func == "softmax" else 2  # V2 ranks groups by their best expert, V3 by the top 2
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:best])
                       for g in range(gate.n_groups)]
        groups = sorted(range(gate.n_groups), key=lambda g: -group_score[g])[:gate.topk_groups]
        eligible = [e for e in range(gate.n_experts) if e // size in groups]
        chosen = sorted(eligible, key=lambda e: -biased[e])[:gate.topk]
        raw = [s[e] for e in chosen]
        total = sum(raw) if gate.score_func == "sigmoid" else 1.0
        all_indices.append(chosen)
        all_weights.append([gate.route_scale * r / total for r in raw])
    return all_indices, all_weights


# ------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("groups,limit", [(4, 2), (4, 4), (1, 1), (6, 1)])
def test_routing_matches_brute_force(score_func, groups, limit):
    args = small_args(score_func=score_func, n_expert_groups=groups, n_limited_groups=limit,
                      n_activated_experts=2)
    gate = random_moe(args).gate
    x = torch.randn(64, args.dim)
    weights, indices, _ = gate(x)
    ref_indices, ref_weights = brute_force_route(gate, x)
    assert indices.tolist() == ref_indices
    torch.testing.assert_close(weights, torch.tensor(ref_weights, dtype=torch.float32))


def test_no_token_routes_outside_its_groups():
    args = small_args(n_routed_experts=32, n_expert_groups=8, n_limited_groups=3, n_activated_experts=6)
    gate = random_moe(args).gate
    x = torch.randn(512, args.dim)
    _, indices, scores = gate(x)
    biased = (scores + gate.bias).view(512, 8, 4)
    kept = biased.topk(2, dim=-1).values.sum(-1).topk(3, dim=-1).indices
    assert torch.isin(indices // 4, kept).all()
    touched = groups_touched(indices, 32, 8)
    assert touched.max().item() <= 3
    # Without the limit, tokens do spread over more groups.
    free = Gate(args.replace(n_limited_groups=8))
    free.load_state_dict(gate.state_dict())
    assert groups_touched(free(x).indices, 32, 8).float().mean() > touched.float().mean()


def test_bias_changes_choice_but_never_the_weights():
    args = small_args(n_expert_groups=1, n_limited_groups=1)
    gate = random_moe(args).gate
    x = torch.randn(256, args.dim)
    with torch.no_grad():
        gate.bias.zero_()
    before = gate(x)
    with torch.no_grad():
        gate.bias[0] = 10.0  # expert 0 now wins every selection
    after = gate(x)
    assert (after.indices == 0).any(dim=-1).all()
    assert not torch.equal(before.indices, after.indices)
    torch.testing.assert_close(after.scores, before.scores)
    raw = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.weights, args.route_scale * raw / raw.sum(-1, keepdim=True))
    # A bias shared by all experts changes nothing at all.
    with torch.no_grad():
        gate.bias.fill_(3.0)
    shifted = gate(x)
    assert torch.equal(shifted.indices, before.indices)
    torch.testing.assert_close(shifted.weights, before.weights)


# ----------------------------------------------------------------------------------------------- dispatch
def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    weights, indices, _ = moe.gate(tokens)
    rows = []
    for t in range(tokens.shape[0]):
        y = moe.shared_experts(tokens[t]) if moe.shared_experts is not None else torch.zeros_like(tokens[t])
        for w, e in zip(weights[t], indices[t]):
            y = y + w * moe.experts[int(e)](tokens[t])
        rows.append(y)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_moe_matches_per_token_reference(n_shared):
    moe = random_moe(small_args(n_shared_experts=n_shared))
    x = torch.randn(3, 10, moe.args.dim)
    torch.testing.assert_close(moe(x)[0], dense_reference(moe, x))


def test_shared_experts_always_applied():
    moe = random_moe(small_args())
    with torch.no_grad():
        moe.experts.w2.zero_()
    x = torch.randn(2, 7, moe.args.dim)
    shared = moe.shared_experts(x)
    assert shared.abs().min() > 0
    torch.testing.assert_close(moe(x)[0], shared)


def test_backward_reaches_gate_experts_and_shared():
    moe = random_moe(small_args(seq_aux_alpha=0.01))
    moe.train()
    x = torch.randn(2, 16, moe.args.dim, requires_grad=True)
    out, routing = moe(x)
    (out.square().sum() + moe.balance_loss(routing, n_sequences=2)).backward()
    assert x.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.shared_experts.w1.weight.grad.abs().sum() > 0
    used = expert_load(routing.indices, moe.args.n_routed_experts) > 0
    for j, hit in enumerate(used.tolist()):  # an expert without tokens gets a zero gradient
        assert bool(moe.experts.w13.grad[j].abs().sum() > 0) == hit
    assert moe.gate.bias.grad is None and not moe.gate.bias.requires_grad


def test_gradients_match_per_token_reference():
    moe = random_moe(small_args())
    x = torch.randn(2, 5, moe.args.dim)
    moe(x)[0].sum().backward()
    fast = [p.grad.clone() for p in moe.parameters() if p.requires_grad]
    moe.zero_grad()
    dense_reference(moe, x).sum().backward()
    for g, p in zip(fast, (p for p in moe.parameters() if p.requires_grad)):
        torch.testing.assert_close(g, p.grad)


def test_parameter_count_and_init():
    for args in [small_args(), ModelArgs.tiny(), small_args(n_shared_experts=0), small_args(n_shared_experts=2)]:
        moe = MoE(args)
        assert sum(p.numel() for p in moe.parameters()) == args.moe_params()
    moe = MoE(small_args(n_routed_experts=64, n_expert_groups=8, dim=64))
    # on its own, the router takes nn.Linear's default init (U(-1/sqrt(dim), 1/sqrt(dim))), like the experts
    assert moe.gate.weight.abs().max() <= 64 ** -0.5 and moe.gate.weight.std() > 0.5 * (3 * 64) ** -0.5
    assert torch.equal(moe.gate.bias, torch.zeros(64))


def test_forward_leaves_no_state_behind():
    moe = random_moe(small_args()).train()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    attributes = set(vars(moe))
    moe(torch.randn(2, 8, moe.args.dim))
    assert set(vars(moe)) == attributes and set(moe.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())


def test_experts_without_tokens_do_not_run():
    moe = random_moe(small_args(n_expert_groups=1, n_limited_groups=1))
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[[2, 5, 7]] = 100.0  # every token picks experts 2, 5 and 7
    moe(torch.randn(2, 6, moe.args.dim))[0].sum().backward()
    grads = [moe.experts.w13.grad, moe.experts.w2.grad]
    assert [j for j in range(len(moe.experts)) if any(g[j].abs().sum() > 0 for g in grads)] == [2, 5, 7]


def test_grouped_experts_equal_one_mlp_per_expert():
    torch.manual_seed(0)
    experts = Experts(5, 6, 4)
    counts = torch.tensor([3, 0, 2, 4, 1])
    x = torch.randn(10, 6)
    per_expert = []
    for j, xj in enumerate(x.split(counts.tolist())):
        mlp = MLP(6, 4)
        with torch.no_grad():
            mlp.w1.weight.copy_(experts.w1[j]), mlp.w2.weight.copy_(experts.w2[j]), mlp.w3.weight.copy_(experts.w3[j])
        per_expert.append(mlp(xj))
        torch.testing.assert_close(experts[j](xj), per_expert[-1])
    torch.testing.assert_close(experts(x, counts), torch.cat(per_expert))
    # a gate weight per row scales that row's output (applied before w2, which is linear)
    w = torch.rand(10)
    torch.testing.assert_close(experts(x, counts, w), torch.cat(per_expert) * w[:, None])
    for width in (6, 8):  # rows of 24 bytes take the loop, of 32 bytes the grouped kernel
        x, weight = torch.randn(10, width), torch.randn(5, width, width)
        loop = torch.cat([xj @ wj.T for xj, wj in zip(x.split(counts.tolist()), weight)])
        torch.testing.assert_close(grouped_linear(x, weight, counts), loop)
    with pytest.raises(IndexError, match="expert 5 does not exist: there are 5"):
        experts[5]


def test_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = MLP(6, 10)
    x = torch.randn(4, 6)
    ref = (F.silu(x @ mlp.w1.weight.T) * (x @ mlp.w3.weight.T)) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), ref)


def test_wrong_input_shape_raises():
    moe = MoE(small_args())
    with pytest.raises(ValueError, match="batch, seq_len"):
        moe(torch.randn(5, moe.args.dim))
    with pytest.raises(ValueError, match="batch, seq_len"):
        moe(torch.randn(1, 5, moe.args.dim + 1))


# -------------------------------------------------------------------------------------------- balancing
def test_update_bias_moves_towards_balance():
    moe = MoE(small_args(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1,
                         bias_update_speed=0.01))
    moe.update_bias(torch.tensor([10, 2, 5, 3]))  # mean 5: expert 0 overloaded, 1 and 3 under, 2 exact
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    moe.update_bias(torch.zeros(4, dtype=torch.long), gamma=0.5)  # a layer that saw no token keeps its bias
    torch.testing.assert_close(moe.gate.bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    with pytest.raises(ValueError, match=r"one count per routed expert \(4,\)"):
        moe.update_bias(torch.zeros(5))


def test_bias_update_needs_an_fp32_bias():
    moe = MoE(small_args(bias_update_speed=0.001)).to(torch.bfloat16)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    assert moe(x)[0].dtype == torch.bfloat16  # a cast model still runs (gating in FP32)
    with pytest.raises(TypeError, match=r"gate.bias is torch.bfloat16.*autocast"):
        moe.update_bias(torch.tensor([5] + [0] * 11))
    moe = MoE(small_args(bias_update_speed=0.001))
    with torch.no_grad():
        moe.gate.bias.fill_(0.5)  # bf16 steps are 0.002-0.004 here: a 0.001 update would be lost
    moe.update_bias(torch.tensor([5] + [0] * 11))
    assert moe.gate.bias[0].item() == pytest.approx(0.499) and moe.gate.bias[1].item() == pytest.approx(0.501)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = moe(x.float())
    assert routing.scores.dtype == torch.float32  # the router's matmul is kept out of autocast


def test_bias_update_drives_maxvio_down_on_a_skewed_router():
    args = small_args(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=2)
    moe = random_moe(args)
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.weight[:3] += 0.5  # experts 0-2 attract almost every token
    moe.train()
    generator = torch.Generator().manual_seed(0)
    vio = []
    for _ in range(300):
        x = torch.randn(4, 32, args.dim, generator=generator) + 1.0
        with torch.no_grad():
            load = expert_load(moe(x)[1].indices, args.n_routed_experts)
        moe.update_bias(load, gamma=0.01)
        vio.append(max_violation(load))
    start, end = sum(vio[:5]) / 5, sum(vio[-20:]) / 20
    assert start > 2.0
    assert end < 0.25 * start


def test_balance_loss_formula():
    # Two sequences of two tokens, four experts, K = 1.
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0],
                           [0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    indices = torch.tensor([[0], [0], [1], [3]])
    p = scores / scores.sum(-1, keepdim=True)
    # Sequence 1: f = 4/2 * [2,0,0,0]; P = mean of rows 0-1.  Sequence 2: f = 2 * [0,1,0,1].
    seq1 = (2 * torch.tensor([2.0, 0, 0, 0]) * p[:2].mean(0)).sum()
    seq2 = (2 * torch.tensor([0.0, 1, 0, 1]) * p[2:].mean(0)).sum()
    torch.testing.assert_close(balance_loss(scores, indices, n_sequences=2), (seq1 + seq2) / 2)
    whole = (1 * torch.tensor([2.0, 1, 0, 1]) * p.mean(0)).sum()
    torch.testing.assert_close(balance_loss(scores, indices), whole)
    # Perfectly uniform routing and affinities give exactly 1.
    uniform = torch.ones(4, 4)
    torch.testing.assert_close(balance_loss(uniform, torch.tensor([[0], [1], [2], [3]])), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"n_sequences \(3\) equal sequences"):
        balance_loss(scores, indices, n_sequences=3)
    with pytest.raises(ValueError, match=r"must cover the same tokens"):
        balance_loss(scores, indices[:3])


def test_balance_loss_weighs_the_sequence_wise_and_batch_wise_losses():
    # Two sequences of two tokens, four experts, K = 1; each row of scores already sums to 1.
    args = small_args(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1)
    scores = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]])
    routing = Routing(torch.ones(4, 1), torch.tensor([[0], [1], [2], [0]]), scores)
    # sequence-wise: f = 4/(1*2) * counts per sequence; P = the sequence's mean normalized score
    seq = (2 * (0.6 + 0.5) / 2 + 2 * (0.2 + 0.5) / 2 + 2 * (0.1 + 0.25) / 2 + 2 * (0.4 + 0.25) / 2) / 2
    # batch-wise: f = 4/(1*4) * counts over the batch, P = the batch's mean normalized score
    batch = 2 * (0.6 + 0.5 + 0.1 + 0.25) / 4 + 1 * (0.2 + 0.5 + 0.1 + 0.25) / 4 + 1 * (0.1 + 0.4 + 0.25) / 4
    for seq_alpha, aux_alpha in [(0.0, 0.0), (0.001, 0.0), (0.0, 0.01), (0.001, 0.01)]:
        moe = MoE(args.replace(seq_aux_alpha=seq_alpha, aux_loss_alpha=aux_alpha))
        loss = moe.balance_loss(routing, n_sequences=2)
        assert loss.dim() == 0 and loss.item() == pytest.approx(seq_alpha * seq + aux_alpha * batch)


def test_statistics():
    assert max_violation(torch.tensor([5, 5, 5, 5])) == 0.0
    assert max_violation(torch.tensor([10, 2, 4, 4])) == pytest.approx(1.0)
    indices = torch.tensor([[0, 1], [0, 5], [7, 2]])  # 8 experts in 4 groups of 2
    assert groups_touched(indices, 8, 4).tolist() == [1, 2, 2]
    assert expert_load(indices, 8).tolist() == [2, 1, 1, 0, 0, 1, 0, 1]


# ----------------------------------------------------------------------------------------------- config
def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"n_activated_experts \(9\) must be <= n_routed_experts \(8\)"):
        ModelArgs.tiny(n_routed_experts=8, n_expert_groups=1, n_limited_groups=1, n_activated_experts=9)
    with pytest.raises(ValueError, match=r"n_routed_experts \(10\) must be divisible by n_expert_groups \(4\)"):
        ModelArgs.tiny(n_routed_experts=10, n_expert_groups=4)
    with pytest.raises(ValueError, match=r"n_activated_experts \(5\) must be <= the experts in n_limited_groups"):
        ModelArgs.tiny(n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=5)
    with pytest.raises(ValueError, match="n_limited_groups"):
        ModelArgs.tiny(n_expert_groups=4, n_limited_groups=5)
    with pytest.raises(ValueError, match="score_func"):
        ModelArgs.tiny(score_func="relu")


# ----------------------------------------------------------------------------------------------- parity
def test_parity_with_transformers_deepseek_v3_moe():
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    args = small_args(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4,
                      n_shared_experts=1, route_scale=2.5)
    moe = random_moe(args, seed=3)
    config = DeepseekV3Config(
        hidden_size=args.dim, moe_intermediate_size=args.moe_inter_dim, intermediate_size=4 * args.dim,
        n_routed_experts=args.n_routed_experts, n_shared_experts=args.n_shared_experts,
        num_experts_per_tok=args.n_activated_experts, n_group=args.n_expert_groups,
        topk_group=args.n_limited_groups, routed_scaling_factor=args.route_scale, norm_topk_prob=True,
        hidden_act="silu", num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    peer = modeling.DeepseekV3MoE(config).float().eval()
    with torch.no_grad():
        peer.gate.weight.copy_(moe.gate.weight)
        peer.gate.e_score_correction_bias.copy_(moe.gate.bias)
        peer.experts.gate_up_proj.copy_(moe.experts.w13)
        peer.experts.down_proj.copy_(moe.experts.w2)
        peer.shared_experts.gate_proj.weight.copy_(moe.shared_experts.w1.weight)
        peer.shared_experts.up_proj.weight.copy_(moe.shared_experts.w3.weight)
        peer.shared_experts.down_proj.weight.copy_(moe.shared_experts.w2.weight)
    assert moe.gate.bias.abs().min() > 0
    x = torch.randn(2, 24, args.dim)
    with torch.no_grad():
        _, peer_weights, peer_indices = peer.gate(x)
        ours = moe.gate(x.view(-1, args.dim))
        assert torch.equal(peer_indices.sort(-1).values, ours.indices.sort(-1).values)
        assert groups_touched(ours.indices, 16, 4).max() <= 2
        ours_out, peer_out = moe(x)[0], peer(x)
    print(f"max |MoE - DeepseekV3MoE| = {(ours_out - peer_out).abs().max().item():.2e}")  # shown by `pytest -rP`
    torch.testing.assert_close(ours_out, peer_out, atol=1e-5, rtol=1e-5)
