#!/usr/bin/env bash
# One-shot GPU benchmark (issue: GPU fast path). Installs this project and transformers into the
# current Python, runs the CUDA tests, then bench/gpu_bench.py. Sized for <= 5 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
pip install -q -e ".[test]" 2>&1 | tail -2 || true
python -m pytest -q -m cuda tests/ 2>&1 | tail -5
python bench/gpu_bench.py "$@"
