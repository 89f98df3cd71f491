"""The C kernels (csrc/quant4bit.c via quant/cpu_kernels.py) against the PyTorch reference.

Dequantize and quantize are bit-exact (torch.equal) with quant.functional and, when it is
installed, with bitsandbytes; the linear matches x @ dequant(W)^T within fp32 summation
error. Every test but the fallback ones skips when the kernels cannot be built here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leantune.quant import cpu_kernels
from leantune.quant import functional as ref
from leantune.quant.state import QuantState

ROOT = Path(__file__).resolve().parent.parent

needs_c = pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels unavailable (no compiler?)")

NUMELS = (1, 2, 63, 64, 65, 341, 4231, 100000)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


def _bnb():
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # not installed, or a broken install: the peer is optional
        return None
    return bnbF


def _weights(numel: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g) * 2.5


def _ref_quant(x, blocksize, quant_type):
    packed, state = ref.quantize_4bit(x, blocksize, quant_type, double_quant=False)
    return packed, state


def _state(absmax, quant_type, blocksize, shape) -> QuantState:
    return QuantState(quant_type, blocksize, tuple(shape), torch.float32, absmax, ref.get_code(quant_type))


# ---------------------------------------------------------------------------------------
# quantize / dequantize: bit-exact

@needs_c
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("numel", NUMELS)
def test_quantize_dequantize_bit_exact(numel, blocksize, quant_type):
    x = _weights(numel, seed=numel + blocksize)
    code = ref.get_code(quant_type)
    packed_ref, state = _ref_quant(x, blocksize, quant_type)

    packed, absmax = cpu_kernels.quantize_4bit_cpu(x, code, blocksize)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(absmax, state.absmax)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = cpu_kernels.dequantize_4bit_cpu(packed, absmax, code, blocksize, numel, dtype)
        want = ref.dequantize_4bit(packed_ref, state, dtype)
        assert got.dtype == dtype and got.shape == (numel,)
        assert torch.equal(got, want), dtype


@needs_c
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize,numel", [(64, 100000), (32, 4231), (4096, 4231), (64, 1 << 18)])
def test_quantize_matches_bitsandbytes(numel, blocksize, quant_type):
    bnbF = _bnb()
    if bnbF is None:
        pytest.skip("bitsandbytes not installed")
    x = _weights(numel, seed=7)
    packed, absmax = cpu_kernels.quantize_4bit_cpu(x, ref.get_code(quant_type), blocksize)
    bp, bs = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    assert torch.equal(packed, bp.reshape(-1))
    assert torch.equal(absmax, bs.absmax)
    got = cpu_kernels.dequantize_4bit_cpu(packed, absmax, ref.get_code(quant_type), blocksize, numel)
    assert torch.equal(got, bnbF.dequantize_4bit(bp, bs).reshape(-1))


def _special_inputs(quant_type: str) -> dict[str, torch.Tensor]:
    """Inputs that probe ties, zeros, tiny and huge values (all finite)."""
    code = ref.get_code(quant_type)
    sorted_code = code.sort().values
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    g = torch.Generator().manual_seed(3)
    ties = bounds.repeat(70)[:1000].clone()
    ties[::16] = 1.0  # absmax 1 in every block of 16+: the scaled values are the bounds exactly
    neg_ties = -ties
    zeros = torch.zeros(1000)
    zeros[:500] = torch.randn(500, generator=g)  # all-zero full blocks and an all-zero tail
    return {
        "ties": ties, "neg_ties": neg_ties, "zeros": zeros,
        "tiny": torch.rand(1000, generator=g) * 0.004,  # FP4's two zeros
        "denormal": torch.randn(1000, generator=g) * 1e-40,
        "huge": torch.randn(1000, generator=g) * 1e37,
        "mixed_scale": torch.randn(1000, generator=g) * torch.logspace(-20, 20, 1000),
    }


@needs_c
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_special_values(quant_type):
    code = ref.get_code(quant_type)
    bnbF = _bnb()
    for name, x in _special_inputs(quant_type).items():
        for blocksize in (32, 64, 4096):
            for n in (1000, 999, 37):
                xx = x[:n].contiguous()
                packed_ref, state = _ref_quant(xx, blocksize, quant_type)
                packed, absmax = cpu_kernels.quantize_4bit_cpu(xx, code, blocksize)
                assert torch.equal(packed, packed_ref), (name, blocksize, n)
                assert torch.equal(absmax, state.absmax), (name, blocksize, n)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):  # fp16 overflows / underflows
                    got = cpu_kernels.dequantize_4bit_cpu(packed, absmax, code, blocksize, n, dtype)
                    assert torch.equal(got, ref.dequantize_4bit(packed, state, dtype)), (name, blocksize, n, dtype)
                if bnbF is not None:
                    bp, bs = bnbF.quantize_4bit(xx, blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=False)
                    assert torch.equal(packed, bp.reshape(-1)), (name, blocksize, n)


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_half_inputs(dtype):
    x = _weights(4225, seed=11).to(dtype).reshape(65, 65)
    code = ref.get_code("nf4")
    packed_ref, state = _ref_quant(x, 64, "nf4")
    packed, absmax = cpu_kernels.quantize_4bit_cpu(x, code, 64)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(absmax, state.absmax)


@needs_c
def test_threads_do_not_change_results():
    x = _weights(300001, seed=5)
    code = ref.get_code("nf4")
    n_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.quantize_4bit_cpu(x, code, 64)
        one_dq = cpu_kernels.dequantize_4bit_cpu(*one, code, 64, x.numel())
    finally:
        torch.set_num_threads(n_threads)
    torch.set_num_threads(max(2, n_threads))
    try:
        many = cpu_kernels.quantize_4bit_cpu(x, code, 64)
        many_dq = cpu_kernels.dequantize_4bit_cpu(*many, code, 64, x.numel())
    finally:
        torch.set_num_threads(n_threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert torch.equal(one_dq, many_dq)


@needs_c
def test_dequantize_into_out():
    x = _weights(4231)
    code = ref.get_code("fp4")
    packed, absmax = cpu_kernels.quantize_4bit_cpu(x, code, 128)
    out = torch.full((4231,), float("nan"), dtype=torch.bfloat16)
    got = cpu_kernels.dequantize_4bit_cpu(packed, absmax, code, 128, 4231, torch.bfloat16, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, ref.dequantize_4bit(packed, _state(absmax, "fp4", 128, (4231,)), torch.bfloat16))


@needs_c
def test_quantize_rejects_non_finite():
    code = ref.get_code("nf4")
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _weights(1000)
        x[500] = bad
        with pytest.raises(ValueError, match="non-finite"):
            cpu_kernels.quantize_4bit_cpu(x, code, 64)


# ---------------------------------------------------------------------------------------
# linear

LINEAR_SHAPES = [  # (M, K, N): GEMV sizes, odd sizes, tails of tiles, several tiles
    (1, 64, 64), (1, 33, 17), (2, 341, 7), (4, 100, 300), (1, 4231, 5),
    (5, 33, 17), (7, 341, 64), (17, 100, 300), (31, 96, 130), (64, 576, 1536), (33, 1000, 129),
    (300, 7, 9),
]


def _dequant_matrix(packed, absmax, quant_type, blocksize, N, K):
    return ref.dequantize_4bit(packed, _state(absmax, quant_type, blocksize, (N, K)), torch.float32)


def _close(got, want):
    """fp32, ~1e-5 relative to the output's scale (the sums run in another order)."""
    scale = want.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(scale))


