"""ModelArgs: the report's counts for the 671B shape, and every validation rule."""
import math

import pytest
import torch

from dsv3_lite import ModelArgs
from dsv3_lite.model import Transformer


@pytest.fixture(scope="module")
def v3():
    return ModelArgs.deepseek_v3()


def test_v3_total_parameters_match_the_release(v3):
    # Report and release: 671B total parameters in the main model (685B on disk with the MTP module).
    assert round(v3.num_params() / 1e9, 1) == 671.0


def test_v3_activated_parameters(v3):
    # Report: 37B activated per token; 36.6-36.7B without the input embedding.
    assert 37.0e9 <= v3.num_activated_params() <= 38.0e9
    assert 36.6e9 <= v3.num_activated_params(include_embedding=False) <= 36.7e9


def test_v3_mtp_module_is_about_11_5b_unique(v3):
    # Report: the MTP module adds about 11.5B unique parameters (embedding and head are shared); the exact
    # count of its modules (projection 2d -> d, one MoE block, two input RMSNorms) is 11.61B.
    assert v3.mtp_module_params() == 11_610_068_224
    assert math.isclose(v3.mtp_module_params(), 11.5e9, rel_tol=0.01)
    # ... and it is what the real modules hold (a 4-layer V3 on the meta device: nothing is allocated)
    with torch.device("meta"):
        model = Transformer(v3.replace(n_layers=4))
    assert model.num_params(mtp=True) - model.num_params() == v3.mtp_module_params()


def test_v3_mla_cache_is_70272_bytes_per_token(v3):
    assert v3.kv_cache_bytes_per_token() == (512 + 64) * 61 * 2 == 70_272
    assert v3.kv_cache_bytes_per_token(bytes_per_element=1) == 35_136


def test_v3_softmax_scale_with_yarn(v3):
    assert math.isclose(v3.softmax_scale(), 0.1352338, rel_tol=1e-6)
    short = v3.replace(max_seq_len=4096)
    assert math.isclose(short.softmax_scale(), 192 ** -0.5)


def test_breakdown_adds_up_and_per_component_formulas(v3):
    parts = v3.param_breakdown()
    assert parts["embedding"] == parts["output head"] == 129280 * 7168
    assert parts["MoE"] == 58 * ((256 + 1) * 3 * 7168 * 2048 + 256 * 7168 + 256)
    assert parts["dense FFN"] == 3 * 3 * 7168 * 18432
    assert parts["norms"] == 61 * 2 * 7168 + 7168  # two pre-norms per block and the final norm
    # One MLA layer, from its projections: W_DQ, W_UQ, W_DKV+W_KR, W_UKV, W_O (the latent RMSNorms are part of MLA).
    mla = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert parts["attention (MLA)"] == 61 * (mla + 1536 + 512)
    moe = (256 + 1) * 3 * 7168 * 2048 + 256 * 7168 + 256
    total = 2 * 129280 * 7168 + 61 * (mla + 1536 + 512) + 3 * 3 * 7168 * 18432 + 58 * moe + 61 * 2 * 7168 + 7168
    assert v3.num_params() == total


def test_query_without_lora():
    args = ModelArgs.tiny(q_lora_rank=0)
    assert args.attention_params() == ModelArgs.tiny().attention_params() - (
        64 * 32 + 32 + 32 * 4 * 24) + 64 * 4 * 24


def test_tiny_preset_is_small_and_valid():
    tiny = ModelArgs.tiny()
    assert tiny.num_params() < 1_000_000
    assert tiny.vocab_size == 260
    assert tiny.n_dense_layers < tiny.n_layers and tiny.mtp_depth == 1


@pytest.mark.parametrize("field, value, message", [
    ("dim", 0, r"dim \(0\) must be > 0"),
    ("n_heads", -4, r"n_heads \(-4\) must be > 0"),
    ("vocab_size", 0, r"vocab_size \(0\) must be > 0"),
    ("kv_lora_rank", 0, r"kv_lora_rank \(0\) must be > 0"),
    ("q_lora_rank", -1, r"q_lora_rank \(-1\) must be >= 0"),
    ("mtp_depth", -1, r"mtp_depth \(-1\) must be >= 0"),
    ("n_activated_experts", 9, r"n_activated_experts \(9\) must be <= n_routed_experts \(8\)"),
    ("n_expert_groups", 3, r"n_routed_experts \(8\) must be divisible by n_expert_groups \(3\)"),
    ("n_limited_groups", 5, r"n_limited_groups \(5\) must be <= n_expert_groups \(4\)"),
    ("qk_rope_head_dim", 7, r"qk_rope_head_dim \(7\) must be even"),
    ("n_dense_layers", 4, r"n_dense_layers \(4\) must be <= n_layers \(3\)"),
    ("score_func", "relu", r"score_func \('relu'\) must be 'sigmoid' or 'softmax'"),
    ("attn_impl", "flash", r"attn_impl \('flash'\) must be 'naive' or 'absorb'"),
    ("route_scale", 0.0, r"route_scale \(0.0\) must be > 0"),
    ("rms_norm_eps", 0.0, r"rms_norm_eps \(0.0\) must be > 0"),
    ("bias_update_speed", -0.1, r"bias_update_speed \(-0.1\) must be >= 0"),
    ("rope_factor", 0.5, r"rope_factor \(0.5\) must be >= 1"),
    ("beta_fast", 1, r"beta_fast \(1\) must be > beta_slow \(1\)"),
    ("beta_slow", 0, r"beta_slow \(0\) must be > 0"),
    ("rope_theta", 1.0, r"rope_theta \(1.0\) must be > 1"),
    ("mscale", -1.0, r"mscale \(-1.0\) must be >= 0"),
    ("route_scale", float("nan"), r"route_scale \(nan\) must be finite"),
    ("init_std", float("inf"), r"init_std \(inf\) must be finite"),
    ("rope_theta", float("inf"), r"rope_theta \(inf\) must be finite"),
    ("bias_update_speed", float("-inf"), r"bias_update_speed \(-inf\) must be finite"),
])
def test_impossible_configurations_name_the_field_and_rule(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.tiny(**{field: value})


def test_top_k_larger_than_the_eligible_groups_is_rejected():
    # 8 experts in 4 groups of 2, 2 groups eligible: only 4 experts can be chosen.
    with pytest.raises(ValueError, match=r"n_activated_experts \(5\) must be <= the experts in n_limited_groups"):
        ModelArgs.tiny(n_activated_experts=5)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="dim must be an int"):
        ModelArgs.tiny(dim=64.0)
    with pytest.raises(TypeError, match="n_layers must be an int"):
        ModelArgs.tiny(n_layers=True)
    with pytest.raises(TypeError, match="route_scale must be a number, got str"):
        ModelArgs.tiny(route_scale="2.5")


def test_model_args_are_frozen():
    import dataclasses

    args = ModelArgs.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.dim = 128
    assert args.replace(dim=128).dim == 128 and args.dim == 64


def test_replace_revalidates():
    with pytest.raises(ValueError, match="n_dense_layers"):
        ModelArgs.tiny().replace(n_layers=0 + 1, n_dense_layers=2)
