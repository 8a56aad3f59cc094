"""Multi-head Latent Attention (report 2.1.1, eqs. 1-11) and the MHA / GQA / MQA
baselines it is measured against.

MLA compresses what attention must remember about a token into a small latent c_KV
(kv_lora_rank values) plus one RoPE key shared by all heads (qk_rope_head_dim values).
Per-head keys and values are up-projections of c_KV. In the report's symbols, with the
weight of this module that holds each matrix:

    c_KV = W_DKV h           (eq. 1)       wkv_a, its first kv_lora_rank rows;
                                           then kv_norm
    k_C = W_UK c_KV,         (eqs. 2, 5)   wkv_b, per head the rows [k_nope | v]
    v_C = W_UV c_KV
    k_R = RoPE(W_KR h),      (eqs. 3-4)    wkv_a, its last qk_rope_head_dim rows
      one for all heads
    c_Q = W_DQ h             (eq. 6)       wq_a; then q_norm
    q_C = W_UQ c_Q,          (eqs. 7-9)    wq_b, per head the rows [q_nope | q_rope]
    q_R = RoPE(W_QR c_Q)
    o = softmax(q . k * scale) v_C,
    u = W_O [o_1; ..; o_nh]  (eqs. 10-11)  wo

With q_lora_rank = 0 (V2-Lite) `wq` maps h to the queries directly. The two RMSNorms
on the latents (`q_norm`, `kv_norm`) are in DeepSeek's released code and weights,
not in the report's equations.

Two cache layouts, chosen by `ModelArgs.attn_impl`:

- "naive" up-projects every key and value and caches them per head:
  n_h * (d_qk + d_v) values per token.
- "absorb" caches only c_KV and the rotated k_rope (d_c + d_h^R values per token).
  Because q_nope . (W_UK c) = (W_UK^T q_nope) . c, W_UK folds into the query; because
  the output is linear in v, W_UV is applied after attending over c. The RoPE part
  cannot fold (its rotation depends on the key's position), which is why it is
  decoupled and carried separately.

Which computation runs depends on the work, not only on the layout. Training and
prefill (start_pos 0: every key is in x) up-project the keys and values once and
attend per head: with as many queries as keys, that is cheaper than folding W_UK into
every query. Decoding with the "absorb" cache (start_pos > 0: a few new queries, many
cached tokens) attends over the cached latents directly (`_absorbed`), so the per-head
keys and values are never materialised.

Every attention module here owns its KV cache (`allocate_cache` / `free_cache`).
Without a cache, forward is plain causal attention over x (the training path);
with one, it writes positions [start_pos, start_pos + S) and attends over
[0, start_pos + S). The cache is an inference structure: forward refuses to write to
it while gradients are being recorded (a cached key could not pass its gradient on).

The RoPE rows e^{i m f} for the positions of x are an argument of forward
(`freqs_cis`): the Transformer computes them once per forward for all its layers; a
module used on its own computes them from its config.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsv3_lite.config import ModelArgs
from dsv3_lite import kernels
from dsv3_lite.fp8_linear import linear_class
from dsv3_lite.norm import RMSNorm
from dsv3_lite.rope import apply_rotary_emb, precompute_freqs_cis


def causal_mask(q_start: int, n_q: int, k_start: int, n_k: int,
                device=None) -> torch.Tensor | None:
    """Additive (n_q, n_k) mask, -inf where the key's position is after the
    query's; None if nothing is masked.

    Positions are absolute, so a prefill that continues a cached prefix
    (queries at q_start.., keys at 0..) is masked correctly.
    """
    # the last key is not after the first query: nothing to mask
    if k_start + n_k - 1 <= q_start:
        return None
    q_pos = torch.arange(q_start, q_start + n_q, device=device)
    k_pos = torch.arange(k_start, k_start + n_k, device=device)
    future = k_pos[None, :] > q_pos[:, None]
    return torch.zeros(n_q, n_k, device=device).masked_fill_(future, float("-inf"))


def attention_probs(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(scores + mask) over the keys (last dim), in FP32.
    scores (..., S, T), mask (S, T) or None."""
    scores = scores.float() if mask is None else scores.float() + mask
    return scores.softmax(dim=-1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with n_kv <= n_h key-value heads, each shared by n_h / n_kv
    consecutive query heads (MHA: n_kv = n_h; MQA: n_kv = 1). q (B, S, n_h, d),
    k (B, T, n_kv, d), v (B, T, n_kv, d_v), mask (S, T) or None -> (B, S, n_h, d_v).

    The query heads that share a key-value head are stacked as rows of one matrix, so
    each key and value is read once for all of them, never copied per head.
    """
    (b, s, h, d), g = q.shape, k.shape[2]
    q = (q.view(b, s, g, h // g, d).permute(0, 2, 3, 1, 4)
         .reshape(b, g, h // g * s, d))  # (B, n_kv, R*S, d)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_kv, T, .)
    probs = attention_probs((q @ k.mT * scale).view(b, g, h // g, s, -1), mask)
    out = probs.type_as(v).view(b, g, h // g * s, -1) @ v  # (B, n_kv, R*S, d_v)
    return out.view(b, g, h // g, s, -1).permute(0, 3, 1, 2, 4).reshape(b, s, h, -1)


class CachedAttention(nn.Module):
    """What every attention variant here shares: input checks, its RoPE
    rows and a KV cache it owns.

    Subclasses describe their cache with `cache_layout()` (name -> per-token shape);
    the cache holds (batch_size, max_seq_len, *shape) per name, allocated in the
    parameters' dtype. `rope_args` is the configuration of the RoPE table the module
    expects (rope width `rope_args.qk_rope_head_dim`).
    """

    def __init__(self, args: ModelArgs, rope_args: ModelArgs | None = None):
        super().__init__()
        self.args = args
        self.rope_args = rope_args or args
        self.cache_batch_size = 0

    def cache_layout(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def cache_elems_per_token(self) -> int:
        """Values this layer caches per token (multiply by bytes per value
        and layers for memory)."""
        return sum(math.prod(shape) for shape in self.cache_layout().values())

    def cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Cache bytes per token for this layer (default: BF16, 2 bytes per value)."""
        return self.cache_elems_per_token() * bytes_per_element

    @property
    def has_cache(self) -> bool:
        return self.cache_batch_size > 0

    def allocate_cache(self, batch_size: int) -> None:
        """Allocate (or re-allocate, zeroed) a cache for `batch_size` sequences
        of up to max_seq_len tokens."""
        if not 1 <= batch_size <= self.args.max_batch_size:
            raise ValueError(f"batch_size ({batch_size}) must be in [1, "
                             f"max_batch_size ({self.args.max_batch_size})]")
        self.free_cache()
        weight = next(self.parameters())
        for name, shape in self.cache_layout().items():
            buf = torch.zeros(batch_size, self.args.max_seq_len, *shape,
                              dtype=weight.dtype, device=weight.device)
            self.register_buffer(f"cache_{name}", buf, persistent=False)
        self.cache_batch_size = batch_size

    def free_cache(self) -> None:
        for name in self.cache_layout():
            if hasattr(self, f"cache_{name}"):
                delattr(self, f"cache_{name}")
        self.cache_batch_size = 0

    def take_cache(self) -> dict[str, torch.Tensor]:
        """Detach the cache from the module and return it (name -> tensor, empty
        without one); `put_cache` gives it back. A decoding that pauses between
        steps holds its cache this way, so that others can use the module."""
        cache = {name: getattr(self, f"cache_{name}") for name in self.cache_layout()
                 if hasattr(self, f"cache_{name}")}
        self.free_cache()
        return cache

    def put_cache(self, cache: dict[str, torch.Tensor]) -> None:
        """Make `cache` (from `take_cache`) the module's cache."""
        self.free_cache()
        for name, buf in cache.items():
            self.register_buffer(f"cache_{name}", buf, persistent=False)
            self.cache_batch_size = buf.shape[0]

    def _check_input(self, x: torch.Tensor, start_pos: int) -> tuple[int, int]:
        """(batch, seq_len) of x, after checking its shape, its positions
        and the cache's rules."""
        dim = self.args.dim
        if x.ndim != 3 or x.shape[-1] != dim:
            raise ValueError(f"x must be (batch, seq_len, dim) with dim = {dim}, got "
                             f"shape {tuple(x.shape)}")
        bsz, seqlen = x.shape[:2]
        if start_pos < 0:
            raise ValueError(f"start_pos ({start_pos}) must be >= 0")
        if start_pos + seqlen > self.args.max_seq_len:
            raise ValueError(f"start_pos + seq_len ({start_pos} + {seqlen}) must be "
                             f"<= max_seq_len ({self.args.max_seq_len})")
        if self.has_cache and bsz > self.cache_batch_size:
            raise ValueError(f"batch size ({bsz}) must be <= the cache's batch size "
                             f"({self.cache_batch_size}) given to allocate_cache")
        if (self.has_cache and torch.is_grad_enabled()
                and (x.requires_grad or self.wo.weight.requires_grad)):
            raise RuntimeError("a KV cache is allocated, and keys and values written "
                               "to it would not pass their gradient on: decode under "
                               "torch.no_grad() or torch.inference_mode(), and call "
                               "free_cache() before training")
        return bsz, seqlen

    def _freqs(self, freqs_cis: torch.Tensor | None, start_pos: int, seqlen: int,
               device) -> torch.Tensor:
        """The RoPE rows for positions [start_pos, start_pos + seqlen): the
        given ones, or computed."""
        if freqs_cis is None:
            return precompute_freqs_cis(self.rope_args, start_pos, seqlen, device)
        return freqs_cis

    def _update_cache(self, start_pos: int,
                      **new: torch.Tensor) -> list[torch.Tensor]:
        """Write each new (B, S, ...) tensor at [start_pos, start_pos + S);
        return the views over [0, end)."""
        views = []
        for name, value in new.items():
            buf = getattr(self, f"cache_{name}")
            bsz, end = value.shape[0], start_pos + value.shape[1]
            buf[:bsz, start_pos:end] = value
            views.append(buf[:bsz, :end])
        return views

    def _mask(self, start_pos: int, seqlen: int, device) -> torch.Tensor | None:
        """The causal mask of x's queries over the keys: the cached ones
        [0, start_pos + seqlen), or x's."""
        k_start = 0 if self.has_cache else start_pos
        return causal_mask(start_pos, seqlen, k_start, start_pos + seqlen - k_start,
                           device)


class MLA(CachedAttention):
    """Multi-head Latent Attention; parameter names follow DeepSeek's
    reference implementation."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        h, dim = args.n_heads, args.dim
        self.n_heads = h
        self.attn_impl = args.attn_impl
        linear = linear_class(args.fp8, args.kernels)
        if args.q_lora_rank == 0:
            self.wq = linear(dim, h * args.qk_head_dim, bias=False)
        else:
            self.wq_a = linear(dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.wq_b = linear(args.q_lora_rank, h * args.qk_head_dim, bias=False)
        self.wkv_a = linear(dim, args.kv_lora_rank + args.qk_rope_head_dim,
                            bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.wkv_b = linear(args.kv_lora_rank,
                            h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.wo = linear(h * args.v_head_dim, dim, bias=False)
        self.softmax_scale = args.softmax_scale()

    def cache_layout(self) -> dict[str, tuple[int, ...]]:
        a = self.args
        # per-head keys (nope and rope) and values: n_h * (d_qk + d_v)
        if self.attn_impl == "naive":
            return {"k": (a.n_heads, a.qk_head_dim), "v": (a.n_heads, a.v_head_dim)}
        # latent and rope key: d_c + d_h^R
        return {"kv": (a.kv_lora_rank,), "pe": (a.qk_rope_head_dim,)}

    def forward(self, x: torch.Tensor, start_pos: int = 0,
                freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, dim) at positions start_pos .. start_pos + S - 1 -> (B, S, dim);
        freqs_cis: their RoPE rows (S, qk_rope_head_dim // 2), computed
        here when not given."""
        a = self.args
        bsz, seqlen = self._check_input(x, start_pos)
        freqs = self._freqs(freqs_cis, start_pos, seqlen, x.device)

        q = self.wq(x) if a.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(bsz, seqlen, self.n_heads, a.qk_head_dim).split(
            [a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs)
        kv, k_pe = self.wkv_a(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        # (B, S, 1, d_rope): one key for all heads
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs)
        kv = self.kv_norm(kv)
        mask = self._mask(start_pos, seqlen, x.device)

        if self.attn_impl == "absorb" and self.has_cache:
            kv_cached, k_pe_cached = self._update_cache(start_pos, kv=kv,
                                                        pe=k_pe.squeeze(2))
            if start_pos > 0:  # decoding: few queries, many cached latents
                return self.wo(self._absorbed(q_nope, q_pe, kv_cached, k_pe_cached,
                                              mask).flatten(2))
        # Training and prefill, where every key is in x: up-project the
        # keys and values once
        k_nope, v = self.wkv_b(kv).view(bsz, seqlen, self.n_heads, -1).split(
            [a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        if self.attn_impl == "naive" and self.has_cache:
            k, v = self._update_cache(start_pos, k=k, v=v)
        out = grouped_attention(torch.cat([q_nope, q_pe], dim=-1), k, v,
                                self.softmax_scale, mask)
        return self.wo(out.flatten(2))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                  k_pe: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention read straight from the cache: q_nope, q_pe (B, S, n_h, .), the
        cached latents kv (B, T, d_c) and RoPE keys k_pe (B, T, d_rope)
        -> (B, S, n_h, v_head_dim).

        Every head reads the same latents, so the heads' queries are stacked
        as rows of one matrix (MQA over the latent): the cache is read
        once, not once per head."""
        a, h = self.args, self.n_heads
        b, s = q_nope.shape[:2]
        w_ukv = self.wkv_b.weight.view(h, a.qk_nope_head_dim + a.v_head_dim,
                                       a.kv_lora_rank)
        w_uk, w_uv = w_ukv[:, :a.qk_nope_head_dim], w_ukv[:, a.qk_nope_head_dim:]
        # W_UK folded into the query: (n_h, B*S, d_c)
        q_latent = q_nope.flatten(0, 1).transpose(0, 1) @ w_uk
        # (B, n_h*S, d_c)
        q_latent = q_latent.view(h, b, s, -1).transpose(0, 1).reshape(b, h * s, -1)
        q_pe = q_pe.permute(0, 2, 1, 3).reshape(b, h * s, -1)  # (B, n_h*S, d_rope)
        if s == 1 and kernels.use_triton(a.kernels, kv.device):
            # one new token: the split-KV Triton kernel (dsv3_lite.kernels)
            out = kernels.mla_decode(q_latent, q_pe, kv, k_pe,
                                     self.softmax_scale).to(kv.dtype)
        else:
            # (B, n_h*S, T)
            scores = (q_latent @ kv.mT + q_pe @ k_pe.mT) * self.softmax_scale
            probs = attention_probs(scores.view(b, h, s, -1), mask).type_as(kv)
            # attend over the latent: (B, n_h*S, d_c) ...
            out = probs.view(b, h * s, -1) @ kv
        # ... then W_UV
        out = out.view(b, h, s, -1).transpose(0, 1).reshape(h, b * s, -1) @ w_uv.mT
        return out.view(h, b, s, -1).permute(1, 2, 0, 3)  # (B, S, n_h, v_head_dim)


class GQA(CachedAttention):
    """Grouped-query attention baseline: n_kv_heads key-value heads, each shared by
    n_heads / n_kv_heads query heads, RoPE on the whole head (LLaMA style). MHA is
    n_kv_heads = n_heads, MQA n_kv_heads = 1.

    head_dim defaults to v_head_dim (d_h = 128 in V3); the softmax scale is
    head_dim^-0.5 with the same YaRN correction as MLA.
    """

    def __init__(self, args: ModelArgs, n_kv_heads: int, head_dim: int | None = None):
        head_dim = args.v_head_dim if head_dim is None else head_dim
        if not 1 <= n_kv_heads <= args.n_heads or args.n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads "
                             f"({args.n_heads})")
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be positive and even "
                             "(RoPE rotates pairs)")
        super().__init__(args, rope_args=args.replace(qk_rope_head_dim=head_dim))
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.n_heads, n_kv_heads, head_dim)
        linear = linear_class(args.fp8, args.kernels)
        self.wq = linear(args.dim, args.n_heads * head_dim, bias=False)
        self.wk = linear(args.dim, n_kv_heads * head_dim, bias=False)
        self.wv = linear(args.dim, n_kv_heads * head_dim, bias=False)
        self.wo = linear(args.n_heads * head_dim, args.dim, bias=False)
        self.softmax_scale = (args.softmax_scale()
                              * (args.qk_head_dim / head_dim) ** 0.5)

    def cache_layout(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.n_kv_heads, self.head_dim),
                "v": (self.n_kv_heads, self.head_dim)}

    def forward(self, x: torch.Tensor, start_pos: int = 0,
                freqs_cis: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, dim) at positions start_pos .. start_pos + S - 1 -> (B, S, dim);
        freqs_cis: their RoPE rows (S, head_dim // 2), computed here
        when not given."""
        bsz, seqlen = self._check_input(x, start_pos)
        freqs = self._freqs(freqs_cis, start_pos, seqlen, x.device)
        q = apply_rotary_emb(
            self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), freqs)
        k = apply_rotary_emb(
            self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), freqs)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.has_cache:
            k, v = self._update_cache(start_pos, k=k, v=v)
        out = grouped_attention(q, k, v, self.softmax_scale,
                                self._mask(start_pos, seqlen, x.device))
        return self.wo(out.flatten(2))


class MHA(GQA):
    """Multi-head attention: every query head has its own key and value head."""

    def __init__(self, args: ModelArgs, head_dim: int | None = None):
        super().__init__(args, n_kv_heads=args.n_heads, head_dim=head_dim)


class MQA(GQA):
    """Multi-query attention: one key and value head shared by all query heads."""

    def __init__(self, args: ModelArgs, head_dim: int | None = None):
        super().__init__(args, n_kv_heads=1, head_dim=head_dim)
