"""The LoRA products of bf16 activations with fp32 adapter weights, without casting copies.

PEFT runs an fp32 adapter on a bf16 base in fp32: x cast up, ``x A^T`` and ``(x A^T) B^T``
in fp32, the sum cast back. ``quant/fused_lora.py`` needs five such products a linear (two
forward, three backward); written with ``.float()`` / ``.to(bf16)`` each costs full-size
copies of x, y or the gradient. The C kernels of ``csrc/lora_mixed.c`` read the bf16 tensors
in place and convert in registers. Spec (the PyTorch functions below, used where the kernels
do not apply: not bf16 x with fp32 weights on the CPU, ``LEANTUNE_BACKEND=reference``, no C
compiler):

    down(x, W)          x W^T                           (M, r) fp32     x (M, n) bf16, W (r, n)
    up(y, u, V, s)      bf16(y + s u V)                 (M, n) bf16     u (M, r), V (r, n)
    tgrad(u, x, s)      s u^T x                         (r, n) fp32

On CUDA (bf16 or fp16 activations, fp32 adapter weights) the same three products are the
Triton kernels of ``quant/triton_lora.py``: one launch each instead of the spec's cast, GEMM
and cast.

The kernels sum in another order (and scale u before the product in ``up``), so they agree
with the spec to fp32 rounding, one bf16 rounding per output; ``tests/test_lora_mixed.py``
checks them against float64.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from leantune.quant import hostpool
from leantune.quant.cpu_kernels import _Loader
from leantune.quant.dispatch import op_backend, triton_kernels

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "lora_mixed.c"
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_LOADER = _Loader(SOURCE, {
    "lt_lora_down_bf16": (None, [_P, _I64, _I64, _P, _I64, _P, _INT]),
    "lt_lora_up_bf16": (None, [_P, _P, _I64, _I64, _P, _I64, _P, _F, _INT]),
    "lt_lora_tgrad_bf16": (None, [_P, _I64, _I64, _P, _I64, _F, _P, _INT]),
}, what="C LoRA kernels")


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when the kernels run for activations ``x`` and adapter weights ``w``."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and op_backend(x, cpu=_LOADER.get() is not None) == "cpu")


def _triton(x: torch.Tensor, w: torch.Tensor):
    """``quant.triton_lora`` for bf16/fp16 activations ``x`` and fp32 weights ``w`` on one
    device when ``dispatch.triton_kernels`` picks Triton (CUDA by default); else None."""
    if not (x.dtype in (torch.bfloat16, torch.float16) and w.dtype == torch.float32 and x.device == w.device):
        return None
    return triton_kernels("triton_lora", x, cpu=_LOADER.get() is not None)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def down(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x W^T in fp32 (M, r), for x (M, n) and W (r, n)."""
    tri = _triton(x, W)
    if tri is not None:
        return tri.down(x, W)
    if not applies(x, W):
        return x.to(W.dtype) @ W.t()
    x, W = x.contiguous(), W.contiguous()
    out = torch.empty(x.shape[0], W.shape[0], dtype=torch.float32)
    _LOADER.get().lt_lora_down_bf16(x.data_ptr(), x.shape[0], x.shape[1], W.data_ptr(), W.shape[0],
                                    out.data_ptr(), _threads())
    return out


def up(y: torch.Tensor, u: torch.Tensor, V: torch.Tensor, s: float) -> torch.Tensor:
    """y + s u V in y's dtype (summed in V's), for y (M, n), u (M, r) and V (r, n)."""
    tri = _triton(y, V) if u.dtype == torch.float32 else None
    if tri is not None:
        return tri.up(y, u, V, s)
    if not applies(y, V):
        return y.to(V.dtype).addmm_(u, V, alpha=s).to(y.dtype)
    y, u, V = y.contiguous(), u.contiguous().float(), V.contiguous()
    out = hostpool.empty_like(y)
    _LOADER.get().lt_lora_up_bf16(y.data_ptr(), out.data_ptr(), y.shape[0], y.shape[1], u.data_ptr(),
                                  V.shape[0], V.data_ptr(), float(s), _threads())
    return out


def tgrad(u: torch.Tensor, x: torch.Tensor, s: float, transpose: bool = False) -> torch.Tensor:
    """s u^T x in fp32 (r, n), for u (M, r) and x (M, n); with ``transpose`` its transpose
    (n, r), contiguous."""
    tri = _triton(x, u)
    if tri is not None:
        return tri.tgrad(u, x, s, transpose)
    if not applies(x, u):
        out = torch.mm(u.t(), x.to(u.dtype)).mul_(s)
    else:
        u, x = u.contiguous(), x.contiguous()
        out = torch.empty(u.shape[1], x.shape[1], dtype=torch.float32)
        _LOADER.get().lt_lora_tgrad_bf16(u.data_ptr(), u.shape[0], u.shape[1], x.data_ptr(), x.shape[1],
                                         float(s), out.data_ptr(), _threads())
    return out.t().contiguous() if transpose else out
