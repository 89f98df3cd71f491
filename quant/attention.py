"""Attention for CPU training: batched GEMMs in the compute dtype, P saved for the backward.

On CPU, ``F.scaled_dot_product_attention`` runs a flash kernel whose backward is slow
(SmolLM2-135M, B=4, T=256: about a quarter of a bf16 training step). For the short rows of
fine-tuning the plain algorithm is faster: two GEMMs forward, four backward, in bf16 or fp32
(oneDNN / MKL), with the softmax rows in between. Measured on a 2-core AMD EPYC (avx512_bf16)
against SDPA at B=4, 9 / 3 heads, T=256, causal: forward + backward 1.85x faster in bf16
(the training step 10% faster), 1.0-1.2x in fp32; the forward alone 1.0-1.2x.

    S = scale * Q K^T + bias             fp32 (Q, K upcast for bf16); bias: 0 or -inf from the mask
    P = softmax(S)                       fp32, stored in the compute dtype
    O = P V

Backward, given dO:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - rowsum(dP * P))       softmax backward; rowsum(dP * P) = rowsum(dO * O)
    dQ = scale * dS K
    dK = scale * dS^T Q

Grouped-query attention without copies of K and V: the ``rep = n_head / n_kv`` query heads
of a kv head are stacked as rows, Q (B, n_kv, T * rep, hd) against K (B, n_kv, S, hd), so
every GEMM is batched over (B, n_kv); dK = dS^T Q and dV = P^T dO then sum over the rep
heads by themselves. The rows are ordered (t, head), so a block of query positions is a
block of rows.

Causal attention (and masks inside the causal triangle: packed documents, preference pairs)
runs in blocks of ``block`` query positions: block [t0, t1) needs keys [0, t1) only, which
skips about half of the GEMM and softmax work; only the diagonal tile is masked.

Fully masked rows (no key allowed) give zero output and zero gradients, as SDPA's CPU kernels
do (``make_attn_mask`` never builds one).

Memory: the backward keeps Q, K, V (once each) and P in the compute dtype, where SDPA keeps
Q, K, V, its output and a logsumexp a row. P is B * n_head * T * S elements, about 5/8 of
that for causal rows at T=256 (the blocks skip the keys after each block): 2.9 MB a layer
in bf16 at B=4, 9 heads, T=256 (SDPA's output: 1.2 MB); 40 MB at T=1024. Measured with
Q, K, V: 4.7 MiB a layer against SDPA's 3.0 at T=256, 46 against 12 at T=1024.
``dispatch.attention_backend`` runs it for bf16 on CPU by default and keeps SDPA for fp32,
decoding (one query), rows of more than ``dispatch.ATTENTION_MAX_KEYS`` keys, and off CPU.

``attention_reference`` is the spec (float math); ``attention`` is the entry point.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from leantune.quant.dispatch import attention_backend

BLOCK = 64  # query positions per block of the causal loop


def attention_reference(q, k, v, mask=None, is_causal: bool = False, scale: float | None = None):
    """softmax(scale * Q K^T + mask) V in float math (float64 stays float64), cast to q's dtype.

    q (B, H, T, D), k / v (B, Hkv, S, D) with H a multiple of Hkv (grouped-query attention);
    ``mask`` boolean (True = may attend) or additive float, broadcastable to (B, H, T, S);
    ``is_causal``: key s is seen by query t when s <= t. Rows with no key allowed give zeros.
    """
    if mask is not None and is_causal:
        raise ValueError("give either mask or is_causal, not both")
    ct = torch.promote_types(q.dtype, torch.float32)
    rep = q.shape[1] // k.shape[1]
    k = k.to(ct).repeat_interleave(rep, dim=1)  # (B, H, S, D)
    v = v.to(ct).repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q.to(ct) @ k.transpose(-2, -1) * scale  # (B, H, T, S)
    T, S = s.shape[-2:]
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        s = s + mask.to(ct)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isneginf(s).all(dim=-1, keepdim=True), 0.0, p)  # fully masked rows
    return (p @ v).to(q.dtype)


_LAST_MASK: list = []  # [(weakref to mask, its _version, T, S, dtype), parts]: every layer shares one mask


def _mask_parts_cached(mask, T: int, S: int, dtype):
    """``_mask_parts`` of ``mask``, computed once while the same mask (unchanged: same tensor,
    same version counter) comes back, as it does for every layer of a forward."""
    key = (mask._version, T, S, dtype)
    if _LAST_MASK and _LAST_MASK[0][0]() is mask and _LAST_MASK[0][1:] == key:
        return _LAST_MASK[1]
    parts = _mask_parts(mask, T, S, dtype)
    _LAST_MASK[:] = [(weakref.ref(mask), *key), parts]
    return parts


def _mask_parts(mask, T: int, S: int, dtype):
    """The mask as (bias, dead, causal): an additive bias (Bm, 1, T, S) of ``dtype`` (the
    scores' dtype; 0 or -inf for a boolean mask), the fully masked rows (Bm, 1, T) or None
    when there are none, and whether every allowed key lies in the causal triangle (then the
    blocks may skip keys)."""
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        blocked = ~mask
    else:
        bias = mask.to(dtype)
        blocked = torch.isneginf(bias)
    bias = bias.expand(bias.shape[0], 1, T, S)
    blocked = blocked.expand(bias.shape)
    dead = blocked.all(dim=-1)  # (Bm, 1, T)
    upper = torch.ones(T, S, dtype=torch.bool, device=mask.device).triu(1)
    causal = T == S and bool((blocked | ~upper).all())
    return bias, (dead if bool(dead.any()) else None), causal


def attention_forward(q, k, v, bias, dead, causal: bool, scale: float, block: int, keep: bool = False):
    """The forward of ``AttentionFunction`` (see there), also run as is without autograd, so
    that a no-grad pass (a DPO reference, an evaluation) gives the training pass's bits.

    Returns the output and, with ``keep``, what the backward needs: (q3, k3, v3, [P_i])."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    wide = torch.promote_types(q.dtype, torch.float32)  # the dtype of S
    # rows ordered (t, head): (B * Hkv, T * rep, D); K, V: (B * Hkv, S, D)
    q3 = q.view(B, Hkv, rep, T, D).transpose(2, 3).reshape(B * Hkv, T * rep, D)
    k3, v3 = k.reshape(B * Hkv, S, D), v.reshape(B * Hkv, S, D)
    qw, kw = q3.to(wide), k3.to(wide)
    bias = None if bias is None else bias.to(wide)
    tri = None
    if causal and bias is None:  # the diagonal tile's mask, rows (t, head): (block * rep, block)
        t = torch.arange(block, device=q.device)
        tri = torch.zeros(block, rep, block, dtype=wide, device=q.device)
        tri.masked_fill_((t[None, :] > t[:, None])[:, None, :], float("-inf"))
    out = q.new_empty(B, T, Hkv, rep, D)
    ps = []
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        c, keys = t1 - t0, (t1 if causal else S)
        # S_i = scale * Q_i K[:keys]^T        (B * Hkv, c * rep, keys)
        s = torch.baddbmm(qw.new_empty(1, 1, 1), qw[:, t0 * rep:t1 * rep], kw[:, :keys].transpose(1, 2),
                          beta=0.0, alpha=scale)
        if bias is not None:  # (B, Hkv, c, rep, keys) + (Bm, 1, c, 1, keys)
            s.view(B, Hkv, c, rep, keys).add_(bias[:, :, t0:t1, None, :keys])
        elif tri is not None:  # keys [t0, t1) of the diagonal tile
            s[:, :, t0:] += tri[:c, :, :c].reshape(c * rep, c)
        p = torch.softmax(s, dim=-1).to(q.dtype)
        if dead is not None:  # rows without keys: NaN from the softmax, zero as in SDPA
            p.view(B, Hkv, c, rep, keys).masked_fill_(dead[:, :, t0:t1, None, None], 0.0)
        # O_i = P_i V[:keys]
        oi = torch.bmm(p, v3[:, :keys])  # (B * Hkv, c * rep, D)
        out[:, t0:t1] = oi.view(B, Hkv, c, rep, D).transpose(1, 2)
        if keep:
            ps.append(p)
    out = out.view(B, T, H, D).transpose(1, 2)
    return out, ((q3, k3, v3, ps) if keep else None)


class AttentionFunction(torch.autograd.Function):
    """softmax(scale * Q K^T + bias) V with P saved; the math is in the module docstring.

    q (B, H, T, D), k / v (B, Hkv, S, D) of one dtype; ``bias`` None or additive (Bm, 1, T, S);
    ``dead`` None or the fully masked rows (Bm, 1, T); ``causal``: key s is seen by query t
    only when s <= t (also set for a bias inside the causal triangle, which then still
    applies); ``block``: query positions per step of the loop. Returns (B, H, T, D) laid out
    as (B, T, H, D): ``transpose(1, 2)`` of it is contiguous, as the o projection wants.

    Precision: the scores S and the softmax are fp32 for bf16 / fp16 inputs (Q and K are
    upcast; S rounded to bf16 would double the error against SDPA); P is stored, and every
    other GEMM runs, in the input dtype; dK and dV accumulate over the blocks in fp32.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, dead, causal: bool, scale: float, block: int):
        out, (q3, k3, v3, ps) = attention_forward(q, k, v, bias, dead, causal, scale, block, keep=True)
        ctx.save_for_backward(q3, k3, v3, *ps)
        ctx.dims = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3])
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        return out

    @staticmethod
    def backward(ctx, do):
        q3, k3, v3, *ps = ctx.saved_tensors
        B, H, Hkv, T, S, D = ctx.dims
        rep, scale, block = H // Hkv, ctx.scale, ctx.block
        wide = torch.promote_types(q3.dtype, torch.float32)
        do3 = do.reshape(B, Hkv, rep, T, D).transpose(2, 3).reshape(B * Hkv, T * rep, D)
        dq = q3.new_empty(B, T, Hkv, rep, D)
        dk = torch.zeros(B * Hkv, S, D, dtype=wide, device=q3.device)
        dv = torch.zeros(B * Hkv, S, D, dtype=wide, device=q3.device)
        for i, t0 in enumerate(range(0, T, block)):
            t1 = min(t0 + block, T)
            c, keys = t1 - t0, (t1 if ctx.causal else S)
            p, qi, doi = ps[i], q3[:, t0 * rep:t1 * rep], do3[:, t0 * rep:t1 * rep]
            # dV[:keys] += P_i^T dO_i
            dv[:, :keys] += torch.bmm(p.transpose(1, 2), doi)
            # dP_i = dO_i V[:keys]^T
            dp = torch.bmm(doi, v3[:, :keys].transpose(1, 2))
            # dS_i = P_i * (dP_i - rowsum(dP_i * P_i))   (softmax's own backward kernel: one pass)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            # dQ_i = scale * dS_i K[:keys]
            dqi = torch.baddbmm(q3.new_empty(1, 1, 1), ds, k3[:, :keys], beta=0.0, alpha=scale)
            dq[:, t0:t1] = dqi.view(B, Hkv, c, rep, D).transpose(1, 2)
            # dK[:keys] += scale * dS_i^T Q_i
            dk[:, :keys] += torch.baddbmm(q3.new_empty(1, 1, 1), ds.transpose(1, 2), qi,
                                          beta=0.0, alpha=scale)
        dq = dq.view(B, T, H, D).transpose(1, 2)
        dk = dk.to(q3.dtype).view(B, Hkv, S, D)
        dv = dv.to(q3.dtype).view(B, Hkv, S, D)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, attn_mask=None, is_causal: bool = False, enable_gqa: bool = False):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., enable_gqa=...)``,
    through ``AttentionFunction`` where ``dispatch.attention_backend`` picks it (by default: CPU,
    bf16, more than one query, up to ``dispatch.ATTENTION_MAX_KEYS`` keys), else SDPA itself. Without autograd
    the same forward runs and keeps nothing: a no-grad pass gives the training pass's bits
    (DPO's reference log-probs equal the policy's at step 0, as with SDPA on both).

    q (B, H, T, D), k / v (B, Hkv, S, D); ``attn_mask`` boolean (True = may attend) or
    additive, (T, S) or (B or 1, 1, T, S).
    """
    if attn_mask is not None and is_causal:
        raise ValueError("give either attn_mask or is_causal, not both")
    if attention_backend(q, k, v, attn_mask, is_causal, enable_gqa) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              enable_gqa=enable_gqa)
    T, S = q.shape[2], k.shape[2]
    bias, dead, causal = None, None, is_causal
    if attn_mask is not None:
        bias, dead, causal = _mask_parts_cached(attn_mask, T, S, torch.promote_types(q.dtype, torch.float32))
    args = (q, k, v, bias, dead, causal, 1.0 / math.sqrt(q.shape[-1]), BLOCK if causal else T)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return AttentionFunction.apply(*args)
    return attention_forward(*args)[0]  # the same bits, nothing kept
