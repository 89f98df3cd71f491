"""RMSNorm, SwiGLU and RoPE as autograd Functions: a PyTorch spec and a fused C kernel on the CPU.

    rms_norm(x, w, eps)   y = w * (x * r),  r = 1 / sqrt(mean(x^2, -1) + eps)   (fp32 math)
    swiglu(g, u)          h = silu(g) * u
    apply_rope(x, c, s)   x * c + rotate_half(x) * s      (rotate_half(x) = cat(-x2, x1))

The spec is the plain PyTorch expression (``rms_norm_reference``, ``swiglu_reference``);
autograd through it takes four to eight passes over memory for each backward. The Functions
here save only what the backward needs (x and r for the norm; g and u for SwiGLU, never
silu(g)) and run one kernel each way: for fp32 or bf16 tensors on the CPU the kernels of
``csrc/rowops.c``, for fp32 / fp16 / bf16 CUDA tensors those of ``quant/triton_rowops.py``
(fp32 math inside, one rounding per output). Elsewhere (fp16 on the CPU, mixed dtypes,
``LEANTUNE_BACKEND=reference``, no compiler, no Triton) the same Functions compute with
PyTorch ops; the choice is ``quant.dispatch.op_backend``'s. Backward formulas, with g = dL/dy:

    RMSNorm   xh = x * r;   dx = r * (g*w - xh * mean(g*w*xh, -1));   dw = sum_rows(g * xh)
    SwiGLU    s = sigmoid(g);   dg = dh * u * s * (1 + g * (1 - s));   du = dh * g * s
    RoPE      dx = g * c + rotate_half^T(g * s)   (rotate_half^T(y) = cat(y2, -y1))

The kernels sum in another order than PyTorch (the C norm's sum of squares in double), so
they agree with the spec to ~1e-7 relative in fp32, not bit for bit; ``tests/test_rowops.py``
and ``tests/test_triton_rowops.py`` check every path against float64.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from leantune.quant import hostpool
from leantune.quant.cpu_kernels import _Loader
from leantune.quant.dispatch import op_backend, triton_kernels

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "rowops.c"
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_LOADER = _Loader(SOURCE, {
    "lt_rmsnorm_fwd_f32": (None, [_P, _P, _P, _P, _I64, _I64, _F, _INT]),
    "lt_rmsnorm_bwd_f32": (None, [_P, _P, _P, _P, _P, _I64, _I64, _INT]),
    "lt_swiglu_fwd_f32": (None, [_P, _P, _P, _I64, _INT]),
    "lt_swiglu_bwd_f32": (None, [_P, _P, _P, _P, _P, _I64, _INT]),
    "lt_rope_f32": (None, [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT]),
    "lt_xent_rows_f32": (None, [_P, _P, _P, _P, _I64, _I64, _INT]),
    "lt_rmsnorm_fwd_bf16": (None, [_P, _P, _P, _P, _I64, _I64, _F, _INT]),
    "lt_rmsnorm_bwd_bf16": (None, [_P, _P, _P, _P, _P, _I64, _I64, _INT]),
    "lt_swiglu_fwd_bf16": (None, [_P, _P, _P, _I64, _INT]),
    "lt_swiglu_bwd_bf16": (None, [_P, _P, _P, _P, _P, _I64, _INT]),
    "lt_rope_bf16": (None, [_P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _INT]),
    "lt_xent_rows_bf16": (None, [_P, _P, _P, _P, _I64, _I64, _INT]),
}, what="C row kernels")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _c_kernel(name: str, *tensors):
    """The C kernel ``lt_{name}_f32`` (every tensor fp32) or ``lt_{name}_bf16`` (every tensor
    bf16) when all are on the CPU and the library builds (and ``LEANTUNE_BACKEND`` does not
    force the reference); else None and the caller runs the PyTorch spec."""
    suffix = _SUFFIX.get(tensors[0].dtype)
    if suffix is None or not all(t.dtype == tensors[0].dtype and t.device.type == "cpu" for t in tensors):
        return None
    if op_backend(tensors[0], cpu=_LOADER.get() is not None) != "cpu":
        return None
    return getattr(_LOADER.get(), f"lt_{name}_{suffix}")


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_ops(*tensors):
    """``quant.triton_rowops`` when every tensor is on one device with one fp32 / fp16 / bf16
    dtype and ``dispatch.triton_kernels`` picks Triton (CUDA by default); else None."""
    t0 = tensors[0]
    if t0.dtype not in _TRITON_DTYPES or not all(t.dtype == t0.dtype and t.device == t0.device for t in tensors):
        return None
    return triton_kernels("triton_rowops", t0, cpu=_LOADER.get() is not None)


def _threads() -> int:
    return max(1, torch.get_num_threads())


# -- RMSNorm -------------------------------------------------------------------------------
def rms_norm_reference(x, weight, eps: float):
    """The spec: y = w * (x / sqrt(mean(x^2) + eps)), in fp32, cast back before the scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x * r); saves x and r (one float a row), never y or the normalised x."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)
        tri = _triton_ops(x2, weight)
        kernel = _c_kernel("rmsnorm_fwd", x2, weight) if tri is None else None
        if tri is not None:
            y, rstd = tri.rmsnorm_fwd(x2, weight, eps)
        elif kernel is not None:
            x2, w = x2.contiguous(), weight.contiguous()
            y = hostpool.empty_like(x2)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32)
            kernel(x2.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                             x2.shape[0], C, eps, _threads())
        else:
            rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + eps)  # (rows,) fp32
            y = weight * (x2.float() * rstd[:, None]).to(x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        C = x2.shape[-1]
        dy2 = dy.reshape(-1, C)
        dx = dw = None
        tri = _triton_ops(x2, weight, dy2)
        if tri is not None:  # both gradients from one launch
            dx, dw = tri.rmsnorm_bwd(x2, weight, rstd, dy2, *ctx.needs_input_grad[:2])
            return (None if dx is None else dx.reshape(dy.shape)), dw, None
        if ctx.needs_input_grad[0]:
            kernel = _c_kernel("rmsnorm_bwd", x2, weight, dy2)
            if kernel is not None:
                dy2 = dy2.contiguous()
                dx = hostpool.empty_like(x2)
                kernel(x2.data_ptr(), weight.contiguous().data_ptr(), rstd.data_ptr(),
                                                 dy2.data_ptr(), dx.data_ptr(), x2.shape[0], C, _threads())
            else:
                xh = x2.float() * rstd[:, None]
                gw = dy2.float() * weight.float()
                dx = (rstd[:, None] * (gw - xh * (gw * xh).mean(-1, keepdim=True))).to(x2.dtype)
            dx = dx.reshape(dy.shape)
        if ctx.needs_input_grad[1]:
            xh = (x2.float() * rstd[:, None]).to(x2.dtype)
            dw = (dy2 * xh).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x, weight, eps: float):
    """RMSNorm of x's last dimension through ``RMSNormFunction`` (under no_grad it saves
    nothing: autograd keeps no graph)."""
    return RMSNormFunction.apply(x, weight, eps)


