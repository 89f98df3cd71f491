"""quant/dispatch.py: the one backend rule, for the 4-bit ops and for the other ops."""
from __future__ import annotations

import pytest
import torch

from leantune.base import UsageError
from leantune.quant import dispatch, rowops


@pytest.mark.parametrize("forced,cpu,triton,want", [
    (None, True, False, "cpu"), (None, False, False, "reference"), (None, False, True, "reference"),
    ("reference", True, True, "reference"), ("cpu", True, False, "cpu"),
    ("cpu", False, False, "reference"), ("triton", True, False, "reference"), ("triton", False, True, "triton"),
])
def test_op_backend_rule_on_cpu_tensors(monkeypatch, forced, cpu, triton, want):
    if forced is None:
        monkeypatch.delenv(dispatch.ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV, forced)
    assert dispatch.op_backend(torch.zeros(1), cpu=cpu, triton=triton) == want


def test_unknown_forced_backend_is_a_usage_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "gpu")
    with pytest.raises(UsageError, match="LEANTUNE_BACKEND"):
        dispatch.op_backend(torch.zeros(1), cpu=True)


@pytest.mark.skipif(rowops._LOADER.get() is None, reason="the C row kernels do not build here")
def test_row_ops_follow_the_rule(monkeypatch):
    x, w = torch.randn(4, 8), torch.ones(8)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert rowops._c_kernel("rmsnorm_fwd", x, w) is not None
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert rowops._c_kernel("rmsnorm_fwd", x, w) is None
    monkeypatch.setenv(dispatch.ENV, "triton")  # Triton row kernels (quant/triton_rowops.py), not C
    assert rowops._c_kernel("rmsnorm_fwd", x, w) is None
    monkeypatch.setenv(dispatch.ENV, "cpu")
    assert rowops._c_kernel("rmsnorm_fwd", x.double(), w.double()) is None  # fp64: no kernel


def test_triton_fused_ops_switch(monkeypatch):
    """The Triton row / LoRA modules: only for CUDA tensors or under the interpreter, never
    when the rule picks another backend, and off with LEANTUNE_TRITON_FUSED_OPS=0."""
    import os

    x = torch.zeros(2)
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.delenv(dispatch.FUSED_OPS_ENV, raising=False)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if dispatch.triton_module("triton_rowops") is not None and interp:
        assert dispatch.triton_kernels("triton_rowops", x, cpu=True) is dispatch.triton_module("triton_rowops")
    monkeypatch.setenv(dispatch.FUSED_OPS_ENV, "0")
    assert dispatch.triton_kernels("triton_rowops", x, cpu=True) is None
    monkeypatch.delenv(dispatch.FUSED_OPS_ENV)
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.triton_kernels("triton_lora", x, cpu=True) is None
    monkeypatch.delenv(dispatch.ENV)
    assert dispatch.triton_kernels("triton_lora", x, cpu=True) is None  # a CPU tensor: C or the spec
    with pytest.raises(ValueError):
        dispatch.triton_module("nope")
