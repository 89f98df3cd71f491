"""Fused 4-bit dequantize + matmul in Triton: the full-precision W never goes to memory.

W is the [N, K] = [out, in] weight of a linear layer, stored 4-bit (layout: ``quant/state.py``).
Its readable PyTorch twin is ``functional.dequantize_4bit`` followed by a matmul::

    y = x @ dequantize_4bit(packed, state, x.dtype).T    # transpose=False, (..., K) -> (..., N)
    y = x @ dequantize_4bit(packed, state, x.dtype)      # transpose=True,  (..., N) -> (..., K)

``transpose=False`` is a linear layer's forward; ``transpose=True`` its input gradient
(dX = dY @ W). Inside a kernel a tile of packed bytes is loaded, split into nibbles (element
2j is the high nibble), looked up in the 16-entry ``code`` table, scaled by the absmax of
its block (double quantization decoded on the fly) and fed to ``tl.dot`` with an fp32
accumulator. The absmax block of element (n, k) is ``(n * K + k) // blocksize``, so any
blocksize and any K work; when ``K % blocksize == 0`` and a tile's columns sit inside one
block, each tile row loads its scale once.

Three launch paths, picked by shape:

- M == 1, forward (token-by-token decoding): ``_gemv_4bit_kernel``, a GEMV on the CUDA
  cores; each packed byte is read once, each program owns a few rows of W.
- M <= 16: ``_matmul_4bit_kernel`` with one 16-row M tile (grid_m = 1, so each packed byte
  is read once) and narrow, deep N/K tiles tuned for that case.
- otherwise: ``_matmul_4bit_kernel`` autotuned over large tiles (fp32 x: over a few small
  ones, its IEEE dots run on the CUDA cores).

Autotuning is keyed on (next power of two of M, N, K, orientation, blocksize, nesting) and
x's dtype, so a new prompt length does not retune. Under ``TRITON_INTERPRET=1`` it is
bypassed with one small fixed config. Checked without a GPU: every config compiles for
sm_80 and sm_90 (Triton 3.9, ahead of time); speed is the bench's job
(``bench/bench_quant_gpu.py``).
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
import triton.testing

from leantune.quant.state import QuantState
from leantune.quant.triton_dequant import _check_state, _decode_absmax, dequantize_4bit_triton, interpreting, kernel_state_args

SMALL_M = 16  # M at or under this takes the small-M paths

# Above this many rows (fp16/bf16 x; M == 1 decoding always takes the GEMV kernel),
# ``matmul_4bit_triton`` dequantizes W with the Triton dequant kernel into a temporary and calls
# cuBLAS instead of the fused tile kernel. The temporary lives for one call (it is not kept
# between forward and backward). Measured on an H100 (``bench/bench_quant_gpu.py``, the
# "crossover" rows, 2026-11-23, N = K = 4096): the fused tile kernel lost at every M from 16 to
# 4096 (1.1x to 17x slower: it decodes each W tile once per M tile, through code-table
# gathers, with no overlap of decode and tensor-core work), so the default sends every M > 1
# to dequantize + cuBLAS. Override with LEANTUNE_FUSED_MAX_M once the tile kernel improves.
FUSED_MAX_M = int(os.environ.get("LEANTUNE_FUSED_MAX_M", "0"))

# LEANTUNE_TRITON_AUTOTUNE=0: skip autotuning and launch one fixed config a path (the GPU tests
# use it: autotuning every test shape takes minutes and checks speed, not correctness).
AUTOTUNE = os.environ.get("LEANTUNE_TRITON_AUTOTUNE", "1") not in ("", "0")
FIXED_TILE = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
FIXED_SMALL_M = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
FIXED_FP32 = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
FIXED_GEMV = dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=1)

# fp16/bf16 x on a GPU: LEANTUNE_TRITON_LUT=registers looks the 4-bit codes up in registers
# (``nibble_lut_asm``, PTX byte permutes) instead of gathering them from the table in memory.
# Opt-in until it has run on a GPU: written without one (2026-11-23), its PTX checked by an
# emulator and every config compiled for sm_80/sm_90 (Triton 3.6 and 3.9). Compiled for sm_90
# (Triton 3.6, SASS of the K loop, per thread): the GEMV's loop falls from 521 to 338
# instructions (32 weights a thread), the 128x128x64 tile's from 418 to 325 forward and 465
# to 338 transposed; ``bench/bench_quant_gpu.py`` times both lookups.
LUT_IN_REGISTERS = os.environ.get("LEANTUNE_TRITON_LUT", "memory") == "registers"

# One small config for the interpreter (autotuning there would take minutes).
INTERPRET_TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRET_GEMV = dict(BLOCK_N=16, BLOCK_K=64)


# ----------------------------------------------------------------------------------------
# The code-table lookup in registers (GPU, fp16/bf16 x): PTX byte permutes
# ----------------------------------------------------------------------------------------
def nibble_lut_asm(code: torch.Tensor, dtype: torch.dtype) -> str:
    """PTX for ``tl.inline_asm_elementwise(..., pack=4)``: 4 packed bytes -> 8 table values.

    Input ``$4``: 4 bytes b0..b3 (b0 the lowest). Outputs, each two 16-bit values a register
    (the first in the low half): ``$0, $1`` = code[b >> 4] of b0, b1 | b2, b3 (elements 2j);
    ``$2, $3`` = code[b & 15] of the same bytes (elements 2j + 1). The 16 table values, rounded
    to ``dtype`` (fp16 or bf16), sit in the instruction stream as 8 immediates: their low
    bytes (TL0..TL3, entries 4i..4i+3) and high bytes (TH0..TH3).

    ``prmt.b32 d, a, b, c`` builds d's byte k from byte ``c[4k+2:4k]`` of the pair {b, a}
    (a: bytes 0-3); c's nibble k is the 4-bit code n_k of nibble k of the input (low 16 bits:
    b0 lo, b0 hi, b1 lo, b1 hi). A 16-entry lookup is two 8-entry ones (codes & 7, entries
    0-7 and 8-15) and a third permute that takes byte k from the second when bit 3 of n_k
    is set (selector k + 4). With the low and high bytes of the four values looked up, two
    more permutes pair them into 16-bit values: 21 instructions for 8 values, against a
    global-memory gather per value. ``tests/ptx_emulator.py`` runs this text on the CPU.
    """
    vals = code.detach().to(torch.float32).cpu().to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    lo = [int(v) & 0xFF for v in vals]
    hi = [int(v) >> 8 for v in vals]

    def word(b, i):  # bytes 4i..4i+3 of table b as a 32-bit immediate (entry 4i lowest)
        return "0x%08x" % (b[4 * i] | b[4 * i + 1] << 8 | b[4 * i + 2] << 16 | b[4 * i + 3] << 24)

    lines = ["{", ".reg .b32 s, t, a0, a1, l, h;",
             "and.b32 s, $4, 0x77777777;",  # codes & 7: the index inside an 8-entry half
             "shr.b32 t, $4, 1;",
             "and.b32 t, t, 0x44444444;",  # bit 3 of each code, as +4 on the selector k
             "or.b32 t, t, 0x32103210;"]
    for half, (out_hi, out_lo) in enumerate((("$0", "$2"), ("$1", "$3"))):
        if half:
            lines += ["shr.b32 s, s, 16;", "shr.b32 t, t, 16;"]
        lines += [f"prmt.b32 a0, {word(lo, 0)}, {word(lo, 1)}, s;",
                  f"prmt.b32 a1, {word(lo, 2)}, {word(lo, 3)}, s;",
                  "prmt.b32 l, a0, a1, t;",  # low bytes of the 4 values
                  f"prmt.b32 a0, {word(hi, 0)}, {word(hi, 1)}, s;",
                  f"prmt.b32 a1, {word(hi, 2)}, {word(hi, 3)}, s;",
                  "prmt.b32 h, a0, a1, t;",  # their high bytes
                  f"prmt.b32 {out_lo}, l, h, 0x6240;",  # values of n0, n2: the low nibbles
                  f"prmt.b32 {out_hi}, l, h, 0x7351;"]  # values of n1, n3: the high nibbles
    return "\n".join(lines + ["}"])


_LUT_ASM: "weakref.WeakKeyDictionary[torch.Tensor, dict]" = weakref.WeakKeyDictionary()


def _lut_asm(code: torch.Tensor, dtype: torch.dtype) -> str:
    """``nibble_lut_asm`` for this table tensor (a module's ``quant_map``) and dtype, built on
    first use (one device-to-host copy) and again only if the table is written in place."""
    per_table = _LUT_ASM.setdefault(code, {})
    key = (dtype, code._version)
    if key not in per_table:
        per_table[key] = nibble_lut_asm(code, dtype)
    return per_table[key]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _lookup_code(code_ptr, nib):
    """code[nib] for a tensor of 4-bit codes: a gather from the 64-byte table (L1-resident).

    Alternative kept in mind for GPU tuning: ``tl.gather`` on the table broadcast to (R, 16)
    lowers to warp shuffles (2 to 8 a value depending on the layout, from the sm_90 PTX) and
    needs less shared memory in the tile kernel; not measured yet.
    """
    return tl.load(code_ptr + nib)


@triton.jit
def _load_w_pairs(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
    # dimensions
    N, K,
    # values
    nested_offset, offs_n, k0,
    # meta-parameters
    BLOCK_COLS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr, ROW_ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr,
    LUT_ASM: tl.constexpr,
):
    """(w_even, w_odd) = W[offs_n, k0 + 2j], W[offs_n, k0 + 2j + 1], each (R, BLOCK_COLS // 2).

    LUT_ASM "" (fp32, the interpreter): each value is ``code * scale`` in fp32 (the code
    gathered from the table in memory), then cast to W_DTYPE, as the reference computes it.
    Otherwise (W_DTYPE fp16/bf16 on a GPU) the codes are looked up in registers by the PTX of
    ``nibble_lut_asm`` (the table already in W_DTYPE) and scaled in W_DTYPE: a rounding or
    two more than the reference (as bitsandbytes' own GEMV computes), far cheaper.

    K is even, so a byte never straddles rows: its high nibble is column 2j, its low nibble
    column 2j + 1. Each value is ``code * scale`` in fp32, then cast to W_DTYPE (as the
    reference does). The two halves are never interleaved into one tile: callers split the
    other operand the same way (interleaving a dot operand crashes Triton 3.6's compiler, and
    costs register shuffles anyway). ``k0`` is a multiple of BLOCK_COLS.

    - ROW_ALIGNED (K % QBLOCK == 0): a tile row covers NB = max(BLOCK_COLS // QBLOCK, 1)
      whole absmax blocks (or part of one); their scales are decoded once, an (R, NB) tile.
    - otherwise: blocks may cross rows; one scale is decoded per byte (both nibbles of a
      byte share a block since QBLOCK is even).
    Out-of-range rows and columns hold finite values; the caller zeroes the other operand there.
    """
    R: tl.constexpr = offs_n.shape[0]
    HALF_COLS: tl.constexpr = BLOCK_COLS // 2
    offs_n = offs_n.to(tl.int64)
    n_mask = offs_n < N
    half_k = K // 2
    offs_kb = k0 // 2 + tl.arange(0, HALF_COLS)  # byte column inside a row
    offs_b = offs_n[:, None] * half_k + offs_kb[None, :]  # (R, HALF_COLS) byte index
    mask = n_mask[:, None] & (offs_kb < half_k)[None, :]
    byte = tl.load(packed_ptr + offs_b, mask=mask, other=0)
    if LUT_ASM != "":  # (the dtypes spelled out: a constexpr parameter cannot type an asm result)
        if W_DTYPE == tl.bfloat16:
            c_even, c_odd = tl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,r", [byte],
                                                      dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                                      pack=4)
        else:
            c_even, c_odd = tl.inline_asm_elementwise(LUT_ASM, "=r,=r,=r,=r,r", [byte],
                                                      dtype=(tl.float16, tl.float16), is_pure=True,
                                                      pack=4)
        S_DTYPE: tl.constexpr = W_DTYPE  # the product's dtype
    else:
        byte = byte.to(tl.int32)
        c_even = _lookup_code(code_ptr, byte >> 4)
        c_odd = _lookup_code(code_ptr, byte & 0xF)
        S_DTYPE: tl.constexpr = tl.float32
    if ROW_ALIGNED:
        blocks_per_row = K // QBLOCK
        if BLOCK_COLS <= QBLOCK:  # the tile row sits inside one block
            blk = offs_n * blocks_per_row + k0 // QBLOCK  # (R,)
            scale = _decode_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                   nested_offset, blk, n_mask, NESTED, NESTED_QBLOCK).to(S_DTYPE)
            w_even = (c_even * scale[:, None]).to(W_DTYPE)
            w_odd = (c_odd * scale[:, None]).to(W_DTYPE)
        else:  # NB whole blocks a tile row
            NB: tl.constexpr = BLOCK_COLS // QBLOCK
            SUB: tl.constexpr = HALF_COLS // NB
            offs_blk = k0 // QBLOCK + tl.arange(0, NB)  # block column inside a row
            blk = offs_n[:, None] * blocks_per_row + offs_blk[None, :]  # (R, NB)
            blk_mask = n_mask[:, None] & (offs_blk < blocks_per_row)[None, :]
            scale = _decode_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                                   nested_offset, blk, blk_mask, NESTED, NESTED_QBLOCK).to(S_DTYPE)
            w_even = tl.reshape(tl.reshape(c_even, (R, NB, SUB)) * scale[:, :, None],
                                (R, HALF_COLS)).to(W_DTYPE)
            w_odd = tl.reshape(tl.reshape(c_odd, (R, NB, SUB)) * scale[:, :, None],
                               (R, HALF_COLS)).to(W_DTYPE)
    else:
        scale = _decode_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                               offs_b // (QBLOCK // 2), mask, NESTED, NESTED_QBLOCK).to(S_DTYPE)
        w_even = (c_even * scale).to(W_DTYPE)
        w_odd = (c_odd * scale).to(W_DTYPE)
    return w_even, w_odd


@triton.jit
def _load_w_any(
    # pointers
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
    # dimensions
    N, K,
    # values
    nested_offset, offs_n, k0,
    # meta-parameters
    BLOCK_COLS: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr, W_DTYPE: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_COLS], (R, BLOCK_COLS) of W_DTYPE, for any K (odd included).

    A row may start mid-byte, so each element loads its byte, picks its nibble and decodes
    its own scale: the slow general path, taken only when K is odd.
    """
    offs_n = offs_n.to(tl.int64)
    offs_k = k0 + tl.arange(0, BLOCK_COLS)
    idx = offs_n[:, None] * K + offs_k[None, :]  # (R, BLOCK_COLS) flat element index
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
    shift = ((1 - (idx & 1)) * 4).to(tl.int32)  # even element: high nibble
    scale = _decode_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                           idx // QBLOCK, mask, NESTED, NESTED_QBLOCK)
    return (_lookup_code(code_ptr, (byte >> shift) & 0xF) * scale).to(W_DTYPE)


@triton.jit
def _matmul_4bit_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, y_ptr,
    # dimensions
    M, N, K, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_ym, stride_yn,
    # scalars
    nested_offset,
    # meta-parameters
    TRANSPOSE: tl.constexpr, QBLOCK: tl.constexpr, NESTED: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, LUT_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x @ W.T (TRANSPOSE False) or y = x @ W (TRANSPOSE True), W 4-bit [N, K].

    (The forward loads x's tile contiguously and splits it in registers: the strided
    even/odd loads it replaced cannot be pipelined with cp.async; 579 -> 418 instructions in
    the sm_90 loop of a 128x128x64 tile.)

    TRANSPOSE False: x (M, K), y (M, N). TRANSPOSE True: x (M, N), y (M, K).
    In GEMM terms the output is (M, OUT) and the reduction runs over RED:
    BLOCK_N tiles OUT, BLOCK_K tiles RED. x and y are fp32/fp16/bf16 (same dtype);
    the accumulator is fp32. M_BUCKET is only the autotuning key (next power of two of M).

    With K even, W's columns come as (even, odd) halves (``_load_w_pairs``):
    - forward, the columns are the reduction: x's columns are split the same way and
      ``acc += x_even @ w_even.T + x_odd @ w_odd.T``;
    - transposed, the columns are the output: two accumulators, stored to columns 2j and
      2j + 1.
    """
    if TRANSPOSE:
        OUT = K
        RED = N
    else:
        OUT = N
        RED = K
    W_DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    # grouped ordering: GROUP_M row-tiles share their W tiles while they sit in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(OUT, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = (first_pid_m + (pid % num_pid_in_group) % group_size_m).to(tl.int64)
    pid_n = ((pid % num_pid_in_group) // group_size_m).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm

    if EVEN_K and TRANSPOSE:
        HALF_N: tl.constexpr = BLOCK_N // 2
        acc_even = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
        for r0 in range(0, RED, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + offs_r[None, :] * stride_xk,
                        mask=m_mask[:, None] & (offs_r < RED)[None, :], other=0.0)
            # rows of W are the reduction, columns the output: W[r0:, pid_n * BLOCK_N:]
            w_even, w_odd = _load_w_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                          nested_code_ptr, N, K, nested_offset, offs_r,
                                          pid_n * BLOCK_N, BLOCK_N, QBLOCK, NESTED, NESTED_QBLOCK,
                                          ROW_ALIGNED, W_DTYPE, LUT_ASM)  # (BLOCK_K, HALF_N) each
            acc_even = tl.dot(x, w_even, acc_even, input_precision=DOT_PRECISION)
            acc_odd = tl.dot(x, w_odd, acc_odd, input_precision=DOT_PRECISION)
        offs_even = pid_n * BLOCK_N + 2 * tl.arange(0, HALF_N)
        y_rows = y_ptr + offs_m[:, None] * stride_ym
        tl.store(y_rows + offs_even[None, :] * stride_yn, acc_even.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_even < OUT)[None, :])
        tl.store(y_rows + (offs_even + 1)[None, :] * stride_yn, acc_odd.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_even + 1 < OUT)[None, :])
    else:
        offs_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, RED, BLOCK_K):
            if EVEN_K:  # forward, K even: the reduction in (even, odd) halves
                HALF_K: tl.constexpr = BLOCK_K // 2
                # one contiguous (BLOCK_M, BLOCK_K) load (pipelined, vectorised), split in
                # registers into its even and odd columns
                offs_r = r0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + offs_r[None, :] * stride_xk,
                            mask=m_mask[:, None] & (offs_r < RED)[None, :], other=0.0)
                x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF_K, 2)))
                w_even, w_odd = _load_w_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                              nested_code_ptr, N, K, nested_offset, offs_out, r0,
                                              BLOCK_K, QBLOCK, NESTED, NESTED_QBLOCK, ROW_ALIGNED,
                                              W_DTYPE, LUT_ASM)  # (BLOCK_N, HALF_K) each
                acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=DOT_PRECISION)
            else:  # odd K: whole tiles, element by element
                offs_r = r0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + offs_r[None, :] * stride_xk,
                            mask=m_mask[:, None] & (offs_r < RED)[None, :], other=0.0)
                if TRANSPOSE:
                    w = _load_w_any(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                    nested_code_ptr, N, K, nested_offset, offs_r, pid_n * BLOCK_N,
                                    BLOCK_N, QBLOCK, NESTED, NESTED_QBLOCK, W_DTYPE)
                else:
                    w = tl.trans(_load_w_any(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                             nested_code_ptr, N, K, nested_offset, offs_out, r0,
                                             BLOCK_K, QBLOCK, NESTED, NESTED_QBLOCK, W_DTYPE))
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_N) w
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_out[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_out < OUT)[None, :])


@triton.jit
def _gemv_4bit_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, y_ptr,
    # dimensions
    N, K,
    # strides
    stride_xk, stride_yn,
    # scalars
    nested_offset,
    # meta-parameters
    QBLOCK: tl.constexpr, NESTED: tl.constexpr, NESTED_QBLOCK: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr, LUT_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = W @ x for one token: x (K,), y (N,), W 4-bit [N, K].

    Each program owns BLOCK_N rows of W and walks K once, so every packed byte is read once.
    Products are summed in an fp32 (BLOCK_N, BLOCK_K) accumulator and reduced at the end.
    W is fp32 (not rounded to x's dtype first) with LUT_ASM "", else decoded in x's dtype
    in registers (``_load_w_pairs``) and widened to fp32 for the products.
    """
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if LUT_ASM != "":
        W_DTYPE: tl.constexpr = X_DTYPE
    else:
        W_DTYPE: tl.constexpr = tl.float32
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
        if EVEN_K:
            w_even, w_odd = _load_w_pairs(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                          nested_code_ptr, N, K, nested_offset, offs_n, k0,
                                          BLOCK_K, QBLOCK, NESTED, NESTED_QBLOCK, ROW_ALIGNED,
                                          W_DTYPE, LUT_ASM)
            # no dot here, so interleaving is safe, and it was measured faster (H100: 49 us
            # against 75 us for two half-width products with strided x loads, 14336 x 4096)
            w = tl.interleave(w_even, w_odd).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        else:
            w = _load_w_any(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                            N, K, nested_offset, offs_n, k0,
                            BLOCK_K, QBLOCK, NESTED, NESTED_QBLOCK, tl.float32)
        # acc += W[n, k] * x[k]
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    tl.store(y_ptr + offs_n * stride_yn, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


# ----------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------
def _tile_configs() -> list:
    """Large-M tiles: 128x256 / 256x128 for H100 and A100, 128x128 and below for consumer cards.

    Shared-memory-hungry ones are dropped per device by ``_prune_by_smem``.
    """
    families = [  # (BLOCK_M, BLOCK_N, num_warps, [(BLOCK_K, num_stages), ...])
        (128, 256, 8, [(64, 3), (32, 4)]),
        (256, 128, 8, [(64, 3), (32, 4)]),
        (128, 128, 8, [(64, 3), (128, 2)]),
        (128, 128, 4, [(64, 4), (32, 4)]),
        (128, 64, 4, [(64, 4), (32, 4)]),
        (64, 128, 4, [(64, 4), (32, 4)]),
        (64, 64, 4, [(64, 3), (128, 2)]),
        (128, 32, 4, [(64, 4)]),
        (32, 64, 4, [(64, 3)]),
    ]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                          num_warps=warps, num_stages=stages)
            for bm, bn, warps, ks in families for bk, stages in ks]


def _small_m_configs() -> list:
    """M <= 16: one 16-row tile; narrow N tiles keep enough programs busy, deep K tiles feed them."""
    return [triton.Config(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1),
                          num_warps=4, num_stages=stages)
            for bn in (16, 32, 64) for bk in (128, 256) for stages in (2, 3)]


def _fp32_configs() -> list:
    """fp32 x: IEEE fp32 dots run on the CUDA cores, where big tiles only cost compile time."""
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, GROUP_M=8), num_warps=4, num_stages=3)
            for bm, bn in ((16, 64), (32, 64), (64, 64), (64, 128), (128, 64))]


