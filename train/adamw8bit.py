"""AdamW with 8-bit optimizer states (blockwise dynamic quantization), one op, one file.

Both moments are stored as uint8 codes plus one fp32 absmax per block of 256 values:
``exp_avg`` with the signed 8-bit dynamic map, ``exp_avg_sq`` (non-negative) with the unsigned
one, as in Dettmers et al., "8-bit Optimizers via Block-wise Quantization". Each step
dequantizes a parameter's states, applies the exact AdamW update in fp32 and re-quantizes.
Small tensors (< ``min_8bit_size`` elements) keep fp32 states; the memory they take is small.

Update (decoupled weight decay), for gradient g at step t:
    p <- p * (1 - lr * wd)
    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""
from __future__ import annotations

import torch

from quant.functional import create_dynamic_map, dequantize_blockwise_8bit

BLOCK = 256
_SIGNED = create_dynamic_map(signed=True)
_UNSIGNED = create_dynamic_map(signed=False)


def quantize_state(x, code, blocksize: int = BLOCK):
    """Blockwise absmax scaling, then the NEAREST code of the map (exact, not the CPU
    quantizer's 65536-bin table, which would flatten the map's fine steps near zero)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    v = blocks / absmax.clamp(min=1e-30)[:, None]
    mid = 0.5 * (code[:-1] + code[1:])
    q = torch.searchsorted(mid, v.contiguous()).to(torch.uint8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


class AdamW8bit(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 min_8bit_size: int = 4096):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW8bit hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size

    def _moments(self, p, state):
        if "exp_avg_q" in state:
            m = dequantize_blockwise_8bit(state["exp_avg_q"], state["exp_avg_absmax"],
                                          _SIGNED.to(p.device), BLOCK)
            v = dequantize_blockwise_8bit(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"],
                                          _UNSIGNED.to(p.device), BLOCK)
            return m, v
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        zeros = torch.zeros_like(p, dtype=torch.float32)
        return zeros, zeros.clone()

    def _store(self, p, state, m, v):
        if p.numel() >= self.min_8bit_size:
            state["exp_avg_q"], state["exp_avg_absmax"] = quantize_state(m, _SIGNED.to(p.device))
            state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_state(
                v, _UNSIGNED.to(p.device))
        else:
            state["exp_avg"], state["exp_avg_sq"] = m, v

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
                state["step"] = step
                t = float(step)
                g = p.grad.float()
                m, v = self._moments(p, state)
                m = m.mul(b1).add_(g, alpha=1 - b1)
                v = v.mul(b2).addcmul_(g, g, value=1 - b2)
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                p.copy_(p32)
                self._store(p, state, m, v)
        return loss
