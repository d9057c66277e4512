#!/usr/bin/env bash
# Run every baseline once, sequentially (2 cores: nothing else should run meanwhile),
# and append one JSON line per benchmark to OUT (default: stdout only).
#
#   bash benchmarks/setup_hf.sh            # once
#   bash benchmarks/run_all.sh /tmp/baselines.jsonl
#
# OPENBLAS_CORETYPE is left as the environment sets it; matmul_peak.py reports the
# OpenBLAS kernel numpy actually used, and also re-measures numpy without it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-/dev/null}"
HF=benchmarks/.venv-hf/bin/python
MAIN=.venv/bin/python
[ -x "$HF" ] || { echo "run benchmarks/setup_hf.sh first" >&2; exit 1; }

source benchmarks/_quiet.sh  # busy_pct, wait_quiet
run() { wait_quiet; echo "+ $*" >&2; "$@" | tail -n 1 | tee -a "$OUT"; }

run "$MAIN" benchmarks/matmul_peak.py --all-venvs --json
run "$HF" benchmarks/hf_switch.py --json
run "$MAIN" benchmarks/pychop_quantize.py --all-venvs --json
