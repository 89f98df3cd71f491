"""quant.fused_lora: the fused LoRA-on-4-bit Function against its readable twin.

Outputs and every gradient (dX, dA, dB, db, and dX through dropout) are compared on a normal
and on odd shapes, for each 4-bit backend the dispatcher can run here: the reference, the C
kernels, and Triton (under TRITON_INTERPRET=1 on CPU, set by tests/conftest.py).
"""
import os

import pytest
import torch
import torch.nn as nn

from leantune.peft_core.lora import LoraLinear
from leantune.quant import dispatch
from leantune.quant import functional as QF
from leantune.quant.fused_lora import LoRA4bitFunction, lora_4bit, lora_4bit_reference
from leantune.quant.modules import Linear4bit

SHAPES = [(2, 5, 64, 48), (1, 3, 67, 29), (3, 1, 130, 77)]  # (B, T, in, out): normal, odd, odd


def backends():
    out = ["reference"]
    if dispatch._cpu() is not None:
        out.append("cpu")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py without CUDA
    if dispatch._triton() is not None and (torch.cuda.is_available() or interpreted):
        out.append("triton")
    return out


def make(B, T, n_in, n_out, r=4, seed=0, bias=True, quant_type="nf4"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    packed, state = QF.quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=True)
    x = torch.randn(B, T, n_in, generator=g)
    A = torch.randn(r, n_in, generator=g) * 0.2
    Bm = torch.randn(n_out, r, generator=g) * 0.2
    b = torch.randn(n_out, generator=g) if bias else None
    return x, packed, state, b, A, Bm


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout", [False, True])
def test_fused_matches_reference(backend, shape, dropout, monkeypatch):
    monkeypatch.setenv("LEANTUNE_BACKEND", backend)
    x, packed, state, b, A, Bm = make(*shape, quant_type="fp4" if dropout else "nf4")
    s = 1.7
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.3).float() / 0.7
    grad_y = torch.randn(*x.shape[:-1], Bm.shape[0], generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (lora_4bit, lora_4bit_reference):
        xl, bl, Al, Bl = leaves(x, b, A, Bm)
        y = fn(xl, packed, state, bl, Al, Bl, s, xl * mask if dropout else None)
        y.backward(grad_y)
        results.append((y.detach(), xl.grad, Al.grad, Bl.grad, bl.grad))
    for name, got, want in zip(("y", "dX", "dA", "dB", "db"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fused_skips_frozen_inputs_and_saves_no_x_for_frozen_A():
    x, packed, state, b, A, Bm = make(2, 3, 64, 32)
    Bl = Bm.clone().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    y = LoRA4bitFunction.apply(xl, packed, state, None, A, Bl, 2.0, None)  # A frozen (LoRA-FA)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert not any(t.shape == (6, 64) for t in saved), "X kept although A does not train"
    y.sum().backward()
    assert Bl.grad is not None and xl.grad is not None


@pytest.mark.parametrize("backend", backends())
def test_qlora_layer_equals_lora_layer_on_the_dequantized_weight(backend, monkeypatch):
    """A LoraLinear on a 4-bit base (fused path) == one on the dense dequantized weight."""
    monkeypatch.setenv("LEANTUNE_BACKEND", backend)
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    q = Linear4bit.from_linear(dense, quant_type="nf4", blocksize=64)
    deq = nn.Linear(96, 40)
    with torch.no_grad():
        deq.weight.copy_(q.dequantize(torch.float32))
        deq.bias.copy_(dense.bias)
    ql = LoraLinear(96, 40, r=8, alpha=16, base=q)
    dl = LoraLinear(96, 40, r=8, alpha=16, base=deq)
    with torch.no_grad():
        for layer in (ql, dl):
            layer.lora_A["default"].weight.copy_(torch.linspace(-1, 1, 8 * 96).reshape(8, 96))
            layer.lora_B["default"].weight.copy_(torch.linspace(-0.5, 0.5, 40 * 8).reshape(40, 8))
    x = torch.randn(2, 7, 96)
    outs = []
    for layer in (ql, dl):
        xl = x.clone().requires_grad_(True)
        y = layer(xl)
        y.square().sum().backward()
        outs.append((y.detach(), xl.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for got, want in zip(*outs):  # fp32, different summation orders: 1e-5 of the scale
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert ql(x).grad_fn.name() == "LoRA4bitFunctionBackward"


def test_layer_uses_reference_path_for_other_variants():
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 32, bias=False))
    layer = LoraLinear(64, 32, r=4, alpha=8, base=q, kind="dora")
    assert layer(torch.randn(3, 64)).grad_fn.name() != "LoRA4bitFunctionBackward"


@pytest.mark.parametrize("backend", [b for b in backends() if b != "triton"])  # interpreter bf16 is wrong
def test_bf16_error_at_most_twice_eager(backend, monkeypatch):
    monkeypatch.setenv("LEANTUNE_BACKEND", backend)
    x, packed, state, b, A, Bm = make(2, 5, 64, 48)
    grad_y = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))

    def run(fn, dtype):
        xl, bl, Al, Bl = leaves(*(t.to(dtype) for t in (x, b, A, Bm)))
        y = fn(xl, packed, state, bl, Al, Bl, 1.5, None)
        y.backward(grad_y.to(dtype))
        return [t.float() for t in (y.detach(), xl.grad, Al.grad, Bl.grad)]

    exact = run(lora_4bit_reference, torch.float32)
    eager = run(lora_4bit_reference, torch.bfloat16)
    fused = run(lora_4bit, torch.bfloat16)
    for name, e, g, f in zip(("y", "dX", "dA", "dB"), exact, eager, fused):
        err_eager, err_fused = (g - e).abs().max(), (f - e).abs().max()
        assert err_fused <= 2 * err_eager + 1e-6, f"{name}: fused {err_fused:.3g} > 2 x eager {err_eager:.3g}"
