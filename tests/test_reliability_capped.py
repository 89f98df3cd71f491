"""Crafted inputs under a memory cap (issue 22; a second, independent set beside
tests/test_reliability_crafted.py): files and flags built to make leantune allocate without bound,
crash a native library, overwrite good files or hang. Every command runs in a child under a
memory cap (``tests/capped_cli.py``: ``RLIMIT_AS`` = its size + 1.5 GB), so a regression
fails its test with MemoryError instead of taking the machine down. Each case must end in a
contract status with one short ``leantune: error:`` line, never ``internal:``."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.capped_cli import GB, CappedCLI
from tests.helpers import tiny_model_dir
from tests.test_train_loop import write_config, write_data

LINE_CAP = 800  # the longest error line a test accepts ("a few hundred characters")


@pytest.fixture(scope="module")
def cli():
    with CappedCLI() as c:
        yield c


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("crafted") / "model", "llama", seed=0)


def check(result, code: int, *needles: str):
    got, out, err, grown = result
    lines = err.splitlines()
    assert got == code, (got, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("leantune: error: "), err[-2000:]
    assert "internal:" not in err and len(lines[0]) <= LINE_CAP, lines[0][:2000]
    for n in needles:
        assert n in err, (n, err)
    assert grown < GB, grown
    return lines[0]


def copy_model(src: Path, dst: Path, **config) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            if v is KeyError:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def generate(cli, model_dir, *extra):
    return cli.run(["generate", model_dir, "--prompt", "hi", "--max-new-tokens", "2", *extra])


# ------------------------------------------------------------------------------------------
# sizes from a file, checked against the tensors present before anything is allocated
# ------------------------------------------------------------------------------------------
def _patch_gguf_u32(path: Path, key: str, value: int):
    raw = bytearray(path.read_bytes())
    k = key.encode()
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack_from("<I", raw, at)[0] == 4  # GGUF type UINT32
    struct.pack_into("<I", raw, at + 4, value)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    from tests.test_gguf_import import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, qtype="F32")
    return path


@pytest.mark.parametrize("layers", [0xFFFFFFFF, 10**6])
def test_gguf_block_count_beyond_the_tensors_present(cli, gguf_file, tmp_path, layers):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(gguf_file.read_bytes())
    _patch_gguf_u32(path, "llama.block_count", layers)
    check(cli.run(["import-gguf", path, tmp_path / "out"]), 4, "block_count")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", 10**9, "num_hidden_layers"),
    ("head_dim", 2**30, "head_dim"),
    ("num_key_value_heads", 0, "num_key_value_heads"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("num_key_value_heads", -2, "num_key_value_heads"),
    ("head_dim", -8, "head_dim"),
    ("rms_norm_eps", "abc", "rms_norm_eps"),
    ("rope_parameters", [1, 2], "rope_parameters"),
    ("rope_scaling", {"rope_type": "llama3"}, "factor"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0}, "factor"),
    ("quantization_config", "nf4", "quantization_config"),
    ("quantization_config", [1], "quantization_config"),
    ("vocab_size", 10**12, "vocab_size"),
    ("hidden_size", 2**40, ""),
    ("intermediate_size", 10**4000, ""),
], ids=lambda v: str(v)[:24] if not isinstance(v, int) or v < 10**20 else "huge")
def test_crafted_config_json_is_a_model_error(cli, model, tmp_path, key, value, needle):
    d = copy_model(model, tmp_path / "m", **{key: value})
    check(generate(cli, d), 4, needle)


def test_mistral_sliding_window_not_a_number(cli, model, tmp_path):
    d = copy_model(model, tmp_path / "m", model_type="mistral", sliding_window="x",
                   architectures=["MistralForCausalLM"])
    check(generate(cli, d), 4, "sliding_window")


def test_model_vocab_smaller_than_the_tokenizer(cli, tmp_path):
    d = tiny_model_dir(tmp_path / "m", "llama", seed=0, vocab_size=200)  # byte tokenizer: ids up to 258
    check(cli.run(["generate", d, "--prompt", "\u4e2d\u6587", "--max-new-tokens", "2"]), 4, "vocab")


def test_float_weight_stored_as_int32(cli, model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].to(torch.int32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    check(generate(cli, d), 4, "up_proj")


# ------------------------------------------------------------------------------------------
# crafted 4-bit checkpoints
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(cli, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "q"
    code, _, err, _ = cli.run(["quantize", model, out])
    assert code == 0, err
    return out


QS = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def _edit_quant(src: Path, dst: Path, edit) -> Path:
    copy_model(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _qs_edit(text_fn):
    def edit(sd):
        meta = bytes(sd[QS].tolist()).decode()
        sd[QS] = torch.tensor(list(text_fn(meta).encode()), dtype=torch.uint8)
    return edit


@pytest.mark.parametrize("case,edit", [
    ("5000-digit blocksize", _qs_edit(lambda m: m.replace('"blocksize": 64', '"blocksize": 1' + "0" * 5000))),
    ("nested_blocksize 2^62", _qs_edit(lambda m: json.dumps(dict(json.loads(m), nested_blocksize=2**62)))),
    ("extra key [2^64, 0]", None),
])
def test_crafted_quant_state_is_a_model_error(cli, quantized, tmp_path, case, edit):
    if edit is None:  # an extra tensor beside a 4-bit weight whose shape overflows int64
        d = copy_model(quantized, tmp_path / "m")
        raw = (d / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header["model.layers.0.self_attn.q_proj.weight.extra"] = {
            "dtype": "U8", "shape": [2**64, 0], "data_offsets": [0, 0]}
        hb = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    else:
        d = _edit_quant(quantized, tmp_path / "m", edit)
    line = check(generate(cli, d), 4)
    assert "c10::" not in line and "frame #" not in line


# ------------------------------------------------------------------------------------------
# one huge string: bounded before the tokenizer sees it
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def huge_line_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": "short record"}) + "\n")
        f.write('{"text": "' + "ab " * (50 * 2**20 // 3) + '"}\n')
    return path


def test_a_50_mb_record_is_refused_by_line_in_train(cli, tmp_path, huge_line_data):
    conf = write_config(tmp_path, data={"train": str(huge_line_data), "eval": str(huge_line_data)})
    check(cli.run(["train", conf], timeout=120), 3, f"{huge_line_data}:2")


def test_a_50_mb_record_is_refused_by_line_in_data_check(cli, model, huge_line_data):
    check(cli.run(["data", "check", huge_line_data, "--tokenizer", model], timeout=120), 3, ":2")


def test_a_chat_template_rendering_200_mb_is_refused(cli, model, tmp_path):
    d = copy_model(model, tmp_path / "m")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ 'ab' * 10**8 }}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    res = cli.run(["generate", d, "--chat", "hi", "--max-new-tokens", "2"], timeout=120)
    check(res, res[0] if res[0] in (2, 3) else 2)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    conf = write_config(tmp_path, model={"path": str(d)}, data={"train": str(data), "eval": str(data)})
    check(cli.run(["train", conf], timeout=120), 3, f"{data}:1")


# ------------------------------------------------------------------------------------------
# import-gguf writes nothing until everything is validated
# ------------------------------------------------------------------------------------------
def test_import_gguf_failing_late_leaves_an_existing_folder_alone(cli, gguf_file, model, tmp_path):
    out = copy_model(model, tmp_path / "existing")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    path = tmp_path / "i32.gguf"
    raw = bytearray(gguf_file.read_bytes())
    # the type of blk.1.ffn_down.weight (F32 = 0) becomes I32 (26) in the tensor table
    k = b"blk.1.ffn_down.weight"
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", raw, type_at)[0] == 0
    struct.pack_into("<I", raw, type_at, 26)
    path.write_bytes(bytes(raw))
    check(cli.run(["import-gguf", path, out]), 4)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


# ------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------
def test_max_new_tokens_beyond_the_context_is_a_usage_error(cli, model):
    check(cli.run(["generate", model, "--prompt", "hi", "--max-new-tokens", "3000000"]), 2, "--max-new-tokens")


# ------------------------------------------------------------------------------------------
# data files
# ------------------------------------------------------------------------------------------
def test_a_4301_digit_integer_in_jsonl(cli, tmp_path):
    data = tmp_path / "big.jsonl"
    write_data(data)
    with open(data, "a") as f:
        f.write('{"text": "x", "n": 1' + "0" * 4400 + "}\n")
    n = len(data.read_text().splitlines())
    conf = write_config(tmp_path, data={"train": str(data), "eval": str(data)})
    check(cli.run(["train", conf], timeout=120), 3, f"{data}:{n}")
    check(cli.run(["data", "check", data]), 3)
    res = cli.run(["data", "check", data])
    assert f":{n}" in res[1] + res[2]


def test_not_a_regular_file_is_refused(cli, tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for argv in (["data", "check", fifo], ["data", "stats", "/dev/zero"], ["data", "check", tmp_path]):
        check(cli.run(argv, timeout=20), 3, "regular file")
    conf = write_config(tmp_path, data={"train": str(fifo), "eval": str(fifo)})
    check(cli.run(["train", conf], timeout=60), 3, "regular file")


def test_dedup_refuses_to_overwrite_its_input(cli, tmp_path):
    data = tmp_path / "d.jsonl"
    write_data(data)
    before = data.read_bytes()
    check(cli.run(["data", "dedup", data, "--out", tmp_path / "o.jsonl", "--report", data]), 2, "--report")
    assert data.read_bytes() == before


def test_error_lines_are_capped():
    from leantune.base import DataError

    e = DataError("f.jsonl:3", "x" * 100_000)
    assert len(str(e)) <= 1000 and str(e).startswith("f.jsonl:3: xxx")
    assert len(DataError("w" * 100_000, "what").where) <= 500


# ------------------------------------------------------------------------------------------
# an older checkpoint (state.json without sha256s) with wrong shapes or a short RNG state
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def old_run(cli, tmp_path_factory):
    root = tmp_path_factory.mktemp("oldckpt")
    conf = write_config(root, train={"max_steps": 2, "save_every": 2})
    code, _, err, _ = cli.run(["train", conf], timeout=300)
    assert code == 0, err
    return root, conf


def _old_format_copy(old_run, tmp_path, edit):
    import shutil

    root, conf = old_run
    run = root / "run"
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    ckpt = dst / "checkpoints" / "step-2"
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("files", None)  # the older format: no sha256s, so a damaged file is not caught early
    (ckpt / "state.json").write_text(json.dumps(state))
    edit(ckpt)
    text = conf.read_text().replace(str(run), str(dst))
    new_conf = tmp_path / "run.toml"
    new_conf.write_text(text)
    return new_conf


def _wrong_shapes(ckpt):
    sd = load_file(str(ckpt / "trainable.safetensors"))
    name = sorted(sd)[0]
    sd[name] = torch.zeros(3, 5)
    save_file(sd, str(ckpt / "trainable.safetensors"))


def _short_rng(ckpt):
    sd = load_file(str(ckpt / "rng.safetensors"))
    sd = {k: v[:7].clone() for k, v in sd.items()}
    save_file(sd, str(ckpt / "rng.safetensors"))


@pytest.mark.parametrize("edit", [_wrong_shapes, _short_rng], ids=["wrong-shapes", "rng-7-bytes"])
def test_old_format_checkpoint_with_bad_tensors_is_a_model_error(cli, old_run, tmp_path, edit):
    conf = _old_format_copy(old_run, tmp_path, edit)
    check(cli.run(["train", conf, "--resume"], timeout=300), 4, "step-2")
