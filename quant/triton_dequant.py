"""Triton dequantization of a 4-bit NF4/FP4 tensor (the GPU twin of ``functional.dequantize_4bit``).

Layout: see ``quant/state.py``. One launch decodes everything, the nested (double-quantized)
absmax included; there is no separate absmax pass. The value of element ``i`` is computed
exactly as the reference does, so the result is bit-identical to it::

    scale(b) = absmax[b]                                                    (plain)
             = nested.code[absmax[b]] * nested.absmax[b // nested.blocksize] + nested.offset
    w[i]     = (code[nibble(i)] * scale(i // blocksize))  in fp32, then cast to ``dtype``

(the products and the sum are rounded one at a time; the launch turns fp contraction off so
the compiler does not fuse ``a * b + c`` into one FMA).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from leantune.quant.functional import check_state
from leantune.quant.state import QuantState

# Packed bytes one program decodes (2 * BLOCK_BYTES elements) and its warps. Swept on an H100
# (bench/bench_quant_gpu.py, 2026-11-23, bf16 out, 14336 x 4096): 2048 B / 4 warps reached
# 86.8 % of the measured copy bandwidth (1024 B / 4 warps: 85.3 %, 8192 B: 78 to 80 %).
BLOCK_BYTES = 2048
NUM_WARPS = 4


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _decode_absmax(
    # pointers
    absmax_ptr, nested_absmax_ptr, nested_code_ptr,
    # values
    nested_offset, blk, mask,
    # meta-parameters
    NESTED: tl.constexpr, NESTED_QBLOCK: tl.constexpr,
):
    """The fp32 scale of the absmax blocks ``blk`` (any shape), nested code decoded in place.

    absmax_ptr: fp32 [n_blocks], or uint8 [n_blocks] indices into nested_code_ptr when NESTED;
    nested_absmax_ptr: fp32 [ceil(n_blocks / NESTED_QBLOCK)]; nested_code_ptr: fp32 [256].
    Masked-off lanes get a finite scale (0, or ``nested_offset``).
    """
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q) * tl.load(
            nested_absmax_ptr + blk // NESTED_QBLOCK, mask=mask, other=0.0
        )
        scale = scale + nested_offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequant_4bit_kernel(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    # dimensions
    numel, n_bytes,
    # scalars
    nested_offset,
    # meta-parameters
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_QBLOCK: tl.constexpr,
    BLOCK_BYTES: tl.constexpr, COLS: tl.constexpr,
):
    """out[i] = code[nibble(i)] * scale(i // QBLOCK), cast to out's dtype.

    packed_ptr: uint8 [n_bytes] (n_bytes = ceil(numel / 2), element 2j in the high nibble);
    absmax_ptr: fp32 or uint8 [ceil(numel / QBLOCK)]; code_ptr: fp32 [16];
    out_ptr: fp32/fp16/bf16 [numel].

    Each program decodes BLOCK_BYTES bytes seen as a [ROWS, COLS] tile with COLS dividing
    QBLOCK / 2, so every row lies inside one absmax block and loads its scale once.
    """
    ROWS: tl.constexpr = BLOCK_BYTES // COLS
    HALF_QBLOCK: tl.constexpr = QBLOCK // 2  # bytes per absmax block

    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK_BYTES
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, COLS)
    row_start = start + offs_r * COLS  # (ROWS,) byte index of each row's first byte
    offs_b = row_start[:, None] + offs_c[None, :]  # (ROWS, COLS)
    byte = tl.load(packed_ptr + offs_b, mask=offs_b < n_bytes, other=0).to(tl.int32)

    row_mask = row_start < n_bytes
    scale = _decode_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                           row_start // HALF_QBLOCK, row_mask, NESTED, NESTED_QBLOCK)
    w_hi = tl.load(code_ptr + (byte >> 4)) * scale[:, None]  # elements 2j
    w_lo = tl.load(code_ptr + (byte & 0xF)) * scale[:, None]  # elements 2j + 1
    w = tl.interleave(w_hi, w_lo)  # (ROWS, 2 * COLS), row-major = element order

    offs_e = 2 * row_start[:, None] + tl.arange(0, 2 * COLS)[None, :]
    tl.store(out_ptr + offs_e, w.to(out_ptr.dtype.element_ty), mask=offs_e < numel)


def _check_state(packed: torch.Tensor, state: QuantState) -> None:
    """ValueError unless ``packed``/``state`` are consistent (``functional.check_state``) and
    on a device the kernels can run on."""
    check_state(packed, state)
    if not interpreting() and not packed.is_cuda:
        raise ValueError("the Triton 4-bit kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def kernel_state_args(state: QuantState, device) -> tuple:
    """(absmax, code, nested_absmax, nested_code, nested_offset, NESTED, NESTED_QBLOCK) for a launch.

    Without double quantization the nested pointers are dummies (never read).
    """
    code = state.code.to(device=device, dtype=torch.float32).contiguous()
    if state.nested is None:
        absmax = state.absmax.to(device=device, dtype=torch.float32).contiguous()
        return absmax, code, absmax, code, 0.0, False, 1
    nested = state.nested
    absmax = state.absmax.to(device).contiguous()
    nested_absmax = nested.absmax.to(device=device, dtype=torch.float32).contiguous()
    nested_code = nested.code.to(device=device, dtype=torch.float32).contiguous()
    return (absmax, code, nested_absmax, nested_code, float(nested.offset), True,
            int(nested.blocksize))


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState,
                           dtype: torch.dtype | None = torch.float16, *,
                           block_bytes: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Dequantize ``packed`` (uint8, ceil(numel / 2) bytes) to a ``state.shape`` tensor of ``dtype``.

    ``dtype``: fp32, fp16 or bf16; None means ``state.dtype``. Bit-identical to
    ``quant.functional.dequantize_4bit`` (bf16 on a GPU; the interpreter truncates bf16 stores).
    ``block_bytes`` / ``num_warps``: launch overrides for the benchmark's sweep (a power of two
    >= 32 bytes a program).
    """
    dtype = state.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_state(packed, state)
    packed = packed.reshape(-1).contiguous()
    numel = state.numel
    out = torch.empty(tuple(state.shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    n_bytes = (numel + 1) // 2
    absmax, code, nested_absmax, nested_code, offset, nested, nested_qblock = kernel_state_args(
        state, packed.device)
    qblock = int(state.blocksize)
    block_bytes = block_bytes or BLOCK_BYTES
    cols = min(qblock // 2, block_bytes)
    grid = (triton.cdiv(n_bytes, block_bytes),)
    _dequant_4bit_kernel[grid](
        packed, absmax, code, nested_absmax, nested_code, out,
        numel, n_bytes,
        offset,
        QBLOCK=qblock, NESTED=nested, NESTED_QBLOCK=nested_qblock,
        BLOCK_BYTES=block_bytes, COLS=cols,
        num_warps=num_warps or NUM_WARPS,
        enable_fp_fusion=False,  # scale = ncode * nabsmax + offset, rounded twice like the reference
    )
    return out
