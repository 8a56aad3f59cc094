"""The whole DeepSeek-V3 model: embedding, blocks of MLA + DeepSeekMoE, final norm, output head, MTP modules.

    tokens -> Emb -> n_layers x Block (dense FFN in the first n_dense_layers, MoE after) -> RMSNorm -> h^0
    h^0 -> head -> next-token logits;   h^0 -> MTP modules 1..D -> logits of the tokens further ahead

Training uses `Transformer.loss` (main cross-entropy + lambda-weighted MTP loss + the MoE balance losses).
Inference uses only the main model (the MTP modules can be dropped, report 2.2) or lets them draft tokens
for speculative decoding (`dsv3_lite.generate`).

Cached decoding: `allocate_cache(batch_size)` gives every attention layer its KV cache; then
`forward(tokens, start_pos)` processes tokens at positions start_pos.. and attends over everything cached
before them. Without a cache, forward is the plain causal pass used for training.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lite.block import Block
from dsv3_lite.config import ModelArgs
from dsv3_lite.mla import CachedAttention
from dsv3_lite.moe import MoE
from dsv3_lite.mtp import MTPModule, mtp_chain, mtp_loss
from dsv3_lite.norm import RMSNorm


class LossParts(NamedTuple):
    """The training objective and its parts (scalars): total = main + mtp + balance."""

    total: torch.Tensor
    main: torch.Tensor           # next-token cross-entropy of the main model
    mtp: torch.Tensor            # L_MTP = (lambda / D) sum_k L^k (0 when lambda or D is 0)
    mtp_depths: list[torch.Tensor]  # each depth's mean cross-entropy over its T - k predictions (detached)
    balance: torch.Tensor        # the MoE layers' sequence-wise / auxiliary balance losses


class Transformer(nn.Module):
    """DeepSeek-V3: `model(tokens)` -> logits (batch, seq, vocab). Module names follow DeepSeek's reference
    implementation (embed, layers, norm, head); `mtp` holds the D = `args.mtp_depth` MTP modules."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, moe=i >= args.n_dense_layers) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, mean=0.0, std=args.init_std)
        nn.init.normal_(self.head.weight, mean=0.0, std=args.init_std)
        # Built last, so a model with MTP draws the same main-model weights from a seed as one without.
        self.mtp = nn.ModuleList(MTPModule(args, self.embed, self.head) for _ in range(args.mtp_depth))

    # ---------------------------------------------------------------------------------------- forward
    def check_tokens(self, tokens: torch.Tensor, start_pos: int = 0, name: str = "tokens") -> None:
        """Raise a clear TypeError / ValueError for token ids (`name`: tokens or targets) the model cannot use."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got {tokens.dtype}")
        if tokens.device != self.embed.weight.device:
            raise ValueError(f"{name} are on {tokens.device} but the model is on {self.embed.weight.device}")
        if tokens.ndim != 2 or 0 in tokens.shape:
            raise ValueError(f"{name} must have shape (batch, seq_len) with batch >= 1 and seq_len >= 1, "
                             f"got {tuple(tokens.shape)}")
        if start_pos < 0 or start_pos + tokens.shape[1] > self.args.max_seq_len:
            raise ValueError(f"positions start_pos .. start_pos + seq_len ({start_pos} .. {start_pos + tokens.shape[1]})"
                             f" must lie in [0, max_seq_len ({self.args.max_seq_len})]")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.args.vocab_size:
            raise ValueError(f"{name}: token ids must be in [0, vocab_size ({self.args.vocab_size})), "
                             f"got ids in [{low}, {high}]")

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """h^0 (B, S, dim): the final RMSNorm's output, which the head reads and MTP depth 1 starts from."""
        self.check_tokens(tokens, start_pos)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, start_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Next-token logits (B, S, vocab_size) for tokens (B, S) at positions start_pos .. start_pos + S - 1."""
        return self.head(self.hidden_states(tokens, start_pos))

    # ----------------------------------------------------------------------------------------- training
    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, mtp_lambda: float = 0.0) -> LossParts:
        """Main cross-entropy + L_MTP (weight `mtp_lambda`; report: 0.3, then 0.1) + MoE balance losses.

        tokens t_0 .. t_{T-1} and targets t_1 .. t_T, both (B, T), as `Corpus.batch` returns them.
        """
        self.check_tokens(targets, name="targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        targets = targets.long()
        if mtp_lambda < 0:
            raise ValueError(f"mtp_lambda ({mtp_lambda}) must be >= 0")
        h = self.hidden_states(tokens)
        main = F.cross_entropy(self.head(h).flatten(0, 1).float(), targets.flatten())
        zero = main.new_zeros(())
        l_mtp, depths = zero, []
        run_mtp = mtp_lambda > 0 and len(self.mtp) > 0
        if run_mtp:
            l_mtp, depths = mtp_loss(mtp_chain(self.mtp, h, tokens), targets, mtp_lambda)
        # Only the layers that ran in this call: a skipped MTP module still holds its previous step's loss.
        balance = sum((m.aux_loss for m in self.moe_layers(mtp=run_mtp) if self.training), zero)
        return LossParts(main + l_mtp + balance, main, l_mtp, depths, balance)

    def moe_layers(self, mtp: bool = True) -> list[MoE]:
        """The DeepSeekMoE layers of the main blocks, and those of the MTP modules if `mtp`."""
        parts = [self.layers, self.mtp] if mtp else [self.layers]
        return [m for part in parts for m in part.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing step for every MoE layer (call after each optimizer step)."""
        for moe in self.moe_layers():
            moe.update_bias()

    # ------------------------------------------------------------------------------------------ caching
    def allocate_cache(self, batch_size: int) -> None:
        """Give every attention layer (main blocks and MTP blocks) a KV cache for `batch_size` sequences."""
        for module in self.modules():
            if isinstance(module, CachedAttention):
                module.allocate_cache(batch_size)

    def free_cache(self) -> None:
        for module in self.modules():
            if isinstance(module, CachedAttention):
                module.free_cache()

    # ----------------------------------------------------------------------------------------- counting
    def num_params(self, mtp: bool = False) -> int:
        """Parameters of the main model (what `ModelArgs.num_params` counts), plus the MTP modules' unique
        ones if `mtp` (the shared embedding and head are counted once)."""
        return sum(p.numel() for name, p in self.named_parameters() if mtp or not name.startswith("mtp."))


class TrainingLoss:
    """`loss_fn` for `dsv3_lite.train.train_lm`: `Transformer.loss` with a fixed lambda, keeping the history
    of each part (main, L^1 .. L^D) so a chapter can plot them."""

    def __init__(self, mtp_lambda: float = 0.0):
        self.mtp_lambda = mtp_lambda
        self.main: list[float] = []
        self.mtp_depths: list[list[float]] = []

    def __call__(self, model: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = model.loss(tokens, targets, self.mtp_lambda)
        self.main.append(parts.main.item())
        self.mtp_depths.append([d.item() for d in parts.mtp_depths])
        return parts.total


__all__ = ["RMSNorm", "Block", "MTPModule", "Transformer", "LossParts", "TrainingLoss"]
