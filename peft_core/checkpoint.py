"""Load and save Hugging Face model folders.

Loading builds the model on the meta device (no memory), then reads the checkpoint tensor by
tensor straight into its parameter in the requested dtype: peak memory is the model plus one
tensor of the file's dtype when a conversion is needed. Sharded checkpoints
(``model.safetensors.index.json``) are read shard by shard.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from leantune.peft_core.config import ModelConfig
from leantune.base import ModelError
from leantune.peft_core.model import LlamaForCausalLM
from leantune.peft_core.safetensors_io import SafetensorsFile, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards of an index)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(str(d), "model folder not found")
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ModelError(str(index), f"malformed index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict):
            raise ModelError(str(index), "malformed index (weight_map is not an object)")
        files = sorted(set(map(str, weight_map.values())))
        for f in files:
            if Path(f).name != f or f in ("", ".", ".."):
                raise ModelError(str(index), f"shard name {f!r} must be a file in the model folder")
            if not (d / f).is_file():
                raise ModelError(str(d / f), "shard listed in the index is missing")
        return [d / f for f in files]
    raise ModelError(str(d), "no model.safetensors or model.safetensors.index.json")


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (choose float32, bfloat16 or float16)")
    return table[name]


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool):
    *path, leaf = name.split(".")
    module = model
    for p in path:
        module = getattr(module, p)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)
    else:
        module._buffers[leaf] = tensor


def load_model(model_dir, dtype=torch.float32, device="cpu", quant: str | None = None,
               quant_options: dict | None = None) -> LlamaForCausalLM:
    """A model folder -> ``LlamaForCausalLM`` in ``dtype`` on ``device``.

    ``quant`` ("nf4" | "fp4") quantizes the decoder linears while streaming: each weight is
    read, quantized and freed. A folder that already holds a bitsandbytes 4-bit checkpoint
    (``quantization_config`` in config.json) is loaded as 4-bit whatever ``quant`` says.
    """
    dtype = resolve_dtype(dtype)
    if not Path(model_dir).is_dir():
        raise ModelError(str(model_dir), "model folder not found")
    cfg = ModelConfig.from_dir(model_dir)
    files = checkpoint_files(model_dir)
    check_config_fits(cfg, files, Path(model_dir) / "config.json")
    qcfg = cfg.extra.get("quantization_config")
    if qcfg or quant not in (None, "none"):
        from leantune.peft_core.quant_loading import load_quantized  # the 4-bit path lives with quant/

        return load_quantized(cfg, files, dtype=dtype, device=device, quant=quant,
                              options=quant_options or {})
    model, expected = meta_model(cfg)
    seen = set()
    for path in files:
        f = SafetensorsFile(path)
        for name in f.keys():
            if not skipped_tensor(name, cfg):
                load_tensor(model, f, name, expected, dtype, device, requires_grad=True)
                seen.add(name)
    return finish_loading(model, expected, seen, model_dir)


def implied_weights(cfg: ModelConfig) -> int:
    """The number of weights ``cfg`` implies (exact Python integers: no overflow, no memory)."""
    h, ffn, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * ffn + 2 * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + cfg.num_hidden_layers * per_layer + h + head + hd // 2


def check_config_fits(cfg: ModelConfig, files, where) -> None:
    """Check config.json's sizes against the tensors the checkpoint holds (headers only)
    before anything is built: the layer count must match the ``model.layers.N`` present, and
    the weights the sizes imply must not exceed what is stored (a 4-bit code counts as one
    weight per nibble). A crafted ``num_hidden_layers`` or ``head_dim`` is a ModelError here
    instead of a model of 10^9 layers or a RoPE table of 2^29 entries."""
    layers, stored = set(), 0
    for path in files:
        f = SafetensorsFile(path)
        for name in f.keys():
            parts = name.split(".")
            if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
                layers.add(int(parts[2]))
            numel = 1
            for n in f.shape(name):
                numel *= n
            stored += numel * (2 if f.dtype(name) == torch.uint8 else 1)
    if len(layers) != cfg.num_hidden_layers or (layers and max(layers) != len(layers) - 1):
        raise ModelError(str(where), f"num_hidden_layers is {cfg.num_hidden_layers} but the checkpoint "
                                     f"holds {len(layers)} layers (model.layers.N)")
    implied = implied_weights(cfg)
    if implied > 2 * stored + (1 << 16):
        raise ModelError(str(where), f"the sizes in config.json (hidden_size {cfg.hidden_size}, "
                                     f"intermediate_size {cfg.intermediate_size}, head_dim {cfg.head_dim}, "
                                     f"vocab_size {cfg.vocab_size}, heads {cfg.num_attention_heads}/"
                                     f"{cfg.num_key_value_heads}) imply {_approx(implied)} weights, the checkpoint "
                                     f"holds {_approx(stored)}")


def _approx(n: int) -> str:
    """A count for a message, whatever its size (str() refuses ints over 4300 digits)."""
    return f"{n:,}" if n < 10**15 else f"about 2^{n.bit_length() - 1}"


# -- shared with quant/loading.py (the 4-bit loader) -----------------------------------------
def meta_model(cfg: ModelConfig):
    """The model on the meta device (no memory) and the tensors a checkpoint must provide."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = dict(model.state_dict(keep_vars=True))
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return model, expected


def skipped_tensor(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that are not loaded: RoPE tables, the head of a tied model."""
    return name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def check_shape(path, name: str, got, expected: dict):
    want = tuple(expected[name].shape)
    if tuple(got) != want:
        raise ModelError(str(path), f"tensor {name!r} has shape {list(got)}, the config implies {list(want)}")


def load_tensor(model, f: SafetensorsFile, name: str, expected: dict, dtype, device, requires_grad: bool):
    """Check ``name`` against the model, read it (floats in ``dtype``) and put it in place."""
    if name not in expected:
        raise ModelError(str(f.path), f"unexpected tensor {name!r} for a {model.config.model_type} model")
    check_shape(f.path, name, f.shape(name), expected)
    if expected[name].is_floating_point() and not f.dtype(name).is_floating_point:
        raise ModelError(str(f.path), f"tensor {name!r} is stored as {f.dtype(name)}, expected floating point")
    t = f.read(name, dtype if f.dtype(name).is_floating_point else None)
    _set_tensor(model, name, t.to(device), requires_grad=requires_grad)


def finish_loading(model, expected: dict, seen: set, where):
    missing = [k for k in expected if k not in seen]
    if missing:
        raise ModelError(str(where), f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing)")
    model.tie_weights()
    model.init_non_persistent()
    return model


def save_model(model: LlamaForCausalLM, out_dir, dtype=None, extra_config: dict | None = None,
               copy_tokenizer_from=None):
    """Write ``config.json`` + ``model.safetensors`` (atomically), optionally in ``dtype``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype) if dtype is not None else None
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        sd[k] = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
    write_safetensors(sd, out / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("quantization_config", None)
    cfg.update(extra_config or {})
    write_json(out / "config.json", cfg)
    if copy_tokenizer_from is not None:
        copy_tokenizer_files(copy_tokenizer_from, out)
    return out


def copy_tokenizer_files(src_dir, dst_dir):
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file() and Path(src).resolve() != (Path(dst_dir) / name).resolve():
            shutil.copyfile(src, Path(dst_dir) / name)


def write_json(path, obj):
    """Atomic JSON write (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
