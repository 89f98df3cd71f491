"""The 4-bit linear: y = x W^T (+ b) with W frozen in NF4 / FP4.

``matmul_4bit_reference`` is the readable twin (dequantize, then matmul) that the C and
Triton kernels are tested against; ``MatMul4bit`` is the autograd Function. The kernels are
reached through ``quant.dispatch``, the one place that picks a backend.
"""
from __future__ import annotations

import torch

from leantune.quant import dispatch
from leantune.quant import functional as F
from leantune.quant.state import QuantState


def matmul_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                          transpose: bool = False) -> torch.Tensor:
    """``x @ W^T`` (x (..., in) -> (..., out)), or ``x @ W`` when ``transpose`` (x (..., out) -> (..., in)).

    W = dequantize_4bit(packed, state) is [out, in], dequantized in x's dtype.
    """
    if len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    w = F.dequantize_4bit(packed, state, x.dtype)  # (out, in)
    red = w.shape[0] if transpose else w.shape[1]
    if x.shape[-1] != red:
        raise ValueError(f"x has {x.shape[-1]} features, the {'transposed ' if transpose else ''}"
                         f"4-bit weight {list(w.shape)} needs {red}")
    return x @ w if transpose else x @ w.t()


class MatMul4bit(torch.autograd.Function):
    """y = x W^T + b, W = dequant(packed, state) [out, in] frozen (no gradient).

    Forward::

        y = x @ W^T + b                       x (..., in) -> y (..., out)

    Backward, with G = dL/dy (..., out)::

        dL/dx = G @ W                         (the transposed 4-bit matmul)
        dL/db = sum of G over all leading dimensions
        dL/dW  not computed: W is a frozen buffer

    dL/dx needs only W, never x, so nothing of x is saved; neither is any dequantized weight:
    the context holds the packed codes and the state (references to the module's buffers)
    and W is decoded again, tile by tile in the fused kernels, in the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        # y = x @ W^T
        y = dispatch.matmul_4bit(x, packed, state)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(packed)
        ctx.state = state
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # dX = dY @ W
            grad_x = dispatch.matmul_4bit(grad_y, packed, ctx.state, transpose=True)
        if ctx.needs_input_grad[3]:
            # db = sum over leading dims of dY
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``x @ W^T + bias`` with the 4-bit W (gradients for x and bias only)."""
    return MatMul4bit.apply(x, packed, state, bias)
