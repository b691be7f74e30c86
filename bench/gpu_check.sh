#!/usr/bin/env bash
# One prepared command for a CUDA machine, at most 8 minutes on an H200 (GPU_CHECK_SECONDS, default 480, is a
# deadline no step runs past; every step also has its own time limit, so a slow step cannot eat the rest):
#   1. in parallel, about 150 s:
#      - the CUDA tests: the kernel tests against the reference, long sequences over many programs (chunk
#        boundaries, the state across chunks, the same bits twice), torch.compile, the edge behaviour (NaN/inf at
#        valid positions, bad packed offsets checked in the kernel, the carried state), reliability, bad inputs,
#        the from-logits kernels and the property tests, all handing the kernels CUDA tensors (pytest, parallel
#        with pytest-xdist where installed: every test compiles its own kernel specializations, and compiling
#        is CPU-bound: on the H200's 16 cores the three steps below share them); PTR_KERNELS_FUZZ_CASES
#        (default 24) of the kernel tests' 400 seeded cases;
#      - the ahead-of-time compile of every kernel variant for sm_90 (registers and spills per variant);
#      - a short correctness fuzz on CUDA (float32 up to 4096 tokens, and bfloat16) against the literal loop;
#   2. `ptr-kernels bench --host`: wall-clock per fwd+bwd call, fused vs eager, at 8x512 and packed 8 / 4096;
#   3. the float32 benchmark sweep at the targets' shapes (BENCH_BUDGET seconds, default 130): torch.compile of
#      the reference first, the eager baseline, the fused kernel (the packed 8 x 131,072 shape first), the loop
#      and verl; the targets in results.md;
#   4. `ptr-kernels bench --from-logits` (FROM_LOGITS_BUDGET seconds, default 45): the fused loss from logits
#      against eager log_softmax and, when their wheels were carried in .whl/ (the GPU machine reaches no
#      package index: `pip download --no-deps liger-kernel trl -d .whl` here, then carry `.whl`), Liger-Kernel's
#      triton_grpo_loss and TRL's selective_log_softmax_and_entropy;
#   5. `ptr-kernels bench --from-hidden` (FROM_HIDDEN_BUDGET seconds, default 80): the loss from hidden states,
#      the LM head included (N 8192 and 32768, H 3584, V 152064, bf16), against the materialized logits, the
#      head's GEMMs alone and, when carried, Liger's and TRL's heads;
#   6. optionally (BF16_BUDGET seconds, off by default: it does not fit the 8 minutes) the fused kernel and eager
#      with bfloat16 inputs.
# Everything goes to one folder $OUT/<date>-<card>-<commit>/ (default OUT=bench/results), named as the folders of
# docs/gpu-results/ and ready to be committed there: gpu_check.log (date, card, commit, versions, the end of each
# step's log), one log per step, host.csv / host.md, results.csv / results.md and the plots. The folder is also
# packed into one archive next to it, $OUT/<date>-<card>-<commit>.tar.gz, for a runner that returns few files.
# Without a git checkout, pass the commit:
#
#   PTR_KERNELS_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh
#   BENCH_BUDGET=120 bash bench/gpu_check.sh     # a shorter sweep (seconds)
#   BENCH_ONLY=1 bash bench/gpu_check.sh         # host time and sweep only
#   BF16_BUDGET=90 GPU_CHECK_SECONDS=600 bash bench/gpu_check.sh   # add the bfloat16 sweep (into bf16/)
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-480} ))

commit=${PTR_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "$commit" != unknown ] && ! git diff --quiet HEAD 2>/dev/null && [ -z "${PTR_KERNELS_COMMIT:-}" ]; then
    commit=$commit-dirty
fi
export PTR_KERNELS_COMMIT=$commit
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' \
       | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
out=${OUT:-bench/results}
name=$(date -u +%F)-${card:-unknown-card}-$commit
dir=$out/$name
mkdir -p "$dir"
log=$dir/gpu_check.log
status=0

