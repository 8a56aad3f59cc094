"""KV-cache size per token per layer, in elements, for each attention family.

Multiply by the layer count and the bytes per element to get bytes per token
(report 2.1.1, Table 1 of DeepSeek-V2).
"""


def gqa_cache_elems(n_kv_heads: int, head_dim: int) -> int:
    """Grouped-query attention caches keys and values for its n_g key-value groups:
    2 * n_g * d_h (MQA is the case n_g = 1)."""
    return 2 * n_kv_heads * head_dim


def mha_cache_elems(n_heads: int, head_dim: int) -> int:
    """Multi-head attention caches a key and a value per head: 2 * n_h * d_h
    (GQA with n_g = n_h)."""
    return gqa_cache_elems(n_heads, head_dim)


def mla_cache_elems(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """MLA caches the compressed latent c_KV and one decoupled RoPE
    key: d_c + d_h^R."""
    return kv_lora_rank + qk_rope_head_dim
