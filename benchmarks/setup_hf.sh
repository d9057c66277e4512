#!/usr/bin/env bash
# Create (or refresh) the separate baseline venv benchmarks/.venv-hf with
# PyTorch (CPU build), HuggingFace transformers, pychop, ml_dtypes and numpy.
#
# Idempotent: re-running reuses the venv and pip skips satisfied pins.
#
# torch is pinned to 2.13.0 on purpose: on this workplace's machines a CPU
# wheel of that exact version lies on disk and pip picks it up; an unpinned
# `torch` (or a range allowing newer) pulls a multi-GB CUDA build from PyPI.
# torch is installed first, alone, so nothing later can resolve a different
# torch; the later install carries `torch==2.13.0` again as a guard.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HF_VENV:-$HERE/.venv-hf}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

# Versions the baseline numbers were taken with (see benchmarks/README.md).
TORCH_VER="2.13.0"
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==5.24.0}"
PYCHOP_SPEC="${PYCHOP_SPEC:-pychop==0.6.2}"
ML_DTYPES_SPEC="${ML_DTYPES_SPEC:-ml_dtypes==0.6.0}"
NUMPY_SPEC="${NUMPY_SPEC:-numpy==2.4.6}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup_hf] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi

PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VER' else 1)" 2>/dev/null; then
    echo "[setup_hf] installing torch==$TORCH_VER (CPU wheel)"
    "${PIP[@]}" "torch==$TORCH_VER"
fi

echo "[setup_hf] installing $TRANSFORMERS_SPEC $PYCHOP_SPEC $ML_DTYPES_SPEC $NUMPY_SPEC"
"${PIP[@]}" "torch==$TORCH_VER" "$TRANSFORMERS_SPEC" "$PYCHOP_SPEC" "$ML_DTYPES_SPEC" "$NUMPY_SPEC"

"$VENV/bin/python" - <<'EOF'
import torch, transformers, numpy, ml_dtypes, importlib.metadata as md
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration  # noqa: F401
import pychop  # noqa: F401
assert "+cpu" in torch.__version__, f"expected the CPU build of torch, got {torch.__version__}"
print("[setup_hf] ok: torch", torch.__version__, "| transformers", transformers.__version__,
      "| pychop", md.version("pychop"), "| numpy", numpy.__version__,
      "| ml_dtypes", ml_dtypes.__version__)
EOF
