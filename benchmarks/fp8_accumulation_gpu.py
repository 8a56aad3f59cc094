"""The FP32 promotion of the FP8 GEMM, measured on a GPU's tensor cores (report 3.3.2, Figure 7b).

    python benchmarks/fp8_accumulation_gpu.py

Two Triton kernels multiply the same FP8 operands, chapter 5's (each of A and B: `act_quant` of a 16 x 4096
`torch.rand` drawn from one generator seeded 3, the FP8 values used with unit scales, so the exact
product is known), repeated to 64 rows so that Hopper runs them on its warpgroup MMAs:

- promoted: `dsv3_lite.kernels.fp8_gemm`, each 128-wide slice of K a fresh `tl.dot(a, b)` whose sum is
  added into an FP32 accumulator (DeepSeek's N_C = 128);
- one accumulator: the same loop written `acc = tl.dot(a, b, acc)`, which leaves the whole K = 4096 sum
  in the tensor cores' accumulator. On sm90 Triton promotes an FP8 dot only when `max_num_imprecise_acc`
  says so, and its default there is 2**30: never.

It prints the GPU, each kernel's maximum relative error against the exact (FP64) product, and the
model `dsv3_lite.fp8.limited_accumulation_matmul` (13 fraction bits, truncated, 32 products per MMA) for
the same two structures. The report measured nearly 2% at K = 4096 without promotion on H800. Without a
GPU the script says so and exits with status 0; `relative_errors` runs under Triton's interpreter too
(tests/test_kernels.py), where both kernels sum in FP32 and agree.
"""
from __future__ import annotations

import shlex
import sys

import torch

from dsv3_lite import fp8, kernels

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

K = 4096
ROWS = 64  # Hopper's warpgroup MMA has 64 rows: chapter 5's 16 rows, four times

if triton is not None:

    @triton.jit
    def one_accumulator_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               FP8_DOT: tl.constexpr):
        # fp8_gemm's loop without scales and without promotion: every slice of K
        # is added inside tl.dot, into the accumulator it is given
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(a_ptr + rows[:, None] * K + k[None, :],
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            b = tl.load(b_ptr + cols[:, None] * K + k[None, :],
                        mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
            if FP8_DOT:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc,
                             input_precision="ieee")
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc,
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def operands(k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 5's FP8 operands (exercise 3), 16 x k each, repeated to ROWS rows."""
    gen = torch.Generator().manual_seed(3)
    a, _ = fp8.act_quant(torch.rand(16, k, generator=gen))
    b, _ = fp8.act_quant(torch.rand(16, k, generator=gen))
    return a.repeat(ROWS // 16, 1), b.repeat(ROWS // 16, 1)


def one_accumulator(a: torch.Tensor, b: torch.Tensor, block_k: int = 128) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[0]
    out = torch.empty(m, n, device=a.device)
    block_m, block_n = min(64, triton.next_power_of_2(m)), min(128, triton.next_power_of_2(n))
    one_accumulator_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        a, b, out, m, n, k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        FP8_DOT=kernels._fp8_dot_supported(a.device))
    return out


def relative_errors(device: torch.device, k: int = K) -> dict[str, float]:
    """Max |C - exact| / exact of both kernels on chapter 5's operands at this K."""
    a, b = operands(k)
    exact = a.double() @ b.double().T
    a, b = a.to(device), b.to(device)
    ones_a = torch.ones(a.shape[0], triton.cdiv(k, 128), device=device)
    ones_b = torch.ones(b.shape[0], triton.cdiv(k, 128), device=device)  # 1 x 128 tiles of b
    results = {"promoted every 128 (fp8_gemm)": kernels.fp8_gemm(a, ones_a, b, ones_b),
               "one accumulator, acc = tl.dot(a, b, acc)": one_accumulator(a, b)}
    return {name: ((c.double().cpu() - exact).abs() / exact).max().item() for name, c in results.items()}


def main() -> None:
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    if not torch.cuda.is_available() or triton is None:
        print("no CUDA GPU (or no Triton) on this machine: nothing to measure. Under Triton's interpreter "
              "both kernels sum in FP32 (tests/test_kernels.py runs them).")
        return
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    print(f"{torch.cuda.get_device_name(dev)} (sm{major}{minor}), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    if (major, minor) < (8, 9):
        print("compute capability below 8.9: no FP8 tensor cores, nothing to measure")
        return
    a, b = (x[:16] for x in operands())
    exact = a.double() @ b.double().T
    model = {promote: ((fp8.limited_accumulation_matmul(a, b, promote_every=promote, mma_k=32).double()
                        - exact).abs() / exact).max().item() for promote in (128, None)}
    print(f"\nmax relative error against the exact product, FP8 operands, K = {K}")
    print(f"{'kernel':44s} {'this GPU':>9s} {'model':>9s}")
    for (name, err), promote in zip(relative_errors(dev).items(), (128, None)):
        print(f"{name:44s} {err:>9.2e} {model[promote]:>9.2e}")
    print("model: limited_accumulation_matmul, 13 fraction bits truncated, mma_k 32; "
          "report: nearly 2% unpromoted on H800")


if __name__ == "__main__":
    main()
