#!/usr/bin/env bash
# Everything only a GPU can show, in one run (planned to fit one 10-minute call on an H100):
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]     # OUT_DIR defaults to benchmarks/results
#
# 1. install the project without dependencies (the GPU machine brings its own torch and triton);
# 2. the kernel and backend tests, compiled on the GPU (the `gpu` marked big shapes included);
# 3. benchmarks/kernels.py: the kernel microbenchmarks and the targets;
# 4. benchmarks/generate.py --real: TTFT and decode speed of the real-size model (random weights);
# 5. benchmarks/kernel_resources.py: the compile checks again, with this machine's triton.
# Every step runs even if an earlier one failed; the log and the JSON results go to OUT_DIR, and
# the exit status is the number of failed steps.
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu_session.log"
failed=0

step() {
    echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc: $*" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
step python -m pip install -q --no-deps --no-build-isolation -e .
step nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
step python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step python -m pytest -q -m "gpu or not gpu" $workers tests/test_kernels_attention.py tests/test_kernels_rms_norm.py tests/test_backends.py
step python benchmarks/kernels.py --out "$out"
step python benchmarks/generate.py --real --fixtures ""
step python benchmarks/kernel_resources.py
[ "$out" = benchmarks/results ] || cp benchmarks/results/generate_*.json "$out"/ 2>/dev/null
echo "== $failed step(s) failed; log: $log" | tee -a "$log"
exit "$failed"
