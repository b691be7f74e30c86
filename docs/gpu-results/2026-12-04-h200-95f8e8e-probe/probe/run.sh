#!/usr/bin/env bash
# A/B probe on the GPU (not part of the package): CUDA test subset + variant timings, results into $OUT
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
R=${OUT:-/tmp/probe_out}; mkdir -p "$R"
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$R/env.txt" 2>&1
python3 probe/variants.py /tmp/var > "$R/variants.txt" 2>&1
xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
(PYTHONPATH=$PWD PTR_KERNELS_FUZZ_CASES=${FUZZ:-24} timeout ${TEST_S:-200} python3 -m pytest -q -rf -p no:cacheprovider $xdist \
    tests/test_chunks.py tests/test_kernel_edges.py tests/test_triton_kernel.py tests/test_reliability.py \
    tests/test_properties.py > "$R/tests.log" 2>&1; echo "exit $?" >> "$R/tests.log") &
tests=$!
(PYTHONPATH=$PWD timeout 200 python3 -m ptr_kernels fuzz --backend triton --device cuda --cases 40 --seed 1000 --max-len 4096 > "$R/fuzz.log" 2>&1; echo "exit $?" >> "$R/fuzz.log") &
fz=$!
rm -f /tmp/ab_*
vs="v0 v2stage vatomic vnohist"
for v in $vs; do
    TRITON_CACHE_DIR=/tmp/tc_$v PYTHONPATH=/tmp/var/$v timeout 330 python3 probe/ab.py $v /tmp/ab_ready_$v /tmp/ab_turn_$v > "$R/ab_$v.log" 2>&1 &
done
for v in $vs; do  # all compiled, then one at a time on the card
    for i in $(seq 1 300); do [ -e /tmp/ab_ready_$v ] && break; sleep 1; done
done
wait $fz
wait $tests
for v in $vs; do
    touch /tmp/ab_turn_$v
    for i in $(seq 1 120); do [ -e /tmp/ab_turn_$v.done ] && break; sleep 1; done
done
wait
cat "$R"/ab_*.log > "$R/ab.txt"
tail -n 30 "$R/tests.log"; tail -n 12 "$R/fuzz.log" | tr '\r' '\n' | tail -n 6; grep -h "^time\|^check\|Error" "$R"/ab_*.log
