"""Reliability (issue 9): crafted and corrupted files: safetensors headers claiming huge sizes,
bit-flipped / truncated model, adapter and GGUF files. Rows of docs/reliability.md."""
from __future__ import annotations

import json
import shutil
import struct
import time
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leantune.base import ModelError
from leantune.peft_core.safetensors_io import SafetensorsFile
from tests.helpers import tiny_model_dir
from tests.reliability_helpers import (  # noqa: F401  (fixtures are imported by name)
    assert_contract, base, data_start, flip_bit, fuzz, fuzz_dir, _gguf_data_offset,
    monkeypatch_module, one_thread, run_cli, tiny_gguf)


# ------------------------------------------------------------------------------------------
# 6. crafted and corrupted files: safetensors, adapters, GGUF
# ------------------------------------------------------------------------------------------
def _st(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


CRAFTED_SAFETENSORS = {
    "header length 2^63": (_st({}, length=2**63), "header claims"),
    "2^62 elements claimed": (_st({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**64]}}),
                              "truncated"),
    "offsets past the end": (_st({"w": {"dtype": "F32", "shape": [2**20], "data_offsets": [0, 2**22]}}),
                             "truncated"),
    "offsets disagree with shape": (_st({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16),
                                    "do not match"),
    "negative dimension": (_st({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}), "negative"),
    "5000-digit dimension": (_st(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'),
                             "corrupt safetensors header"),
    "nested 100000 deep": (_st(b"[" * 100_000), "nested too deeply"),
    "header not an object": (_st([1, 2]), "not a JSON object"),
    "metadata not a table": (_st({"__metadata__": [1]}), "__metadata__"),
    "unknown dtype": (_st({"w": {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "malformed"),
    "header not UTF-8": (_st(b'{"\xff": 1}'), "corrupt safetensors header"),
    "7 bytes": (b"\x05\0\0\0\0\0\0", "no header"),
}


@pytest.mark.parametrize("name", list(CRAFTED_SAFETENSORS))
def test_crafted_safetensors_rejected_before_any_large_allocation(tmp_path, name):
    content, message = CRAFTED_SAFETENSORS[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelError, match=message) as err:
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.where == str(path) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 1.0 and peak < (2 << 20), peak  # < 2 MiB for any claim


@fuzz(40)
@given(data=st.data())
def test_fuzz_bit_flipped_or_truncated_model_file(fuzz_dir, data):
    """model.safetensors with one bit flipped in its header, or cut anywhere: generate either
    works (a flip in a value) or stops with exit 4 and one line."""
    d = fuzz_dir / "flipped-model"
    if not d.exists():
        shutil.copytree(fuzz_dir / "model", d)
        (fuzz_dir / "model.safetensors.orig").write_bytes((d / "model.safetensors").read_bytes())
    raw = (fuzz_dir / "model.safetensors.orig").read_bytes()
    (d / "model.safetensors").write_bytes(raw)
    if data.draw(st.booleans()):
        flip_bit(d / "model.safetensors", data.draw(st.integers(0, 8 * data_start(d / "model.safetensors") - 1)))
    else:
        (d / "model.safetensors").write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    code, _, err = run_cli(["generate", d, "--prompt", "the", "--max-new-tokens", "1"])
    assert_contract(code, err, {0, 4})


ADAPTER_KEYS = ["r", "lora_alpha", "target_modules", "peft_type", "use_dora", "use_rslora", "rank_pattern",
                "alpha_pattern", "layers_to_transform", "exclude_modules", "init_lora_weights", "bias",
                "lora_dropout", "layers_pattern", "modules_to_save", "fan_in_fan_out"]
json_value = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.floats() | st.text(max_size=8)
                          | st.sampled_from(["q_proj", "v_proj", "LORA", ".*", "(", "all-linear", "pissa", "none"]),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=2),
                          max_leaves=6)


@fuzz(40)
@given(data=st.data())
def test_fuzz_corrupted_adapter(fuzz_dir, data):
    """adapter_config.json with keys set to random values, or a bit flipped in the header of
    adapter_model.safetensors: the adapter loads or generate stops with exit 4 and one line."""
    d = fuzz_dir / "fuzzed-adapter"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(fuzz_dir / "adapter", d)
    if data.draw(st.booleans()):
        cfg = json.loads((d / "adapter_config.json").read_text())
        for k in data.draw(st.lists(st.sampled_from(ADAPTER_KEYS), min_size=1, max_size=3)):
            cfg[k] = data.draw(json_value)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    else:
        w = d / "adapter_model.safetensors"
        flip_bit(w, data.draw(st.integers(0, 8 * data_start(w) - 1)))
    code, _, err = run_cli(["generate", fuzz_dir / "model", "--adapter", d, "--prompt", "the",
                            "--max-new-tokens", "1"])
    assert_contract(code, err, {0, 4})


def test_adapter_for_another_base_is_refused_with_the_first_key(fuzz_dir, tmp_path):
    """leantune merge / generate --adapter with a model of another shape: exit 4, the first
    offending key in the one line (the API level is tests/test_lora.py's
    test_adapter_for_another_base_names_the_first_offending_key)."""
    other = tiny_model_dir(tmp_path / "other", hidden_size=48)
    code, _, err = run_cli(["merge", other, fuzz_dir / "adapter", tmp_path / "merged"])
    assert_contract(code, err, {4})
    assert "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape [2, 64]" in err
    assert "another base model" in err and not (tmp_path / "merged").exists()



@fuzz(60)
@given(data=st.data())
def test_fuzz_bit_flipped_or_truncated_gguf(fuzz_dir, tiny_gguf, data):
    """A tiny Q8_0 GGUF with a bit flipped in its header, metadata or tensor table (the parts
    a reader trusts), or cut anywhere: import-gguf works or exits 4 with one line."""
    raw = tiny_gguf.read_bytes()
    path = fuzz_dir / "fuzzed.gguf"
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, 8 * _gguf_data_offset(tiny_gguf) - 1))
        path.write_bytes(raw)
        flip_bit(path, bit)
    else:
        path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    out = fuzz_dir / "gguf-out"
    shutil.rmtree(out, ignore_errors=True)
    code, _, err = run_cli(["import-gguf", path, out])
    assert_contract(code, err, {0, 4})

