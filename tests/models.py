"""Small models the test modules share, so that no test module imports another."""
import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.model import Transformer

# A model small enough that a training step takes a few milliseconds, with every V3 feature on (the training,
# checkpoint and trainer tests).
SMALL = dict(dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_heads=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=64)


def seeded(args: ModelArgs, seed: int = 0) -> Transformer:
    """A Transformer of `args` initialised from `seed` (torch's global generator)."""
    torch.manual_seed(seed)
    return Transformer(args)


def make_agreeable(model: Transformer, noise: float = 0.5) -> Transformer:
    """Make a random model's MTP drafts agree with the main model part of the time: strong embeddings make
    both lean on the current token, and each projection M_k passes the embedding half through plus noise."""
    dim = model.args.dim
    with torch.no_grad():
        model.embed.weight.mul_(3.0)
        for module in model.mtp:
            mix = noise * torch.randn(dim, dim) / dim ** 0.5
            module.eh_proj.weight.copy_(torch.cat([torch.eye(dim), mix], dim=1))
    return model
