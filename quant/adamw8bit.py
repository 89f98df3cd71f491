"""AdamW with 8-bit optimizer states (blockwise dynamic quantization), one op, one file.

Both moments are stored as uint8 codes plus one fp32 absmax per block of 256 values:
``exp_avg`` with the signed 8-bit dynamic map, ``exp_avg_sq`` (non-negative) with the unsigned
one, as in Dettmers et al., "8-bit Optimizers via Block-wise Quantization". Each step
dequantizes a parameter's states, applies the exact AdamW update in fp32 and re-quantizes.
Small tensors (< ``min_8bit_size`` elements) keep fp32 states; the memory they take is small.

Update (decoupled weight decay), for gradient g at step t:
    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    p <- p * (1 - lr * wd)
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

``adamw8bit_step`` below is the readable spec; on CUDA the optimizer runs its Triton twin,
``train.triton_adamw8bit.adamw8bit_step_triton`` (one launch per tensor, bit-identical).
``LEANTUNE_BACKEND=reference`` (or ``optimizer.backend = "reference"``) forces the spec,
``=triton`` the kernel.
"""
from __future__ import annotations

import functools

import torch

from leantune.quant.dispatch import forced_backend, op_backend
from leantune.quant.functional import create_dynamic_map, dequantize_blockwise_8bit

BLOCK = 256
_SIGNED = create_dynamic_map(signed=True)
_UNSIGNED = create_dynamic_map(signed=False)


def midpoints(code):
    """The 255 fp32 midpoints between consecutive codes of the sorted map ``code``."""
    return 0.5 * (code[:-1] + code[1:])


def quantize_state(x, code, blocksize: int = BLOCK):
    """Blockwise absmax scaling, then the NEAREST code of the map (exact, not the CPU
    quantizer's 65536-bin table, which would flatten the map's fine steps near zero); a value
    exactly between two codes gets the lower one."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    v = blocks / absmax.clamp(min=1e-30)[:, None]
    q = torch.searchsorted(midpoints(code), v.contiguous()).to(torch.uint8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def adamw_update(p32, g, m, v, *, lr, betas, eps, weight_decay, step):
    """One AdamW update in fp32: the new (p, m, v).

    Every op is one IEEE-rounded fp32 op of two tensors or of a tensor and a Python float
    (rounded to fp32), so CPU, CUDA and the Triton kernel agree bit for bit. Hence no
    ``add(alpha=)``/``addcmul``/``addcdiv`` (PyTorch fuses them into FMAs on CPU, differently
    on CUDA), no ``tensor / float`` (CUDA multiplies by the fp32 reciprocal), and the square
    root taken in fp64 (PyTorch's CPU fp32 sqrt is not correctly rounded: 1 result in 6 is
    an ulp off; the fp64 root rounded to fp32 is, since 53 >= 2 * 24 + 2 bits).
    """
    b1, b2 = betas
    m = m * b1 + g * (1 - b1)
    v = v * b2 + (1 - b2) * g * g
    p32 = p32 * (1 - lr * weight_decay)
    denom = (v * (1 / (1 - b2 ** step))).double().sqrt().float() + eps
    return p32 - m * (lr / (1 - b1 ** step)) / denom, m, v


def adamw8bit_step(p, grad, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, *,
                   lr, betas, eps, weight_decay, step) -> None:
    """One AdamW step of ``p`` with 8-bit states, everything updated in place: dequantize
    both moments, ``adamw_update``, write p (rounded to its dtype), re-quantize the moments
    (a new absmax per block)."""
    m = dequantize_blockwise_8bit(exp_avg_q, exp_avg_absmax, _SIGNED.to(p.device), BLOCK)
    v = dequantize_blockwise_8bit(exp_avg_sq_q, exp_avg_sq_absmax, _UNSIGNED.to(p.device), BLOCK)
    p32, m, v = adamw_update(p.float(), grad.float(), m, v, lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, step=step)
    p.copy_(p32)
    for q, absmax, x, code in ((exp_avg_q, exp_avg_absmax, m, _SIGNED),
                               (exp_avg_sq_q, exp_avg_sq_absmax, v, _UNSIGNED)):
        new_q, new_absmax = quantize_state(x, code.to(p.device))
        q.copy_(new_q)
        absmax.copy_(new_absmax)


@functools.cache
def _triton_step():
    """``adamw8bit_step_triton``, or None when Triton or the kernel module cannot be imported."""
    try:
        from leantune.quant.triton_adamw8bit import adamw8bit_step_triton
    except ImportError:
        return None
    return adamw8bit_step_triton


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit states. ``backend`` None: the Triton kernel for CUDA
    parameters when Triton imports, else the reference, unless ``$LEANTUNE_BACKEND`` forces
    one ("triton"; any other value runs the reference); "reference" or "triton" forces one."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 min_8bit_size: int = 4096):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.backend: str | None = None

    def _step_fn(self, p):
        """The 8-bit step for ``p``: the Triton kernel or the reference."""
        if (self.backend or forced_backend()) == "triton" and _triton_step() is None:
            raise RuntimeError("the Triton 8-bit AdamW was forced but quant.triton_adamw8bit cannot be imported")
        backend = self.backend or op_backend(p, triton=_triton_step() is not None)
        return _triton_step() if backend == "triton" else adamw8bit_step

    def _init_state(self, p, state):
        """Zero moments: fp32 for a small tensor, else the codes of 0.0 with absmax 0 (which
        dequantize to +0.0 exactly)."""
        zeros = torch.zeros_like(p, dtype=torch.float32)
        if p.numel() < self.min_8bit_size:
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
        else:
            state["exp_avg_q"], state["exp_avg_absmax"] = quantize_state(zeros, _SIGNED.to(p.device))
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_state(
                zeros, _UNSIGNED.to(p.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state and "exp_avg_q" not in state:
                    self._init_state(p, state)
                step = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
                state["step"] = step
                hyper["step"] = float(step)
                if "exp_avg" in state:
                    p32, state["exp_avg"], state["exp_avg_sq"] = adamw_update(
                        p.float(), p.grad.float(), state["exp_avg"], state["exp_avg_sq"], **hyper)
                    p.copy_(p32)
                else:
                    self._step_fn(p)(p, p.grad, state["exp_avg_q"], state["exp_avg_absmax"],
                                     state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], **hyper)
        return loss
