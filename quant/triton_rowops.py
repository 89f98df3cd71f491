"""RMSNorm, SwiGLU, RoPE and the cross-entropy rows in Triton: the GPU twin of csrc/rowops.c.

On a GPU the PyTorch spec of each op (``quant.rowops``) is a string of small kernels: an
RMSNorm forward is about 7 launches and its backward about 12, a SwiGLU backward about 11, a
RoPE forward or backward 5-6 per tensor. A QLoRA step of a Llama was launch-bound on an H100
(``train/cuda_graphs.py``), so here each op is one launch each way (the norm's backward:
one, plus a sum of per-program weight-gradient rows):

    rms_norm     fwd: y = w * round(x * r), r = 1 / sqrt(mean(x^2) + eps)    saves r (fp32)
                 bwd: dx = r * (g*w - xh * mean(g*w*xh));  dw = sum_rows(g * round(xh))
    swiglu       fwd: h = silu(g) * u        bwd: dg = dh * u * s * (1 + g (1 - s)),  du = dh * g * s
    rope         fwd: x * c + rotate_half(x) * s;  bwd: g * c + rotate_half^T(g * s)
    xent_rows    lse and z[target] per row; z overwritten with softmax(z) - onehot(target)

Math is fp32 inside, one rounding per output (PyTorch's spec rounds after each op in bf16,
so the two agree to an ulp or two, not bit for bit; ``tests/test_triton_rowops.py`` checks
both against float64). The launchers take CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` (the tests: fp32 and fp16 there, since the interpreter truncates
bf16 stores). ``quant.rowops`` calls them through ``quant.dispatch.op_backend``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_COLS = 65536  # one row per program: RMSNorm rows and RoPE half-heads up to this many elements


def _warps(block: int) -> int:
    """Warps for a row of ``block`` elements (Liger-Kernel's rule of thumb)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs for the grid-stride kernels: a few per SM on a GPU, 4 under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# -- RMSNorm -------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / C + eps)
    # the spec casts x * r to x's dtype before the scale: the same rounding here
    xh = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * xh).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, r)


@triton.jit
def _rmsnorm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, stride_x, stride_dy, stride_dx,
                        n_rows, C, rows_per_program, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Rows [p * rows_per_program, ...) of program p; its fp32 sum of dy * xh over them goes to
    row p of dw_ptr (n_programs, C), which the launcher sums."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = start + i
        m = mask & (cols * 0 + row < n_rows)  # the last program's rows past the end: masked out
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))  # past the end: x, dy are 0 there
        xh = x * r
        if NEED_DX:
            gw = dy * w
            dx = r * (gw - xh * (tl.sum(gw * xh, axis=0) / C))
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if NEED_DW:
            dw += dy * xh.to(x_ptr.dtype.element_ty).to(tl.float32)
    if NEED_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * C + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, C) with unit stride over C (a copy only when it has to be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rmsnorm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, rstd) for x2 (rows, C) and weight (C,) of x2's dtype: y in x2's dtype, rstd fp32."""
    x2 = _rows(x2)
    rows, C = x2.shape
    if C > MAX_COLS:
        raise ValueError(f"RMSNorm rows of {C} > {MAX_COLS} elements")
    y = torch.empty((rows, C), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    if rows:
        block = triton.next_power_of_2(C)
        _rmsnorm_fwd_kernel[(rows,)](x2, weight.contiguous(), y, rstd, x2.stride(0), y.stride(0), C, float(eps),
                                     BLOCK_C=block, num_warps=_warps(block))
    return y, rstd


def rmsnorm_bwd(x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy2: torch.Tensor,
                need_dx: bool = True, need_dw: bool = True):
    """(dx, dw) for the saved x2 (rows, C), rstd (rows,) and dy2 (rows, C): dx in x2's dtype,
    dw in weight's dtype (summed in fp32); None for what is not needed."""
    x2, dy2 = _rows(x2), _rows(dy2)
    rows, C = x2.shape
    dx = torch.empty((rows, C), dtype=x2.dtype, device=x2.device) if need_dx else None
    if not (need_dx or need_dw):
        return None, None
    if rows == 0:
        return dx, torch.zeros_like(weight) if need_dw else None
    n_prog = min(rows, _programs(x2.device))
    per = triton.cdiv(rows, n_prog)
    n_prog = triton.cdiv(rows, per)
    dw_part = torch.empty((n_prog, C), dtype=torch.float32, device=x2.device) if need_dw else None
    block = triton.next_power_of_2(C)
    _rmsnorm_bwd_kernel[(n_prog,)](
        x2, weight.contiguous(), rstd, dy2, x2 if dx is None else dx, x2 if dw_part is None else dw_part,
        x2.stride(0), dy2.stride(0), C if dx is None else dx.stride(0), rows, C, per,
        NEED_DX=need_dx, NEED_DW=need_dw, BLOCK_C=block, num_warps=_warps(block))
    return dx, (dw_part.sum(0).to(weight.dtype) if need_dw else None)


