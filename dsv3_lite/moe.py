"""DeepSeekMoE with auxiliary-loss-free load balancing (report section 2.1.2).

Every token goes through the shared experts, plus the K_r routed
experts its gate picks:

    h' = u + sum_i FFN_shared_i(u) + sum_j g_j FFN_routed_j(u)        (eq. 12)
    s_j = sigmoid(u . e_j)                                            (eq. 15)
    chosen = top-K_r of s_j + b_j (within the token's best groups)    (eq. 16)
    g_j = s_j / sum_{chosen} s                      (eqs. 13-14), then x route_scale

`route_scale` (2.5 in V3) is not in the report's equations: it comes from DeepSeek's
released config (`routed_scaling_factor`). Normalized sigmoid weights sum to 1 over
the K_r chosen experts, so the routed part of the output would be small next to the
shared expert's; the factor restores its scale.

The bias b steers the choice only; the gating weights use the raw affinities.
After each optimizer step `MoE.update_bias` nudges every b_j by gamma towards
balance (section 2.1.2, "auxiliary-loss-free load balancing"), from the expert
load of that step. A tiny sequence-wise loss (eqs. 17-20) and, for baselines,
a batch-wise auxiliary loss are available through `ModelArgs.seq_aux_alpha`
and `ModelArgs.aux_loss_alpha`.

Nothing here is remembered between calls: `MoE.forward` returns its output and the
gate's `Routing`, from which the caller computes balance losses and expert loads.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3_lite import kernels
from dsv3_lite.config import Kernels, ModelArgs
from dsv3_lite.fp8_linear import fp8_grouped_linear, linear_class


def swiglu(x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor) -> Tensor:
    """The SwiGLU feed-forward network w2 (silu(w1 x) * w3 x): gate, down
    and up projections."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class MLP(nn.Module):
    """SwiGLU feed-forward network: the dense FFN of the first blocks and
    the shared experts."""

    def __init__(self, dim: int, inter_dim: int, fp8: bool = False,
                 kernels: str = "auto"):
        super().__init__()
        linear = linear_class(fp8, kernels)
        self.w1 = linear(dim, inter_dim, bias=False)  # gate projection
        self.w2 = linear(inter_dim, dim, bias=False)  # down projection
        self.w3 = linear(dim, inter_dim, bias=False)  # up projection

    def forward(self, x: Tensor) -> Tensor:
        """`swiglu` with this module's projections."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """x_j @ weight[j]^T for consecutive groups of rows of x, counts[j] rows in
    group j: (T, in) -> (T, out).

    On the CPU one grouped matrix multiply (F.grouped_mm) does every group,
    where its kernel applies: matching dtypes and rows of a multiple of 16 bytes.
    Elsewhere (its GPU kernel takes BF16 only, older torch has none) a loop
    over the groups does the same.
    """
    align = 16 // x.element_size()
    if (x.device.type == "cpu" and hasattr(F, "grouped_mm")
            and x.dtype == weight.dtype and x.shape[1] % align == 0
            and weight.shape[1] % align == 0):
        return F.grouped_mm(x.contiguous(), weight.mT,
                            offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([xj @ wj.T for xj, wj in zip(x.split(counts.tolist()), weight)])


class Experts(nn.Module):
    """The N_r routed experts, SwiGLU networks stored as one tensor per kind of
    projection: w13 (N_r, 2 inter, dim) holds each expert's gate projection w1
    stacked over its up projection w3 (one grouped multiply computes both), and
    w2 (N_r, dim, inter) its down projection: the matrices an `MLP` holds.
    `experts(x, counts)` runs every expert on its own rows at once; `experts[j]` is
    expert j alone, as a function of x. With `fp8` the grouped multiplies are FP8
    GEMMs (`dsv3_lite.fp8_linear.fp8_grouped_linear`); where no gradient is recorded,
    `kernels` (`ModelArgs.kernels`) may run them as one Triton launch."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, fp8: bool = False,
                 kernels: Kernels = "auto"):
        super().__init__()
        self.fp8, self.kernels = fp8, kernels
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's matrices as nn.Linear initialises its own:
        U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w in (self.w13, self.w2):
            nn.init.uniform_(w, -w.shape[-1] ** -0.5, w.shape[-1] ** -0.5)

    @property
    def w1(self) -> Tensor:
        """The gate projections (N_r, inter, dim): the first half of w13's rows."""
        return self.w13[:, :self.w2.shape[-1]]

    @property
    def w3(self) -> Tensor:
        """The up projections (N_r, inter, dim): the second half of w13's rows."""
        return self.w13[:, self.w2.shape[-1]:]

    def __len__(self) -> int:
        return self.w13.shape[0]

    def __getitem__(self, j: int) -> Callable[[Tensor], Tensor]:
        if not -len(self) <= j < len(self):
            raise IndexError(f"expert {j} does not exist: there are {len(self)}")
        return functools.partial(swiglu, w1=self.w1[j], w2=self.w2[j], w3=self.w3[j])

    def forward(self, x: Tensor, counts: Tensor,
                weights: Tensor | None = None) -> Tensor:
        """x (T, dim), its rows grouped by expert, counts[j] rows for
        expert j -> (T, dim); with weights (T,), row t's output times weights[t].

        w2 is linear, so the weight scales each row's hidden vector (inter wide)
        before w2 rather than its output (dim wide): the same product, with
        inter / dim of the multiplications."""
        # under fp8 each expert's GEMMs are FP8 GEMMs, on the FP8 Triton kernels
        # where `kernels` selects them (`fp8_linear.gemm_ops`); the FP32 grouped
        # kernel below would skip the FP8 rounding
        matmul = (functools.partial(fp8_grouped_linear, kernels=self.kernels)
                  if self.fp8 else grouped_linear)
        recording = torch.is_grad_enabled() and (x.requires_grad
                                                 or self.w13.requires_grad)
        if (not self.fp8 and not recording
                and kernels.use_triton(self.kernels, x.device)):
            matmul = kernels.grouped_linear  # forward only
        gate, up = matmul(x, self.w13, counts).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if weights is not None:
            hidden = hidden * weights.unsqueeze(-1).to(hidden.dtype)
        return matmul(hidden, self.w2, counts)


