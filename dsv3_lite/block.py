"""One Transformer block of DeepSeek-V3: pre-norm MLA attention, then a pre-norm FFN (report 2.1, Figure 2).

    x = x + MLA(RMSNorm(x))
    x = x + FFN(RMSNorm(x))        FFN: a dense SwiGLU MLP in the first n_dense_layers blocks, DeepSeekMoE after

The block lives in its own module because two owners build it: the main `Transformer` stacks n_layers of
them, and every MTP module runs one more (`dsv3_lite.mtp`). Both import it from here, never from each other.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3_lite.config import ModelArgs
from dsv3_lite.mla import MLA
from dsv3_lite.moe import MLP, MoE
from dsv3_lite.norm import RMSNorm


class Block(nn.Module):
    """Pre-norm residual block: MLA, then a dense SwiGLU FFN (`moe=False`) or DeepSeekMoE (`moe=True`).

    The attention owns its KV cache, so a block decodes incrementally once `attn.allocate_cache` has run.
    """

    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.ffn = MoE(args) if moe else MLP(args.dim, args.inter_dim)
        if not moe:  # MLA and MoE initialise themselves; the dense FFN takes the same N(0, init_std)
            for linear in (self.ffn.w1, self.ffn.w2, self.ffn.w3):
                nn.init.normal_(linear.weight, mean=0.0, std=args.init_std)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """x (B, S, dim) at positions start_pos .. start_pos + S - 1 -> (B, S, dim)."""
        x = x + self.attn(self.attn_norm(x), start_pos)
        return x + self.ffn(self.ffn_norm(x))


__all__ = ["Block"]
