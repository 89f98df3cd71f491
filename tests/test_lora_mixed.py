"""quant/lora_mixed.py: the LoRA products of bf16 activations with fp32 weights (C kernels and
the PyTorch spec) against float64, and the fused 4-bit Function on a bf16 base with them."""
import pytest
import torch

from leantune.quant import dispatch, lora_mixed
from leantune.quant.fused_lora import lora_4bit
from leantune.quant.modules import Linear4bit

needs_c = pytest.mark.skipif(lora_mixed._LOADER.get() is None, reason="no C compiler")


def bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def f32(*shape, seed, scale=0.1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


SHAPES = [(1, 8, 1), (7, 33, 3), (64, 576, 16), (5, 1100, 8), (130, 1536, 64)]  # M, n, r (past the chunks)


def _triton_ready():
    import os

    if dispatch.triton_module("triton_lora") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


needs_triton = pytest.mark.skipif(not _triton_ready(), reason="no Triton, or no CUDA and no interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# "c": csrc/lora_mixed.c, bf16 on the CPU; "triton": quant/triton_lora.py, forced on CPU tensors
# under the interpreter (on CUDA natively). bf16 stores truncate under the interpreter, so up's
# rounding is checked in fp16 there, in bf16 on a GPU
CASES = [pytest.param("c", torch.bfloat16, marks=needs_c, id="c-bf16"),
         pytest.param("triton", torch.bfloat16, marks=needs_triton, id="triton-bf16"),
         pytest.param("triton", torch.float16, marks=needs_triton, id="triton-fp16")]


@pytest.fixture
def spy(monkeypatch):
    """Force Triton (also on CPU tensors under the interpreter) and record its launchers' calls."""
    from leantune.quant import triton_lora

    monkeypatch.setenv("LEANTUNE_BACKEND", "triton")
    calls = []
    for name in ("down", "up", "tgrad"):
        real = getattr(triton_lora, name)
        monkeypatch.setattr(triton_lora, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    return calls


def _on_path(path, request):
    """(device, the Triton calls list or None) for the path; the C path asserts it applies."""
    if path == "triton":
        return DEV, request.getfixturevalue("spy")
    return "cpu", None


@pytest.mark.parametrize("path,dtype", CASES)
@pytest.mark.parametrize("M,n,r", SHAPES)
def test_down_and_tgrad_match_float64(M, n, r, path, dtype, request):
    dev, calls = _on_path(path, request)
    x = bf16(M, n, seed=1).to(dev, dtype)
    W, u = f32(r, n, seed=2).to(dev), f32(M, r, seed=3).to(dev)
    Wt = f32(n, r, seed=2).to(dev).t()  # B^T as the Function passes it: a strided view
    assert lora_mixed.applies(x, W) == (path == "c")
    for w in (W, Wt):
        want = x.double() @ w.double().t()
        got = lora_mixed.down(x, w)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    want = 0.5 * u.double().t() @ x.double()
    got = lora_mixed.tgrad(u, x, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    got_t = lora_mixed.tgrad(u, x, 0.5, transpose=True)  # dB's layout
    assert got_t.is_contiguous() and got_t.shape == (n, r)
    torch.testing.assert_close(got_t.double(), want.t(), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert calls is None or calls == ["down", "down", "tgrad", "tgrad"]


UP_CASES = [c for c in CASES if c.id != "triton-bf16" or torch.cuda.is_available()]


@pytest.mark.parametrize("path,dtype", UP_CASES)
@pytest.mark.parametrize("M,n,r", SHAPES)
def test_up_rounds_once(M, n, r, path, dtype, request):
    dev, calls = _on_path(path, request)
    y = bf16(M, n, seed=4).to(dev, dtype)
    u, V = f32(M, r, seed=5).to(dev), f32(n, r, seed=6).to(dev).t()  # V strided, as lora_B.t()
    exact = (y.double() + 2.0 * u.double() @ V.double())
    got = lora_mixed.up(y, u, V, 2.0)
    assert got.dtype == dtype and got.shape == y.shape
    assert calls is None or calls == ["up"]
    # one rounding of a value within fp32 error of the exact sum: at most one ulp off, plus
    # the fp32 sum's own error where y and the update cancel (r terms, 2^-24 each)
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11
    terms = y.double().abs() + 2.0 * u.double().abs() @ V.double().abs()
    assert ((got.double() - exact).abs() <= exact.abs() * ulp + terms * r * 2**-23 + 2**-24).all()
    spec = y.float().addmm_(u, V, alpha=2.0).to(dtype)
    assert (got != spec).float().mean() < 0.01  # ties of the two roundings only


@needs_c
def test_spec_path_is_the_same_math(monkeypatch):
    x, W, u, V = bf16(9, 70, seed=7), f32(4, 70, seed=8), f32(9, 4, seed=9), f32(4, 70, seed=10)
    fast = (lora_mixed.down(x, W), lora_mixed.tgrad(u, x, 0.3), lora_mixed.up(x, u, V, 0.3))
    monkeypatch.setenv("LEANTUNE_BACKEND", "reference")
    assert not lora_mixed.applies(x, W)
    ref = (lora_mixed.down(x, W), lora_mixed.tgrad(u, x, 0.3), lora_mixed.up(x, u, V, 0.3))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-2 if a.dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_4bit_lora_on_a_bf16_base_keeps_fp32_adapter_math(backend, monkeypatch):
    """Output and every gradient of the fused Function with bf16 x and fp32 A, B equal the
    float64 math on the same (dequantized) weights, within bf16 rounding of the outputs."""
    if backend == "reference":
        monkeypatch.setenv("LEANTUNE_BACKEND", "reference")
    torch.manual_seed(0)
    q = Linear4bit.from_linear(torch.nn.Linear(96, 80, bias=False), "nf4", 32, True, torch.bfloat16)
    x = bf16(3, 5, 96, seed=11).requires_grad_()
    A = f32(8, 96, seed=12).requires_grad_()
    B = f32(80, 8, seed=13).requires_grad_()
    g = bf16(3, 5, 80, seed=14)
    y = lora_4bit(x, q.weight, q.quant_state, None, A, B, 2.0)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    w = q.dequantize(torch.float32).double()
    x64 = x.detach().double().requires_grad_()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    y64 = x64 @ w.t() + 2.0 * (x64 @ A64.t()) @ B64.t()
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)
    # the adapter's gradients come from fp32 products of the bf16 tensors: fp32-close
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-4, atol=1e-4 * A64.grad.abs().max().item())
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=1e-4, atol=1e-4 * B64.grad.abs().max().item())


# -- the Triton kernels in the fused Function, and tgrad's split over rows --------------------------
@needs_triton
def test_triton_fused_4bit_lora_matches_the_reference(spy, monkeypatch):
    """The fused Function with the Triton products (fp16 base, fp32 adapter): output and
    every gradient as on the reference path."""
    torch.manual_seed(0)
    q = Linear4bit.from_linear(torch.nn.Linear(96, 80, bias=False), "nf4", 32, True, torch.float16).to(DEV)
    A0, B0, g = f32(8, 96, seed=12).to(DEV), f32(80, 8, seed=13).to(DEV), bf16(3, 5, 80, seed=14).to(DEV).half()
    x0 = bf16(3, 5, 96, seed=11).to(DEV).half()
    out = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LEANTUNE_BACKEND", backend)
        x, A, B = x0.clone().requires_grad_(), A0.clone().requires_grad_(), B0.clone().requires_grad_()
        y = lora_4bit(x, q.weight, q.quant_state, None, A, B, 2.0)
        y.backward(g)
        out[backend] = (y.detach(), x.grad, A.grad, B.grad)
    assert sorted(set(spy)) == ["down", "tgrad", "up"]
    for a, b in zip(out["triton"], out["reference"]):
        assert a.dtype == b.dtype
        tol = 2e-3 if a.dtype == torch.float16 else 1e-5
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


@needs_triton
@pytest.mark.parametrize("splits", [2, 3, 50])
@pytest.mark.parametrize("transpose", [False, True])
def test_triton_tgrad_split_over_rows(splits, transpose):
    """tgrad's rows split into parts summed in fp32 partials (the path of small n on a GPU),
    more parts than row tiles included: the same result as one part, to fp32 rounding."""
    from leantune.quant import triton_lora

    u, x = f32(130, 20, seed=15).to(DEV), bf16(130, 70, seed=16).to(DEV)
    want = 0.25 * u.double().t() @ x.double()
    got = triton_lora.tgrad(u, x, 0.25, transpose, splits=splits)
    assert got.shape == ((70, 20) if transpose else (20, 70))
    got = got.t() if transpose else got
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
