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
import re
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
    """``model.path``: a folder; "" -> the embedded default model (imported once); ``org/name``
    that is no folder -> its snapshot in the local Hugging Face cache (never downloaded)."""
    if not path:
        from leantune.peft_core.embedded import default_model_dir

        return default_model_dir()
    if Path(path).is_dir() or not HUB_ID.fullmatch(str(path)):
        return Path(path)
    return hub_cache_snapshot(str(path))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache_dir() -> Path:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hub_cache_snapshot(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id`` (layout ``models--org--name/snapshots/<rev>/``): the
    revision ``refs/main`` names, else the newest snapshot. ModelError when there is none."""
    from leantune.base import ModelError

    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text(encoding="utf-8").strip()
        if main.is_dir():
            return main
    found = sorted((d for d in snapshots.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    if found:
        return found[-1]
    raise ModelError(repo_id, f"no such folder, and not in the local Hugging Face cache (looked in "
                              f"{snapshots}; the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else "
                              "~/.cache/huggingface/hub); leantune never downloads: fetch it first "
                              "or give a folder")


def load_base(model_dir: Path, *, quant: str, blocksize: int, double_quant: bool, dtype, device):
    """The base model as configured: ``quant`` "nf4" | "fp4" quantizes its linears, "none"
    keeps them dense; every parameter frozen."""
    from leantune.peft_core.checkpoint import load_model

    model = load_model(model_dir, dtype=dtype, device=device, quant=None if quant == "none" else quant,
                       quant_options={"blocksize": blocksize, "double_quant": double_quant})
    for p in model.parameters():
        p.requires_grad_(False)
    return model
