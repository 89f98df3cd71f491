"""Shared helpers and fixtures of the reliability suite (tests/test_reliability_*.py): the
in-process CLI runner with a time limit, the contract check, the I/O hooks that inject a
SIGKILL or a full disk, the reference run (``base``), the fuzzers' working folder
(``fuzz_dir``) and a tiny GGUF. Import the fixtures by name into a test module."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis.control import currently_in_test_context

from tests.test_train_loop import ROOT, write_config
from leantune.cli import main
from leantune.train.config import load_config
from leantune.train.loop import checkpoint_problem, train

SEED = 20240909
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(n: int):
    """A fixed-seed hypothesis run of ``n`` examples (the same examples on every run)."""
    return settings(FUZZ, max_examples=n)
EXIT_CODES = {0, 1, 2, 3, 4, 5}
QUIET = dict(log=lambda m: None)


# ------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by SIGALRM: a command that runs past its time limit (not caught by main)."""


def run_cli(argv, timeout=30) -> tuple[int, str, str]:
    """``leantune ARGV`` in-process: (exit status, stdout, stderr); Hang after ``timeout`` s."""
    out, err = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise Hang(f"leantune {argv!r} ran past {timeout} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's --help; train's exit 130 after a signal
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def assert_contract(code: int, err: str, allowed=EXIT_CODES):
    """A contract exit status; on failure exactly one ``leantune: error: WHERE: WHAT`` line
    that is not the catch-all for an unexpected exception."""
    if currently_in_test_context():
        event(f"exit {code}")  # the spread of outcomes: pytest --hypothesis-show-statistics
    assert code in allowed, (code, err)
    if code != 0:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("leantune: error: "), err
        assert "internal:" not in err and "Traceback" not in err, err


def flip_bit(path: Path, bit: int):
    raw = bytearray(path.read_bytes())
    raw[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(raw))


def data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins (8 + header length)."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def run_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "cache" not in p.parts)


def stray_temps(out: Path) -> list[str]:
    """Half-written leftovers (``.tmp-*``) outside the token cache."""
    return [f for f in run_files(out) + sorted(str(p.relative_to(out)) for p in out.rglob(".tmp-*"))
            if ".tmp-" in f]


def metric_rows(out: Path) -> list[dict]:
    def strict(c):
        raise ValueError(f"{c} is not JSON")

    return [json.loads(ln, parse_constant=strict) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def all_checkpoints_verify(out: Path) -> list[str]:
    """Every complete checkpoint (a step-N folder with state.json) passes the resume check."""
    names = []
    for d in sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []:
        if (d / "state.json").is_file():
            assert checkpoint_problem(d) is None, (d, checkpoint_problem(d))
            names.append(d.name)
    return names


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module (in-process and killed subprocesses) on one intra-op thread:
    the same float reductions everywhere (bit-exact comparisons across processes), and no
    spinning thread pool on a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A folder with the tiny model, the training data and the uninterrupted reference run
    ("ref": full fine-tune, 6 steps, checkpoints at 2, 4, 6), whose I/O events are recorded.
    Built once per session, on one thread (as every test module of the suite runs)."""
    d = tmp_path_factory.mktemp("reliability")
    cfg = load_config(write_config(d, "ref"))
    events = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for obj, name, new in io_hooks(lambda kind, path: events.append((kind, path))):
                mp.setattr(obj, name, new)
            train(cfg, **QUIET)
    finally:
        torch.set_num_threads(threads)
    ref = Path(cfg.train.out)
    return {"dir": d, "ref": ref, "events": [(k, p.replace(str(ref), "OUT")) for k, p in events]}


# ------------------------------------------------------------------------------------------
# I/O events: the places a SIGKILL or a full disk is injected
# ------------------------------------------------------------------------------------------
def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class _EventFile:
    """A file from ``os.fdopen`` (the safetensors writer's) that reports each write first."""

    def __init__(self, f, path, event):
        self._f, self._path, self._event = f, path, event

    def write(self, data):
        self._event("write", self._path)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def io_hooks(event):
    """(object, attribute, replacement) triples that call ``event(kind, path)`` before every
    write of the safetensors writer, every fsync and every rename, and after every rename:
    together the steps of the atomic writers (file and checkpoint folder)."""
    real_replace, real_fsync, real_fdopen = os.replace, os.fsync, os.fdopen

    def replace(src, dst, *a, **kw):
        event("rename", str(dst))
        real_replace(src, dst, *a, **kw)
        event("renamed", str(dst))

    def fsync(fd):
        event("fsync", _fd_path(fd))
        real_fsync(fd)

    def fdopen(fd, mode="r", *a, **kw):
        path = _fd_path(fd)
        f = real_fdopen(fd, mode, *a, **kw)
        return _EventFile(f, path, event) if "w" in mode else f

    return [(os, "replace", replace), (os, "fsync", fsync), (os, "fdopen", fdopen)]




@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def fuzz_dir(base, tmp_path_factory, monkeypatch_module):
    """The working folder of the fuzzers: every relative path lands in it, and every file a
    fuzzer may name is a copy in it (the tiny model, a model folder whose config.json is
    broken, an adapter, a checkpoint, data and configs). The embedded default model is a
    missing folder here (a config without model.path must not import SmolLM2)."""
    from leantune.peft_core.adapters import AdapterConfig, inject_adapter, save_adapter
    from leantune.peft_core.checkpoint import load_model

    d = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(base["dir"] / "model", d / "model")
    shutil.copytree(base["ref"] / "checkpoints" / "step-2", d / "step-2")
    (d / "broken-model").mkdir()
    (d / "broken-model" / "config.json").write_text('{"model_type": "llama", "hidden_size": "x"')
    save_adapter(inject_adapter(load_model(d / "model"), AdapterConfig(r=2, targets=["q_proj"])), d / "adapter")
    shutil.copy(base["dir"] / "train.jsonl", d / "good.jsonl")
    (d / "bad.jsonl").write_bytes(b'{"text": 1}\n\xff\xfe\n[]\n')
    (d / "bad.toml").write_text("[train\nlr = 1")
    (d / "ok.toml").write_text('[model]\npath = "broken-model"\n[data]\ntrain = "good.jsonl"\n')
    import leantune.peft_core.embedded as embedded

    monkeypatch_module.setattr(embedded, "default_model_dir", lambda: d / "no-embedded-model")
    monkeypatch_module.chdir(d)
    return d



@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from tests.test_gguf_import import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, qtype="Q8_0")
    return path


def _gguf_data_offset(path: Path) -> int:
    import gguf

    return gguf.GGUFReader(str(path)).data_offset