@needs_c
@pytest.mark.parametrize("tile_elems", [1 << 18, 1000])
@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
def test_linear_forward_and_transpose(M, K, N, tile_elems, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "TILE_ELEMS", tile_elems)  # 1000: many small tiles
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    quant_type, blocksize = ("nf4", 64) if (M + K) % 2 else ("fp4", 32)
    w = torch.randn(N, K, generator=g)
    code = ref.get_code(quant_type)
    packed, absmax = cpu_kernels.quantize_4bit_cpu(w, code, blocksize)
    wd = _dequant_matrix(packed, absmax, quant_type, blocksize, N, K)

    x = torch.randn(M, K, generator=g)
    y = cpu_kernels.linear_4bit_cpu(x, packed, absmax, code, blocksize, N, K)
    assert y.shape == (M, N)
    _close(y, x @ wd.t())

    dy = torch.randn(M, N, generator=g)
    dx = cpu_kernels.linear_4bit_cpu(dy, packed, absmax, code, blocksize, N, K, transpose=True)
    assert dx.shape == (M, K)
    _close(dx, dy @ wd)


@needs_c
@pytest.mark.parametrize("M", [3, 9])
def test_linear_gemv_and_tiled_paths_agree(M, monkeypatch):
    """The same rows through the GEMVs (small M) and through the tiled GEMM path."""
    g = torch.Generator().manual_seed(M)
    N, K = 300, 257
    w = torch.randn(N, K, generator=g)
    code = ref.get_code("nf4")
    packed, absmax = cpu_kernels.quantize_4bit_cpu(w, code, 64)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    monkeypatch.setattr(cpu_kernels, "GEMV_MAX_M", 64)
    monkeypatch.setattr(cpu_kernels, "GEMV_MAX_M_BF16", 64)
    monkeypatch.setattr(cpu_kernels, "GEMV_T_MAX_M", 64)
    gemv = cpu_kernels.linear_4bit_cpu(x, packed, absmax, code, 64, N, K)
    gemv_t = cpu_kernels.linear_4bit_cpu(dy, packed, absmax, code, 64, N, K, transpose=True)
    monkeypatch.setattr(cpu_kernels, "GEMV_MAX_M", 0)
    monkeypatch.setattr(cpu_kernels, "GEMV_MAX_M_BF16", 0)
    monkeypatch.setattr(cpu_kernels, "GEMV_T_MAX_M", 0)
    _close(gemv, cpu_kernels.linear_4bit_cpu(x, packed, absmax, code, 64, N, K))
    _close(gemv_t, cpu_kernels.linear_4bit_cpu(dy, packed, absmax, code, 64, N, K, transpose=True))


