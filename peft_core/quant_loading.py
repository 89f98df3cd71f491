"""Loading a model with 4-bit decoder linears, streaming, tensor by tensor.

Two sources:
- a bitsandbytes 4-bit checkpoint (``quantization_config`` in config.json, as transformers
  saves it): each linear's packed codes and quant state are read and wrapped as they are;
- a dense checkpoint with ``quant="nf4"|"fp4"``: each decoder linear weight is read,
  quantized and freed before the next one, so peak memory is the 4-bit model plus one
  full-precision tensor.
Embeddings, norms and lm_head stay dense in the compute dtype.
"""
from __future__ import annotations

import re

import torch

from leantune.peft_core.checkpoint import check_shape, finish_loading, load_tensor, meta_model, skipped_tensor
from leantune.base import ModelError
from leantune.peft_core.model import LlamaForCausalLM
from leantune.peft_core.safetensors_io import SafetensorsFile

from leantune.quant import dispatch
from leantune.quant import functional as F
from leantune.quant.modules import Linear4bit
from leantune.peft_core.quant_checkpoint import state_from_tensors

# the tensors of one 4-bit weight P.weight, as suffixes of its name
QUANT_SUFFIXES = {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                  ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"}
QUANTIZED_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def _check_bnb_config(qcfg: dict, where: str) -> tuple[str, int]:
    if qcfg.get("quant_method") != "bitsandbytes" or not qcfg.get("load_in_4bit"):
        raise ModelError(where, f"unsupported quantization_config (quant_method="
                                f"{qcfg.get('quant_method')!r}); only bitsandbytes 4-bit is supported")
    return qcfg.get("bnb_4bit_quant_type", "nf4"), 64


def load_quantized(cfg, files, dtype=torch.float32, device="cpu", quant=None, options=None) -> LlamaForCausalLM:
    options = options or {}
    where = str(files[0].parent / "config.json")
    qcfg = cfg.extra.get("quantization_config")
    prequantized = bool(qcfg)
    if prequantized:
        _check_bnb_config(qcfg, where)
    elif quant not in ("nf4", "fp4"):
        raise ModelError(where, f"unknown quantization {quant!r} (use nf4, fp4 or none)")
    blocksize = int(options.get("blocksize", 64))
    double_quant = bool(options.get("double_quant", True))
    F.check_blocksize(blocksize)

    model, expected = meta_model(cfg)
    linears = {name for name, _ in model.named_modules() if QUANTIZED_LINEAR.match(name)}
    seen = set()
    for path in files:
        f = SafetensorsFile(path)
        keys = f.keys()
        for name in keys:
            if skipped_tensor(name, cfg):
                continue
            module_name = name.rsplit(".weight", 1)[0] if ".weight" in name else None
            if module_name in linears:
                if name != f"{module_name}.weight":
                    continue  # quant-state tensors are read together with their weight
                bias_key = f"{module_name}.bias"
                bias = f.read(bias_key, dtype).to(device) if bias_key in keys else None
                if prequantized:
                    extra = [k for k in keys if k.startswith(name + ".") and k[len(name):] not in QUANT_SUFFIXES]
                    if extra:
                        raise ModelError(str(path), f"unexpected tensor {extra[0]!r} beside a 4-bit weight")
                    group = {k: f.read(k) for k in keys if k.startswith(name)}
                    packed, state = state_from_tensors(module_name, group)
                    check_shape(path, name, state.shape, expected)
                    layer = Linear4bit.from_quantized(packed, state, bias=bias, compute_dtype=dtype)
                else:
                    check_shape(path, name, f.shape(name), expected)
                    w = f.read(name, dtype)
                    try:
                        packed, state = dispatch.quantize_4bit(w.to(device), blocksize=blocksize,
                                                               quant_type=quant, double_quant=double_quant)
                    except ValueError as e:
                        raise ModelError(f"{path}: {name}", str(e)) from None
                    del w
                    layer = Linear4bit.from_quantized(packed, state, bias=bias, compute_dtype=dtype)
                layer.requires_grad_(False)
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.to(device))
                seen.add(name)
                if bias is not None:
                    seen.add(bias_key)
                continue
            if name in seen:
                continue
            load_tensor(model, f, name, expected, dtype, device, requires_grad=False)
            seen.add(name)
    return finish_loading(model, expected, seen, files[0].parent)
