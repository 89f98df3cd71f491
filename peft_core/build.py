"""Loading a model as a run's config describes it, shared by training and eval.

Plain values in, so that this layer never sees the train config: the device, the compute
dtype by name, the model folder ("" -> the embedded default), the quantization settings.

``compute_dtype = "auto"``: bfloat16 on a GPU, and on a CPU whose cores have native bf16 dot
products (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo: the 4-bit CPU linear and the row
kernels have bf16 paths there); float32 on other CPUs. ``LEANTUNE_CPU_BF16=0`` forces float32
on such a CPU. Only the frozen base computes in bf16: adapter weights, optimizer state and the
loss reduction stay float32 (``LoraLinear``'s ``param_dtype``, the chunked cross-entropy).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from leantune.quant.cpu_kernels import _cpu_has

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (and ``LEANTUNE_CPU_BF16`` is not 0)."""
    if os.environ.get("LEANTUNE_CPU_BF16", "").strip() == "0":
        return False
    return _cpu_has("avx512_bf16") or _cpu_has("amx_bf16")


def compute_dtype_for(name: str, device) -> torch.dtype:
    """``model.compute_dtype`` ("auto" | "float32" | "bfloat16" | "float16") on ``device``."""
    if name == "auto":
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """``model.path``; "" -> the embedded default model (imported once)."""
    if path:
        return Path(path)
    from leantune.peft_core.embedded import default_model_dir

    return default_model_dir()


def load_base(model_dir: Path, *, quant: str, blocksize: int, double_quant: bool, dtype, device):
    """The base model as configured: ``quant`` "nf4" | "fp4" quantizes its linears, "none"
    keeps them dense; every parameter frozen."""
    from leantune.peft_core.checkpoint import load_model

    model = load_model(model_dir, dtype=dtype, device=device, quant=None if quant == "none" else quant,
                       quant_options={"blocksize": blocksize, "double_quant": double_quant})
    for p in model.parameters():
        p.requires_grad_(False)
    return model
