"""Small builders shared by the tests: random tiny configs and models of every variant."""
from __future__ import annotations

import torch

from leantune.peft_core.config import ModelConfig
from leantune.peft_core.model import LlamaForCausalLM

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


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_tokenizer_files(out_dir):
    """A byte-level tokenizer (256 byte tokens + 3 specials, no merges) with a ChatML
    template: tokenizer.json + tokenizer_config.json. Vocab size 259."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from leantune.peft_core.gguf_import import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML}))
    return out


def tiny_model_dir(out_dir, variant: str = "llama", seed: int = 0, **over):
    """A complete tiny model folder (config, weights, byte tokenizer) for end-to-end tests."""
    from leantune.peft_core.checkpoint import save_model

    over.setdefault("vocab_size", 259)
    model = tiny_model(variant, seed=seed, **over)
    model.config.eos_token_id = 258
    model.config.pad_token_id = 256
    save_model(model, out_dir)
    byte_tokenizer_files(out_dir)
    return out_dir


def skip_unless_triton_runs(kernel, module: str) -> None:
    """Skip the calling test module when there is no CUDA and ``kernel`` (a ``triton.jit``
    function) was not built for the interpreter, i.e. TRITON_INTERPRET was not 1 when
    ``module`` was first imported."""
    import pytest

    if not torch.cuda.is_available() and type(kernel).__name__ != "InterpretedFunction":
        pytest.skip(f"no CUDA, and the Triton kernels were not built for the interpreter "
                    f"(TRITON_INTERPRET was not 1 when {module} was first imported)",
                    allow_module_level=True)
