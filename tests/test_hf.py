"""Whole-model parity with transformers' DeepseekV3ForCausalLM (dsv3_lite.hf.from_hf), and the loader's
refusals: overrides that would change the model, and configs that do not describe their weights."""
import copy

import pytest
import torch

from dsv3_lite.generate import generate
from dsv3_lite.hf import args_from_hf_config, from_hf, rope_rows_to_half_split, rope_rows_to_interleaved
from dsv3_lite.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=64, num_mtp_layers=1)
CASES = {
    "q_lora-interleaved": dict(q_lora_rank=32, n_shared_experts=1, rope_interleave=True),
    "no_q_lora-half_split-yarn": dict(
        q_lora_rank=None, n_shared_experts=2, rope_interleave=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    "8_groups_limit_3": dict(q_lora_rank=16, n_shared_experts=1, n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=3,
                             first_k_dense_replace=2),
}


def random_hf_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """A tiny transformers model whose every weight is random and O(1)-scaled, so logits are meaningful:
    norm weights around 1, a non-zero correction bias, router weights large enough to separate experts."""
    config = DeepseekV3Config(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "gate.weight" in name:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case):
    hf = random_hf_model(**CASES[case])
    ours = from_hf(hf)
    assert ours.args.n_shared_experts == hf.config.n_shared_experts
    assert all(bool((m.gate.bias != 0).all()) for m in ours.moe_layers())
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits
        got = ours(tokens)
    assert ref.abs().mean() > 0.1  # the comparison is not between two near-zero tensors
    error = (got - ref).abs().max().item()
    print(f"max |logits - transformers' logits| = {error:.2e}")  # shown by `pytest -rP`
    assert error < 1e-4
    # the cached decode paths agree with transformers at every step: the prefill's last logits, then each
    # one-token step's, against transformers' logits for the whole sequence (no cache)
    greedy, _ = generate(ours, tokens[:, :5], 10)
    with torch.no_grad():
        ref = hf(greedy, use_cache=False).logits[:, 4:]
    assert torch.equal(greedy[:, 5:], ref[:, :-1].argmax(-1))
    for impl in ("absorb", "naive"):  # both overrides leave the model unchanged
        model = from_hf(hf, attn_impl=impl, max_seq_len=128)
        model.allocate_cache(len(greedy))
        try:
            with torch.no_grad():
                steps = [model(greedy[:, :5], 0)[:, -1]]
                steps += [model(greedy[:, n:n + 1], n)[:, -1] for n in range(5, greedy.shape[1])]
        finally:
            model.free_cache()
        errors = (torch.stack(steps, dim=1) - ref).abs().amax(dim=(0, 2))
        print(f"{impl}: max |cached decode logits - transformers'| per step = "
              + " ".join(f"{e:.1e}" for e in errors.tolist()))
        assert len(errors) == 11 and errors.max() < 1e-4


def test_mtp_layers_equal_transformers():
    modeling_layers = pytest.importorskip("transformers.modeling_layers")
    hf = random_hf_model(seed=3, **CASES["q_lora-interleaved"])
    torch.manual_seed(4)
    hf_mtp = modeling_layers.MtpModel(hf, 1).eval()
    with torch.no_grad():
        for name, p in hf_mtp.named_parameters():
            if name.startswith("layers."):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3 if "gate.weight" in name else 0.08)
    ours = from_hf(hf, hf_mtp)
    assert ours.args.mtp_depth == 1 and ours.mtp[0].embed is ours.embed
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h0 = hf.model(tokens, use_cache=False).last_hidden_state
        ref = hf_mtp.forward_layer(0, h0[:, :-1], torch.arange(23)[None], None, input_ids=tokens[:, 1:])
        got, _ = ours.mtp[0](ours.hidden_states(tokens)[0][:, :-1], tokens[:, 1:])
    error = (got - ref).abs().max().item()
    print(f"max |MTP module output - transformers' MtpModel layer| = {error:.2e}")  # shown by `pytest -rP`
    assert error < 1e-4
    hf_mtp.embed_tokens = copy.deepcopy(hf_mtp.embed_tokens)  # no longer the main model's
    with torch.no_grad():
        hf_mtp.embed_tokens.weight[0, 0] += 1
    with pytest.raises(ValueError, match=r"the MTP layers' embed_tokens.weight differs from the main model's"):
        from_hf(hf, hf_mtp)


@pytest.fixture(scope="module")
def small_hf():
    return random_hf_model(**CASES["q_lora-interleaved"])


