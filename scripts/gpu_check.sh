#!/usr/bin/env bash
# Issue 10's GPU checks in one command, from the repository root on a CUDA machine:
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default gpu-out/
#
# 1. If .whl/ is there (scripts/gpu_wheels.sh), installs those wheels into /tmp/kandinsky-site
#    (no index, no dependencies) and puts it first on PYTHONPATH; nothing else is installed.
# 2. The full-size benchmark: python3 -m kandinsky_engine.jobs.bench_gpu -> OUT_DIR/bench.json (+ bench.log).
#    About 2-4 minutes on one H100/H200 (random bf16 weights built on the GPU, no download).
# 3. The GPU tests: pytest -m gpu tests/test_gpu.py -> OUT_DIR/gpu_tests.log (tiny models: stage
#    parity with diffusers in float32/float16/bfloat16 for every task, depth hints, MoVQ half
#    precision, host syncs per step, memory caps; the Ray job test skips where Ray is absent).
# Exit status: the benchmark's, or pytest's if the benchmark passed.
set -uo pipefail
OUT=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kandinsky-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/kandinsky-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false KANDINSKY_CACHE=${KANDINSKY_CACHE:-/tmp/kandinsky-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -m kandinsky_engine.jobs.bench_gpu --output "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -s -rs 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
[ "$bench" -ne 0 ] && exit "$bench"
exit "$tests"
