"""Reliability (issue 22): crafted inputs that once took the machine down or ended in
``internal:`` (exit 1). Each case runs through the real command line in one child process
whose address space is capped (RLIMIT_AS, ``CAP_GB`` above its size after the imports), so
a regression fails with a MemoryError instead of exhausting the machine.

Each case names the argv and the exit status the contract asks for; every failure must be
one ``leantune: error: WHERE: WHAT`` line under 400 characters, never ``internal:``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leantune.peft_core.safetensors_io import read_safetensors, write_safetensors
from tests.helpers import tiny_model_dir
from tests.test_train_loop import ROOT, write_config

CAP_GB = 1.5  # address space a case may add above the child's size after its imports

# The child: imports, caps its address space, runs every argv in-process, one JSON line each.
CHILD = r"""
import contextlib, io, json, os, resource, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from leantune.cli import main

def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

cap = vm_size() + int({cap_gb} * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
for name, argv, cwd in json.load(open(sys.argv[1])):
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:
            code = 99
            err.write(f"escaped main: {{type(e).__name__}}: {{e}}")
    print("@@case " + json.dumps({{"name": name, "code": code, "err": err.getvalue()[-3000:],
                                   "out": out.getvalue()[-3000:]}}), flush=True)
"""


def run_capped(cases: dict, work: Path, timeout: float = 240, cap_gb: float = CAP_GB) -> dict:
    """``{name: (argv, cwd)}`` -> ``{name: {"code", "err", "out"}}``; a case the child never
    reported (it died) gets code None and the child's stderr tail."""
    spec = work / "cases.json"
    spec.write_text(json.dumps([[n, [str(a) for a in argv], str(cwd)] for n, (argv, cwd) in cases.items()]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
               TOKENIZERS_PARALLELISM="false")
    try:
        res = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), cap_gb=cap_gb), str(spec)],
                             cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = res.stdout, res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, rc = f"timed out after {timeout} s", "timeout"
    results = {}
    for line in stdout.splitlines():
        if line.startswith("@@case "):
            r = json.loads(line[len("@@case "):])
            results[r["name"]] = r
    for name in cases:
        results.setdefault(name, {"code": None, "out": "", "err": f"child died (rc {rc}): {stderr[-1500:]}"})
    return results


