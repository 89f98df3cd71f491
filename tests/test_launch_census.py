"""The launch census (bench/launch_census.py): the kernels a QLoRA step runs per decoder layer
on the CUDA path, counted on the CPU with Triton's interpreter.

The counts follow from the model: 7 LoRA linears a layer, each one fused Function with
3 kernels forward (LoRA down, 4-bit matmul, LoRA up) and 5 backward (G B, the transposed
4-bit matmul, the LoRA up into dX, dA, dB); 2 RMSNorms (each run again in the backward by
``recompute_saved``), RoPE on q and k both ways, SwiGLU (run again for down_proj's saved
input). A count that moves means a kernel fell back to PyTorch ops, or launches were added.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
LINEARS = 7  # q, k, v, o, gate, up, down


def _census(tmp_path, *args) -> dict:
    out = tmp_path / "census.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEANTUNE_", "TRITON_"))}
    proc = subprocess.run([sys.executable, "-m", "leantune.bench.launch_census", "--layers", "1", "2",
                           "--json", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a decoder layer:" in proc.stdout
    return json.loads(out.read_text())


def test_a_layer_runs_the_kernels_the_model_implies(tmp_path):
    res = _census(tmp_path)
    layer, fixed = res["per_layer"], res["fixed"]
    assert layer["triton"] == {
        "_down_kernel": 2 * LINEARS,  # X A^T forward, G B backward
        "_up_kernel": 2 * LINEARS,  # Y += s XA B^T forward, dX += s GB A backward
        "_matmul_4bit_kernel": 2 * LINEARS,  # X W^T forward, G W backward
        "_tgrad_kernel": 2 * LINEARS,  # dA, dB
        "_rmsnorm_fwd_kernel": 4, "_rmsnorm_bwd_kernel": 2,  # 2 norms, each recomputed once
        "_rope_kernel": 4, "_swiglu_fwd_kernel": 2, "_swiglu_bwd_kernel": 1}
    # what is left: the residual adds and the summed input gradients of q/k/v and gate/up,
    # the attention op and its backward, the expanded k/v copies; nothing a layer syncs on
    assert sum(layer["ops"].values()) <= 12, layer["ops"]
    assert not layer["syncs"]
    # the step's loss is planned on the host (train.loop.prepare_batch): no sync either
    assert not fixed["syncs"], fixed["syncs"]
    assert fixed["triton"]["_xent_rows_kernel"] == 1
    # the first layer's input needs no gradient: its q/k/v skip the dX kernels
    assert fixed["triton"]["_matmul_4bit_kernel"] == fixed["triton"]["_up_kernel"] == -3
