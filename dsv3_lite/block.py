"""One Transformer block of DeepSeek-V3: pre-norm MLA attention, then a pre-norm
FFN (report 2.1, Figure 2).

    x = x + MLA(RMSNorm(x))
    x = x + FFN(RMSNorm(x))        FFN: a dense SwiGLU MLP in the first n_dense_layers
                                   blocks, DeepSeekMoE after

The block lives in its own module because two owners build it: the main `Transformer`
stacks n_layers of them, and every MTP module runs one more (`dsv3_lite.mtp`). Both
import it from here, never from each other.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3_lite.config import ModelArgs
from dsv3_lite.mla import MLA
from dsv3_lite.moe import MLP, MoE, Routing
from dsv3_lite.norm import RMSNorm


class Block(nn.Module):
    """Pre-norm residual block: MLA, then a dense SwiGLU FFN (`moe=False`)
    or DeepSeekMoE (`moe=True`).

    The attention owns its KV cache, so a block decodes incrementally once
    `attn.allocate_cache` has run.
    """

    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.attn = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.ffn = (MoE(args) if moe
                    else MLP(args.dim, args.inter_dim, args.fp8, args.kernels))

    def forward(self, x: torch.Tensor, start_pos: int = 0,
                freqs_cis: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Routing | None]:
        """x (B, S, dim) at positions start_pos .. start_pos + S - 1
        (RoPE rows `freqs_cis`, computed by the attention when not given) -> the
        block's output (B, S, dim) and its MoE routing (None if dense)."""
        x = x + self.attn(self.attn_norm(x), start_pos, freqs_cis)
        if isinstance(self.ffn, MoE):
            out, routing = self.ffn(self.ffn_norm(x))
            return x + out, routing
        return x + self.ffn(self.ffn_norm(x)), None


__all__ = ["Block"]
