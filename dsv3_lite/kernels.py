"""GPU-path kernels in Triton, each the fused form of a PyTorch reference elsewhere
in the package.

- `act_quant`, `weight_dequant`, `fp8_gemm`: the FP8 chapter's quantizers and
  block-scaled GEMM (`dsv3_lite.fp8`, report 3.3), one program per tile or
  output block; the GEMM promotes every 128-wide slice of K into FP32.
- `mla_decode`: MLA decode attention over the absorbed latent cache (report
  2.1.1; `MLA._absorbed` for one new token), the cached positions split across
  programs, each with an online softmax, then a combine.
- `grouped_linear`: the routed experts' matrix multiply over tokens sorted by
  expert (`dsv3_lite.moe.grouped_linear`), every expert in one launch of a
  fixed grid whose tile schedule stays on the device.

Which model paths call them, on CUDA with Triton installed (`ModelArgs.kernels`
"auto"): `MLA._absorbed` calls `mla_decode` for a one-token decode step, and
the routed experts (`moe.Experts`, fp8=False) call `grouped_linear` for W13
and W2 whenever no gradient is recorded. With fp8=True on a GPU with FP8 (compute
capability 8.9+), the FP8 linear layers (`dsv3_lite.fp8_linear`: attention,
dense FFN, shared and routed experts, MTP projection) call `act_quant` and
`fp8_gemm` for Fprop, Dgrad and Wgrad; `weight_dequant` serves loading and
tests, not the model. The kernels are tested bit-equal (quantizers) or equal up
to the order of FP32 sums (GEMM) to the references of `dsv3_lite.fp8`.
"reference" forces PyTorch everywhere and "triton" forces the kernels, which on
a CPU needs Triton's interpreter (TRITON_INTERPRET=1 set before this module is
imported): how the tests run them on every machine.
Without Triton (macOS, Windows) this module imports, and every function says so
when called.
"""
from __future__ import annotations

import os
from typing import get_args

import torch
from torch import Tensor

from dsv3_lite.config import Kernels
from dsv3_lite.fp8 import AMAX_FLOOR, E4M3

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch references run instead
    triton = None

