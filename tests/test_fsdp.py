"""FSDP2 under torchrun on the CPU (gloo, 2 processes), ``train.fsdp = true``, QLoRA nf4: the
same adapter, within 1e-6, as one process with the same global batch, through a --resume
under FSDP and through checkpoints carried between FSDP and one process, also with rows of
each micro-batch per rank and gradient checkpointing; each rank holds only its shard of the
packed 4-bit codes; the 8-bit AdamW is refused.

This file is also the probe torchrun starts for the shard check (``__main__`` at the end).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from leantune.base import UsageError
from tests.test_ddp import ENV, ROOT, SETUP, assert_close_runs, one_process, torchrun
from tests.test_train_loop import write_config, write_data
from leantune.train import loop
from leantune.train.config import load_config


def _fsdp_missing() -> str | None:
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available"
    return None


MISSING = _fsdp_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

FSDP = ("--set", "train.fsdp=true")


def single(cfg_path, *args):
    """The same command in one process (one thread, CPU: as each rank runs)."""
    cmd = [sys.executable, "-m", "leantune", "train", str(cfg_path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    write_data(tmp / "train.jsonl", n=25)
    return write_config(tmp, "run", **SETUP)


@pytest.fixture(scope="module")
def ref(cfg_path):
    """One process, 4 steps of grad_accum 2: where every FSDP run below must end."""
    with pytest.MonkeyPatch.context() as mp:
        return one_process(cfg_path, mp, f"train.out='{cfg_path.parent / 'ref'}'").out_dir


def test_fsdp_equals_one_process_through_resume(cfg_path, ref, tmp_path):
    """grad_accum 2 over 2 processes (one micro-batch each), stopped after 2 steps and resumed
    under FSDP: the adapter of one process. The same step-2 checkpoint, written under FSDP and
    resumed by one process, ends there too (checkpoints hold full tensors)."""
    out = tmp_path / "fsdp"
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--set", "train.max_steps=2", *FSDP)
    assert res.returncode == 0, res.stderr
    shutil.copytree(out, tmp_path / "mixed")
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--resume", *FSDP)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("resume: continuing from step-2") == 1  # rank 0 alone prints
    assert_close_runs(out, ref)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["train"]["fsdp"] is True
    # the codes and absmax of the 14 4-bit linears: each rank holds its torch.chunk of each
    # (sizes within a byte), none of them all: unsharded, each would hold the whole
    whole, held = manifest["fsdp"]["packed_4bit_bytes"], manifest["fsdp"]["packed_4bit_bytes_per_rank"]
    assert len(held) == 2 and sum(held) == whole > 0
    assert max(held) - min(held) <= 2 * 14

    res = single(cfg_path, "--set", f"train.out='{tmp_path / 'mixed'}'", "--resume")
    assert res.returncode == 0, res.stderr
    assert_close_runs(tmp_path / "mixed", ref)


def test_one_process_checkpoint_resumes_under_fsdp(cfg_path, ref, tmp_path):
    """2 steps in one process, the rest under FSDP from its checkpoint: the same adapter."""
    out = tmp_path / "run"
    res = single(cfg_path, "--set", f"train.out='{out}'", "--set", "train.max_steps=2")
    assert res.returncode == 0, res.stderr
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--resume", *FSDP)
    assert res.returncode == 0, res.stderr
    assert_close_runs(out, ref)


def test_rows_of_each_micro_batch_with_grad_checkpoint(cfg_path, tmp_path, monkeypatch):
    """grad_accum 3 does not split over 2 processes: each takes 2 of the 4 rows of every
    micro-batch, and of the last one-row batch of an epoch rank 1 gets none, so it runs a
    row that supervises nothing to keep FSDP's collectives in step. The 7 eval batches
    leave rank 1 one short as well. Gradient checkpointing recomputes each sharded block."""
    ref = one_process(cfg_path, monkeypatch, f"train.out='{tmp_path / 'ref'}'", "train.grad_accum=3")
    out = tmp_path / "fsdp"
    res = torchrun(cfg_path, "--set", f"train.out='{out}'", "--set", "train.grad_accum=3",
                   "--set", "train.grad_checkpoint=true", *FSDP)
    assert res.returncode == 0, res.stderr
    assert_close_runs(out, ref.out_dir)


def test_each_rank_holds_a_shard_of_the_packed_codes(cfg_path, tmp_path):
    """Run by torchrun (the probe below): after sharding, a block's packed codes are this
    rank's torch.chunk of the original, their full tensor is the original, the full-size
    copies are freed (also after a forward and backward), the decoded-absmax cache is
    dropped after the forward, and the sharded forward equals the unsharded one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(cfg_path), str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for rank in (0, 1):
        r = json.loads((tmp_path / f"probe-{rank}.json").read_text())
        assert r["global_numel"] == 2048 and r["local_numel"] == 1024  # q_proj 64 x 64: 4096 codes
        assert r["local_is_chunk"] and r["full_is_original"] and r["same_forward"]
        assert r["scales_dropped"]
        # live uint8 storage: the whole packed base before; after sharding and after a step
        # half of it (FSDP pads shards to equal sizes: a few bytes)
        assert r["uint8_after"] == r["uint8_after_step"]
        assert abs(r["uint8_after"] - r["uint8_before"] / 2) <= 64 and r["uint8_before"] > 30000


