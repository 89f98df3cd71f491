"""``[train] report_to`` (metrics.csv, TensorBoard event files written by our own writer) and
``--log-format json`` progress (issue 21)."""
from __future__ import annotations

import csv
import json
import struct

import pytest

from leantune.base import UsageError
from leantune.cli import main
from leantune.train.config import load_config
from leantune.train.distributed import Ranks
from leantune.train.loop import _Progress
from leantune.train.reporting import crc32c, masked_crc32c, read_tfrecords, tfrecord
from tests.test_train_loop import write_config


def test_crc32c_known_answers():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    rec = tfrecord(b"abc")
    assert struct.unpack("<I", rec[8:12])[0] == masked_crc32c(rec[:8])
    assert read_tfrecords_bytes(rec) == [b"abc"]


def read_tfrecords_bytes(data):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "f").write_bytes(data)
        return read_tfrecords(Path(d) / "f")


def _scalars(body: bytes) -> tuple[int, dict]:
    """(step, {tag: value}) of an Event holding scalars (the few fields our writer uses)."""
    def varint(b, i):
        n = shift = 0
        while True:
            n |= (b[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not b[i - 1] & 0x80:
                return n, i

    def fields(b):
        i = 0
        while i < len(b):
            key, i = varint(b, i)
            num, wt = key >> 3, key & 7
            if wt == 0:
                v, i = varint(b, i)
            elif wt == 1:
                v, i = b[i:i + 8], i + 8
            elif wt == 5:
                v, i = b[i:i + 4], i + 4
            else:
                n, i = varint(b, i)
                v, i = b[i:i + n], i + n
            yield num, v

    step, values = None, {}
    for num, v in fields(body):
        if num == 2:
            step = v
        elif num == 5:
            for _, value in fields(v):
                f = dict(fields(value))
                values[f[1].decode()] = struct.unpack("<f", f[2])[0]
    return step, values


@pytest.fixture(scope="module")
def json_run(tmp_path_factory):
    """One CLI run with report_to = csv + tensorboard and --log-format json (after the
    sub-command: accepted anywhere); (run folder, stdout lines)."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = write_config(tmp, train={"report_to": ["csv", "tensorboard"], "eval_every": 3})
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["train", str(cfg), "--log-format", "json"]) == 0
    return tmp / "run", buf.getvalue().splitlines()


def test_csv_has_a_row_per_logged_step(json_run):
    run, _ = json_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 6
    assert "eval_loss" in table[0].keys() and table[2]["eval_loss"] and not table[0]["eval_loss"]
    assert [int(r["step"]) for r in table] == [r["step"] for r in rows]
    assert float(table[-1]["loss"]) == pytest.approx(rows[-1]["loss"])


def test_tensorboard_events_read_back(json_run):
    run, _ = json_run
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    records = read_tfrecords(files[0])  # every frame's CRCs checked
    assert b"brain.Event:2" in records[0]
    events = [_scalars(r) for r in records[1:]]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in events] == [r["step"] for r in rows]
    assert events[-1][1]["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6)
    assert "eval_loss" in events[2][1]


def test_tensorboard_reads_our_events(json_run):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run, _ = json_run
    acc = ea.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(acc.Tags()["scalars"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in rows]
    assert acc.Scalars("loss")[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)


def test_log_format_json_every_stdout_line_is_json(json_run):
    _, lines = json_run
    objs = [json.loads(line) for line in lines]  # fails on any plain line
    steps = [o for o in objs if "step" in o]
    assert [o["step"] for o in steps] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "tokens_per_s", "eta_s"} <= set(steps[0])
    assert "eval_loss" in steps[2] and "eval_loss" not in steps[0]
    assert any("message" in o for o in objs)


def test_log_format_is_checked(capsys):
    assert main(["--log-format", "yaml", "config"]) == 2
    assert "--log-format" in capsys.readouterr().err


def test_report_to_names_are_checked(tmp_path):
    cfg = write_config(tmp_path, train={"report_to": ["csv", "wandb"]})
    with pytest.raises(UsageError, match="train.report_to.*'wandb'"):
        load_config(cfg)


def test_plain_progress_per_log_interval_at_most_every_30s(monkeypatch):
    """Off a terminal: a plain line per logged step, at most every 30 s, always the last."""
    import leantune.train.loop as loop

    clock = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(loop.sys.stdout, "isatty", lambda: False, raising=False)
    lines = []
    p = _Progress(Ranks(), total=10, start=0, log=lines.append)
    assert p.plain
    for step in range(1, 11):
        p.update(step, 1.0, 1e-3, 100.0)
        clock[0] += 12.0  # a step every 12 s: a line at most every 30 s
    assert [line.split()[1] for line in lines] == ["1/10", "4/10", "7/10", "10/10"]
