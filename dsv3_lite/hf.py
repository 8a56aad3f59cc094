"""Load Hugging Face transformers' `DeepseekV3ForCausalLM` (and its MTP layers)
into a dsv3_lite `Transformer`.

This module is the one place that knows both naming schemes. transformers follows
the released checkpoint (`model.layers.{i}.self_attn.q_a_proj`, `mlp.experts`, ...);
dsv3_lite follows DeepSeek's reference inference code (`layers.{i}.attn.wq_a`,
`ffn.experts`, ...). Two layouts differ beyond names:

- RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... A transformers
  config with `rope_interleave=False` rotates halves (x_j, x_{j + d/2}) instead,
  so the rope rows of the query projection and of kv_a_proj_with_mqa are permuted;
  q . k is the same either way.
- Experts: transformers 5.x fuses every expert's gate and up projections into
  `experts.gate_up_proj` (E, 2I, H) and the down projections into `experts.down_proj`
  (E, H, I); checkpoints (and older versions) name each expert `experts.{j}.gate_proj`
  etc. Both are read.

The config and the weights fix the model: `from_hf` accepts only overrides that
leave its outputs unchanged (`OVERRIDABLE`), and a config that does not describe
its weights (a weight missing, of another shape, or left unused) fails naming
the weight and the config field.

DeepSeek's released checkpoints use the same names, one matrix per expert, the MTP
module stored as an extra last layer, and FP8 E4M3 linear weights with an FP32
`weight_scale_inv` per 128x128 block: `save_release` writes that layout and
`load_release` reads it, shard by shard.

The way back: `hf_config` and `to_hf_state_dict` give a `DeepseekV3Config`'s fields
and a state dict in transformers' names, and `to_hf` builds the transformers model
from them. transformers is imported only inside `to_hf`, so `import dsv3_lite`
does not need it.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import re
import types
import uuid
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv3_lite.config import ModelArgs, check_int
from dsv3_lite.fp8 import weight_dequant, weight_quant
from dsv3_lite.model import Transformer

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm",
         "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
         "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

# The ModelArgs fields an override may set: cache sizes, the attention path and
# coefficients used only in training leave the loaded model's outputs unchanged. The
# config and the weights fix every other field.
OVERRIDABLE = ("max_batch_size", "max_seq_len", "attn_impl", "bias_update_speed",
               "seq_aux_alpha", "aux_loss_alpha")
# For error messages, by the first pattern a transformers weight name matches: the
# config field that decides whether the weight exists, and those that set its shape.
_EXISTS_BY = ((r"shared_experts\.", "n_shared_experts"),
              (r"experts\.", "n_routed_experts"), (r"mlp\.", "first_k_dense_replace"),
              (r"q_(a_|b_)?proj\.|q_a_layernorm\.", "q_lora_rank"),
              (r"^model\.layers\.", "num_hidden_layers"))
_SHAPE_BY = (
    (r"shared_experts\.", ("n_shared_experts", "moe_intermediate_size",
                           "hidden_size")),
    (r"experts\.", ("n_routed_experts", "moe_intermediate_size", "hidden_size")),
    (r"mlp\.gate\.", ("n_routed_experts", "hidden_size")),
    (r"mlp\.", ("intermediate_size", "hidden_size")),
    (r"q_a_", ("q_lora_rank", "hidden_size")),
    (r"q_b_proj|q_proj", ("num_attention_heads", "qk_nope_head_dim",
                          "qk_rope_head_dim", "q_lora_rank", "hidden_size")),
    (r"kv_a_proj", ("kv_lora_rank", "qk_rope_head_dim", "hidden_size")),
    (r"kv_a_layernorm", ("kv_lora_rank",)),
    (r"kv_b_proj", ("num_attention_heads", "qk_nope_head_dim", "v_head_dim",
                    "kv_lora_rank")),
    (r"o_proj", ("num_attention_heads", "v_head_dim", "hidden_size")),
    (r"embed_tokens|lm_head|shared_head", ("vocab_size", "hidden_size")),
    (r"", ("hidden_size",)),  # norms, eh_proj
)


def _half_split_order(rope_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def rope_rows_to_half_split(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last `rope_dim` rows (dim -2) from DeepSeek's interleaved
    pairs to transformers' halves."""
    return rows[..., _half_split_order(rope_dim), :]


