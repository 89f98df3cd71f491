"""Triton 4-bit kernels against their PyTorch twin (``quant.functional``).

Without CUDA the kernels run under Triton's interpreter on CPU tensors, on tiny shapes; there
bf16 is not checked (the interpreter's bf16 dot and bf16 stores are wrong), so bf16 and the
realistic shapes are GPU-only tests (marked ``gpu``, skipped without CUDA).
"""
import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of the kernel modules (triton.jit reads it when decorating)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from leantune.quant import functional as F  # noqa: E402
from leantune.quant import triton_dequant, triton_matmul  # noqa: E402
from leantune.quant.triton_dequant import dequantize_4bit_triton  # noqa: E402
from leantune.quant.triton_matmul import matmul_4bit_triton  # noqa: E402

from tests.helpers import skip_unless_triton_runs  # noqa: E402
from tests.ptx_emulator import emulate_nibble_lut  # noqa: E402

skip_unless_triton_runs(triton_dequant._dequant_4bit_kernel, "quant.triton_dequant")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


# ------------------------------------------------------------------------------------------
# the spec: quant.functional
# ------------------------------------------------------------------------------------------
def quantize(w, blocksize, quant_type, double_quant):
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                    double_quant=double_quant)
    return packed.to(w.device), state.to(w.device)


def dequantize(packed, state, dtype):
    """The spec: ``quant.functional.dequantize_4bit``."""
    return F.dequantize_4bit(packed, state, dtype=dtype)


