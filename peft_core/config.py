"""ModelConfig: the Hugging Face ``config.json`` fields a Llama-family decoder needs.

Supported families (all the same decoder with small switches):

| model_type | switches |
| --- | --- |
| llama (Llama 2/3/3.1, SmolLM2, TinyLlama) | optional llama3 RoPE scaling, attention_bias, mlp_bias |
| mistral | sliding_window |
| qwen2 | q/k/v bias (always), sliding window off unless use_sliding_window |
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from leantune.base import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a config.json, tokenizer_config.json, ...); ModelError
    naming the file when it is not valid JSON or not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, or an int over 4300 digits
        raise ModelError(str(path), f"not valid JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ModelError(str(path), f"cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise ModelError(str(path), "expected a JSON object")
    return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters (a value read from a file may be huge)."""
    try:
        text = repr(v)
    except ValueError:  # an int with more digits than Python prints
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _positive_float(d: dict, key: str, default, where: str) -> float:
    v = d.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ModelError(where, f"key {key!r} must be a positive number, got {_short(v)}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not (0 < f < math.inf):
        raise ModelError(where, f"key {key!r} must be a positive finite number, got {_short(v)}")
    return f


def _check_llama3_scaling(scaling: dict, where: str):
    """The llama3 RoPE scaling keys ``llama3_inv_freq`` reads: numbers, factor required."""
    if "factor" not in scaling:
        raise ModelError(where, "llama3 rope scaling needs a 'factor'")
    for key, default in (("factor", None), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                         ("original_max_position_embeddings", 8192)):
        _positive_float(scaling, key, default, f"{where}: rope scaling")
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    if not high > low:
        raise ModelError(where, f"llama3 rope scaling needs high_freq_factor > low_freq_factor, "
                                f"got {high} and {low}")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} or None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o (Llama's switch)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: keys older than this are not attended
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict, repr=False)  # every other key, kept on save

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 1:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size {self.hidden_size} over "
                             f"{self.num_attention_heads} heads)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    # -- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, where: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        archs = d.get("architectures") or []
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                where,
                f"unsupported model_type {mt!r} (architectures {archs}); supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES),
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        for k in required:
            if not _is_int(d.get(k)) or d[k] <= 0:
                raise ModelError(where, f"key {k!r} must be a positive integer, got {_short(d.get(k))}")
        for k in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            if d.get(k) is not None and (not _is_int(d[k]) or d[k] <= 0):
                raise ModelError(where, f"key {k!r} must be a positive integer, got {_short(d[k])}")
        if d.get("head_dim") is not None and d["head_dim"] % 2:
            raise ModelError(where, f"key 'head_dim' must be even (RoPE rotates pairs), got {d['head_dim']}")
        # transformers >= 5 moves rope settings to "rope_parameters"
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ModelError(where, f"key 'rope_parameters' must be an object, got {_short(rope)}")
        scaling = d.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise ModelError(where, f"key 'rope_scaling' must be an object or null, got {_short(scaling)}")
        if scaling is None and rope.get("rope_type", "default") not in ("default", None):
            scaling = dict(rope)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ModelError(where, f"rope scaling type {_short(kind)} is not supported (supported: llama3)")
            else:
                _check_llama3_scaling(scaling, where)
        sliding = None
        if mt == "mistral":
            sliding = d.get("sliding_window")
        elif mt == "qwen2" and d.get("use_sliding_window"):
            sliding = d.get("sliding_window")
        if sliding is not None and (not _is_int(sliding) or sliding <= 0):
            raise ModelError(where, f"key 'sliding_window' must be a positive integer or null, got {_short(sliding)}")
        qc = d.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ModelError(where, f"key 'quantization_config' must be an object, got {_short(qc)}")
        for k in ("bos_token_id", "pad_token_id"):
            if d.get(k) is not None and (not _is_int(d[k]) or d[k] < 0):
                raise ModelError(where, f"key {k!r} must be a token id (an integer >= 0), got {_short(d[k])}")
        eos = d.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else [eos]
        if eos is not None and not all(_is_int(e) and e >= 0 for e in eos_list):
            raise ModelError(where, f"key 'eos_token_id' must be a token id or a list of them, got {_short(eos)}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads"),
                head_dim=d.get("head_dim"),
                rms_norm_eps=_positive_float(d, "rms_norm_eps", 1e-6, where),
                rope_theta=_positive_float(d, "rope_theta", rope.get("rope_theta", 10000.0), where),
                rope_scaling=scaling,
                max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
                qkv_bias=(mt == "qwen2"),
                mlp_bias=bool(d.get("mlp_bias", False)),
                sliding_window=sliding,
                model_type=mt,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                torch_dtype=d.get("torch_dtype", d.get("dtype")),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except ValueError as e:
            raise ModelError(where, f"inconsistent hyper-parameters: {e}") from None

    def to_hf_dict(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = dict(self.extra)
        d.update(
            architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        d.pop("rope_parameters", None)
        return d

    @classmethod
    def from_dir(cls, model_dir) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelError(str(path), "no config.json (expected a Hugging Face model folder)")
        return cls.from_hf_dict(read_json_object(path), where=str(path))


def llama3_inv_freq(inv_freq, scaling: dict):
    """Llama 3.1 RoPE scaling: stretch low frequencies by ``factor``, keep high ones,
    interpolate smoothly in between (the published llama3 recipe)."""
    import torch

    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
