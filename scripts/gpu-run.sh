#!/usr/bin/env bash
# The GPU session's one call, on the lent machine (device tool `run`, carry [".whl"],
# made here by scripts/gpu-wheels.sh, timeout_s 600):   bash scripts/gpu-run.sh
# Installs the carried wheels beside the machine's own torch/transformers; builds the
# full-size family (CPU and disk work: 134 s on the 2-core VM) while the CUDA tests
# run; then the switch benchmark. Logs and reports go to $OUT (two levels deep at
# most, 8 files: one family per call). The family stays in bench-out/ for a second
# call while the machine is warm. SIZE=tiny DEVICE=cpu runs the same steps on any
# machine (with a python3 that has torch and transformers).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu-out} size=${SIZE:-full} device=${DEVICE:-cuda} families=${FAMILIES:-sdxl}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
family_args=()
for family in $families; do family_args+=(--family "$family"); done
python3 benchmarks/switch_latency.py --build-only --size "$size" "${family_args[@]}" --device "$device" \
    --workdir bench-out > "$out/build.log" 2>&1 &
build=$!
# The tests get at most 4 minutes: a hung CUDA test must not cost the benchmark its turn.
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.log"
wait "$build" || echo "the family build failed: see build.log" | tee -a "$out/build.log"
for family in $families; do
    python3 benchmarks/switch_latency.py --size "$size" --family "$family" --device "$device" \
        --repeat 3 --out "$out/switch-$family" --workdir bench-out --keep 2>&1 | tee "$out/switch-$family.log"
done
