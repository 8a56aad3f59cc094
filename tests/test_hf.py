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
    "8_groups_limit_3": dict(q_lora_rank=16, n_shared_experts=1, n_routed_experts=16, n_group=8, topk_group=3,
                             num_experts_per_tok=3, first_k_dense_replace=2),
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
    assert ((args.dim, args.n_layers, args.n_routed_experts, args.q_lora_rank, args.route_scale)
            == (7168, 61, 256, 1536, 2.5))
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
    from dsv3_lite.hf import (_RELEASE_FP8, _Weights, _load, _split_release, load_release, release_state_dict,
                              save_release)

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
    # a field without a default is required (hidden_size used to fall back to V3's 7168, then the weights' shapes
    # were blamed)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                      if k not in ("hidden_size", "n_group")}))
    with pytest.raises(ValueError, match=r"config.json lacks hidden_size, n_group: a DeepSeek-V3 config.json "
                                         r"gives each"):
        load_release(tmp_path)
    for field, value, message in (("hidden_size", "64", r"hidden_size: dim must be an int, got str \(ModelArgs.dim "
                                                        r"is the config's hidden_size\)"),
                                  ("num_hidden_layers", 0, r"num_hidden_layers: n_layers \(0\) must be")):
        (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises((TypeError, ValueError), match=message):
            load_release(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    # an index that lost the entries of a shard names the weight and the index, not the config
    weight_map = read_index(tmp_path)["weight_map"]
    write_index(tmp_path, {k: v for k, v in weight_map.items() if ".layers.2." not in k})
    with pytest.raises(ValueError, match=r"weight 'model.layers.2.\S+' is missing: model.safetensors.index.json "
                                         r"names no shard for it"):
        load_release(tmp_path)


def logits(model, seed: int = 6):
    tokens = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


def read_index(folder):
    import json

    return json.loads((folder / "model.safetensors.index.json").read_text())


def write_index(folder, weight_map):
    import json

    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shard_bytes", [150 * 136 + 10, 3000])
def test_fp8_shards_keep_each_weight_with_its_scales(tmp_path, shard_bytes):
    """However small the shards, a weight and its weight_scale_inv share one, and the release loads to the same
    model as with one shard."""
    from dsv3_lite.hf import load_release, save_release

    model = random_model()
    save_release(model, tmp_path / "one", fp8=True)
    save_release(model, tmp_path / "many", fp8=True, shard_bytes=shard_bytes)
    weight_map = read_index(tmp_path / "many")["weight_map"]
    scales = [n for n in weight_map if n.endswith("_scale_inv")]
    assert len(set(weight_map.values())) > 10 and scales
    assert all(weight_map[n] == weight_map[n.removesuffix("_scale_inv")] for n in scales)
    assert torch.equal(logits(load_release(tmp_path / "many")), logits(load_release(tmp_path / "one")))


def move_scales_to_their_own_shard(folder):
    """Rewrite a one-shard FP8 release so that every weight_scale_inv sits in another shard than its weight."""
    from safetensors.torch import load_file, save_file

    shard = folder / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    scales = {n: tensors.pop(n) for n in list(tensors) if n.endswith("_scale_inv")}
    save_file(tensors, shard)
    save_file(scales, folder / "scales.safetensors")
    write_index(folder, {**dict.fromkeys(tensors, shard.name), **dict.fromkeys(scales, "scales.safetensors")})
    return tensors, scales


def test_a_scale_in_another_shard_is_found_through_the_index(tmp_path):
    from safetensors.torch import save_file

    from dsv3_lite.hf import load_release, save_release

    model = random_model()
    save_release(model, tmp_path, fp8=True)
    expected = logits(load_release(tmp_path))
    tensors, scales = move_scales_to_their_own_shard(tmp_path)
    assert torch.equal(logits(load_release(tmp_path)), expected)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    del scales[name + "_scale_inv"]  # an FP8 weight left without its scales
    save_file(scales, tmp_path / "scales.safetensors")
    write_index(tmp_path, {**dict.fromkeys(tensors, "model-00001-of-00001.safetensors"),
                           **dict.fromkeys(scales, "scales.safetensors")})
    with pytest.raises(ValueError, match=rf"'{name}' is FP8 \(torch.float8_e4m3fn\) but .* names no "
                                         rf"'{name}_scale_inv': an FP8 weight needs its block scales"):
        load_release(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_scale_that_is_not_finite_and_positive_is_named(tmp_path, bad):
    from safetensors.torch import save_file

    from dsv3_lite.hf import load_release, save_release

    save_release(random_model(mtp_depth=1), tmp_path, fp8=True)
    tensors, scales = move_scales_to_their_own_shard(tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    scales[name] = torch.full_like(scales[name], bad)
    save_file(scales, tmp_path / "scales.safetensors")
    with pytest.raises(ValueError, match=rf"'{name}' holds a NaN, infinite or non-positive value"):
        load_release(tmp_path)


@pytest.mark.parametrize("entry", ["../outside/stolen.safetensors", "ABSOLUTE", "../../../../etc/passwd",
                                   "sub/model-00001-of-00001.safetensors", "..", "SYMLINK"])
def test_shards_outside_the_release_folder_are_refused(tmp_path, entry):
    import shutil

    from dsv3_lite.hf import load_release, save_release

    release, outside = tmp_path / "release", tmp_path / "outside"
    save_release(random_model(mtp_depth=1), release, fp8=False)
    outside.mkdir()
    (release / "sub").mkdir()
    for folder in (outside, release / "sub"):  # a loadable shard there: only the rule can refuse it
        shutil.copy(release / "model-00001-of-00001.safetensors", folder / "model-00001-of-00001.safetensors")
    shutil.copy(release / "model-00001-of-00001.safetensors", outside / "stolen.safetensors")
    if entry == "ABSOLUTE":
        entry = str(outside / "stolen.safetensors")
    elif entry == "SYMLINK":
        entry = "model-00001-of-00001.safetensors"
        (release / entry).unlink()
        (release / entry).symlink_to(outside / "stolen.safetensors")
    write_index(release, dict.fromkeys(read_index(release)["weight_map"], entry))
    with pytest.raises(ValueError, match=r"a shard must be a (plain file name|file) inside"):
        load_release(release)


@pytest.mark.parametrize("fp8", [False, True])
def test_mtp_copies_of_the_embedding_and_head_are_saved_and_restored(tmp_path, fp8):
    """With 2 MTP layers, each stores its own copy of the main model's embedding and head (one shard); loading
    gives the same model, whose MTP modules share the main model's embedding and head again."""
    from safetensors import safe_open

    from dsv3_lite.hf import load_release, save_release

    model = random_model(mtp_depth=2)
    save_release(model, tmp_path, fp8=fp8)
    n = model.args.n_layers
    with safe_open(tmp_path / "model-00001-of-00001.safetensors", framework="pt") as f:
        for k in (n, n + 1):
            assert torch.equal(f.get_tensor(f"model.layers.{k}.embed_tokens.weight"),
                               f.get_tensor("model.embed_tokens.weight"))
            assert torch.equal(f.get_tensor(f"model.layers.{k}.shared_head.head.weight"),
                               f.get_tensor("lm_head.weight"))
    back = load_release(tmp_path)
    assert back.args.mtp_depth == 2
    assert all(m.embed is back.embed and m.head is back.head for m in back.mtp)
    if not fp8:
        assert torch.equal(logits(back), logits(model))
        tokens = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ours, theirs = (m.loss(tokens[:, :-1], tokens[:, 1:], mtp_lambda=0.3) for m in (model, back))
        assert [float(d) for d in theirs.mtp_depths] == [float(d) for d in ours.mtp_depths]


def test_a_save_that_fails_leaves_the_earlier_release_loadable(tmp_path, monkeypatch):
    from dsv3_lite import hf
    from dsv3_lite.hf import load_release, save_release

    old, new = random_model(mtp_depth=1), random_model(mtp_depth=2)
    save_release(old, tmp_path, fp8=False, shard_bytes=100_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    real_save_file = hf.save_file
    monkeypatch.setattr(hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_release(new, tmp_path, fp8=True, shard_bytes=100_000)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    assert torch.equal(logits(load_release(tmp_path)), logits(old))
    save_release(new, tmp_path, fp8=False)  # one shard: the earlier save's other shards go
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert torch.equal(logits(load_release(tmp_path)), logits(new))


def test_broken_files_and_wrong_arguments_are_named(tmp_path):
    from dsv3_lite.hf import load_release, save_release

    save_release(random_model(mtp_depth=1), tmp_path, fp8=True)
    index = tmp_path / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[:-20])
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON"):
        load_release(tmp_path)
    index.write_text('{"weight_map": ["model-00001-of-00001.safetensors"]}')
    with pytest.raises(ValueError, match=r"index.json must have a 'weight_map' object"):
        load_release(tmp_path)
    shard = tmp_path / "model-00001-of-00001.safetensors"
    write_index(tmp_path, {"model.extra.weight": shard.name})
    with pytest.raises(ValueError, match=r"the index maps 'model.extra.weight' to shard model-00001-of-00001"
                                         r".safetensors, which cannot give it"):
        load_release(tmp_path)
    index.write_text(text)
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"shard model-00001-of-00001.safetensors is not a readable safetensors "
                                         r"file \(truncated or corrupt\?\)"):
        load_release(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"names the shard 'model-00001-of-00001.safetensors', which is "
                                                r"not a file"):
        load_release(tmp_path)
    with pytest.raises(TypeError, match=r"hf_model must be a transformers model .* got str: .*load_release"):
        from_hf(str(tmp_path))
    with pytest.raises(TypeError, match=r"hf_model must be a transformers model .* got NoneType"):
        from_hf(None)
    with pytest.raises(ValueError, match=r"shard_bytes \(0\) must be >= 1"):
        save_release(random_model(mtp_depth=1), tmp_path, shard_bytes=0)


def test_save_release_never_writes_over_a_folder_that_is_not_a_release(tmp_path):
    """A dsv3_lite checkpoint, or a folder with a config.json of its own, used to be overwritten."""
    from dsv3_lite.hf import save_release

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files and is not a release \(it has no "
                                         r"model.safetensors.index.json\): save_release writes into a new or empty"):
        save_release(random_model(mtp_depth=1), tmp_path, fp8=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]
    assert (tmp_path / "config.json").read_text() == "{}"


# the fields of config.json in DeepSeek's release of DeepSeek-V3 (Hugging Face deepseek-ai/DeepSeek-V3), but
# auto_map (the release's own modeling code) and transformers_version
RELEASED_CONFIG_FIELDS = {
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "ep_size",
    "first_k_dense_replace", "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
    "kv_lora_rank", "max_position_embeddings", "model_type", "moe_intermediate_size", "moe_layer_freq", "n_group",
    "n_routed_experts", "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
    "num_hidden_layers", "num_key_value_heads", "num_nextn_predict_layers", "q_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "quantization_config", "rms_norm_eps", "rope_scaling", "rope_theta",
    "routed_scaling_factor", "scoring_func", "tie_word_embeddings", "topk_group", "topk_method", "torch_dtype",
    "use_cache", "v_head_dim", "vocab_size"}


@pytest.mark.parametrize("rope_factor", [1.0, 4.0])
def test_the_release_config_has_the_released_names_and_both_readers_agree(tmp_path, rope_factor):
    import json

    from transformers import AutoConfig

    from dsv3_lite.config import ModelArgs
    from dsv3_lite.hf import RELEASE_QUANTIZATION, hf_config, load_release, save_release

    args = ModelArgs.tiny(mtp_depth=1, rope_factor=rope_factor, original_seq_len=16, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    save_release(model, tmp_path, fp8=True, eos_token_id=256)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) == RELEASED_CONFIG_FIELDS
    assert config["quantization_config"] == RELEASE_QUANTIZATION and config["eos_token_id"] == 256
    assert (config["model_type"], config["scoring_func"], config["topk_method"]) == (
        "deepseek_v3", "sigmoid", "noaux_tc")
    if rope_factor > 1:
        assert config["rope_scaling"] == dict(type="yarn", factor=4.0, original_max_position_embeddings=16,
                                              beta_fast=args.beta_fast, beta_slow=args.beta_slow,
                                              mscale=args.mscale, mscale_all_dim=args.mscale)
    else:
        assert config["rope_scaling"] is None
    expected = {k: v for k, v in hf_config(args).items() if k != "rope_interleave"}
    for theirs in (AutoConfig.from_pretrained(tmp_path), DeepseekV3Config.from_pretrained(tmp_path)):
        assert type(theirs) is DeepseekV3Config and theirs.num_nextn_predict_layers == 1
        assert {k: v for k, v in hf_config(args_from_hf_config(theirs).replace(mtp_depth=1)).items()
                if k != "rope_interleave"} == expected
    assert load_release(tmp_path).args == args_from_hf_config(
        DeepseekV3Config.from_pretrained(tmp_path)).replace(mtp_depth=1)
    (tmp_path / "config.json").write_text(json.dumps({**config, "scoring_func": "softmax"}))
    with pytest.raises(ValueError, match=r"scoring_func \('softmax'\) is not supported"):
        load_release(tmp_path)
