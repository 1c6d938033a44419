#!/usr/bin/env bash
# The GPU check (on a CUDA machine, after `make setup`; under ten minutes): GPU-marked tests, a
# bf16 KD run, the same under DDP on every GPU, teacher outputs cached vs online under bf16.
# Results: one JSON file (default outputs/gpu_check.json); exit status 1 when a check fails.
#   scripts/gpu_check.sh [--out PATH] [--cpu-smoke]     (see scripts/gpu_check.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_check: $PY not found; run 'make setup' first (or set PYTHON=...)" >&2; exit 2; }
exec "$PY" scripts/gpu_check.py "$@"