def rope_rows_to_interleaved(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Inverse of `rope_rows_to_half_split`."""
    return rows[..., torch.argsort(_half_split_order(rope_dim)), :]


# ModelArgs fields -> the transformers config's (and a released config.json's)
CONFIG_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size",
    "inter_dim": "intermediate_size", "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers", "n_dense_layers": "first_k_dense_replace",
    "max_seq_len": "max_position_embeddings", "n_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor", "rms_norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
}


def args_from_hf_config(config: Any, **overrides) -> ModelArgs:
    """The `ModelArgs` of a transformers `DeepseekV3Config` (mtp_depth 0; `from_hf`
    sets it when it loads MTP layers). `overrides` sets fields that leave the model's
    outputs unchanged (`OVERRIDABLE`)."""
    refused = sorted(set(overrides) - set(OVERRIDABLE))
    if refused:
        raise ValueError(f"cannot override {', '.join(refused)}: "
                         "the transformers config and weights fix "
                         f"every field but {', '.join(OVERRIDABLE)} "
                         "(from_hf sets mtp_depth from mtp_model)")
    unsupported = {
        "hidden_act": (config.hidden_act, "silu"),
        "attention_bias": (config.attention_bias, False),
        "norm_topk_prob": (config.norm_topk_prob, True),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"{name} ({value!r}) is not supported: DeepSeek-V3 "
                             f"uses {wanted!r}")
    rope = dict(config.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    fields: dict[str, Any] = dict(rope_theta=float(rope.get("rope_theta", 10000.0)))
    if rope_type == "yarn":
        fields.update(rope_factor=float(rope["factor"]),
                      original_seq_len=int(
                          rope.get("original_max_position_embeddings")
                          or config.max_position_embeddings),
                      beta_fast=rope.get("beta_fast", 32),
                      beta_slow=rope.get("beta_slow", 1),
                      mscale=float(rope.get("mscale", 1.0)))
        if float(rope.get("mscale_all_dim", 0.0)) != fields["mscale"]:
            raise ValueError(f"YaRN with mscale ({rope.get('mscale')}) != "
                             f"mscale_all_dim ({rope.get('mscale_all_dim')}) is not "
                             "supported (DeepSeek-V3: both 1.0)")
        if config.max_position_embeddings <= fields["original_seq_len"]:
            raise ValueError("YaRN needs max_position_embeddings "
                             f"({config.max_position_embeddings}) > "
                             "original_max_position_embeddings "
                             f"({fields['original_seq_len']})")
    elif rope_type == "default":
        fields.update(rope_factor=1.0,
                      original_seq_len=config.max_position_embeddings)
    else:
        raise ValueError(f"rope_type ({rope_type!r}) is not supported: use "
                         "'default' or 'yarn'")
    fields.update({ours: getattr(config, theirs)
                   for ours, theirs in CONFIG_NAMES.items()})
    fields.update(
        n_dense_layers=min(config.first_k_dense_replace, config.num_hidden_layers),
        q_lora_rank=config.q_lora_rank or 0, score_func="sigmoid",
        route_scale=float(config.routed_scaling_factor), mtp_depth=0)
    fields.update(overrides)
    if rope_type == "yarn" and fields["max_seq_len"] <= fields["original_seq_len"]:
        # dsv3_lite (like DeepSeek's code) applies YaRN only when
        # max_seq_len > original_seq_len; transformers always applies it, so a shorter
        # max_seq_len would silently change the logits.
        raise ValueError(f"max_seq_len ({fields['max_seq_len']}) must be > "
                         f"original_seq_len ({fields['original_seq_len']}) for a "
                         "YaRN checkpoint, or its rope would differ")
    try:
        return ModelArgs(**fields)
    except (TypeError, ValueError) as err:  # named by the config's field
        field = re.match(r"\w*", str(err))[0]
        if field not in CONFIG_NAMES:
            raise
        raise type(err)(f"{CONFIG_NAMES[field]}: {err} (ModelArgs.{field} is the "
                        f"config's {CONFIG_NAMES[field]})") from None


class _Weights:
    """A transformers module's tensors (in FP32), taken by name and shape. A weight
    that is missing, of another shape, or never taken means the config does not
    describe these weights; the error names the weight and the config field.
    Taking a weight drops this object's reference to it, so a tensor nobody else
    holds is freed once the model has its converted copy."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: Any,
                 source: str | None = None):
        self.tensors = {k: v.detach().float() for k, v in tensors.items()}
        self.config = config
        self.source = source  # where the weights were listed, if not a model

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _fields(self, name: str, table: tuple) -> str:
        fields = next((f for pattern, f in table if re.search(pattern, name)), None)
        if fields is None:
            return "the config"
        return "the config's " + ", ".join(
            f"{f} ({getattr(self.config, f)})"
            for f in ((fields,) if isinstance(fields, str) else fields))

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            if self.source is not None:
                raise ValueError(f"weight {name!r} is missing: {self.source} names "
                                 "no shard for it (an index that lost entries?)")
            raise ValueError(f"transformers weight {name!r} is missing: the weights "
                             f"do not match {self._fields(name, _EXISTS_BY)}")
        tensor = self.tensors[name]
        if tensor.shape != shape:
            raise ValueError(f"transformers weight {name!r} has shape "
                             f"{tuple(tensor.shape)}, but the config implies "
                             f"{tuple(shape)}: the weights do not match "
                             f"{self._fields(name, _SHAPE_BY)}")
        return self.tensors.pop(name)

    def check_all_taken(self) -> None:
        unused = sorted(self.tensors)
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            raise ValueError(f"transformers weights {', '.join(unused[:3])}{more} "
                             "are left unused: the weights do not match "
                             f"{self._fields(unused[0], _EXISTS_BY)}")


