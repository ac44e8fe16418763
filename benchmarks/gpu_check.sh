#!/usr/bin/env bash
# The GPU check (docs/gpu.md): tests and benchmark under jax and torch on one
# CUDA machine, within 9 minutes. Usage:
#   bash benchmarks/gpu_check.sh OUTDIR [--wheels DIR] [--backends jax,torch]
#       [--tests selection|full] [--cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python3 benchmarks/gpu_check.py "$@"
