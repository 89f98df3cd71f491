"""Chunked cross-entropy over the language-model head: one op, one file.

Full-vocabulary fp32 logits for every token are the largest activation of a fine-tuning step
(4 x 1024 tokens x 49152 vocab x 4 bytes = 800 MB). This op computes the loss chunk by chunk,
forming each chunk's gradient while its logits exist, so at most ``chunk x vocab`` logits
exist at once and they are computed once; it only ever sees the supervised tokens (masked
prompt tokens cost nothing).

Math, for hidden states H (N, C), head weight W (V, C), targets y (N,):

    Z = H W^T                       (N, V) logits, fp32 (see below)
    loss = sum_i [ logsumexp(Z_i) - Z_i[y_i] ]
    dZ = g * (softmax(Z) - onehot(y))
    dH = dZ W            dW = dZ^T H

Each chunk's per-row work (max, exp, sum, log, softmax - onehot) is one kernel
(``quant.rowops.xent_rows_``: C over L2-resident rows on the CPU, buffers from the host pool;
Triton on CUDA); with bf16 products it reads and writes the bf16 logits in place, fp32 math
inside, so no fp32 copy of them exists. Elsewhere it is the same math in PyTorch ops.

Precision: the products run in H's dtype (fp16/bf16 on tensor cores, as transformers computes
its head before upcasting the logits) and everything per-logit (logsumexp, softmax, dZ) in
fp32; fp32 inputs stay fp32 throughout. Measured on an H100 (Llama-1B shape, 2048 tokens,
vocab 128256): the fp32 head products took 63 of the step's 108 ms of GPU time; in bf16 they
take a few ms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leantune.quant import rowops
from leantune.quant import hostpool


def cross_entropy_reference(hidden, weight, targets):
    """The spec: full logits, summed loss over all given tokens."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(acc) @ weight.to(acc).T
    return F.cross_entropy(logits, targets, reduction="sum")


def _matmul_dtype(dtype, acc):
    """The dtype the head products run in: half precisions stay, anything else computes in acc."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else acc


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed loss, with dH (and dW) computed chunk by chunk during the forward.

    The loss is linear in its upstream gradient g, so the gradients for g = 1 can be formed
    while each chunk's logits are at hand and only scaled by g in the backward: the logits are
    computed once instead of being recomputed (the Liger-Kernel idea), and the backward keeps
    only dH (N, C) and dW instead of the inputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, need_h: bool, need_w: bool):
        # hidden (N, C), weight (V, C), targets (N,) -> summed loss (fp32 scalar)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 input
        mm = _matmul_dtype(hidden.dtype, acc)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        w_mm = weight.to(mm)
        cpu = hidden.device.type == "cpu"
        dh = (hostpool.empty_like(hidden) if cpu else torch.empty_like(hidden)) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        z_shape = (min(chunk, hidden.shape[0]), weight.shape[0])
        # bf16 products: the rows kernel (C on the CPU, Triton on CUDA) reads and writes the
        # bf16 logits in place, so no fp32 copy of them exists
        z_dt = mm if mm == torch.bfloat16 and rowops.xent_rows_takes(mm, hidden.device) else acc
        z_buf = hostpool.empty(z_shape, z_dt) if cpu else torch.empty(z_shape, dtype=z_dt, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(mm)
            t = targets[s:s + chunk]
            # Z = H W^T, into one buffer reused by every chunk
            z = z_buf[:h.shape[0]]
            if mm == z.dtype:
                torch.mm(h, w_mm.T, out=z)
            else:
                z.copy_(h @ w_mm.T)
            # the C kernel with or without grad, so a no-grad pass (DPO's reference, eval) sums
            # exactly as the training pass does
            fused = rowops.xent_rows_(z, t)
            if fused is not None:  # the C kernel: Z is now dZ = softmax(Z) - onehot(y)
                lse, z_target = fused
                total += (lse - z_target).sum()
                dz = z
            else:
                z = z.to(acc)  # (already acc unless the bf16 kernel was refused)
                rows = torch.arange(h.shape[0], device=h.device)
                # loss_i = logsumexp(Z_i) - Z_i[y_i], with logsumexp = m + log(sum(exp(Z - m)))
                z_target = z[rows, t]
                m = z.amax(dim=-1, keepdim=True)
                e_sum = z.sub_(m).exp_().sum(dim=-1, keepdim=True)  # Z now holds exp(Z - m)
                total += (m.squeeze(1) + e_sum.log().squeeze(1) - z_target).sum()
                if not (need_h or need_w):
                    continue
                # dZ = softmax(Z) - onehot(y), in place
                dz = z.div_(e_sum)
                dz[rows, t] -= 1.0
            dz = dz.to(mm)
            if need_h:  # dH = dZ W
                if dh.dtype == mm:
                    torch.mm(dz, w_mm, out=dh[s:s + chunk])
                else:
                    dh[s:s + chunk] = (dz @ w_mm).to(hidden.dtype)
            if need_w:
                if mm == dw.dtype:
                    dw.addmm_(dz.T, h)  # dW += dZ^T H
                else:
                    dw += dz.T @ h  # half-precision product, fp32 running sum
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        grad_h = (dh * grad).to(dh.dtype) if dh is not None else None
        grad_w = (dw * grad).to(ctx.weight_dtype) if dw is not None else None
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk: int = 1024):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (no ignore index:
    select the supervised rows first)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    grad = torch.is_grad_enabled()
    return ChunkedCrossEntropy.apply(hidden, weight, targets, chunk,
                                     grad and hidden.requires_grad, grad and weight.requires_grad)


def causal_lm_targets(labels, doc_ids=None):
    """Next-token targets: position t predicts labels[t + 1]; -100 where masked, at padding,
    or where t + 1 starts a new packed document. Returns (B, T-1)."""
    targets = labels[:, 1:].clone()
    if doc_ids is not None:
        targets[doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    return targets
