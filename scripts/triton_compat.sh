#!/usr/bin/env bash
# The Triton kernels against another Triton release, on the CPU: the release a lent GPU's
# image carries (3.6.0 in the 2026-11 H100 image) is not the one the venv has (3.9.0).
#
#   bash scripts/triton_compat.sh [VERSION]      (default 3.6.0; needs PyPI the first time)
#
# Installs that triton into .cache/triton-VERSION (--target, the venv is untouched), then
#   1. scripts/triton_aot_check.py: every kernel config compiled for sm_80 and sm_90;
#   2. the interpreter tests of the Triton kernels (TRITON_INTERPRET=1 on the CPU).
# Triton 3.6's interpreter converts size-1 arrays to Python ints, which NumPy 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars", in every `range(0, K, ...)`),
# so releases before 3.7 get NumPy 2.2 beside them. The GPU itself never interprets.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:-3.6.0}
PY=${PYTHON:-.venv/bin/python}
DIR=.cache/triton-$V
if [ ! -d "$DIR/triton" ]; then
    "$PY" -m pip install -q --no-deps --target "$DIR" "triton==$V"
fi
EXTRA=
case "$V" in
3.[0-6].*)
    EXTRA=.cache/numpy-2.2
    [ -d "$EXTRA/numpy" ] || "$PY" -m pip install -q --no-deps --target "$EXTRA" "numpy==2.2.6"
    EXTRA=":$PWD/$EXTRA"
    ;;
esac
export PYTHONPATH="$PWD/$DIR$EXTRA${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import triton; assert triton.__version__ == '$V', triton.__version__; print('triton', triton.__version__)"
"$PY" scripts/triton_aot_check.py ${AOT_ARGS:-}
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_triton_lora.py \
    tests/test_triton_rowops.py tests/test_triton_adamw8bit.py tests/test_rowops.py tests/test_lora_mixed.py \
    tests/test_fused_lora.py tests/test_launch_census.py tests/test_bench_gpu_rehearsal.py
