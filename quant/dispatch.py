"""The one place that picks a backend: reference, C (CPU) or Triton (CUDA).

``backend_for`` decides for the 4-bit ops; ``op_backend`` applies the same rule to the other
ops with kernels (the row ops and the cross-entropy rows of ``quant/rowops.py``, the 8-bit
AdamW), each of which has only some of the backends.

    auto (default)  CUDA tensors -> Triton, CPU tensors -> the C kernels when they build,
                    anything else, or a backend that cannot be imported -> the reference
    LEANTUNE_BACKEND=reference|cpu|triton   forces one (tests, benchmarks); a forced backend
                    that is unavailable is an error, never a silent fallback

``attention_backend`` picks the attention: batched GEMMs (``quant.attention``) or PyTorch's
SDPA; ``$LEANTUNE_CPU_ATTENTION`` (0 / 1 / auto) overrides it, ``$LEANTUNE_BACKEND`` does not.

The backends' modules are imported lazily, on the first call that wants them:
``quant.triton_dequant`` / ``quant.triton_matmul`` and ``quant.cpu_kernels``. Every backend
computes the same weights bit for bit; see ``quant.functional`` (the spec).
"""
from __future__ import annotations

import functools
import os

import torch

from leantune.base import UsageError

from leantune.quant import functional as F
from leantune.quant.state import QuantState

ENV = "LEANTUNE_BACKEND"
BACKENDS = ("reference", "cpu", "triton")


def forced_backend() -> str | None:
    """The backend named by ``$LEANTUNE_BACKEND``, or None for automatic choice."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise UsageError(ENV, f"unknown backend {value!r} (choose auto, {', '.join(BACKENDS)})")
    return value


@functools.cache
def _triton():
    """(triton_dequant, triton_matmul) or None when Triton or the modules cannot be imported."""
    try:
        from leantune.quant import triton_dequant, triton_matmul
    except ImportError:
        return None
    return triton_dequant, triton_matmul


@functools.cache
def _cpu():
    """The ``quant.cpu_kernels`` module when its C library is built and loaded, else None."""
    try:
        from leantune.quant import cpu_kernels
    except ImportError:
        return None
    return cpu_kernels if cpu_kernels.available() else None


def backend_for(t: torch.Tensor) -> str:
    """The backend that runs an op on ``t``'s device: "reference", "cpu" or "triton"."""
    forced = forced_backend()
    if forced == "triton" and _triton() is None:
        raise RuntimeError(f"{ENV}=triton but quant.triton_dequant / quant.triton_matmul cannot be imported")
    if forced == "cpu" and (_cpu() is None or t.device.type != "cpu"):
        raise RuntimeError(f"{ENV}=cpu but the C kernels are unavailable or the tensor is on {t.device}")
    if forced is not None:
        return forced
    if t.device.type == "cuda" and _triton() is not None:
        return "triton"
    if t.device.type == "cpu" and _cpu() is not None:
        return "cpu"
    return "reference"


