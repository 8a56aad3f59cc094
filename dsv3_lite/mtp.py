"""Multi-Token Prediction (report 2.2, Figure 3): D sequential modules that
predict tokens further ahead.

At depth k (1 <= k <= D) and position i, module k combines what depth k-1 knew about
position i with the embedding of the token k places ahead, runs one Transformer block,
and predicts the token after that:

    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]      (eq. 21)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                             (eq. 22)
    P^k_{i+k+1} = OutHead(h^k_i)                                  (eq. 23)
    L^k = -(1/T) sum_i log P^k_{i+k+1}[t_{i+k+1}],                (eqs. 24-25)
    L_MTP = (lambda / D) sum_k L^k

h^0 is the main model's final representation. The chain is causal: depth k sees
exactly the tokens up to t_{i+k}, so every prediction stays a proper next-token
prediction one step deeper. Emb and OutHead are the main model's own modules
(the same objects, not copies), so MTP gradients train them too.

Layout details follow DeepSeek's released weights (names `enorm`, `hnorm`, `eh_proj`):
the projection input is [RMSNorm(Emb); RMSNorm(h)] - the report writes the two
halves the other way round, which only permutes the columns of M_k - and `norm`
is the final RMSNorm in front of the shared head, so h^k is what the head reads
(as h^0 is: the main model's output after its final norm).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lite.block import Block
from dsv3_lite.config import ModelArgs
from dsv3_lite.fp8_linear import linear_class
from dsv3_lite.moe import Routing
from dsv3_lite.norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth: two RMSNorms, the 2d -> d projection M_k, one block
    and a final RMSNorm.

    `embed` and `head` are the main model's embedding and output head, held by
    reference; they are registered here too (as DeepSeek's checkpoint stores
    them beside each module) but share storage. Its block is a MoE block whenever
    the main model has MoE layers.
    """

    def __init__(self, args: ModelArgs, embed: nn.Embedding, head: nn.Linear):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.eh_proj = linear_class(args.fp8, args.kernels)(2 * args.dim, args.dim,
                                                            bias=False)
        self.block = Block(args, moe=args.n_moe_layers > 0)
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.embed = embed
        self.head = head

    def forward(self, h_prev: torch.Tensor, tokens: torch.Tensor, start_pos: int = 0,
                freqs_cis: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Routing | None]:
        """h^k (B, S, dim) from h^{k-1} at positions start_pos.. and the tokens k
        places ahead of them, and the routing of its block's MoE (None if dense)."""
        if h_prev.shape[:2] != tokens.shape:
            raise ValueError(f"h_prev {tuple(h_prev.shape)} and tokens "
                             f"{tuple(tokens.shape)} must cover the same "
                             "(batch, positions)")
        x = self.eh_proj(torch.cat(
            [self.enorm(self.embed(tokens)), self.hnorm(h_prev)], dim=-1))
        h, routing = self.block(x, start_pos, freqs_cis)
        return self.norm(h), routing


def mtp_chain(modules: Sequence[MTPModule], h: torch.Tensor, tokens: torch.Tensor,
              freqs_cis: torch.Tensor | None = None
              ) -> tuple[list[torch.Tensor], list[Routing | None]]:
    """Training-time pass through all D depths: logits of depth k for positions
    0 .. T-1-k, and each depth's MoE routing.

    h is the main model's h^0 for tokens t_0 .. t_{T-1} (B, T, dim); depth k reads
    h^{k-1} at positions 0 .. T-1-k and tokens t_k .. t_{T-1}, and its logits at
    position i predict t_{i+k+1}. `freqs_cis`: the RoPE rows of positions 0 .. T-1
    (computed by each module when not given).
    """
    if len(modules) >= tokens.shape[1]:
        raise ValueError(f"sequence length ({tokens.shape[1]}) must exceed the MTP "
                         f"depth ({len(modules)})")
    logits, routings = [], []
    for k, module in enumerate(modules, start=1):
        rows = None if freqs_cis is None else freqs_cis[:tokens.shape[1] - k]
        h, routing = module(h[:, :-1], tokens[:, k:], 0, rows)
        logits.append(module.head(h))
        routings.append(routing)
    return logits, routings


def mtp_loss(logits: Sequence[torch.Tensor], targets: torch.Tensor,
             mtp_lambda: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L_MTP = (lambda / D) sum_k L^k (eq. 25) with L^k the cross-entropy of depth
    k (eq. 24), and each depth's mean cross-entropy over its own T - k predictions
    (detached, for monitoring).

    `targets` are the main model's next-token targets t_1 .. t_T (B, T); depth k is
    scored on t_{k+1} .. t_T. As in eq. 24 each depth's summed log-loss is divided by
    T (the main sequence length), not T - k.
    """
    if not logits:
        raise ValueError("mtp_loss needs the logits of at least one MTP depth")
    total = targets.new_zeros((), dtype=torch.float32)
    depth_means = []
    for k, lg in enumerate(logits, start=1):
        target = targets[:, k:]
        if lg.shape[:2] != target.shape:
            raise ValueError(f"depth {k} logits {tuple(lg.shape)} do not match its "
                             f"targets {tuple(target.shape)}")
        summed = F.cross_entropy(lg.flatten(0, 1).float(), target.flatten(),
                                 reduction="sum")
        total = total + summed
        depth_means.append(summed.detach() / target.numel())
    return mtp_lambda / len(logits) * total / targets.numel(), depth_means


__all__ = ["MTPModule", "mtp_chain", "mtp_loss"]
