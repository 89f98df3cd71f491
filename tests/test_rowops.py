"""The fused row ops (quant/rowops.py, csrc/rowops.c, quant/triton_rowops.py) against float64
references, and the block's recompute of saved activations (peft_core/model.py
``recompute_saved``) against the plain backward: the same gradients bit for bit, and less
kept for the backward.

Each op runs on three paths: "c" (the C kernels), "reference" (PyTorch ops, what a GPU ran
before the Triton kernels) and "triton" (``LEANTUNE_BACKEND=triton`` on CPU tensors, under
Triton's interpreter, which tests/conftest.py turns on without CUDA; fp32 here, the bf16
checks on a GPU are in tests/test_triton_rowops.py)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from leantune.quant import dispatch, rowops
from leantune.peft_core.adapters import AdapterConfig, inject_adapter
from leantune.quant.modules import replace_linears
from tests.helpers import tiny_model

needs_c = pytest.mark.skipif(rowops._LOADER.get() is None, reason="the C row kernels do not build here")
needs_interpreter = pytest.mark.skipif(
    dispatch.triton_module("triton_rowops") is None or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="Triton is not installed, or does not run with its interpreter (TRITON_INTERPRET=1)")
PATHS = [pytest.param("c", marks=needs_c), "reference", pytest.param("triton", marks=needs_interpreter)]


TRITON_LAUNCHERS = ("rmsnorm_fwd", "rmsnorm_bwd", "swiglu_fwd", "swiglu_bwd", "rope", "xent_rows_")


def spy_triton(monkeypatch) -> list:
    """Record the name of every ``quant.triton_rowops`` launcher called from now on."""
    from leantune.quant import triton_rowops

    calls = []
    for name in TRITON_LAUNCHERS:
        real = getattr(triton_rowops, name)
        monkeypatch.setattr(triton_rowops, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    return calls


@pytest.fixture
def path(request, monkeypatch):
    if request.param in ("reference", "triton"):
        monkeypatch.setenv("LEANTUNE_BACKEND", request.param)
    else:
        monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    calls = spy_triton(monkeypatch) if request.param == "triton" else None
    yield request.param
    if calls is not None:  # the Triton path really ran its kernels
        assert calls, "no Triton row kernel ran on the triton path"


def _rms64(x, w, eps):
    x = x.double()
    return w.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 64), (4, 33, 576), (1000, 17)], ids=str)
def test_rms_norm_matches_float64(path, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).requires_grad_()
    dy = torch.randn(shape, generator=gen)
    eps = 1e-5
    y = rowops.rms_norm(x, w, eps)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = _rms64(x64, w64, eps)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=2e-5, atol=2e-4)


def test_rms_norm_reference_path_is_the_old_expression(monkeypatch):
    """The PyTorch path (GPU, half precisions) computes exactly the spec's expression."""
    monkeypatch.setenv("LEANTUNE_BACKEND", "reference")
    x = torch.randn(3, 9, 40, dtype=torch.bfloat16)
    w = torch.randn(40, dtype=torch.bfloat16)
    assert torch.equal(rowops.rms_norm(x, w, 1e-6), rowops.rms_norm_reference(x, w, 1e-6))
    x = torch.randn(5, 40)
    assert torch.equal(rowops.rms_norm(x, w.float(), 1e-6), rowops.rms_norm_reference(x, w.float(), 1e-6))


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (4, 256, 112), (16385,)], ids=str)
def test_swiglu_matches_float64(path, shape):
    gen = torch.Generator().manual_seed(len(shape))
    g = (torch.randn(shape, generator=gen) * 4).requires_grad_()
    u = torch.randn(shape, generator=gen).requires_grad_()
    dh = torch.randn(shape, generator=gen)
    h = rowops.SwiGLU.apply(g, u)
    dg, du = torch.autograd.grad(h, (g, u), dh)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    h64 = F.silu(g64) * u64
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    torch.testing.assert_close(h.double(), h64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(dg.double(), dg64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(du.double(), du64, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_swiglu_extremes(path):
    """Large, tiny and non-finite gates: finite where silu is, NaN stays NaN."""
    g = torch.tensor([-1e4, -100.0, -88.0, -20.0, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4, float("nan")],
                     requires_grad=True)
    u = torch.full_like(g, 2.0, requires_grad=True)
    h = rowops.SwiGLU.apply(g, u)
    dg, du = torch.autograd.grad(h, (g, u), torch.ones_like(h))
    ref = F.silu(g.detach().double()) * 2
    torch.testing.assert_close(h[:-1].double(), ref[:-1], rtol=1e-6, atol=1e-30)
    assert torch.isnan(h[-1]) and torch.isnan(dg[-1]) and torch.isnan(du[-1])
    assert torch.isfinite(dg[:-1]).all() and torch.isfinite(du[:-1]).all()


def test_swiglu_float64_gradcheck():
    g = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rowops.SwiGLU.apply, (g, u))
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    # the norm computes in fp32 by design (see the spec): gradcheck at fp32 tolerances
    assert torch.autograd.gradcheck(lambda a, b: rowops.rms_norm(a, b, 1e-5).double(), (x, w),
                                    eps=1e-3, atol=1e-3, rtol=1e-3)


def _rope_tables(B, T, D, gen):
    freqs = torch.rand(B, T, D // 2, generator=gen) * 6
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]  # (B, 1, T, D)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("B,H,T,D,table_batch,transposed", [
    (1, 1, 1, 2, 1, False), (2, 3, 5, 8, 2, True), (2, 4, 7, 24, 1, True), (4, 9, 33, 64, 4, True),
    (3, 2, 6, 16, 3, False)])
