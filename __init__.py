"""leantune: lean LoRA / QLoRA fine-tuning (adapters, NF4/FP4 kernels, model, trainer, eval).

The installed package maps the source tree's folders under one name: ``leantune.base``
(errors, helpers), ``leantune.quant`` (ops: 4-bit kernels, row ops, chunked CE, 8-bit AdamW),
``leantune.peft_core`` (model, checkpoints, adapters), ``leantune.train``, ``leantune.eval``,
``leantune.bench``, with ``leantune.cli`` on top. ``docs/architecture.md`` draws the layers.

The names below are the documented Python API, imported on first use (``import leantune``
itself loads neither torch nor a kernel)::

    import leantune
    cfg = leantune.load_config("job.toml", ["train.max_steps=200"])
    from leantune.train.loop import train
    result = train(cfg)
    report = leantune.run_eval(cfg)
"""
from __future__ import annotations

import importlib

from leantune.base import VERSION as __version__

_API = {
    # errors
    "LeantuneError": "leantune.base", "UsageError": "leantune.base", "DataError": "leantune.base",
    "ModelError": "leantune.base", "GateError": "leantune.base",
    # 4-bit ops
    "quantize_4bit": "leantune.quant.dispatch", "dequantize_4bit": "leantune.quant.dispatch",
    "matmul_4bit": "leantune.quant.dispatch", "QuantState": "leantune.quant.state",
    # model, checkpoints and adapters
    "load_model": "leantune.peft_core.checkpoint", "save_model": "leantune.peft_core.checkpoint",
    "quantize_checkpoint": "leantune.peft_core.quant_checkpoint",
    "Tokenizer": "leantune.peft_core.tokenizer", "generate": "leantune.peft_core.generate",
    "AdapterConfig": "leantune.peft_core.adapters", "inject_adapter": "leantune.peft_core.adapters",
    "save_adapter": "leantune.peft_core.adapters", "load_adapter": "leantune.peft_core.adapters",
    "merge_adapter": "leantune.peft_core.adapters", "unmerge_adapter": "leantune.peft_core.adapters",
    "set_active_adapter": "leantune.peft_core.adapters", "trainable_report": "leantune.peft_core.adapters",
    "LoraVariant": "leantune.peft_core.lora", "register_variant": "leantune.peft_core.lora",
    # training and evaluation
    "load_config": "leantune.train.config", "Config": "leantune.train.config",
    "run_eval": "leantune.eval.runner",  # (train() is leantune.train.loop.train: the name
    # leantune.train is the subpackage)
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'leantune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this hook
    return value


def __dir__():
    return sorted(__all__)