# -- SwiGLU --------------------------------------------------------------------------------
ELEMENTS = 1024  # elements a program for the elementwise kernels


@triton.jit
def _silu_parts(g):
    """(s, g * s) for s = sigmoid(g), in fp32."""
    s = 1.0 / (1.0 + tl.exp(-g))
    return s, g * s


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, silu = _silu_parts(g)
    tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, silu = _silu_parts(g)
    tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for g, u of one shape and dtype (contiguous copies where they are not)."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, ELEMENTS),)](g, u, h, n, BLOCK=ELEMENTS, num_warps=4)
    return h


def swiglu_bwd(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor):
    """(dg, du) of silu(g) * u for the upstream gradient dh (all of one shape and dtype)."""
    g, u, dh = g.contiguous(), u.contiguous(), dh.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, ELEMENTS),)](g, u, dh, dg, du, n, BLOCK=ELEMENTS, num_warps=4)
    return dg, du


# -- RoPE ----------------------------------------------------------------------------------
ROPE_TILE = 2048  # elements of a half-head tile a program: 16 a thread with 4 warps, 6 such arrays
@triton.jit
def _rope_kernel(x_ptr, c_ptr, s_ptr, o_ptr, sxb, sxh, sxt, scb, H, T, HALF,
                 BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b * H + h, t block): rows t of head h of batch b. x strided over (b, h, t) with
    unit stride over D; the tables (B or 1, 1, T, D) contiguous over (T, D); out contiguous."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < T) & (d[None, :] < HALF)
    D = 2 * HALF
    xo = b * sxb + h * sxh + t[:, None].to(tl.int64) * sxt + d[None, :]
    co = b * scb + t[:, None].to(tl.int64) * D + d[None, :]
    oo = bh * T * D + t[:, None].to(tl.int64) * D + d[None, :]
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr + co, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + co, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # g * c + rotate_half^T(g * s), rotate_half^T(y) = cat(y2, -y1)
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:  # x * c + rotate_half(x) * s, rotate_half(x) = cat(-x2, x1)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_ptr + oo, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + oo + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """x (B, H, T, D) strided (unit stride over D), cos / sin (B or 1, 1, T, D) contiguous:
    the rotation (or its transpose, ``backward``) as a contiguous (B, H, T, D) tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, H, T, D = x.shape
    out = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(D // 2)
    block_t = max(1, min(triton.next_power_of_2(T), ROPE_TILE // block_d))
    grid = (B * H, triton.cdiv(T, block_t))
    _rope_kernel[grid](x, cos, sin, out, x.stride(0), x.stride(1), x.stride(2),
                       cos.stride(0) if cos.shape[0] > 1 else 0, H, T, D // 2,
                       BACKWARD=backward, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


# -- cross-entropy rows --------------------------------------------------------------------------
XENT_BLOCK = 4096  # logits a loop iteration


@triton.jit
def _xent_rows_kernel(z_ptr, t_ptr, lse_ptr, zt_ptr, V, stride_z, BLOCK_V: tl.constexpr):
    """Row i: lse = logsumexp(z) (online, one pass), zt = z[t]; then z = softmax(z) - onehot(t)."""
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    target = tl.load(t_ptr + row)
    ok = (target >= 0) & (target < V)  # out of range: a NaN loss, never a read outside the row
    zt = tl.load(base + target, mask=ok, other=float("nan")).to(tl.float32)
    m = -float("inf")
    acc = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)
    tl.store(lse_ptr + row, lse)
    tl.store(zt_ptr + row, zt)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        dz = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)


def xent_rows_(z: torch.Tensor, targets: torch.Tensor):
    """(lse, z_target) in fp32 for z (n, V) with unit stride over V and targets (n,) in range
    (the caller checks); z is overwritten with softmax(z) - onehot(targets)."""
    n, V = z.shape
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    zt = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        block = min(XENT_BLOCK, triton.next_power_of_2(V))
        _xent_rows_kernel[(n,)](z, targets.to(torch.int64).contiguous(), lse, zt, V, z.stride(0),
                                BLOCK_V=block, num_warps=_warps(block))
    return lse, zt
