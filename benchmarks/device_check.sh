#!/usr/bin/env bash
# The lab on an accelerator, from the source tree, installing nothing (see device_check.py for the parts):
#
#   bash benchmarks/device_check.sh OUTDIR              # one GPU: < 8 min (420 s of parts + start-up)
#   bash benchmarks/device_check.sh OUTDIR --cpu-smoke  # reduced, on CPU: ~30 s on 2 idle cores
#
# JSON results in OUTDIR (summary.json holds every part). Python: $PYTHON, else the repo's .venv, else
# python3. Pure-Python packages the machine lacks (optax for training, hypothesis for some tests) can be
# dropped unpacked into shared/pydeps or $DEVICE_CHECK_PYDEPS: that folder goes on PYTHONPATH.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: device_check.sh OUTDIR [--cpu-smoke]}"
shift
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-}"
[ -z "$PY" ] && [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python"
[ -z "$PY" ] && PY=python3
EXTRA="${DEVICE_CHECK_PYDEPS:-$ROOT/shared/pydeps}"
export PYTHONPATH="$ROOT${EXTRA:+:$EXTRA}${PYTHONPATH:+:$PYTHONPATH}"
# Each process takes GPU memory as it needs it: the test subprocesses run beside the parent process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LIMIT=470
for a in "$@"; do
    if [ "$a" = "--cpu-smoke" ]; then export JAX_PLATFORMS=cpu; LIMIT=300; fi
done
cd "$ROOT"
# The hard stop stays under the 8 minutes; the Python side plans its parts to finish well before it.
timeout --kill-after=10 "$LIMIT" "$PY" benchmarks/device_check.py "$OUT" "$@"
rc=$?
[ $rc -eq 124 ] && echo "device_check: stopped at ${LIMIT} s; the parts finished so far are in $OUT" >&2
exit $rc
