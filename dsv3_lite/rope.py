"""Rotary position embeddings as DeepSeek-V3 applies them, with YaRN context
extension (report 2.1.1, 4.3).

RoPE rotates consecutive pairs (x_{2i}, x_{2i+1}) of a vector by the angle m * f_i,
where m is the token position and f_i = theta^(-2i/d) the pair's frequency. Viewing
each pair as one complex number makes the rotation a single multiplication by
e^{i m f_i}: that complex table is what `precompute_freqs_cis` returns.

YaRN stretches a model trained at `original_seq_len` to `max_seq_len`: pairs that
turn many times within the original context (high frequency, low index) keep f_i,
pairs that turn less than once are interpolated to f_i / rope_factor, and a linear
ramp blends the two in between. The attention logits are then rescaled by mscale^2
(`ModelArgs.softmax_scale`).
"""
from __future__ import annotations

import math

import torch

from dsv3_lite.config import ModelArgs


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
    """The (fractional) pair index whose frequency completes `n_rotations`
    turns over `seq_len` tokens."""
    return (dim * math.log(seq_len / (n_rotations * 2 * math.pi))
            / (2 * math.log(base)))


def yarn_correction_range(args: ModelArgs) -> tuple[int, int]:
    """Pair indices [low, high] between which YaRN ramps from keeping f_i to
    dividing it by rope_factor.

    Pairs below `low` turn more than beta_fast times within original_seq_len; pairs
    above `high` turn fewer than beta_slow times. DeepSeek-V3 (d_rope 64, theta 1e4,
    4096 tokens, betas 32/1): (10, 23).
    """
    dim = args.qk_rope_head_dim
    low = math.floor(_correction_dim(args.beta_fast, dim, args.rope_theta,
                                     args.original_seq_len))
    high = math.ceil(_correction_dim(args.beta_slow, dim, args.rope_theta,
                                     args.original_seq_len))
    return max(low, 0), min(high, dim - 1)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """The d_rope/2 angular frequencies f_i (radians per token), with YaRN
    applied when max_seq_len > original_seq_len (the same condition as
    `ModelArgs.softmax_scale`)."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta
                   ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.max_seq_len > args.original_seq_len:
        low, high = yarn_correction_range(args)
        span = max(high - low, 1e-3)  # guard a degenerate range
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low)
                / span).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    return freqs


def precompute_freqs_cis(args: ModelArgs, start_pos: int = 0,
                         seqlen: int | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """e^{i m f_i} for the positions m in [start_pos, start_pos + seqlen)
    (default: every position up to max_seq_len): complex64 of shape
    (seqlen, qk_rope_head_dim // 2).

    A function of the configuration, not a weight: the `Transformer` computes
    the rows it needs once per forward, in FP32 on the input's device, and
    hands them to every layer.
    """
    seqlen = args.max_seq_len - start_pos if seqlen is None else seqlen
    freqs = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(start_pos, start_pos + seqlen,
                                      dtype=torch.float32, device=device), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x (B, S, H, d_rope) by
    freqs_cis (S, d_rope // 2).

    Computed in FP32 (in complex64) and cast back to x's dtype.
    """
    if x.ndim != 4:
        raise ValueError("x must be (batch, seq, heads, rope_dim), got shape "
                         f"{tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(f"rope_dim ({x.shape[-1]}) must be even: RoPE rotates pairs")
    expected = (x.shape[1], x.shape[-1] // 2)
    if tuple(freqs_cis.shape) != expected:
        raise ValueError("freqs_cis must have shape (seq, rope_dim // 2) = "
                         f"{expected}, got {tuple(freqs_cis.shape)}")
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
