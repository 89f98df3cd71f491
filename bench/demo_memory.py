"""Peak RSS per training step on the demo's real data: leantune's whole ``leantune train``
process against transformers + PEFT + bitsandbytes on the same rows (issue 15).

    python -m leantune.bench.demo_memory                                   # 50 steps, all three
    python -m leantune.bench.demo_memory --steps 50 --out bench/results --providers leantune,peer,peer-bf16

What runs, each provider in its own process, one after the other (never two at once):
- ``prepare`` (a process of its own, so that the parent that starts the measured processes
  stays small: Linux carries the parent's RSS at fork/exec into the child's ``ru_maxrss``):
  the demo's NF4 + double-quant checkpoint (``quantize_checkpoint``, reused when the work folder
  has one), its data (``train.demo_task.write_task``, 2000 train / 60 held-out records) and
  config (``demo.DEMO_CONFIG``: r16 / alpha 32 all linears, 6 x 256 packed rows, prompt
  masked, lr 1e-3, 5 warm-up steps then cosine, clip 1.0, log_every 1), then the rows every
  step trains on, built by leantune's own pipeline (``train.loop.build_data``: examples ->
  packed rows -> ``BatchPlan``), saved for the peer with the step's learning rate.
- ``leantune``: ``python -m leantune train WORK/demo.toml --set train.max_steps=N --set
  train.save_every=0 --overwrite``; its ``metrics.jsonl`` has ``peak_mem_mb`` (ru_maxrss of
  the process) and ``hostpool_peak_mb`` for every step.
- ``peer`` / ``peer-bf16``: ``bench.e2e_worker._setup_peer`` (the e2e bench's two peer
  configurations: fp32, or bnb compute in bf16 under ``torch.autocast("cpu", bfloat16)`` with
  fp32 adapters) from the base model folder (bitsandbytes quantizes it at load, NF4 + double
  quant), then N steps on the saved rows: ``model(input_ids, attention_mask, labels)``
  (the packed rows as plain sequences: the same shapes; the labels keep leantune's prompt
  mask, and a target that crosses into the next packed document is masked too, as leantune's
  ``causal_lm_targets`` does), backward, clip 1.0, AdamW at the same lr schedule; after each
  step the process's ``ru_maxrss``.

The table: peak RSS (MiB) after step 1, 5, 25 and N, step N / step 5, and leantune's peak over
the run / this provider's. The record: ``OUT/demo-memory-<cpu>-<date>.json`` (every step's
reading, the machine, versions, commit).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("leantune", "peer", "peer-bf16")
STEP_MARK = "@@demo_memory step@@ "
INFO_MARK = "@@demo_memory info@@ "
SHOWN_STEPS = (1, 5, 25)  # and the last
STABLE_LIMIT = 1.25  # acceptance: peak at any step <= 1.25 x the peak at step 5
PEER_LIMIT = 0.5  # acceptance: leantune's peak <= 0.5 x the peer's


# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------
def parse_providers(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PROVIDERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown provider(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leantune.bench.demo_memory",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per provider (default 50)")
    p.add_argument("--out", default="bench/results", help="folder of the JSON record (default bench/results)")
    p.add_argument("--providers", type=parse_providers, default=list(PROVIDERS),
                   help="comma-separated: leantune, peer, peer-bf16 (default: all three)")
    p.add_argument("--work", default="runs/demo-memory",
                   help="folder for the checkpoint, data, config and runs (the NF4 checkpoint is reused "
                        "when there; default runs/demo-memory)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per provider before it is killed")
    p.add_argument("--no-record", action="store_true", help="print the table only, write no JSON")
    # internal: the worker processes
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer-worker", choices=("peer", "peer-bf16"), help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        build_parser().error("--steps must be at least 1")
    return args


# ------------------------------------------------------------------------------------------
# the pure parts: per-step rows -> summary -> table
# ------------------------------------------------------------------------------------------
def leantune_rows(metrics_lines) -> list[dict]:
    """metrics.jsonl lines -> [{step, peak_mb, hostpool_peak_mb}] (rows without a peak skipped)."""
    rows = []
    for line in metrics_lines:
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        if "step" in rec and rec.get("peak_mem_mb") is not None:
            rows.append({"step": int(rec["step"]), "peak_mb": float(rec["peak_mem_mb"]),
                         "hostpool_peak_mb": rec.get("hostpool_peak_mb"), "loss": rec.get("loss")})
    return rows


def peer_rows(stdout: str) -> list[dict]:
    """The peer worker's step lines -> [{step, peak_mb, rss_mb, loss}]."""
    return [json.loads(line[len(STEP_MARK):]) for line in stdout.splitlines() if line.startswith(STEP_MARK)]


