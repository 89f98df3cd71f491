"""The bitsandbytes 4-bit checkpoint format (quant/serialize.py).

Round trips and validation always run; parity with what transformers + bitsandbytes save
runs when they are installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leantune.base import ModelError, UsageError
from leantune.quant import functional as F
from leantune.peft_core.quant_checkpoint import quantization_config_dict, quantize_checkpoint, state_from_tensors, state_to_tensors

DOUBLE_QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _json(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode("utf-8")


# ---------------------------------------------------------------------------------------
# state <-> tensors


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_round_trip(quant_type, double_quant):
    torch.manual_seed(0)
    w = torch.randn(24, 41, dtype=torch.bfloat16)
    packed, st = F.quantize_4bit(w, blocksize=32, quant_type=quant_type, double_quant=double_quant)
    t = state_to_tensors("model.layers.0.mlp.up_proj", packed, st)
    p = "model.layers.0.mlp.up_proj.weight"
    expected_keys = {p, f"{p}.absmax", f"{p}.quant_map", f"{p}.quant_state.bitsandbytes__{quant_type}"}
    if double_quant:
        expected_keys |= {f"{p}.nested_absmax", f"{p}.nested_quant_map"}
    assert set(t) == expected_keys
    assert t[p].dtype == torch.uint8 and t[p].shape == (492, 1)
    assert t[f"{p}.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
    meta = {"quant_type": quant_type, "blocksize": 32, "dtype": "bfloat16", "shape": [24, 41]}
    if double_quant:
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=st.nested.offset)
    # bitsandbytes writes json.dumps(...) with the default separators, in this key order
    assert _json(t[f"{p}.quant_state.bitsandbytes__{quant_type}"]) == json.dumps(meta)

    packed2, st2 = state_from_tensors("model.layers.0.mlp.up_proj", t)
    assert _bits_equal(packed2, packed)
    assert (st2.quant_type, st2.blocksize, st2.shape, st2.dtype) == (quant_type, 32, (24, 41), torch.bfloat16)
    assert _bits_equal(st2.absmax, st.absmax) and _bits_equal(st2.code, st.code)
    if double_quant:
        assert _bits_equal(st2.nested.absmax, st.nested.absmax) and _bits_equal(st2.nested.code, st.nested.code)
        assert (st2.nested.offset, st2.nested.blocksize) == (st.nested.offset, 256)
    assert _bits_equal(F.dequantize_4bit(packed2, st2), F.dequantize_4bit(packed, st))


def _valid_tensors(double_quant=True, quant_type="nf4"):
    packed, st = F.quantize_4bit(torch.randn(16, 40), blocksize=64, quant_type=quant_type, double_quant=double_quant)
    return dict(state_to_tensors("m", packed, st))


@pytest.mark.parametrize("key", ["m.weight", "m.weight.absmax", "m.weight.quant_map", "m.weight.nested_absmax",
                                 "m.weight.nested_quant_map", "m.weight.quant_state.bitsandbytes__nf4"])
def test_missing_key(key):
    t = _valid_tensors()
    del t[key]
    with pytest.raises(ModelError) as e:
        state_from_tensors("m", t)
    assert e.value.where == key and e.value.exit_code == 4


def _with_meta(t, **change):
    key = "m.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(_json(t[key]))
    for k, v in change.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    t[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return t


@pytest.mark.parametrize("change,match", [
    (dict(blocksize=48), "blocksize"),
    (dict(blocksize="64"), "integer"),
    (dict(quant_type="fp4"), "does not match"),
    (dict(dtype="int8"), "dtype"),
    (dict(shape=[16, 41]), "bytes"),
    (dict(shape=[640]), None),  # same numel: a valid reinterpretation
    (dict(shape="16x40"), "shape"),
    (dict(nested_offset=None), "nested_offset"),
    (dict(nested_blocksize=4), "nested blocks"),
    (dict(dtype=None), "dtype"),
])
def test_bad_quant_state(change, match):
    t = _with_meta(_valid_tensors(), **change)
    if match is None:
        packed, st = state_from_tensors("m", t)
        assert st.shape == (640,)
        return
    with pytest.raises(ModelError, match=match):
        state_from_tensors("m", t)


def test_bad_tensors():
    t = _valid_tensors()
    t["m.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ModelError, match="JSON") as e:
        state_from_tensors("m", t)
    assert e.value.where == "m.weight.quant_state.bitsandbytes__nf4"
    t = _valid_tensors()
    t["m.weight.absmax"] = t["m.weight.absmax"][:-1]
    with pytest.raises(ModelError, match="expected 10") as e:
        state_from_tensors("m", t)
    assert e.value.where == "m.weight.absmax"
    t = _valid_tensors()
    t["m.weight.quant_state.bitsandbytes__fp4"] = t["m.weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ModelError, match="both"):
        state_from_tensors("m", t)
    t = _valid_tensors(double_quant=False)
    t["m.weight.absmax"] = t["m.weight.absmax"].to(torch.int32)
    with pytest.raises(ModelError, match="float32"):
        state_from_tensors("m", t)


def test_state_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    for qt, dq, dtype in [("nf4", True, torch.bfloat16), ("fp4", False, torch.float32), ("nf4", False, torch.float16)]:
        w = torch.randn(32, 128, dtype=dtype)  # rows of whole blocks: bnb's CPU dequantize needs that
        pb, sb = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
        theirs = {"p.weight": pb, **{f"p.weight.{k}": v for k, v in sb.as_dict(packed=True).items()}}
        packed, st = F.quantize_4bit(w, blocksize=64, quant_type=qt, double_quant=dq)
        ours = state_to_tensors("p", packed, st)
        assert set(ours) == set(theirs)
        for k in ours:
            assert _bits_equal(ours[k], theirs[k]), k
        # and bitsandbytes reads ours back
        qs = bnb.functional.QuantState.from_dict({k[len("p.weight."):]: v for k, v in ours.items() if k != "p.weight"},
                                                 device="cpu")
        assert _bits_equal(bnb.functional.dequantize_4bit(ours["p.weight"], qs), F.dequantize_4bit(packed, st))


# ---------------------------------------------------------------------------------------
# quantization_config


def test_quantization_config_dict():
    d = quantization_config_dict("fp4", 128, False, torch.float16, ["lm_head"])
    assert d == {
        "quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True, "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": ["lm_head"], "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_storage": "uint8", "load_in_4bit": True,
        "load_in_8bit": False,
    }
    assert quantization_config_dict(compute_dtype=None)["bnb_4bit_compute_dtype"] == "float32"
    with pytest.raises(UsageError, match="blocksize"):
        quantization_config_dict(blocksize=96)
    with pytest.raises(UsageError, match="quant"):
        quantization_config_dict(quant_type="int4")
    with pytest.raises(UsageError, match="compute"):
        quantization_config_dict(compute_dtype="float8")


def test_quantization_config_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for qt, dq, cd, skip in [("nf4", True, torch.bfloat16, None), ("fp4", False, torch.float32, ["lm_head", "x"])]:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                                              bnb_4bit_compute_dtype=cd, llm_int8_skip_modules=skip)
        theirs = json.loads(cfg.to_json_string(use_diff=False))
        assert quantization_config_dict(qt, 64, dq, cd, skip) == theirs


# ---------------------------------------------------------------------------------------
# quantize_checkpoint


def _linear_names(n_layers=2):
    for i in range(n_layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            yield f"model.layers.{i}.{name}.weight"


def _dense_folder(path: Path, dtype=torch.bfloat16, shards=1, hidden=64, inter=96) -> dict:
    torch.manual_seed(0)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (32, hidden), "self_attn.v_proj": (32, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    tensors = {"model.embed_tokens.weight": torch.randn(50, hidden).to(dtype),
               "model.norm.weight": torch.ones(hidden, dtype=dtype),
               "lm_head.weight": torch.randn(50, hidden).to(dtype),
               "model.layers.0.self_attn.q_proj.bias": torch.randn(hidden).to(dtype)}
    for name in _linear_names():
        key = name.split(".", 3)[3].rsplit(".", 1)[0]
        tensors[name] = (torch.randn(shapes[key]) * 0.05).to(dtype)
    for i in range(2):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    path.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            part = {k: tensors[k] for k in names[s::shards]}
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                  "torch_dtype": "bfloat16"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return tensors


@pytest.mark.parametrize("shards", [1, 3])
def test_quantize_checkpoint(tmp_path, shards):
    dense = _dense_folder(tmp_path / "dense", shards=shards)
    calls = []
    out = quantize_checkpoint(tmp_path / "dense", tmp_path / "q4", quant_type="nf4", blocksize=64,
                              double_quant=True, compute_dtype="bfloat16", progress=lambda *a: calls.append(a))
    assert out == tmp_path / "q4" and len(calls) == len(dense) and calls[-1][:2] == (len(dense), len(dense))
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config_dict("nf4", 64, True, "bfloat16", None)
    assert config["hidden_size"] == 64
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    got = load_file(str(out / "model.safetensors"))
    linears = set(_linear_names())
    for name, t in dense.items():
        if name in linears:
            packed, st = F.quantize_4bit(t, blocksize=64, quant_type="nf4", double_quant=True)
            want = state_to_tensors(name[: -len(".weight")], packed, st)
            for k, v in want.items():
                assert _bits_equal(got.pop(k), v), k
        else:
            assert _bits_equal(got.pop(name), t), name
    assert got == {}


def test_quantize_checkpoint_errors(tmp_path):
    _dense_folder(tmp_path / "dense")
    with pytest.raises(UsageError, match="blocksize"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "o", blocksize=100)
    with pytest.raises(UsageError, match="quant"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "o", quant_type="q4")
    with pytest.raises(ModelError, match="not found"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    with pytest.raises(UsageError, match="not empty"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "o2")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="model.safetensors"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "o2")
    # a NaN weight: ModelError naming the tensor, and nothing written
    t = load_file(str(tmp_path / "dense" / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(t, str(tmp_path / "dense" / "model.safetensors"))
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        quantize_checkpoint(tmp_path / "dense", tmp_path / "o3")
    assert not (tmp_path / "o3").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_quantize_checkpoint_round_trip_empty_out_dir(tmp_path):
    _dense_folder(tmp_path / "dense", dtype=torch.float32)
    (tmp_path / "q").mkdir()  # an existing empty folder is replaced
    quantize_checkpoint(tmp_path / "dense", tmp_path / "q", quant_type="fp4", blocksize=128, double_quant=False)
    got = load_file(str(tmp_path / "q" / "model.safetensors"))
    packed, st = state_from_tensors("model.layers.1.mlp.down_proj", got)
    assert st.quant_type == "fp4" and st.blocksize == 128 and st.nested is None and st.dtype == torch.float32
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    want_packed, want_st = F.quantize_4bit(dense, blocksize=128, quant_type="fp4", double_quant=False)
    assert _bits_equal(F.dequantize_4bit(packed, st), F.dequantize_4bit(want_packed, want_st))


# ---------------------------------------------------------------------------------------
# parity with a checkpoint saved by transformers + bitsandbytes


@pytest.mark.parametrize("quant_type,double_quant,dtype", [("nf4", True, torch.bfloat16),
                                                           ("fp4", False, torch.float32)])
def test_matches_transformers_bnb_checkpoint(tmp_path, quant_type, double_quant, dtype):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(tmp_path / "dense")
    bc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                         bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=bc,
                                                          device_map="cpu", dtype=dtype)
    model.save_pretrained(tmp_path / "bnb")

    quantize_checkpoint(tmp_path / "dense", tmp_path / "ours", quant_type=quant_type, blocksize=64,
                        double_quant=double_quant, compute_dtype="bfloat16")
    theirs = load_file(str(tmp_path / "bnb" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert _bits_equal(ours[k], theirs[k]), k  # dtypes, shapes, values, JSON bytes
    c_ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    c_theirs = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert c_ours["quantization_config"] == c_theirs["quantization_config"]
    assert c_ours == c_theirs

    # their tensors read by us dequantize to what bitsandbytes dequantizes
    for name in _linear_names():
        prefix = name[: -len(".weight")]
        packed, st = state_from_tensors(prefix, theirs)
        param = model.get_submodule(prefix).weight
        assert _bits_equal(F.dequantize_4bit(packed, st), bnb.functional.dequantize_4bit(param.data, param.quant_state))
