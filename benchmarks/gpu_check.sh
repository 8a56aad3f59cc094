#!/usr/bin/env bash
# The GPU checks of the Triton kernels, on a CUDA machine with a copy of this repository:
#   bash benchmarks/gpu_check.sh            # about 5 minutes on an H100 or H200; 10 at most
# (a) tests/test_kernels.py compiled on the GPU (no TRITON_INTERPRET), (b) benchmarks/triton_kernels.py,
# (c) benchmarks/fp8_accumulation_gpu.py: the FP8 GEMM's relative error at K = 4096 with promotion every
# 128 (fp8_gemm) and with one accumulator (acc = tl.dot(a, b, acc)), and the GPU's name.
# Every step prints its figures and keeps a copy under ${OUT:-/tmp/gpu_out}. A failing step is reported
# and the next still runs; the script exits non-zero if any step failed.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels, not the interpreter

python -c "import dsv3_lite" 2>/dev/null || pip install -q -e . 2>&1 | tail -n 3
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/environment.txt"

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to the terminal and $OUT/NAME.txt
    local name=$1 limit=$2 status=0
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "=== $name FAILED (status $status)" | tee -a "$OUT/$name.txt"
        failed+=("$name")
    fi
}

step test_kernels 240 python -m pytest tests/test_kernels.py -q -p no:cacheprovider -p no:nbval
step triton_kernels 200 python benchmarks/triton_kernels.py
step fp8_accumulation 90 python benchmarks/fp8_accumulation_gpu.py

if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed steps: ${failed[*]} (outputs in $OUT)"
    exit 1
fi
echo "all steps passed (outputs in $OUT)"