def check(result: dict, code: int, *fragments: str):
    """The expected exit status and one contract line; ``fragments`` appear in it or in the
    problems listed before it."""
    err = result["err"]
    assert result["code"] == code, (result["code"], err[-1500:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantune: error: "), err[-1500:]
    assert "internal:" not in err and "Traceback" not in err, err
    assert len(lines[0]) <= 400, f"error line of {len(lines[0])} characters"
    for frag in fragments:
        assert frag in err + result["out"], (frag, err, result["out"][-1500:])


# ------------------------------------------------------------------------------------------
# building the crafted files
# ------------------------------------------------------------------------------------------
def model_with_config(root: Path, name: str, **edits) -> Path:
    """A copy of the tiny model whose config.json has ``edits``."""
    d = root / name
    shutil.copytree(root / "model", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edits)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def raw_safetensors(path: Path, header: dict, data: bytes):
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def edit_header_text(path: Path, old: str, new: str):
    """Replace text inside a safetensors header (keeping the 8-byte length right)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = raw[8:8 + n].decode()
    assert old in head, old
    head = head.replace(old, new, 1).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])


def patch_gguf_u32_key(path: Path, key: str, value: int):
    """Set the uint32 metadata value of ``key`` in place (key, then type 4, then the value)."""
    raw = bytearray(path.read_bytes())
    k = key.encode()
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    assert struct.unpack("<I", raw[at:at + 4])[0] == 4, "not a uint32 key"
    raw[at + 4:at + 8] = struct.pack("<I", value)
    path.write_bytes(bytes(raw))


def patch_gguf_tensor_type(path: Path, tensor: str, ggml_type: int):
    """Change one tensor's type in the GGUF tensor table (name, n_dims, dims, type, offset)."""
    raw = bytearray(path.read_bytes())
    k = tensor.encode()
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    n_dims = struct.unpack("<I", raw[at:at + 4])[0]
    at += 4 + 8 * n_dims
    raw[at:at + 4] = struct.pack("<I", ggml_type)
    path.write_bytes(bytes(raw))


def quant_state_edit(model_dir: Path, fn):
    """Rewrite the first quant_state JSON of a 4-bit checkpoint with ``fn(state) -> text``."""
    path = model_dir / "model.safetensors"
    tensors = read_safetensors(path)
    key = next(k for k in sorted(tensors) if ".quant_state." in k)
    state = json.loads(bytes(tensors[key].tolist()).decode())
    tensors[key] = torch.tensor(list(fn(state).encode()), dtype=torch.uint8)
    write_safetensors(tensors, path, metadata={"format": "pt"})


GEN = ["--prompt", "hi", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Every crafted input, run once in one capped child: {case: result}."""
    root = tmp_path_factory.mktemp("crafted")
    tiny_model_dir(root / "model", "llama", seed=0)
    cases = {}

    def gen(name, model, *extra):
        cases[name] = (["generate", model, *GEN, *extra], root)

    # -- config.json: sizes checked against the tensors present; odd values are exit 4 --
    gen("layers-1e9", model_with_config(root, "layers", num_hidden_layers=10**9))
    gen("head-dim-2^30", model_with_config(root, "headdim", head_dim=2**30))
    for v in (0, 3, -2):
        gen(f"kv-heads-{v}", model_with_config(root, f"kv{v}", num_key_value_heads=v))
    gen("head-dim-neg", model_with_config(root, "hdneg", head_dim=-8))
    gen("eps-abc", model_with_config(root, "eps", rms_norm_eps="abc"))
    gen("rope-parameters-list", model_with_config(root, "ropelist", rope_parameters=[1, 2]))
    gen("llama3-no-factor", model_with_config(root, "l3", rope_scaling={"rope_type": "llama3"}))
    gen("sliding-window-x", model_with_config(root, "sw", model_type="mistral", sliding_window="x"))
    gen("quant-config-str", model_with_config(root, "qcs", quantization_config="nf4"))
    gen("quant-config-list", model_with_config(root, "qcl", quantization_config=[1]))
    gen("theta-str", model_with_config(root, "theta", rope_theta="x"))
    gen("max-pos-neg", model_with_config(root, "maxpos", max_position_embeddings=-1))
    # JSON nested 100 000 deep (json's decoder recurses once per level)
    for name, file in (("config-nested-deep", "config.json"), ("tokenizer-config-nested-deep", "tokenizer_config.json")):
        d = root / name
        shutil.copytree(root / "model", d)
        (d / file).write_text("[" * 100_000)
        gen(name, d)
    # a model whose vocabulary is smaller than the tokenizer's ids
    small = root / "small-vocab"
    tiny_model_dir(small, "llama", seed=0, vocab_size=100)
    gen("vocab-below-tokenizer", small)
    # a float weight stored as I32
    i32 = root / "i32"
    shutil.copytree(root / "model", i32)
    edit_header_text(i32 / "model.safetensors", '"model.norm.weight":{"dtype":"F32"',
                     '"model.norm.weight":{"dtype":"I32"')
    gen("float-weight-as-i32", i32)
    # -- 4-bit checkpoints with crafted quant states --
    q = root / "q4"
    from leantune.cli import main as cli_main
    assert cli_main(["quantize", str(root / "model"), str(q)]) == 0
    for name, fn in {
        "quant-state-5000-digits": lambda s: json.dumps({**s, "blocksize": 0}).replace(
            '"blocksize": 0', '"blocksize": ' + "9" * 5000),
        "nested-blocksize-2^62": lambda s: json.dumps({**s, "nested_blocksize": 2**62}),
    }.items():
        d = root / name
        shutil.copytree(q, d)
        quant_state_edit(d, fn)
        gen(name, d)
    d = root / "q4-extra-key"
    shutil.copytree(q, d)
    header, data = header_and_data(d / "model.safetensors")
    key = next(k for k in header if k.endswith(".weight.absmax"))
    header[key.replace(".absmax", ".bogus")] = {"dtype": "U8", "shape": [2**64, 0],
                                                "data_offsets": [len(data), len(data)]}
    raw_safetensors(d / "model.safetensors", header, data)
    gen("quant-extra-key-2^64", d)
    # -- lenient safetensors headers --
    for name in ("st-overlapping-offsets", "st-duplicate-names", "st-shape-string"):
        d = root / name
        shutil.copytree(root / "model", d)
        path = d / "model.safetensors"
        header, data = header_and_data(path)
        names = [k for k in header if k != "__metadata__"]
        if name == "st-overlapping-offsets":  # the second tensor starts inside the first
            a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
            begin = header[a]["data_offsets"][0]
            size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
            header[b] = dict(header[b], data_offsets=[begin, begin + size])
            raw_safetensors(path, header, data)
        elif name == "st-duplicate-names":
            text = json.dumps(header)
            text = text[:-1] + f', "{names[0]}": ' + json.dumps(header[names[0]]) + "}"
            head = text.encode()
            path.write_bytes(struct.pack("<Q", len(head)) + head + data)
        else:  # a shape "64" that a lenient reader takes as [6, 4]
            norm = "model.norm.weight"
            assert header[norm]["shape"] == [64]
            header[norm] = dict(header[norm], shape="64")
            raw_safetensors(path, header, data)
        gen(name, d)
    # -- generate --max-new-tokens beyond any context --
    cases["max-new-tokens-3e6"] = (["generate", root / "model", "--prompt", "hi", "--max-new-tokens", "3000000"],
                                   root)
    # -- GGUF: block_count 2^32 - 1; a tensor's type changed to I32 into an existing folder --
    pytest.importorskip("gguf")
    from tests.test_gguf_import import write_tiny_gguf

    g = root / "blocks.gguf"
    write_tiny_gguf(g, qtype="F32")
    patch_gguf_u32_key(g, "llama.block_count", 0xFFFFFFFF)
    cases["gguf-block-count-2^32"] = (["import-gguf", g, root / "gguf-out-1"], root)
    g = root / "i32.gguf"
    write_tiny_gguf(g, qtype="F32")
    patch_gguf_tensor_type(g, "blk.1.ffn_down.weight", 26)  # GGML_TYPE_I32, the last tensor converted
    existing = root / "existing"
    shutil.copytree(root / "model", existing)
    cases["gguf-i32-into-existing"] = (["import-gguf", g, existing], root)
    # -- data: huge records, numbers, special files, dedup onto its input, dropped lines --
    data = root / "data"
    data.mkdir()
    (data / "huge.jsonl").write_text('{"text": "ok"}\n' + json.dumps({"text": "ab" * (25 << 20)}) + "\n")
    (data / "long.jsonl").write_text('{"text": "ok"}\n' + json.dumps({"text": "ab " * (1 << 19)}) + "\n")
    (data / "bigint.jsonl").write_text('{"text": "ok"}\n{"text": "x", "n": ' + "7" * 5000 + "}\n")
    (data / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "yo"}]}) + "\n")
    tpl_model = root / "tpl-model"
    shutil.copytree(root / "model", tpl_model)
    tc = json.loads((tpl_model / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ 'ab' * 100000000 }}"
    (tpl_model / "tokenizer_config.json").write_text(json.dumps(tc))
    fifo = data / "fifo.jsonl"
    os.mkfifo(fifo)
    (data / "dedup.jsonl").write_text('{"text": "a"}\n{"text": "a"}\n')
    (data / "drop.jsonl").write_text('{"prompt": "a", "completion": "b"}\n'
                                     + "\n".join(json.dumps({"prompt": "p" * 300, "completion": "c"})
                                                 for _ in range(3)) + "\n")
    (root / "cfgs").mkdir()

    def train_cfg(name, train_file, model=None, **data_keys):
        cfg = write_config(root / "cfgs", name, data={"train": str(train_file), "eval": str(train_file),
                                                      **data_keys},
                           train={"max_steps": 1, "save_every": 0})
        if model is not None:
            text = cfg.read_text().replace(json.dumps(str(root / "cfgs" / "model")), json.dumps(str(model)))
            cfg.write_text(text)
        return cfg

    cases["train-50mb-line"] = (["train", train_cfg("huge", data / "huge.jsonl")], root)
    cases["train-long-record"] = (["train", train_cfg("long", data / "long.jsonl")], root)
    cases["train-template-2e8"] = (["train", train_cfg("tpl", data / "chat.jsonl", tpl_model)], root)
    cases["generate-template-2e8"] = (["generate", tpl_model, "--chat", "hi", "--max-new-tokens", "2"], root)
    cases["train-int-5000-digits"] = (["train", train_cfg("bigint", data / "bigint.jsonl")], root)
    cases["check-int-5000-digits"] = (["data", "check", data / "bigint.jsonl"], root)
    cases["check-fifo"] = (["data", "check", fifo], root)
    cases["train-dev-zero"] = (["train", train_cfg("zero", "/dev/zero")], root)
    cases["dedup-report-onto-input"] = (["data", "dedup", data / "dedup.jsonl", "--out", data / "dedup-out.jsonl",
                                         "--report", data / "dedup.jsonl"], root)
    small_cfg = train_cfg("small-vocab", data / "drop.jsonl")
    small_cfg.write_text(small_cfg.read_text().replace(json.dumps(str(root / "cfgs" / "model")),
                                                       json.dumps(str(small))))
    cases["train-vocab-below-tokenizer"] = (["train", small_cfg], root)
    cases["train-drops-named"] = (["train", train_cfg("drop", data / "drop.jsonl", max_len=16)], root)
    # an error line holding a long name is cut to a few hundred characters
    long_name = root / ("x" * 200) / ("y" * 200) / "missing-model"
    cases["long-error-line"] = (["generate", long_name, "--prompt", "hi"], root)
    results = run_capped(cases, root)
    results["_root"] = root
    return results


# ------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,fragment", [
    ("layers-1e9", "num_hidden_layers"),
    ("head-dim-2^30", "head_dim"),
    ("gguf-block-count-2^32", "block_count"),
])
def test_huge_layer_counts_and_dims_are_refused_before_allocating(crafted, case, fragment):
    check(crafted[case], 4, fragment)


@pytest.mark.parametrize("case", [
    "kv-heads-0", "kv-heads-3", "kv-heads--2", "head-dim-neg", "eps-abc", "rope-parameters-list",
    "llama3-no-factor", "sliding-window-x", "quant-config-str", "quant-config-list", "theta-str",
    "max-pos-neg", "config-nested-deep", "tokenizer-config-nested-deep", "vocab-below-tokenizer", "float-weight-as-i32", "quant-state-5000-digits",
    "nested-blocksize-2^62", "quant-extra-key-2^64",
])
def test_odd_config_and_checkpoint_values_are_model_errors(crafted, case):
    check(crafted[case], 4)
    assert "c10::" not in crafted[case]["err"] and "frame #" not in crafted[case]["err"]


def test_a_model_vocab_smaller_than_the_tokenizer_in_train(crafted):
    check(crafted["train-vocab-below-tokenizer"], 4, "vocab_size")


@pytest.mark.parametrize("case", ["st-overlapping-offsets", "st-duplicate-names", "st-shape-string"])
def test_lenient_safetensors_headers_are_refused(crafted, case):
    check(crafted[case], 4)


def test_max_new_tokens_beyond_the_context_is_a_usage_error(crafted):
    check(crafted["max-new-tokens-3e6"], 2, "--max-new-tokens")


def test_import_gguf_writes_nothing_until_everything_is_valid(crafted):
    check(crafted["gguf-i32-into-existing"], 4)
    root = crafted["_root"]
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (root / "existing" / name).read_bytes() == (root / "model" / name).read_bytes(), name
    assert not [p for p in (root / "existing").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case,fragment", [
    ("train-50mb-line", "huge.jsonl:2"),
    ("train-long-record", "long.jsonl:2"),
    ("train-template-2e8", "chat.jsonl:1"),
    ("train-int-5000-digits", "bigint.jsonl:2"),
    ("check-int-5000-digits", "bigint.jsonl:2"),
    ("check-fifo", "regular file"),
    ("train-dev-zero", "regular file"),
])
def test_huge_records_and_special_files_are_data_errors(crafted, case, fragment):
    check(crafted[case], 3, fragment)


def test_a_template_rendering_too_much_text_for_generate(crafted):
    r = crafted["generate-template-2e8"]
    assert r["code"] in (2, 3), r
    check(r, r["code"])


def test_dedup_report_onto_its_input_is_refused(crafted):
    check(crafted["dedup-report-onto-input"], 2, "--report")
    assert (crafted["_root"] / "data" / "dedup.jsonl").read_text() == '{"text": "a"}\n{"text": "a"}\n'


def test_records_dropped_for_max_len_are_named_by_line(crafted):
    r = crafted["train-drops-named"]
    assert r["code"] == 0, r["err"][-2000:]
    assert "lines 2, 3, 4" in r["out"] + r["err"], (r["out"] + r["err"])[-2000:]


def test_error_lines_are_capped(crafted):
    check(crafted["long-error-line"], 4)
    from leantune.base import LeantuneError

    e = LeantuneError("where", "w" * 100_000)
    assert len(str(e)) <= 400 and str(e).endswith("...")


# ------------------------------------------------------------------------------------------
# hypothesis over config.json fields and GGUF metadata: bounded memory, never "internal:"
# ------------------------------------------------------------------------------------------
CONFIG_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "rope_parameters", "max_position_embeddings", "sliding_window", "use_sliding_window",
                 "model_type", "tie_word_embeddings", "quantization_config", "bos_token_id", "eos_token_id",
                 "pad_token_id", "torch_dtype"]
GGUF_U32 = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "rope.dimension_count"]
FUZZ_CAP_GB = 1.0


def _fuzz_strategies():
    from hypothesis import strategies as st

    edge_int = st.sampled_from([0, 1, 2, 3, -1, -2, 16, 64, 2**31, 2**32 - 1, 2**62, 2**64, 10**9, 10**100])
    scalar = (st.none() | st.booleans() | edge_int | st.integers(-300, 300) | st.floats()
              | st.sampled_from(["llama", "mistral", "qwen2", "llama3", "default", "x", ""]))
    value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings", "quant_method", "load_in_4bit", "x"]), c, max_size=4),
        max_leaves=8)
    config_edit = st.dictionaries(st.sampled_from(CONFIG_FIELDS), value, min_size=1, max_size=3)
    gguf_edit = st.dictionaries(st.sampled_from(GGUF_U32), st.integers(0, 2**32 - 1) | st.sampled_from(
        [0, 1, 2, 3, 4, 15, 16, 17, 32, 64, 96, 2**31, 2**32 - 1]), min_size=1, max_size=2)
    return config_edit, gguf_edit


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """Drawn with hypothesis (fixed seed), then run together in one child capped at
    FUZZ_CAP_GB above its baseline: {case: (what was fuzzed, result)}."""
    from hypothesis import given, settings

    config_edit, gguf_edit = _fuzz_strategies()
    root = tmp_path_factory.mktemp("fuzz22")
    tiny_model_dir(root / "model", "llama", seed=0)
    cases, inputs = {}, {}

    @settings(max_examples=40, derandomize=True, database=None, deadline=None)
    @given(edit=config_edit)
    def draw_configs(edit):
        name = f"config-{len(inputs)}"
        text = json.dumps(edit, default=str)
        if len(text) > 1 << 20:
            return
        inputs[name] = text
        d = root / name
        shutil.copytree(root / "model", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(edit)
        (d / "config.json").write_text(json.dumps(cfg))
        cases[name] = (["generate", d, *GEN], root)

    draw_configs()
    pytest.importorskip("gguf")
    from tests.test_gguf_import import write_tiny_gguf

    write_tiny_gguf(root / "base.gguf", qtype="F32")
    base_bytes = (root / "base.gguf").read_bytes()

    @settings(max_examples=25, derandomize=True, database=None, deadline=None)
    @given(edit=gguf_edit)
    def draw_ggufs(edit):
        name = f"gguf-{len(inputs)}"
        inputs[name] = json.dumps(edit)
        path = root / f"{name}.gguf"
        path.write_bytes(base_bytes)
        for key, value in edit.items():
            patch_gguf_u32_key(path, f"llama.{key}", value)
        cases[name] = (["import-gguf", path, root / f"{name}-out"], root)

    draw_ggufs()
    results = run_capped(cases, root, timeout=240, cap_gb=FUZZ_CAP_GB)
    return {name: (inputs[name], results[name]) for name in cases}


def test_fuzz_config_and_gguf_fields_stay_bounded_and_never_internal(fuzzed):
    bad = []
    for name, (edit, r) in fuzzed.items():
        err = r["err"]
        lines = err.splitlines()
        ok = (r["code"] in (0, 2, 4) and "internal:" not in err and "Traceback" not in err
              and (r["code"] == 0 or (len(lines) == 1 and lines[0].startswith("leantune: error: "))))
        if not ok:
            bad.append(f"{name} {edit}: exit {r['code']}: {err[-300:]}")
    assert not bad, "\n".join(bad)
    assert len(fuzzed) >= 40