def test_rope_matches_reference(path, B, H, T, D, table_batch, transposed):
    """Values bit-identical to the spec's fp32 expression; gradients equal the float64 ones;
    x may be the (B, T, H, D) projection seen through a transpose, as in the model."""
    gen = torch.Generator().manual_seed(B * 100 + T)
    cos, sin = _rope_tables(table_batch, T, D, gen)
    base = torch.randn(B, T, H, D, generator=gen) if transposed else torch.randn(B, H, T, D, generator=gen)
    leaf = base.clone().requires_grad_()
    x = leaf.transpose(1, 2) if transposed else leaf
    y = rowops.apply_rope(x, cos, sin)
    assert (type(y.grad_fn).__name__ == "RoPEFunctionBackward") == (path in ("c", "triton"))
    assert torch.equal(y.detach(), rowops.rope_reference(x.detach(), cos, sin))
    g = torch.randn(y.shape, generator=gen)
    (dx,) = torch.autograd.grad(y, leaf, g)
    leaf64 = base.double().requires_grad_()
    x64 = leaf64.transpose(1, 2) if transposed else leaf64
    (dx64,) = torch.autograd.grad(rowops.rope_reference(x64, cos.double(), sin.double()), leaf64, g.double())
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-6, atol=1e-6)


# -- recompute of saved activations ------------------------------------------------------------------
def _lora_model(variant: str, seed: int, quant: bool = False):
    """A tiny model (4-bit linears with ``quant``) with LoRA r4 on every linear, B nonzero."""
    model = tiny_model(variant, seed=seed)
    if quant:
        replace_linears(model)
    torch.manual_seed(1)
    inject_adapter(model, AdapterConfig(kind="lora", r=4, alpha=8, targets="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for the backward of fn()."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("variant", ["llama", "llama-bias"])
def test_block_recompute_gives_identical_gradients_and_saves_less(quant, variant):
    """Decoder.save_less recomputes norm and SwiGLU outputs in the backward: every LoRA
    gradient is bit-identical to keeping them, and the activations kept are smaller."""
    results = {}
    for save_less in (False, True):
        model = _lora_model(variant, seed=3, quant=quant)
        model.model.save_less = save_less
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        hidden, saved = _saved_bytes(lambda: model.model(ids))
        (hidden.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[save_less] = (hidden.detach(), grads, saved)
    (h0, g0, s0), (h1, g1, s1) = results[False], results[True]
    assert torch.equal(h0, h1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    assert s1 < s0


def test_recompute_saved_is_off_under_gradient_checkpointing():
    """With checkpointing the block is recomputed whole; the gradients stay those of the
    plain backward."""
    grads = []
    for ckpt in (False, True):
        model = _lora_model("llama", seed=5)
        model.train()
        model.model.grad_checkpoint = ckpt
        ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
        model.model(ids).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-7)


# -- cross-entropy rows ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["normal", "large-logits"])
def test_chunked_ce_paths_match_float64(path, scale):
    """The chunked loss through the C row kernel and through PyTorch ops: loss and gradients
    equal the float64 cross-entropy, also for logits in the hundreds (no overflow)."""
    from leantune.quant.chunked_ce import chunked_cross_entropy

    gen = torch.Generator().manual_seed(11)
    h = (torch.randn(70, 24, generator=gen) * scale ** 0.5).requires_grad_()
    w = (torch.randn(1003, 24, generator=gen) * scale ** 0.5).requires_grad_()
    y = torch.randint(0, 1003, (70,), generator=gen)
    got = chunked_cross_entropy(h, w, y, 32)
    gh, gw = torch.autograd.grad(got, (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = F.cross_entropy(h64 @ w64.T, y, reduction="sum")
    wh, ww = torch.autograd.grad(want, (h64, w64))
    tol = 1e-5 * scale
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want)))
    torch.testing.assert_close(gh.double(), wh, rtol=tol, atol=tol)
    torch.testing.assert_close(gw.double(), ww, rtol=tol, atol=tol)


@needs_interpreter
@pytest.mark.parametrize("V", [1, 7, 5000], ids=str)
def test_triton_xent_rows_match_float64(V, monkeypatch):
    """The Triton rows kernel: lse, z[t] and softmax - onehot, with a vocabulary of one, and
    one longer than a loop block (the online logsumexp over several blocks); a target out of
    range gives that row a NaN loss and reads nothing outside the row."""
    from leantune.quant import triton_rowops

    monkeypatch.setenv("LEANTUNE_BACKEND", "triton")
    assert V < triton_rowops.XENT_BLOCK or V > 2 * triton_rowops.XENT_BLOCK // 2
    gen = torch.Generator().manual_seed(V)
    z = torch.randn(6, V, generator=gen) * 20
    t = torch.randint(0, V, (6,), generator=gen)
    t[-1] = V  # out of range
    got = z.clone()
    lse, zt = rowops.xent_rows_(got, t)
    z64 = z.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z64, -1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(zt[:-1].double(), z64[torch.arange(5), t[:-1]])
    assert torch.isnan(zt[-1])
    want = torch.softmax(z64, -1)
    want[torch.arange(5), t[:-1]] -= 1
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_triton_path_runs_a_model_as_the_reference_does(monkeypatch):
    """A LoRA model's loss and every adapter gradient through the Triton row kernels equal
    the PyTorch path's to fp32 rounding (the recompute of saved activations included)."""
    from leantune.quant.chunked_ce import chunked_cross_entropy

    results = {}
    calls = spy_triton(monkeypatch)
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LEANTUNE_BACKEND", backend)
        model = _lora_model("llama", seed=4)
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
        hidden = model.model(ids)
        loss = chunked_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                     ids[:, 1:].reshape(-1), 7)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(calls) == set(TRITON_LAUNCHERS)  # every kernel ran
    (l0, g0), (l1, g1) = results["reference"], results["triton"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


@needs_c
def test_xent_rows_rejects_out_of_range_targets():
    z = torch.randn(4, 10)
    with pytest.raises(IndexError):
        rowops.xent_rows_(z, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(IndexError):
        rowops.xent_rows_(z, torch.tensor([0, -1, 3, 2]))
    lse, zt = rowops.xent_rows_(z.clone(), torch.tensor([0, 1, 9, 2]))
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))


# -- bf16: the C twins against float64, at most twice the error of the PyTorch bf16 path ----
def _err(got, want64):
    return float((got.double() - want64).norm() / want64.norm().clamp(min=1e-300))


def _both_paths(fn, monkeypatch):
    """fn() on the C path and on the reference path, each returning a tuple of tensors."""
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    c = fn()
    monkeypatch.setenv("LEANTUNE_BACKEND", "reference")
    ref = fn()
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    return c, ref


def _check_bf16(c, ref, want64):
    for got, eager, want in zip(c, ref, want64):
        assert got.dtype == torch.bfloat16
        assert _err(got, want) <= 2 * _err(eager, want) + 1e-6


@needs_c
@pytest.mark.parametrize("shape", [(3, 7), (4, 33, 576), (1000, 17)], ids=str)
def test_rms_norm_bf16_kernel(shape, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).bfloat16()
    dy = torch.randn(*shape, generator=g).bfloat16()

    def run():
        xx = x.clone().requires_grad_()
        y = rowops.rms_norm(xx, w, 1e-5)
        (dx,) = torch.autograd.grad(y, xx, dy)
        return y, dx

    c, ref = _both_paths(run, monkeypatch)
    assert rowops._c_kernel("rmsnorm_fwd", x, w).__name__ == "lt_rmsnorm_fwd_bf16"
    x64 = x.double().requires_grad_()
    y64 = _rms64(x64, w, 1e-5)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    _check_bf16(c, ref, (y64.detach(), dx64))


@needs_c
@pytest.mark.parametrize("shape", [(7, 3), (4, 256, 112), (16385,)], ids=str)
def test_swiglu_bf16_kernel(shape, monkeypatch):
    gen = torch.Generator().manual_seed(len(shape))
    a, b = (4 * torch.randn(*shape, generator=gen)).bfloat16(), torch.randn(*shape, generator=gen).bfloat16()
    dh = torch.randn(*shape, generator=gen).bfloat16()

    def run():
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        h = rowops.SwiGLU.apply(aa, bb)
        da, db = torch.autograd.grad(h, (aa, bb), dh)
        return h, da, db

    c, ref = _both_paths(run, monkeypatch)
    assert rowops._c_kernel("swiglu_bwd", a, b, dh).__name__ == "lt_swiglu_bwd_bf16"
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    h64 = F.silu(a64) * b64
    da64, db64 = torch.autograd.grad(h64, (a64, b64), dh.double())
    _check_bf16(c, ref, (h64.detach(), da64, db64))


@needs_c
def test_rope_bf16_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 9, 16
    x = torch.randn(B, H, T, D, generator=gen).bfloat16()
    ang = torch.rand(1, 1, T, D // 2, generator=gen) * 6
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    gy = torch.randn(B, H, T, D, generator=gen).bfloat16()

    def run():
        xx = x.clone().requires_grad_()
        y = rowops.apply_rope(xx, cos, sin)
        (dx,) = torch.autograd.grad(y, xx, gy)
        return y, dx

    c, ref = _both_paths(run, monkeypatch)
    x64 = x.double().requires_grad_()
    y64 = rowops.rope_reference(x64, cos.double(), sin.double())
    (dx64,) = torch.autograd.grad(y64, x64, gy.double())
    _check_bf16(c, ref, (y64.detach(), dx64))
    # the C path really ran: its Function is in the graph
    assert type(rowops.apply_rope(x.clone().requires_grad_(), cos, sin).grad_fn).__name__.startswith("RoPEFunction")


@needs_c
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["normal", "large-logits"])
def test_xent_rows_bf16_is_the_fp32_kernel_rounded_once(scale):
    """bf16 logits in place: lse and z[t] as the fp32 kernel computes them on the same (exact)
    values, the gradient rows equal to its result rounded once to bf16."""
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(37, 1003, generator=gen) * scale).bfloat16()
    t = torch.randint(0, 1003, (37,), generator=gen)
    z32 = z.float()
    lse32, zt32 = rowops.xent_rows_(z32, t)
    zb = z.clone()
    lse, zt = rowops.xent_rows_(zb, t)
    assert zb.dtype == torch.bfloat16
    torch.testing.assert_close(lse, lse32, rtol=0, atol=0)
    torch.testing.assert_close(zt, zt32, rtol=0, atol=0)
    torch.testing.assert_close(zb, z32.bfloat16(), rtol=0, atol=0)