def _at(rows: list[dict], step: int):
    for r in rows:
        if r["step"] == step:
            return r["peak_mb"]
    return None


def summarize(rows: list[dict], steps: int) -> dict:
    """Peak RSS (MiB) after steps 1, 5, 25 and the last; the run's peak; last / step 5 and
    the largest step k / step 5 over k >= 5 (the stability acceptance)."""
    rows = sorted(rows, key=lambda r: r["step"])
    out = {"steps_done": len(rows), "steps": steps,
           "at": {str(s): _at(rows, s) for s in (*SHOWN_STEPS, steps)}}
    out["peak_mb"] = max((r["peak_mb"] for r in rows), default=None)
    last = out["at"][str(steps)]
    five = out["at"]["5"]
    out["last_over_5"] = last / five if last and five else None
    later = [r["peak_mb"] for r in rows if r["step"] >= 5]
    out["max_over_5"] = max(later) / five if later and five else None
    hp = [r.get("hostpool_peak_mb") for r in rows if r.get("hostpool_peak_mb") is not None]
    if hp:
        out["hostpool_peak_mb"] = max(hp)
    return out


def compare(summaries: dict) -> dict:
    """leantune's peak over the run / each peer configuration's, and the acceptance checks."""
    lt = summaries.get("leantune")
    out = {"leantune_over": {}, "acceptance": {}}
    if lt and lt.get("max_over_5") is not None:
        out["acceptance"]["leantune_within_1.25x_of_step5"] = lt["max_over_5"] <= STABLE_LIMIT
    for name, s in summaries.items():
        if name == "leantune" or not lt or not lt.get("peak_mb") or not s.get("peak_mb"):
            continue
        r = lt["peak_mb"] / s["peak_mb"]
        out["leantune_over"][name] = r
        out["acceptance"][f"leantune_le_0.5x_{name}"] = r <= PEER_LIMIT
    return out


def _fmt(v, spec="{:,.0f}"):
    return "-" if v is None else spec.format(v)