class Routing(NamedTuple):
    """What the gate decides for T tokens."""

    weights: Tensor  # (T, K) gating weights g, from the raw affinities, normalized
                     # and scaled
    indices: Tensor  # (T, K) chosen routed experts
    scores: Tensor   # (T, N_r) raw affinities s (FP32), needed by the balance losses


class Gate(nn.Module):
    """The router: affinities, bias-steered group-limited top-K
    selection, gating weights.

    `weight` is (n_routed_experts, dim); `bias` is the selection bias b of the
    auxiliary-loss-free strategy, an FP32 parameter without gradient that only
    `MoE.update_bias` changes. Its steps (gamma = 0.001) are below BF16's resolution
    near 0.5, so keep the model's parameters in FP32 when training (compute in BF16
    with torch.autocast): `update_bias` refuses a bias of another dtype.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dim = args.dim
        self.n_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.bias = nn.Parameter(
            torch.empty(args.n_routed_experts, dtype=torch.float32),
            requires_grad=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation for the router; a zero bias
        (no expert favoured)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Routing:
        """Route x of shape (T, dim). Gating runs in FP32, as in the report's
        mixed-precision recipe (also under torch.autocast, which would otherwise run
        the router's matmul in lower precision)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        biased = scores + self.bias.float()
        if self.topk_groups < self.n_groups:
            biased = self._mask_groups(biased)
        indices = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            # Sigmoid affinities do not sum to 1; softmax ones already do over
            # all experts (V2 kept them).
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights * self.route_scale, indices, scores)

    def _mask_groups(self, biased: Tensor) -> Tensor:
        """Node-limited routing: score each group by the sum of its top-2 biased
        affinities (V3; with softmax affinities, V2's device-limited routing:
        by its best one), keep the best n_limited_groups groups and set every
        expert outside them to -inf."""
        grouped = biased.view(biased.shape[0], self.n_groups, -1)
        if self.score_func == "softmax":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = (grouped.topk(min(2, grouped.shape[-1]), dim=-1)
                            .values.sum(dim=-1))
        keep = group_scores.topk(self.topk_groups, dim=-1).indices
        dropped = (torch.ones_like(group_scores, dtype=torch.bool)
                   .scatter_(1, keep, False))
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)


