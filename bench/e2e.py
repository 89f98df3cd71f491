"""End-to-end QLoRA training-step benchmark: leantune against transformers + PEFT + bitsandbytes.

One run measures both providers on the same model, batch, sequence length, rank and targets:
step time (median and 20 % / 80 % quantiles), tokens/s, peak memory (RSS on the CPU, the
allocator's peak on a GPU), roofline columns (achieved FLOP/s and GB/s against this machine's
matmul rate and copy bandwidth, measured in the same run), and leantune's ratios to the peer.

    python -m leantune.bench.e2e                                  # the CPU target: SmolLM2-135M, 4 x 256, r16
    python -m leantune.bench.e2e --steps 3 --rounds 2             # the committed measurement
    python -m leantune.bench.e2e --sweep seq=256,512,1024 --sweep rank=8,64,256 --sweep batch=1,4
    python -m leantune.bench.e2e --random-shape 8b --seq 2048 --batch 1        # on a GPU
    leantune bench ...                                   # the same, through the CLI

Design:
- Every measurement runs in its own subprocess (``python -m leantune.bench.e2e --worker PROVIDER
  --json-args SPEC``), so a provider's peak RSS is its own and no allocator state is shared.
  The worker imports its libraries, reads the baseline RSS, loads the model, runs ``warmup``
  untimed steps and ``steps`` timed ones, and prints one JSON line.
- The parent interleaves: every round runs each configuration's providers one after the
  other (leantune, then the peer), so a noisy neighbour hurts both alike; step times of all
  rounds are pooled (median, 20/80 quantiles), peak memory is the median over rounds.
- A step: forward, summed next-token loss over all B x (T-1) tokens divided by their count,
  backward, ``torch.optim.AdamW`` step (defaults, lr 2e-4) over the trainable parameters,
  ``zero_grad(set_to_none=True)``. No gradient clipping, no gradient checkpointing on
  either side. Both start from the same weights (NF4, double quantization, blocksize 64,
  bit-identical codes), the same token batch (seeded) and LoRA B = 0, so their first losses
  agree; ``loss_first`` is recorded as a check that the two measured the same thing.

Results go to ``bench/results/<device>-<date>-e2e.json`` (runs appended), ``.md`` (every
run's table) and ``-<axis>.png`` plots; see bench/README.md for the columns.

This module is the harness (the parent: configurations, worker processes, the command);
``e2e_worker`` holds the settings, providers and the worker process, ``e2e_model`` the model
folders (random shapes), ``e2e_report`` the summaries, roofline and records.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from leantune.base import LeantuneError, UsageError
# the parts, re-exported so that ``from leantune.bench import e2e; e2e.NAME`` keeps working
from leantune.bench.e2e_model import SHAPES, _cache_dir, resolve_model, write_random_model  # noqa: F401
from leantune.bench.e2e_report import (  # noqa: F401
    _cpu_name, add_derived, device_string, git_commit, linear_shapes, markdown_table, measure_machine,
    peer_missing, quantiles, record, step_cost, summarize, versions, write_plots)
from leantune.bench.e2e_worker import (  # noqa: F401
    BLOCKSIZE, PEER_PACKAGES, PEER_PROVIDERS, PROVIDER_ENV, PROVIDERS, RESULT_MARK, SWEEP_AXES, StepSpec,
    _import_provider, _setup_leantune,
    _setup_peer, _worker_entry, maxrss_bytes, rss_now_bytes, run_steps, worker)


# ------------------------------------------------------------------------------------------
# the parent: one worker process per measurement
# ------------------------------------------------------------------------------------------
def run_worker(provider: str, spec: StepSpec, timeout: float) -> dict:
    """One measurement in a fresh ``python -m leantune.bench.e2e --worker`` process."""
    cmd = [sys.executable, "-m", "leantune.bench.e2e", "--worker", provider, "--json-args", json.dumps(asdict(spec))]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(PROVIDER_ENV.get(provider, {}))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"provider": provider, "error": f"worker timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    return {"provider": provider, "error": f"worker exited {proc.returncode} without a result: "
                                           + " | ".join(tail)}


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------
def parse_sweeps(items: list[str] | None) -> dict:
    sweeps = {}
    for item in items or []:
        axis, sep, values = item.partition("=")
        axis = axis.strip()
        if not sep or axis not in SWEEP_AXES:
            raise UsageError("--sweep", f"expected AXIS=V1,V2,... with AXIS one of {', '.join(SWEEP_AXES)}; "
                                        f"got {item!r}")
        try:
            vals = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise UsageError("--sweep", f"{axis}: values must be integers, got {values!r}") from None
        if not vals or min(vals) < 1:
            raise UsageError("--sweep", f"{axis}: give positive integers, got {values!r}")
        sweeps[axis] = vals
    return sweeps


def configurations(base: StepSpec, sweeps: dict) -> list[StepSpec]:
    """The base configuration, then each swept axis's values with the other axes at the base
    (one axis at a time, not the cartesian product); duplicates dropped."""
    out, seen = [], set()
    for spec in [base] + [replace(base, **{axis: v}) for axis, vals in sweeps.items() for v in vals]:
        if spec.key() not in seen:
            seen.add(spec.key())
            out.append(spec)
    return out


def leantune_dtype(device: str) -> str:
    """``--dtype auto``: leantune's own choice (``model.compute_dtype = "auto"``): bfloat16 on a
    GPU and on a CPU with native bf16 dot products, float32 on other CPUs."""
    try:
        from leantune.peft_core.build import compute_dtype_for
    except ImportError:  # the rule, where that module is absent
        from leantune.quant.cpu_kernels import _cpu_has

        if device == "cuda" or (os.environ.get("LEANTUNE_CPU_BF16", "").strip() != "0"
                                and (_cpu_has("avx512_bf16") or _cpu_has("amx_bf16"))):
            return "bfloat16"
        return "float32"
    return str(compute_dtype_for("auto", device)).removeprefix("torch.")


def _progress(enabled: bool, msg: str):
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def run_bench(opts) -> tuple[dict, StepSpec]:
    """Measure every configuration x provider: (the run record, not yet written; the base spec)."""
    import torch

    for name in ("batch", "seq", "rank", "steps", "rounds", "chunk"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name}", f"must be at least 1, got {getattr(opts, name)}")
    if opts.warmup < 0:
        raise UsageError("--warmup", "must be 0 or more")
    sweeps = parse_sweeps(opts.sweep)
    providers = [p.strip() for p in opts.providers.split(",") if p.strip()]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or not providers:
        raise UsageError("--providers", f"choose among {', '.join(PROVIDERS)}; got {opts.providers!r}")
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda asked for but torch sees no GPU")
    dtype = opts.dtype if opts.dtype != "auto" else leantune_dtype(device)
    notes = []
    missing = peer_missing()
    for peer in PEER_PROVIDERS:
        if peer in providers and missing:
            providers.remove(peer)
            notes.append(f"{peer} skipped: {', '.join(missing)} not installed")
    if device == "cuda" and "peer-bf16" in providers:
        providers.remove("peer-bf16")
        notes.append("peer-bf16 skipped: a CPU configuration (on a GPU, --providers peer --dtype bfloat16)")
    if device != "cuda" and "leantune-graphs" in providers:
        providers.remove("leantune-graphs")
        notes.append("leantune-graphs skipped: CUDA graphs need a CUDA device")
    if device != "cuda" and "leantune-spec-ops" in providers:
        providers.remove("leantune-spec-ops")
        notes.append("leantune-spec-ops skipped: its switch only changes what runs on CUDA")
    if not providers:
        raise UsageError("--providers", "nothing to measure here: " + "; ".join(notes))
    model_dir, model_name = resolve_model(opts)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    base = StepSpec(model_dir=str(model_dir), batch=opts.batch, seq=opts.seq, rank=opts.rank,
                    alpha=opts.alpha, targets=opts.targets, dtype=dtype, device=device, steps=opts.steps,
                    warmup=opts.warmup, seed=opts.seed, threads=opts.threads, chunk=opts.chunk)
    specs = configurations(base, sweeps)
    verbose = opts.verbose or sys.stderr.isatty()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = None
    if opts.roofline != "off":
        _progress(verbose, "measuring copy bandwidth and matmul rate ...")
        machine = measure_machine(device, dtype, quick=opts.roofline == "quick", threads=opts.threads)
        _progress(verbose, f"  copy {machine['copy_GBps']:.1f} GB/s, matmul "
                           f"{machine['matmul_TFLOPs'] * 1e3:.1f} GFLOP/s")
    results = {(s.key(), p): [] for s in specs for p in providers}
    total, done = opts.rounds * len(specs) * len(providers), 0
    for rnd in range(opts.rounds):
        for spec in specs:
            for prov in providers:
                t0 = time.perf_counter()
                res = run_worker(prov, spec, opts.timeout)
                done += 1
                results[(spec.key(), prov)].append(res)
                if "error" in res:
                    msg = "ERROR " + res["error"]
                else:
                    msg = (f"{statistics.median(res['times_s']):.3f} s/step, peak RSS "
                           f"{res['rss_peak_bytes'] / 1e9:.2f} GB, loss0 {res['losses'][0]:.4f}")
                _progress(verbose, f"[{done}/{total}] round {rnd + 1} B={spec.batch} T={spec.seq} "
                                   f"r={spec.rank} {prov}: {msg} ({time.perf_counter() - t0:.0f} s)")
    rows = [summarize(p, s, results[(s.key(), p)]) for s in specs for p in providers]
    elem_bytes = 4 if dtype == "float32" else 2
    add_derived(rows, cfg, machine, elem_bytes)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": now.isoformat(timespec="seconds"),
        "device": device_string(device),
        "cpu": _cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": dtype,
        "versions": versions(),
        "git_commit": git_commit(),
        "load_avg_1m": {"start": load_before, "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "model": {"name": model_name, "dir": str(model_dir),
                  **{k: cfg.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                             "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "tie_word_embeddings")}},
        "quant": {"type": "nf4", "double_quant": True, "blocksize": BLOCKSIZE},
        "settings": {"steps": opts.steps, "warmup": opts.warmup, "rounds": opts.rounds, "seed": opts.seed,
                     "threads": opts.threads, "chunk": opts.chunk, "alpha": opts.alpha,
                     "targets": opts.targets, "sweeps": sweeps, "providers": providers,
                     "base": {"batch": opts.batch, "seq": opts.seq, "rank": opts.rank}},
        "machine": machine,
        "notes": notes,
        "rows": rows,
    }, base


def add_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="DIR", help="a Hugging Face model folder (default: the embedded SmolLM2-135M)")
    g.add_argument("--random-shape", choices=list(SHAPES),
                   help="a random-weight Llama of this shape, written to the cache on first use")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="all-linear", help='"all-linear" or module names, comma-separated')
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: leantune's own choice, bfloat16 on a GPU and on CPUs with native "
                        "bf16, else float32; peer-bf16 always computes in bfloat16 with float32 adapters)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (fresh processes)")
    p.add_argument("--sweep", action="append", metavar="AXIS=V1,V2",
                   help=f"vary one of {', '.join(SWEEP_AXES)} with the others at the base (repeatable)")
    p.add_argument("--providers", default="leantune,peer",
                   help="comma-separated: leantune, leantune-graphs (CUDA), leantune-spec-ops (CUDA), peer, peer-bf16 (CPU: bnb compute "
                        "in bfloat16 under torch.autocast, float32 adapters)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--chunk", type=int, default=256, help="leantune's cross-entropy chunk (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--roofline", default="full", choices=["full", "quick", "off"],
                   help="measure copy bandwidth and matmul rate (quick: small sizes, for smoke tests)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker before it is killed")
    p.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--no-record", action="store_true", help="print the table only, write nothing")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="progress lines even when not on a terminal")
    return p


def add_bench_parser(subparsers):
    """Register ``leantune bench`` on the CLI's sub-command parsers."""
    s = subparsers.add_parser("bench", help="end-to-end training-step benchmark against transformers + PEFT",
                              description=__doc__.split("\n\n")[0])
    add_bench_arguments(s)
    s.set_defaults(func=cmd_bench)
    return s


def cmd_bench(args) -> int:
    """``leantune bench``: measure, print the markdown table, write the records."""
    if args.tag and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        raise UsageError("--tag", "letters, digits, '.', '_' and '-' only")
    run, base = run_bench(args)
    print(markdown_table(run), end="")
    if not args.no_record:
        for path in record(run, Path(args.out), base, tag=args.tag, plots=not args.no_plots):
            print(f"wrote {path}")
    ok = any("median_s" in r for r in run["rows"])
    if not ok:
        raise LeantuneError("bench", "every measurement failed: " + "; ".join(
            e for r in run["rows"] for e in r.get("errors", [])[:1]))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        wp = argparse.ArgumentParser(prog="leantune.bench.e2e --worker")
        wp.add_argument("--worker", choices=PROVIDERS, required=True)
        wp.add_argument("--json-args", required=True)
        w = wp.parse_args(argv)
        return _worker_entry(w.worker, w.json_args)
    p = add_bench_arguments(argparse.ArgumentParser(prog="python -m leantune.bench.e2e", description=__doc__.split("\n\n")[0]))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        return cmd_bench(args)
    except LeantuneError as e:
        if args.debug:
            raise
        print(f"leantune: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