# -- SwiGLU --------------------------------------------------------------------------------
def swiglu_reference(g, u):
    """The spec: silu(g) * u."""
    return F.silu(g) * u


def swiglu_forward(g, u):
    """silu(g) * u without autograd (also the recompute of the MLP's saved activation)."""
    if g.shape != u.shape:
        return F.silu(g) * u
    tri = _triton_ops(g, u)
    if tri is not None:
        return tri.swiglu_fwd(g, u)
    kernel = _c_kernel("swiglu_fwd", g, u)
    if kernel is not None:
        g, u = g.contiguous(), u.contiguous()
        h = hostpool.empty_like(g)
        kernel(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel(), _threads())
        return h
    return F.silu(g) * u


class SwiGLU(torch.autograd.Function):
    """silu(g) * u, saving only g and u: silu(g) is recomputed in the backward instead of
    being kept (one (B, T, intermediate) tensor less per layer)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        same = g.shape == u.shape == dy.shape
        tri = _triton_ops(g, u, dy) if same else None
        if tri is not None:
            return tri.swiglu_bwd(g, u, dy)
        kernel = _c_kernel("swiglu_bwd", g, u, dy) if same else None
        if kernel is not None:
            g, u, dy = g.contiguous(), u.contiguous(), dy.contiguous()
            dg, du = hostpool.empty_like(g), hostpool.empty_like(u)
            kernel(g.data_ptr(), u.data_ptr(), dy.data_ptr(), dg.data_ptr(),
                                            du.data_ptr(), g.numel(), _threads())
            return dg, du
        g32 = g.to(torch.promote_types(g.dtype, torch.float32))  # half precisions in fp32
        sig = torch.sigmoid(g32)
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        dg = dy * u * (sig * (1 + g32 * (1 - sig))).to(g.dtype)
        du = dy * (g32 * sig).to(g.dtype)
        return dg, du


# -- RoPE ----------------------------------------------------------------------------------
def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x, cos, sin):
    """The spec: x * cos + rotate_half(x) * sin."""
    return x * cos + rotate_half(x) * sin


def _rope_kernel(x, cos, sin, backward: bool):
    """The kernel on x (B, H, T, D), strided over B, H, T; out is contiguous (B, H, T, D):
    Triton's on CUDA, else the C one."""
    tri = _triton_ops(x, cos, sin)
    if tri is not None:
        return tri.rope(x, cos, sin, backward)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    out = hostpool.empty((B, H, T, D), x.dtype)
    _c_kernel("rope", x, cos, sin)(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), out.data_ptr(),
                              cos.data_ptr(), sin.data_ptr(), cos.stride(0) if cos.shape[0] > 1 else 0,
                              B, H, T, D, int(backward), _threads())
    return out


class RoPEFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin in one pass; saves only cos and sin (shared by layers)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_kernel(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rope_kernel(g, cos, sin, backward=True), None, None


def apply_rope(x, cos, sin):
    """Rotary embedding of x (B, H, T, D) with cos / sin (B or 1, 1, T, D): the C kernel for
    fp32 or bf16 CPU tensors of those shapes (unit stride over D, tables contiguous over T and D),
    the Triton one for such CUDA tensors (fp16 too), else the spec."""
    if (x.dim() == 4 and cos.dim() == 4 and cos.shape == sin.shape and x.shape[-1] % 2 == 0
            and cos.shape[1] == 1 and cos.shape[2:] == x.shape[2:] and cos.shape[0] in (1, x.shape[0])
            and cos.stride() == sin.stride() and cos.stride(-1) == 1 and cos.stride(2) == x.shape[-1]
            and not (cos.requires_grad or sin.requires_grad)
            and (_triton_ops(x, cos, sin) is not None or _c_kernel("rope", x, cos, sin) is not None)):
        return RoPEFunction.apply(x, cos, sin)
    return rope_reference(x, cos, sin)


# -- cross-entropy rows (the kernel of train/chunked_ce.py) ---------------------------------------
def xent_rows_takes(dtype, device="cpu") -> bool:
    """True when ``xent_rows_`` runs a kernel (C on the CPU, Triton on CUDA) on logits of
    ``dtype`` on ``device``."""
    probe = torch.empty(0, dtype=dtype, device=device)
    if _triton_ops(probe) is not None:
        return True
    return _c_kernel("xent_rows", probe) is not None


def xent_rows_(z, targets):
    """For logits z (n, V) and targets (n,): returns (lse, z_target) in fp32 and overwrites z
    with softmax(z) - onehot(targets), the gradient of each row's loss (fp32 math; bf16 z:
    rounded once); None when no kernel can run (the caller computes it with PyTorch ops).
    The C kernel takes fp32 / bf16 CPU logits and raises IndexError for a target out of
    range; the Triton kernel takes CUDA logits and gives that row a NaN loss instead (no host
    sync; the data loader has checked every token id against the vocabulary)."""
    if not (z.dim() == 2 and z.is_contiguous() and targets.dim() == 1
            and targets.shape[0] == z.shape[0] and z.shape[1] > 0):
        return None
    tri = _triton_ops(z) if targets.device == z.device else None
    if tri is not None:
        return tri.xent_rows_(z, targets)
    if _c_kernel("xent_rows", z) is None:
        return None
    t = targets.to(torch.int64).contiguous()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= z.shape[1]):
        raise IndexError(f"target out of range for {z.shape[1]} classes")
    lse = torch.empty(z.shape[0], dtype=torch.float32)
    zt = torch.empty(z.shape[0], dtype=torch.float32)
    _c_kernel("xent_rows", z)(z.data_ptr(), t.data_ptr(), lse.data_ptr(), zt.data_ptr(),
                                   z.shape[0], z.shape[1], _threads())
    return lse, zt
