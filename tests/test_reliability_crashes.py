"""Reliability (issue 9): SIGKILL at chosen I/O events then ``--resume`` (bit-exact), a full
disk during a save, NaN losses and gradients, damaged checkpoints. Rows of docs/reliability.md."""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leantune.train.loop as loop
from leantune.peft_core.safetensors_io import read_safetensors
from tests.test_train_loop import ROOT, assert_same, trainable, write_config
from leantune.train.config import load_config
from leantune.train.loop import TrainingAborted, checkpoint_problem, newest_checkpoint, train
from tests.reliability_helpers import (  # noqa: F401  (fixtures are imported by name)
    all_checkpoints_verify, assert_contract, base, data_start, _fd_path, flip_bit, io_hooks,
    metric_rows, one_thread, QUIET, run_cli, SEED, stray_temps, subprocess_env)


# The killed training: the same hooks, and SIGKILL at I/O event number KILL_AT.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.reliability_helpers import io_hooks
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
    code, _, err_text = run_cli(["train", cfg_path, "--overwrite"])  # the folder holds step-2
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
    code, _, err = run_cli(["train", cfg_path, "--overwrite"])  # every loss is NaN now: one line, exit 1
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