def _rel(got, want64):
    return float((got.double() - want64).norm() / want64.norm().clamp(min=1e-300))


@needs_c
@pytest.mark.parametrize("tile_elems", [1 << 18, 1000])
@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
def test_linear_bf16_within_twice_eager_bf16_error(M, K, N, tile_elems, monkeypatch):
    """bf16 x: bf16 tiles + bf16 GEMMs (GEMV sizes: fp32 inside, one rounding of y). Against
    the float64 product of the same bf16 inputs, its error is at most twice eager bf16's
    (x_bf16 @ W_bf16^T), and the output is bf16."""
    monkeypatch.setattr(cpu_kernels, "TILE_ELEMS", tile_elems)
    g = torch.Generator().manual_seed(M * 7 + K + N)
    quant_type, blocksize = ("nf4", 64) if (M + K) % 2 else ("fp4", 32)
    code = ref.get_code(quant_type)
    packed, absmax = cpu_kernels.quantize_4bit_cpu(torch.randn(N, K, generator=g), code, blocksize)
    wd = _dequant_matrix(packed, absmax, quant_type, blocksize, N, K)
    x = torch.randn(M, K, generator=g).bfloat16()
    dy = torch.randn(M, N, generator=g).bfloat16()
    for inp, transpose, w64 in ((x, False, wd.double().t()), (dy, True, wd.double())):
        got = cpu_kernels.linear_4bit_cpu(inp, packed, absmax, code, blocksize, N, K, transpose=transpose)
        assert got.dtype == torch.bfloat16 and got.shape == (M, K if transpose else N)
        want = inp.double() @ w64
        eager = (inp @ (wd.bfloat16().t() if not transpose else wd.bfloat16())).double()
        assert _rel(got, want) <= 2 * _rel(eager, want) + 1e-7


@needs_c
def test_bf16_tiles_equal_the_bf16_dequantize():
    """The bf16 tile kernel gives exactly dequantize_4bit(..., bfloat16), row and column tiles."""
    N, K, bs = 96, 320, 64
    code = ref.get_code("nf4")
    packed, absmax = cpu_kernels.quantize_4bit_cpu(torch.randn(N, K), code, bs)
    want = ref.dequantize_4bit(packed, _state(absmax, "nf4", bs, (N, K)), torch.bfloat16)
    lib, ptr = cpu_kernels._lib(), cpu_kernels._ptr
    for row0, n_rows, col0, n_cols in ((0, N, 0, K), (17, 40, 0, K), (0, N, 64, 131)):
        tile = torch.empty(n_rows, n_cols, dtype=torch.bfloat16)
        lib.lt_dequant4_tile_bf16(ptr(packed), ptr(absmax), ptr(code), bs, K, row0, n_rows, col0, n_cols,
                                  ptr(tile), n_cols, 2)
        assert torch.equal(tile, want[row0:row0 + n_rows, col0:col0 + n_cols])


# ---------------------------------------------------------------------------------------
# bad arguments

