"""Peak memory of loading a checkpoint in DeepSeek's released layout (`dsv3_lite.hf.load_release`).

    python benchmarks/release_memory.py                 # a 115M-parameter model, FP8 release
    python benchmarks/release_memory.py --dim 256       # smaller and faster

Writes a random model's release (FP8 weights with 128x128 block scales) to a temporary folder, then loads
it in a fresh Python process and prints how much the process's peak resident memory (Linux's VmHWM, reset
just before the load) grew during the load,
as a multiple of the FP32 model and of the checkpoint's bytes on disk. Run twice: with the C allocator's
defaults, and with MALLOC_MMAP_THRESHOLD_ set so that glibc hands freed large blocks back to the system
at once (the defaults may keep them in the process, which counts towards the peak).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

from dsv3_lite import ModelArgs
from dsv3_lite.hf import save_release
from dsv3_lite.model import Transformer

MEASURE = """
import pathlib, sys
from dsv3_lite.hf import load_release


def status(field):  # kB -> bytes, from Linux's /proc
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


pathlib.Path("/proc/self/clear_refs").write_text("5")  # peak := current
before = status("VmRSS")
model = load_release(pathlib.Path(sys.argv[1]))
print(status("VmHWM") - before, sum(p.numel() for p in model.parameters()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    opts = parser.parse_args()
    args = ModelArgs.small(dim=opts.dim, inter_dim=3 * opts.dim, moe_inter_dim=opts.dim // 2,
                           n_layers=opts.layers, n_routed_experts=opts.experts, n_activated_experts=4,
                           n_heads=8, q_lora_rank=opts.dim // 4, kv_lora_rank=opts.dim // 4,
                           qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    print("$ python " + " ".join(sys.argv))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        save_release(Transformer(args), folder, fp8=True)
        on_disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                      if f.endswith(".safetensors"))
        for label, env in [("allocator defaults", {}),
                           ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})]:
            done = subprocess.run([sys.executable, "-c", MEASURE, folder], capture_output=True, text=True,
                                  env={**os.environ, **env}, check=True)
            grew, params = map(int, done.stdout.split())
            print(f"{label:30s}: {params / 1e6:.1f}M parameters, {on_disk / 1e6:.0f} MB on disk (FP8), "
                  f"FP32 model {4 * params / 1e6:.0f} MB; peak memory grew by {grew / 1e6:.0f} MB = "
                  f"{grew / (4 * params):.2f}x the FP32 model = {grew / on_disk:.1f}x the checkpoint")


if __name__ == "__main__":
    main()
