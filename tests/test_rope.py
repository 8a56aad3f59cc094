"""Rotary embeddings and YaRN (dsv3_lite.rope) against the report's figures and first principles."""
import math

import pytest
import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.rope import (apply_rotary_emb, precompute_freqs_cis, rope_frequencies,
                            yarn_correction_range)


def test_v3_yarn_correction_range_and_scale():
    args = ModelArgs.deepseek_v3()
    assert yarn_correction_range(args) == (10, 23)
    assert args.softmax_scale() == pytest.approx(0.1352338, abs=1e-7)


def test_table_shape_dtype_and_unit_modulus():
    args = ModelArgs.tiny()
    table = precompute_freqs_cis(args)
    assert table.dtype == torch.complex64
    assert table.shape == (args.max_seq_len, args.qk_rope_head_dim // 2)
    torch.testing.assert_close(table.abs(), torch.ones(table.shape))
    torch.testing.assert_close(table[0], torch.ones(table.shape[1], dtype=torch.complex64))


def test_plain_rope_without_extension():
    args = ModelArgs.tiny(rope_factor=40.0)  # max_seq_len == original_seq_len: no YaRN
    d = args.qk_rope_head_dim
    expected = torch.tensor([args.rope_theta ** (-2 * i / d) for i in range(d // 2)])
    torch.testing.assert_close(rope_frequencies(args), expected)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    args = ModelArgs.deepseek_v3(max_seq_len=8192)
    base = rope_frequencies(args.replace(max_seq_len=args.original_seq_len))
    yarn = rope_frequencies(args)
    low, high = yarn_correction_range(args)
    torch.testing.assert_close(yarn[: low + 1], base[: low + 1])
    torch.testing.assert_close(yarn[high:], base[high:] / args.rope_factor)
    ratio = base[low:high + 1] / yarn[low:high + 1]
    assert torch.all(ratio[1:] > ratio[:-1])  # the ramp blends monotonically in between


def test_yarn_matches_transformers():
    cfg_mod = pytest.importorskip("transformers.models.deepseek_v3.configuration_deepseek_v3")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = ModelArgs.deepseek_v3(max_seq_len=16384)
    cfg = cfg_mod.DeepseekV3Config(
        hidden_size=args.dim, num_attention_heads=args.n_heads, qk_rope_head_dim=args.qk_rope_head_dim,
        max_position_embeddings=args.max_seq_len,
        rope_parameters=dict(rope_type="yarn", rope_theta=args.rope_theta, factor=args.rope_factor,
                             original_max_position_embeddings=args.original_seq_len, beta_fast=args.beta_fast,
                             beta_slow=args.beta_slow, mscale=args.mscale, mscale_all_dim=args.mscale))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    torch.testing.assert_close(rope_frequencies(args), inv_freq.float())
    assert attention_factor == pytest.approx(1.0)  # V3 puts the whole correction in the softmax scale


def test_rotation_of_interleaved_pairs():
    args = ModelArgs.tiny(qk_rope_head_dim=4, max_seq_len=8, original_seq_len=8)
    table = precompute_freqs_cis(args)
    x = torch.randn(1, 8, 2, 4)
    out = apply_rotary_emb(x, table)
    freqs = rope_frequencies(args)
    for m in range(8):
        for i in range(2):
            c, s = math.cos(m * freqs[i]), math.sin(m * freqs[i])
            a, b = x[0, m, :, 2 * i], x[0, m, :, 2 * i + 1]
            torch.testing.assert_close(out[0, m, :, 2 * i], a * c - b * s)
            torch.testing.assert_close(out[0, m, :, 2 * i + 1], a * s + b * c)


def test_scores_depend_only_on_relative_position():
    args = ModelArgs.tiny()
    table = precompute_freqs_cis(args)
    q, k = torch.randn(1, 1, 1, args.qk_rope_head_dim), torch.randn(1, 1, 1, args.qk_rope_head_dim)

    def score(m, n):
        return (apply_rotary_emb(q, table[m:m + 1]) * apply_rotary_emb(k, table[n:n + 1])).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(apply_rotary_emb(q, table[50:51]).norm(), q.norm())


def test_dtype_is_preserved():
    args = ModelArgs.tiny()
    x = torch.randn(2, 5, 3, args.qk_rope_head_dim, dtype=torch.bfloat16)
    assert apply_rotary_emb(x, precompute_freqs_cis(args)[:5]).dtype == torch.bfloat16


def test_bad_shapes_raise():
    args = ModelArgs.tiny()
    table = precompute_freqs_cis(args)
    with pytest.raises(ValueError, match="batch, seq, heads"):
        apply_rotary_emb(torch.randn(5, args.qk_rope_head_dim), table[:5])
    with pytest.raises(ValueError, match="freqs_cis must have shape"):
        apply_rotary_emb(torch.randn(1, 5, 2, args.qk_rope_head_dim), table[:4])
    with pytest.raises(ValueError, match="even"):
        apply_rotary_emb(torch.randn(1, 5, 2, 7), table[:5, :3])