def _block_state(hf: _Weights, src: str, dst: str, shapes: dict[str, torch.Size],
                 args: ModelArgs, rope_interleave: bool) -> dict[str, torch.Tensor]:
    """dsv3_lite names (prefix `dst`) -> tensors for one transformers decoder layer
    (prefix `src`). The dsv3_lite model's `shapes` say which tensors the config
    calls for, and their shapes."""
    out: dict[str, torch.Tensor] = {}

    def take(theirs: str, ours: str) -> None:
        out[f"{dst}{ours}"] = hf.take(f"{src}{theirs}", shapes[f"{dst}{ours}"])

    take("input_layernorm.weight", "attn_norm.weight")
    take("post_attention_layernorm.weight", "ffn_norm.weight")
    for ours, theirs in _ATTN.items():
        if f"{dst}attn.{ours}.weight" in shapes:
            take(f"self_attn.{theirs}.weight", f"attn.{ours}.weight")
    if not rope_interleave:
        h, nope, r, c = (args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim,
                         args.kv_lora_rank)
        q_name = f"{dst}attn.{'wq' if args.q_lora_rank == 0 else 'wq_b'}.weight"
        q = out[q_name].view(h, nope + r, -1)
        out[q_name] = torch.cat(
            [q[:, :nope], rope_rows_to_interleaved(q[:, nope:], r)],
            dim=1).flatten(0, 1)
        kv_a = out[f"{dst}attn.wkv_a.weight"]
        out[f"{dst}attn.wkv_a.weight"] = torch.cat(
            [kv_a[:c], rope_rows_to_interleaved(kv_a[c:], r)])
    if f"{dst}ffn.gate.weight" not in shapes:  # a dense layer
        for ours, theirs in _MLP.items():
            take(f"mlp.{theirs}.weight", f"ffn.{ours}.weight")
        return out
    take("mlp.gate.weight", "ffn.gate.weight")
    take("mlp.gate.e_score_correction_bias", "ffn.gate.bias")
    n, dim, inter = shapes[f"{dst}ffn.experts.w2"]
    # transformers 5.x in memory (gate and up projections already stacked, as in
    # our w13); else the checkpoint layout, one matrix per expert and projection
    if f"{src}mlp.experts.gate_up_proj" in hf:
        out[f"{dst}ffn.experts.w13"] = hf.take(f"{src}mlp.experts.gate_up_proj",
                                               (n, 2 * inter, dim))
        out[f"{dst}ffn.experts.w2"] = hf.take(f"{src}mlp.experts.down_proj",
                                              (n, dim, inter))
    else:
        def expert(j: int, theirs: str, shape: tuple[int, int]) -> torch.Tensor:
            return hf.take(f"{src}mlp.experts.{j}.{theirs}.weight", shape)

        out[f"{dst}ffn.experts.w13"] = torch.stack(
            [torch.cat([expert(j, "gate_proj", (inter, dim)),
                        expert(j, "up_proj", (inter, dim))]) for j in range(n)])
        out[f"{dst}ffn.experts.w2"] = torch.stack(
            [expert(j, "down_proj", (dim, inter)) for j in range(n)])
    if args.n_shared_experts:
        for ours, theirs in _MLP.items():
            take(f"mlp.shared_experts.{theirs}.weight",
                 f"ffn.shared_experts.{ours}.weight")
    return out


