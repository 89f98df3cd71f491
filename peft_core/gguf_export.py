"""A Hugging Face model folder (dense, e.g. the output of ``leantune merge``) to a GGUF file
for llama.cpp and ollama: the inverse of ``gguf_import``.

``export_gguf(model_dir, out_path, qtype)`` writes GGUF v3 with

- metadata: ``general.*``, the ``{arch}.*`` hyper-parameters llama.cpp reads, and the
  byte-level BPE tokenizer (``tokenizer.ggml.*``: tokens by id, token types, merges, the
  pre-tokenizer name, special ids, add_bos/eos, the chat template);
- tensors under llama.cpp names (the table in ``gguf_import``), q_proj / k_proj rows of
  "llama" models permuted for llama.cpp's RoPE (``permute_qk``, the inverse of
  ``unpermute_qk``); Llama 3.1 RoPE scaling as the ``rope_freqs`` divisors.

Types (``qtype``): "f16" (2-D weights in fp16), "q8_0" or "q4_0" (2-D weights whose rows
are a multiple of 32 in ggml's blocks, the others in fp16); norms and biases stay F32. The
block quantizers follow ggml's reference ``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``
(ggml-quants.c) step by step, so the bytes equal the gguf package's.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from leantune.base import ModelError, UsageError
from leantune.peft_core.checkpoint import checkpoint_files
from leantune.peft_core.config import ModelConfig, llama3_inv_freq
from leantune.peft_core.gguf import DEFAULT_ALIGNMENT, GGML_TYPE_IDS, GGUF_MAGIC
from leantune.peft_core.gguf_import import (_CONTROL, _GLOBAL_TENSORS, _LAYER_TENSORS, _QWEN2_BIASES,
                                            _USER_DEFINED, IGNORE_MERGES_PRES,
                                            PRE_TOKENIZER_SPLITS)
from leantune.peft_core.safetensors_io import SafetensorsFile

QTYPES = ("f16", "q8_0", "q4_0")
FILE_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 7}  # general.file_type (llama_ftype)
_NORMAL, _UNUSED = 1, 5  # token types besides CONTROL / USER_DEFINED
# GGUF metadata value types
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9


# -- ggml's block quantizers --------------------------------------------------------------
def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """(n, 32k) float32 -> (n, 34k) bytes. Per block of 32: d = amax / 127 (stored fp16),
    q = round(x / d) as int8, rounding half away from zero (roundf)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    v = blocks * inv
    q = np.trunc(v + np.copysign(np.float32(0.5), v)).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(x.shape[0], -1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """(n, 32k) float32 -> (n, 18k) bytes. Per block of 32: d = m / -8 where m is the value
    of largest magnitude (stored fp16); q = min(15, trunc(x / d + 8.5)); value j in the low
    nibble of byte j, value j + 16 in its high nibble."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    pick = np.abs(blocks).argmax(axis=1)[:, None]  # the first of equal magnitudes, as ggml's `<`
    d = np.take_along_axis(blocks, pick, axis=1) / np.float32(-8)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(blocks * inv + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)
    return out.reshape(x.shape[0], -1)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``permute``: within each head, rows from halves
    ``[x0, x1, ..., y0, y1, ...]`` to pairs ``[x0, y0, x1, y1, ...]``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the parts of the file ----------------------------------------------------------------
def _check_supported(cfg: ModelConfig, where: str) -> str:
    if cfg.model_type not in ("llama", "qwen2"):
        raise ModelError(where, f"model_type {cfg.model_type!r}: export-gguf writes llama and qwen2 models")
    if cfg.attention_bias or cfg.mlp_bias or cfg.sliding_window:
        raise ModelError(where, "attention_bias, mlp_bias and sliding_window are not exported "
                                "(llama.cpp's llama graph has none of them)")
    if cfg.extra.get("quantization_config"):
        raise ModelError(where, "a 4-bit folder: export a dense one (`leantune merge` writes it)")
    meta_recipe = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    if cfg.rope_scaling and any(cfg.rope_scaling.get(k) != v for k, v in meta_recipe.items()):
        # llama.cpp stores the divisors only; its readers (and gguf_import) assume Meta's recipe
        raise ModelError(where, f"RoPE scaling {cfg.rope_scaling} is not Llama 3.1's recipe "
                                f"({meta_recipe}); it would not read back the same")
    return cfg.model_type


def _pre_name(tok: dict, where: str) -> str:
    """``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer that ``gguf_import`` rebuilds."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "default"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # one of DIGIT_PRES: digits isolated, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        ignore = bool((tok.get("model") or {}).get("ignore_merges"))
        for name, split in PRE_TOKENIZER_SPLITS.items():
            if split == regex and (name in IGNORE_MERGES_PRES) == ignore:
                return name
    raise ModelError(where, f"pre-tokenizer {kinds} has no llama.cpp name that leantune knows")


def tokenizer_metadata(model_dir: Path, cfg: ModelConfig) -> dict:
    """The ``tokenizer.ggml.*`` keys (and the chat template) of a byte-level BPE tokenizer."""
    path = model_dir / "tokenizer.json"
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        tok_cfg_path = model_dir / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(str(path), f"cannot read the tokenizer ({type(e).__name__}: {e})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(str(path), "export-gguf writes byte-level BPE tokenizers only")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, _NORMAL)
    for added in tok.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    n = max(cfg.vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta = {"tokenizer.ggml.model": (_STR, "gpt2"), "tokenizer.ggml.pre": (_STR, _pre_name(tok, str(path))),
            "tokenizer.ggml.tokens": (_ARR, (_STR, tokens)),
            "tokenizer.ggml.token_type": (_ARR, (_I32, [types.get(i, _UNUSED) for i in range(n)])),
            "tokenizer.ggml.merges": (_ARR, (_STR, merges)),
            "tokenizer.ggml.add_bos_token": (_BOOL, bool(tok_cfg.get("add_bos_token", False))),
            "tokenizer.ggml.add_eos_token": (_BOOL, bool(tok_cfg.get("add_eos_token", False)))}
    ids = {t: i for i, t in enumerate(tokens)}
    for key, name, fallback in (("bos_token_id", "bos_token", cfg.bos_token_id),
                                ("eos_token_id", "eos_token", cfg.eos_token_id),
                                ("padding_token_id", "pad_token", cfg.pad_token_id),
                                ("unknown_token_id", "unk_token", None)):
        text = tok_cfg.get(name)
        text = text.get("content") if isinstance(text, dict) else text
        token_id = ids.get(text, fallback if isinstance(fallback, int) else None)
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}"] = (_U32, token_id)
    template = tok_cfg.get("chat_template")
    if not isinstance(template, str) and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = (_STR, template)
    return meta


def model_metadata(cfg: ModelConfig, arch: str, name: str, qtype: str) -> dict:
    return {
        "general.architecture": (_STR, arch), "general.name": (_STR, name),
        "general.file_type": (_U32, FILE_TYPES[qtype]),
        f"{arch}.context_length": (_U32, cfg.max_position_embeddings),
        f"{arch}.embedding_length": (_U32, cfg.hidden_size),
        f"{arch}.feed_forward_length": (_U32, cfg.intermediate_size),
        f"{arch}.block_count": (_U32, cfg.num_hidden_layers),
        f"{arch}.attention.head_count": (_U32, cfg.num_attention_heads),
        f"{arch}.attention.head_count_kv": (_U32, cfg.num_key_value_heads),
        f"{arch}.attention.key_length": (_U32, cfg.head_dim),
        f"{arch}.attention.value_length": (_U32, cfg.head_dim),
        f"{arch}.rope.dimension_count": (_U32, cfg.head_dim),
        f"{arch}.rope.freq_base": (_F32, cfg.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": (_F32, cfg.rms_norm_eps),
        f"{arch}.vocab_size": (_U32, cfg.vocab_size),
    }


def gguf_tensors(model_dir: Path, cfg: ModelConfig, qtype: str):
    """Yield (llama.cpp name, ggml type name, ggml shape (innermost first), bytes) per tensor."""
    files = [SafetensorsFile(p) for p in checkpoint_files(model_dir)]
    where = {k: f for f in files for k in f.keys()}
    names = {hf: g for g, hf in _GLOBAL_TENSORS.items()}
    per_layer = dict(_LAYER_TENSORS, **(_QWEN2_BIASES if cfg.qkv_bias else {}))
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for g, hf in per_layer.items()})
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf, g in names.items():
        if hf not in where:
            raise ModelError(str(model_dir), f"tensor {hf} is missing")
        w = where[hf].read(hf, torch.float32).numpy()
        n_head = heads.get(g.split(".")[-2])
        if n_head is not None and cfg.model_type == "llama":
            w = permute_qk(w, n_head)
        yield (g, *_encode(w, qtype))
    if cfg.rope_scaling:
        head = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** head
        yield ("rope_freqs.weight", *_encode((inv_freq / llama3_inv_freq(inv_freq, cfg.rope_scaling)).numpy(), "f32"))


def _encode(w: np.ndarray, qtype: str) -> tuple[str, tuple, bytes]:
    shape = tuple(reversed(w.shape))  # ggml's ne: the innermost dimension first
    if w.ndim == 1 or qtype == "f32":
        return "F32", shape, w.astype(np.float32).tobytes()
    if qtype == "f16" or w.shape[-1] % 32:
        return "F16", shape, w.astype(np.float16).tobytes()
    quantize = quantize_q8_0 if qtype == "q8_0" else quantize_q4_0
    return qtype.upper(), shape, quantize(w).tobytes()


# -- the writer ---------------------------------------------------------------------------
def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


_SCALARS = {_U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?"}


def _value(vtype: int, value) -> bytes:
    if vtype == _STR:
        return _string(value)
    if vtype == _ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(_SCALARS[vtype], value)


def _pad(n: int) -> int:
    return -n % DEFAULT_ALIGNMENT


def write_gguf(path: Path, metadata: dict, tensors: list) -> None:
    """GGUF v3: header, metadata, tensor infos, then the aligned tensor data."""
    head = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, (vtype, value) in metadata.items():
        head += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
    offset = 0
    for name, type_name, shape, data in tensors:
        head += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        head += struct.pack("<IQ", GGML_TYPE_IDS[type_name], offset)
        offset += len(data) + _pad(len(data))
    head += b"\0" * _pad(len(head))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for _, _, _, data in tensors:
                f.write(data)
                f.write(b"\0" * _pad(len(data)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_gguf(model_dir, out_path, qtype: str = "f16") -> Path:
    """Write the dense model folder ``model_dir`` as a GGUF file (see the module docstring)."""
    if qtype not in QTYPES:
        raise UsageError("--type", f"{qtype!r} is not one of {', '.join(QTYPES)}")
    model_dir, out = Path(model_dir), Path(out_path)
    cfg = ModelConfig.from_dir(model_dir)
    arch = _check_supported(cfg, str(model_dir))
    metadata = {**model_metadata(cfg, arch, model_dir.resolve().name, qtype), **tokenizer_metadata(model_dir, cfg)}
    tensors = list(gguf_tensors(model_dir, cfg, qtype))
    if not out.parent.is_dir():
        raise UsageError(str(out), "the output's folder does not exist")
    write_gguf(out, metadata, tensors)
    return out
