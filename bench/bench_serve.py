"""Load test of ``leantune serve`` (its own process, as users run it) on loopback: the same
requests one at a time, then from
concurrent streaming clients spread over the base and two adapters.

    python -m leantune.bench.bench_serve [--model DIR] [--requests 24] [--clients 8] [--max-tokens 32]

Reports tokens/s of both runs (and their ratio), time to first token (median, p90) and the
mean decode batch, and appends a JSON row to bench/results/serve-<cpu>-<date>.jsonl.
The model defaults to the embedded SmolLM2; the adapters get random B matrices (their
speed, not their answers, is what is measured).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _adapter(model_dir, out, seed):
    from leantune.peft_core.adapters import AdapterConfig, inject_adapter, save_adapter
    from leantune.peft_core.checkpoint import load_model

    model = load_model(model_dir)
    torch.manual_seed(seed)
    inject_adapter(model, AdapterConfig(r=16, alpha=32, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return save_adapter(model, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, adapters, args):
    """``leantune serve`` in its own process (as a user runs it: the load generator's threads
    must not share the server's interpreter); returns (process, base URL)."""
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    cmd = [sys.executable, "-m", "leantune", "serve", str(model_dir), "--port", str(port),
           "--max-batch", str(args.clients), "--max-tokens", str(args.max_tokens)]
    for spec in adapters:
        cmd += ["--adapter", spec]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"leantune serve exited: {proc.stderr.read().strip()[-500:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("leantune serve did not answer /health within 300 s")


def _server_metrics(url) -> dict:
    """The server's Prometheus counters (GET /metrics) as {name: value}."""
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {k: float(v) for k, v in (ln.split() for ln in text.splitlines() if ln and not ln.startswith("#"))}


def _one(client, model, prompt, max_tokens):
    """(completion tokens, time to first token, seconds) of one streamed chat request."""
    t0 = time.perf_counter()
    first, n = None, 0
    for c in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
        if first is None and c.choices and c.choices[0].delta.content:
            first = time.perf_counter() - t0  # the first text, not the role chunk
        if c.usage is not None:
            n = c.usage.completion_tokens
    total = time.perf_counter() - t0
    return n, total if first is None else first, total


def run(args) -> dict:
    import openai

    from leantune.peft_core.embedded import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    tmp = Path(tempfile.mkdtemp())
    adapters = [f"a={_adapter(model_dir, tmp / 'a', 1)}", f"b={_adapter(model_dir, tmp / 'b', 2)}"]
    proc, root = _start(model_dir, adapters, args)
    try:
        return _load(args, model_dir, root, openai)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _load(args, model_dir, root, openai) -> dict:
    """The requests one at a time, then from ``args.clients`` concurrent streaming clients."""
    url = root + "/v1"
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    models = [Path(model_dir).resolve().name, "a", "b"]
    jobs = [(models[i % 3], f"Request {i}: write a short sentence about the number {i}.") for i in range(args.requests)]
    _one(client, models[0], "warm up", 4)

    t0 = time.perf_counter()
    seq = [_one(client, m, p, args.max_tokens) for m, p in jobs]
    seq_s = time.perf_counter() - t0

    results, lock, it = [], threading.Lock(), iter(jobs)

    def worker():
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            r = _one(c, *job, args.max_tokens)
            with lock:
                results.append(r)

    m0 = _server_metrics(root)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    con_s = time.perf_counter() - t0
    m1 = _server_metrics(root)
    steps = m1["leantune_decode_steps_total"] - m0["leantune_decode_steps_total"]
    batch = m1["leantune_batch_size_sum"] - m0["leantune_batch_size_sum"]
    decode_s = m1["leantune_decode_seconds_total"] - m0["leantune_decode_seconds_total"]
    prefill_s = m1["leantune_prefill_seconds_total"] - m0["leantune_prefill_seconds_total"]

    def ttft(rows):
        xs = sorted(r[1] for r in rows)
        return {"median_s": statistics.median(xs), "p90_s": xs[int(0.9 * (len(xs) - 1))]}

    seq_tps = sum(r[0] for r in seq) / seq_s
    con_tps = sum(r[0] for r in results) / con_s
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": _cpu_name(), "threads": int(m1.get("leantune_model_threads", 0)), "model": model_dir.name,
            "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
            "sequential": {"tokens_per_s": seq_tps, "seconds": seq_s, "ttft": ttft(seq)},
            "concurrent": {"tokens_per_s": con_tps, "seconds": con_s, "ttft": ttft(results),
                           "mean_batch": batch / max(1, steps), "decode_steps": int(steps),
                           "mean_step_s": decode_s / max(1, steps), "prefill_s": prefill_s},
            "throughput_ratio": con_tps / seq_tps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a model folder (default: the embedded SmolLM2)")
    p.add_argument("--requests", type=int, default=24, help="requests in each run (default: 24)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients and max batch (default: 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    p.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    args = p.parse_args(argv)
    row = run(args)
    print(json.dumps(row, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = "".join(ch if ch.isalnum() else "-" for ch in row["cpu"].lower()).strip("-")
    with open(out / f"serve-{cpu}-{row['date'][:10]}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