class MoE(nn.Module):
    """DeepSeekMoE layer: shared experts on every token plus K_r routed
    experts chosen by the gate.

    Dispatch sorts the (token, expert) pairs by expert, runs every expert on
    its contiguous group of tokens in one grouped matrix multiply per projection
    and scatters the weighted results back; no token is dropped. `forward`
    returns the output and the gate's `Routing`, from which `balance_loss` and
    `expert_load` are computed.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim,
                               args.fp8, args.kernels)
        # The N_s shared experts are fused into one MLP of N_s times the width
        # (same parameters and output).
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, args.fp8,
                args.kernels)
            if args.n_shared_experts else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        """x (B, S, dim) -> the layer's output (B, S, dim) and the routing
        of its B * S tokens."""
        if (x.dim() != 3 or x.shape[-1] != self.args.dim
                or x.shape[0] * x.shape[1] == 0):
            raise ValueError("MoE expects x of shape "
                             f"(batch, seq_len, {self.args.dim}) with at least one "
                             f"token, got {tuple(x.shape)}")
        batch, seq_len, dim = x.shape
        tokens = x.reshape(-1, dim)
        routing = self.gate(tokens)
        out = self._dispatch(tokens, routing.weights, routing.indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        return out.view(batch, seq_len, dim), routing

    def _dispatch(self, tokens: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """Sort the (token, expert) pairs by expert, so that each expert's tokens form
        one contiguous group; run every expert on its group at once; scatter-add the
        weighted results back to their tokens."""
        order = indices.flatten().argsort(stable=True)
        token_of = order // indices.shape[1]
        routed = self.experts(tokens.index_select(0, token_of),
                              expert_load(indices, len(self.experts)),
                              weights.flatten()[order])
        return routed.new_zeros(tokens.shape).index_add_(0, token_of, routed)

    def balance_loss(self, routing: Routing, n_sequences: int) -> Tensor:
        """seq_aux_alpha x the sequence-wise loss over `n_sequences` equal sequences
        (eqs. 17-20) plus aux_loss_alpha x the same loss over the whole batch
        (a batch-wise auxiliary loss, for baselines)."""
        loss = routing.scores.new_zeros(())
        if self.args.seq_aux_alpha > 0:
            loss = loss + self.args.seq_aux_alpha * balance_loss(
                routing.scores, routing.indices, n_sequences)
        if self.args.aux_loss_alpha > 0:
            loss = loss + self.args.aux_loss_alpha * balance_loss(
                routing.scores, routing.indices)
        return loss

    @torch.no_grad()
    def update_bias(self, load: Tensor, gamma: float | None = None) -> None:
        """Auxiliary-loss-free balancing: b_i -= gamma for every overloaded expert
        (more tokens than the mean of `load`, the tokens each expert received in the
        step), b_i += gamma for every underloaded one. Call after each optimizer step;
        gamma defaults to `args.bias_update_speed`."""
        gamma = self.args.bias_update_speed if gamma is None else gamma
        if load.shape != self.gate.bias.shape:
            raise ValueError("load must have one count per routed "
                             f"expert {tuple(self.gate.bias.shape)}, got "
                             f"{tuple(load.shape)}")
        if self.gate.bias.dtype != torch.float32:
            raise TypeError(f"gate.bias is {self.gate.bias.dtype}: steps of gamma "
                            f"({gamma}) need FP32; keep the parameters in FP32 and "
                            "compute in lower precision with torch.autocast")
        load = load.float()
        self.gate.bias.add_(gamma * torch.sign(load.mean() - load))


def balance_loss(scores: Tensor, indices: Tensor, n_sequences: int = 1) -> Tensor:
    """Balance loss sum_i f_i P_i (eqs. 17-20, without alpha), averaged over
    `n_sequences` equal slices.

    f_i = N_r / (K_r T) * (tokens of the slice routed to i) carries no gradient;
    P_i is the mean over the slice of the normalized affinity s_i / sum_j s_j.
    With n_sequences = batch size this is the report's complementary sequence-wise
    loss; with n_sequences = 1 it is the classic expert-level auxiliary loss
    over the whole batch (a batch-wise auxiliary loss, as in Switch Transformer;
    DeepSeek-V2's expert-level loss is the per-sequence form). scores (T_total, N_r),
    indices (T_total, K_r)."""
    n_tokens, n_experts = scores.shape
    k = indices.shape[-1]
    if indices.shape[0] != n_tokens or n_sequences < 1 or n_tokens % n_sequences:
        raise ValueError(f"scores {tuple(scores.shape)} and indices "
                         f"{tuple(indices.shape)} must cover the same tokens, split "
                         f"into n_sequences ({n_sequences}) equal sequences")
    seq_len = n_tokens // n_sequences
    counts = scores.new_zeros(n_sequences, n_experts).scatter_add_(
        1, indices.reshape(n_sequences, -1),
        scores.new_ones(n_sequences, seq_len * k))
    f = counts * (n_experts / (k * seq_len))
    p = ((scores / scores.sum(dim=-1, keepdim=True))
         .view(n_sequences, seq_len, n_experts).mean(dim=1))
    return (f * p).sum(dim=-1).mean()


# ------------------------------------------------------------------------- statistics
def expert_load(indices: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert: a (n_experts,) LongTensor."""
    return torch.bincount(indices.flatten(), minlength=n_experts)


def max_violation(load: Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (0 is perfect balance)."""
    load = load.float()
    return (load.max() / load.mean() - 1).item()


def groups_touched(indices: Tensor, n_experts: int, n_groups: int) -> Tensor:
    """Distinct expert groups (nodes) each token's routed experts live
    in: a (T,) LongTensor."""
    group = indices // (n_experts // n_groups)
    hit = torch.zeros(indices.shape[0], n_groups, dtype=torch.bool,
                      device=indices.device)
    hit.scatter_(1, group, True)
    return hit.sum(dim=-1)


__all__ = ["swiglu", "MLP", "grouped_linear", "Experts", "Gate", "Routing", "MoE",
           "balance_loss", "expert_load", "max_violation", "groups_touched"]
