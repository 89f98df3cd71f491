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
