"""DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353), as PEFT 0.21 computes it.

    W' = m * (W + s B A) / ||W + s B A||_row       m = lora_magnitude_vector [out]
    y  = base(x) + (m/n - 1) (W x) + (m/n) s B A x,  n = ||W + s B A||_row, detached

n is treated as a constant (paper section 4.3; PEFT detaches it). It is computed without a
full-size weight copy: the row norms of the frozen W are cached, and each step adds only
low-rank terms (:func:`weight_norm`). With dropout in training, W x uses the dropped x as in
PEFT.

Several active adapters: PEFT applies them in turn, and DoRA's ``W x`` is the output so far
(minus the bias), so a DoRA adapter after another adapter rescales that one's update too:

    y_k = y_{k-1} + (m/n - 1) (y_{k-1} - b) + (m/n) s B A x     (no dropout / eval)

Merging uses the same order: W_k = (m/n) (W_{k-1} + s B A), with n from the unmerged base
(``w0``), and the norm kept for unmerge; so merged and unmerged outputs agree.

The variant owns its state: ``layer.lora_magnitude_vector`` (the parameters, saved under
PEFT's key), ``layer.variant_state[name]["merge_norm"]``, and the cached row norms of W in
``layer.variant_cache``. Saved as PEFT's LoRA with ``use_dora = true``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.peft_core.lora import LoraVariant, register_variant
from leantune.quant import dispatch


def row_sq_norm(layer) -> torch.Tensor:
    """||W_i||^2 per output row (fp32 [out]), cached while the frozen base is unchanged."""
    w = layer.base.weight
    key = (w.data_ptr(), w._version, w.device, w.dtype)
    cached = layer.variant_cache.get("dora.row_sq_norm")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            if layer.is_4bit:
                sq = layer.base.dequantize(torch.float32).pow(2).sum(1)
            else:
                sq = torch.cat([c.float().pow(2).sum(1) for c in w.detach().split(1024)])
        cached = layer.variant_cache["dora.row_sq_norm"] = (key, sq)
    return cached[1]


def weight_norm(layer, name: str, wa: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A||_row (fp32 [out]) without forming W + s B A.

        ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <W_i, (BA)_i> + s^2 ||(BA)_i||^2
        <W_i, (BA)_i>        = rowsum((W A^T) * B)          W A^T is [out, r]
        ||(BA)_i||^2         = rowsum((B (A A^T)) * B)      A A^T is [r, r]

    ``wa``: W A^T (fp32 [out, r]) when the caller already has it.
    """
    spec = layer.adapters[name]
    A, B, s = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float(), spec.scaling
    if wa is not None:
        pass
    elif layer.is_4bit:
        cdt = layer.base.compute_dtype or torch.float32
        wa = dispatch.matmul_4bit(A.to(cdt), layer.base.weight, layer.base.quant_state).float().t()  # (out, r)
    else:
        wa = F.linear(A.to(layer.base.weight.dtype), layer.base.weight).float().t()  # W A^T  (out, r)
    cross = (wa * B).sum(1)
    ba_sq = ((B @ (A @ A.t())) * B).sum(1)
    return (row_sq_norm(layer) + 2 * s * cross + (s * s) * ba_sq).clamp_min(0).sqrt()


@register_variant("dora")
class DoraVariant(LoraVariant):
    fused_4bit = False
    linear = False
    peft_flags = {"use_dora": True}
    aliases = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}

    def init(self, layer, name):
        if not hasattr(layer, "lora_magnitude_vector"):
            layer.lora_magnitude_vector = nn.ParameterDict()
        with torch.no_grad():
            m = weight_norm(layer, name)
        layer.lora_magnitude_vector[name] = nn.Parameter(m.to(layer.lora_A[name].weight.dtype))

    def forward(self, layer, name, x):
        """The single-adapter path, with as few full-size passes as the formula allows:

            h = W x_d + s (x_d A^T) B^T            (one addmm)
            y = b + (m/n) h                        (no dropout: one addcmul)
            y = W x + b + (m/n) h - W x_d          (dropout in training, as PEFT)

        On a 4-bit base, x W^T, x_d W^T and W A^T (for the norm) come from one pass over the
        packed W: [X; X_d; A] W^T, A's rows detached (the norm is a constant).
        """
        spec = layer.adapters[name]
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in)  # (M, in)
        M, dropout = x2.shape[0], layer.lora_dropout[name]
        drop = layer.training and not isinstance(dropout, nn.Identity)
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        ldt = A.dtype  # the adapter path in the adapter's dtype (fp32 on a bf16 base), as PEFT
        xd2 = dropout(x2) if drop else x2
        wa = None
        if layer.is_4bit:
            ext = layer.base_matmul(torch.cat([x2] + ([xd2] if drop else []) + [A.detach().to(x.dtype)]))
            wx, wa = ext[:M], ext[ext.shape[0] - A.shape[0]:].detach().float().t()  # W A^T  (out, r)
            wxd = ext[M:2 * M] if drop else wx
        else:
            wx = layer.base_matmul(x2)  # (M, out)
            wxd = layer.base_matmul(xd2) if drop else wx
        with torch.no_grad():
            norm = weight_norm(layer, name, wa)  # (out,) fp32, a constant
        scale = (layer.lora_magnitude_vector[name] / norm).to(ldt)  # m / n   (out,)
        wx, wxd = wx.to(ldt), wxd.to(ldt)
        # h = W x_d + s * (x_d A^T) B^T
        h = torch.addmm(wxd, F.linear(xd2.to(ldt), A), B.t(), alpha=spec.scaling)
        bias = layer.base.bias
        if drop:
            y = wx + scale * h - wxd
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            # y = b + (m/n) * h
            y = h * scale if bias is None else torch.addcmul(bias.to(h.dtype), h, scale)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])

    def delta(self, layer, name, x, result):
        """(m/n - 1) R + (m/n) s B A x_d with R = result - b (the output so far, PEFT's chaining),
        or R = W x_d with dropout in training (as PEFT)."""
        spec = layer.adapters[name]
        dropout = layer.lora_dropout[name]
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        if isinstance(dropout, nn.Identity) or not layer.training:
            wx = result if layer.base.bias is None else result - layer.base.bias.to(result.dtype)
        else:
            x = dropout(x)
            wx = layer.base_matmul(x)  # W x_d, no bias
        x, wx = x.to(A.dtype), wx.to(A.dtype)  # the adapter path in the adapter's dtype, as PEFT
        with torch.no_grad():
            norm = weight_norm(layer, name)
        scale = (layer.lora_magnitude_vector[name] / norm).to(A.dtype)
        return (scale - 1) * wx + scale * (F.linear(F.linear(x, A), B) * spec.scaling)

    def merge(self, layer, name, w, w0):
        """W' = (m/n) (w + s B A), n = ||w0 + s B A||_row from the unmerged base (as PEFT)."""
        dw = layer.delta_weight(name)
        norm = torch.linalg.norm(w0 + dw, dim=1)
        layer.variant_state[name]["merge_norm"] = norm  # unmerge needs the same n
        return (layer.lora_magnitude_vector[name].float() / norm)[:, None] * (w + dw)

    def unmerge(self, layer, name, w):
        norm = layer.variant_state[name]["merge_norm"]
        return w / (layer.lora_magnitude_vector[name].float() / norm)[:, None] - layer.delta_weight(name)

    def shapes(self, in_features, out_features, r):
        return {**super().shapes(in_features, out_features, r), "lora_magnitude_vector": (out_features,)}

    def tensors(self, layer, name):
        return {**super().tensors(layer, name), "lora_magnitude_vector": layer.lora_magnitude_vector[name]}
