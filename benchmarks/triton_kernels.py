"""The Triton kernels of dsv3_lite.kernels on a GPU: throughput beside a PyTorch baseline and beside the
published H800 anchors.

    python benchmarks/triton_kernels.py                 # V3-like shapes
    python benchmarks/triton_kernels.py --small         # quick shapes

Per kernel: time (triton.testing.do_bench, median ms), the useful work it does per call (FLOPs or bytes
moved), TFLOP/s or GB/s, the PyTorch baseline on the same problem (BF16 matmul for the GEMMs,
scaled_dot_product_attention for MLA decode), and the fraction of the anchor each reaches:
DeepGEMM FP8 GEMM 1350-1550 TFLOP/s (H800), FlashMLA decode 3000 GB/s memory-bound and 580-660 TFLOP/s
compute-bound (H800, BF16). Our kernels are written to be read, not tuned: no autotuning, no warp
specialization; MLA decode and the grouped GEMM multiply BF16 inputs on the tensor cores. A kernel that
fails at a shape (e.g. runs out of shared memory) is reported on its own line and the others still run.
Without a GPU the script says so and exits with status 0 (the kernels are tested on the CPU by
tests/test_kernels.py through Triton's interpreter).
"""
from __future__ import annotations

import argparse
import shlex
import sys

import torch
import torch.nn.functional as F

ANCHORS = {"fp8_gemm": ("TFLOP/s", 1350.0, "DeepGEMM FP8 GEMM, H800"),
           "mla_decode": ("GB/s", 3000.0, "FlashMLA decode, memory-bound, H800")}


def bench(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn)  # ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small shapes (a quick check)")
    opts = parser.parse_args()
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure. The kernels run on the CPU only through "
              "Triton's interpreter, which is for testing (python -m pytest tests/test_kernels.py).")
        return
    from dsv3_lite import kernels
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"triton {kernels.triton.__version__}")
    scale = 8 if opts.small else 1
    measures = [mla_rows, grouped_rows]
    if torch.cuda.get_device_capability(dev) >= (8, 9):
        measures.insert(0, fp8_rows)
    else:
        print("this GPU's compute capability is below 8.9: Triton has no FP8 E4M3 here, so the FP8 "
              "kernels (act_quant, fp8_gemm) are skipped")
    rows = []
    for measure in measures:
        try:
            rows += measure(dev, scale)
        except Exception as err:  # reported, and the other kernels still measured
            print(f"{measure.__name__} failed: {type(err).__name__}: {str(err)[:300]}")
    print_rows(rows)


def fp8_rows(dev: torch.device, scale: int) -> list[tuple]:
    from dsv3_lite import fp8, kernels
    rows = []
    # act_quant: read BF16, write FP8 + scales
    m, k = 4096 // scale, 7168 // scale
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: kernels.act_quant(x))
    ms_ref = bench(lambda: fp8.act_quant(x))
    moved = x.numel() * (2 + 1) + m * (k // 128) * 4
    rows.append(("act_quant", f"{m}x{k}", ms, moved / ms / 1e6, "GB/s", ms_ref, "PyTorch act_quant"))

    # fp8_gemm: (M, K) x (N, K)^T
    m, n, k = 4096 // scale, 7168 // scale, 7168 // scale
    a_q, a_s = fp8.act_quant(torch.randn(m, k, device=dev))
    b_q, b_s = fp8.weight_quant(torch.randn(n, k, device=dev))
    ms = bench(lambda: kernels.fp8_gemm(a_q, a_s, b_q, b_s))
    a16, b16 = torch.randn(m, k, device=dev, dtype=torch.bfloat16), torch.randn(n, k, device=dev,
                                                                               dtype=torch.bfloat16)
    ms_ref = bench(lambda: a16 @ b16.T)
    flops = 2 * m * n * k
    rows.append(("fp8_gemm", f"{m}x{n}x{k}", ms, flops / ms / 1e9, "TFLOP/s", ms_ref, "BF16 matmul"))
    return rows


def mla_rows(dev: torch.device, scale: int) -> list[tuple]:
    from dsv3_lite import kernels
    rows = []
    # MLA decode: V3's latent 512 + rope 64, 128 heads, batch 64, 4096 cached positions (BF16 cache)
    b, h, t, c, r = (64 // scale, 128, 4096 // scale, 512, 64)
    q_lat = torch.randn(b, h, c, device=dev, dtype=torch.bfloat16)
    q_pe = torch.randn(b, h, r, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(b, t, c, device=dev, dtype=torch.bfloat16)
    pe = torch.randn(b, t, r, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: kernels.mla_decode(q_lat, q_pe, kv, pe, 0.1))
    q = torch.cat([q_lat, q_pe], -1).unsqueeze(2)  # (B, H, 1, 576)
    key = torch.cat([kv, pe], -1).unsqueeze(1)  # (B, 1, T, 576): one key head shared by all
    value = kv.unsqueeze(1)
    ms_ref = bench(lambda: F.scaled_dot_product_attention(q, key, value, enable_gqa=True))
    moved = (kv.numel() + pe.numel()) * 2
    rows.append(("mla_decode", f"B{b} H{h} T{t}", ms, moved / ms / 1e6, "GB/s", ms_ref, "SDPA (GQA)"))
    return rows


def grouped_rows(dev: torch.device, scale: int) -> list[tuple]:
    from dsv3_lite import kernels
    rows = []
    # grouped GEMM: 32 local experts, V3's 2048-wide experts, 8 x 4096 / 8 rows each on average
    e, n, k = 32, 2 * 2048, 7168
    counts = torch.full((e,), 1024 // scale, device=dev)
    xg = torch.randn(int(counts.sum()), k // scale, device=dev, dtype=torch.bfloat16)
    wg = torch.randn(e, n // scale, k // scale, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: kernels.grouped_linear(xg, wg, counts))
    ms_ref = bench(lambda: torch.cat([xj @ wj.T for xj, wj in zip(xg.split(counts.tolist()), wg)]))
    flops = 2 * xg.shape[0] * wg.shape[1] * wg.shape[2]
    rows.append(("grouped_linear", f"E{e} {xg.shape[0]}x{wg.shape[1]}x{wg.shape[2]}", ms,
                 flops / ms / 1e9, "TFLOP/s", ms_ref, "BF16 matmul per expert"))
    return rows


def print_rows(rows: list[tuple]) -> None:
    print(f"\n{'kernel':<15s} {'shape':<20s} {'ms':>8s} {'rate':>10s} {'unit':<8s} {'baseline ms':>11s}  "
          f"baseline; anchor")
    for name, shape, ms, rate, unit, ms_ref, base in rows:
        anchor = ANCHORS.get(name)
        note = f"; {rate / anchor[1]:.1%} of {anchor[1]:g} {anchor[0]} ({anchor[2]})" if anchor else ""
        print(f"{name:<15s} {shape:<20s} {ms:>8.3f} {rate:>10.1f} {unit:<8s} {ms_ref:>11.3f}  {base}{note}")


if __name__ == "__main__":
    main()
