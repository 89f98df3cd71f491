"""Reliability (issue 9): hypothesis over config TOML, ``--set`` overrides, JSONL data and the
command line: every input ends with a contract exit status and one ``leantune: error:`` line,
never a traceback or a hang. Rows of docs/reliability.md."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.test_data import line_strategy
from tests.reliability_helpers import (  # noqa: F401  (fixtures are imported by name)
    assert_contract, base, EXIT_CODES, fuzz, fuzz_dir, monkeypatch_module, one_thread, run_cli)


# ------------------------------------------------------------------------------------------
# 5. hypothesis: config TOML, JSONL data and argv end in a contract status and one line
# ------------------------------------------------------------------------------------------
def _toml_str(text: str) -> str:
    """A TOML basic string: JSON's escapes, non-ASCII kept (TOML has no surrogate pairs)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(v) -> str:
    """A TOML inline value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml, v)) + "]"
    return "{" + ", ".join(f"{_toml_str(k)} = {_toml(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict) -> str:
    return "".join(f"[{_toml_str(sec)}]\n" + "".join(f"{_toml_str(k)} = {_toml(v)}\n" for k, v in keys.items())
                   for sec, keys in doc.items())


def _known_keys() -> dict:
    """{section: {key: default}} of the training config."""
    import dataclasses

    from leantune.train.config import Config

    return {f.name: {g.name: getattr(f.default_factory(), g.name) for g in dataclasses.fields(f.default_factory())}
            for f in dataclasses.fields(Config) if f.name != "source"}


KNOWN = _known_keys()
# names, never paths that leave the fuzz folder: no separators, no leading dot or tilde
name_text = st.text(st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",)), max_size=10).filter(
    lambda s: not s.startswith((".", "~")))
WORDS = ["nf4", "fp4", "none", "auto", "lora", "dora", "lora_fa", "all-linear", "cosine", "linear", "messages",
         "text", "float16", "bfloat16", "adamw8bit", "pissa", "gaussian", "last_assistant", "q_proj", "(", ".*",
         "model", "broken-model", "good.jsonl", "bad.jsonl", "no-such-file.jsonl", ""]
# small numbers only: a config may legitimately ask for a huge rank or accumulation
scalar = st.one_of(st.booleans(), st.integers(-3, 5), st.floats(), st.sampled_from([1e-3, 0.5, 2**63 - 1, -2**63]),
                   name_text, st.sampled_from(WORDS))
toml_value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(name_text, c, max_size=2),
                          max_leaves=5)
BIG_OK = {"seed", "save_every", "eval_every", "log_every", "warmup_steps", "max_nan_steps", "shots", "max_items",
          "lr", "weight_decay", "clip", "require_lift", "kl_threshold", "alpha"}


def _value_for(sec: str, key: str, typed_only: bool = False):
    """A value of the key's type (odd ones included), or anything."""
    default = KNOWN[sec][key]
    if isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = st.integers(-2, 4)
    elif isinstance(default, float):
        typed = st.floats(-1.0, 2.0) | st.sampled_from([0.0, float("nan"), float("inf"), 1e-9])
    elif isinstance(default, str):
        typed = st.sampled_from(WORDS)
    else:
        typed = st.lists(st.sampled_from(WORDS), max_size=3) if isinstance(default, list) else \
            st.dictionaries(st.sampled_from(["q_proj", ".*", "(", "v"]), st.integers(-1, 4), max_size=2)
    anything = toml_value if key in BIG_OK else toml_value.filter(
        lambda v: not (isinstance(v, int) and not isinstance(v, bool) and abs(v) > 5))
    return typed if typed_only else anything


KEYS = [(sec, k) for sec, ks in KNOWN.items() for k in ks]
typed_edit = st.sampled_from(KEYS).flatmap(lambda sk: st.tuples(st.just(sk), _value_for(*sk, typed_only=True)))
edit = st.sampled_from(KEYS).flatmap(lambda sk: st.tuples(st.just(sk), _value_for(*sk)))
stray = st.tuples(st.tuples(st.sampled_from(list(KNOWN)) | name_text, name_text), toml_value)
VALID = {"model": {"path": "model", "quant": "none"}, "adapter": {"r": 2}, "data": {"train": "good.jsonl"},
         "train": {"max_steps": 1, "out": "cfg-run"}}


@fuzz(40)
@given(edits=st.tuples(st.lists(typed_edit, max_size=3), st.lists(edit | stray, max_size=1)).map(
    lambda ab: ab[0] + ab[1]), raw=st.one_of(st.none(), st.none(), st.none(), st.text(max_size=60)))
