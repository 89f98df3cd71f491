"""The GPU micro-benchmark (bench/bench_quant_gpu.py) rehearsed on the CPU: every section runs
once under Triton's interpreter at toy shapes, so a benchmark that drifted from the kernels'
API fails here and not in the first minutes of a lent GPU. Its error columns are checked: the
fused matmuls against the float32 product of the reference dequantization, the row ops and
LoRA products (output and gradients) against the PyTorch spec they replace (fp16
activations: the interpreter's bf16 dot returns garbage)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def test_every_section_of_the_gpu_benchmark_runs_and_its_kernels_are_right(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEANTUNE_", "TRITON_"))}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "leantune.bench.bench_quant_gpu", "--rehearse", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (path,) = tmp_path.glob("rehearsal-cpu-interpret-*.json")
    rows = json.loads(path.read_text())
    seen = {(r["bench"], r["provider"]) for r in rows}
    fused = ("triton fused 4-bit", "triton fused 4-bit, LUT in registers")
    want = {("copy", "torch"), ("dequantize", "triton")}
    want |= {(b, p) for b in ("matmul", "matmul_bwd", "decode") for p in ("torch dense bf16",) + fused}
    want |= {("matmul", "leantune dispatch"), ("matmul_bwd", "leantune dispatch")}
    want |= {(op, "triton / spec") for op in ("rmsnorm", "swiglu", "rope", "lora_down", "lora_up", "lora_tgrad",
                                              "xent_32_rows")}
    want |= {("crossover", "fused / unfused / dense"), ("crossover_bwd", "fused / unfused / dense")}
    assert want <= seen, sorted(want - seen)
    if rows[0]["bitsandbytes"] is not None:  # the peer's calls are rehearsed too where it imports
        assert {(b, "bitsandbytes") for b in ("dequantize", "matmul", "matmul_bwd", "decode")} <= seen
    errs = {(r["bench"], r["provider"]): r["rel_err"] for r in rows if "rel_err" in r}
    assert len(errs) == 8 + 7  # 3 fused variants x 2 + 2 decode; 7 row ops and LoRA products
    for key, err in errs.items():  # fp16 rounding of the weight and output: ~5e-4 of the max
        assert err < 4e-3, (key, err)
    assert all(r["dtype"] == "float16" and r["device"] == "rehearsal-cpu-interpret" for r in rows)
