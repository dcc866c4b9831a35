#!/usr/bin/env bash
# Everything only a GPU can show, in one run planned for one 10-minute device call (about 5 minutes
# expected; the step limits below add up to 11, and whatever is in OUT_DIR survives a kill):
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]     # OUT_DIR: $1, else $OUT, else benchmarks/results
#
# 1. install the project without dependencies (the GPU machine brings its own torch and triton;
#    if that install fails, the three packages are put on PYTHONPATH through links instead);
# 2. benchmarks/kernels.py: the kernel microbenchmarks and the issue's targets (each Triton row is
#    also checked against its torch reference);
# 3. benchmarks/generate.py --real: TTFT and decode speed of the real-size model (random weights);
# 4. the kernel and backend tests, compiled on the GPU (the `gpu` marked big shapes included);
# 5. benchmarks/kernel_resources.py: the compile checks again, with this machine's triton.
# Each step has its own time limit and runs even if an earlier one failed. The log and every JSON
# result land in OUT_DIR as soon as they exist; the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
log="$out/gpu_session.log"
started=$(mktemp)  # results newer than this file are this run's
failed=0

step() {  # step SECONDS command...
    local limit=$1
    shift
    echo "== $(date -u +%H:%M:%S) $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc: $*" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
step 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
step 90 python -m pip install -q --no-deps --no-build-isolation -e .
if ! python -c "import glm4v_core, glm4v_kernels, glm4v_conversion" 2>>"$log"; then
    shim=$(mktemp -d)
    ln -s "$PWD/src/glm4v_core" "$shim/glm4v_core"
    ln -s "$PWD/kernels" "$shim/glm4v_kernels"
    ln -s "$PWD/conversion" "$shim/glm4v_conversion"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "== install failed: packages linked from $shim" | tee -a "$log"
fi
step 30 python -c "import torch, triton, pytest; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step 150 python benchmarks/kernels.py --out "$out"
step 120 python benchmarks/generate.py --real --fixtures ""
[ "$out" -ef benchmarks/results ] || find benchmarks/results -name 'generate_*.json' -newer "$started" -exec cp {} "$out"/ \;
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step 200 python -m pytest -q -m "gpu or not gpu" $workers tests/test_kernels_attention.py \
    tests/test_kernels_rms_norm.py tests/test_backends.py
step 40 python benchmarks/kernel_resources.py
echo "== $failed step(s) failed; log: $log" | tee -a "$log"
exit "$failed"
