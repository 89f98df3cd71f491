"""train.curation: data check / stats / dedup / redact, through a small argparse harness."""
from __future__ import annotations

import argparse
import json
import random

import pytest

from leantune.base import DataError, UsageError
from leantune.train.curation import KINDS, MinHasher, add_data_parser, check_file, dedup_records, iban_ok, lsh_params, luhn_ok, normalize, redact_text

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_data import ByteTok, line_strategy


def run(argv, capsys):
    """Parse ``argv`` as ``leantune data ...`` and run it; returns (status, stdout)."""
    parser = argparse.ArgumentParser(prog="leantune")
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    status = args.func(args)
    return status, capsys.readouterr().out


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


WORDS = [f"w{i}" for i in range(5000)]


def doc(rng, n=200):
    return " ".join(rng.choice(WORDS) for _ in range(n))


# -- check ---------------------------------------------------------------------------------
def test_check_lists_every_problem_and_exits_3(tmp_path, capsys):
    path = write(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "{broken",
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "yo"}]},
        {"text": "a text record"},
    ])
    with pytest.raises(DataError, match="4 problem") as e:
        run(["data", "check", str(path)], capsys)
    assert e.value.exit_code == 3
    out = capsys.readouterr().out
    problems = [ln for ln in out.splitlines() if ln.startswith(f"{path}:")]
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "6"]
    assert "invalid JSON" in problems[0] and "out of order" in problems[1]
    assert "is empty" in problems[2] and "one format per file" in problems[3]
    assert f"{path}:5: duplicate of line 1" in out  # a warning, not a problem
    assert "histogram (chars)" in out


def test_check_clean_file_with_tokenizer(tmp_path, capsys, monkeypatch):
    path = write(tmp_path / "d.jsonl", [{"prompt": "p" * n, "completion": "c" * 20} for n in (3, 10, 40)])
    rep = check_file(path, ByteTok(), max_len=60)  # 24, 31 and 61 tokens
    assert rep.problems == [] and rep.truncated == 1 and rep.tokens == [24, 31, 61]
    rep = check_file(path, ByteTok(), max_len=30)
    assert len(rep.problems) == 1 and rep.problems[0].startswith(f"{path}:3:") and rep.truncated == 1
    monkeypatch.setattr("leantune.train.curation._load_tokenizer", lambda d: ByteTok())
    status, out = run(["data", "check", str(path), "--tokenizer", "x", "--max-len", "60"], capsys)
    assert status == 0 and "0 problem(s)" in out and "histogram (tokens)" in out
    assert "longer than max_len" in out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line_strategy, min_size=1, max_size=5))
def test_check_never_crashes_and_names_lines(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8", "surrogatepass")) + b"\n"
                              for ln in lines))
    rep = check_file(path, ByteTok(), max_len=8)
    for problem in rep.problems:
        assert problem.startswith(f"{path}:") and "\n" not in problem
    assert rep.records or rep.problems  # an empty file is a problem too
    assert "\n" not in "".join(rep.lines()[1:1 + len(rep.problems)])


def test_check_empty_and_missing_file(tmp_path, capsys):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError):
        run(["data", "check", str(empty)], capsys)
    with pytest.raises(DataError, match="cannot read"):
        run(["data", "check", str(tmp_path / "nope.jsonl")], capsys)


# -- stats ---------------------------------------------------------------------------------
def test_stats(tmp_path, capsys):
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}]
    path = write(tmp_path / "d.jsonl", [{"messages": chat}, {"messages": chat[1:]}, {"messages": chat}])
    status, out = run(["data", "stats", str(path)], capsys)
    assert status == 0
    assert "3 records, format messages" in out
    assert "roles: assistant 3, system 2, user 3" in out
    assert "duplicates (exact, normalised): 1 (33.3%)" in out
    _, out = run(["data", "stats", str(path), "--json"], capsys)
    st = json.loads(out)
    assert st["length_chars"]["max"] == 14 and st["messages_per_record"]["min"] == 2


# -- dedup ---------------------------------------------------------------------------------
def test_normalize():
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert normalize("It's\ta  test.") == "its a test"


def test_lsh_params_and_minhash_estimate():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and 0.6 < (1 / b) ** (1 / r) < 0.9
    rng = random.Random(0)
    h = MinHasher(256, 5, seed=1)
    words = doc(rng, 300).split()
    other = list(words)
    for i in range(0, 300, 30):  # 10 edits: each kills 5 shingles
        other[i] = "zzz"
    a, c = h.shingles(" ".join(words)), h.shingles(" ".join(other))
    true_j = len(a & c) / len(a | c)
    est = float((h.signature(" ".join(words)) == h.signature(" ".join(other))).mean())
    assert abs(est - true_j) < 0.1


def test_dedup_finds_planted_duplicates(tmp_path, capsys):
    rng = random.Random(0)
    base = [doc(rng) for _ in range(30)]
    records, planted = [], {}
    for i, text in enumerate(base):
        records.append({"text": text})
    # exact duplicates after normalisation (case, punctuation, whitespace)
    records.append({"text": "  " + base[3].upper().replace(" ", " ,  ") + "!"})
    planted[len(records)] = (4, "exact")
    # near duplicates: one word changed, one appended
    words = base[7].split()
    words[100] = "changed"
    records.append({"text": " ".join(words)})
    planted[len(records)] = (8, "near")
    records.append({"text": base[11] + " and one more"})
    planted[len(records)] = (12, "near")
    # a duplicate of a duplicate of a kept line is still reported against the kept line
    records.append({"text": base[3]})
    planted[len(records)] = (4, "exact")
    # distinct records that share a few words with the others stay
    records.append({"text": " ".join(base[0].split()[:40]) + " " + doc(rng, 160)})
    records.append({"text": "short one"})
    records.append({"text": "short two"})
    path = write(tmp_path / "d.jsonl", records)
    out_path, report = tmp_path / "out.jsonl", tmp_path / "report.json"
    status, out = run(["data", "dedup", str(path), "--out", str(out_path), "--report", str(report)], capsys)
    assert status == 0 and "dropped 2 exact and 2 near" in out
    rep = json.loads(report.read_text())
    got = {d["line"]: (d["duplicate_of"], d["kind"]) for d in rep["dropped"]}
    assert got == planted
    for d in rep["dropped"]:
        assert d["jaccard"] >= 0.8
    kept_lines = out_path.read_text().splitlines()
    original = path.read_text().splitlines()
    assert kept_lines == [ln for i, ln in enumerate(original, 1) if i not in planted]
    assert rep["kept"] == len(records) - 4


