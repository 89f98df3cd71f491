"""Data parallelism under torchrun: this process's place (``Ranks``), the process group, and
the RNG states a checkpoint keeps for every rank."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from leantune.peft_core.build import pick_device


# -- data parallel (torchrun) --------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch; rank 0 of 1 when not launched by one.

    Data parallelism is plain collectives rather than DistributedDataParallel: the gradients
    are summed once per optimizer step, after the accumulation, in a few flat buckets (DDP
    would need ``no_sync`` for that, a forward through the wrapped module, which the loop
    does not make, and a forward on every rank, which a short last batch of an epoch may not
    give). A summed buffer is bit-identical on every rank, so clipping, the NaN guard and the
    optimizer step agree everywhere and the replicas stay equal.

    ``fsdp``: the model is sharded (``[train] fsdp``, module ``train.fsdp``). Its forwards and
    backwards are collectives then, so ``part`` and ``eval_loss`` give every rank the same
    number of them."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, micro: list) -> list:
        """This rank's part of a step's micro-batches: whole micro-batches, a contiguous run
        of them, when their number splits evenly over the ranks (each is then computed
        exactly as one process computes it); otherwise its contiguous share of the rows of
        each (a short last batch of an epoch may leave it none; under FSDP it then gets the
        batch's first row with every label masked, which adds nothing but keeps it in step)."""
        if len(micro) % self.world == 0:
            k = len(micro) // self.world
            return micro[self.rank * k:(self.rank + 1) * k]
        out = []
        for b in micro:
            q, r = divmod(len(b["input_ids"]), self.world)
            lo = self.rank * q + min(self.rank, r)
            rows = slice(lo, lo + q + (self.rank < r))
            if rows.stop > rows.start:
                out.append({key: v[rows] for key, v in b.items()})
            elif self.fsdp:
                out.append({key: torch.full_like(v[:1], -100) if key == "labels" else v[:1]
                            for key, v in b.items()})
        return out

    def sum_(self, tensors: list, bucket: int = 1 << 25):
        """Sum ``tensors`` over the ranks, in place: one all_reduce per bucket of up to
        ``bucket`` elements of one dtype."""
        if self.world == 1:
            return
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            while group:
                n, size = 0, 0
                while n < len(group) and (n == 0 or size + group[n].numel() <= bucket):
                    size += group[n].numel()
                    n += 1
                chunk, group = group[:n], group[n:]
                flat = torch.cat([t.reshape(-1) for t in chunk])
                dist.all_reduce(flat)
                for t, v in zip(chunk, flat.split([t.numel() for t in chunk])):
                    t.copy_(v.view_as(t))

    def any(self, flag) -> bool:
        """Whether ``flag`` is set on any rank: the same answer on every rank."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(bool(flag))], device=self.device)
        self.sum_([t])
        return bool(t > 0)

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors: list):
        """Rank 0's values of ``tensors`` on every rank."""
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, 0)

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def launch_ranks(fsdp: bool = False, device: torch.device | None = None) -> Ranks:
    """Rank, world size and device from torchrun's environment (cuda:LOCAL_RANK on a GPU);
    ``fsdp`` (``train.fsdp``) shards the model when there is more than one process.
    ``device``: the device kind to run on (default ``pick_device()``)."""
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    device = device if device is not None else pick_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(env.get("LOCAL_RANK", 0)))
    return Ranks(rank, world, device, fsdp=fsdp and world > 1)


@contextmanager
def process_group(ranks: Ranks):
    """torch.distributed for a torchrun launch (gloo on the CPU, NCCL on CUDA), destroyed on
    the way out, also after an error. Nothing to do for one process, or when the caller has
    set a group up already."""
    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    if ranks.device.type == "cuda":
        torch.cuda.set_device(ranks.device)
        dist.init_process_group("nccl", device_id=ranks.device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
        # A gloo worker thread lets go of a collective's tensors just after the wait returns;
        # when that needs the GIL while the interpreter shuts down, the process aborts
        # ("terminate called without an active exception"; seen after FSDP's last gathers,
        # 2.5% of runs). Waiting in a last barrier, without the GIL, lets them finish first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rng_state() -> dict:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def checkpoint_rng(ranks: Ranks) -> dict:
    """The RNG states a checkpoint keeps: rank 0's as ``torch_cpu``/``torch_cuda``, rank N's
    (N > 0, under torchrun) as ``torch_cpu.rankN``/``torch_cuda.rankN``."""
    states = ranks.gather(rng_state())
    return {k + (f".rank{r}" if r else ""): v for r, st in enumerate(states) for k, v in st.items()}
