#!/usr/bin/env bash
# The GPU suite for a lent device machine: correctness tests on the GPU, the Triton
# micro-benchmarks, and end-to-end QLoRA training steps (leantune vs transformers + PEFT +
# bitsandbytes) on random-weight Llama models of 1B, 3B and 8B shapes at seq 2048.
#
#   bash bench/gpu_suite.sh [STAGE ...]       STAGE: info tests micro profile e2e all (default: all)
#
# profile: one step of each provider at the first of SHAPES under torch.profiler
# (bench/profile_step.py): top kernels, summed GPU time against wall time, kernels a step.
#
# Each stage fits one device command (10 minutes); on a lease run them as separate calls,
# e.g. `bash bench/gpu_suite.sh info tests micro`, then `SHAPES="1b 3b" bash bench/gpu_suite.sh e2e`,
# then `SHAPES=8b bash bench/gpu_suite.sh e2e`.
#
# Environment (all optional):
#   PYTHON    the interpreter with torch + CUDA (default: python3)
#   WHEELS    a folder of wheels to install first, --no-deps (bitsandbytes is not in the
#             device image; without it the peer side is skipped and noted in the results)
#   SHAPES    e2e model shapes (default "1b 3b 8b"), SEQ (2048), BATCH (1), RANK (16),
#             STEPS (3), ROUNDS (1), PROVIDERS (leantune,leantune-graphs,leantune-spec-ops,peer;
#             leantune-spec-ops is leantune with the Triton row ops and LoRA products off),
#             E2E_ARGS (more `python -m leantune.bench.e2e` arguments,
#             e.g. "--sweep seq=512,1024,2048,4096,8192")
#   RESULTS   where results are written (default bench/results)
#   OUT       if set (the device tool sets it), a tarball of the results and logs is left
#             there as $OUT/gpu-suite-<stages>.tgz so it comes back in one file
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
# the source tree imports as `leantune` without an install: a link named leantune to it
SHIM=$(mktemp -d)
ln -s "$ROOT" "$SHIM/leantune"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
RESULTS=${RESULTS:-bench/results}
LOGS=${LOGS:-$RESULTS/gpu-suite-logs}
SHAPES=${SHAPES:-"1b 3b 8b"}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-1}
RANK=${RANK:-16}
STEPS=${STEPS:-3}
ROUNDS=${ROUNDS:-1}
E2E_ARGS=${E2E_ARGS:-}
PROVIDERS=${PROVIDERS:-leantune,leantune-graphs,leantune-spec-ops,peer}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
status=0

say() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

if [ -n "${WHEELS:-}" ]; then
    say "installing wheels from $WHEELS"
    "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl || status=1
fi

"$PY" - <<'EOF' || { echo "gpu_suite: torch sees no GPU; nothing to do"; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
mkdir -p "$RESULTS" "$LOGS"

run_stage() {
    case "$1" in
    info)
        say "device"
        { nvidia-smi || true
          "$PY" -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
          for m in triton transformers peft bitsandbytes; do
              "$PY" -c "import $m; print('$m', $m.__version__)" 2>/dev/null || echo "$m: not installed"
          done; } 2>&1 | tee "$LOGS/info.log"
        ;;
    tests)
        say "pytest -m gpu"
        # fixed launch configs: autotuning every test shape takes minutes and checks speed,
        # not correctness (the micro stage autotunes, and checks each winner's error)
        LEANTUNE_TRITON_AUTOTUNE=${LEANTUNE_TRITON_AUTOTUNE:-0} \
            "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$LOGS/pytest-gpu.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    micro)
        say "micro-benchmarks (bench/bench_quant_gpu.py)"
        "$PY" bench/bench_quant_gpu.py --out "$RESULTS" 2>&1 | tee "$LOGS/micro.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    profile)
        shape=${SHAPES%% *}
        for provider in ${PROVIDERS//,/ }; do
            say "profile: $provider, llama-$shape random, batch $BATCH x seq $SEQ"
            "$PY" -m leantune.bench.profile_step --random-shape "$shape" --seq "$SEQ" --batch "$BATCH" \
                --rank "$RANK" --provider "$provider" --top 30 2>&1 | tee "$LOGS/profile-$provider-$shape.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        done
        ;;
    e2e)
        for shape in $SHAPES; do
            say "end to end: llama-$shape random, batch $BATCH x seq $SEQ, r$RANK"
            # shellcheck disable=SC2086
            "$PY" -m leantune.bench.e2e --random-shape "$shape" --seq "$SEQ" --batch "$BATCH" --rank "$RANK" \
                --steps "$STEPS" --rounds "$ROUNDS" --out "$RESULTS" --tag "$shape" -v \
                --providers "$PROVIDERS" $E2E_ARGS \
                2>&1 | tee "$LOGS/e2e-$shape.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        done
        ;;
    all)
        for s in info tests micro e2e; do run_stage "$s"; done
        ;;
    *)
        echo "gpu_suite: unknown stage '$1' (info tests micro profile e2e all)" >&2
        exit 2
        ;;
    esac
}

for s in "${stages[@]}"; do run_stage "$s"; done

if [ -n "${OUT:-}" ]; then
    name="gpu-suite-$(IFS=-; echo "${stages[*]}").tgz"
    tar czf "$OUT/$name" "$RESULTS" && echo "results: \$OUT/$name"
fi
exit $status
