#!/usr/bin/env bash
# One-shot GPU check of engine v2 (issue 14), sized for <= 6 minutes on one H100/H200.
# Installs this project with its test extra into the current Python, runs the CUDA tests, then
# bench/gpu_bench.py (engine vs transformers at 1/8/64/256 rows in flight, decode step vs the
# weight-read floor, CUDA graphs on/off, memory vs kv_cache_gib, capacity vs the engine, and one
# pipeline run with two replicas on one GPU). Everything lands under $OUT (default ./gpu_out).
# Try it on CPU first: bash bench/gpu.sh --device cpu --tiny --batches 1,8 --skip-hf
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
python -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/device.txt"
pip install -q -e ".[test]" > "$OUT/pip.txt" 2>&1 || tail -5 "$OUT/pip.txt"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
timeout 150 python -m pytest -q -m cuda tests/ > "$OUT/cuda_tests.txt" 2>&1; echo "cuda tests rc=$?" >> "$OUT/cuda_tests.txt"
tail -5 "$OUT/cuda_tests.txt"
timeout 420 python bench/gpu_bench.py --pipeline --quantization int8,fp8 --out "$OUT" "$@" 2> "$OUT/gpu_bench.err"; echo "gpu_bench rc=$?"
tail -20 "$OUT/gpu_bench.err"