@torch.no_grad()
def from_hf(hf_model: Any, mtp_model: Any | None = None, **overrides) -> Transformer:
    """A dsv3_lite `Transformer` with the configuration and weights of a
    transformers `DeepseekV3ForCausalLM`.

    `mtp_model`: optionally transformers' `MtpModel` holding the checkpoint's MTP
    layers; its layers become the model's MTP modules (mtp_depth = their number).
    Without it the result has no MTP modules. `overrides`: the `ModelArgs` fields in
    `OVERRIDABLE` (e.g. max_batch_size, attn_impl), which leave the model's outputs
    unchanged. Weights are copied in FP32.
    """
    for name, value in (("hf_model", hf_model), ("mtp_model", mtp_model)):
        if (value is not None or name == "hf_model") and not (
                isinstance(value, torch.nn.Module) and hasattr(value, "config")):
            raise TypeError(f"{name} must be a transformers model (a torch.nn.Module "
                            "with a .config, e.g. DeepseekV3ForCausalLM), got "
                            f"{type(value).__name__}: load a folder with "
                            "DeepseekV3ForCausalLM.from_pretrained, or load_release "
                            "for DeepSeek's released layout")
    config = hf_model.config
    depth = len(mtp_model.layers) if mtp_model is not None else 0
    args = args_from_hf_config(config, **overrides).replace(mtp_depth=depth)
    mtp = _Weights(mtp_model.state_dict(), config) if mtp_model is not None else None
    return _load(args, _Weights(hf_model.state_dict(), config), mtp,
                 bool(getattr(config, "rope_interleave", True)), copy=True)


def _load(args: ModelArgs, hf: _Weights, mtp: _Weights | None,
          interleave: bool, copy: bool) -> Transformer:
    """A `Transformer` of `args` from transformers' tensors: the main model's (`hf`)
    and the MTP layers' (`mtp`, in the names of transformers' `MtpModel`). The
    model is built without memory (on the meta device) and takes the tensors
    themselves, or copies of them if `copy` (tensors that belong to another
    model)."""
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    state = {ours: hf.take(theirs, shapes[ours]) for ours, theirs in (
        ("embed.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"), ("head.weight", "lm_head.weight"))}
    for i in range(args.n_layers):
        state.update(_block_state(hf, f"model.layers.{i}.", f"layers.{i}.", shapes,
                                  args, interleave))
    hf.check_all_taken()
    if mtp is not None:
        for name, ours in (("embed_tokens.weight", "embed.weight"),
                           ("shared_head.weight", "head.weight")):
            # DeepSeek-V3's MTP modules share the main model's embedding
            # and output head
            if name in mtp and not torch.equal(mtp.take(name, shapes[ours]),
                                               state[ours]):
                raise ValueError(f"the MTP layers' {name} differs from the main "
                                 "model's: dsv3_lite's MTP modules share the main "
                                 "model's, as DeepSeek-V3's do")
        for k in range(args.mtp_depth):
            src, dst = f"layers.{k}.", f"mtp.{k}."
            for name in ("enorm", "hnorm", "eh_proj"):
                state[f"{dst}{name}.weight"] = mtp.take(f"{src}{name}.weight",
                                                        shapes[f"{dst}{name}.weight"])
            state[f"{dst}norm.weight"] = mtp.take(f"{src}post_norm.weight",
                                                  shapes[f"{dst}norm.weight"])
            state.update(_block_state(mtp, f"{src}mtp_block.", f"{dst}block.", shapes,
                                      args, interleave))
            (state[f"{dst}embed.weight"],
             state[f"{dst}head.weight"]) = state["embed.weight"], state["head.weight"]
        mtp.check_all_taken()
    model.load_state_dict({k: v.clone() if copy else v for k, v in state.items()},
                          strict=True, assign=True)
    return model.eval()


def hf_config(args: ModelArgs) -> dict[str, Any]:
    """The fields of a transformers `DeepseekV3Config` for `args`: the inverse
    of `args_from_hf_config` (interleaved RoPE, as DeepSeek's weights)."""
    if args.score_func != "sigmoid":
        raise ValueError(f"score_func ({args.score_func!r}) has no transformers "
                         "DeepseekV3 equivalent: it gates with 'sigmoid'")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_factor > 1:
        rope.update(rope_type="yarn", factor=args.rope_factor,
                    original_max_position_embeddings=args.original_seq_len,
                    beta_fast=args.beta_fast, beta_slow=args.beta_slow,
                    mscale=args.mscale, mscale_all_dim=args.mscale)
    return dict(
        vocab_size=args.vocab_size, hidden_size=args.dim,
        intermediate_size=args.inter_dim, moe_intermediate_size=args.moe_inter_dim,
        num_hidden_layers=args.n_layers, first_k_dense_replace=args.n_dense_layers,
        max_position_embeddings=args.max_seq_len, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads, q_lora_rank=args.q_lora_rank or None,
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim,
        n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts,
        num_experts_per_tok=args.n_activated_experts, n_group=args.n_expert_groups,
        topk_group=args.n_limited_groups, routed_scaling_factor=args.route_scale,
        norm_topk_prob=True, rms_norm_eps=args.rms_norm_eps,
        initializer_range=args.init_std, rope_interleave=True,
        rope_parameters=rope, tie_word_embeddings=False, hidden_act="silu",
        attention_bias=False, num_nextn_predict_layers=args.mtp_depth)


