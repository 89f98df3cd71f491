"""Peak memory of DPO (adapter-off reference) against SFT on the same pairs (issue 16).

    python -m leantune.bench.bench_dpo_memory [--steps N] [--batch B] [--out DIR]

Each objective runs in a fresh process (peak RSS is a process's high-water mark) on the
seeded toy pairs of ``train.preference_toy``: DPO on the pairs (one shared-prompt row each,
plus the reference's no-grad forward with the adapter off), SFT on prompt + chosen as
prompt / completion records, unpacked, the same batch. LoRA r16 on the 4-bit embedded
SmolLM2. A row with device, date, versions, peak RSS, seconds a step and the ratio is appended
to ``bench/records/dpo_memory.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "records" / "dpo_memory.jsonl"


def worker(objective: str, folder: Path, steps: int, batch: int) -> dict:
    """Train ``steps`` steps of ``objective`` in this process; its peak RSS and s/step."""
    import resource

    from leantune.train.loop import train
    from leantune.train.preference_toy import toy_config

    cfg = toy_config(folder, steps, batch_size=batch)
    cfg.data.eval = ""
    if objective == "sft":
        sft = folder / "sft.jsonl"
        with open(cfg.data.train) as f, open(sft, "w") as out:
            for line in f:
                r = json.loads(line)
                out.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n")
        cfg.data.train, cfg.data.pack, cfg.train.objective = str(sft), False, "sft"
    cfg.train.out = str(folder / f"run-{objective}")
    t0 = time.time()
    train(cfg, log=lambda m: None, overwrite=True)
    return {"objective": objective, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "s_per_step": (time.time() - t0) / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="runs/bench-dpo-memory")
    p.add_argument("--worker", choices=["dpo", "sft"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    folder = Path(args.out)
    if args.worker:
        print(json.dumps(worker(args.worker, folder, args.steps, args.batch)))
        return 0
    rows = {}
    for objective in ("sft", "dpo"):
        res = subprocess.run([sys.executable, "-m", "leantune.bench.bench_dpo_memory", "--worker", objective,
                              "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(folder)],
                             capture_output=True, text=True, check=True)
        rows[objective] = json.loads(res.stdout.strip().splitlines()[-1])
    import torch

    row = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": platform.machine(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0],
           "model": "SmolLM2-135M-Instruct nf4, LoRA r16", "steps": args.steps, "batch": args.batch,
           **{f"{k}_{o}": v for o, r in rows.items() for k, v in r.items() if k != "objective"},
           "rss_ratio_dpo_over_sft": rows["dpo"]["peak_rss_mb"] / rows["sft"]["peak_rss_mb"]}
    RECORDS.parent.mkdir(exist_ok=True)
    with open(RECORDS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
