"""The 4-bit reference (quant/functional.py), the autograd Function, the module and dispatch.

Parity: against the golden files (tests/golden/make_quant_golden.py, always) and against
bitsandbytes itself when it is installed (seeded random shapes).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as tnf
from safetensors import safe_open

from leantune.base import ModelError, UsageError
from leantune.quant import dispatch
from leantune.quant import functional as F
from leantune.quant.matmul4bit import MatMul4bit, matmul_4bit_reference
from leantune.quant.modules import Linear4bit, replace_linears

GOLDEN = Path(__file__).resolve().parent / "golden"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN bit patterns)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _load(name: str):
    with safe_open(str(GOLDEN / name), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests check the reference bit for bit; dispatch tests override this."""
    monkeypatch.setenv(dispatch.ENV, "reference")


# ---------------------------------------------------------------------------------------
# golden vectors (always run)


def test_golden_tables():
    inputs, _ = _load("quant_inputs.safetensors")
    assert _bits_equal(F.NF4_CODE, inputs["code.nf4"])
    assert _bits_equal(F.FP4_CODE, inputs["code.fp4"])
    g8, _ = _load("quant_blockwise8.safetensors")
    assert _bits_equal(F.create_dynamic_map(), g8["dynamic_map"])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_golden_4bit(quant_type):
    inputs, _ = _load("quant_inputs.safetensors")
    gold, meta = _load(f"quant_{quant_type}.safetensors")
    cases = json.loads(meta["cases"])
    assert len(cases) >= 40
    seen = set()
    for case in cases:
        key, w = case["key"], inputs[case["input"]]
        assert str(w.dtype) == f"torch.{case['dtype']}" and list(w.shape) == case["shape"]
        packed, st = F.quantize_4bit(w, blocksize=case["blocksize"], quant_type=quant_type,
                                     double_quant=case["double_quant"])
        assert _bits_equal(packed, gold[f"{key}.packed"]), key
        assert _bits_equal(st.absmax, gold[f"{key}.absmax"]), key
        assert st.shape == tuple(w.shape) and st.dtype == w.dtype and st.blocksize == case["blocksize"]
        if case["double_quant"]:
            assert _bits_equal(st.nested.absmax, gold[f"{key}.nested_absmax"]), key
            assert st.nested.offset == float(gold[f"{key}.offset"][0]), key
            assert _bits_equal(st.nested.code, F.create_dynamic_map()) and st.nested.blocksize == 256
        else:
            assert st.nested is None
        if case["has_deq"]:
            assert _bits_equal(F.dequantize_4bit(packed, st), gold[f"{key}.deq"]), key
        seen.add((case["blocksize"], case["dtype"], case["double_quant"]))
    assert len(seen) == 4 * 3 * 2  # every blocksize x dtype x double-quant


def test_golden_blockwise8():
    gold, meta = _load("quant_blockwise8.safetensors")
    x = gold["in.x"]
    for case in json.loads(meta["cases"]):
        q, absmax = F.quantize_blockwise_8bit(x, gold["dynamic_map"], case["blocksize"])
        assert _bits_equal(q, gold[f"{case['key']}.q"])
        assert _bits_equal(absmax, gold[f"{case['key']}.absmax"])
        if f"{case['key']}.deq" in gold:
            deq = F.dequantize_blockwise_8bit(q, absmax, gold["dynamic_map"], case["blocksize"])
            assert _bits_equal(deq, gold[f"{case['key']}.deq"])


# ---------------------------------------------------------------------------------------
# live bitsandbytes (skipped when it is not installed)


@pytest.fixture
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional  # noqa: F401

    # bitsandbytes wraps its default-backend ops in torch.compile: run them eagerly (fast)
    with torch._dynamo.config.patch(disable=True):
        yield bnb