def _block_to_hf(state: dict[str, torch.Tensor], src: str,
                 dst: str) -> dict[str, torch.Tensor]:
    """One block's weights (our prefix `src`) in transformers' names (prefix
    `dst`), the experts fused as transformers 5 holds them in memory."""
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             **{f"attn.{k}": f"self_attn.{v}" for k, v in _ATTN.items()},
             **{f"ffn.{k}": f"mlp.{v}" for k, v in _MLP.items()},
             **{f"ffn.shared_experts.{k}": f"mlp.shared_experts.{v}"
                for k, v in _MLP.items()},
             "ffn.gate": "mlp.gate"}
    out = {f"{dst}{theirs}.weight": state[f"{src}{ours}.weight"]
           for ours, theirs in names.items() if f"{src}{ours}.weight" in state}
    if f"{src}ffn.gate.bias" in state:
        out[f"{dst}mlp.gate.e_score_correction_bias"] = state[f"{src}ffn.gate.bias"]
        out[f"{dst}mlp.experts.gate_up_proj"] = state[f"{src}ffn.experts.w13"]
        out[f"{dst}mlp.experts.down_proj"] = state[f"{src}ffn.experts.w2"]
    return out


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The main model's weights in transformers' names and layout (experts
    fused as `gate_up_proj` / `down_proj`, our `w13` / `w2`); the MTP modules
    are not part of `DeepseekV3ForCausalLM`."""
    state = model.state_dict()
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["head.weight"]}
    for i in range(model.args.n_layers):
        out.update(_block_to_hf(state, f"layers.{i}.", f"model.layers.{i}."))
    return {k: v.detach().clone() for k, v in out.items()}


@torch.no_grad()
def to_hf(model: Transformer) -> Any:
    """transformers' `DeepseekV3ForCausalLM` with `model`'s configuration and
    weights (in FP32, eval mode): the inverse of `from_hf` for the main model.
    Imports transformers, which must be installed."""
    transformers = importlib.import_module("transformers")
    config = transformers.DeepseekV3Config(**hf_config(model.args))
    hf_model = transformers.DeepseekV3ForCausalLM(config)
    hf_model.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf_model.float().eval()


# ------------------------------------------------------------ the released layout
# config.json's quantization_config in DeepSeek's release
RELEASE_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3",
                        "activation_scheme": "dynamic",
                        "weight_block_size": [128, 128]}
_SCALE = "_scale_inv"  # an FP8 weight's block scales: f"{name}_scale_inv"
# quantized in the release: every linear layer of the blocks (not the gate,
# embedding, head, norms, nor MTP's eh_proj)
_RELEASE_FP8 = re.compile(
    r"\.(self_attn\.\w+_proj(_with_mqa)?|mlp\.(\w+\.)*\w+_proj)\.weight$")


def _per_expert(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused experts -> the checkpoint's one matrix per expert."""
    out = {}
    for name, tensor in fused.items():
        match = re.fullmatch(r"(.*mlp\.experts)\.(gate_up|down)_proj", name)
        if match is None:
            out[name] = tensor
            continue
        for j, matrix in enumerate(tensor):
            prefix = f"{match[1]}.{j}."
            if match[2] == "down":
                out[prefix + "down_proj.weight"] = matrix
            else:
                gate, up = matrix.chunk(2)
                out[prefix + "gate_proj.weight"] = gate
                out[prefix + "up_proj.weight"] = up
    return out