def interpreted() -> bool:
    """True when Triton's interpreter runs the kernels (on the CPU, in NumPy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(option: str, device: torch.device) -> bool:
    """Whether the model runs the Triton kernels on `device` under `option`
    (`ModelArgs.kernels`): "auto" on CUDA with Triton installed, "triton"
    always (a clear error where it cannot), "reference" never."""
    if option == "reference":
        return False
    if option == "auto":
        return triton is not None and torch.device(device).type == "cuda"
    if option != "triton":
        raise ValueError(f"kernels ({option!r}) must be one of {get_args(Kernels)}")
    _check_runnable(torch.device(device))
    return True


def _check_runnable(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed: use kernels='reference' "
                           "(pip install triton on Linux)")
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(f"Triton kernels need a CUDA device, got {device.type}: "
                           "set TRITON_INTERPRET=1 before importing "
                           "dsv3_lite.kernels to run them on the CPU")


def _check_fp8_runnable(device: torch.device) -> None:
    """Triton has FP8 E4M3 only from compute capability 8.9 (Ada, Hopper) up."""
    _check_runnable(device)
    if device.type == "cuda" and not interpreted():
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise RuntimeError(f"the FP8 kernels need compute capability 8.9 or "
                               f"higher (Ada, Hopper), this GPU has {major}.{minor}: "
                               "use the references in dsv3_lite.fp8")


def _fp8_dot_supported(device: torch.device) -> bool:
    """FP8 operands go straight into tl.dot on Ada and Hopper (sm 8.9+);
    elsewhere (and in the interpreter) they are widened to FP32 first, which
    is exact."""
    return (device.type == "cuda" and not interpreted()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _dot_dtype(dtype: torch.dtype, device: torch.device):
    """The operand type of the BF16/FP32 kernels' `tl.dot`s. Compiled on a GPU,
    BF16 and FP16 inputs go to the tensor cores as they are (FP32 sums): FP32
    dots run on the CUDA cores at a fraction of that rate. FP32 inputs, and
    every input under the interpreter (whose BF16 dot is wrong in Triton 3.9),
    are multiplied in FP32 ("ieee": no TF32 rounding)."""
    if device.type == "cuda" and not interpreted():
        if dtype == torch.bfloat16:
            return tl.bfloat16
        if dtype == torch.float16:
            return tl.float16
    return tl.float32


def _pow2(n: int, minimum: int = 16) -> int:
    """Block sizes are powers of two; 16 is the smallest tl.dot takes."""
    return max(minimum, triton.next_power_of_2(n))


if triton is not None:

    # ------------------------------------------------------------------- FP8
    @triton.jit
    def _round_to_e4m3(y):
        # Round FP32 y (|y| <= 448) to the nearest E4M3 value, ties to even, in
        # FP32 arithmetic, so the cast that follows is exact: Triton's
        # interpreter (NumPy) drops the carry when rounding crosses a power of
        # two (124.3 became 64, not 128). E4M3 keeps 3 fraction bits: values in
        # [2^e, 2^(e+1)) are spaced 2^(e-3); the subnormals below 2^-6, 2^-9.
        e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|y|)
        e = tl.maximum(e, -6) - 3
        step = ((e + 127) << 23).to(tl.float32, bitcast=True)  # exactly 2^e
        # adding and subtracting 1.5 * 2^23 rounds |v| < 2^22 to an integer (RNE)
        v = y / step
        rounded = ((v + 12582912.0) - 12582912.0) * step
        return tl.where(rounded == 0, y * 0.0, rounded)  # -0 stays -0

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, n_tiles,
                          BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                          AMAX_MIN: tl.constexpr):
        # one program per 1 x BLOCK tile: row pid_m, columns tile * BLOCK ...
        pid_m, tile = tl.program_id(0), tl.program_id(1)
        cols = tile * BLOCK + tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(x_ptr + pid_m * K + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), AMAX_MIN)
        scale = tl.math.div_rn(amax, FP8_MAX)
        y = _round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX))
        tl.store(q_ptr + pid_m * K + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + pid_m * n_tiles + tile, scale)

    @triton.jit
    def _weight_dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, n_tiles_k,
                               BLOCK: tl.constexpr):
        # one program per BLOCK x BLOCK block: value x that block's scale
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BLOCK + tl.arange(0, BLOCK)
        cols = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        offs = rows[:, None] * K + cols[None, :]
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + pid_n * n_tiles_k + pid_k)
        tl.store(out_ptr + offs, q * scale, mask=mask)

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                         n_tiles_k, B_PER_ROW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr):
        # C[m, n] = sum over K blocks of (A_blk @ B_blk^T) * a_scale * b_scale:
        # the tensor cores' FP8 products of one block, then the FP32 promotion
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, n_tiles_k):
            k = kb * BLOCK_K + ks
            a = tl.load(a_ptr + rows[:, None] * K + k[None, :],
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            b = tl.load(b_ptr + cols[:, None] * K + k[None, :],
                        mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
            if FP8_DOT:
                partial = tl.dot(a, tl.trans(b))
            else:
                partial = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)),
                                 input_precision="ieee")
            a_s = tl.load(as_ptr + rows * n_tiles_k + kb, mask=rows < M, other=0.0)
            if B_PER_ROW:  # 1 x 128 tiles of b (Wgrad)
                b_s = tl.load(bs_ptr + cols * n_tiles_k + kb, mask=cols < N,
                              other=0.0)
            else:  # 128 x 128 weight blocks: row n reads block n // 128
                b_s = tl.load(bs_ptr + (cols // BLOCK_K) * n_tiles_k + kb,
                              mask=cols < N, other=0.0)
            acc += partial * a_s[:, None] * b_s[None, :]
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    # ------------------------------------------------------------ MLA decode
    @triton.jit
    def _mla_decode_split_kernel(ql_ptr, qr_ptr, kv_ptr, pe_ptr, len_ptr, acc_ptr,
                                 m_ptr, l_ptr, H, T, C, R, split_len, n_splits,
                                 scale, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                                 DOT: tl.constexpr):
        # one program per (sequence, split): every head against the split's
        # cached positions, heads stacked as rows (MQA over the latent)
        b, split = tl.program_id(0), tl.program_id(1)
        h = tl.arange(0, BLOCK_H)
        c = tl.arange(0, BLOCK_C)
        r = tl.arange(0, BLOCK_R)
        # loaded in their dtype (BF16 in a GPU cache), multiplied as DOT (BF16
        # on a GPU's tensor cores, else FP32), summed and exponentiated in FP32
        q_lat = tl.load(ql_ptr + (b * H + h[:, None]) * C + c[None, :],
                        mask=(h[:, None] < H) & (c[None, :] < C), other=0.0).to(DOT)
        q_pe = tl.load(qr_ptr + (b * H + h[:, None]) * R + r[None, :],
                       mask=(h[:, None] < H) & (r[None, :] < R), other=0.0).to(DOT)
        m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
        length = tl.load(len_ptr + b)  # this sequence's cached positions
        start = split * split_len
        end = tl.minimum(start + split_len, length)  # a split past it: no block
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            keep = t < end
            kv = tl.load(kv_ptr + (b * T + t[:, None]) * C + c[None, :],
                         mask=keep[:, None] & (c[None, :] < C), other=0.0).to(DOT)
            pe = tl.load(pe_ptr + (b * T + t[:, None]) * R + r[None, :],
                         mask=keep[:, None] & (r[None, :] < R), other=0.0).to(DOT)
            s = (tl.dot(q_lat, tl.trans(kv), input_precision="ieee")
                 + tl.dot(q_pe, tl.trans(pe), input_precision="ieee")) * scale
            s = tl.where(keep[None, :], s, float("-inf"))
            # online softmax: rescale what was summed so far to the new maximum
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), kv, input_precision="ieee")
            m = m_new
        row = (b * n_splits + split) * H + h
        tl.store(m_ptr + row, m, mask=h < H)
        tl.store(l_ptr + row, l, mask=h < H)
        tl.store(acc_ptr + row[:, None] * C + c[None, :], acc,
                 mask=(h[:, None] < H) & (c[None, :] < C))

    @triton.jit
    def _mla_decode_combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, H, C, n_splits,
                                   BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        # one program per (sequence, head): weight each split's partial sums by
        # exp(its max - the overall max), then normalize once
        b, h = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_C)
        row = (b * n_splits + s) * H + h
        m = tl.load(m_ptr + row, mask=s < n_splits, other=float("-inf"))
        l = tl.load(l_ptr + row, mask=s < n_splits, other=0.0)
        acc = tl.load(acc_ptr + row[:, None] * C + c[None, :],
                      mask=(s[:, None] < n_splits) & (c[None, :] < C), other=0.0)
        m_all = tl.max(m, axis=0)
        weight = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
        tl.store(out_ptr + (b * H + h) * C + c, out, mask=c < C)

    # --------------------------------------------------------- grouped GEMM
    @triton.jit
    def _grouped_linear_kernel(x_ptr, w_ptr, out_ptr, tile_expert_ptr,
                               tile_start_ptr, tile_end_ptr, N, K,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, DOT: tl.constexpr):
        # one program per (slot of the schedule, block of outputs); the grid
        # has a slot for every tile there could be, and a slot past the last
        # real tile holds an empty row range: that program returns at once
        tile, pid_n = tl.program_id(0), tl.program_id(1)
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        if start >= end:
            return
        expert = tl.load(tile_expert_ptr + tile)
        rows = start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :],
                        mask=(rows[:, None] < end) & (k[None, :] < K), other=0.0)
            w = tl.load(w_ptr + (expert * N + cols[:, None]) * K + k[None, :],
                        mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
            acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)), input_precision="ieee")
        # rows at or past `end` belong to the next expert: never written here
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc,
                 mask=(rows[:, None] < end) & (cols[None, :] < N))


def _check_block_size(block_size: int, name: str = "block_size") -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{name} ({block_size}) must be a power of two >= 16 "
                         "(a Triton block)")


def fp8_runnable(device: torch.device, block_size: int) -> bool:
    """Whether `act_quant` and `fp8_gemm` run on `device` with `block_size` (the
    rules their errors name)."""
    try:
        _check_fp8_runnable(device)
        _check_block_size(block_size)
    except (RuntimeError, ValueError):
        return False
    return True


def _check_2d(x: Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------- FP8 wrappers
def act_quant(x: Tensor, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """`dsv3_lite.fp8.act_quant` (E4M3, 1 x block_size tiles of the last dim)
    as one program per tile; bit-equal to it."""
    _check_fp8_runnable(x.device)
    _check_block_size(block_size)
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    n_tiles = triton.cdiv(k, block_size)
    q = torch.empty(rows.shape, dtype=E4M3.dtype, device=x.device)
    scale = torch.empty(rows.shape[0], n_tiles, device=x.device)
    if rows.numel():
        _act_quant_kernel[(rows.shape[0], n_tiles)](
            rows, q, scale, k, n_tiles, BLOCK=block_size, FP8_MAX=E4M3.max,
            AMAX_MIN=AMAX_FLOOR)
    return q.view(x.shape), scale.view(*x.shape[:-1], n_tiles)


def weight_dequant(q: Tensor, scale_inv: Tensor, block_size: int = 128) -> Tensor:
    """`dsv3_lite.fp8.weight_dequant`: FP32 block x scale, one program per
    block; bit-equal to it."""
    _check_fp8_runnable(q.device)
    _check_block_size(block_size)
    _check_2d(q, "q")
    n, k = q.shape
    blocks = (triton.cdiv(n, block_size), triton.cdiv(k, block_size))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(f"scale_inv {tuple(scale_inv.shape)} must have one value "
                         f"per {block_size}x{block_size} block of q {(n, k)}: "
                         f"{blocks}")
    out = torch.empty(n, k, device=q.device)
    _weight_dequant_kernel[blocks](q.contiguous(), scale_inv.float().contiguous(),
                                   out, n, k, blocks[1], BLOCK=block_size)
    return out


def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor,
             block_size: int = 128) -> Tensor:
    """`dsv3_lite.fp8.fp8_gemm` fused: a (M, K) with 1 x 128 tile scales, b (N, K)
    with 128 x 128 block scales (or 1 x 128 tiles) -> a @ b.T (M, N) in FP32."""
    _check_fp8_runnable(a.device)
    _check_block_size(block_size)
    _check_2d(a, "a")
    _check_2d(b, "b")
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a (M, K) {tuple(a.shape)} and b (N, K) {tuple(b.shape)} "
                         "must share K: a @ b.T")
    kb = triton.cdiv(k, block_size)
    if tuple(a_scale.shape) != (m, kb):
        raise ValueError(f"a_scale {tuple(a_scale.shape)} must be {(m, kb)}")
    per_row = tuple(b_scale.shape) == (n, kb)
    if not per_row and tuple(b_scale.shape) != (triton.cdiv(n, block_size), kb):
        raise ValueError(f"b_scale {tuple(b_scale.shape)} must be "
                         f"{(triton.cdiv(n, block_size), kb)} (blocks) or "
                         f"{(n, kb)} (tiles)")
    out = torch.empty(m, n, device=a.device)
    block_m, block_n = min(64, _pow2(m)), min(block_size, _pow2(n))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](a.contiguous(), a_scale.float().contiguous(),
                           b.contiguous(), b_scale.float().contiguous(), out,
                           m, n, k, kb, B_PER_ROW=per_row, BLOCK_M=block_m,
                           BLOCK_N=block_n, BLOCK_K=block_size,
                           FP8_DOT=_fp8_dot_supported(a.device))
    return out


# ------------------------------------------------------------------- MLA decode
def mla_decode(q_latent: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor, scale: float,
               n_splits: int | None = None, block_t: int = 64,
               lengths: Tensor | None = None) -> Tensor:
    """softmax((q_latent kv^T + q_pe pe^T) * scale) kv for one new token per
    sequence: q_latent (B, H, d_c), q_pe (B, H, d_rope) against the cache kv
    (B, T, d_c), pe (B, T, d_rope), all of one dtype -> (B, H, d_c) in FP32
    (scores, softmax and sums in FP32; on a GPU, BF16 inputs are multiplied
    on the tensor cores in BF16).

    `lengths` (B,) integers in [1, T], on kv's device: sequence b attends to
    its first lengths[b] cached positions only (a batch of sequences of
    different lengths, padded to T); default all T. Checking them reads them
    on the host: one synchronisation, where they are given.

    The T cached positions are split into `n_splits` ranges (default: about
    256 positions each), one program per sequence and range, so a long cache
    keeps many programs busy at batch 1; each keeps a running maximum and sum
    (online softmax), and a second kernel combines the ranges. A range past a
    sequence's length does no work and is weighted 0 by the combine."""
    _check_runnable(q_latent.device)
    b, h, c = q_latent.shape
    t, r = kv.shape[1], pe.shape[-1]
    if (q_pe.shape != (b, h, r) or kv.shape != (b, t, c) or pe.shape != (b, t, r)
            or t == 0):
        raise ValueError(f"q_latent (B, H, d_c) {tuple(q_latent.shape)}, q_pe "
                         f"(B, H, d_rope) {tuple(q_pe.shape)}, kv (B, T, d_c) "
                         f"{tuple(kv.shape)} and pe (B, T, d_rope) "
                         f"{tuple(pe.shape)} must agree, with T >= 1")
    if n_splits is None:
        n_splits = triton.cdiv(t, 256)
    if not 1 <= n_splits <= t:
        raise ValueError(f"n_splits ({n_splits}) must be in [1, T = {t}]")
    split_len = triton.cdiv(t, n_splits)
    n_splits = triton.cdiv(t, split_len)  # no empty split
    if len({x.dtype for x in (q_latent, q_pe, kv, pe)}) != 1:
        raise ValueError("q_latent, q_pe, kv and pe must share one dtype")
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.int32, device=kv.device)
    elif (lengths.shape != (b,) or lengths.is_floating_point()
          or lengths.device != kv.device):
        raise ValueError(f"lengths {tuple(lengths.shape)} must be (B,) = ({b},) "
                         f"integers on {kv.device}, got {lengths.dtype} on "
                         f"{lengths.device}")
    elif not bool(((lengths >= 1) & (lengths <= t)).all()):
        raise ValueError(f"lengths ({lengths.tolist()}) must be in [1, T = {t}]")
    inputs = [x.contiguous() for x in (q_latent, q_pe, kv, pe)]
    acc = torch.empty(b, n_splits, h, c, device=kv.device)
    m = torch.empty(b, n_splits, h, device=kv.device)
    l = torch.empty_like(m)
    _mla_decode_split_kernel[(b, n_splits)](
        *inputs, lengths.int(), acc, m, l, h, t, c, r, split_len, n_splits, scale,
        BLOCK_H=_pow2(h), BLOCK_C=_pow2(c), BLOCK_R=_pow2(r), BLOCK_T=block_t,
        DOT=_dot_dtype(kv.dtype, kv.device))
    out = torch.empty(b, h, c, device=kv.device)
    _mla_decode_combine_kernel[(b, h)](acc, m, l, out, h, c, n_splits,
                                       BLOCK_S=_pow2(n_splits, 2),
                                       BLOCK_C=_pow2(c))
    return out


