"""The Triton LoRA products (quant/triton_lora.py) on a GPU at Llama shapes, bf16 activations
and fp32 adapters: against float64, and the fused 4-bit Function's output and gradients
against the PyTorch spec's. Marked ``gpu`` (`make test-gpu`); the same kernels run under the
interpreter on small shapes in tests/test_lora_mixed.py."""
from __future__ import annotations

import pytest
import torch

from leantune.quant import lora_mixed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rand(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)


def _close(got, want64, tol=1e-5):
    torch.testing.assert_close(got.double(), want64, rtol=tol, atol=tol * want64.abs().max().item())


def test_cuda_bf16_with_fp32_adapters_takes_triton(monkeypatch):
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    x, w = _rand(4, 8, seed=0, dtype=torch.bfloat16), _rand(2, 8, seed=1)
    assert lora_mixed._triton(x, w) is not None
    monkeypatch.setenv("LEANTUNE_TRITON_FUSED_OPS", "0")
    assert lora_mixed._triton(x, w) is None


@pytest.mark.parametrize("M,n,r", [(2048, 2048, 16), (2048, 14336, 16), (4096, 4096, 64), (37, 576, 8)])
def test_products_match_float64(M, n, r):
    x = _rand(M, n, seed=1, dtype=torch.bfloat16)
    A, B = _rand(r, n, seed=2, scale=0.01), _rand(n, r, seed=3, scale=0.01)
    u = _rand(M, r, seed=4)
    _close(lora_mixed.down(x, A), x.double() @ A.double().t())
    _close(lora_mixed.down(x, B.t()), x.double() @ B.double())  # B^T as a strided view
    _close(lora_mixed.tgrad(u, x, 0.5), 0.5 * u.double().t() @ x.double())
    got = lora_mixed.tgrad(u, x, 0.5, transpose=True)
    assert got.is_contiguous()
    _close(got, 0.5 * x.double().t() @ u.double())
    y = lora_mixed.up(x, u, B.t(), 2.0)
    exact = x.double() + 2.0 * u.double() @ B.double().t()
    assert y.dtype == torch.bfloat16
    terms = x.double().abs() + 2.0 * u.double().abs() @ B.double().t().abs()
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + terms * r * 2**-23).all()


def test_fused_4bit_lora_matches_the_spec(monkeypatch):
    from leantune.quant.fused_lora import lora_4bit
    from leantune.quant.modules import Linear4bit

    torch.manual_seed(0)
    q = Linear4bit.from_linear(torch.nn.Linear(2048, 1536, bias=False), "nf4", 64, True, torch.bfloat16).cuda()
    x0, g = _rand(2, 512, 2048, seed=5, dtype=torch.bfloat16), _rand(2, 512, 1536, seed=6, dtype=torch.bfloat16)
    A0, B0 = _rand(16, 2048, seed=7, scale=0.02), _rand(1536, 16, seed=8, scale=0.02)
    out = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("LEANTUNE_TRITON_FUSED_OPS", fused)
        x, A, B = x0.clone().requires_grad_(), A0.clone().requires_grad_(), B0.clone().requires_grad_()
        y = lora_4bit(x, q.weight, q.quant_state, None, A, B, 2.0)
        y.backward(g)
        out[fused] = (y.detach(), x.grad, A.grad, B.grad)
    for a, b in zip(out["1"], out["0"]):
        assert a.dtype == b.dtype
        tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