@needs_c
def test_bad_arguments_raise_value_error():
    code = ref.get_code("nf4")
    x = _weights(256)
    packed, absmax = cpu_kernels.quantize_4bit_cpu(x, code, 64)
    dq = cpu_kernels.dequantize_4bit_cpu
    cases = [
        (lambda: dq(packed.float(), absmax, code, 64, 256), "packed must be torch.uint8"),
        (lambda: dq(packed, absmax.half(), code, 64, 256), "absmax must be torch.float32"),
        (lambda: dq(packed, absmax, code[:8], 64, 256), "code must have 16"),
        (lambda: dq(packed, absmax, code, 63, 256), "blocksize"),
        (lambda: dq(packed, absmax, code, 64, 600), "packed has 128 elements"),
        (lambda: dq(packed, absmax, code, 64, 256, torch.float64), "dtype"),
        (lambda: dq(packed.view(2, 64).t(), absmax, code, 64, 256), "packed must be contiguous"),
        (lambda: dq(packed, absmax, code, 64, 256, out=torch.empty(255)), "out has 255"),
        (lambda: cpu_kernels.quantize_4bit_cpu(x.double(), code, 64), "x must be a float32"),
        (lambda: cpu_kernels.quantize_4bit_cpu(x.view(16, 16).t(), code, 64), "x must be contiguous"),
        (lambda: cpu_kernels.quantize_4bit_cpu(x, code.half(), 64), "code must be torch.float32"),
    ]
    lin = cpu_kernels.linear_4bit_cpu
    xl = torch.randn(3, 16)
    cases += [
        (lambda: lin(xl.double(), packed, absmax, code, 64, 16, 16), "x must be torch.float32"),
        (lambda: lin(torch.randn(16, 3).t(), packed, absmax, code, 64, 16, 16), "x must be contiguous"),
        (lambda: lin(xl[0], packed, absmax, code, 64, 16, 16), "x must be 2-D"),
        (lambda: lin(torch.randn(3, 15), packed, absmax, code, 64, 16, 16), "x must have 16 columns"),
        (lambda: lin(xl, packed, absmax, code, 64, 32, 16), "packed has 128 elements"),
        (lambda: lin(xl, packed, absmax, code, 64, 0, 16), "positive"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ---------------------------------------------------------------------------------------
# the portable build and the fallback

def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


@needs_c
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_other_builds_are_bit_exact(isa):
    """The portable loops (no SIMD) and the AVX2-only build (no AVX-512 decode) give the same
    bits as the reference; each is built and checked in a subprocess."""
    if isa == "avx2" and cpu_kernels.build_info()["isa"] == "scalar":
        pytest.skip("no AVX2 on this CPU")
    proc = _run_python(f"""
        import torch
        from leantune.quant import cpu_kernels, functional as ref
        from leantune.quant.state import QuantState
        assert cpu_kernels.available() and cpu_kernels.build_info()["isa"] == "{isa}"
        for qt in ("nf4", "fp4"):
            code = ref.get_code(qt)
            for n, bs in ((65, 32), (4231, 64), (100001, 4096)):
                x = torch.randn(n) * 3
                p_ref, st = ref.quantize_4bit(x, bs, qt, double_quant=False)
                p, a = cpu_kernels.quantize_4bit_cpu(x, code, bs)
                assert torch.equal(p, p_ref) and torch.equal(a, st.absmax), (qt, n, bs)
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    got = cpu_kernels.dequantize_4bit_cpu(p, a, code, bs, n, dt)
                    assert torch.equal(got, ref.dequantize_4bit(p, st, dt)), (qt, n, bs, dt)
            w = torch.randn(37, 41)
            p, a = cpu_kernels.quantize_4bit_cpu(w, code, 32)
            wd = ref.dequantize_4bit(p, QuantState(qt, 32, (37, 41), torch.float32, a, code))
            for M in (1, 9, 20):
                x = torch.randn(M, 41)
                torch.testing.assert_close(cpu_kernels.linear_4bit_cpu(x, p, a, code, 32, 37, 41), x @ wd.t(),
                                           rtol=1e-5, atol=1e-5)
        print("ok")
    """, LEANTUNE_CPU_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_fallback_without_compiler(compiler, tmp_path):
    """No compiler (or a broken one): available() is False, with one line on stderr, once."""
    proc = _run_python("""
        from leantune.quant import cpu_kernels
        print(cpu_kernels.available(), cpu_kernels.available())
    """, LEANTUNE_CC=compiler, LEANTUNE_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False False"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("leantune: C kernels unavailable (")
    assert lines[0].endswith("; using the PyTorch reference")


@needs_c
@pytest.mark.parametrize("shape", [(5,), (33, 65), (64, 576), (7, 1000)], ids=str)
@pytest.mark.parametrize("quant_type,double_quant,dtype", [
    ("nf4", True, torch.float32), ("fp4", False, torch.float32), ("nf4", True, torch.bfloat16),
    ("nf4", False, torch.float16)], ids=str)
def test_dispatch_quantize_equals_reference(shape, quant_type, double_quant, dtype):
    """quant.dispatch.quantize_4bit (the C codes + PyTorch double quant, used by the loader)
    returns exactly the reference's packed codes and state."""
    from leantune.quant import dispatch

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 0.1).to(dtype)
    packed, state = dispatch.quantize_4bit(w, 64, quant_type, double_quant)
    ref_packed, ref_state = ref.quantize_4bit(w, 64, quant_type, double_quant)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.code, ref_state.code)
    assert (state.shape, state.dtype, state.quant_type) == (ref_state.shape, ref_state.dtype, ref_state.quant_type)
    if double_quant:
        assert torch.equal(state.nested.absmax, ref_state.nested.absmax)
        assert state.nested.offset == ref_state.nested.offset
    else:
        assert state.nested is None and ref_state.nested is None
    with pytest.raises(ValueError):
        dispatch.quantize_4bit(torch.tensor([1.0, float("nan")]))
