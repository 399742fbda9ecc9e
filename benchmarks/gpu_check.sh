#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): on one NVIDIA GPU, or on CPU with --dry-run.
#   benchmarks/gpu_check.sh [--dry-run] [--work DIR] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PY="${DOCRL_PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "gpu_check: $PY is missing: run 'make setup' first (EXTRA=gpu on a GPU machine), or set DOCRL_PYTHON" >&2
    exit 2
fi
# gpu_check.py stops itself within its budget (840 s); this is the backstop: SIGTERM makes it stop
# the running step with every process it started and print the table of what ran.
exec timeout --signal=TERM --kill-after=30 900 "$PY" benchmarks/gpu_check.py "$@"
