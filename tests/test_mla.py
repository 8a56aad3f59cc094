"""Multi-head Latent Attention (dsv3_lite.mla): the two inference paths, the cache, baselines, parity."""
import pytest
import torch

from dsv3_lite.cache_size import gqa_cache_elems, mha_cache_elems, mla_cache_elems
from dsv3_lite.config import ModelArgs
from dsv3_lite.hf import rope_rows_to_half_split
from dsv3_lite.mla import GQA, MHA, MLA, MQA, causal_mask
from dsv3_lite.rope import precompute_freqs_cis

# A larger init than the tiny preset's so outputs are O(1) and tolerances mean something.
ARGS = ModelArgs.tiny(init_std=0.2, max_seq_len=64, original_seq_len=64, max_batch_size=4)
TOL = dict(atol=1e-5, rtol=1e-5)


def mla_pair(args: ModelArgs = ARGS, seed: int = 0) -> tuple[MLA, MLA]:
    """The same weights behind the naive and the absorbed path."""
    torch.manual_seed(seed)
    naive = MLA(args.replace(attn_impl="naive"))
    with torch.no_grad():
        for name, p in naive.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, args.init_std)
    absorb = MLA(args.replace(attn_impl="absorb"))
    absorb.load_state_dict(naive.state_dict())
    return naive, absorb


