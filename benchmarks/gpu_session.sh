#!/usr/bin/env bash
# Everything only a GPU can show, in one run of about 10 minutes (one device call; split it with ONLY=...):
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]     # OUT_DIR: $1, else $OUT, else benchmarks/results
#     ONLY="setup tests generate" bash benchmarks/gpu_session.sh    # a subset of the steps, by name
#     KERNELS_ARGS="--only attention" ...                            # extra arguments of benchmarks/kernels.py
#
# setup        install the project without dependencies (the GPU machine brings its own torch and
#              triton; if that install fails, the packages are put on PYTHONPATH through links);
# kernels      benchmarks/kernels.py: kernel microbenchmarks (attention forward and backward, RMSNorm)
#              vs PyTorch and the roofline, each Triton row checked against its torch reference;
# tests        the kernel and backend tests compiled on the GPU (`gpu` marked big shapes included);
# gputests     every other `gpu` marked test (CUDA-graph decode, gradients, make-reference, quantized);
# generate     benchmarks/generate.py --real: TTFT and decode speed of the real-size model (random
#              weights), eager vs compiled decode step replayed from a CUDA graph;
# train        benchmarks/train.py: a training step at real widths, with and without chunked loss
#              and activation checkpointing;
# quant        benchmarks/quant.py --real --compile: decode and prefill of bf16, int8 and int4 weights;
# finetune     benchmarks/finetune.py --real: peak memory of one LoRA step of the real 9B shapes;
# memory_plan  benchmarks/memory_plan.py --device cuda: the memory planner's 9B predictions against
#              torch.cuda.max_memory_allocated (LoRA, QLoRA, LoRA on vision too, bf16 / int4 generation);
# multi_image  benchmarks/multi_image.py --real: TTFT and peak memory for 1, 2 and 4 images;
# serve        benchmarks/serve.py --mid: glm4v serve's throughput and p50/p95 latency at 1, 4 and 16
#              concurrent clients vs one at a time (bf16, the bundled demo and the mid-size model);
# resources    benchmarks/kernel_resources.py: the compile checks again, with this machine's triton.
# Each step has its own time limit and runs even if an earlier one failed. The log and the new JSON
# results land in OUT_DIR as soon as they exist (results.tgz holds every result file of this run);
# the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results}}
only=${ONLY:-}
mkdir -p "$out"
log="$out/gpu_session.log"
started=$(mktemp)  # results newer than this file are this run's
failed=0

collect() {  # this run's result files, into OUT_DIR as one archive (the device returns few files)
    local new
    new=$(find benchmarks/results -name '*.json' -newer "$started" 2>/dev/null)
    [ -n "$new" ] && tar czf "$out/results.tgz" $new
}

step() {  # step NAME SECONDS command...
    local name=$1 limit=$2
    shift 2
    if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then return; fi
    echo "== $(date -u +%H:%M:%S) [$name] $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc: $*" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    collect
}

export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
step setup 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
step setup 90 python -m pip install -q --no-deps --no-build-isolation -e .
if ! python -c "import glm4v_core, glm4v_kernels, glm4v_conversion" 2>>"$log"; then
    shim=$(mktemp -d)
    ln -s "$PWD/src/glm4v_core" "$shim/glm4v_core"
    ln -s "$PWD/kernels" "$shim/glm4v_kernels"
    ln -s "$PWD/conversion" "$shim/glm4v_conversion"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    echo "== install failed: packages linked from $shim" | tee -a "$log"
fi
step setup 30 python -c "import torch, triton, pytest; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step tests ${TESTS_LIMIT:-240} python -m pytest -v -rf --tb=line -m "gpu or not gpu" $workers tests/test_kernels_attention.py \
    tests/test_kernels_attention_backward.py tests/test_kernels_rms_norm.py tests/test_kernels_quant_matmul.py \
    tests/test_backends.py
step gputests ${GPUTESTS_LIMIT:-150} python -m pytest -v -rf --tb=short -m gpu $workers tests --ignore=tests/test_kernels_attention.py \
    --ignore=tests/test_kernels_attention_backward.py --ignore=tests/test_kernels_rms_norm.py \
    --ignore=tests/test_kernels_quant_matmul.py --ignore=tests/test_backends.py
step kernels ${KERNELS_LIMIT:-150} python benchmarks/kernels.py --out benchmarks/results ${KERNELS_ARGS:-}
step generate 240 python benchmarks/generate.py --real --fixtures "" --mid "" --repeat 2
step quant 240 python benchmarks/quant.py --real --compile --repeat 2 --new-tokens 64 --out benchmarks/results
step train 90 python benchmarks/train.py --device cuda --no-plan  # the plan: the memory_plan step
step finetune 150 python benchmarks/finetune.py --real
step memory_plan 240 python benchmarks/memory_plan.py --device cuda
step multi_image 120 python benchmarks/multi_image.py --real --fixtures ""
step serve 120 python benchmarks/serve.py --mid --device cuda --dtype bfloat16 --out benchmarks/results
step resources 40 python benchmarks/kernel_resources.py
echo "== $failed step(s) failed; log: $log" | tee -a "$log"
exit "$failed"