def markdown_table(summaries: dict, comparison: dict, steps: int) -> str:
    cols = [*SHOWN_STEPS, steps] if steps not in SHOWN_STEPS else list(SHOWN_STEPS)
    head = ["provider", *[f"step {s}" for s in cols], "run peak", f"step {steps} / step 5",
            "max / step 5", "leantune / this"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, s in summaries.items():
        ratio = 1.0 if name == "leantune" else comparison["leantune_over"].get(name)
        cells = [name, *[_fmt(s["at"].get(str(c))) for c in cols], _fmt(s.get("peak_mb")),
                 _fmt(s.get("last_over_5"), "{:.3f}"), _fmt(s.get("max_over_5"), "{:.3f}"),
                 _fmt(ratio, "{:.3f}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Peak RSS (ru_maxrss) in MiB after the step.")
    hp = summaries.get("leantune", {}).get("hostpool_peak_mb")
    if hp is not None:
        lines.append(f"leantune's host pool high-water mark: {hp:,.0f} MiB.")
    for k, v in comparison["acceptance"].items():
        lines.append(f"acceptance {k}: {'pass' if v else 'FAIL'}")
    return "\n".join(lines) + "\n"


def record_name(cpu: str, date: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") or "cpu"
    return f"demo-memory-{slug}-{date}.json"


# ------------------------------------------------------------------------------------------
# the machine
# ------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if name is None and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"model": name or "unknown", "cores": cores,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


# ------------------------------------------------------------------------------------------
# prepare (its own process): checkpoint, data, config, the rows of every step
# ------------------------------------------------------------------------------------------
def prepare(work: Path, steps: int) -> dict:
    import torch

    from leantune.train.demo_task import DEMO_CONFIG, N_EVAL, N_TRAIN, demo_toml as _toml
    from leantune.peft_core.embedded import default_model_dir
    from leantune.peft_core.quant_checkpoint import quantize_checkpoint
    from leantune.peft_core.tokenizer import Tokenizer
    from leantune.quant.chunked_ce import causal_lm_targets
    from leantune.train.config import load_config
    from leantune.train.demo_task import write_task
    from leantune.peft_core.build import resolve_model_dir
    from leantune.train.loop import build_data
    from leantune.train.schedule import lr_factor

    work.mkdir(parents=True, exist_ok=True)
    base_dir = default_model_dir()
    q_dir = work / "model-nf4"
    if not (q_dir / "model.safetensors").is_file():  # as demo.run_demo writes it
        quantize_checkpoint(base_dir, q_dir, quant_type="nf4", blocksize=64, double_quant=True,
                            compute_dtype="float32")
    paths = write_task(work / "data", n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
    conf = {k: dict(v) for k, v in DEMO_CONFIG.items()}
    conf["model"]["path"] = str(q_dir)
    conf["data"].update(train=str(paths["train"]), eval=str(paths["heldout"]))
    conf["eval"]["data"] = str(paths["heldout"])
    conf["train"]["out"] = str(work / "run-leantune")
    cfg_path = work / "demo.toml"
    cfg_path.write_text(_toml(conf))

    cfg = load_config(cfg_path, [f"train.max_steps={steps}", "train.save_every=0"])
    tok = Tokenizer.from_dir(resolve_model_dir(cfg.model.path))
    data = build_data(cfg, tok, work / "prep", log=lambda msg: None)
    ga, plan = cfg.train.grad_accum, data.plan
    batches, lrs, shapes = [], [], []
    for s in range(steps):
        micro = []
        for j in range(ga):
            b = plan.batch(*divmod(s * ga + j, len(plan)))
            labels = b["labels"].clone()
            # HF's loss: position t predicts labels[t + 1]; leantune's targets, as labels
            labels[:, 1:] = causal_lm_targets(b["labels"], b["doc_ids"])
            micro.append({"input_ids": b["input_ids"], "labels": labels,
                          "attention_mask": b["attention_mask"]})
            shapes.append(list(b["input_ids"].shape))
        batches.append(micro)
        lrs.append(cfg.train.lr * lr_factor(s, data.total, cfg.train.warmup_steps, cfg.train.schedule))
    batches_path = work / "peer-batches.pt"
    torch.save({"batches": batches, "lrs": lrs, "clip": cfg.train.clip}, batches_path)
    return {"config": str(cfg_path), "base_dir": str(base_dir), "quant_dir": str(q_dir),
            "run_dir": str(cfg.train.out), "batches": str(batches_path), "rows_per_epoch": len(plan.rows),
            "batch_shapes": sorted({tuple(x) for x in map(tuple, shapes)}),
            "compute_dtype": cfg.model.compute_dtype, "lr": cfg.train.lr, "rank": cfg.adapter.r,
            "alpha": cfg.adapter.alpha, "targets": cfg.adapter.targets,
            "supervised_tokens_step1": int(sum(int((m["labels"] != -100).sum()) for m in batches[0]))}


# ------------------------------------------------------------------------------------------
# the peer worker (its own process)
# ------------------------------------------------------------------------------------------
def _closure(fn) -> dict:
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ())}


def peer_worker(provider: str, base_dir: str, batches_path: str, rank: int, alpha: float) -> None:
    import resource

    from leantune.bench.e2e_worker import StepSpec, _import_provider, _setup_peer, rss_now_bytes

    _import_provider(provider)
    import torch

    plan = torch.load(batches_path)
    batches, lrs, clip = plan["batches"], plan["lrs"], plan["clip"]
    first = batches[0][0]["input_ids"]
    spec = StepSpec(model_dir=base_dir, batch=first.shape[0], seq=first.shape[1], rank=rank,
                    alpha=alpha, dtype="float32", device="cpu", lr=lrs[0])
    # the e2e bench's peer, as it builds it; its step runs a fixed random batch, so take the
    # model, optimizer and autocast it made and run the demo's rows through them here
    e2e_step, _ = _setup_peer(spec, bf16_autocast=provider == "peer-bf16")
    parts = _closure(e2e_step)
    model, opt, autocast = parts["model"], parts["opt"], parts["autocast"]
    params = [p for g in opt.param_groups for p in g["params"]]

    def mib(kib):
        return kib / 1024

    print(INFO_MARK + json.dumps({"rss_after_load_mb": (rss_now_bytes() or 0) / 2**20,
                                  "peak_after_load_mb": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
                                  "threads": torch.get_num_threads()}), flush=True)
    clip = clip if clip and clip > 0 else float("inf")
    for s, (micro, lr) in enumerate(zip(batches, lrs), 1):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for b in micro:
            with autocast():
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             labels=b["labels"], use_cache=False).loss
            (loss.float() / len(micro)).backward()
            total += float(loss) / len(micro)
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(STEP_MARK + json.dumps({
            "step": s, "peak_mb": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
            "rss_mb": (rss_now_bytes() or 0) / 2**20, "loss": total,
            "step_s": time.perf_counter() - t0}), flush=True)


# ------------------------------------------------------------------------------------------
# the parent (no torch here: it stays small, see the module's docstring)
# ------------------------------------------------------------------------------------------
def _root() -> Path:
    return Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(cmd, timeout: float, log_path: Path) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr tail); the output streams to ``log_path`` (and ``.err``) as it
    comes, so a process killed at ``timeout`` (exit code None) still leaves the steps it
    finished."""
    err_path = log_path.with_suffix(".err")
    with open(log_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=err, text=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    return code, log_path.read_text(), err_path.read_text()[-2000:]


def run_prepare(work: Path, steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "leantune.bench.demo_memory", "--prepare", "--work", str(work),
           "--steps", str(steps)]
    code, stdout, stderr = _run(cmd, timeout, work / "prepare.log")
    for line in stdout.splitlines():
        if line.startswith(INFO_MARK):
            return json.loads(line[len(INFO_MARK):])
    raise RuntimeError(f"prepare failed (exit {code}): {stderr.strip()}")


def run_leantune(info: dict, steps: int, timeout: float, work: Path) -> dict:
    cmd = [sys.executable, "-m", "leantune", "train", info["config"], "--set", f"train.max_steps={steps}",
           "--set", "train.save_every=0", "--overwrite"]
    t0 = time.time()
    code, _, stderr = _run(cmd, timeout, work / "leantune.log")
    metrics = Path(info["run_dir"]) / "metrics.jsonl"
    rows = leantune_rows(metrics.read_text().splitlines()) if metrics.is_file() else []
    out = {"rows": rows, "wall_s": time.time() - t0, "exit": code, "command": " ".join(cmd[1:])}
    if code != 0:
        out["error"] = f"timed out after {timeout:.0f} s" if code is None else stderr.strip()
    return out


def run_peer(provider: str, info: dict, timeout: float, work: Path) -> dict:
    cmd = [sys.executable, "-m", "leantune.bench.demo_memory", "--peer-worker", provider,
           "--work", str(work)]
    t0 = time.time()
    code, stdout, stderr = _run(cmd, timeout, work / f"{provider}.log")
    out = {"rows": peer_rows(stdout), "wall_s": time.time() - t0, "exit": code}
    for line in stdout.splitlines():
        if line.startswith(INFO_MARK):
            out.update(json.loads(line[len(INFO_MARK):]))
    if code != 0:
        out["error"] = f"timed out after {timeout:.0f} s" if code is None else stderr.strip()
    return out


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_root(), capture_output=True,
                              text=True, timeout=10)
        return head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def merge_runs(old: dict | None, runs: dict, steps: int) -> dict:
    """The runs of an earlier invocation's record of the same day and step count, with this
    invocation's providers replacing theirs (providers may be measured one invocation at a time)."""
    merged = {}
    if old and old.get("settings", {}).get("steps") == steps:
        merged.update(old.get("runs", {}))
    merged.update(runs)
    return merged


