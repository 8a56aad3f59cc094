"""Load Hugging Face transformers' `DeepseekV3ForCausalLM` (and its MTP layers) into a dsv3_lite `Transformer`.

This module is the one place that knows both naming schemes. transformers follows the released checkpoint
(`model.layers.{i}.self_attn.q_a_proj`, `mlp.experts`, ...); dsv3_lite follows DeepSeek's reference
inference code (`layers.{i}.attn.wq_a`, `ffn.experts`, ...). Two layouts differ beyond names:

- RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... A transformers config with
  `rope_interleave=False` rotates halves (x_j, x_{j + d/2}) instead, so the rope rows of the query projection
  and of kv_a_proj_with_mqa are permuted; q . k is the same either way.
- Experts: transformers 5.x fuses every expert's gate and up projections into `experts.gate_up_proj`
  (E, 2I, H) and the down projections into `experts.down_proj` (E, H, I); checkpoints (and older versions)
  name each expert `experts.{j}.gate_proj` etc. Both are read.

transformers itself is imported by the caller, never here, so `import dsv3_lite` does not need it.
"""
from __future__ import annotations

from typing import Any

import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.model import Transformer

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _half_split_order(rope_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def rope_rows_to_half_split(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last `rope_dim` rows (dim -2) from DeepSeek's interleaved pairs to transformers' halves."""
    return rows[..., _half_split_order(rope_dim), :]


def rope_rows_to_interleaved(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Inverse of `rope_rows_to_half_split`."""
    return rows[..., torch.argsort(_half_split_order(rope_dim)), :]


def args_from_hf_config(config: Any, **overrides) -> ModelArgs:
    """The `ModelArgs` of a transformers `DeepseekV3Config` (mtp_depth 0; `from_hf` sets it when it loads
    MTP layers). `overrides` sets fields transformers has no equivalent for (e.g. max_batch_size)."""
    unsupported = {
        "hidden_act": (config.hidden_act, "silu"), "attention_bias": (config.attention_bias, False),
        "norm_topk_prob": (config.norm_topk_prob, True),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"{name} ({value!r}) is not supported: DeepSeek-V3 uses {wanted!r}")
    rope = dict(config.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    fields: dict[str, Any] = dict(rope_theta=float(rope.get("rope_theta", 10000.0)))
    if rope_type == "yarn":
        fields.update(rope_factor=float(rope["factor"]),
                      original_seq_len=int(rope.get("original_max_position_embeddings")
                                           or config.max_position_embeddings),
                      beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
                      mscale=float(rope.get("mscale", 1.0)))
        if float(rope.get("mscale_all_dim", 0.0)) != fields["mscale"]:
            raise ValueError(f"YaRN with mscale ({rope.get('mscale')}) != mscale_all_dim "
                             f"({rope.get('mscale_all_dim')}) is not supported (DeepSeek-V3: both 1.0)")
        if config.max_position_embeddings <= fields["original_seq_len"]:
            raise ValueError(f"YaRN needs max_position_embeddings ({config.max_position_embeddings}) > "
                             f"original_max_position_embeddings ({fields['original_seq_len']})")
    elif rope_type == "default":
        fields.update(rope_factor=1.0, original_seq_len=config.max_position_embeddings)
    else:
        raise ValueError(f"rope_type ({rope_type!r}) is not supported: use 'default' or 'yarn'")
    fields.update(
        vocab_size=config.vocab_size, dim=config.hidden_size, inter_dim=config.intermediate_size,
        moe_inter_dim=config.moe_intermediate_size, n_layers=config.num_hidden_layers,
        n_dense_layers=min(config.first_k_dense_replace, config.num_hidden_layers),
        max_seq_len=config.max_position_embeddings, n_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank or 0, kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim, n_routed_experts=config.n_routed_experts,
        n_shared_experts=config.n_shared_experts, n_activated_experts=config.num_experts_per_tok,
        n_expert_groups=config.n_group, n_limited_groups=config.topk_group, score_func="sigmoid",
        route_scale=float(config.routed_scaling_factor), rms_norm_eps=config.rms_norm_eps,
        init_std=config.initializer_range, mtp_depth=0,
    )
    fields.update(overrides)
    if rope_type == "yarn" and fields["max_seq_len"] <= fields["original_seq_len"]:
        # dsv3_lite (like DeepSeek's code) applies YaRN only when max_seq_len > original_seq_len;
        # transformers always applies it, so a shorter max_seq_len would silently change the logits.
        raise ValueError(f"max_seq_len ({fields['max_seq_len']}) must be > original_seq_len "
                         f"({fields['original_seq_len']}) for a YaRN checkpoint, or its rope would differ")
    return ModelArgs(**fields)


def _block_state(hf: dict[str, torch.Tensor], src: str, dst: str, args: ModelArgs, moe: bool,
                 rope_interleave: bool) -> dict[str, torch.Tensor]:
    """dsv3_lite names (prefix `dst`) -> tensors for one transformers decoder layer (prefix `src`)."""
    out = {f"{dst}attn_norm.weight": hf[f"{src}input_layernorm.weight"],
           f"{dst}ffn_norm.weight": hf[f"{src}post_attention_layernorm.weight"]}
    for ours, theirs in _ATTN.items():
        if f"{src}self_attn.{theirs}.weight" in hf:
            out[f"{dst}attn.{ours}.weight"] = hf[f"{src}self_attn.{theirs}.weight"]
    if not rope_interleave:
        h, nope, r, c = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
        q_name = f"{dst}attn.{'wq' if args.q_lora_rank == 0 else 'wq_b'}.weight"
        q = out[q_name].view(h, nope + r, -1)
        out[q_name] = torch.cat([q[:, :nope], rope_rows_to_interleaved(q[:, nope:], r)], dim=1).flatten(0, 1)
        kv_a = out[f"{dst}attn.wkv_a.weight"]
        out[f"{dst}attn.wkv_a.weight"] = torch.cat([kv_a[:c], rope_rows_to_interleaved(kv_a[c:], r)])
    mlp = f"{src}mlp."
    if not moe:
        out.update({f"{dst}ffn.{ours}.weight": hf[f"{mlp}{theirs}.weight"] for ours, theirs in _MLP.items()})
        return out
    out[f"{dst}ffn.gate.weight"] = hf[f"{mlp}gate.weight"]
    out[f"{dst}ffn.gate.bias"] = hf[f"{mlp}gate.e_score_correction_bias"]
    fused = f"{mlp}experts.gate_up_proj" in hf  # transformers 5.x in memory; else the checkpoint layout
    for j in range(args.n_routed_experts):
        expert = f"{dst}ffn.experts.{j}."
        if fused:
            gate, up = hf[f"{mlp}experts.gate_up_proj"][j].chunk(2, dim=0)
            out.update({f"{expert}w1.weight": gate, f"{expert}w3.weight": up,
                        f"{expert}w2.weight": hf[f"{mlp}experts.down_proj"][j]})
        else:
            out.update({f"{expert}{ours}.weight": hf[f"{mlp}experts.{j}.{theirs}.weight"]
                        for ours, theirs in _MLP.items()})
    if args.n_shared_experts:
        out.update({f"{dst}ffn.shared_experts.{ours}.weight": hf[f"{mlp}shared_experts.{theirs}.weight"]
                    for ours, theirs in _MLP.items()})
    return out


@torch.no_grad()
def from_hf(hf_model: Any, mtp_model: Any | None = None, **overrides) -> Transformer:
    """A dsv3_lite `Transformer` with the configuration and weights of a transformers `DeepseekV3ForCausalLM`.

    `mtp_model`: optionally transformers' `MtpModel` holding the checkpoint's MTP layers; its layers become
    the model's MTP modules (mtp_depth = their number). Without it the result has no MTP modules.
    `overrides`: extra `ModelArgs` fields (e.g. max_batch_size, attn_impl). Weights are copied in FP32.
    """
    config = hf_model.config
    depth = len(mtp_model.layers) if mtp_model is not None else 0
    args = args_from_hf_config(config, **overrides).replace(mtp_depth=depth)
    hf = {k: v.detach().float() for k, v in hf_model.state_dict().items()}
    interleave = bool(getattr(config, "rope_interleave", True))
    state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "head.weight": hf["lm_head.weight"]}
    for i in range(args.n_layers):
        state.update(_block_state(hf, f"model.layers.{i}.", f"layers.{i}.", args, i >= args.n_dense_layers,
                                  interleave))
    if mtp_model is not None:
        mtp = {k: v.detach().float() for k, v in mtp_model.state_dict().items()}
        for k in range(depth):
            src, dst = f"layers.{k}.", f"mtp.{k}."
            state.update({f"{dst}{name}.weight": mtp[f"{src}{name}.weight"] for name in ("enorm", "hnorm", "eh_proj")})
            state[f"{dst}norm.weight"] = mtp[f"{src}post_norm.weight"]
            state.update(_block_state(mtp, f"{src}mtp_block.", f"{dst}block.", args, args.n_moe_layers > 0,
                                      interleave))
            state[f"{dst}embed.weight"], state[f"{dst}head.weight"] = state["embed.weight"], state["head.weight"]
    model = Transformer(args)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return model.eval()


__all__ = ["from_hf", "args_from_hf_config", "rope_rows_to_half_split", "rope_rows_to_interleaved"]