def _bnb_flat_dequant(bnb, packed, st, dtype):
    """bitsandbytes' dequantization with flat block indexing (its default backend; the CUDA
    kernels index the same way). Its CPU C kernel instead assumes blocks never straddle a
    row (shape[-1] % blocksize == 0) and is wrong otherwise, so that path is compared only
    on row-aligned shapes below."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    bf = bnb.functional
    absmax = st.absmax
    if st.nested:
        absmax = bf.dequantize_blockwise(st.absmax, st.state2) + st.offset
    code = bf.get_4bit_type(st.quant_type, device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, st.blocksize, tuple(st.shape), dtype)


def test_bnb_random_shapes(bnb):
    bf = bnb.functional
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(60):
        shape = rng.choice([(rng.randint(1, 5000),), (rng.randint(1, 40), rng.randint(1, 300)),
                            (rng.randint(1, 8), 64 * rng.randint(1, 6))])
        bs = rng.choice(F.VALID_BLOCKSIZES)
        qt = rng.choice(["nf4", "fp4"])
        dq = rng.random() < 0.5
        dtype = rng.choice(list(DTYPES.values()))
        w = (torch.randn(shape) * 10 ** rng.uniform(-3, 1)).to(dtype)
        if rng.random() < 0.2:
            w.view(-1)[: min(w.numel(), bs)] = 0  # a zero block
        pb, sb = bf.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq)
        pq, sq = F.quantize_4bit(w, blocksize=bs, quant_type=qt, double_quant=dq)
        ctx = (shape, bs, qt, dq, dtype)
        assert _bits_equal(pq, pb.reshape(-1)), ctx
        assert _bits_equal(sq.absmax, sb.absmax), ctx
        assert _bits_equal(sq.code, sb.code), ctx
        if dq:
            assert _bits_equal(sq.nested.absmax, sb.state2.absmax), ctx
            assert _bits_equal(sq.nested.code, sb.state2.code), ctx
            assert sq.nested.offset == sb.offset.item() and sq.nested.blocksize == sb.state2.blocksize, ctx
            ref_absmax = bf.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset
            assert _bits_equal(F.decode_absmax(sq), ref_absmax), ctx
        out_dtype = rng.choice(list(DTYPES.values()))
        assert _bits_equal(F.dequantize_4bit(pq, sq, out_dtype), _bnb_flat_dequant(bnb, pb, sb, out_dtype)), ctx
        if shape[-1] % bs == 0 or shape[-1] % 2 == 1:  # the shapes bnb's CPU dequantize gets right
            assert _bits_equal(F.dequantize_4bit(pq, sq), bf.dequantize_4bit(pb, sb)), ctx


def test_bnb_ties_and_zeros(bnb):
    """Values exactly on the midpoints between codes, and the FP4 zero bins."""
    bf = bnb.functional
    for qt in ("nf4", "fp4"):
        code = bf.get_4bit_type(qt, device="cpu").sort().values
        mids = (code[:-1] + code[1:]) / 2
        row = torch.cat([torch.tensor([1.0]), mids, -mids, code, torch.tensor([0.0026, -0.0026, 1e-9, -1e-9])])
        w = torch.cat([row, row * 2.0, row[:37] * 4.0])  # full blocks and a short tail (division)
        for bs in (32, 64):
            pb, sb = bf.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=True)
            pq, sq = F.quantize_4bit(w, blocksize=bs, quant_type=qt, double_quant=True)
            assert _bits_equal(pq, pb.reshape(-1)) and _bits_equal(sq.absmax, sb.absmax)


def test_bnb_blockwise8(bnb):
    bf = bnb.functional
    code = bf.create_dynamic_map()
    assert _bits_equal(F.create_dynamic_map(), code)
    g = torch.Generator().manual_seed(3)
    for n, bs in [(1, 256), (255, 256), (1000, 256), (3001, 64), (777, 4096), (260, 7)]:
        x = torch.randn(n, generator=g) * 10 ** (torch.rand((), generator=g).item() * 4 - 2)
        # exact midpoints and table bin centres, with a block absmax of 1
        sel = torch.randint(0, 255, (n,), generator=g)
        lut_centres = -1.0 + 2.0 * torch.randint(0, 65536, (n,), generator=g).float() / 65535
        mix = torch.where(torch.rand(n, generator=g) < 0.5, (code[sel] + code[sel + 1]) / 2, lut_centres)
        x = torch.where(torch.rand(n, generator=g) < 0.5, x, mix)
        x[::bs] = 1.0
        q, absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, bs)
        qq, aa = F.quantize_blockwise_8bit(x, code, bs)
        assert _bits_equal(qq, q) and _bits_equal(aa, absmax), (n, bs)


# ---------------------------------------------------------------------------------------
# the reference's own contract


def test_layout_high_nibble_first():
    # one block of absmax 1: the values are exactly NF4 codes 15, 0, 7, 8, 3 (odd numel)
    w = F.NF4_CODE[[15, 0, 7, 8, 3]].clone()
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=False)
    assert packed.tolist() == [0xF0, 0x78, 0x37]  # last byte: code 3, then the pad (s = 0 -> 7)
    assert _bits_equal(F.dequantize_4bit(packed, st), w)
    assert F.unpack_codes(packed, 5).tolist() == [15, 0, 7, 8, 3]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_codes_round_trip(quant_type):
    code = F.get_code(quant_type)
    torch.manual_seed(1)
    idx = torch.randint(0, 16, (40, 64))
    scale = torch.rand(40, 1) + 0.5
    w = code[idx] * scale
    w[:, 0] = scale[:, 0]  # each block of 64 (one row) has absmax = its scale, reached
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
    torch.testing.assert_close(F.dequantize_4bit(packed, st), w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        F.quantize_4bit(torch.randn(128), blocksize=blocksize)
    with pytest.raises(ValueError, match=repr(blocksize).replace(".", r"\.")):
        F.check_blocksize(blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight(bad):
    w = torch.randn(10, 10)
    w[3, 4] = bad
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize_4bit(w)
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize_4bit(w.to(torch.bfloat16))


def test_bad_inputs():
    with pytest.raises(ValueError, match="quant_type"):
        F.quantize_4bit(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="float32"):
        F.quantize_4bit(torch.arange(64))
    with pytest.raises(ValueError, match="empty"):
        F.quantize_4bit(torch.empty(0))
    packed, st = F.quantize_4bit(torch.randn(100))
    with pytest.raises(ValueError, match="bytes"):
        F.dequantize_4bit(packed[:-1], st)


def test_error_bound_from_code_spacing():
    """|w - dequant(w)| <= (largest half-gap between neighbouring codes) * block scale.

    With double quantization the scale itself is approximate: the bound uses the decoded
    scale s_b, |w - code * s_b| <= |w - code * a_b| + |a_b - s_b| (|code| <= 1), where the
    8-bit error |a_b - s_b| is bounded by the dynamic map's spacing the same way.
    """
    torch.manual_seed(2)
    w = torch.randn(96, 200) * 0.02
    w[5, 7] = 0.5  # an outlier
    for qt in ("nf4", "fp4"):
        code = F.get_code(qt).sort().values
        half_gap = float((code[1:] - code[:-1]).max()) / 2
        dyn = F.create_dynamic_map()
        dyn_half_gap = float((dyn[1:] - dyn[:-1]).max()) / 2
        for dq in (False, True):
            packed, st = F.quantize_4bit(w, blocksize=64, quant_type=qt, double_quant=dq)
            err = (F.dequantize_4bit(packed, st) - w).abs().reshape(-1)
            flat = w.reshape(-1)
            blocks = -(-flat.numel() // 64)
            absmax = torch.nn.functional.pad(flat.abs(), (0, blocks * 64 - flat.numel())).view(blocks, 64).amax(1)
            bound = half_gap * absmax
            if dq:
                nested_scale = st.nested.absmax.repeat_interleave(256)[:blocks]
                bound = bound + dyn_half_gap * nested_scale * 2  # the scale error, twice for safety of |code|<=1 bins
            bound = bound.repeat_interleave(64)[: flat.numel()]
            assert bool((err <= bound * (1 + 1e-5) + 1e-12).all()), (qt, dq, float((err - bound).max()))
            # the linear: |x @ (W_q - W)^T| <= |x| @ bound^T elementwise
            x = torch.randn(5, 200)
            y_err = (matmul_4bit_reference(x, packed, st) - x @ w.t()).abs()
            assert bool((y_err <= x.abs() @ bound.view(96, 200).t() * (1 + 1e-4) + 1e-6).all())


# ---------------------------------------------------------------------------------------
# MatMul4bit and Linear4bit


def _layer(in_f=200, out_f=96, bias=True, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return lin, Linear4bit.from_linear(lin, **kw)


@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_reference(transpose):
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    packed, st = F.quantize_4bit(w, blocksize=32)
    dense = F.dequantize_4bit(packed, st)
    x = torch.randn(3, 7, 48 if transpose else 80)
    want = x @ dense if transpose else x @ dense.t()
    torch.testing.assert_close(matmul_4bit_reference(x, packed, st, transpose), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="features"):
        matmul_4bit_reference(x[..., :5], packed, st, transpose)


@pytest.mark.parametrize("quant_type,double_quant,bias", [("nf4", True, True), ("fp4", False, False),
                                                          ("nf4", False, True)])
def test_linear4bit_forward_backward(quant_type, double_quant, bias):
    lin, q = _layer(bias=bias, quant_type=quant_type, blocksize=64, double_quant=double_quant)
    dense = q.dequantize()
    assert dense.shape == (96, 200) and dense.dtype == torch.float32
    x = torch.randn(4, 3, 200, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    w_ref = dense.clone().requires_grad_(True)
    b_ref = lin.bias.detach().clone().requires_grad_(True) if bias else None
    y_ref = tnf.linear(x_ref, w_ref, b_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    if bias:
        torch.testing.assert_close(q.bias.grad, b_ref.grad, rtol=1e-5, atol=1e-6)
    # the 4-bit weight is a buffer: not a parameter, never a gradient
    assert [n for n, _ in q.named_parameters()] == (["bias"] if bias else [])
    assert q.weight.grad is None and q.weight.dtype == torch.uint8


def test_matmul4bit_saves_no_activation_or_dense_weight():
    _, q = _layer()
    x = torch.randn(8, 200, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = MatMul4bit.apply(x, q.weight, q.quant_state, None)
    assert len(saved) == 1 and saved[0] is q.weight  # only the packed codes
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_linear4bit_compute_dtype():
    _, q = _layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 200, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32
    # y = (x_bf16 @ W_bf16^T + b_bf16).float(): the matmul and the bias add rounded to bf16
    want = (x.detach().bfloat16() @ q.dequantize(torch.bfloat16).t() + q.bias.detach().bfloat16()).float()
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.sum().backward()
    assert x.grad.dtype == torch.float32


def test_linear4bit_state_dict_and_to():
    lin, q = _layer(quant_type="fp4", blocksize=128, double_quant=True)
    sd = q.state_dict()
    assert set(sd) == {"weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset", "bias"}
    fresh = Linear4bit(200, 96, bias=True, quant_type="fp4", blocksize=128, double_quant=True)
    fresh.load_state_dict(sd)
    assert fresh.quant_state.nested.offset == q.quant_state.nested.offset
    x = torch.randn(3, 200)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    moved = q.to("meta")
    assert moved.weight.device.type == "meta" and moved.quant_state.absmax.device.type == "meta"


def test_from_linear_errors():
    lin = nn.Linear(64, 8)
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit.from_linear(lin, blocksize=100)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        Linear4bit.from_linear(lin)


def test_replace_linears():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "layers": nn.ModuleList([nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)) for _ in range(2)]),
        "lm_head": nn.Linear(64, 10, bias=False),
    })
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = replace_linears(model, quant_type="nf4", blocksize=64, compute_dtype=None)
    assert out is model
    assert type(model["lm_head"]) is nn.Linear
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(swapped) == ["layers.0.0", "layers.0.2", "layers.1.0", "layers.1.2"]
    for name, m in swapped.items():
        packed, st = F.quantize_4bit(dense[name], blocksize=64)
        assert _bits_equal(m.weight, packed) and _bits_equal(m.dequantize(), F.dequantize_4bit(packed, st))

    bad = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("inf")
    with pytest.raises(ModelError) as e:
        replace_linears(bad)
    assert e.value.where == "1.weight"
    with pytest.raises(ValueError, match="blocksize"):
        replace_linears(nn.Sequential(nn.Linear(8, 8)), blocksize=12)


# ---------------------------------------------------------------------------------------
# dispatch


def test_dispatch_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.backend_for(torch.empty(1)) == "reference"
    monkeypatch.setenv(dispatch.ENV, "cuda-magic")
    with pytest.raises(UsageError, match="cuda-magic"):
        dispatch.backend_for(torch.empty(1))
    monkeypatch.delenv(dispatch.ENV)
    assert dispatch.backend_for(torch.empty(1)) in ("reference", "cpu")


def test_dispatch_auto_matches_reference(monkeypatch):
    """Whatever backend runs on this machine computes the reference's weights and matmuls."""
    monkeypatch.delenv(dispatch.ENV)
    torch.manual_seed(0)
    w = torch.randn(72, 136)
    for dq in (False, True):
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=dq)
        for dtype in DTYPES.values():
            assert _bits_equal(dispatch.dequantize_4bit(packed, st, dtype), F.dequantize_4bit(packed, st, dtype))
        for transpose, m in [(False, 1), (False, 9), (True, 9)]:
            x = torch.randn(m, 72 if transpose else 136)
            torch.testing.assert_close(dispatch.matmul_4bit(x, packed, st, transpose),
                                       matmul_4bit_reference(x, packed, st, transpose), rtol=1e-5, atol=1e-5)
