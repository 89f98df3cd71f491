"""Small builders shared by the tests: random tiny configs and models of every variant."""
from __future__ import annotations

import torch

from peft_core.config import ModelConfig
from peft_core.model import LlamaForCausalLM

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

VARIANTS = {
    "llama": dict(model_type="llama"),
    "llama-tied-gqa": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "llama3-rope-scaling": dict(model_type="llama", rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "llama-bias": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "mistral-sliding": dict(model_type="mistral", sliding_window=5),
    "qwen2": dict(model_type="qwen2", qkv_bias=True, num_key_value_heads=2),
    "head-dim": dict(model_type="llama", head_dim=24),
}


def tiny_config(variant: str = "llama", **over) -> ModelConfig:
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=128)
    kw.update(VARIANTS[variant])
    kw.update(over)
    return ModelConfig(**kw)


def tiny_model(variant: str = "llama", seed: int = 0, dtype=torch.float32, **over) -> LlamaForCausalLM:
    """A random model whose weights are large enough that logits vary (not the tiny HF init)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(variant, **over))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model.to(dtype)