def test_fuzz_config_toml(fuzz_dir, edits, raw):
    """A valid 1-step config with up to three keys set to random values (or an unknown key),
    or random text: the run succeeds or stops with a contract status and one line."""
    doc = json.loads(json.dumps(VALID))
    for (sec, k), v in edits:
        doc.setdefault(sec, {})[k] = v
    path = fuzz_dir / "fuzz.toml"
    path.write_bytes((toml_doc(doc) if raw is None else raw).encode("utf-8", "surrogatepass"))
    code, _, err = run_cli(["train", path, "--set", "train.max_steps=1"])  # bounded whatever the edits
    assert_contract(code, err)


override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from([f"{s}.{k}" for s, ks in KNOWN.items() for k in ks])
                     | name_text, st.one_of(name_text, scalar.map(_toml), st.sampled_from(["[", "{", '"', "1e999"])))


@fuzz(30)
@given(sets=st.lists(override, max_size=3))
def test_fuzz_set_overrides(fuzz_dir, sets):
    argv = ["train", fuzz_dir / "ok.toml"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_cli(argv)
    assert_contract(code, err, {1, 2, 3, 4})  # the model folder is broken: never 0


def _records(fmt: str):
    content = st.text(min_size=1, max_size=12)
    if fmt == "text":
        return st.fixed_dictionaries({"text": content})
    if fmt == "prompt_completion":
        return st.fixed_dictionaries({"prompt": content, "completion": content})
    turn = st.tuples(content, content).map(lambda uc: [{"role": "user", "content": uc[0]},
                                                       {"role": "assistant", "content": uc[1]}])
    system = st.lists(st.builds(lambda c: {"role": "system", "content": c}, content), max_size=1)
    return st.builds(lambda s, ts: {"messages": s + [m for t in ts for m in t]}, system,
                     st.lists(turn, min_size=1, max_size=2))


def _damage(line: bytes, how: int, pos: int) -> bytes:
    """One of: a line cut short, a byte flipped, invalid UTF-8 inserted, the line unchanged."""
    pos %= max(len(line), 1)
    if how == 0:
        return line[:pos]
    if how == 1:
        return line[:pos] + bytes([line[pos] ^ 0x20 if line else 0]) + line[pos + 1:]
    if how == 2:
        return line[:pos] + b"\xff" + line[pos:]
    return line


@st.composite
def jsonl_file(draw) -> bytes:
    """A valid file of one format with a few lines damaged or replaced by random lines."""
    fmt = draw(st.sampled_from(["text", "prompt_completion", "messages"]))
    lines = [json.dumps(r).encode() for r in draw(st.lists(_records(fmt), min_size=1, max_size=5))]
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(lines) - 1))
        if draw(st.booleans()):
            ln = draw(line_strategy)
            lines[i] = ln if isinstance(ln, bytes) else ln.encode("utf-8", "surrogatepass")
        else:
            lines[i] = _damage(lines[i], draw(st.integers(0, 3)), draw(st.integers(0, 200)))
    return b"".join(ln.replace(b"\n", b" ") + b"\n" for ln in lines)


@pytest.fixture(scope="module")
def jsonl_config(base, fuzz_dir):
    """A 1-step full fine-tune of the tiny model on fuzz.jsonl (a valid file trains, fast)."""
    path = fuzz_dir / "jsonl.toml"
    path.write_text('[model]\npath = "model"\nquant = "none"\n[adapter]\nkind = "none"\n'
                    '[data]\ntrain = "fuzz.jsonl"\nmax_len = 32\n[train]\nout = "jsonl-run"\nmax_steps = 1\n'
                    'batch_size = 2\n')
    return path


@fuzz(40)
@given(content=jsonl_file())
def test_fuzz_jsonl_through_train(fuzz_dir, jsonl_config, content):
    (fuzz_dir / "fuzz.jsonl").write_bytes(content)
    shutil.rmtree(fuzz_dir / "jsonl-run", ignore_errors=True)  # each example is a fresh run
    code, _, err = run_cli(["train", jsonl_config])
    assert_contract(code, err, {0, 3})
    if code == 3:
        assert err.startswith(f"leantune: error: {fuzz_dir / 'fuzz.jsonl'}"), err


FILES = ["model", "broken-model", "adapter", "step-2", "good.jsonl", "bad.jsonl", "bad.toml", "ok.toml",
         "jsonl.toml", "missing", "o1", "o2"]
VALUES = ["0", "-1", "3", "nan", "inf", "1e9", "x", "nf4", "fp4", "none", "float16", "auto", "messages",
          "email,phone", "train.lr=nan", "data.max_len=2", ""]