def _cpu_args(packed: torch.Tensor, state: QuantState):
    if state.scales is not None:  # validated and decoded once by the owner (Linear4bit)
        absmax = state.scales
    else:
        F.check_state(packed, state)
        absmax = F.decode_absmax(state).contiguous()
    return packed.reshape(-1).contiguous(), absmax, state.code.float().contiguous()


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                  nested_blocksize: int = 256) -> tuple[torch.Tensor, QuantState]:
    """``functional.quantize_4bit``, with the codes and absmax from the C kernel on CPU.

    Bit-identical to the reference (``tests/test_cpu_kernels.py``) and 20-40x faster; the
    small double-quantization pass stays in PyTorch. Other devices run the reference.
    """
    if backend_for(w) != "cpu" or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return F.quantize_4bit(w, blocksize, quant_type, double_quant, nested_blocksize)
    F.check_blocksize(blocksize)
    if double_quant:
        F.check_blocksize(nested_blocksize, "nested_blocksize")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    code = F.get_code(quant_type, w.device)
    packed, absmax = _cpu().quantize_4bit_cpu(w.detach().contiguous(), code, blocksize)
    return packed, F.make_quant_state(absmax, w, blocksize, quant_type, double_quant, nested_blocksize)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``state.shape`` tensor of ``dtype`` (default ``state.dtype``)."""
    dtype = state.dtype if dtype is None else dtype
    backend = backend_for(packed)
    if backend == "triton":
        dequant_mod, _ = _triton()
        return dequant_mod.dequantize_4bit_triton(packed, state, dtype)
    if backend == "cpu":
        flat, absmax, code = _cpu_args(packed, state)
        out = _cpu().dequantize_4bit_cpu(flat, absmax, code, state.blocksize, state.numel, dtype)
        return out.reshape(state.shape)
    return F.dequantize_4bit(packed, state, dtype)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, transpose: bool = False) -> torch.Tensor:
    """``x @ W^T`` ((..., in) -> (..., out)), or ``x @ W`` with ``transpose``; W [out, in] in 4 bits.

    The output has x's dtype. CPU kernels take fp32 and bf16 x (bf16 runs bf16 tiles and
    GEMMs); other dtypes are upcast to fp32, then cast back.
    """
    backend = backend_for(x)
    if backend == "triton":
        _, matmul_mod = _triton()
        return matmul_mod.matmul_4bit_triton(x, packed, state, transpose)
    if backend == "cpu" and len(state.shape) == 2:
        flat, absmax, code = _cpu_args(packed, state)
        n_out, n_in = (int(s) for s in state.shape)
        red, cols = (n_out, n_in) if transpose else (n_in, n_out)
        if x.shape[-1] != red:
            raise ValueError(f"x has {x.shape[-1]} features, the {'transposed ' if transpose else ''}"
                             f"4-bit weight [{n_out}, {n_in}] needs {red}")
        native = x.dtype in (torch.float32, torch.bfloat16)
        x2 = (x if native else x.float()).reshape(-1, red).contiguous()  # (M, red)
        y = _cpu().linear_4bit_cpu(x2, flat, absmax, code, state.blocksize, n_out, n_in, transpose)
        return y.to(x.dtype).reshape(*x.shape[:-1], cols)
    from leantune.quant.matmul4bit import matmul_4bit_reference

    return matmul_4bit_reference(x, packed, state, transpose)


def op_backend(t: torch.Tensor, *, cpu: bool = False, triton: bool = False) -> str:
    """The backend of an op other than the 4-bit ones, on ``t``: ``cpu`` / ``triton`` say
    whether the op has that kernel and it is usable. The rule of ``backend_for``: a forced
    backend wins where the op has it (an op without it runs the reference: the row ops have
    no Triton kernel when the 4-bit ops are forced to Triton); otherwise Triton for CUDA
    tensors, C for CPU tensors, else the reference."""
    forced = forced_backend()
    if forced is not None:
        return forced if {"cpu": cpu, "triton": triton}.get(forced, True) else "reference"
    if t.device.type == "cuda" and triton:
        return "triton"
    if t.device.type == "cpu" and cpu:
        return "cpu"
    return "reference"


# "0": the row ops and LoRA products keep PyTorch's spec on CUDA (an A/B switch for benchmarks,
# and a way around a kernel that misbehaves on some GPU); the 4-bit ops are not affected
FUSED_OPS_ENV = "LEANTUNE_TRITON_FUSED_OPS"


@functools.cache
def triton_module(name: str):
    """``leantune.quant.<name>`` for "triton_rowops" or "triton_lora" (modules of Triton
    kernels), or None when Triton or the module cannot be imported."""
    try:
        if name == "triton_rowops":
            from leantune.quant import triton_rowops as module
        elif name == "triton_lora":
            from leantune.quant import triton_lora as module
        else:
            raise ValueError(f"no Triton module {name!r}")
    except ImportError:
        return None
    return module


def triton_kernels(name: str, t: torch.Tensor, *, cpu: bool):
    """The Triton module ``name`` when ``op_backend``'s rule picks Triton for an op on ``t``
    (``cpu``: the op also has a usable C kernel); else None. Triton runs CUDA tensors, and CPU
    tensors only under ``TRITON_INTERPRET=1`` (the tests, with ``LEANTUNE_BACKEND=triton``);
    ``$LEANTUNE_TRITON_FUSED_OPS=0`` turns these modules off."""
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    if os.environ.get(FUSED_OPS_ENV, "1").strip() == "0":
        return None
    module = triton_module(name)
    return module if op_backend(t, cpu=cpu, triton=module is not None) == "triton" else None


# -- attention (quant/attention.py) ---------------------------------------------------------------
ATTENTION_ENV = "LEANTUNE_CPU_ATTENTION"
# longer rows keep SDPA: the saved P grows as T * S (B=4, 9 heads, bf16: 4.7 MiB a layer kept at
# T=256 against SDPA's 3.0, 14 against 6 at T=512, 46 against 12 at T=1024) while the gain shrinks
# (fwd+bwd 2x at T=256, 1.6x at 512, 1.2x at 1024)
ATTENTION_MAX_KEYS = 512


def attention_backend(q, k, v, attn_mask=None, is_causal: bool = False, enable_gqa: bool = False) -> str:
    """"gemm" (``attention.AttentionFunction``) or "sdpa" (``F.scaled_dot_product_attention``).

    "gemm" can run on CPU for more than one query: fp32 / bf16 / fp64, a mask of shape (T, S)
    or (B or 1, 1, T, S), is_causal only with T == S. By default (``$LEANTUNE_CPU_ATTENTION``
    unset or auto) it runs for bf16 with at most ``ATTENTION_MAX_KEYS`` keys: there its forward
    and backward take about half of SDPA's time (SmolLM2-135M, B=4, T=256: a 10% faster
    training step). In fp32 it is ~1.15x faster than SDPA but the step gains nothing
    measurable while P is kept in fp32, so fp32 keeps SDPA unless ``$LEANTUNE_CPU_ATTENTION=1``
    (which also lifts the length limit); ``=0`` always runs SDPA. The choice does not depend
    on grad mode, so a no-grad pass (DPO's reference, evaluation) computes the training pass's
    bits. Decoding (one query) and other devices keep SDPA; ``$LEANTUNE_BACKEND`` does not
    apply here.
    """
    value = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if value not in ("", "auto", "0", "1"):
        raise UsageError(ATTENTION_ENV, f"unknown value {value!r} (choose auto, 0 or 1)")
    if value == "0" or q.device.type != "cpu":
        return "sdpa"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return "sdpa"
    if (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]):
        return "sdpa"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16, torch.float64)):
        return "sdpa"
    (H, T), (Hkv, S) = q.shape[1:3], k.shape[1:3]
    if T < 2 or H % Hkv or (H != Hkv and not enable_gqa) or (is_causal and T != S):
        return "sdpa"
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 4) or attn_mask.shape[-2:] != (T, S) or attn_mask.device != q.device:
            return "sdpa"
        if attn_mask.dim() == 4 and (attn_mask.shape[1] != 1 or attn_mask.shape[0] not in (1, q.shape[0])):
            return "sdpa"
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            return "sdpa"
    if value == "1":
        return "gemm"
    return "gemm" if q.dtype == torch.bfloat16 and S <= ATTENTION_MAX_KEYS else "sdpa"
