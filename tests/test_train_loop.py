"""The training loop end to end on a tiny model: outputs, loss going down, exact resume
after a clean stop (SIGINT) and after SIGKILL at a random moment."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leantune.peft_core.safetensors_io import read_safetensors
from tests.helpers import tiny_model_dir
from leantune.train.config import load_config
from leantune.train.loop import newest_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


def write_data(path, n=24, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"add {a} and {b}"},
                {"role": "assistant", "content": f"{a + b}"}]}) + "\n")
    return path


def write_config(tmp_path, name="run", **sections):
    model = tmp_path / "model"
    if not model.exists():
        tiny_model_dir(model, "llama", seed=0)
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_data(data)
    conf = {
        # float32 whatever the CPU: the runs these tests compare must agree to the last bit
        "model": {"path": str(model), "quant": "none", "compute_dtype": "float32"},
        "adapter": {"kind": "none"},
        "data": {"train": str(data), "eval": str(data), "max_len": 64},
        "train": {"out": str(tmp_path / name), "max_steps": 6, "batch_size": 4, "grad_accum": 2,
                  "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "save_every": 2},
    }
    for sec, vals in sections.items():
        conf.setdefault(sec, {}).update(vals)
    assert conf["train"]["grad_accum"] == 2
    lines = []
    for sec, vals in conf.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in vals.items()]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def trainable(run_dir):
    return read_safetensors(newest_checkpoint(Path(run_dir)) / "trainable.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_full_finetune_writes_outputs_and_learns(tmp_path):
    cfg = load_config(write_config(tmp_path, train={"max_steps": 12, "eval_every": 4}))
    res = train(cfg, log=lambda m: None)
    out = Path(cfg.train.out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert key in rows[0]
    assert "eval_loss" in rows[3]
    assert rows[-1]["loss"] < rows[0]["loss"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and len(manifest["datasets"]["train"]["sha256"]) == 64
    assert manifest["base_model_sha256"] and manifest["versions"]["torch"] == torch.__version__
    assert (out / "model" / "model.safetensors").is_file()
    assert res.steps == 12 and newest_checkpoint(out).name == "step-12"


QLORA = {"model": {"quant": "nf4"}, "adapter": {"kind": "lora", "r": 4, "alpha": 8}}


def test_padding_to_a_multiple_keeps_the_losses(tmp_path):
    """data.pad_to_multiple_of only adds masked padding: the losses and the trained adapter
    match the run padded to the longest row only (float32, to rounding)."""
    runs = {}
    for m in (1, 16):
        cfg = load_config(write_config(tmp_path, f"pad{m}", data={"pad_to_multiple_of": m},
                                       train={"max_steps": 3, "save_every": 0}, **QLORA))
        train(cfg, log=lambda m: None)
        out = Path(cfg.train.out)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[m] = ([r["loss"] for r in rows], read_safetensors(out / "adapter" / "adapter_model.safetensors"))
    assert runs[16][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6)
    for k, v in runs[1][1].items():
        torch.testing.assert_close(runs[16][1][k], v, rtol=1e-4, atol=1e-6)


def test_metrics_report_the_host_pool_high_water_mark_beside_the_rss(tmp_path, monkeypatch):
    from leantune.quant import hostpool

    if not hostpool.enabled():
        pytest.skip("the host pool is off (no C compiler)")
    monkeypatch.setattr(hostpool, "MIN_BYTES", 1024)  # the tiny model's tensors go through it
    cfg = load_config(write_config(tmp_path, train={"max_steps": 3}, **QLORA))
    train(cfg, log=lambda m: None)
    rows = [json.loads(x) for x in (Path(cfg.train.out) / "metrics.jsonl").read_text().splitlines()]
    marks = [r["hostpool_peak_mb"] for r in rows]
    assert marks == sorted(marks) and marks[-1] > 0  # a high-water mark: it never goes down
    assert marks[-1] == hostpool.stats()["peak_bytes"] / 2**20
    assert all(r["hostpool_peak_mb"] < r["peak_mem_mb"] for r in rows)
    assert all(0 < r["rss_mb"] <= r["peak_mem_mb"] + 1 for r in rows)  # now <= the high-water mark


@pytest.mark.parametrize("setup", [{}, QLORA], ids=["full-finetune", "qlora"])
def test_resume_after_sigint_is_bit_exact(tmp_path, setup):
    full = load_config(write_config(tmp_path, "full", **setup))
    train(full, log=lambda m: None)
    part = load_config(write_config(tmp_path, "part", **setup))

    def stop_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    res = train(part, log=lambda m: None, on_step=stop_at_3)
    assert res.interrupted and res.steps == 3
    assert newest_checkpoint(Path(part.train.out)).name == "step-3"
    train(part, resume=True, log=lambda m: None)
    assert_same(trainable(part.train.out), trainable(full.train.out))
    steps = [json.loads(x)["step"] for x in (Path(part.train.out) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    """QLoRA with gradient accumulation (grad_accum = 2), killed at a random moment."""
    full = load_config(write_config(tmp_path, "full", train={"max_steps": 60, "save_every": 1}, **QLORA))
    train(full, log=lambda m: None)
    cfg_path = write_config(tmp_path, "killed", train={"max_steps": 60, "save_every": 1}, **QLORA)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(1234)
    proc = subprocess.Popen([sys.executable, "-m", "leantune", "train", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "killed"
    # a random step, then a random moment inside the following step / checkpoint write (a
    # random time after the first checkpoint was not enough: a fast CPU ran all 60 steps in it)
    target = rng.randint(2, 50)
    deadline = time.time() + 120

    def reached() -> bool:
        newest = newest_checkpoint(out)
        return newest is not None and int(newest.name.removeprefix("step-")) >= target

    while not reached() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.02))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    assert newest_checkpoint(out).name != "step-60"
    res = subprocess.run([sys.executable, "-m", "leantune", "train", str(cfg_path), "--resume"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert_same(trainable(out), trainable(full.train.out))


def test_cli_train_config_errors(tmp_path):
    path = write_config(tmp_path)
    res = subprocess.run([sys.executable, "-m", "leantune", "train", str(path), "--set", "train.lrr=1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "leantune: error: --set: train.lrr: unknown key (did you mean 'lr'?)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"text": 1}\n')
    res = subprocess.run([sys.executable, "-m", "leantune", "train", str(path), "--set", f"data.train='{bad}'"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    assert res.stderr.startswith(f"leantune: error: {bad}:1:") and res.stderr.count("\n") == 1
