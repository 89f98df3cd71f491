"""The end-to-end benchmark's model folders: random-weight Llama shapes written on the fly,
or the folder the user names, or the embedded default. See ``leantune.bench.e2e``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from leantune.base import ModelError, UsageError

# Llama-architecture shapes for random-weight models (never committed; written on the fly).
# 1b ~ Llama-3.2-1B, 3b ~ Llama-3.2-3B (both tie the head to the embeddings), 8b ~ Llama-3.1-8B.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def _cache_dir() -> Path:
    from leantune.peft_core.embedded import cache_dir

    return cache_dir()


def write_random_model(out_dir, shape: str, seed: int = 0, dtype=None) -> Path:
    """A Llama-architecture folder of random weights (config.json + safetensors, sharded by
    layers above ~2 GB) in the given shape; weights N(0, 1/in_features), norms 1.

    Written atomically (a temp folder renamed into place) and reused when already there.
    Generated on the GPU when there is one (an 8B model is 16 GB of bf16)."""
    import torch

    from leantune.peft_core.safetensors_io import write_safetensors

    if shape not in SHAPES:
        raise UsageError("--random-shape", f"unknown shape {shape!r} (choose {', '.join(SHAPES)})")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    s = SHAPES[shape]
    dtype = dtype or (torch.float32 if shape == "tiny" else torch.bfloat16)
    C, I, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    nh, nkv, V = s["num_attention_heads"], s["num_key_value_heads"], s["vocab_size"]
    hd = C // nh
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s, "head_dim": hd,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
              "max_position_embeddings": 131072, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(seed)

    def rand(rows, cols):  # (out, in) ~ N(0, 1 / in)
        w = torch.randn(rows, cols, generator=g, device=gen_device, dtype=torch.float32)
        return (w * cols ** -0.5).to(dtype).cpu()

    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    limit = 2 << 30

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            write_safetensors(current, tmp / f"shard-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0

    def add(name, t):
        nonlocal size
        current[name] = t
        size += t.numel() * t.element_size()

    add("model.embed_tokens.weight", (torch.randn(V, C, generator=g, device=gen_device) * 0.02).to(dtype).cpu())
    for i in range(L):
        p = f"model.layers.{i}."
        for name, (o, k) in {"self_attn.q_proj": (nh * hd, C), "self_attn.k_proj": (nkv * hd, C),
                             "self_attn.v_proj": (nkv * hd, C), "self_attn.o_proj": (C, nh * hd),
                             "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C), "mlp.down_proj": (C, I)}.items():
            add(p + name + ".weight", rand(o, k))
        add(p + "input_layernorm.weight", torch.ones(C, dtype=dtype))
        add(p + "post_attention_layernorm.weight", torch.ones(C, dtype=dtype))
        if size > limit:
            flush()
    add("model.norm.weight", torch.ones(C, dtype=dtype))
    if not s["tie_word_embeddings"]:
        add("lm_head.weight", rand(V, C))
    flush()
    names = []
    for j, shard in enumerate(shards, 1):
        final = ("model.safetensors" if len(shards) == 1
                 else f"model-{j:05d}-of-{len(shards):05d}.safetensors")
        os.replace(tmp / f"shard-{j}.safetensors", tmp / final)
        names.append((final, list(shard)))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": {k: f for f, keys in names for k in keys}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a concurrent writer won
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def resolve_model(opts) -> tuple[Path, str]:
    """(model folder, a short name for the tables)."""
    if opts.model and opts.random_shape:
        raise UsageError("--model/--random-shape", "give one of them, not both")
    if opts.model:
        d = Path(opts.model)
        if not (d / "config.json").is_file():
            raise ModelError(str(d), "no config.json: not a model folder")
        return d, d.name
    if opts.random_shape:
        shape = opts.random_shape
        return write_random_model(_cache_dir() / "bench-models" / f"llama-{shape}-random-seed0", shape), \
            f"llama-{shape}-random"
    from leantune.peft_core.embedded import DEFAULT_MODEL_NAME, default_model_dir

    return default_model_dir(), DEFAULT_MODEL_NAME

