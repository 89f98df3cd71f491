"""Reliability and security (issue 9): faults injected into training, fuzzed inputs, crafted
files. Each test is one row of the fault matrix in docs/reliability.md.

- SIGKILL at chosen I/O events (inside checkpoint writes and elsewhere), then ``--resume``:
  no damaged checkpoint is ever picked up and the result equals the uninterrupted run.
- A full disk during a save, NaN losses and gradients, damaged checkpoints.
- hypothesis over config TOML, JSONL data and the command line: every input ends with a
  contract exit status and one ``leantune: error:`` line, never a traceback or a hang.
- Bit-flipped / truncated safetensors, adapter and GGUF files; header claims of huge sizes.
- Security: no pickle anywhere, nothing escapes the output folder, sandboxed chat templates.

The randomized parts use fixed seeds (``derandomize=True``, ``random.Random(seed)``) and
bounded counts, so a CI run is reproducible and takes well under a minute.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import leantune.train.loop as loop
from leantune.base import ModelError
from leantune.peft_core.safetensors_io import SafetensorsFile, read_safetensors, write_safetensors
from tests.helpers import tiny_model_dir
from tests.test_data import line_strategy
from tests.test_train_loop import ROOT, assert_same, trainable, write_config
from leantune.cli import main
from leantune.train.config import load_config
from leantune.train.loop import TrainingAborted, checkpoint_problem, newest_checkpoint, train

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


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A folder with the tiny model, the training data and the uninterrupted reference run
    ("ref": full fine-tune, 6 steps, checkpoints at 2, 4, 6), whose I/O events are recorded."""
    d = tmp_path_factory.mktemp("reliability")
    cfg = load_config(write_config(d, "ref"))
    events = []
    with pytest.MonkeyPatch.context() as mp:
        for obj, name, new in io_hooks(lambda kind, path: events.append((kind, path))):
            mp.setattr(obj, name, new)
        train(cfg, **QUIET)
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


# The killed training: the same hooks, and SIGKILL at I/O event number KILL_AT.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.test_reliability import io_hooks
kill_at, count = int(sys.argv[2]), [0]
def event(kind, path):
    count[0] += 1
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
for obj, name, new in io_hooks(event):
    setattr(obj, name, new)