def release_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Every weight in the release's names, in FP32: one matrix per expert, and
    MTP module k stored as layer n_layers + k (its block, enorm, hnorm, eh_proj,
    shared_head.norm, and copies of the embedding and head)."""
    state, n = model.state_dict(), model.args.n_layers
    out = to_hf_state_dict(model)
    for k in range(model.args.mtp_depth):
        src, dst = f"mtp.{k}.", f"model.layers.{n + k}."
        out.update(_block_to_hf(state, f"{src}block.", dst))
        for ours, theirs in (("enorm", "enorm"), ("hnorm", "hnorm"),
                             ("eh_proj", "eh_proj"), ("norm", "shared_head.norm")):
            out[f"{dst}{theirs}.weight"] = state[f"{src}{ours}.weight"]
        out[f"{dst}embed_tokens.weight"] = state["embed.weight"]
        out[f"{dst}shared_head.head.weight"] = state["head.weight"]
    return {k: v.detach().float().contiguous() for k, v in _per_expert(out).items()}


def release_config(args: ModelArgs, fp8: bool = True, bos_token_id: int | None = None,
                   eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json of a release of `args`, in the field names of DeepSeek's released
    DeepSeek-V3 config (`rope_theta` and `rope_scaling` with a `type`,
    `scoring_func`, `topk_method`, `quantization_config`, ...), which both DeepSeek's
    modeling code and transformers' `DeepseekV3Config` read. `bos_token_id` and
    `eos_token_id`: the tokenizer's, which `args` does not know
    (null if not given)."""
    fields = hf_config(args)
    rope = dict(fields.pop("rope_parameters"))
    del fields["rope_interleave"]  # the release always rotates interleaved pairs
    rope_theta, rope_type = rope.pop("rope_theta"), rope.pop("rope_type")
    scaling = None if rope_type == "default" else {**rope, "type": rope_type}
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        **fields, "rope_theta": rope_theta, "rope_scaling": scaling,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "ep_size": 1, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": "bfloat16" if fp8 else "float32"}
    if fp8:
        config["quantization_config"] = dict(RELEASE_QUANTIZATION)
    return dict(sorted(config.items()))


