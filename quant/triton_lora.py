"""The LoRA products of half-precision activations with fp32 adapter weights, in Triton: the
GPU twin of ``csrc/lora_mixed.c`` (spec: the PyTorch functions of ``quant/lora_mixed.py``).

    down(x, W)          x W^T                   (M, r) fp32     x (M, n) bf16/fp16, W (r, n) fp32
    up(y, u, V, s)      round(y + s u V)        (M, n) y's      u (M, r) fp32, V (r, n) fp32
    tgrad(u, x, s)      s u^T x                 (r, n) fp32

The spec casts first (``x.to(fp32)``, ``y.to(fp32)``: a full fp32 copy of the activation, or
of the output and gradient, for every product, as PEFT does) and takes 2-3 launches a product;
each kernel here reads the half-precision tensor in place, converts in registers and runs one
launch. Products are true fp32 (``input_precision="ieee"``, no TF32), as the spec computes
with PyTorch's default ``allow_tf32=False``; ``up`` rounds once to y's dtype. Every operand
may be strided (``B^T`` is passed as a view). The launchers take CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BM, BN = 32, 64  # rows and columns of a tile (dots need >= 16 each way)
BM_DOWN = 16  # down's row tile: M / 16 programs (128 at 2048 tokens), each over all of K


def _rank_chunk(R: int) -> int:
    """The adapter-rank chunk of a dot: 16 for r <= 16 (no wasted half), else 32."""
    return 16 if R <= 16 else 32


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@triton.jit
def _down_kernel(x_ptr, w_ptr, o_ptr, M, N, R, sxm, sxn, swr, swn, som, sor,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (m tile, r chunk): o[m, r] = sum_k x[m, k] W[r, k]."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k_start in range(0, N, BLOCK_K):
        k = k_start + k0
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * sxm + k[None, :] * sxn,
                    mask=(m[:, None] < M) & (k[None, :] < N), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k[:, None] * swn + r[None, :] * swr, mask=(k[:, None] < N) & (r[None, :] < R), other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    tl.store(o_ptr + m[:, None].to(tl.int64) * som + r[None, :] * sor, acc, mask=(m[:, None] < M) & (r[None, :] < R))


@triton.jit
def _up_kernel(y_ptr, u_ptr, v_ptr, o_ptr, M, N, R, s, sym, syn, sum_, sur, svr, svn, som, son,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (m tile, n tile): o = round(y + s * sum_r u[m, r] V[r, n])."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r0 = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r_start in range(0, R, BLOCK_R):
        r = r_start + r0
        u = tl.load(u_ptr + m[:, None].to(tl.int64) * sum_ + r[None, :] * sur,
                    mask=(m[:, None] < M) & (r[None, :] < R), other=0.0)
        v = tl.load(v_ptr + r[:, None] * svr + n[None, :] * svn, mask=(r[:, None] < R) & (n[None, :] < N), other=0.0)
        acc += tl.dot(u, v, input_precision="ieee")
    mask = (m[:, None] < M) & (n[None, :] < N)
    y = tl.load(y_ptr + m[:, None].to(tl.int64) * sym + n[None, :] * syn, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + m[:, None].to(tl.int64) * som + n[None, :] * son, (y + s * acc).to(o_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _tgrad_kernel(u_ptr, x_ptr, o_ptr, M, N, R, s, sum_, sur, sxm, sxn, sos, sor, son, rows_per_split,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (n tile, r chunk, split p): o[p, r, n] = s * sum over its rows m of u[m, r] x[m, n]
    (rows [p * rows_per_split, ...), rows_per_split a multiple of BLOCK_M)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    m0 = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for m_start in range(m_lo, m_hi, BLOCK_M):
        m = m_start + m0
        ut = tl.load(u_ptr + r[:, None] * sur + m[None, :].to(tl.int64) * sum_,
                     mask=(r[:, None] < R) & (m[None, :] < m_hi), other=0.0)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * sxm + n[None, :] * sxn,
                    mask=(m[:, None] < m_hi) & (n[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.dot(ut, x, input_precision="ieee")
    tl.store(o_ptr + split.to(tl.int64) * sos + r[:, None] * sor + n[None, :] * son, acc * s,
             mask=(r[:, None] < R) & (n[None, :] < N))


def down(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x W^T in fp32 (M, r), for x (M, n) half precision and W (r, n) fp32."""
    M, N = x.shape
    R = W.shape[0]
    out = torch.empty(M, R, dtype=torch.float32, device=x.device)
    br = _rank_chunk(R)
    if out.numel():
        _down_kernel[(triton.cdiv(M, BM_DOWN), triton.cdiv(R, br))](
            x, W, out, M, N, R, x.stride(0), x.stride(1), W.stride(0), W.stride(1), out.stride(0), out.stride(1),
            BLOCK_M=BM_DOWN, BLOCK_K=BN, BLOCK_R=br, num_warps=4)
    return out


def up(y: torch.Tensor, u: torch.Tensor, V: torch.Tensor, s: float) -> torch.Tensor:
    """y + s u V in y's dtype (summed in fp32), for y (M, n), u (M, r) and V (r, n) fp32."""
    M, N = y.shape
    R = V.shape[0]
    out = torch.empty(M, N, dtype=y.dtype, device=y.device)
    if out.numel():
        _up_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            y, u, V, out, M, N, R, float(s), y.stride(0), y.stride(1), u.stride(0), u.stride(1),
            V.stride(0), V.stride(1), out.stride(0), out.stride(1), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=_rank_chunk(R),
            num_warps=4)
    return out


def tgrad(u: torch.Tensor, x: torch.Tensor, s: float, transpose: bool = False, splits: int | None = None) -> torch.Tensor:
    """s u^T x in fp32 (r, n), for u (M, r) fp32 and x (M, n) half precision; with
    ``transpose`` its transpose (n, r), contiguous, written as such (no copy).

    The (n tile, r chunk) programs are few for small n (32 at n = 2048), so the rows are split
    into ``splits`` parts (default: enough for two programs an SM, each part at least 4 row
    tiles) summed in fp32 partials, then added in a fixed order (deterministic)."""
    M, R = u.shape
    N = x.shape[1]
    out = torch.empty(N, R, dtype=torch.float32, device=x.device).t() if transpose else \
        torch.empty(R, N, dtype=torch.float32, device=x.device)
    if M == 0 or out.numel() == 0:
        out.zero_()
        return out.t() if transpose else out
    br = _rank_chunk(R)
    tiles = triton.cdiv(N, BN) * triton.cdiv(R, br)
    if splits is None:
        splits = min(triton.cdiv(2 * _sm_count(x.device), tiles), max(1, M // (4 * BM)))
    rows = triton.cdiv(triton.cdiv(M, max(1, splits)), BM) * BM
    splits = triton.cdiv(M, rows)
    part = out[None] if splits == 1 else torch.empty(splits, R, N, dtype=torch.float32, device=x.device)
    _tgrad_kernel[(triton.cdiv(N, BN), triton.cdiv(R, br), splits)](
        u, x, part, M, N, R, float(s), u.stride(0), u.stride(1), x.stride(0), x.stride(1),
        part.stride(0), part.stride(1), part.stride(2), rows, BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=br, num_warps=4)
    if splits > 1:
        torch.sum(part, 0, out=out)
    return out.t() if transpose else out