def build_record(runs: dict, steps: int, info: dict, load: dict, argv) -> dict:
    summaries = {p: summarize(r["rows"], steps) for p, r in runs.items() if r.get("rows")}
    comparison = compare(summaries)
    table = markdown_table(summaries, comparison, steps)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_info(), "versions": _versions(), "git_commit": _git_commit(), "load_avg_1m": load,
            "command": "python -m leantune.bench.demo_memory " + " ".join(argv),
            "settings": {"steps": steps, **{k: info[k] for k in (
                "batch_shapes", "compute_dtype", "lr", "rank", "alpha", "targets", "rows_per_epoch",
                "supervised_tokens_step1")}},
            "summaries": summaries, "comparison": comparison, "table": table, "runs": runs}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    work = Path(args.work).resolve()
    if args.prepare:
        print(INFO_MARK + json.dumps(prepare(work, args.steps)), flush=True)
        return 0
    if args.peer_worker:
        info = json.loads((work / "prepare.json").read_text())
        peer_worker(args.peer_worker, info["base_dir"], info["batches"], info["rank"], info["alpha"])
        return 0

    def say(msg):
        print(f"[demo_memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    work.mkdir(parents=True, exist_ok=True)
    say(f"preparing the demo's checkpoint, data, config and {args.steps} steps of rows in {work}")
    info = run_prepare(work, args.steps, args.timeout)
    (work / "prepare.json").write_text(json.dumps(info, indent=1))
    say(f"rows: {info['rows_per_epoch']} packed rows an epoch, batch shapes {info['batch_shapes']}")
    path = Path(args.out) / record_name(cpu_info()["model"],
                                        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    old = json.loads(path.read_text()) if path.is_file() and not args.no_record else None
    load = {"start": os.getloadavg()[0]}
    runs = {}
    rec = None
    for prov in args.providers:  # one at a time
        say(f"{prov}: {args.steps} steps (at most {args.timeout:.0f} s)")
        res = (run_leantune(info, args.steps, args.timeout, work) if prov == "leantune"
               else run_peer(prov, info, args.timeout, work))
        runs[prov] = res
        last = res["rows"][-1] if res["rows"] else None
        say(f"{prov}: {len(res['rows'])} steps in {res.get('wall_s', 0):.0f} s"
            + (f", peak {last['peak_mb']:,.0f} MiB" if last else "")
            + (f"; ERROR {res['error'][-300:]}" if "error" in res else ""))
        load["end"] = os.getloadavg()[0]
        rec = build_record(merge_runs(old, runs, args.steps), args.steps, info, load, argv)
        if not args.no_record:  # after every provider: a later one cut short keeps these
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec, indent=1) + "\n")
    print(rec["table"], end="")
    if not args.no_record:
        print(f"wrote {path}")
    return 0 if rec["summaries"] else 1


if __name__ == "__main__":
    sys.exit(main())
