"""`ModelArgs`: the one configuration object that drives every component of dsv3_lite.

Field names follow DeepSeek's released `ModelArgs` / `config_671B.json`. The
counting methods are pure arithmetic, so the 671B shape can be inspected without
allocating a single weight.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, get_args

from dsv3_lite.cache_size import mla_cache_elems

ScoreFunc = Literal["sigmoid", "softmax"]
AttnImpl = Literal["naive", "absorb"]
Kernels = Literal["auto", "triton", "reference"]



def check_int(name: str, value: object, minimum: int) -> None:
    """A clear TypeError / ValueError unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} ({value}) must be >= {minimum}")


def check_number(name: str, value: object) -> None:
    """A clear TypeError unless `value` is a real number (an int or a float, not a
    bool or a string such as "0.5")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} "
                        f"{value!r}")


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a DeepSeek-V3-style model (frozen: change a field
    with `replace`, which validates).

    Sizes
        vocab_size: tokens in the vocabulary.
        dim: hidden size d of the residual stream.
        inter_dim: hidden size of the dense SwiGLU FFN used by the first
            `n_dense_layers` blocks.
        moe_inter_dim: hidden size of each (fine-grained) expert's SwiGLU FFN.
        n_layers: Transformer blocks of the main model.
        n_dense_layers: leading blocks that use a dense FFN instead of MoE (V3: 3).
        max_seq_len: longest sequence the model (and its KV cache) supports.
        max_batch_size: largest batch a KV cache is allocated for.

    Multi-head Latent Attention (report 2.1.1)
        n_heads: attention heads n_h.
        q_lora_rank: rank d_c' of the query compression; 0 means a plain query
            projection.
        kv_lora_rank: rank d_c of the joint key-value latent c_KV.
        qk_nope_head_dim: per-head query/key dims without RoPE (d_h).
        qk_rope_head_dim: decoupled RoPE dims d_h^R (one key shared by all heads);
            must be even.
        v_head_dim: per-head value dims.
        attn_impl: "naive" caches per-head keys and values, "absorb" caches only the
            latent and the rotated RoPE key and folds W_UK / W_UV into the query /
            output.

    DeepSeekMoE (report 2.1.2)
        n_routed_experts: routed experts N_r.
        n_shared_experts: shared experts N_s (always applied).
        n_activated_experts: routed experts chosen per token K_r.
        n_expert_groups: groups the routed experts are split into (V3: 8, one per
            node).
        n_limited_groups: groups a token may route to (V3: M = 4 nodes).
        score_func: "sigmoid" (V3) or "softmax" (V2) affinity.
        route_scale: factor applied to the normalized gating weights.
        bias_update_speed: gamma of the auxiliary-loss-free bias update.
        seq_aux_alpha: alpha of the complementary sequence-wise balance loss
            (report: 0.0001).
        aux_loss_alpha: weight of a batch-wise auxiliary balance loss (Switch-style;
            0 in V3; for baselines).

    Rotary embeddings and YaRN (report 4.3)
        rope_theta: RoPE base.
        rope_factor: YaRN context-extension factor s (1 = no extension).
        original_seq_len: context length the model was pre-trained at.
        beta_fast, beta_slow: YaRN correction range, in rotations.
        mscale: YaRN attention-scale coefficient.

    Multi-Token Prediction (report 2.2)
        mtp_depth: number of sequential MTP modules D (V3: 1; 0 disables MTP).

    Precision (report 3.3)
        fp8: run every linear layer of the blocks and MTP modules (MLA projections,
            experts, dense FFNs, MTP projections) as FP8 GEMMs with fine-grained
            scaling (`dsv3_lite.fp8_linear.FP8Linear`); the embedding, output
            head, MoE gate, norms and attention scores stay in higher precision.
        kernels: "auto" runs the Triton kernels of `dsv3_lite.kernels` (MLA
            decode, the experts' grouped GEMM at inference) on CUDA when Triton
            is installed, "reference" always runs PyTorch, "triton" always the
            kernels (on a CPU under Triton's interpreter).

    Other
        rms_norm_eps: epsilon of every RMSNorm.
        init_std: standard deviation of the weight initialisation (report: 0.006).
    """

    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    max_seq_len: int = 163840
    max_batch_size: int = 8
    # MLA
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attn_impl: AttnImpl = "absorb"
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: ScoreFunc = "sigmoid"
    route_scale: float = 2.5
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 0.0001
    aux_loss_alpha: float = 0.0
    # RoPE / YaRN
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # MTP
    mtp_depth: int = 1
    # precision
    fp8: bool = False
    kernels: Kernels = "auto"
    # other
    rms_norm_eps: float = 1e-6
    init_std: float = 0.006

    # ------------------------------------------------------------------ presets
    @classmethod
    def deepseek_v3(cls, **overrides) -> "ModelArgs":
        """The 671B DeepSeek-V3 shape (for counting and diagrams;
        never allocate it)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ModelArgs":
        """A shape with every V3 feature switched on that trains on a 2-core
        CPU in about a minute.

        vocab_size 260 fits `dsv3_lite.data.ByteTokenizer`
        (256 bytes + 4 special tokens).
        """
        base = dict(
            vocab_size=260, dim=64, inter_dim=192, moe_inter_dim=32, n_layers=3,
            n_dense_layers=1, max_seq_len=256, max_batch_size=16,
            n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
            n_expert_groups=4, n_limited_groups=2, route_scale=1.0,
            rope_factor=1.0, original_seq_len=256, mtp_depth=1, init_std=0.02,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides) -> "ModelArgs":
        """Between `tiny` and V3: every V3 feature on, about 2.7M parameters
        (MTP included), trained in about 10 minutes on a 2-core CPU by
        `python -m dsv3_lite.train --preset small` (chapter 7).

        vocab_size 2048 is the size of the byte-level BPE tokenizer the command
        line learns from the book's corpus (`dsv3_lite.tokenizer`).
        """
        # `tiny`, twice as wide, with twice the experts and context and 4 blocks
        return cls.tiny(**{**dict(
            vocab_size=2048, dim=128, inter_dim=384, moe_inter_dim=64, n_layers=4,
            max_seq_len=512, original_seq_len=512, q_lora_rank=64, kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            n_routed_experts=16, n_activated_experts=4), **overrides})

    def replace(self, **changes) -> "ModelArgs":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        positive = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers",
                    "max_seq_len", "max_batch_size", "n_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "n_activated_experts", "n_expert_groups",
                    "n_limited_groups", "original_seq_len"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} ({value}) must be > 0")
        for name in ["n_dense_layers", "q_lora_rank", "n_shared_experts",
                     "mtp_depth"]:
            check_int(name, getattr(self, name), 0)
        for name in ["route_scale", "bias_update_speed", "seq_aux_alpha",
                     "aux_loss_alpha", "rope_theta", "rope_factor", "beta_fast",
                     "beta_slow", "mscale", "rms_norm_eps", "init_std"]:
            value = getattr(self, name)
            check_number(name, value)
            if not math.isfinite(value):
                raise ValueError(f"{name} ({value}) must be finite")
        for name in ["route_scale", "rms_norm_eps", "init_std", "beta_slow"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        for name in ["bias_update_speed", "seq_aux_alpha", "aux_loss_alpha",
                     "mscale"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if not self.rope_theta > 1:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be > 1 "
                             "(the frequencies are rope_theta^(-2i/d))")
        if self.rope_factor < 1:
            raise ValueError(f"rope_factor ({self.rope_factor}) must be >= 1 "
                             "(1 means no YaRN extension)")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be > beta_slow "
                             f"({self.beta_slow})")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be "
                             "even (RoPE rotates pairs)")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be <= "
                             f"n_layers ({self.n_layers})")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(f"n_activated_experts ({self.n_activated_experts}) must "
                             f"be <= n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be "
                             f"divisible by n_expert_groups ({self.n_expert_groups})")
        if self.n_limited_groups > self.n_expert_groups:
            raise ValueError(f"n_limited_groups ({self.n_limited_groups}) must be <= "
                             f"n_expert_groups ({self.n_expert_groups})")
        eligible = self.n_limited_groups * (self.n_routed_experts
                                            // self.n_expert_groups)
        if self.n_activated_experts > eligible:
            raise ValueError(f"n_activated_experts ({self.n_activated_experts}) "
                             "must be <= the experts in n_limited_groups groups "
                             f"({eligible})")
        if not isinstance(self.fp8, bool):
            raise TypeError(f"fp8 must be True or False, got {self.fp8!r}")
        if self.kernels not in get_args(Kernels):
            raise ValueError(f"kernels ({self.kernels!r}) must be one of "
                             f"{get_args(Kernels)}")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func ({self.score_func!r}) must be 'sigmoid' "
                             "or 'softmax'")
        if self.attn_impl not in ("naive", "absorb"):
            raise ValueError(f"attn_impl ({self.attn_impl!r}) must be 'naive' "
                             "or 'absorb'")

    # ----------------------------------------------------------------- counting
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: qk_nope_head_dim + qk_rope_head_dim
        (192 in V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def attention_params(self) -> int:
        """Parameters of one MLA layer (projections and the two latent RMSNorms)."""
        h, d = self.n_heads, self.dim
        if self.q_lora_rank:
            q = (d * self.q_lora_rank + self.q_lora_rank
                 + self.q_lora_rank * h * self.qk_head_dim)
        else:
            q = d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert (gate, up and down projections)."""
        return 3 * self.dim * self.moe_inter_dim

    def dense_ffn_params(self) -> int:
        return 3 * self.dim * self.inter_dim

    def gate_params(self) -> int:
        """Router weight plus the per-expert selection bias."""
        return self.n_routed_experts * self.dim + self.n_routed_experts

    def moe_params(self, activated: bool = False) -> int:
        """One MoE FFN: all experts, or only those one token uses
        (K_r routed + shared)."""
        routed = self.n_activated_experts if activated else self.n_routed_experts
        return ((routed + self.n_shared_experts) * self.expert_params()
                + self.gate_params())

    def block_params(self, moe: bool, activated: bool = False) -> int:
        ffn = self.moe_params(activated) if moe else self.dense_ffn_params()
        return self.attention_params() + ffn + 2 * self.dim

    def embedding_params(self) -> int:
        return self.vocab_size * self.dim

    def mtp_module_params(self) -> int:
        """Unique parameters of one MTP module: two RMSNorms, the 2d->d projection,
        one MoE block (or a dense one when the model has no MoE layers) and its final
        norm; embedding and head are shared."""
        return (2 * self.dim + 2 * self.dim * self.dim
                + self.block_params(moe=self.n_moe_layers > 0) + self.dim)

    def param_breakdown(self, activated: bool = False) -> dict[str, int]:
        """Parameters per component of the main model (MTP excluded)."""
        blocks = (self.n_dense_layers * self.block_params(moe=False)
                  + self.n_moe_layers * self.block_params(moe=True,
                                                          activated=activated))
        attention = self.n_layers * self.attention_params()
        moe = self.n_moe_layers * self.moe_params(activated)
        return {
            "embedding": self.embedding_params(),
            "attention (MLA)": attention,
            "dense FFN": self.n_dense_layers * self.dense_ffn_params(),
            "MoE": moe,
            "norms": (blocks - attention - moe
                      - self.n_dense_layers * self.dense_ffn_params() + self.dim),
            "output head": self.embedding_params(),
        }

    def num_params(self) -> int:
        """Total parameters of the main model (embedding, blocks, final norm, head);
        MTP excluded."""
        return sum(self.param_breakdown().values())

    def num_activated_params(self, include_embedding: bool = True) -> int:
        """Parameters one token touches in the main model; the input embedding is a
        lookup, so the report also quotes the figure without it."""
        total = sum(self.param_breakdown(activated=True).values())
        return total if include_embedding else total - self.embedding_params()

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """MLA cache of the whole model for one token:
        (kv_lora_rank + qk_rope_head_dim) x n_layers."""
        return (mla_cache_elems(self.kv_lora_rank, self.qk_rope_head_dim)
                * self.n_layers * bytes_per_element)

    def yarn_mscale(self) -> float:
        """YaRN's attention-scale factor 0.1 * mscale * ln(rope_factor) + 1
        (1 without extension)."""
        if self.rope_factor <= 1:
            return 1.0
        return 0.1 * self.mscale * math.log(self.rope_factor) + 1.0

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 when the context is extended
        (V3 at factor 40: 0.1352)."""
        scale = self.qk_head_dim ** -0.5
        if self.max_seq_len > self.original_seq_len:
            scale *= self.yarn_mscale() ** 2
        return scale