{
    echo "date $(date -u '+%F %T') UTC"
    echo "card ${card:-unknown}"
    echo "commit $commit"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$log"

run_step() {  # run_step NAME SECONDS COMMAND...: output to $dir/NAME.log, "exit N" its last line (124: time out)
    local name=$1 limit=$2 left=$(( deadline - $(date +%s) )); shift 2
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        printf 'not run: the deadline (GPU_CHECK_SECONDS) has passed\nexit 124\n' >"$dir/$name.log"
        return
    fi
    timeout --kill-after=5 "$limit" "$@" >"$dir/$name.log" 2>&1
    echo "exit $?" >>"$dir/$name.log"
}
report() {  # report NAME [LINES]: the end of a step's log into the main log; remember failures
    local name=$1
    { echo "=== $name"; tr '\r' '\n' <"$dir/$name.log" | grep -v '^fuzz: \|^timing: \|^launches: ' | tail -n "${2:-25}"; } | tee -a "$log"
    [ "$(tail -n 1 "$dir/$name.log")" = "exit 0" ] || status=1
}

if [ -z "${BENCH_ONLY:-}" ]; then
    xdist=""
    python3 -c "import xdist" 2>/dev/null && xdist="-n 12"
    # a case compiles its own kernel variant (6-10 s on the H200's host, beside the other steps): as many as
    # fit the step's limit
    run_step fuzz_f32 150 python3 -m ptr_kernels fuzz --backend triton --device cuda --cases 20 --seed 1000 \
        --max-len 4096 &
    run_step fuzz_bf16 150 python3 -m ptr_kernels fuzz --backend triton --device cuda --cases 12 --seed 2000 \
        --dtype bfloat16 &
    # the ahead-of-time compile of the CPU tests, here for the card itself: compiled variants, registers, spills
    run_step aot_compile 150 bash -c "python3 tests/test_triton_compile.py && python3 tests/test_from_logits.py" &
    # each seeded case of the kernel tests compiles its own kernel variant: the first 24 of the 400 (at 100 the
    # step ran out of time at 64 %; at 24 it may still not finish); the edge tests first, so that they run even
    # then; a line per test (-v), so that failures are named when the limit ends the step before pytest's summary
    PTR_KERNELS_FUZZ_CASES=${PTR_KERNELS_FUZZ_CASES:-24} run_step cuda_tests 150 python3 -m pytest -v -rfE \
        -p no:cacheprovider $xdist tests/test_kernel_edges.py tests/test_reliability.py tests/test_bad_inputs.py \
        tests/test_chunks.py tests/test_properties.py tests/test_from_logits.py tests/test_triton_compile.py \
        tests/test_triton_kernel.py
    wait
    # failed tests, and errors (a collection error names a file, not a test)
    grep -a -E '(FAILED|ERROR) ' "$dir/cuda_tests.log" | grep -a -o -E 'tests/[^ ]+(::[^ ]+)?' | sort -u \
        >"$dir/cuda_failures.txt"
    report cuda_tests 20
    { echo "=== cuda_tests: $(grep -a -c ' PASSED ' "$dir/cuda_tests.log") passed," \
           "$(wc -l <"$dir/cuda_failures.txt") failed or in error"
      head -n 30 "$dir/cuda_failures.txt"; } | tee -a "$log"
    report aot_compile 12
    report fuzz_f32 16
    report fuzz_bf16 16
fi

# host.csv before the sweep, so that the sweep's results.md includes the wall-clock targets measured here
run_step host 45 python3 -m ptr_kernels bench --host --device cuda --out "$dir"
report host 12

budget=${BENCH_BUDGET:-130}
# the shapes the targets name (docs/benchmarks.md), so that the budget reaches the fused rows after the baselines
shapes=8x512,256x4096,512x8192,4096x1024,2048x8192,1024seq/1048576tok,8seq/1048576tok,2048seq/16777216tok
run_step bench $(( budget + 30 )) python3 -m ptr_kernels bench --device cuda --full --shapes "$shapes" --out "$dir" \
    --time-budget "$budget"
report bench 60

if [ -d .whl ]; then  # wheels carried to the GPU machine (no index there): the from-logits comparisons
    python3 -m pip install -q --no-deps .whl/*.whl >"$dir/wheels.log" 2>&1 || echo "wheels: install failed" | tee -a "$log"
fi
run_step from_logits "${FROM_LOGITS_BUDGET:-45}" python3 -m ptr_kernels bench --device cuda --from-logits --out "$dir"
report from_logits 30

run_step from_hidden "${FROM_HIDDEN_BUDGET:-80}" python3 -m ptr_kernels bench --device cuda --from-hidden --max-reps 5 \
    --out "$dir"
report from_hidden 30

if [ "${BF16_BUDGET:-0}" -gt 0 ]; then
    run_step bench_bf16 $(( BF16_BUDGET + 30 )) python3 -m ptr_kernels bench --device cuda --full --dtype bfloat16 \
        --providers fused,eager --out "$dir/bf16" --time-budget "$BF16_BUDGET"
    report bench_bf16 40
fi

echo "gpu_check: status $status; results in $dir, packed into $out/$name.tar.gz" | tee -a "$log"
tar -czf "$out/$name.tar.gz" -C "$out" "$name" || status=1
exit $status
