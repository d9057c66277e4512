#!/usr/bin/env bash
# The lab's benchmarks (lab_bench.py sections + the quantize contenders), one JSON line each, appended to
# OUT (default benchmarks/results/lab-cpu-2core.jsonl), waiting for a quiet CPU before each, then the
# markdown tables of RESULTS.md from OUT:
#
#   bash benchmarks/setup_hf.sh       # once (the HF baseline's venv)
#   bash benchmarks/run_lab.sh        # everything: ~35 min on 2 idle cores
#   SECTIONS="userpath cli telemetry seeds" bash benchmarks/run_lab.sh   # only these sections (~12 min)
#
# With SECTIONS set only those lab_bench.py sections run; without it also `hf` without the huge-page
# tunable, the quantize contenders and the XLA:CPU micro-benchmarks. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-benchmarks/results/lab-cpu-2core.jsonl}"
MAIN="${PYTHON:-.venv/bin/python}"
REPS="${REPS:-5}"
source benchmarks/_quiet.sh  # busy_pct, wait_quiet
run() { wait_quiet; echo "+ $*" >&2; "$@" | tail -n 1 | tee -a "$OUT" | cut -c1-200; }
# As `precision-lab` runs itself (precision_lab/cli.py re-executes with it): malloc asks for transparent
# huge pages, so XLA's per-call temporaries are not first-touched page by page on every call.
export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
echo "+ CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) ($(nproc) cores)" >&2
for s in ${SECTIONS:-userpath cli telemetry hf policies accumulator gain seeds small capacity compile}; do
    run "$MAIN" benchmarks/lab_bench.py "$s" --reps "$REPS" --json
done
if [ -z "${SECTIONS:-}" ]; then
    # The lab-vs-HF comparison once more with the tunable off for both (what a plain process gets).
    run env GLIBC_TUNABLES= "$MAIN" benchmarks/lab_bench.py hf --reps "$REPS" --json
    run "$MAIN" benchmarks/pychop_quantize.py --all-venvs --fresh-output --json
    run "$MAIN" benchmarks/xla_cpu_micro.py --json
fi
"$MAIN" benchmarks/results_table.py "$OUT"