def test_8bit_adamw_is_refused_and_one_process_is_not_sharded(cfg_path):
    with pytest.raises(UsageError) as e:
        load_config(cfg_path, ["train.fsdp=true", "train.optimizer='adamw8bit'"])
    assert e.value.where.endswith("train.fsdp") and "adamw" in e.value.what
    load_config(cfg_path, ["train.fsdp=true", "train.optimizer='adamw8bit'", "train.fsdp=false"])
    assert loop.launch_ranks(fsdp=True).fsdp is False  # WORLD_SIZE unset: one process


# -- the probe -----------------------------------------------------------------------------
def _live_uint8_bytes() -> int:
    """Bytes of the distinct live uint8 storages of this process (the packed 4-bit base)."""
    import gc

    from torch.distributed.tensor import DTensor  # a wrapper: its local tensor is counted

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor) and obj.dtype == torch.uint8:
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()  # 0 once FSDP has freed an unsharded copy
    return sum(seen.values())


def _probe(cfg_path, out_dir):
    from leantune.train import fsdp

    cfg = load_config(cfg_path)
    ranks = loop.launch_ranks(fsdp=True)
    with loop.process_group(ranks):
        model, _ = loop.build_model(cfg, Path(cfg.model.path), ranks.device, torch.float32)
        q = model.model.layers[0].self_attn.q_proj.base
        x = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            before_h = model.model(x)
        before = _live_uint8_bytes()
        original = q.weight.to(torch.int16)  # copies the probe keeps are not uint8: not counted
        fsdp.shard_model(model, ranks)
        after = _live_uint8_bytes()
        with torch.no_grad():
            local = q.weight.to_local().to(torch.int16)
            full = q.weight.full_tensor().to(torch.int16)
            same_forward = bool(torch.equal(model.model(x), before_h))
        scales_dropped = q.scales is None
        model.model(x).sum().backward()
        record = {"global_numel": q.weight.numel(), "local_numel": local.numel(),
                  "local_is_chunk": bool(torch.equal(local, original.chunk(ranks.world)[ranks.rank])),
                  "full_is_original": bool(torch.equal(full, original)), "same_forward": same_forward,
                  "scales_dropped": scales_dropped, "uint8_before": before, "uint8_after": after,
                  "uint8_after_step": _live_uint8_bytes()}
    Path(out_dir, f"probe-{ranks.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    _probe(*sys.argv[1:3])
