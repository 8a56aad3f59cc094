"""The FP8 linear layer (report 3.3, Figure 6): Fprop, Dgrad and Wgrad as FP8 GEMMs,
with an FP32 master weight and the layer's input saved for backward in FP8.

Which code runs the GEMMs (`kernels`, as `ModelArgs.kernels`): on a CPU, the PyTorch
references of `dsv3_lite.fp8`. On CUDA with Triton installed ("auto") and a GPU with
FP8 (compute capability 8.9+), the Triton kernels of `dsv3_lite.kernels`: their
`act_quant` quantizes x, dy and the re-tiled operands of Wgrad, and their
`fp8_gemm` runs Fprop, Dgrad and Wgrad; the weight's 128x128 quantization and
Wgrad's dequantization of the saved input stay PyTorch operations.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from dsv3_lite import kernels as triton_kernels
from dsv3_lite.fp8 import act_dequant, act_quant, fp8_gemm, weight_quant


class _GemmOps(NamedTuple):
    """The two operations an FP8 linear layer runs per GEMM: quantize an operand in
    1 x block tiles, and multiply (`act_quant`, `fp8_gemm` of one backend)."""

    act_quant: Callable[[Tensor, int], tuple[Tensor, Tensor]]
    fp8_gemm: Callable[..., Tensor]


_REFERENCE = _GemmOps(act_quant, fp8_gemm)


def gemm_ops(kernels: str, device: torch.device | str,
             block_size: int = 128) -> _GemmOps:
    """The backend of `fp8_linear` on `device` under `kernels` (`ModelArgs.kernels`):
    the Triton kernels of `dsv3_lite.kernels` where `kernels.use_triton` selects
    them, else this module's PyTorch references. "auto" also keeps the references
    where the kernels cannot run: a GPU without FP8 (compute capability < 8.9), or
    a block_size that is not a power of two >= 16 (a Triton block); "triton"
    raises there instead, naming the rule."""
    device = torch.device(device)
    if not triton_kernels.use_triton(kernels, device):
        return _REFERENCE
    if kernels == "auto" and not triton_kernels.fp8_runnable(device, block_size):
        return _REFERENCE
    return _GemmOps(triton_kernels.act_quant, triton_kernels.fp8_gemm)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad as FP8 GEMMs (report Figure 6).

    Fprop   y  = x W^T:   x in 1x128 tiles along K, W in 128x128 blocks.
    Dgrad   dx = dy W:    dy in 1x128 tiles along N; the same FP8 W, transposed:
                          a 128x128 block's scale serves W and W^T alike.
    Wgrad   dW = dy^T x:  K of this GEMM is the token dim, so both operands are
                          quantized in tiles of 128 tokens (128x1 tiles of dy and x).
                          x was saved in FP8 in 1x128 tiles; it is dequantized,
                          transposed and quantized again, as the report describes
                          for its own kernels (3.5.2).
    The weight is the FP32 master weight, quantized at every call; dW is
    accumulated in FP32 and returned in the weight's dtype, dx in x's. `ops`
    (`gemm_ops`) quantizes the activations and runs the three GEMMs.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, block_size: int,
                ops: _GemmOps) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        x_q, x_scale = ops.act_quant(rows, block_size)
        w_q, w_scale = weight_quant(weight, block_size)
        ctx.save_for_backward(x_q, x_scale, w_q, w_scale)
        ctx.block_size, ctx.x_shape, ctx.ops = block_size, x.shape, ops
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        y = ops.fp8_gemm(x_q, x_scale, w_q, w_scale, block_size)
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_q, x_scale, w_q, w_scale = ctx.saved_tensors
        bs, ops = ctx.block_size, ctx.ops
        dy = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_scale = ops.act_quant(dy, bs)
            dx = ops.fp8_gemm(dy_q, dy_scale, w_q.T.contiguous(), w_scale.T, bs)
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dy_t, dy_t_scale = ops.act_quant(dy.T, bs)
            x_t, x_t_scale = ops.act_quant(act_dequant(x_q, x_scale, bs).T, bs)
            dw = ops.fp8_gemm(dy_t, dy_t_scale, x_t, x_t_scale, bs).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: Tensor, weight: Tensor, block_size: int = 128,
               kernels: str = "auto") -> Tensor:
    """F.linear(x, weight) without bias, its forward and both backward GEMMs in
    FP8 (`FP8LinearFunction`): x (..., in_features), weight (out_features,
    in_features) -> (..., out_features). `kernels` picks the backend
    (`gemm_ops`): the PyTorch references on a CPU, Triton on a recent GPU."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal weight's "
                         f"in_features ({weight.shape[1]})")
    # an empty x (an expert without tokens) leaves nothing to launch kernels for
    ops = gemm_ops(kernels, x.device, block_size) if x.numel() else _REFERENCE
    return FP8LinearFunction.apply(x, weight, block_size, ops)


def fp8_grouped_linear(x: Tensor, weight: Tensor, counts: Tensor,
                       kernels: str = "auto") -> Tensor:
    """`moe.grouped_linear` in FP8: x_j @ weight[j]^T for consecutive groups of rows
    of x, counts[j] rows in group j, each an `fp8_linear` with `kernels`:
    (T, in) -> (T, out)."""
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D (experts, out, in), got shape "
                         f"{tuple(weight.shape)}")
    if counts.shape != (weight.shape[0],) or int(counts.sum()) != x.shape[0]:
        raise ValueError(f"counts {tuple(counts.shape)} must hold one row count per "
                         f"expert ({weight.shape[0]}) summing to x's rows "
                         f"({x.shape[0]})")
    groups = x.split(counts.tolist())
    return torch.cat([fp8_linear(xj, wj, kernels=kernels)
                      for xj, wj in zip(groups, weight)])


class FP8Linear(nn.Linear):
    """A bias-free nn.Linear whose matmuls run in FP8 (`fp8_linear`, its backend
    chosen by `kernels`); same parameter (`weight`, FP32 master weight) and state
    dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, kernels: str = "auto"):
        if bias:
            raise ValueError("bias must be False: FP8Linear has no bias, like every "
                             "linear layer of DeepSeek-V3")
        super().__init__(in_features, out_features, bias=False, device=device,
                         dtype=dtype)
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, kernels=self.kernels)


def linear_class(fp8: bool, kernels: str = "auto") -> Callable[..., nn.Linear]:
    """What builds a model's linear layers: FP8Linear with `kernels`
    (`ModelArgs.kernels`) when `fp8` (`ModelArgs.fp8`), else nn.Linear. Both hold
    the same FP32 `weight`."""
    return functools.partial(FP8Linear, kernels=kernels) if fp8 else nn.Linear


__all__ = ["gemm_ops", "FP8LinearFunction", "fp8_linear", "fp8_grouped_linear",
           "FP8Linear", "linear_class"]
