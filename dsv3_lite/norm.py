"""RMSNorm, the only normalisation DeepSeek-V3 uses (pre-norm blocks, MLA
latents, MTP inputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in FP32 and cast
    back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError("RMSNorm expects last dimension "
                             f"{self.weight.shape[0]}, got {x.shape[-1]}")
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(),
                          self.eps).to(x.dtype)