def decode(module, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens into a fresh cache, then decode the rest one token at a time."""
    module.allocate_cache(x.shape[0])
    with torch.no_grad():
        outs = [module(x[:, :prefill], 0)]
        outs += [module(x[:, t:t + 1], t) for t in range(prefill, x.shape[1])]
    module.free_cache()
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_parameter_count_and_names(q_lora_rank):
    args = ARGS.replace(q_lora_rank=q_lora_rank)
    mla = MLA(args)
    assert sum(p.numel() for p in mla.parameters()) == args.attention_params()
    names = {n.split(".")[0] for n, _ in mla.named_parameters()}
    query = {"wq"} if q_lora_rank == 0 else {"wq_a", "q_norm", "wq_b"}
    assert names == query | {"wkv_a", "kv_norm", "wkv_b", "wo"}
    assert set(mla.state_dict()) == {n for n, _ in mla.named_parameters()}  # rope table and cache not saved


def test_rope_rows_are_computed_not_stored():
    mla = MLA(ARGS).to(torch.bfloat16)
    assert dict(mla.named_buffers()) == {}  # no per-layer rope table: the rows are an argument of forward
    x = torch.randn(2, 5, ARGS.dim)
    mla = MLA(ARGS)
    with torch.no_grad():
        own = mla(x, start_pos=3)
        given = mla(x, 3, precompute_freqs_cis(ARGS)[3:8])
    torch.testing.assert_close(own, given, rtol=0, atol=0)
    assert MLA(ARGS).to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_training_with_an_allocated_cache_is_refused():
    mla = MLA(ARGS)
    mla.allocate_cache(1)
    x = torch.randn(1, 4, ARGS.dim)
    with pytest.raises(RuntimeError, match=r"KV cache is allocated.*free_cache\(\) before training"):
        mla(x)
    with torch.no_grad():
        mla(x)  # decoding is what the cache is for
    mla.free_cache()
    mla(x).sum().backward()  # and without it, gradients reach the latent projection and its norm
    assert mla.wkv_a.weight.grad.abs().sum() > 0 and mla.kv_norm.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- naive == absorb paths
def test_naive_equals_absorb_prefill():
    naive, absorb = mla_pair()
    x = torch.randn(2, 20, ARGS.dim)
    torch.testing.assert_close(absorb(x), naive(x), **TOL)
    torch.testing.assert_close(absorb(x, start_pos=9), naive(x, start_pos=9), **TOL)


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_incremental_decode_equals_full_forward(impl):
    naive, absorb = mla_pair()
    module = naive if impl == "naive" else absorb
    x = torch.randn(3, 24, ARGS.dim)
    with torch.no_grad():
        full = module(x)
    torch.testing.assert_close(decode(module, x, prefill=1), full, **TOL)
    torch.testing.assert_close(decode(module, x, prefill=10), full, **TOL)


def test_naive_equals_absorb_token_by_token():
    naive, absorb = mla_pair(seed=1)
    x = torch.randn(2, 16, ARGS.dim)
    torch.testing.assert_close(decode(absorb, x, prefill=1), decode(naive, x, prefill=1), **TOL)


def test_prefill_continuing_a_cached_prefix():
    naive, absorb = mla_pair(seed=2)
    x = torch.randn(2, 30, ARGS.dim)
    with torch.no_grad():
        full = naive(x)
        results = []
        for module in (naive, absorb):
            module.allocate_cache(2)
            head = module(x[:, :12], 0)
            tail = module(x[:, 12:], 12)  # a multi-token chunk attending over the cached prefix
            results.append(torch.cat([head, tail], dim=1))
    torch.testing.assert_close(results[1], results[0], **TOL)
    torch.testing.assert_close(results[0], full, **TOL)


def test_smaller_batch_than_the_cache_and_reallocation():
    _, absorb = mla_pair()
    x = torch.randn(2, 8, ARGS.dim)
    with torch.no_grad():
        full = absorb(x)
        absorb.allocate_cache(4)
        out = torch.cat([absorb(x[:, :5], 0), absorb(x[:, 5:], 5)], dim=1)
    torch.testing.assert_close(out, full, **TOL)
    absorb.free_cache()
    assert not absorb.has_cache and not any(n.startswith("cache_") for n, _ in absorb.named_buffers())


def test_q_lora_off_paths_agree():
    naive, absorb = mla_pair(ARGS.replace(q_lora_rank=0))
    x = torch.randn(2, 12, ARGS.dim)
    torch.testing.assert_close(absorb(x), naive(x), **TOL)
    torch.testing.assert_close(decode(absorb, x, 4), naive(x), **TOL)


def test_gradients_flow_without_a_cache():
    for module in mla_pair():
        module(torch.randn(2, 6, ARGS.dim)).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_causal_mask_uses_absolute_positions():
    mask = causal_mask(q_start=3, n_q=2, k_start=0, n_k=5)
    assert torch.isinf(mask).tolist() == [[False] * 4 + [True], [False] * 5]
    assert causal_mask(q_start=7, n_q=1, k_start=0, n_k=8) is None
    for q_start, n_q, k_start, n_k in [(0, 4, 0, 4), (5, 1, 0, 6), (5, 3, 0, 8), (2, 2, 2, 2), (4, 1, 2, 3)]:
        mask = causal_mask(q_start, n_q, k_start, n_k)
        future = torch.arange(k_start, k_start + n_k)[None] > torch.arange(q_start, q_start + n_q)[:, None]
        assert (mask is None) == (not future.any())  # None exactly when nothing is masked
        if mask is not None:
            assert torch.equal(torch.isinf(mask), future)


# ------------------------------------------------------------------------------------------------ the cache
def test_absorb_cache_holds_latent_plus_rope_key_per_token():
    _, absorb = mla_pair()
    absorb.allocate_cache(3)
    buffers = {n: b for n, b in absorb.named_buffers() if n.startswith("cache_")}
    per_token = sum(b[0, 0].numel() for b in buffers.values())
    assert per_token == ARGS.kv_lora_rank + ARGS.qk_rope_head_dim == mla_cache_elems(ARGS.kv_lora_rank,
                                                                                    ARGS.qk_rope_head_dim)
    assert all(b.shape[:2] == (3, ARGS.max_seq_len) for b in buffers.values())
    assert absorb.cache_elems_per_token() == per_token


def test_cache_bytes_equal_the_formulas():
    a = ARGS
    cases = [
        (MLA(a.replace(attn_impl="absorb")), mla_cache_elems(a.kv_lora_rank, a.qk_rope_head_dim)),
        (MLA(a.replace(attn_impl="naive")), a.n_heads * (a.qk_head_dim + a.v_head_dim)),
        (MHA(a), mha_cache_elems(a.n_heads, a.v_head_dim)),
        (GQA(a, n_kv_heads=2), gqa_cache_elems(2, a.v_head_dim)),
        (MQA(a, head_dim=8), gqa_cache_elems(1, 8)),
    ]
    for module, elems in cases:
        module.to(torch.bfloat16).allocate_cache(2)
        held = sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n.startswith("cache_"))
        assert held == 2 * a.max_seq_len * module.cache_bytes_per_token(bytes_per_element=2)
        assert module.cache_bytes_per_token(bytes_per_element=2) == 2 * elems


def test_v3_cache_figures():
    v3 = ModelArgs.deepseek_v3()
    assert v3.kv_cache_bytes_per_token() == 70272
    with torch.device("meta"):
        assert MLA(v3).cache_bytes_per_token() * v3.n_layers == 70272
        assert MLA(v3.replace(attn_impl="naive")).cache_bytes_per_token() * v3.n_layers == 4_997_120
    assert gqa_cache_elems(8, 128) * 80 * 2 == 327_680  # Qwen2.5-72B
    assert gqa_cache_elems(8, 128) * 126 * 2 == 516_096  # LLaMA-3.1-405B


# -------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("make", [MHA, MQA, lambda a: GQA(a, n_kv_heads=2)])
def test_baselines_decode_equals_full_forward(make):
    torch.manual_seed(0)
    module = make(ARGS)
    x = torch.randn(2, 14, ARGS.dim)
    with torch.no_grad():
        full = module(x)
    torch.testing.assert_close(decode(module, x, prefill=5), full, **TOL)


def test_gqa_shares_each_kv_head_across_its_group():
    torch.manual_seed(0)
    gqa = GQA(ARGS, n_kv_heads=2)
    mha = MHA(ARGS)
    group = ARGS.n_heads // 2
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for w_mha, w_gqa in ((mha.wk, gqa.wk), (mha.wv, gqa.wv)):
            heads = w_gqa.weight.view(2, ARGS.v_head_dim, ARGS.dim)
            w_mha.weight.copy_(heads.repeat_interleave(group, dim=0).reshape_as(w_mha.weight))
    x = torch.randn(2, 9, ARGS.dim)
    torch.testing.assert_close(gqa(x), mha(x), **TOL)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    mla = MLA(ARGS)
    with pytest.raises(ValueError, match=r"dim = 64"):
        mla(torch.randn(1, 4, ARGS.dim + 1))
    with pytest.raises(ValueError, match=r"max_seq_len \(64\)"):
        mla(torch.randn(1, 4, ARGS.dim), start_pos=61)
    mla.allocate_cache(2)
    with torch.no_grad():
        mla(torch.randn(2, ARGS.max_seq_len, ARGS.dim))
        with pytest.raises(ValueError, match=r"max_seq_len"):
            mla(torch.randn(2, 1, ARGS.dim), start_pos=ARGS.max_seq_len)  # decode past the end
        with pytest.raises(ValueError, match=r"batch size \(3\) must be <= the cache's batch size \(2\)"):
            mla(torch.randn(3, 1, ARGS.dim), start_pos=0)
    with pytest.raises(ValueError, match=r"max_batch_size \(4\)"):
        mla.allocate_cache(5)
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        GQA(ARGS, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"attn_impl"):
        ARGS.replace(attn_impl="flash")


# ------------------------------------------------------------------------------------- transformers parity
def hf_attention(mla: MLA, rope_interleave: bool):
    """transformers' DeepseekV3Attention (and its rotary embedding) carrying `mla`'s weights."""
    hf = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    a = mla.args
    extended = a.max_seq_len > a.original_seq_len
    rope = dict(rope_type="yarn", rope_theta=a.rope_theta, factor=a.rope_factor,
                original_max_position_embeddings=a.original_seq_len, beta_fast=a.beta_fast,
                beta_slow=a.beta_slow, mscale=a.mscale, mscale_all_dim=a.mscale) if extended else \
        dict(rope_type="default", rope_theta=a.rope_theta)
    cfg = hf.DeepseekV3Config(
        hidden_size=a.dim, num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads,
        q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, max_position_embeddings=a.max_seq_len,
        rms_norm_eps=a.rms_norm_eps, rope_parameters=rope, rope_interleave=rope_interleave)
    cfg._attn_implementation = "eager"
    attn, rotary = hf.DeepseekV3Attention(cfg, layer_idx=0), hf.DeepseekV3RotaryEmbedding(cfg)

    h, nope, r = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
    q_rows = (mla.wq if a.q_lora_rank == 0 else mla.wq_b).weight.detach().view(h, nope + r, -1)
    kv_a = mla.wkv_a.weight.detach()
    if not rope_interleave:  # transformers rotates halves: permute the rope rows, q.k is unchanged
        q_rows = torch.cat([q_rows[:, :nope], rope_rows_to_half_split(q_rows[:, nope:], r)], dim=1)
        kv_a = torch.cat([kv_a[:a.kv_lora_rank], rope_rows_to_half_split(kv_a[a.kv_lora_rank:], r)])
    weights = {"kv_a_proj_with_mqa.weight": kv_a, "kv_a_layernorm.weight": mla.kv_norm.weight,
               "kv_b_proj.weight": mla.wkv_b.weight, "o_proj.weight": mla.wo.weight}
    if a.q_lora_rank == 0:
        weights["q_proj.weight"] = q_rows.reshape(h * (nope + r), -1)
    else:
        weights.update({"q_a_proj.weight": mla.wq_a.weight, "q_a_layernorm.weight": mla.q_norm.weight,
                        "q_b_proj.weight": q_rows.reshape(h * (nope + r), -1)})
    attn.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return attn, rotary


@pytest.mark.parametrize("q_lora_rank,rope_interleave,yarn", [
    (32, True, False), (0, True, False), (32, False, True), (0, False, False)])
@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_parity_with_transformers(q_lora_rank, rope_interleave, yarn, impl):
    args = ARGS.replace(q_lora_rank=q_lora_rank, attn_impl=impl,
                        **(dict(original_seq_len=16, rope_factor=4.0) if yarn else {}))
    torch.manual_seed(0)
    mla = MLA(args)
    for norm in [mla.kv_norm] + ([mla.q_norm] if q_lora_rank else []):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # exercise the norm weights too
    attn, rotary = hf_attention(mla, rope_interleave)
    bsz, seqlen = 2, 40
    x = torch.randn(bsz, seqlen, args.dim)
    position_ids = torch.arange(seqlen)[None].expand(bsz, -1)
    mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref, _ = attn(x, position_embeddings=rotary(x, position_ids), attention_mask=mask)
        ours = mla(x)
    assert attn.scaling == pytest.approx(mla.softmax_scale, rel=1e-12)
    error = (ours - ref).abs().max().item()
    print(f"max |MLA - DeepseekV3Attention| = {error:.2e}")  # shown by `pytest -rP`
    assert error < 1e-5