from leantune.cli import main
sys.exit(main(["train", sys.argv[1]]))
"""


KILL_CASES = ("mid-file write in a checkpoint", "file commit (fsync / rename) in a checkpoint",
              "checkpoint folder commit (rename into place, directory fsync)", "outside checkpoints")


def kill_plan(events, seed=SEED) -> list[tuple[int, str, str]]:
    """One event number (1-based) for each of KILL_CASES, drawn with a fixed seed."""
    rng = random.Random(seed)
    pools = [[], [], [], []]
    for i, (kind, path) in enumerate(events, 1):
        if "/checkpoints/" not in path and not path.endswith("/checkpoints"):
            pools[3].append(i)
        elif kind == "write":
            pools[0].append(i)
        elif "/.tmp-step-" in path and not path.rstrip("/").split("/")[-1].startswith(".tmp-step-"):
            pools[1].append(i)
        else:
            pools[2].append(i)
    picks = [rng.choice(pool) for pool in pools]
    return [(k, *events[k - 1]) for k in picks]


def kill_and_resume(cfg_path: Path, kill_at: int) -> tuple[Path, list[str]]:
    """Run ``leantune train`` in a subprocess SIGKILLed at event ``kill_at``, check every
    complete checkpoint left behind, resume in-process; returns (out dir, resume log)."""
    cfg = load_config(cfg_path)
    out = Path(cfg.train.out)
    res = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT)), str(cfg_path), str(kill_at)],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, f"not killed (rc {res.returncode}): {res.stderr[-2000:]}"
    all_checkpoints_verify(out)  # never a damaged checkpoint, whatever the moment of the kill
    logs = []
    train(load_config(cfg_path), resume=True, log=logs.append)
    return out, logs


# ------------------------------------------------------------------------------------------
# 1. SIGKILL at chosen moments, then --resume
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", range(4), ids=["mid-file", "file-commit", "folder-commit", "outside"])
def test_sigkill_at_io_event_then_resume_is_bit_exact(base, which):
    """SIGKILL at one I/O event of each kind of KILL_CASES (drawn with a fixed seed)."""
    kill_at, kind, where = kill_plan(base["events"])[which]
    cfg_path = write_config(base["dir"], f"kill{which}")
    out, logs = kill_and_resume(cfg_path, kill_at)
    assert_same(trainable(out), trainable(base["ref"]))
    assert_same(read_safetensors(out / "model" / "model.safetensors"),
                read_safetensors(base["ref"] / "model" / "model.safetensors"))
    assert [r["step"] for r in metric_rows(out)] == list(range(1, 7))
    assert all_checkpoints_verify(out) == ["step-2", "step-4", "step-6"]
    assert not stray_temps(out), stray_temps(out)


def test_sigkill_inside_a_lora_checkpoint_adapter_write(base):
    """LoRA: killed while the checkpoint's adapter/ is being written; the half-written
    .tmp-step folder is ignored by resume and removed by the next save."""
    sections = dict(adapter={"kind": "lora", "r": 4})
    ref = load_config(write_config(base["dir"], "lora-ref", **sections))
    events = []
    with pytest.MonkeyPatch.context() as mp:
        for obj, name, new in io_hooks(lambda kind, path: events.append((kind, path))):
            mp.setattr(obj, name, new)
        train(ref, **QUIET)
    # the first write into the adapter folder of the step-4 checkpoint
    kill_at = next(i for i, (k, p) in enumerate(events, 1)
                   if k == "write" and ".tmp-step-4-" in p and "/adapter/" in p)
    cfg_path = write_config(base["dir"], "lora-kill", **sections)
    out = Path(load_config(cfg_path).train.out)
    res = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT)), str(cfg_path), str(kill_at)],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [d.name[:12] for d in (out / "checkpoints").glob(".tmp-*")] == [".tmp-step-4-"]
    assert newest_checkpoint(out).name == "step-2"
    logs = []
    train(load_config(cfg_path), resume=True, log=logs.append)
    assert "resume: continuing from step-2" in logs
    assert_same(trainable(out), trainable(ref.train.out))
    assert_same(read_safetensors(out / "adapter" / "adapter_model.safetensors"),
                read_safetensors(Path(ref.train.out) / "adapter" / "adapter_model.safetensors"))
    assert not stray_temps(out)


# ------------------------------------------------------------------------------------------
# 2. a full disk during a save
# ------------------------------------------------------------------------------------------
def disk_full_when(predicate):
    """io_hooks whose write raises ENOSPC (after half the bytes) where ``predicate(path)``."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f, path):
            self._f, self._path = f, path

        def write(self, data):
            if predicate(self._path):
                data = memoryview(data).cast("B")
                self._f.write(data[: len(data) // 2])
                self._f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def fdopen(fd, mode="r", *a, **kw):
        path = _fd_path(fd)
        f = real_fdopen(fd, mode, *a, **kw)
        return Full(f, path) if "w" in mode else f

    return [(os, "fdopen", fdopen)]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(base, monkeypatch):
    cfg_path = write_config(base["dir"], "full-disk")
    out = Path(load_config(cfg_path).train.out)
    seen = []

    def second_file_of_step_4(path):  # trainable.safetensors fits, optimizer.safetensors does not
        if ".tmp-step-4-" in path and path not in seen:
            seen.append(path)
        return ".tmp-step-4-" in path and len(seen) >= 2

    for obj, name, new in disk_full_when(second_file_of_step_4):
        monkeypatch.setattr(obj, name, new)
    with pytest.raises(TrainingAborted) as err:
        train(load_config(cfg_path), **QUIET)
    assert err.value.where == str(out / "checkpoints" / "step-4")
    assert "No space left on device" in err.value.what and "step-2 is intact" in err.value.what
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # temp folder gone
    assert checkpoint_problem(out / "checkpoints" / "step-2") is None
    ref_step2 = read_safetensors(base["ref"] / "checkpoints" / "step-2" / "trainable.safetensors")
    assert_same(read_safetensors(out / "checkpoints" / "step-2" / "trainable.safetensors"), ref_step2)
    # the command line: one line, exit 1
    code, _, err_text = run_cli(["train", cfg_path])
    assert_contract(code, err_text, {1})
    assert "step-2 is intact" in err_text and "--resume" in err_text
    monkeypatch.undo()  # space freed: --resume finishes and equals the uninterrupted run
    code, _, err_text = run_cli(["train", cfg_path, "--resume"])
    assert code == 0, err_text
    assert_same(trainable(out), trainable(base["ref"]))
    assert not stray_temps(out)


def test_disk_full_during_the_final_export_loses_nothing(base, monkeypatch):
    cfg_path = write_config(base["dir"], "full-export")
    out = Path(load_config(cfg_path).train.out)
    for obj, name, new in disk_full_when(lambda p: f"{out.resolve()}/model/" in p):
        monkeypatch.setattr(obj, name, new)
    with pytest.raises(TrainingAborted) as err:
        train(load_config(cfg_path), **QUIET)
    assert err.value.where == str(out / "model")
    assert "step-6" in err.value.what and "--resume" in err.value.what
    assert checkpoint_problem(out / "checkpoints" / "step-6") is None
    monkeypatch.undo()
    res = train(load_config(cfg_path), resume=True, **QUIET)
    assert res.steps == 6
    assert_same(read_safetensors(out / "model" / "model.safetensors"),
                read_safetensors(base["ref"] / "model" / "model.safetensors"))
    assert not stray_temps(out)


# ------------------------------------------------------------------------------------------
# 3. NaN losses and gradients
# ------------------------------------------------------------------------------------------
def inject_nan(monkeypatch, loss_steps=(), grad_steps=()):
    """NaN loss at optimizer steps ``loss_steps``; a NaN gradient (finite loss) at ``grad_steps``.
    Returns the ``on_step`` callback that tells the injectors which step is running."""
    done = [0]
    real_loss, real_clip = loop.batch_loss_sum, torch.nn.utils.clip_grad_norm_

    def loss(model, batch, chunk, trunk=None):
        value, n = real_loss(model, batch, chunk, trunk)
        return (value * float("nan") if done[0] + 1 in loss_steps else value), n

    def clip(params, max_norm, *a, **kw):
        params = list(params)
        if done[0] + 1 in grad_steps:
            params[0].grad.view(-1)[0] = float("nan")
        return real_clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(loop, "batch_loss_sum", loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return lambda step: done.__setitem__(0, step)


def test_nan_loss_and_nan_gradient_steps_are_skipped_and_counted(base, monkeypatch):
    cfg = load_config(write_config(base["dir"], "nan", train={"save_every": 1}))
    out = Path(cfg.train.out)
    res = train(cfg, on_step=inject_nan(monkeypatch, loss_steps={2}, grad_steps={3}), **QUIET)
    assert res.steps == 6 and res.skipped_steps == 2 and not res.interrupted
    rows = metric_rows(out)  # strict JSON: a NaN is written as null
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 2, 2]
    assert rows[1]["loss"] is None and rows[2]["grad_norm"] is None
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 1)
    step = {n: read_safetensors(out / "checkpoints" / f"step-{n}" / "trainable.safetensors") for n in (1, 3, 4)}
    assert_same(step[1], step[3])  # steps 2 and 3 changed nothing
    assert not all(torch.equal(step[1][k], step[4][k]) for k in step[1])
    assert all(torch.isfinite(t).all() for t in read_safetensors(out / "model" / "model.safetensors").values())


def test_persistent_nan_aborts_with_a_checkpoint(base, monkeypatch):
    cfg_path = write_config(base["dir"], "nan-abort", train={"max_nan_steps": 3})
    out = Path(load_config(cfg_path).train.out)
    on_step = inject_nan(monkeypatch, loss_steps={3, 4, 5, 6})
    with pytest.raises(TrainingAborted, match="non-finite for 3 steps in a row at step 5; checkpoint saved"):
        train(load_config(cfg_path), on_step=on_step, **QUIET)
    ckpt = newest_checkpoint(out)
    assert ckpt.name == "step-5" and checkpoint_problem(ckpt) is None
    assert json.loads((ckpt / "state.json").read_text())["skipped_steps"] == 3
    ref_step2 = read_safetensors(base["ref"] / "checkpoints" / "step-2" / "trainable.safetensors")
    assert_same(read_safetensors(ckpt / "trainable.safetensors"), ref_step2)  # the NaN steps changed nothing
    code, _, err = run_cli(["train", cfg_path])  # every loss is NaN now: one line, exit 1
    assert_contract(code, err, {1})
    assert "checkpoint saved" in err


# ------------------------------------------------------------------------------------------
# 4. damaged checkpoints are never picked up
# ------------------------------------------------------------------------------------------
def _bad_state(d: Path, state: str):
    (d / "state.json").write_text(state)


DAMAGE = {
    "bit flip in trainable data": lambda d: flip_bit(d / "trainable.safetensors",
                                                    8 * data_start(d / "trainable.safetensors") + 77),
    "truncated optimizer state": lambda d: (d / "optimizer.safetensors").write_bytes(
        (d / "optimizer.safetensors").read_bytes()[:-40]),
    "rng state missing": lambda d: (d / "rng.safetensors").unlink(),
    "state.json cut short": lambda d: _bad_state(d, (d / "state.json").read_text()[:30]),
    "state.json step escapes": lambda d: _bad_state(d, json.dumps({"step": "../../../escaped"})),
}


@pytest.fixture(scope="module")
def interrupted_run(base):
    """A run stopped (SIGINT) after step 4: checkpoints step-2 and step-4; copied per test."""
    cfg = load_config(write_config(base["dir"], "stopped"))

    def stop(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    train(cfg, on_step=stop, **QUIET)
    return Path(cfg.train.out)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(base, interrupted_run, damage):
    out = base["dir"] / f"damaged-{list(DAMAGE).index(damage)}"
    shutil.copytree(interrupted_run, out)
    cfg_path = write_config(base["dir"], out.name)
    DAMAGE[damage](out / "checkpoints" / "step-4")
    logs = []
    train(load_config(cfg_path), resume=True, log=logs.append)
    skipped = [ln for ln in logs if ln.startswith("resume: skipping")]
    assert len(skipped) == 1 and "step-4" in skipped[0], logs
    assert "resume: continuing from step-2" in logs
    assert_same(trainable(out), trainable(base["ref"]))
    assert not list(base["dir"].rglob("escaped*"))


def test_every_checkpoint_damaged_is_one_line_exit_4(base, interrupted_run):
    out = base["dir"] / "all-damaged"
    shutil.copytree(interrupted_run, out)
    cfg_path = write_config(base["dir"], out.name)
    for d in (out / "checkpoints").iterdir():
        flip_bit(d / "optimizer.safetensors", 8 * data_start(d / "optimizer.safetensors") + 3)
    code, _, err = run_cli(["train", cfg_path, "--resume"])
    assert_contract(code, err, {4})
    assert "step-4" in err and "no usable checkpoint" in err


def test_half_written_metrics_line_is_dropped_on_resume(base, interrupted_run):
    out = base["dir"] / "cut-metrics"
    shutil.copytree(interrupted_run, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1, "l')  # a kill (or a full disk) in the middle of a line
    train(load_config(write_config(base["dir"], out.name)), resume=True, **QUIET)
    assert [r["step"] for r in metric_rows(out)] == list(range(1, 7))


# ------------------------------------------------------------------------------------------
# 5. hypothesis: config TOML, JSONL data and argv end in a contract status and one line
# ------------------------------------------------------------------------------------------
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
    "generate": (1, {"--adapter": True, "--quant": True, "--prompt": True, "--chat": True,
                     "--max-new-tokens": True, "--temperature": True, "--top-p": True, "--seed": True}),
    "merge": (3, {"--dtype": True, "--quant": True}),
    "data check": (1, {"--tokenizer": True, "--max-len": True, "--format": True}),
    "data stats": (1, {"--tokenizer": True, "--format": True, "--json": False}),
    "data dedup": (1, {"--out": True, "--threshold": True, "--report": True, "--num-perm": True,
                       "--ngram": True, "--seed": True}),
    "data redact": (1, {"--out": True, "--kinds": True}),
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
    "--prompt": ["the", "", " "], "--chat": ["hi", ""],
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


# ------------------------------------------------------------------------------------------
# 7. security: no pickle, nothing outside the output folder, sandboxed chat templates
# ------------------------------------------------------------------------------------------
ENGINE = ["peft_core", "quant", "train", "eval", "base.py", "cli.py", "demo.py", "__init__.py"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _engine_sources():
    for pkg in ENGINE:
        for path in [ROOT / pkg] if pkg.endswith(".py") else sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_engine_code_never_unpickles_or_executes_code():
    """AST scan of the engine: no pickle-family import; torch.load only with
    weights_only=True; np.load never with allow_pickle=True; no eval/exec/compile/__import__;
    importlib only for the bundled LoRA variants; no trust_remote_code."""
    problems = []
    for path, tree in _engine_sources():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load") or func == "load" and "weights_only" in kw:
                if kw.get("weights_only") != "True":
                    problems.append(f"{rel}:{node.lineno}: {func} without weights_only=True")
            if func in ("np.load", "numpy.load") and kw.get("allow_pickle", "False") != "False":
                problems.append(f"{rel}:{node.lineno}: np.load with allow_pickle")
            if func in ("eval", "exec", "compile", "__import__", "execfile"):
                problems.append(f"{rel}:{node.lineno}: calls {func}")
            if func == "importlib.import_module":
                arg = ast.unparse(node.args[0])
                lazy_api = rel == Path("__init__.py") and arg == "module"  # the constant _API table
                if "peft_core.variants" not in arg and not lazy_api:
                    problems.append(f"{rel}:{node.lineno}: imports a module named at run time")
            if "trust_remote_code" in kw:
                problems.append(f"{rel}:{node.lineno}: trust_remote_code")
    assert not problems, "\n".join(problems)


def test_outputs_hold_no_pickle(base):
    """Everything a run writes is safetensors, JSON or a plain .npy array (no object arrays)."""
    import numpy as np

    allowed = (".safetensors", ".json", ".jsonl", ".npy", ".jinja")
    for path in sorted(base["ref"].rglob("*")):
        if path.is_file():
            assert path.name.endswith(allowed), path
            if path.suffix == ".npy":
                np.load(path, allow_pickle=False)


class _Bomb:
    """Unpickling this creates the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_never_loaded(fuzz_dir, tmp_path):
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_Bomb(marker))
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    shutil.copy(fuzz_dir / "adapter" / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(bomb)
    code, _, err = run_cli(["generate", fuzz_dir / "model", "--adapter", adapter, "--prompt", "the",
                            "--max-new-tokens", "1"])
    assert_contract(code, err, {4})
    assert "adapter_model.bin is not supported" in err
    model = tmp_path / "pickled-model"
    shutil.copytree(fuzz_dir / "model", model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(bomb)
    code, _, err = run_cli(["generate", model, "--prompt", "the", "--max-new-tokens", "1"])
    assert_contract(code, err, {4})
    assert not marker.exists()


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_names_from_files_cannot_write_outside_the_output_folder(fuzz_dir, tmp_path):
    """Adapter tensor names and config fields, GGUF metadata and checkpoint state with
    ``../`` in them: refused or ignored, and nothing is written outside the output folder."""
    outside = _tree(tmp_path)
    adapter = tmp_path / "sneaky-adapter"
    shutil.copytree(fuzz_dir / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../../../escaped"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["merge", fuzz_dir / "model", adapter, tmp_path / "merged"])
    assert code == 0, err
    assert _tree(tmp_path / "merged") == {"config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"}
    tensors = read_safetensors(adapter / "adapter_model.safetensors")
    write_safetensors({"base_model.model.../../../escaped.lora_A.weight": torch.zeros(2, 64), **tensors},
                      adapter / "adapter_model.safetensors")
    code, _, err = run_cli(["merge", fuzz_dir / "model", adapter, tmp_path / "merged-2"])
    assert_contract(code, err, {4})
    assert "unexpected tensor" in err and not (tmp_path / "merged-2").exists()
    assert not list(tmp_path.parent.rglob("escaped*")) and not list(fuzz_dir.rglob("escaped*"))
    assert _tree(tmp_path) - outside == {"sneaky-adapter", "merged"} | {f"sneaky-adapter/{f}" for f in (
        "adapter_config.json", "adapter_model.safetensors")} | {f"merged/{f}" for f in _tree(tmp_path / "merged")}


def test_gguf_tensor_names_cannot_escape(tmp_path):
    """A GGUF tensor named ``../../../escaped``: import-gguf writes the four files of the
    folder and nothing else, anywhere."""
    pytest.importorskip("gguf")
    import numpy as np

    from tests.test_gguf_import import write_tiny_gguf

    path = tmp_path / "sneaky.gguf"
    write_tiny_gguf(path, extra_tensors={"../../../escaped": np.zeros(32, np.float32)})
    before = _tree(tmp_path)
    code, _, err = run_cli(["import-gguf", path, tmp_path / "out" / "sneaky"])
    assert_contract(code, err, {0, 4})
    new = _tree(tmp_path) - before
    assert new <= {"out", "out/sneaky"} | {f"out/sneaky/{f}" for f in (
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}, new
    assert not list(tmp_path.parent.rglob("escaped*"))


ADAPTER_EDGES = {  # adapter_config.json key -> a value that once crashed or could
    "exclude_modules": [5, "(", [1]], "layers_to_transform": [[1.5], "0"], "rank_pattern": [{"q_proj": True}, [1]],
    "lora_alpha": [float("nan"), 0], "r": [10**12, 0, 2.5], "target_modules": [[""], "(?<=x)", {}],
    "alpha_pattern": [{"(": 2}], "init_lora_weights": [["x"], "corda"], "peft_type": [None, "IA3"],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in ADAPTER_EDGES.items() for v in vs])
def test_adapter_config_edge_values(fuzz_dir, tmp_path, key, value):
    d = tmp_path / "adapter"
    shutil.copytree(fuzz_dir / "adapter", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    code, _, err = run_cli(["generate", fuzz_dir / "model", "--adapter", d, "--prompt", "the",
                            "--max-new-tokens", "1"])
    assert_contract(code, err, {0, 4})


SSTI = {  # template -> what it tries
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "walk to object's subclasses",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER') }}": "reach os through a global's __globals__",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}": "reach os through lipsum",
    "{% for m in messages %}{{ m.update({'role': 'x'}) }}{% endfor %}": "mutate the caller's messages",
    "{{ messages.__class__.__base__.__subclasses__() }}": "walk from the messages list",
    "{{ raise_exception.__globals__ }}": "read the renderer's globals",
}


@pytest.mark.parametrize("template", list(SSTI))
def test_chat_templates_cannot_reach_python(fuzz_dir, tmp_path, template):
    """A model folder whose chat template tries to escape the Jinja sandbox: generate --chat
    and train on chat data stop with one line (exit 3: the template failed on the data)
    and nothing runs."""
    marker = tmp_path / "MARKER"
    model = tmp_path / "evil-model"
    shutil.copytree(fuzz_dir / "model", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template.replace("MARKER", str(marker))
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(["generate", model, "--chat", "hi", "--max-new-tokens", "1"])
    assert_contract(code, err, {2, 3})
    config = tmp_path / "evil.toml"
    config.write_text(f'[model]\npath = "{model}"\nquant = "none"\n[adapter]\nkind = "none"\n'
                      f'[data]\ntrain = "{fuzz_dir / "good.jsonl"}"\n[train]\nout = "{tmp_path / "run"}"\n'
                      'max_steps = 1\n')
    code, _, err = run_cli(["train", config])
    assert_contract(code, err, {3})
    assert "chat template" in err
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["--prompt", ""], ["--chat", "hi"]], ids=["empty-prompt", "empty-template"])
def test_a_prompt_with_no_tokens_is_a_usage_error(fuzz_dir, tmp_path, argv):
    """An empty --prompt, or a chat template that renders nothing: exit 2, one line."""
    model = tmp_path / "model"
    shutil.copytree(fuzz_dir / "model", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ '' }}"}))
    code, _, err = run_cli(["generate", model, *argv, "--max-new-tokens", "1"])
    assert_contract(code, err, {2})
    assert "the prompt is empty" in err