def _shards(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    """Names of `tensors` packed in order into shards of at most about `shard_bytes`,
    each weight in the same shard as its `weight_scale_inv`."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in tensors:
        if name.endswith(_SCALE):
            continue  # goes with its weight
        group = [name] + ([name + _SCALE] if name + _SCALE in tensors else [])
        nbytes = sum(tensors[n].nbytes for n in group)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1] += group
        size += nbytes
    return shards


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with a copy of each tensor whose memory an earlier one already holds:
    safetensors refuses tensors that share memory, and the MTP layers' embedding and
    head are the main model's tensors themselves."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.nbytes)
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def save_release(model: Transformer, directory: str | pathlib.Path, fp8: bool = True,
                 shard_bytes: int = 5 * 2**30, bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> pathlib.Path:
    """Write `model` in DeepSeek's released layout: config.json (`release_config`),
    shards `model-0000i-of-0000n.safetensors` of at most about `shard_bytes` each and
    `model.safetensors.index.json`. With fp8, every block linear weight is stored
    as E4M3 with an FP32 `weight_scale_inv` per 128x128 block, in the same shard
    (the others in BF16, the gate's bias in FP32); without, everything in FP32.

    `directory` must be new, empty or an earlier release. Every file is first
    written under a temporary name in `directory`, then renamed; only then are an
    earlier release's shards that the new index does not name removed. So a save
    that fails leaves the earlier release as it was."""
    check_int("shard_bytes", shard_bytes, 1)
    directory = pathlib.Path(directory)
    if (directory.is_dir() and any(directory.iterdir())
            and not (directory / "model.safetensors.index.json").is_file()):
        raise ValueError(f"{directory} holds files and is not a release (it has no "
                         "model.safetensors.index.json): save_release writes into a "
                         "new or empty folder, or over an earlier release")
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in release_state_dict(model).items():
        if fp8 and _RELEASE_FP8.search(name):
            tensors[name], tensors[name + _SCALE] = weight_quant(tensor)
        elif fp8 and not name.endswith("e_score_correction_bias"):
            tensors[name] = tensor.bfloat16()
        else:
            tensors[name] = tensor
    shards = _shards(tensors, shard_bytes)
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
             for i in range(1, len(shards) + 1)]
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    config = release_config(model.args, fp8, bos_token_id, eos_token_id)
    suffix = f".{uuid.uuid4().hex}.tmp"  # hidden, and unlike any release file
    written: list[tuple[pathlib.Path, pathlib.Path]] = []
    try:
        for file, names in zip(files, shards):
            written.append((directory / f".{file}{suffix}", directory / file))
            save_file(_unshared({n: tensors[n] for n in names}), written[-1][0],
                      metadata={"format": "pt"})
        for file, content in (("model.safetensors.index.json", index),
                              ("config.json", config)):
            written.append((directory / f".{file}{suffix}", directory / file))
            written[-1][0].write_text(json.dumps(content, indent=2), encoding="utf-8")
    except BaseException:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, final in written:
        os.replace(temporary, final)
    for stale in directory.glob("model-*-of-*.safetensors"):  # an earlier save's
        if stale.name not in files:
            stale.unlink()
    return directory


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got "
                         f"{type(value).__name__}")
    return value


# what a released config.json may leave out, and the value it then has
_CONFIG_DEFAULTS = dict(hidden_act="silu", attention_bias=False, norm_topk_prob=True,
                        n_shared_experts=0, q_lora_rank=None, rope_interleave=True,
                        initializer_range=0.02, num_nextn_predict_layers=0)


def _config_attributes(config: dict[str, Any],
                       path: pathlib.Path) -> types.SimpleNamespace:
    """A released config.json (read from `path`) as the attributes
    `args_from_hf_config` reads (the release writes rope_theta and rope_scaling;
    transformers 5, rope_parameters)."""
    missing = [name for name in CONFIG_NAMES.values()
               if name not in config and name not in _CONFIG_DEFAULTS]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: a DeepSeek-V3 "
                         "config.json gives each (nothing is assumed for them)")
    for name, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                         ("moe_layer_freq", 1)):
        if config.get(name, wanted) != wanted:
            raise ValueError(f"{name} ({config[name]!r}) is not supported: "
                             f"DeepSeek-V3 uses {wanted!r}")
    rope = dict(config.get("rope_parameters")
                or {"rope_theta": config.get("rope_theta", 10000.0),
                    **(config.get("rope_scaling") or {})})
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    return types.SimpleNamespace(**{**_CONFIG_DEFAULTS, **config,
                                    "rope_parameters": rope})


def _shard_paths(directory: pathlib.Path, index: pathlib.Path,
                 files: set[Any]) -> dict[str, pathlib.Path]:
    """The shards the index names, each refused unless it is a plain file name of a
    file inside `directory`, also once symbolic links are resolved."""
    root = directory.resolve()
    paths = {}
    for file in sorted(files, key=str):
        if (not isinstance(file, str) or file in ("", ".", "..") or "/" in file
                or "\\" in file):
            raise ValueError(f"{index} names the shard {file!r}: a shard must be a "
                             f"plain file name inside {directory}")
        path = (directory / file).resolve()
        if path.parent != root:
            raise ValueError(f"{index} names the shard {file!r}, which resolves to "
                             f"{path}, outside {root}: a shard must be a file inside "
                             "the release folder")
        if not path.is_file():
            raise FileNotFoundError(f"{index} names the shard {file!r}, which is "
                                    f"not a file in {directory}")
        paths[file] = path
    return paths


def _read(shard: Any, name: str, file: str) -> torch.Tensor:
    try:
        return shard.get_tensor(name)
    except SafetensorError as error:  # absent, or the shard is damaged
        raise ValueError(f"the index maps {name!r} to shard {file}, which cannot "
                         f"give it: {error}") from None


@contextlib.contextmanager
def _open_shard(path: pathlib.Path, file: str):
    try:
        shard = safe_open(path, framework="pt")
    except SafetensorError as error:
        raise ValueError(f"shard {file} is not a readable safetensors file "
                         f"(truncated or corrupt?): {error}") from None
    with shard:
        yield shard


def _dequantized(name: str, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """An FP8 weight times its block scales, after checking that both are what the
    release stores."""
    if not (q.is_floating_point() and q.element_size() == 1):
        raise ValueError(f"{name!r} has a weight_scale_inv but is {q.dtype}, not FP8")
    scale_inv = scale_inv.float()
    if not bool((torch.isfinite(scale_inv) & (scale_inv > 0)).all()):
        raise ValueError(f"{name + _SCALE!r} holds a NaN, infinite or non-positive "
                         "value: every block scale must be finite and > 0")
    try:
        return weight_dequant(q, scale_inv)
    except ValueError as error:
        raise ValueError(f"{name!r}: {error}") from None


def _read_release(directory: pathlib.Path, index: pathlib.Path,
                  weight_map: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every weight the index names, in FP32, read shard by shard (memory-mapped).
    An FP8 weight is dequantized with the `weight_scale_inv` the index maps,
    in whichever shard that lies (as DeepSeek's fp8_cast_bf16.py finds it)."""
    paths = _shard_paths(directory, index, set(weight_map.values()))
    names_by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        names_by_file.setdefault(file, []).append(name)
    tensors = {}
    for file in sorted(names_by_file):
        with _open_shard(paths[file], file) as shard:
            for name in names_by_file[file]:
                if name.endswith(_SCALE):
                    if name.removesuffix(_SCALE) not in weight_map:
                        raise ValueError(f"{index} names {name!r} but not the weight "
                                         f"{name.removesuffix(_SCALE)!r} it scales")
                    continue
                tensor = _read(shard, name, file)
                scale_file = weight_map.get(name + _SCALE)
                if scale_file == file:
                    scale_inv = _read(shard, name + _SCALE, file)
                elif scale_file is not None:
                    with _open_shard(paths[scale_file], scale_file) as other:
                        scale_inv = _read(other, name + _SCALE, scale_file)
                elif tensor.is_floating_point() and tensor.element_size() == 1:
                    raise ValueError(f"{name!r} is FP8 ({tensor.dtype}) but {index} "
                                     f"names no {name + _SCALE!r}: an FP8 weight "
                                     "needs its block scales")
                if scale_file is not None:
                    tensor = _dequantized(name, tensor, scale_inv)
                tensors[name] = tensor.float()
    return tensors


@torch.no_grad()
def load_release(directory: str | pathlib.Path, **overrides) -> Transformer:
    """A dsv3_lite `Transformer` from a checkpoint folder in DeepSeek's released
    layout (config.json, model.safetensors.index.json and its shards), with the
    MTP layers as MTP modules and FP8 weights dequantized (`weight_dequant`:
    block x weight_scale_inv). The model is built on the meta device; shards are
    read one at a time (memory-mapped), each tensor converted to FP32 as it is
    read, and the model takes the converted tensors themselves. So the peak is the
    FP32 model (4 bytes per parameter: 4N for an FP8 checkpoint of N bytes) plus
    transients: 1.6x the FP32 model for a 115M-parameter checkpoint, 2.4x where
    the C allocator keeps freed blocks (benchmarks/release_memory.py).
    Every shard must be a file of the folder itself (the index names plain file
    names; no link may lead out of it). `overrides`: as `from_hf`."""
    directory = pathlib.Path(directory)
    index = directory / "model.safetensors.index.json"
    for file in (directory / "config.json", index):
        if not file.is_file():
            raise FileNotFoundError(f"{directory} has no {file.name}: not a "
                                    "checkpoint in DeepSeek's released layout")
    config = _config_attributes(_read_json(directory / "config.json"),
                                directory / "config.json")
    args = args_from_hf_config(config, **overrides).replace(
        mtp_depth=config.num_nextn_predict_layers)
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} must have a 'weight_map' object mapping each "
                         "tensor name to its shard's file name")
    tensors = _read_release(directory, index, weight_map)
    main, mtp = _split_release(tensors, args)
    weights = (_Weights(main, config, index.name),
               _Weights(mtp, config, index.name) if args.mtp_depth else None)
    del tensors, main, mtp  # the _Weights hold the only references
    return _load(args, *weights, bool(config.rope_interleave), copy=False)