def test_from_hf_copies_the_weights_and_draws_no_random_numbers(small_hf):
    state = torch.get_rng_state()
    ours = from_hf(small_hf)
    assert torch.equal(torch.get_rng_state(), state)  # built on the meta device, not initialised
    theirs = {t.untyped_storage().data_ptr() for t in small_hf.state_dict().values()}
    assert not theirs & {t.untyped_storage().data_ptr() for t in ours.state_dict().values()}
    fresh = dict(Transformer(ours.args).named_parameters())
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {n: p.requires_grad
                                                                       for n, p in fresh.items()}
    assert not ours.training


@pytest.mark.parametrize("overrides", [dict(n_layers=2), dict(route_scale=1.0, rope_theta=500.0),
                                       dict(n_limited_groups=4), dict(mtp_depth=1), dict(dimm=8)])
def test_overrides_that_would_change_the_model_are_refused(small_hf, overrides):
    names = ", ".join(sorted(overrides))
    with pytest.raises(ValueError, match=rf"cannot override {names}: .* fix every field but max_batch_size, "
                                         rf"max_seq_len, attn_impl"):
        from_hf(small_hf, **overrides)


@pytest.mark.parametrize("field,value,message", [
    ("num_hidden_layers", 2, r"weights model.layers.2.input_layernorm.weight, .* and 13 more are left unused: "
                             r".*num_hidden_layers \(2\)"),
    ("num_hidden_layers", 4, r"'model.layers.3.input_layernorm.weight' is missing: .*num_hidden_layers \(4\)"),
    ("hidden_size", 128, r"'model.embed_tokens.weight' has shape \(97, 64\), but the config implies "
                         r"\(97, 128\): .*hidden_size \(128\)"),
    ("n_routed_experts", 16, r"'model.layers.1.mlp.gate.weight' has shape \(8, 64\).*n_routed_experts \(16\)"),
    ("moe_intermediate_size", 16, r"'model.layers.1.mlp.experts.gate_up_proj' has shape \(8, 64, 64\), but the "
                                  r"config implies \(8, 32, 64\).*moe_intermediate_size \(16\)"),
    ("n_shared_experts", 0, r"shared_experts.* left unused: .*n_shared_experts \(0\)"),
    ("first_k_dense_replace", 2, r"'model.layers.1.mlp.gate_proj.weight' is missing: .*first_k_dense_replace"),
    ("q_lora_rank", None, r"'model.layers.0.self_attn.q_proj.weight' is missing: .*q_lora_rank \(None\)"),
])
def test_a_config_that_does_not_match_the_weights_is_named(small_hf, field, value, message):
    hf = copy.deepcopy(small_hf)
    setattr(hf.config, field, value)
    with pytest.raises(ValueError, match=message):
        from_hf(hf)


def test_rope_row_permutations_are_inverse():
    rows = torch.randn(3, 8, 5)
    torch.testing.assert_close(rope_rows_to_interleaved(rope_rows_to_half_split(rows, 8), 8), rows)
    assert rope_rows_to_half_split(torch.arange(6.0)[:, None], 6).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_config_mapping_and_unsupported_configs():
    args = args_from_hf_config(DeepseekV3Config(), max_batch_size=2)
    assert (args.dim, args.n_layers, args.n_routed_experts, args.q_lora_rank, args.route_scale) == (7168, 61, 256, 1536, 2.5)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        args_from_hf_config(DeepseekV3Config(**{**BASE, "norm_topk_prob": False}))
    with pytest.raises(ValueError, match="mscale_all_dim"):
        args_from_hf_config(DeepseekV3Config(**{**BASE, "rope_parameters": dict(
            rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=16, mscale=1.0,
            mscale_all_dim=0.5)}))
    yarn = DeepseekV3Config(**{**BASE, **CASES["no_q_lora-half_split-yarn"]})
    assert args_from_hf_config(yarn, max_seq_len=32).max_seq_len == 32
    with pytest.raises(ValueError, match=r"max_seq_len \(16\) must be > original_seq_len \(16\)"):
        args_from_hf_config(yarn, max_seq_len=16)  # would switch YaRN off and change the logits


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_is_the_inverse_of_from_hf(case):
    """from_hf, then to_hf: the same transformers config fields and weights (RoPE rows back in
    interleaved order when the source rotated halves), and transformers' logits are ours."""
    from dsv3_lite.hf import hf_config, to_hf

    hf = random_hf_model(**CASES[case])
    ours = from_hf(hf)
    back = to_hf(ours)
    assert args_from_hf_config(back.config) == ours.args
    assert hf_config(ours.args)["rope_interleave"] is True
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, use_cache=False).logits, ours(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_hf(back)(tokens), ours(tokens), rtol=0, atol=0)
    if hf.config.rope_interleave:  # same layout: the very same tensors come back
        theirs = back.state_dict()
        for name, tensor in hf.state_dict().items():
            assert torch.equal(theirs[name], tensor), name


