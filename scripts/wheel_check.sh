#!/usr/bin/env bash
# The wheel smoke check (run by .ci/run): build leantune's wheel, install it (non-editable)
# into a scratch venv, and from a folder that holds its own train.py and eval.py run
#   - `leantune --help` and every subcommand's --help,
#   - import checks: the C kernels build from the shipped csrc and the data files are there,
#   - a 2-step QLoRA train on a tiny model (the C kernels compile from the installed sources).
# The scratch venv gets torch pinned first (a CPU build where one is on disk), then the wheel
# with its dependencies; the check fails if that install pulls triton on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" . 2>&1 | grep -v "^WARNING: Location" || true
WHEEL=$(ls "$WORK"/dist/leantune-*.whl)
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
$VPY -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
$VPY -m pip install -q "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
if $VPY -c "import triton" 2>/dev/null; then
  echo "wheel_check: the CPU install pulled triton (it belongs to the 'gpu' extra)" >&2
  exit 1
fi

# the user's folder: their own train.py and eval.py must not shadow leantune
USER_DIR="$WORK/user"
mkdir -p "$USER_DIR"
printf 'raise SystemExit("the user train.py ran")\n' > "$USER_DIR/train.py"
printf 'raise SystemExit("the user eval.py ran")\n' > "$USER_DIR/eval.py"
# a tiny random model and data, written with the checkout's own helpers
.venv/bin/python - "$USER_DIR" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.helpers import tiny_model_dir
out = Path(sys.argv[1])
tiny_model_dir(out / "model")
rows = [{"prompt": f"q{i} ", "completion": f"a{i % 3}"} for i in range(16)]
(out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "job.toml").write_text(
    '[model]\npath = "model"\nquant = "nf4"\n[adapter]\nr = 4\nalpha = 8\n'
    '[data]\ntrain = "data.jsonl"\neval = ""\nmax_len = 32\n'
    '[train]\nout = "run"\nmax_steps = 2\nbatch_size = 2\nsave_every = 0\n')
EOF

cd "$USER_DIR"
LT="$WORK/venv/bin/leantune"
export LEANTUNE_CACHE="$WORK/cache"
"$LT" --help > /dev/null
for sub in import-gguf quantize train eval generate merge data demo bench; do
  "$LT" "$sub" --help > /dev/null
done
$VPY - <<'EOF'
import pathlib, leantune
from leantune.quant import cpu_kernels, rowops
from leantune.eval.runner import GENERAL_TEXT
from leantune.train.loop import train  # noqa: F401  (not the user's train.py)
root = pathlib.Path(leantune.__file__).parent
assert "site-packages" in str(root), root
for c in ("quant4bit.c", "rowops.c", "hostpool.c"):
    assert (root / "csrc" / c).is_file(), c
assert GENERAL_TEXT.is_file(), GENERAL_TEXT
assert cpu_kernels.available(), "the C kernels did not build from the installed sources"
print("wheel_check: imports, C kernels and data files OK from", root)
EOF
"$LT" train job.toml
test -f run/adapter/adapter_model.safetensors
$VPY -m leantune --help > /dev/null
echo "wheel_check: OK ($(basename "$WHEEL"))"
