#!/usr/bin/env bash
# The GPU checks in one command, from the repository root on a CUDA machine, within 8 minutes on one
# H100 (the benchmark plans its phases within BENCH_BUDGET_S and is stopped at BENCH_TIMEOUT_S; the
# tests get what is left, at least 40 s):
#
#     bash scripts/gpu_check.sh [OUT_DIR]            # default gpu-out/
#     bash scripts/gpu_check.sh --smoke [OUT_DIR]    # the same steps on the CPU at tiny sizes (CI)
#
# 1. If .whl/ is there (scripts/gpu_wheels.sh), installs those wheels into /tmp/kandinsky-site
#    (no index, no dependencies) and puts it first on PYTHONPATH; nothing else is installed.
# 2. The full-size benchmark (python -m kandinsky_engine.jobs.bench_gpu): eager, compiled and fp8 modes, each stage's
#    time and peak memory, end-to-end and GPU-only images/s, the GPU's idle time from the profiler,
#    MFU against the datasheet and a measured GEMM peak, fp8's distance from bf16, and the stage
#    costs that `kandinsky-batch plan --from-measured` reads -> OUT_DIR/bench.json (+ bench.log),
#    rewritten after each phase.
# 3. The GPU tests: pytest -m gpu tests/test_gpu.py -> OUT_DIR/gpu_tests.log (tiny models: stage
#    parity with diffusers in every dtype and task, MoVQ half precision, host syncs, memory caps,
#    uint8 on the device, the prior's CUDA graphs; the Ray job test skips where Ray is absent).
# 4. OUT_DIR/gpu_check.json: the one file to read: the benchmark's figures, the tests' outcome, the
#    GPU as nvidia-smi names it, and how long each step took.
# Exit status: the benchmark's, or pytest's if the benchmark passed.
set -uo pipefail
SMOKE=()
if [ "${1:-}" = "--smoke" ]; then SMOKE=(--smoke); shift; fi
OUT=${1:-${OUT:-gpu-out}}
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-360}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-410}
mkdir -p "$OUT"
start=$(date +%s)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kandinsky-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/kandinsky-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false KANDINSKY_CACHE=${KANDINSKY_CACHE:-/tmp/kandinsky-cache}
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
else
    : > "$OUT/gpu.txt"
fi
timeout "$BENCH_TIMEOUT_S" "$PYTHON" -m kandinsky_engine.jobs.bench_gpu "${SMOKE[@]}" --budget-s "$BENCH_BUDGET_S" \
    --output "$OUT/bench.json" > "$OUT/bench.log" 2>&1
bench=$?
bench_s=$(( $(date +%s) - start ))
left=$(( TOTAL_S - bench_s ))
[ "$left" -lt 40 ] && left=40
timeout "$left" "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs > "$OUT/gpu_tests.log" 2>&1
tests=$?
total_s=$(( $(date +%s) - start ))
"$PYTHON" - "$OUT" "$bench" "$tests" "$bench_s" "$total_s" <<'EOF'
import json, sys
from pathlib import Path

out, bench, tests, bench_s, total_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
try:
    figures = json.loads((out / "bench.json").read_text())
except (OSError, ValueError) as exc:  # stopped before its first phase was written
    figures = {"error": f"no bench.json: {exc}"}
log = (out / "gpu_tests.log").read_text(errors="replace").strip().splitlines()
result = {"gpu": (out / "gpu.txt").read_text().strip(), "bench": figures,
          "bench_exit": bench, "bench_s": bench_s, "bench_timed_out": bench == 124,
          "gpu_tests": {"exit": tests, "timed_out": tests == 124, "summary": log[-1] if log else ""},
          "total_s": total_s}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
head = figures.get("headline", {})
print(f"gpu_check: {result['gpu'] or 'no nvidia-smi'}; headline {head}; tests: {result['gpu_tests']['summary']}; "
      f"{total_s} s; {out / 'gpu_check.json'}")
EOF
[ "$bench" -ne 0 ] && exit "$bench"
exit "$tests"
