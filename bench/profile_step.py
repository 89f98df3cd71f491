"""Profile one QLoRA training step (leantune or the peer) with ``torch.profiler``.

Prints the top kernels/ops by self device time (or CPU time without CUDA), the step's wall
time against the summed device time (a large gap means launch-bound or synchronising) and,
on a GPU, the number of kernels the step ran.
Uses the same setup as ``bench/e2e.py`` (random-weight Llama shapes, same batch and LoRA).

    python -m leantune.bench.profile_step --random-shape 1b --seq 2048 [--provider leantune|peer] [--top 25]
    python -m leantune.bench.profile_step --batch 4 --seq 256        # the embedded SmolLM2, CPU target shape
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from leantune.bench import e2e
from leantune.peft_core.build import compute_dtype_for


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-shape", choices=list(e2e.SHAPES),
                    help="a random-weight Llama of this shape (default: the embedded SmolLM2)")
    ap.add_argument("--model", help="a model folder instead")
    ap.add_argument("--provider", default="leantune", choices=list(e2e.PROVIDERS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="compute dtype (auto: bf16 on a GPU and on a CPU with native bf16, else fp32)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    model_dir, name = e2e.resolve_model(args)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = str(compute_dtype_for(args.dtype, device)).removeprefix("torch.")
    spec = e2e.StepSpec(model_dir=str(model_dir), batch=args.batch, seq=args.seq, rank=args.rank,
                        dtype=dtype, device=device.type)
    os.environ.update(e2e.PROVIDER_ENV.get(args.provider, {}))  # leantune-spec-ops: its switch
    e2e._import_provider(args.provider)
    step, _ = (e2e._setup_peer(spec) if args.provider == "peer"
               else e2e._setup_leantune(spec, graphs=args.provider == "leantune-graphs"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    wall = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{args.provider} {name} {dtype} B={args.batch} T={args.seq} r={args.rank}: "
          f"step {wall * 1e3:.1f} ms wall")
    if cuda:
        dev_us = sum(e.self_device_time_total for e in prof.key_averages())
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"summed self device time {dev_us / 1e3:.1f} ms; GPU kernels a step: {kernels}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