def _split_release(tensors: dict[str, torch.Tensor], args: ModelArgs
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The release's tensors -> the main model's (transformers' names) and the
    MTP layers' (transformers' `MtpModel` names: layer n_layers + k becomes
    `layers.{k}`, its embedding and head copies `embed_tokens` and `shared_head`,
    which must be equal across layers)."""
    main: dict[str, torch.Tensor] = {}
    mtp: dict[str, torch.Tensor] = {}
    renamed = {"shared_head.norm.weight": "post_norm.weight"}
    shared = {"embed_tokens.weight": "embed_tokens.weight",
              "shared_head.head.weight": "shared_head.weight"}
    for name, tensor in tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match is None or int(match[1]) < args.n_layers:
            main[name] = tensor
            continue
        k, rest = int(match[1]) - args.n_layers, match[2]
        if k >= args.mtp_depth:
            raise ValueError(f"weight {name!r} belongs to layer {match[1]}, but the "
                             f"config has {args.n_layers} layers and "
                             f"num_nextn_predict_layers = {args.mtp_depth}")
        if rest in shared:
            if shared[rest] in mtp and not torch.equal(mtp[shared[rest]], tensor):
                raise ValueError(f"the MTP layers' copies of {rest} differ")
            mtp[shared[rest]] = tensor
        elif rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight") \
                or rest in renamed:
            mtp[f"layers.{k}.{renamed.get(rest, rest)}"] = tensor
        else:
            mtp[f"layers.{k}.mtp_block.{rest}"] = tensor
    return main, mtp


__all__ = ["from_hf", "to_hf", "hf_config", "to_hf_state_dict", "args_from_hf_config",
           "OVERRIDABLE", "rope_rows_to_half_split", "rope_rows_to_interleaved",
           "release_state_dict", "release_config", "save_release", "load_release",
           "RELEASE_QUANTIZATION"]