def make_weight(shape, blocksize, quant_type, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(DEVICE)
    return quantize(w, blocksize, quant_type, double_quant)


def make_x(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------------
# dequantize: bit-identical to the reference
# ------------------------------------------------------------------------------------------
# (shape, blocksize): a normal shape, odd numels (tails of one element, of a short block, of a
# short program), a tensor smaller than one block, blocks spanning programs (4096)
DEQUANT_CASES = [
    ((64, 64), 64), ((3, 341), 32), ((3, 341), 128), ((130, 192), 256),
    ((7,), 64), ((33, 4231), 64), ((5, 4231), 4096), ((2, 2048), 2048),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", DEQUANT_CASES, ids=str)
def test_dequantize_bit_exact(shape, blocksize, quant_type, double_quant, dtype):
    packed, state = make_weight(shape, blocksize, quant_type, double_quant)
    out = dequantize_4bit_triton(packed, state, dtype=dtype)
    ref = dequantize(packed, state, dtype)
    assert out.shape == tuple(shape) and out.dtype == dtype
    assert torch.equal(out, ref)


def test_dequantize_default_and_state_dtype():
    packed, state = make_weight((17, 64), 64, "nf4", True)
    assert dequantize_4bit_triton(packed, state).dtype == torch.float16
    assert dequantize_4bit_triton(packed, state, dtype=None).dtype == state.dtype


def test_dequantize_rejects_bad_input():
    packed, state = make_weight((4, 64), 64, "nf4", False)
    with pytest.raises(ValueError):
        dequantize_4bit_triton(packed.to(torch.int32), state)
    with pytest.raises(ValueError):
        dequantize_4bit_triton(packed[:10], state)
    with pytest.raises(ValueError):
        dequantize_4bit_triton(packed, state, dtype=torch.int8)


# ------------------------------------------------------------------------------------------
# fused matmul: fp32 tight, fp16 within twice the eager fp16 error
# ------------------------------------------------------------------------------------------
# (M, N, K, quant_type, double_quant, blocksize). Paths covered under the interpreter's
# 16x32x32 tile and 16x64 GEMV tile: K % blocksize == 0 (one scale a tile row, or several
# blocks a tile row in the GEMV: 64 > 32, with a half-empty last tile at K = 160), blocks
# crossing rows (160 % 64, 192 % 128), odd K (element-wise nibbles, 341 and 4231), M == 1
# (GEMV), M <= 16, M not a multiple of the tile, N and K tails smaller than a tile.
MATMUL_CASES = [
    (1, 64, 64, "nf4", True, 64),
    (1, 24, 160, "nf4", True, 32),
    (1, 37, 341, "fp4", False, 32),
    (3, 96, 160, "nf4", False, 64),
    (3, 96, 160, "fp4", True, 32),
    (17, 130, 192, "nf4", True, 64),
    (17, 130, 192, "fp4", True, 128),
    (33, 64, 341, "nf4", True, 128),
    (20, 48, 256, "nf4", False, 256),
    (2, 40, 4231, "nf4", True, 64),
]
FP32_TOL = (torch.float32, 1e-5, 1e-5)  # (dtype, atol, rtol)


def _reference_matmul(x, packed, state, transpose):
    """(fp32 reference on the fp32 dequantized weight, eager result in x's dtype)."""
    w32 = dequantize(packed, state, torch.float32)
    w = dequantize(packed, state, x.dtype)
    if transpose:
        return x.float() @ w32, x @ w
    return x.float() @ w32.T, x @ w.T


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("M,N,K,quant_type,double_quant,blocksize", MATMUL_CASES, ids=str)
def test_matmul_fp32(M, N, K, quant_type, double_quant, blocksize, transpose):
    dtype, atol, rtol = FP32_TOL
    packed, state = make_weight((N, K), blocksize, quant_type, double_quant)
    x = make_x((M, N if transpose else K), dtype)
    y = matmul_4bit_triton(x, packed, state, transpose=transpose)
    ref, _ = _reference_matmul(x, packed, state, transpose)
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("M,N,K,quant_type,double_quant,blocksize", MATMUL_CASES[::2], ids=str)
def test_matmul_fp16_within_twice_eager_error(M, N, K, quant_type, double_quant, blocksize,
                                              transpose):
    packed, state = make_weight((N, K), blocksize, quant_type, double_quant)
    x = make_x((M, N if transpose else K), torch.float16)
    y = matmul_4bit_triton(x, packed, state, transpose=transpose)
    ref32, eager = _reference_matmul(x, packed, state, transpose)
    assert y.dtype == torch.float16
    err = (y.float() - ref32).abs().max().item()
    eager_err = (eager.float() - ref32).abs().max().item()
    assert err <= 2 * eager_err, (err, eager_err)


def test_matmul_batch_dims_and_strided_x():
    packed, state = make_weight((48, 96), 64, "nf4", True)
    x = make_x((2, 3, 96), torch.float32)
    ref, _ = _reference_matmul(x.reshape(6, 96), packed, state, False)
    y = matmul_4bit_triton(x, packed, state)
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y.reshape(6, 48), ref, atol=1e-5, rtol=1e-5)
    xt = make_x((96, 5), torch.float32).T  # (5, 96), stride (1, 5)
    ref, _ = _reference_matmul(xt.contiguous(), packed, state, False)
    torch.testing.assert_close(matmul_4bit_triton(xt, packed, state), ref, atol=1e-5, rtol=1e-5)
    g = make_x((4, 7, 48), torch.float32)  # backward: (..., N) -> (..., K)
    ref, _ = _reference_matmul(g.reshape(28, 48), packed, state, True)
    y = matmul_4bit_triton(g, packed, state, transpose=True)
    assert y.shape == (4, 7, 96)
    torch.testing.assert_close(y.reshape(28, 96), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("N,K", [(64, 128), (40, 160)], ids=str)
def test_matmul_tile_wider_than_block(N, K, transpose):
    """A tile spanning several absmax blocks of a row (BLOCK_K / BLOCK_N 64 > blocksize 32);
    at K = 160 the last tile holds one block and one past the row's end."""
    packed, state = make_weight((N, K), 32, "nf4", True)
    x = make_x((19, N if transpose else K), torch.float32)
    config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1)
    y = matmul_4bit_triton(x, packed, state, transpose=transpose, config=config)
    ref, _ = _reference_matmul(x, packed, state, transpose)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


class _Spy:
    """Stands in for a kernel and records that it was launched."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.mark.parametrize("M,transpose,path", [(1, False, "gemv"), (1, True, "tile"),
                                              (5, False, "tile")])
def test_small_m_path_is_automatic(monkeypatch, M, transpose, path):
    gemv = _Spy(triton_matmul._gemv_4bit_kernel)
    tile = _Spy(triton_matmul._matmul_4bit_kernel)
    monkeypatch.setattr(triton_matmul, "_gemv_4bit_kernel", gemv)
    monkeypatch.setattr(triton_matmul, "_matmul_4bit_kernel", tile)
    packed, state = make_weight((32, 64), 64, "nf4", True)
    x = make_x((M, 32 if transpose else 64), torch.float32)
    y = matmul_4bit_triton(x, packed, state, transpose=transpose)
    ref, _ = _reference_matmul(x, packed, state, transpose)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert (gemv.calls, tile.calls) == ((1, 0) if path == "gemv" else (0, 1))


def test_matmul_rejects_bad_input():
    packed, state = make_weight((32, 64), 64, "nf4", False)
    with pytest.raises(ValueError):
        matmul_4bit_triton(make_x((2, 32), torch.float32), packed, state)  # needs K = 64
    with pytest.raises(ValueError):
        matmul_4bit_triton(make_x((2, 64), torch.float32), packed, state, transpose=True)
    with pytest.raises(ValueError):
        matmul_4bit_triton(make_x((2, 64), torch.float32).to(torch.int32), packed, state)


@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
def test_matmul_unfused_path_equals_reference(transpose):
    """fused=False (the large-M path: Triton dequantize, then torch.matmul) equals the spec."""
    packed, state = make_weight((48, 96), 64, "nf4", True)
    x = make_x((5, 48 if transpose else 96), torch.float32)
    ref, _ = _reference_matmul(x, packed, state, transpose)
    y = matmul_4bit_triton(x, packed, state, transpose=transpose, fused=False)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_matmul_empty_batch():
    packed, state = make_weight((32, 64), 64, "nf4", True)
    y = matmul_4bit_triton(make_x((0, 64), torch.float32), packed, state)
    assert y.shape == (0, 32)


# ------------------------------------------------------------------------------------------
# the register lookup's PTX (GPU-only code), run by a PTX emulator of the ops it uses
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nibble_lut_asm_gives_the_table_values(quant_type, dtype):
    code = F.get_code(quant_type, "cpu")
    asm = triton_matmul.nibble_lut_asm(code, dtype)
    table = (code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
    g = torch.Generator().manual_seed(0)
    # every byte value in every lane, then random words
    words = [b * 0x01010101 for b in range(256)]
    words += [b | (255 - b) << 8 | ((b * 7) & 255) << 16 | ((b * 13 + 5) & 255) << 24 for b in range(256)]
    words += torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64).tolist()
    for word in words:
        hi, lo = emulate_nibble_lut(asm, word)
        bs = word.to_bytes(4, "little")
        assert hi == [table[b >> 4] for b in bs] and lo == [table[b & 15] for b in bs], hex(word)
    # the asm's constants are the table: another table gives other text
    assert triton_matmul.nibble_lut_asm(F.get_code("fp4" if quant_type == "nf4" else "nf4", "cpu"),
                                        dtype) != asm


# ------------------------------------------------------------------------------------------
# GPU only: bf16, realistic shapes, the autotuned and small-M paths
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((4096, 4096), 64, True), ((14336, 4096), 64, True), ((4097, 341), 128, False),
    ((1000, 1001), 4096, True)], ids=str)
def test_gpu_dequantize_bit_exact(shape, blocksize, double_quant, dtype):
    for quant_type in ("nf4", "fp4"):
        packed, state = make_weight(shape, blocksize, quant_type, double_quant)
        assert torch.equal(dequantize_4bit_triton(packed, state, dtype=dtype),
                           dequantize(packed, state, dtype))


def _rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [True, False, None], ids=["fused", "unfused", "auto"])
@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("M,N,K,blocksize", [
    (512, 4096, 4096, 64), (333, 11008, 4096, 64), (1024, 4096, 14336, 64),
    (257, 1000, 2000, 128), (2048, 4096, 4096, 64), (130, 1000, 1001, 64)], ids=str)
def test_gpu_matmul_bf16(M, N, K, blocksize, transpose, fused):
    packed, state = make_weight((N, K), blocksize, "nf4", True)
    x = make_x((M, N if transpose else K), torch.bfloat16)
    y = matmul_4bit_triton(x, packed, state, transpose=transpose, fused=fused)
    ref32, eager = _reference_matmul(x, packed, state, transpose)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, ref32) <= 1e-2
    err = (y.float() - ref32).abs().max().item()
    assert err <= 2 * (eager.float() - ref32).abs().max().item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fused", [True, None], ids=["fused", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 2, 7, 16])
@pytest.mark.parametrize("N,K", [(14336, 4096), (4096, 14336), (1000, 341)], ids=str)
def test_gpu_matmul_small_m(M, N, K, dtype, fused):
    packed, state = make_weight((N, K), 64, "nf4", True)
    x = make_x((M, K), dtype)
    y = matmul_4bit_triton(x, packed, state, fused=fused)
    ref32, eager = _reference_matmul(x, packed, state, False)
    assert _rel_err(y, ref32) <= 1e-2
    err = (y.float() - ref32).abs().max().item()
    assert err <= 2 * (eager.float() - ref32).abs().max().item()


@pytest.mark.gpu
@gpu
def test_gpu_matmul_fp32_ieee():
    packed, state = make_weight((1024, 768), 64, "fp4", False)
    x = make_x((300, 768), torch.float32)
    ref, _ = _reference_matmul(x, packed, state, False)
    torch.testing.assert_close(matmul_4bit_triton(x, packed, state), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("lut", ["registers", "memory"])
@pytest.mark.parametrize("transpose", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fused_kernels_with_either_code_lookup(monkeypatch, lut, transpose, M, dtype):
    # the PTX register lookup (the default for fp16/bf16) and the table gather in memory
    monkeypatch.setattr(triton_matmul, "LUT_IN_REGISTERS", lut == "registers")
    for quant_type in ("nf4", "fp4"):
        packed, state = make_weight((4096, 2048), 64, quant_type, True)
        x = make_x((M, 4096 if transpose else 2048), dtype)
        y = matmul_4bit_triton(x, packed, state, transpose=transpose, fused=True)
        ref32, eager = _reference_matmul(x, packed, state, transpose)
        assert _rel_err(y, ref32) <= 1e-2
        err = (y.float() - ref32).abs().max().item()
        assert err <= 2 * (eager.float() - ref32).abs().max().item(), (quant_type, err)
