"""``data check|stats|dedup|redact FILE --skip-invalid [--rejects PATH]`` (issue 21, item 3):
bad lines are skipped, counted, and written to a rejects file as {"line", "error", "raw"};
without the flag one bad line still refuses the file."""
from __future__ import annotations

import json

import pytest

from leantune import cli

GOOD = [{"text": "alpha beta gamma delta"}, {"text": "mail me at ann@example.org"},
        {"text": "the third record"}]
LINES = [json.dumps(GOOD[0]).encode(),
         b'{"text": "broken',                      # line 2: invalid JSON
         json.dumps(GOOD[1]).encode(),
         b'[1, 2]',                                 # line 4: not an object (line 5 is blank)
         b'{"prompt": "p", "completion": "c"}',     # line 6: another format than the file's
         b'{"text": "bad \xff byte"}',              # line 7: not UTF-8
         json.dumps(GOOD[2]).encode()]              # line 8


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(LINES[:4] + [b""] + LINES[4:]) + b"\n")  # line 5 is blank
    return path


def run(capsys, *argv):
    code = cli.main(["data", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def rejects_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_rejects(path, lines):
    rows = rejects_of(path)
    assert [r["line"] for r in rows] == lines
    errors = {r["line"]: r["error"] for r in rows}
    raws = {r["line"]: r["raw"] for r in rows}
    assert "invalid JSON" in errors[2] and raws[2] == '{"text": "broken'
    assert "JSON object" in errors[4] and raws[4] == "[1, 2]"
    assert "UTF-8" in errors[7] and raws[7] == '{"text": "bad \ufffd byte"}'
    if 6 in errors:
        assert "one format per file" in errors[6]


@pytest.mark.parametrize("action, extra", [("check", []), ("stats", []), ("dedup", ["--out"]),
                                           ("redact", ["--out"])])
def test_without_the_flag_one_bad_line_refuses_the_file(data, capsys, action, extra):
    argv = [action, data] + ([*extra, data.parent / "out.jsonl"] if extra else [])
    code, _, err = run(capsys, *argv)
    assert code == 3
    assert err.count("\n") == 1 and f"{data}:" in err
    assert not (data.parent / "data.rejects.jsonl").exists()


def test_check_skip_invalid(data, capsys):
    code, out, _ = run(capsys, "check", data, "--skip-invalid")
    assert code == 0
    assert f"checked {data}: 3 records (text), 0 problem(s), 4 invalid line(s) skipped" in out
    assert f"skipped 4 invalid line(s); wrote them to {data.parent / 'data.rejects.jsonl'}" in out
    check_rejects(data.parent / "data.rejects.jsonl", [2, 4, 6, 7])


def test_stats_skip_invalid(data, capsys, tmp_path):
    rejects = tmp_path / "elsewhere" / "bad.jsonl"
    code, out, err = run(capsys, "stats", data, "--skip-invalid", "--rejects", rejects, "--json")
    assert code == 0
    st = json.loads(out)
    assert st["records"] == 3 and st["skipped"] == 4
    assert "skipped 4 invalid line(s)" in err
    check_rejects(rejects, [2, 4, 6, 7])
    code, out, _ = run(capsys, "stats", data, "--skip-invalid")
    assert code == 0 and "invalid lines skipped: 4" in out


def test_dedup_skip_invalid(data, capsys, tmp_path):
    out_path = tmp_path / "clean" / "out.jsonl"
    code, out, _ = run(capsys, "dedup", data, "--out", out_path, "--skip-invalid")
    assert code == 0 and "kept 3 of 3 records" in out
    assert [json.loads(x) for x in out_path.read_text().splitlines()] == GOOD
    check_rejects(tmp_path / "clean" / "data.rejects.jsonl", [2, 4, 6, 7])  # beside the output


def test_redact_skip_invalid(data, capsys, tmp_path):
    out_path = tmp_path / "out.jsonl"
    code, out, _ = run(capsys, "redact", data, "--out", out_path, "--skip-invalid")
    assert code == 0 and "redacted 1 of 4 records" in out
    rows = [json.loads(x) for x in out_path.read_text().splitlines()]
    assert rows[1] == {"text": "mail me at [EMAIL]"} and len(rows) == 4  # any JSON object is redacted
    check_rejects(tmp_path / "data.rejects.jsonl", [2, 4, 7])


def test_a_line_over_the_size_limit_is_a_reject(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("leantune.train.data.MAX_LINE_BYTES", 64)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "x" * 200}) + "\n" + json.dumps(GOOD[0]) + "\n")
    assert run(capsys, "stats", path)[0] == 3
    code, out, _ = run(capsys, "stats", path, "--skip-invalid")
    assert code == 0 and "1 records" in out
    [row] = rejects_of(tmp_path / "long.rejects.jsonl")
    assert row["line"] == 1 and "line longer than" in row["error"]


def test_all_lines_invalid_is_still_bad_data(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("nope\n{\n")
    code, _, err = run(capsys, "stats", path, "--skip-invalid")
    assert code == 3 and "no valid records (2 invalid line(s) skipped)" in err
    assert [r["line"] for r in rejects_of(tmp_path / "bad.rejects.jsonl")] == [1, 2]


def test_rejects_usage_mistakes(data, capsys):
    code, _, err = run(capsys, "check", data, "--rejects", data.parent / "r.jsonl")
    assert code == 2 and "--rejects: goes with --skip-invalid" in err
    code, _, err = run(capsys, "check", data, "--skip-invalid", "--rejects", data)
    assert code == 2 and "input file" in err
    code, _, err = run(capsys, "redact", data, "--out", data.parent / "o.jsonl", "--skip-invalid",
                       "--rejects", data.parent / "o.jsonl")
    assert code == 2 and "--out file" in err
    assert data.read_bytes().count(b"\n") == 8  # the input untouched
