"""The whole DeepSeek-V3 model: embedding, blocks of MLA + DeepSeekMoE, final
norm, output head, MTP modules.

    tokens -> Emb -> n_layers x Block -> RMSNorm -> h^0
                     (dense FFN in the first n_dense_layers, MoE after)
    h^0 -> head -> next-token logits;
    h^0 -> MTP modules 1..D -> logits of the tokens further ahead

Training uses `Transformer.loss` (main cross-entropy + lambda-weighted MTP loss + the
MoE balance losses), which also returns each MoE layer's expert load for the
auxiliary-loss-free bias update (`Transformer.update_bias`). Inference uses only the
main model (the MTP modules can be dropped, report 2.2) or lets them draft tokens for
speculative decoding (`dsv3_lite.generate`). The RoPE rows of a forward's positions
are computed once per forward and handed to every layer.

Cached decoding: `allocate_cache(batch_size)` gives every attention layer its KV
cache; then `forward(tokens, start_pos)` processes tokens at positions start_pos..
and attends over everything cached before them. Without a cache, forward is the
plain causal pass used for training.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lite.block import Block
from dsv3_lite.config import ModelArgs, check_int, check_number
from dsv3_lite.mla import CachedAttention
from dsv3_lite.moe import Experts, Gate, MoE, Routing, expert_load
from dsv3_lite.mtp import MTPModule, mtp_chain, mtp_loss
from dsv3_lite.norm import RMSNorm
from dsv3_lite.rope import precompute_freqs_cis


class LossParts(NamedTuple):
    """The training objective and its parts: total = main + mtp + balance."""

    total: torch.Tensor
    main: torch.Tensor           # next-token cross-entropy of the main model
    mtp: torch.Tensor            # L_MTP = (lambda / D) sum_k L^k
                                 # (0 when lambda or D is 0)
    mtp_depths: list[torch.Tensor]  # each depth's mean cross-entropy over its
                                    # T - k predictions (detached)
    balance: torch.Tensor        # the MoE layers' sequence-wise / auxiliary
                                 # balance losses
    expert_load: torch.Tensor    # (n MoE layers, n_routed_experts) tokens per
                                 # expert, rows as `moe_layers()`; zero rows for
                                 # the MTP layers when they did not run


class Transformer(nn.Module):
    """DeepSeek-V3: `model(tokens)` -> logits (batch, seq, vocab). Module names follow
    DeepSeek's reference implementation (embed, layers, norm, head); `mtp` holds the
    D = `args.mtp_depth` MTP modules."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        check_fits_in_memory(args)
        self.args = args
        device = torch.get_default_device()
        # Built on the meta device, then materialised: the modules' own default
        # initialisation, which init_weights replaces anyway, costs no time and draws
        # nothing from the seed's random stream.
        with torch.device("meta"):
            self.embed = nn.Embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(Block(args, moe=i >= args.n_dense_layers)
                                        for i in range(args.n_layers))
            self.norm = RMSNorm(args.dim, args.rms_norm_eps)
            self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(args, self.embed, self.head)
                                     for _ in range(args.mtp_depth))
        if device.type != "meta":  # on the meta device there are no values to draw
            self.to_empty(device=device)
            self.init_weights()

    def init_weights(self) -> None:
        """Every weight matrix ~ N(0, init_std) (report 4.2: 0.006), norms
        at 1, selection biases at 0.

        Modules are visited in registration order, each once (the MTP modules' shared
        embedding and head are not drawn twice), so a model with MTP draws the same
        main-model weights from a seed as one without. Call it after `to_empty` to
        materialise a model built on the meta device.
        """
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                for weight in (module.w13, module.w2):
                    nn.init.normal_(weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ------------------------------------------------------------------------ forward
    def check_tokens(self, tokens: torch.Tensor, start_pos: int = 0,
                     name: str = "tokens") -> None:
        """Raise a clear TypeError / ValueError for token ids
        (`name`: tokens or targets) the model cannot use.

        On the CPU the id range is checked at once; on an accelerator it is asserted
        asynchronously, so the check costs no device-to-host copy.
        """
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got "
                            f"{type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, "
                            f"got {tokens.dtype}")
        if tokens.device != self.embed.weight.device:
            raise ValueError(f"{name} are on {tokens.device} but the model is on "
                             f"{self.embed.weight.device}")
        if tokens.ndim != 2 or 0 in tokens.shape:
            raise ValueError(f"{name} must have shape (batch, seq_len) with batch >= "
                             f"1 and seq_len >= 1, got {tuple(tokens.shape)}")
        check_int("start_pos", start_pos, 0)
        if start_pos + tokens.shape[1] > self.args.max_seq_len:
            raise ValueError("positions start_pos .. start_pos + seq_len "
                             f"({start_pos} .. {start_pos + tokens.shape[1]}) must "
                             f"lie in [0, max_seq_len ({self.args.max_seq_len})]")
        rule = (f"{name}: token ids must be in [0, vocab_size "
                f"({self.args.vocab_size}))")
        if tokens.device.type == "cpu":
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.args.vocab_size:
                raise ValueError(f"{rule}, got ids in [{low}, {high}]")
        else:
            torch._assert_async(
                ((tokens >= 0) & (tokens < self.args.vocab_size)).all(), rule)

    def hidden_states(self, tokens: torch.Tensor,
                      start_pos: int = 0) -> tuple[torch.Tensor, list[Routing]]:
        """h^0 (B, S, dim), the final RMSNorm's output that the head reads
        and MTP depth 1 starts from, and the routing of each MoE layer of
        the main model, in order."""
        self.check_tokens(tokens, start_pos)
        freqs_cis = precompute_freqs_cis(self.args, start_pos, tokens.shape[1],
                                         tokens.device)
        h, routings = self.embed(tokens), []
        for layer in self.layers:
            h, routing = layer(h, start_pos, freqs_cis)
            if routing is not None:
                routings.append(routing)
        return self.norm(h), routings

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Next-token logits (B, S, vocab_size) for tokens (B, S) at positions
        start_pos .. start_pos + S - 1."""
        return self.head(self.hidden_states(tokens, start_pos)[0])

    # ----------------------------------------------------------------------- training
    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
             mtp_lambda: float = 0.0) -> LossParts:
        """Main cross-entropy + L_MTP (weight `mtp_lambda`; report: 0.3, then 0.1)
        + MoE balance losses.

        tokens t_0 .. t_{T-1} and targets t_1 .. t_T, both (B, T), as `Corpus.batch`
        returns them. The balance losses count only in training mode.
        """
        self.check_tokens(targets, name="targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of "
                             f"tokens {tuple(tokens.shape)}")
        targets = targets.long()
        check_number("mtp_lambda", mtp_lambda)
        if not mtp_lambda >= 0:
            raise ValueError(f"mtp_lambda ({mtp_lambda}) must be >= 0")
        h, routings = self.hidden_states(tokens)
        main = F.cross_entropy(self.head(h).flatten(0, 1).float(), targets.flatten())
        l_mtp, depths = main.new_zeros(()), []
        if mtp_lambda > 0 and len(self.mtp) > 0:
            logits, mtp_routings = mtp_chain(self.mtp, h, tokens)
            l_mtp, depths = mtp_loss(logits, targets, mtp_lambda)
            routings += [r for r in mtp_routings if r is not None]
        moes = self.moe_layers()
        balance = main.new_zeros(())
        if self.training:
            balance = sum((moe.balance_loss(r, len(tokens))
                           for moe, r in zip(moes, routings)), balance)
        load = torch.zeros(len(moes), self.args.n_routed_experts, dtype=torch.long,
                           device=tokens.device)
        for row, r in zip(load, routings):
            row += expert_load(r.indices, self.args.n_routed_experts)
        return LossParts(main + l_mtp + balance, main, l_mtp, depths, balance, load)

    def moe_layers(self, mtp: bool = True) -> list[MoE]:
        """The DeepSeekMoE layers of the main blocks, and those of the
        MTP modules if `mtp`."""
        parts = [self.layers, self.mtp] if mtp else [self.layers]
        return [m for part in parts for m in part.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_bias(self, expert_load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing step for every MoE layer
        (call after each optimizer step) from the step's `expert_load`
        (n MoE layers, n_routed_experts), as `LossParts.expert_load` gives it. A layer
        whose row is all zero (it did not run) keeps its bias."""
        moes = self.moe_layers()
        if expert_load.shape != (len(moes), self.args.n_routed_experts):
            raise ValueError("expert_load must be (n MoE layers, n_routed_experts) "
                             f"= {(len(moes), self.args.n_routed_experts)}, got "
                             f"{tuple(expert_load.shape)}")
        for moe, load in zip(moes, expert_load):
            moe.update_bias(load)

    # ------------------------------------------------------------------------ caching
    def allocate_cache(self, batch_size: int) -> None:
        """Give every attention layer (main blocks and MTP blocks) a KV cache
        for `batch_size` sequences."""
        for module in self.modules():
            if isinstance(module, CachedAttention):
                module.allocate_cache(batch_size)

    def free_cache(self) -> None:
        for module in self.modules():
            if isinstance(module, CachedAttention):
                module.free_cache()

    def take_cache(self) -> list[dict[str, torch.Tensor]]:
        """Detach every attention layer's cache and return them, in module order
        (`put_cache` gives them back): a paused decoding's own state."""
        return [m.take_cache() for m in self.modules()
                if isinstance(m, CachedAttention)]

    def put_cache(self, caches: list[dict[str, torch.Tensor]]) -> None:
        layers = [m for m in self.modules() if isinstance(m, CachedAttention)]
        if len(caches) != len(layers):
            raise ValueError(f"caches holds {len(caches)} layers' caches, the model "
                             f"has {len(layers)} attention layers")
        for module, cache in zip(layers, caches):
            module.put_cache(cache)

    # ----------------------------------------------------------------------- counting
    def num_params(self, mtp: bool = False) -> int:
        """Parameters of the main model (what `ModelArgs.num_params` counts),
        plus the MTP modules' unique ones if `mtp` (the shared embedding and
        head are counted once)."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if mtp or not name.startswith("mtp."))


def check_fits_in_memory(args: ModelArgs) -> None:
    """Refuse, before allocating anything, a model whose weights alone exceed the
    default device's memory (`Transformer(ModelArgs())` would start allocating
    2.7 TB on a laptop)."""
    device = torch.get_default_device()
    if device.type == "meta":
        return
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[1]
    elif (device.type == "cpu" and hasattr(os, "sysconf")
            and "SC_PHYS_PAGES" in os.sysconf_names):
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    n_params = args.num_params() + args.mtp_depth * args.mtp_module_params()
    needed = n_params * torch.finfo(torch.get_default_dtype()).bits // 8
    if needed > available:
        shape = ", ".join(f"{name} {getattr(args, name):,}" for name in (
            "dim", "n_layers", "vocab_size", "inter_dim", "n_routed_experts",
            "moe_inter_dim"))
        raise ValueError(f"this ModelArgs ({shape}) has {n_params:,} parameters "
                         f"({needed / 2**30:,.1f} GiB in "
                         f"{torch.get_default_dtype()}), more than the {device.type} "
                         f"memory ({available / 2**30:,.1f} GiB): use a small shape "
                         "such as ModelArgs.tiny(), or build it on the meta device "
                         "(with torch.device('meta'): ...) to inspect it")


__all__ = ["Transformer", "LossParts", "check_fits_in_memory"]