def test_to_hf_refuses_what_transformers_cannot_express():
    from dsv3_lite.config import ModelArgs
    from dsv3_lite.hf import hf_config

    with pytest.raises(ValueError, match="score_func \\('softmax'\\) has no transformers"):
        hf_config(ModelArgs.tiny(score_func="softmax"))


# ------------------------------------------------------------------------ the released layout
def random_model(mtp_depth: int = 2):
    """A tiny dsv3_lite model with O(1) weights (so FP8 rounding shows in its logits)."""
    from dsv3_lite.config import ModelArgs
    from dsv3_lite.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(mtp_depth=mtp_depth, rope_factor=1.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    return model


def test_the_released_layout_round_trips_exactly_in_fp32(tmp_path):
    import json

    from dsv3_lite.hf import load_release, save_release

    model = random_model()
    save_release(model, tmp_path, fp8=False, shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / f).is_file() for f in shards)
    names = set(index["weight_map"])
    n = model.args.n_layers
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names  # one matrix per expert
    assert {f"model.layers.{n + 1}.{part}" for part in (  # MTP module 2 as the last layer
        "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
        "shared_head.head.weight", "embed_tokens.weight")} <= names
    back = load_release(tmp_path)
    tokens = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
        ours, theirs = (m.loss(tokens[:, :-1], tokens[:, 1:], mtp_lambda=0.3) for m in (model, back))
    assert [float(d) for d in theirs.mtp_depths] == [float(d) for d in ours.mtp_depths]


def test_fp8_release_weights_are_dequantized_on_load(tmp_path):
    """save_release(fp8=True) stores the block linears as E4M3 with 128x128 block scales and the rest in
    BF16; load_release's logits equal those of the same weights quantized and dequantized in memory."""
    from safetensors import safe_open

    from dsv3_lite.fp8 import weight_dequant, weight_quant
    from dsv3_lite.hf import _RELEASE_FP8, _Weights, _load, _split_release, load_release, release_state_dict, save_release

    model = random_model()
    save_release(model, tmp_path, fp8=True)
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", framework="pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_b_proj.weight")
        scale = f.get_tensor("model.layers.0.self_attn.q_b_proj.weight_scale_inv")
        gate = f.get_tensor("model.layers.1.mlp.gate.weight")
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    # every linear weight of every block (MTP blocks too) is FP8 with its scales; nothing else is
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", framework="pt") as f:
        fp8_names = {n for n in f.keys() if f.get_slice(n).get_dtype() == "F8_E4M3"}
        scaled = {n.removesuffix("_scale_inv") for n in f.keys() if n.endswith("_scale_inv")}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and (".attn." in n or ".ffn." in n)}
    n_expert_mats = sum(3 * len(m.experts) for m in model.moe_layers())  # MTP's too
    assert fp8_names == scaled
    assert len(fp8_names) == len(linears) + n_expert_mats
    assert any(n.endswith("kv_a_proj_with_mqa.weight") for n in fp8_names)
    assert not any("gate.weight" in n or "eh_proj" in n or "embed" in n for n in fp8_names)
    assert scale.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
    assert gate.dtype == torch.bfloat16 and bias.dtype == torch.float32
    expected = {}
    for name, tensor in release_state_dict(model).items():
        if _RELEASE_FP8.search(name):
            expected[name] = weight_dequant(*weight_quant(tensor))
        elif name.endswith("e_score_correction_bias"):
            expected[name] = tensor
        else:
            expected[name] = tensor.bfloat16().float()
    main, mtp = _split_release(expected, model.args)
    reference = _load(model.args, _Weights(main, None), _Weights(mtp, None), True, copy=True)
    back = load_release(tmp_path)
    tokens = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back(tokens), reference(tokens))
        assert not torch.equal(back(tokens), model(tokens))  # FP8 did round the weights


def test_a_release_folder_and_save_pretrained_load_in_transformers(tmp_path):
    from dsv3_lite.hf import save_release, to_hf

    model = random_model(mtp_depth=1)
    save_release(model, tmp_path / "release", fp8=False)
    to_hf(model).save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(5))
    for folder in ("release", "hf"):
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-5, atol=1e-4)


def test_a_release_folder_that_does_not_match_is_named(tmp_path):
    import json

    from dsv3_lite.hf import load_release, save_release

    with pytest.raises(FileNotFoundError, match="has no config.json: not a checkpoint"):
        load_release(tmp_path)
    model = random_model(mtp_depth=1)
    save_release(model, tmp_path, fp8=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ValueError, match="belongs to layer 3, but the config has 3 layers"):
        load_release(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 16}))
    with pytest.raises(ValueError, match="has shape .* but the config implies"):
        load_release(tmp_path)