# --------------------------------------------------------------- grouped GEMM
def grouped_tile_schedule(counts: Tensor, n_rows: int,
                          block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The grouped GEMM's schedule, computed on counts' device with no host
    read of counts: expert j's rows [begin_j, end_j) cut into tiles of block_m
    rows, listed expert by expert, in a fixed number of slots,
    cdiv(n_rows, block_m) + E (every expert's last tile may be partial, so
    that many tiles at most). Returns per slot (expert, start, end), int32;
    a slot past the last tile has start >= end (an empty row range)."""
    e = counts.shape[0]
    n_slots = -(-n_rows // block_m) + e
    tiles = (counts + block_m - 1) // block_m
    last_tile = tiles.cumsum(0)  # one past each expert's last tile
    row_end = counts.cumsum(0)
    slot = torch.arange(n_slots, device=counts.device)
    # slot i belongs to the first expert whose tiles end after i; past the
    # last tile, to the last expert, whose tiles it then runs past
    expert = torch.searchsorted(last_tile, slot, right=True).clamp(max=e - 1)
    index_in_expert = slot - (last_tile - tiles)[expert]
    start = (row_end - counts)[expert] + index_in_expert * block_m
    return expert.int(), start.int(), row_end[expert].int()


def _grouped_linear_launch(x: Tensor, weight: Tensor,
                           schedule: tuple[Tensor, Tensor, Tensor],
                           block_m: int) -> Tensor:
    """Run the kernel over a schedule (any order of its slots gives the same
    result: the programs of a launch may run in any order)."""
    n, k = weight.shape[1:]
    out = torch.empty(x.shape[0], n, device=x.device)  # FP32 sums
    block_n = min(64, _pow2(n))
    grid = (len(schedule[0]), triton.cdiv(n, block_n))
    if x.shape[0] and grid[0]:
        _grouped_linear_kernel[grid](
            x.contiguous(), weight.contiguous(), out, *schedule, n, k,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(64, _pow2(k)),
            DOT=_dot_dtype(x.dtype, x.device))
    # rounded to x's dtype by torch (Triton's interpreter truncates instead)
    return out.to(x.dtype)


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor,
                   block_m: int = 32) -> Tensor:
    """`dsv3_lite.moe.grouped_linear` in one launch: x (T, in) with its rows
    grouped by expert (counts[j] rows for expert j, summing to T), weight
    (E, out, in) -> (T, out). Each program computes one tile of block_m rows
    of one expert; an expert without rows gets no tile. Products and sums in
    FP32 (BF16 products on a GPU for BF16 inputs), the result in x's dtype.
    Forward only (no autograd).

    The host never reads `counts`: the grid is sized from the shapes alone,
    cdiv(T, block_m) + E tiles, and each program reads its tile (expert, rows)
    from a schedule built on the device (`grouped_tile_schedule`); programs
    past the last real tile return at once. No synchronisation, so the call
    can be captured in a CUDA graph and queued while the host runs ahead."""
    _check_runnable(x.device)
    _check_2d(x, "x")
    _check_block_size(block_m, "block_m")
    e, n, k = weight.shape
    if x.shape[1] != k or counts.shape != (e,) or e == 0:
        raise ValueError(f"x (T, in) {tuple(x.shape)}, weight (E, out, in) "
                         f"{tuple(weight.shape)} and counts (E,) "
                         f"{tuple(counts.shape)} must agree, with E >= 1")
    schedule = grouped_tile_schedule(counts, x.shape[0], block_m)
    weight = weight.to(x.dtype)  # as autocast would: x's precision
    return _grouped_linear_launch(x, weight, schedule, block_m)


__all__ = ["interpreted", "use_triton", "fp8_runnable", "act_quant", "weight_dequant",
           "fp8_gemm", "mla_decode", "grouped_tile_schedule", "grouped_linear"]
