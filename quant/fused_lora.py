"""LoRA on a frozen 4-bit base as one autograd Function (the fast-LoRA idea of Unsloth).

    Y = X W^T + b + s (X_d A^T) B^T          W [out, in] frozen in NF4 / FP4
                                             A [r, in], B [out, r], s = alpha / r (or / sqrt(r))
                                             X_d = dropout(X), or X itself without dropout

Autograd on the plain expression keeps X, X_d, X_d A^T and the output of the base matmul
alive and runs three separate backward nodes. Here XA = X_d A^T is computed once in the
forward and saved, with X_d; the base matmul needs nothing saved (its backward uses only W).
The backward, with G = dL/dY (M, out) after flattening the leading dimensions::

    dX   = G W + s (G B) A              (G W: the transposed 4-bit matmul; without dropout
                                         both terms go into one buffer, the second by addmm_)
    dX_d = s (G B) A                    (with dropout: autograd takes it through the mask)
    dA   = s (G B)^T X_d                [r, in]
    dB   = s G^T (X_d A^T) = s G^T XA   [out, r]
    db   = sum of G over rows           (only when the bias trains)

G B (M, r) is computed once and shared by dX and dA. X_d is saved only when A trains
(LoRA-FA freezes A: then only XA is kept). The base matmul goes through
``quant.dispatch.matmul_4bit`` (reference, C or Triton, chosen in one place).

Precision (as PEFT): the LoRA products run in the adapter weights' dtype (fp32 adapters on a
bf16 base: X_d is cast up, XA, G B and the update are fp32); the base product stays in x's
dtype (a bf16 GEMM), its output (plus b) is cast up, the update added, and Y cast back to
x's dtype once. PEFT keeps the adapter path in fp32 the same way; computing it in bf16 put the
logits about 2.5x further from an fp32 model (``tests/test_peer_defects.py``).

``lora_4bit_reference`` is the readable twin: dequantize W and write the formula; the tests
compare the Function (outputs and every gradient) against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leantune.quant import dispatch, lora_mixed
from leantune.quant.functional import dequantize_4bit
from leantune.quant.state import QuantState


def lora_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
                        lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                        x_drop: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b + s (x_d A^T) B^T`` in plain PyTorch (W dequantized in x's dtype, the LoRA
    term in the adapter's dtype, the sum cast back to x's dtype)."""
    w = dequantize_4bit(packed, state, x.dtype)  # (out, in)
    xd = (x if x_drop is None else x_drop).to(lora_A.dtype)
    y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return (y.to(lora_A.dtype) + scaling * F.linear(F.linear(xd, lora_A), lora_B)).to(x.dtype)


class LoRA4bitFunction(torch.autograd.Function):
    """Y = X W^T + b + s (X_d A^T) B^T with W frozen in 4 bits; see the module docstring.

    Arguments: x (..., in); packed, state: the 4-bit W [out, in]; bias [out] or None;
    lora_A [r, in]; lora_B [out, r]; scaling s; x_drop: dropout(x) or None (no dropout).
    x and x_drop share one dtype, lora_A and lora_B another (or the same); returns (..., out)
    in x's dtype, the LoRA products computed in lora_A's.
    """

    @staticmethod
    def forward(ctx, x, packed, state: QuantState, bias, lora_A, lora_B, scaling: float, x_drop=None):
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in)  # (M, in)
        xd2 = x2 if x_drop is None else x_drop.reshape(-1, n_in)
        ldt = lora_A.dtype
        # XA = X_d @ A^T                                    (M, r), in the adapter's dtype
        xa = lora_mixed.down(xd2, lora_A)
        # Y = X @ W^T + b                                   (M, out), the 4-bit matmul in x's dtype
        y = dispatch.matmul_4bit(x2, packed, state)
        if bias is not None:
            y += bias.to(y.dtype)
        # Y += s * XA @ B^T                                 (in the adapter's dtype, then back)
        y = lora_mixed.up(y, xa, lora_B.t(), scaling)
        a_trains = ctx.needs_input_grad[4]
        ctx.save_for_backward(packed, xd2 if a_trains else None, xa, lora_A, lora_B)
        ctx.state, ctx.scaling, ctx.has_drop = state, scaling, x_drop is not None
        ctx.lead, ctx.bias_dtype = lead, None if bias is None else bias.dtype
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        packed, xd2, xa, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (M, out), x's dtype
        xdt = grad_y.dtype  # the LoRA products run in the adapter's dtype (lora_mixed)
        needs_x, needs_b, needs_A, needs_B, needs_xd = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5, 7))
        grad_x = grad_bias = grad_A = grad_B = grad_xd = None
        gb = lora_mixed.down(g, lora_B.t()) if (needs_x or needs_A or needs_xd) else None  # G @ B   (M, r)
        if needs_x:
            # dX = G @ W                                    (the transposed 4-bit matmul)
            grad_x = dispatch.matmul_4bit(g, packed, ctx.state, transpose=True)
            if not ctx.has_drop:
                # dX += s * (G @ B) @ A
                grad_x = lora_mixed.up(grad_x, gb, lora_A, s)
            grad_x = grad_x.reshape(*ctx.lead, grad_x.shape[-1])
        if needs_xd:
            # dX_d = s * (G @ B) @ A
            grad_xd = torch.mm(gb, lora_A).mul_(s).to(xdt).reshape(*ctx.lead, lora_A.shape[1])
        if needs_A:
            # dA = s * (G @ B)^T @ X_d                      (r, in)
            grad_A = lora_mixed.tgrad(gb, xd2, s)
        if needs_B:
            # dB = s * G^T @ XA = s * (XA^T @ G)^T          (out, r); the second form runs
            # 2-90x faster in MKL's sgemm (for out = 576, G^T @ XA took 5.5 ms, this 0.07 ms)
            grad_B = lora_mixed.tgrad(xa, g, s, transpose=True)
        if needs_b:
            # db = sum of G over rows
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, grad_A, grad_B, None, grad_xd


def lora_4bit(x, packed, state, bias, lora_A, lora_B, scaling: float, x_drop=None) -> torch.Tensor:
    """Differentiable fused LoRA on a 4-bit base (gradients for x, x_drop, A, B and bias)."""
    return LoRA4bitFunction.apply(x, packed, state, bias, lora_A, lora_B, scaling, x_drop)
