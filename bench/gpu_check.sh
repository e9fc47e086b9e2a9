#!/usr/bin/env bash
# On a CUDA machine: build the extension, then bench/report.py (arguments passed on, e.g. --quick, --gpu-tests).
set -euo pipefail; cd "$(dirname "$0")/.."
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} python -m pip install --no-build-isolation --no-deps -q -e . && python bench/report.py "$@"