def test_dedup_records_keeps_first_and_threshold():
    texts = [(1, "a b c d e f g h"), (2, "a b c d e f g h"), (3, "x y z")]
    kept, dropped = dedup_records(texts)
    assert kept == [1, 3] and dropped == [{"line": 2, "duplicate_of": 1, "kind": "exact", "jaccard": 1.0}]
    with pytest.raises(UsageError):
        from leantune.train.curation import dedup_file
        dedup_file("x", "y", threshold=1.5)


# -- redact --------------------------------------------------------------------------------
PII = [
    ("write to jane.doe+tag@mail.example.org today", "write to [EMAIL] today", "email"),
    ("card 4111 1111 1111 1111 expires", "card [CARD] expires", "card"),
    ("amex 3782-822463-10005.", "amex [CARD].", "card"),
    ("pay DE89 3704 0044 0532 0130 00 now", "pay [IBAN] now", "iban"),
    ("iban GB82WEST12345698765432", "iban [IBAN]", "iban"),
    ("server 192.168.10.254, backup 2001:db8::8a2e:370:7334", "server [IP], backup [IP]", "ip"),
    ("ssn 078-05-1120 on file", "ssn [SSN] on file", "ssn"),
    ("call +1 (415) 555-2671 or 415-555-2671", "call [PHONE] or [PHONE]", "phone"),
    ("uk +44 20 7946 0958", "uk [PHONE]", "phone"),
]
LEAVE = [
    "order 4111 1111 1111 1112 (Luhn fails)",
    "ref 1234567812345678",
    "iban GB82WEST12345698765433 (bad check digits)",
    "on 2023-10-05 at 12:30:45, scores 12 34 56 78, version 1.2.3, 3.14159",
    "999.1.1.1 is not an address; nor is a::b::c",
]


@pytest.mark.parametrize("text,expected,kind", PII)
def test_redact_catches_planted_pii(text, expected, kind):
    out, counts = redact_text(text)
    assert out == expected
    assert counts[kind] == expected.count(f"[{kind.upper()}]") and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize("text", LEAVE)
def test_redact_leaves_invalid_numbers(text):
    assert redact_text(text)[0] == text


def test_luhn_and_iban():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")


def test_redact_file_all_string_fields_and_kinds(tmp_path, capsys):
    path = write(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "my mail is a@b.io"},
                      {"role": "assistant", "content": "noted, and card 4111-1111-1111-1111"}]},
        {"prompt": "ip 10.0.0.1", "completion": "ssn 123-45-6789", "meta": {"tags": ["x@y.com"]}},
        {"text": "nothing here"},
    ])
    out_path = tmp_path / "out.jsonl"
    status, out = run(["data", "redact", str(path), "--out", str(out_path)], capsys)
    assert status == 0
    assert "redacted 2 of 3 records: email 2, iban 0, card 1, ssn 1, ip 1, phone 0" in out
    lines = out_path.read_text().splitlines()
    a, b = json.loads(lines[0]), json.loads(lines[1])
    assert a["messages"][0]["content"] == "my mail is [EMAIL]" and a["messages"][1]["role"] == "assistant"
    assert a["messages"][1]["content"].endswith("[CARD]")
    assert b == {"prompt": "ip [IP]", "completion": "ssn [SSN]", "meta": {"tags": ["[EMAIL]"]}}
    assert lines[2] == path.read_text().splitlines()[2]  # untouched lines are copied as they were
    # only some kinds
    status, out = run(["data", "redact", str(path), "--out", str(out_path), "--kinds", "ssn,ip"], capsys)
    assert "redacted 1 of 3 records: ssn 1, ip 1" in out
    assert "a@b.io" in out_path.read_text()
    with pytest.raises(UsageError, match="unknown kind 'phones'"):
        run(["data", "redact", str(path), "--out", str(out_path), "--kinds", "phones"], capsys)
    assert set(KINDS) == {"email", "phone", "card", "iban", "ip", "ssn"}


def test_redact_rejects_malformed_lines(tmp_path, capsys):
    path = write(tmp_path / "d.jsonl", [{"text": "ok"}, "not json"])
    with pytest.raises(DataError) as e:
        run(["data", "redact", str(path), "--out", str(tmp_path / "o.jsonl")], capsys)
    assert e.value.where == f"{path}:2"
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written


def test_no_action_is_a_usage_error(capsys):
    with pytest.raises(UsageError):
        run(["data"], capsys)


def test_wired_into_the_cli_when_present(tmp_path, capsys):
    from leantune import cli

    if "data" not in cli.build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("train/cli.py does not wire `data` yet")
    path = write(tmp_path / "d.jsonl", [{"text": "a"}, "{bad"])
    assert cli.main(["data", "check", str(path)]) == 3
