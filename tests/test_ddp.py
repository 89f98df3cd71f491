"""Data-parallel training under torchrun on the CPU (gloo, 2 processes): the same adapter,
within 1e-6, as one process with the same global batch; resume under torchrun; the error
for a global batch that does not split over the processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from leantune.peft_core.safetensors_io import read_safetensors
from tests.test_train_loop import write_config, write_data
from leantune.train import loop
from leantune.train.config import load_config

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
# QLoRA, 4 steps of a constant lr; 25 rows in batches of 4 leave a last batch of one row
SETUP = {"model": {"quant": "nf4"}, "adapter": {"kind": "lora", "r": 4, "alpha": 8},
         "train": {"max_steps": 4, "save_every": 0, "eval_every": 2, "schedule": "constant"}}


def torchrun(cfg_path, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "leantune", "train", str(cfg_path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def one_process(cfg_path, monkeypatch, *overrides):
    """The reference run, in this process, on the CPU with one thread (as each rank runs)."""
    monkeypatch.setattr(loop, "pick_device", lambda: torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loop.train(load_config(cfg_path, list(overrides)), log=lambda m: None)
    finally:
        torch.set_num_threads(threads)


def adapter(run_dir):
    return read_safetensors(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(ddp_dir, ref_dir):
    a, b = adapter(ddp_dir), adapter(ref_dir)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, diff
    rows, ref = metrics(ddp_dir), metrics(ref_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for r, e in zip(rows, ref):
        assert r["supervised_tokens"] == e["supervised_tokens"]
        assert r["loss"] == pytest.approx(e["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5)
        assert ("eval_loss" in r) == ("eval_loss" in e) == (r["step"] % 2 == 0)
        if "eval_loss" in r:
            assert r["eval_loss"] == pytest.approx(e["eval_loss"], rel=1e-5)


@pytest.fixture
def cfg_path(tmp_path):
    write_data(tmp_path / "train.jsonl", n=25)
    return write_config(tmp_path, "run", **SETUP)


def test_whole_micro_batches_per_rank_and_resume(cfg_path, tmp_path, monkeypatch):
    """grad_accum 2 over 2 processes: one micro-batch each. Stopped after 2 steps and resumed
    under torchrun, it ends where one process ends after 4."""
    ref = one_process(cfg_path, monkeypatch, f"train.out='{tmp_path / 'ref'}'")
    out = tmp_path / "ddp"
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--set", "train.max_steps=2")
    assert res.returncode == 0, res.stderr
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--resume")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("resume: continuing from step-2") == 1  # rank 0 alone prints
    assert_close_runs(out, ref.out_dir)
    rng = read_safetensors(out / "checkpoints" / "step-4" / "rng.safetensors")
    assert set(rng) == {"torch_cpu", "torch_cpu.rank1"}
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2


def test_rows_of_each_micro_batch_per_rank(cfg_path, tmp_path, monkeypatch):
    """grad_accum 3 does not split over 2 processes: each takes 2 of the 4 rows of every
    micro-batch, and of the last one-row batch of an epoch rank 1 gets none."""
    ref = one_process(cfg_path, monkeypatch, f"train.out='{tmp_path / 'ref'}'", "train.grad_accum=3")
    out = tmp_path / "ddp"
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--set", "train.grad_accum=3")
    assert res.returncode == 0, res.stderr
    assert_close_runs(out, ref.out_dir)


def test_indivisible_global_batch_is_one_line_and_exit_2(cfg_path):
    bad = ["--set", "train.batch_size=3", "--set", "train.grad_accum=1"]
    line = ("leantune: error: train.batch_size: the global batch does not split over 2 processes "
            "(WORLD_SIZE): make batch_size (3) or grad_accum (1) a multiple of 2\n")
    for rank, stderr in (("0", line), ("1", "")):  # each process of a launch, as torchrun starts it
        env = dict(ENV, WORLD_SIZE="2", RANK=rank, LOCAL_RANK=rank)
        res = subprocess.run([sys.executable, "-m", "leantune", "train", str(cfg_path), *bad], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
        assert (res.returncode, res.stderr) == (2, stderr)
    res = torchrun(cfg_path, *bad)  # torchrun itself exits 1 and reports the workers' status 2
    assert res.returncode != 0 and res.stderr.count(line) == 1
    assert "exitcode  : 2" in res.stderr
