"""The Triton row kernels (quant/triton_rowops.py) on a GPU, in bf16 and fp16: against float64,
at most twice the error of the PyTorch path they replace (the interpreter truncates bf16
stores, so these run only on CUDA; the fp32 checks of every op on the CPU are in
tests/test_rowops.py). Marked ``gpu``: `make test-gpu`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leantune.quant import rowops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
HALVES = [torch.bfloat16, torch.float16]


def _err(got, want64):
    return float((got.double() - want64).norm() / want64.norm().clamp(min=1e-300))


def _both(fn, monkeypatch):
    """fn() with the default choice (Triton on CUDA) and with ``LEANTUNE_BACKEND=reference``."""
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    tri = fn()
    monkeypatch.setenv("LEANTUNE_BACKEND", "reference")
    ref = fn()
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    return tri, ref


def _check(tri, ref, want64, dtype):
    for got, eager, want in zip(tri, ref, want64):
        assert got.dtype == dtype
        assert _err(got, want) <= 2 * _err(eager, want) + 1e-6, (_err(got, want), _err(eager, want))


def test_cuda_tensors_take_the_triton_kernels(monkeypatch):
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert rowops._triton_ops(x) is not None
    assert rowops.xent_rows_takes(torch.bfloat16, x.device)
    monkeypatch.setenv("LEANTUNE_BACKEND", "reference")
    assert rowops._triton_ops(x) is None


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (2, 257, 2048), (1000, 4096), (5, 8192)], ids=str)
def test_rms_norm(dtype, shape, monkeypatch):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen).to("cuda", dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to("cuda", dtype)
    dy = torch.randn(*shape, generator=gen).to("cuda", dtype)

    def run():
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rowops.rms_norm(xx, ww, 1e-5)
        return (y, *torch.autograd.grad(y, (xx, ww), dy))

    tri, ref = _both(run, monkeypatch)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = w64 * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    _check(tri, ref, (y64.detach(), *torch.autograd.grad(y64, (x64, w64), dy.double())), dtype)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", [(7, 3), (2, 2048, 5632), (16385,)], ids=str)
def test_swiglu(dtype, shape, monkeypatch):
    gen = torch.Generator().manual_seed(len(shape))
    a = (4 * torch.randn(*shape, generator=gen)).to("cuda", dtype)
    b = torch.randn(*shape, generator=gen).to("cuda", dtype)
    dh = torch.randn(*shape, generator=gen).to("cuda", dtype)

    def run():
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        h = rowops.SwiGLU.apply(aa, bb)
        return (h, *torch.autograd.grad(h, (aa, bb), dh))

    tri, ref = _both(run, monkeypatch)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    h64 = F.silu(a64) * b64
    _check(tri, ref, (h64.detach(), *torch.autograd.grad(h64, (a64, b64), dh.double())), dtype)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 2), (2, 32, 300, 64), (1, 8, 2048, 128)], ids=str)
def test_rope(dtype, B, H, T, D, monkeypatch):
    gen = torch.Generator().manual_seed(T)
    base = torch.randn(B, T, H, D, generator=gen).to("cuda", dtype)  # seen through a transpose
    ang = torch.rand(1, 1, T, D // 2, generator=gen) * 6
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to("cuda", dtype), ang.sin().to("cuda", dtype)
    gy = torch.randn(B, H, T, D, generator=gen).to("cuda", dtype)

    def run():
        leaf = base.clone().requires_grad_()
        y = rowops.apply_rope(leaf.transpose(1, 2), cos, sin)
        return (y, *torch.autograd.grad(y, leaf, gy))

    tri, ref = _both(run, monkeypatch)
    leaf64 = base.double().requires_grad_()
    y64 = rowops.rope_reference(leaf64.transpose(1, 2), cos.double(), sin.double())
    _check(tri, ref, (y64.detach(), *torch.autograd.grad(y64, leaf64, gy.double())), dtype)


@pytest.mark.parametrize("V", [1003, 49152, 128256], ids=str)
def test_chunked_ce_bf16(V, monkeypatch):
    """bf16 hidden states: the Triton rows kernel on a bf16 logits buffer; loss and gradients
    as close to float64 as the PyTorch path's fp32 logits (within 1.5x)."""
    from leantune.quant.chunked_ce import chunked_cross_entropy

    gen = torch.Generator().manual_seed(V)
    h = torch.randn(300, 64, generator=gen).to("cuda", torch.bfloat16)
    w = (0.3 * torch.randn(V, 64, generator=gen)).to("cuda", torch.bfloat16)
    y = torch.randint(0, V, (300,), generator=gen).cuda()

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = chunked_cross_entropy(hh, ww, y, 128)
        return (loss, *torch.autograd.grad(loss, (hh, ww)))

    tri, ref = _both(run, monkeypatch)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    want = F.cross_entropy(h64 @ w64.T, y, reduction="sum")
    for got, eager, exact in zip(tri, ref, (want.detach(), *torch.autograd.grad(want, (h64, w64)))):
        assert _err(got, exact) <= 1.5 * _err(eager, exact) + 1e-6


def test_model_step_matches_the_reference_path(monkeypatch):
    """A bf16 LoRA model on the GPU: loss and adapter gradients through the Triton row kernels
    within bf16 rounding of the PyTorch path's."""
    from leantune.peft_core.adapters import AdapterConfig, inject_adapter
    from tests.helpers import tiny_model

    def run():
        model = tiny_model("llama", seed=4).cuda().to(torch.bfloat16)
        torch.manual_seed(1)
        inject_adapter(model, AdapterConfig(kind="lora", r=4, alpha=8, targets="all-linear"))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(2)).cuda()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    (l1, g1), (l0, g0) = _both(run, monkeypatch)
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=2e-2)
    for n in g0:
        assert _err(g1[n], g0[n].double()) < 0.05, n