GRAMMAR = {  # sub-command: (positionals, {flag: takes a value})
    "import-gguf": (2, {"--dtype": True}),
    "quantize": (2, {"--quant": True, "--blocksize": True, "--no-double-quant": False, "--compute-dtype": True}),
    "train": (1, {"--set": True, "--resume": False}),
    "eval": (1, {"--set": True, "--adapter": True}),
    "generate": (1, {"--adapter": True, "--quant": True, "--prompt": True, "--chat": True, "--system": True,
                     "--max-new-tokens": True, "--temperature": True, "--top-p": True, "--seed": True}),
    "merge": (3, {"--dtype": True, "--quant": True}),
    "data check": (1, {"--tokenizer": True, "--max-len": True, "--format": True, "--skip-invalid": False,
                       "--rejects": True}),
    "data stats": (1, {"--tokenizer": True, "--format": True, "--json": False}),
    "data dedup": (1, {"--out": True, "--threshold": True, "--report": True, "--num-perm": True,
                       "--ngram": True, "--seed": True}),
    "data redact": (1, {"--out": True, "--kinds": True, "--score": False, "--skip-invalid": False,
                        "--rejects": True}),
}


FLAG_VALUES = {  # plausible and edge values per flag (drawn half the time)
    "--quant": ["nf4", "fp4", "none"], "--dtype": ["float32", "bfloat16", "float16"],
    "--compute-dtype": ["float32", "bfloat16", "float16"], "--blocksize": ["64", "32", "3", "0", "-1"],
    "--max-new-tokens": ["2", "0", "-1"], "--temperature": ["0", "0.7", "-1", "nan", "inf"],
    "--top-p": ["0.9", "0", "1.5", "nan"], "--seed": ["0", "-1", "99999999999999999999"],
    "--format": ["auto", "text", "prompt_completion", "messages", "tokens"],
    "--threshold": ["0.8", "0", "1", "nan", "-1", "2"], "--num-perm": ["128", "1", "0", "-1"],
    "--ngram": ["5", "1", "0", "-1"], "--max-len": ["8", "0", "-1"], "--kinds": ["email,phone", "", "ip,ip"],
    "--out": ["o1", "o2"], "--report": ["r1", "o1"], "--tokenizer": ["model", "broken-model", "missing"],
    "--adapter": ["adapter", "step-2", "missing", "model", "tuned=adapter"],
    "--set": ["train.max_steps=1", "train.lr=nan", "data.max_len=2", "adapter.r=0", "x"],
    "--prompt": ["the", "", " "], "--chat": ["hi", ""], "--system": ["be brief", ""],
    "--rejects": ["r1", "o1", "bad.jsonl"],
}


@st.composite
def command_line(draw) -> list[str]:
    """Mostly well-formed command lines with odd values; sometimes any list of tokens."""
    value = st.sampled_from(FILES) | st.sampled_from(VALUES) | name_text
    if draw(st.integers(0, 4)) == 0:
        flags = sorted({f for _, fl in GRAMMAR.values() for f in fl} | {"--help", "-h", "--"})
        words = sorted({w for cmd in GRAMMAR for w in cmd.split()})
        return draw(st.lists(st.sampled_from(words) | st.sampled_from(flags) | value, max_size=7))
    cmd = draw(st.sampled_from(sorted(GRAMMAR)))
    n_pos, flags = GRAMMAR[cmd]
    argv = cmd.split() + [draw(st.sampled_from(FILES) | name_text) for _ in range(n_pos)]
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=4)):
        argv += [flag, draw(st.sampled_from(FLAG_VALUES.get(flag, VALUES)) | value)] if flags[flag] else [flag]
    if cmd == "generate" and "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "2"]
    return argv


WELL_FORMED = [
    ["generate", "model", "--prompt", "the", "--max-new-tokens", "2"],
    ["generate", "model", "--adapter", "adapter", "--chat", "hi", "--max-new-tokens", "2"],
    ["data", "stats", "good.jsonl", "--json", "--tokenizer", "model"],
    ["data", "dedup", "good.jsonl", "--out", "deduped.jsonl"],
    ["quantize", "model", "quantized"],
    ["merge", "model", "adapter", "merged"],
    ["--help"],
]


def _with_well_formed(test):
    for argv in reversed(WELL_FORMED):
        test = example(argv=argv)(test)
    return test


@fuzz(80)
@given(argv=command_line())
@_with_well_formed
def test_fuzz_command_line(fuzz_dir, jsonl_config, argv):
    """Random command lines, and the well-formed ones above, which must work."""
    if argv in WELL_FORMED:  # outputs of an earlier run of the same example
        shutil.rmtree(fuzz_dir / "quantized", ignore_errors=True)
        shutil.rmtree(fuzz_dir / "merged", ignore_errors=True)
    code, _, err = run_cli(argv)
    assert_contract(code, err, {0} if argv in WELL_FORMED else EXIT_CODES)