def _gemv_configs() -> list:
    """M == 1: BLOCK_N rows a program, BLOCK_K-wide steps along K (8 to 32 weights a thread)."""
    shapes = [  # (BLOCK_N, BLOCK_K, num_warps)
        (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8),
        (16, 128, 4), (16, 256, 4), (16, 256, 8), (32, 128, 4), (32, 128, 8),
    ]
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)
            for bn, bk, warps in shapes for stages in (1, 3)]


def _prune_by_smem(configs, named_args, **kwargs):
    """Drop configs whose pipelined tiles cannot fit the device's shared memory.

    The estimate is a lower bound (the compiler also stages the code-table gathers), so a
    kept config may still run out; the autotuner then times it as infinitely slow.
    """
    try:
        device = torch.cuda.current_device()
        smem = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
    except Exception:  # no CUDA driver (never autotuned then): keep everything
        return configs
    elem = named_args["x_ptr"].element_size()
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        # stages x (x tile + packed tile) + the dequantized W tile on its way to the dot
        need = c.num_stages * (bm * bk * elem + bn * bk // 2) + bn * bk * elem
        if need <= smem:
            kept.append(c)
    return kept or configs[-1:]


def _bench_or_skip(kernel_call, quantiles):
    """The autotuner's timing, with a config the compiler rejects timed as infinitely slow.

    Triton's autotuner skips configs that run out of resources but lets other compiler errors
    (``RuntimeError: PassManager::run failed``) end the whole call; one bad tile shape on one
    GPU generation must not take the op down with it.
    """
    try:
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    except RuntimeError as exc:
        if "PassManager" not in str(exc):
            raise
        return [float("inf")] * len(quantiles)


_TUNE_KEY = ["M_BUCKET", "N", "K", "TRANSPOSE", "QBLOCK", "NESTED"]
_matmul_4bit_tuned = triton.autotune(
    configs=_tile_configs(), key=_TUNE_KEY, do_bench=_bench_or_skip,
    prune_configs_by={"early_config_prune": _prune_by_smem},
)(_matmul_4bit_kernel)
_matmul_4bit_small_m_tuned = triton.autotune(
    configs=_small_m_configs(), key=_TUNE_KEY, do_bench=_bench_or_skip,
    prune_configs_by={"early_config_prune": _prune_by_smem},
)(_matmul_4bit_kernel)
_matmul_4bit_fp32_tuned = triton.autotune(
    configs=_fp32_configs(), key=_TUNE_KEY, do_bench=_bench_or_skip,
)(_matmul_4bit_kernel)
_gemv_4bit_tuned = triton.autotune(
    configs=_gemv_configs(), key=["N", "K", "QBLOCK", "NESTED"],
    do_bench=_bench_or_skip,
)(_gemv_4bit_kernel)


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------
def _split_launch_options(config: dict) -> tuple[dict, dict]:
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    opts = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
    return meta, opts


def matmul_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                       transpose: bool = False, *, config: dict | None = None,
                       fused: bool | None = None) -> torch.Tensor:
    """x @ W.T (transpose=False) or x @ W (transpose=True) with W [N, K] held in 4 bits.

    x: (..., K) -> (..., N), or with transpose (..., N) -> (..., K); fp32, fp16 or bf16, and the
    output has x's dtype (fp32 accumulation; fp32 inputs use IEEE fp32 dots, not TF32).
    ``config``: fixed meta-parameters (BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M, or BLOCK_N/BLOCK_K for
    the M == 1 path, plus num_warps/num_stages) that bypass autotuning; for tests and benches.
    ``fused``: None picks: the GEMV for a one-row forward, the fused tile kernel up to
    ``FUSED_MAX_M`` rows and for fp32 x (its IEEE dots; not measured against cuBLAS), else
    Triton dequantize + cuBLAS. True or False forces one.
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    _check_state(packed, state)
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {packed.device}")
    N, K = (int(s) for s in state.shape)
    red, out_features = (N, K) if transpose else (K, N)
    if x.shape[-1] != red:
        raise ValueError(f"x has {x.shape[-1]} features, the {'transposed ' if transpose else ''}"
                         f"4-bit weight [{N}, {K}] needs {red}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, red)  # (M, RED), a view when it can be
    M = x2.shape[0]
    y = torch.empty((M, out_features), dtype=x.dtype, device=x.device)
    if M == 0 or out_features == 0:
        return y.reshape(*lead, out_features)
    if red == 0:
        return y.zero_().reshape(*lead, out_features)

    if fused is None:
        fused = (interpreting() or (M == 1 and not transpose) or M <= FUSED_MAX_M
                 or x.dtype == torch.float32 or config is not None)
    if not fused:
        # large M: W decoded once into a temporary, then the vendor GEMM
        w = dequantize_4bit_triton(packed, state, dtype=x.dtype)  # (N, K)
        torch.matmul(x2, w if transpose else w.t(), out=y)
        return y.reshape(*lead, out_features)

    packed = packed.reshape(-1).contiguous()
    absmax, code, nested_absmax, nested_code, offset, nested, nested_qblock = kernel_state_args(
        state, x.device)
    qblock = int(state.blocksize)
    interp = interpreting()
    flags = dict(QBLOCK=qblock, NESTED=nested, NESTED_QBLOCK=nested_qblock,
                 EVEN_K=K % 2 == 0, ROW_ALIGNED=K % qblock == 0,
                 LUT_ASM="" if interp or x.dtype == torch.float32 or not LUT_IN_REGISTERS
                 else _lut_asm(state.code, x.dtype))

    if M == 1 and not transpose:
        if config is None and interp:
            config = INTERPRET_GEMV
        elif config is None and not AUTOTUNE:
            config = FIXED_GEMV
        kernel = _gemv_4bit_kernel if config is not None else _gemv_4bit_tuned
        meta, opts = _split_launch_options(config or {})

        def grid(META):
            return (triton.cdiv(N, META["BLOCK_N"]),)

        kernel[grid](
            x2, packed, absmax, code, nested_absmax, nested_code, y,
            N, K,
            x2.stride(1), y.stride(1),
            offset,
            **flags, **meta, **opts,
        )
        return y.reshape(*lead, out_features)

    if config is None and interp:
        config = INTERPRET_TILE
    elif config is None and not AUTOTUNE:
        config = (FIXED_FP32 if x.dtype == torch.float32
                  else FIXED_SMALL_M if M <= SMALL_M else FIXED_TILE)
    if config is not None:
        kernel = _matmul_4bit_kernel
    elif x.dtype == torch.float32:
        kernel = _matmul_4bit_fp32_tuned
    else:
        kernel = _matmul_4bit_small_m_tuned if M <= SMALL_M else _matmul_4bit_tuned
    meta, opts = _split_launch_options(config or {})

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(out_features, META["BLOCK_N"]),)

    kernel[grid](
        x2, packed, absmax, code, nested_absmax, nested_code, y,
        M, N, K, triton.next_power_of_2(M),
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        offset,
        TRANSPOSE=bool(transpose), **flags,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **meta, **opts,
    )
    return y.reshape(*lead, out_features)
