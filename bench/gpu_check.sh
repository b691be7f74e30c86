#!/usr/bin/env bash
# One prepared command for a CUDA machine, about 8 minutes on an H100/H200:
#   1. the kernel tests on CUDA tensors (pytest, parallel with pytest-xdist where installed: every
#      test compiles its own kernel specialization, and compiling is CPU-bound),
#   2. meanwhile the correctness fuzz on CUDA at larger shapes (float32 and bfloat16) against the literal loop,
#   3. the benchmark sweep (fused kernel vs eager, torch.compile, per-sequence loop, verl-style eager).
# Results go to $OUT (default bench/results/): gpu_check.log, one log per step, results.md and results.tgz with the CSV,
# plots and markdown tables of the sweep. Each step has its own time limit, so a slow step cannot eat the rest.
#
#   bash bench/gpu_check.sh               # everything
#   BENCH_BUDGET=120 bash bench/gpu_check.sh   # a shorter sweep (seconds)
#   BENCH_ONLY=1 bash bench/gpu_check.sh       # the sweep alone
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
sweep_dir=$(mktemp -d)
unset TRITON_INTERPRET
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=$OUT/gpu_check.log
status=0

{
    date -u
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"

run_step() {  # run_step NAME SECONDS COMMAND...: time-limited, output to $OUT/NAME.log, "exit N" its last line
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "exit $?" >>"$OUT/$name.log"
}
report() {  # report NAME [LINES]: the end of a step's log into the main log; remember failures
    local name=$1
    { echo "=== $name"; tr '\r' '\n' <"$OUT/$name.log" | grep -v '^fuzz: \|^timing: ' | tail -n "${2:-25}"; } | tee -a "$log"
    [ "$(tail -n 1 "$OUT/$name.log")" = "exit 0" ] || status=1
}

if [ -z "${BENCH_ONLY:-}" ]; then
    xdist=""
    python3 -c "import xdist" 2>/dev/null && xdist="-n 10"
    run_step fuzz_f32 170 python3 -m ptr_kernels fuzz --backend triton --device cuda --cases 150 --seed 1000 --max-len 4096 &
    run_step fuzz_bf16 170 python3 -m ptr_kernels fuzz --backend triton --device cuda --cases 100 --seed 2000 --dtype bfloat16 &
    # each fuzz case compiles its own kernel variant: the first 240 of the 400 cases fit the time limit
    PTR_KERNELS_FUZZ_CASES=${PTR_KERNELS_FUZZ_CASES:-240} run_step kernel_tests 170 python3 -m pytest -q -p no:cacheprovider $xdist tests/test_triton_kernel.py tests/test_triton_compile.py
    wait
    report kernel_tests 15
    report fuzz_f32 16
    report fuzz_bf16 16
fi

run_step bench $(( ${BENCH_BUDGET:-290} + 40 )) python3 -m ptr_kernels bench --device cuda --full --out "$sweep_dir" --time-budget "${BENCH_BUDGET:-290}"
report bench 40
cp "$sweep_dir/results.md" "$OUT/" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$sweep_dir" .
echo "gpu_check: status $status" | tee -a "$log"
exit $status
