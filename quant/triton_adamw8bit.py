"""Triton 8-bit AdamW step (the GPU twin of ``train.adamw8bit.adamw8bit_step``).

One launch per parameter tensor. Each program owns ROWS blocks of 256 state values and, for
each element, does exactly what the reference does, op for op in fp32::

    m, v    = code_s[qm] * absmax_m[b],  code_u[qv] * absmax_v[b]          (dequantize)
    m       = m * b1 + g * (1 - b1)
    v       = v * b2 + (1 - b2) * g * g
    p       = p * (1 - lr * wd)
    p       = p - m * (lr / (1 - b1^t)) / (sqrt(v * (1 / (1 - b2^t))) + eps)
    absmax' = max |x| over the block;  q' = #{midpoints < x / max(absmax', 1e-30)}  (for m, v)

so p, the codes and the absmax are bit-identical to the reference in fp32, on CUDA and under
the interpreter. What that takes: every product and sum is rounded on its own (the launch
turns fp contraction off, so no ``a * b + c`` becomes an FMA); the division and the square
root are the IEEE ones (``div_rn``, ``sqrt_rn``; Triton's ``/`` is an approximate divide);
the scalars are the reference's Python floats rounded once to fp32, as PyTorch rounds them;
the nearest code is found by a binary search over the same fp32 midpoints the reference
searches, so a value exactly on a midpoint gets the lower code there too. A bf16/fp16
parameter is rounded to nearest-even, as ``Tensor.copy_`` does (on a GPU; the interpreter
truncates bf16 stores). Outside the contract: non-finite values (a NaN gets code 0 here, 255
from ``searchsorted``; the training loop skips steps with non-finite gradients).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from leantune.quant.triton_dequant import interpreting
from leantune.quant.adamw8bit import _SIGNED, _UNSIGNED, BLOCK, midpoints

ROWS = 4  # state blocks per program: 1024 elements
NUM_WARPS = 4


@triton.jit
def _dequantize(q_ptr, absmax_ptr, code_ptr, offs, mask, blk, blk_mask):
    """code[q] * absmax[block] in fp32 ([ROWS, QBLOCK]); 0 outside the tensor, as the
    reference's zero padding."""
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + blk, mask=blk_mask, other=0.0)
    return tl.where(mask, tl.load(code_ptr + q) * absmax[:, None], 0.0)


@triton.jit
def _quantize(x, q_ptr, absmax_ptr, mid_ptr, offs, mask, blk, blk_mask):
    """Store x's blockwise absmax and, per element, the index of the nearest code:
    ``searchsorted(mid, x / max(absmax, 1e-30))`` with mid the 255 sorted midpoints, found by
    binary search (8 halvings: bit k of the count is set iff mid[count_so_far + 2^k - 1] < x)."""
    absmax = tl.max(tl.abs(x), axis=1)
    scaled = tl.div_rn(x, tl.maximum(absmax, 1e-30)[:, None])
    q = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(7, -1, -1):
        q = tl.where(tl.load(mid_ptr + q + ((1 << k) - 1)) < scaled, q + (1 << k), q)
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + blk, absmax, mask=blk_mask)


@triton.jit
def _adamw8bit_kernel(
    # pointers
    p_ptr, g_ptr, mq_ptr, mabsmax_ptr, vq_ptr, vabsmax_ptr,
    mcode_ptr, vcode_ptr, mmid_ptr, vmid_ptr,
    # dimensions
    numel,
    # scalars (fp32)
    b1, one_minus_b1, b2, one_minus_b2, decay, step_size, inv_bias_correction2, eps,
    # meta-parameters
    QBLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """One AdamW step of ROWS * QBLOCK elements; p, the codes and the absmax in place.

    p_ptr: fp32/fp16/bf16 [numel]; g_ptr: any float [numel]; mq_ptr, vq_ptr: uint8 [numel];
    mabsmax_ptr, vabsmax_ptr: fp32 [ceil(numel / QBLOCK)]; *code_ptr: fp32 [256] (signed
    for m, unsigned for v); *mid_ptr: fp32 [255] midpoints of the codes.
    """
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) state blocks
    offs = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]  # (ROWS, QBLOCK)
    mask = offs < numel
    blk_mask = blk * QBLOCK < numel

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = _dequantize(mq_ptr, mabsmax_ptr, mcode_ptr, offs, mask, blk, blk_mask)
    v = _dequantize(vq_ptr, vabsmax_ptr, vcode_ptr, offs, mask, blk, blk_mask)

    m = m * b1 + g * one_minus_b1
    v = v * b2 + one_minus_b2 * g * g
    p = p * decay
    denom = tl.sqrt_rn(v * inv_bias_correction2) + eps
    p = p - tl.div_rn(m * step_size, denom)

    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    _quantize(m, mq_ptr, mabsmax_ptr, mmid_ptr, offs, mask, blk, blk_mask)
    _quantize(v, vq_ptr, vabsmax_ptr, vmid_ptr, offs, mask, blk, blk_mask)


@functools.cache
def _tables(device: torch.device) -> tuple:
    """(signed code, unsigned code, their midpoints) as fp32 on ``device``."""
    codes = [c.to(device=device, dtype=torch.float32).contiguous() for c in (_SIGNED, _UNSIGNED)]
    return (*codes, *(midpoints(c) for c in codes))


def _check(p, grad, states) -> None:
    """ValueError unless the states are the reference's layout for ``p`` on p's device."""
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"parameter dtype must be float32, float16 or bfloat16, got {p.dtype}")
    if not interpreting() and not p.is_cuda:
        raise ValueError("the Triton 8-bit AdamW needs CUDA tensors (or TRITON_INTERPRET=1)")
    n, n_blocks = p.numel(), triton.cdiv(p.numel(), BLOCK)
    expected = [(torch.uint8, n), (torch.float32, n_blocks)] * 2
    for t, (dtype, size) in zip((grad, *states), [(grad.dtype, n), *expected]):
        if t.dtype != dtype or t.numel() != size or t.device != p.device or not t.is_contiguous():
            raise ValueError(f"expected a contiguous {dtype} tensor of {size} values on {p.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def adamw8bit_step_triton(p, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, *,
                          lr: float, betas: tuple, eps: float, weight_decay: float, step: float) -> None:
    """``train.adamw8bit.adamw8bit_step`` in one launch: same arguments, same in-place updates
    of ``p`` and of the four state tensors, bit for bit (see the module docstring)."""
    grad = grad.contiguous()
    states = (exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax)
    _check(p, grad, states)
    if p.numel() == 0:
        return
    out = p if p.is_contiguous() else p.contiguous()
    b1, b2 = betas
    # the reference's Python scalars, the same expressions (rounded to fp32 at the launch)
    scalars = (b1, 1 - b1, b2, 1 - b2, 1 - lr * weight_decay, lr / (1 - b1 ** step),
               1 / (1 - b2 ** step), eps)
    grid = (triton.cdiv(exp_avg_absmax.numel(), ROWS),)
    _adamw8bit_kernel[grid](
        out, grad, *states, *_tables(p.device),
        p.numel(),
        *map(float, scalars),
        QBLOCK=BLOCK, ROWS=ROWS,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # every product and sum rounded on its own, like the reference
    )
    if out is not p:
        p.copy_(out)