@needs_c
def test_chunked_ce_bf16_keeps_no_fp32_logits_and_matches_float64(monkeypatch):
    """bf16 hidden states: the C rows kernel works on the bf16 logits buffer; loss and
    gradients agree with float64 as the PyTorch path's (fp32 logits) do."""
    from leantune.quant import chunked_ce, hostpool

    gen = torch.Generator().manual_seed(12)
    h = torch.randn(70, 24, generator=gen).bfloat16()
    w = torch.randn(1003, 24, generator=gen).bfloat16()
    y = torch.randint(0, 1003, (70,), generator=gen)
    dtypes = []
    real = hostpool.empty
    monkeypatch.setattr(chunked_ce.hostpool, "empty", lambda shape, dtype=torch.float32: dtypes.append(dtype) or real(shape, dtype))

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = chunked_ce.chunked_cross_entropy(hh, ww, y, 32)
        return (loss, *torch.autograd.grad(loss, (hh, ww)))

    c, ref = _both_paths(run, monkeypatch)
    assert dtypes[0] == torch.bfloat16  # the logits buffer of the C path
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    want = F.cross_entropy(h64 @ w64.T, y, reduction="sum")
    wh, ww = torch.autograd.grad(want, (h64, w64))
    for got, eager, exact in zip(c, ref, (want.detach(), wh, ww)):
        assert _err(got, exact) <= 1.5 * _err(eager, exact) + 1e-6
