"""The end-to-end benchmark's records: summaries of the rounds, the step's FLOP and byte
counts, this machine's roofline, versions, the markdown table, plots and the appended JSON
records. See ``leantune.bench.e2e``."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

from leantune.bench.e2e_worker import BLOCKSIZE, PEER_PACKAGES, PROVIDERS, SWEEP_AXES, StepSpec, _target_list

ROOT = Path(__file__).resolve().parent.parent  # the source tree (or the installed package)


def quantiles(ts: list[float]) -> dict:
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return {"median_s": statistics.median(ts), "q20_s": q[1], "q80_s": q[7], "n": len(ts)}


def _median_of(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(provider: str, spec: StepSpec, runs: list[dict]) -> dict:
    """Pool the rounds of one (configuration, provider): times pooled, memory medians."""
    row = {"provider": provider, "batch": spec.batch, "seq": spec.seq, "rank": spec.rank,
           "alpha": spec.alpha, "targets": spec.targets, "dtype": spec.dtype,
           "tokens_per_step": spec.batch * spec.seq}
    ok = [r for r in runs if "error" not in r]
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        row["errors"] = errors
    if not ok:
        return row
    times = [t for r in ok for t in r["times_s"]]
    row.update(quantiles(times))
    row["rounds"] = len(ok)
    row["tokens_per_s"] = row["tokens_per_step"] / row["median_s"]
    for key in ("rss_baseline_bytes", "rss_peak_bytes", "rss_peak_steps_bytes", "rss_after_load_bytes",
                "gpu_peak_bytes", "gpu_peak_steps_bytes", "load_s"):
        v = _median_of(ok, key)
        if v is not None:
            row[key] = v
    row["rss_above_baseline_bytes"] = row["rss_peak_bytes"] - row["rss_baseline_bytes"]
    row["n_trainable"] = ok[0]["n_trainable"]
    row["threads"] = ok[0]["threads"]
    row["loss_first"] = ok[0]["losses"][0]
    row["loss_last"] = statistics.median(r["losses"][-1] for r in ok)
    return row


# ------------------------------------------------------------------------------------------
# the FLOP and byte model of one training step (for the roofline columns)
# ------------------------------------------------------------------------------------------
def linear_shapes(cfg: dict) -> dict:
    """(in, out) of each decoder linear of one layer, by module name."""
    C, I = cfg["hidden_size"], cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or C // nh
    return {"q_proj": (C, nh * hd), "k_proj": (C, nkv * hd), "v_proj": (C, nkv * hd),
            "o_proj": (nh * hd, C), "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}


def step_cost(cfg: dict, batch: int, seq: int, rank: int, targets: str = "all-linear",
              elem_bytes: int = 4) -> dict:
    """Model FLOPs and an estimate of the unavoidable memory traffic of one QLoRA step.

    Counted for both providers alike (what the step must do, not what a kernel recomputes):
    T = B*S tokens, L layers, P = sum of in*out over the frozen 4-bit decoder linears,
    P_lora = sum of r*(in+out) over the adapted ones, V x C the (frozen) LM head, H heads of
    size d.

        base linears      forward 2*P*T, backward dX only (frozen) 2*P*T          = 4*P*T
        LoRA              forward 2*P_lora*T, backward dX 2*P_lora*T,
                          dA and dB 2*P_lora*T                                    = 6*P_lora*T
        LM head           logits 2*V*C*T', dH 2*V*C*T' (T' = B*(S-1); no dW)     = 4*V*C*T'
        attention         QK^T and PV, causal (half the square), per layer:
                          forward 2*2*B*S^2*H*d / 2, backward twice the forward   = 6*L*B*S^2*H*d
        norms, RoPE, SiLU, softmax, the optimizer: not counted (a few per cent).

    Leantune's chunked cross-entropy forms dH in the forward, so it computes the logits once
    like the peer. Bytes (DRAM traffic, a lower-bound estimate):
        4-bit base weights read twice (forward, backward): P * (0.5 + 1/64 + 4/(64*256)) each
        LM head read twice: 2*V*C*e (e = elem_bytes, the compute dtype's size)
        logits written and read in the forward: 2*T'*V*4 (fp32) and again for dZ: 2*T'*V*4
        saved activations written once, read once: 2*e*T*L*(6C + 2*C_kv + 3I + r*n_adapted)
        LoRA weights (fp32) read forward and backward, gradient written, AdamW reads p, g,
        m, v and writes p, m, v: 10*4*P_lora_params
    """
    L, C, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    I = cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or C // nh
    nkv = cfg.get("num_key_value_heads") or nh
    shapes = linear_shapes(cfg)
    adapted = list(shapes) if targets == "all-linear" else [t for t in _target_list(targets) if t in shapes]
    P = L * sum(i * o for i, o in shapes.values())
    P_lora = L * sum(rank * (shapes[n][0] + shapes[n][1]) for n in adapted)
    T = batch * seq
    T_ce = batch * (seq - 1)
    flops = {
        "base": 4 * P * T,
        "lora": 6 * P_lora * T,
        "lm_head": 4 * V * C * T_ce,
        "attention": 6 * L * batch * seq * seq * nh * hd,
    }
    flops["total"] = sum(flops.values())
    nbytes = {
        "base_weights": 2 * P * (0.5 + 1 / BLOCKSIZE + 4 / (BLOCKSIZE * 256)),
        "lm_head": 2 * V * C * elem_bytes,
        "logits": 4 * T_ce * V * 4,
        "activations": 2 * elem_bytes * T * L * (6 * C + 2 * nkv * hd + 3 * I + rank * len(adapted)),
        "lora_and_adamw": 10 * 4 * P_lora,
    }
    nbytes["total"] = sum(nbytes.values())
    return {"flops": flops, "bytes": nbytes, "params_base_linear": P, "params_lora": P_lora}


# ------------------------------------------------------------------------------------------
# this machine's roofline: copy bandwidth and matmul rate, measured once per run
# ------------------------------------------------------------------------------------------
def measure_machine(device: str, dtype: str, quick: bool = False, threads: int = 0) -> dict:
    """Copy bandwidth (read + write bytes / s of a large tensor copy) and matmul rate (2n^3 / s,
    fp32 n = 2048 on the CPU; the compute dtype, n = 8192, on a GPU). Medians of a few reps."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn, reps):
        fn()
        sync()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    n_copy = (1 << 22) if quick else ((1 << 28) if cuda else (1 << 26))  # fp32 elements
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), 3 if quick else 10)
    del src, dst
    mm_dtype = getattr(torch, dtype) if cuda else torch.float32
    n = 256 if quick else (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t_mm = timed(lambda: a @ b, 3 if quick else 5)
    return {"copy_GBps": 2 * 4 * n_copy / t_copy / 1e9, "copy_bytes": 4 * n_copy,
            "matmul_TFLOPs": 2 * n ** 3 / t_mm / 1e12, "matmul_n": n,
            "matmul_dtype": str(mm_dtype).removeprefix("torch."), "quick": quick}


def add_derived(rows: list[dict], cfg: dict, machine: dict | None, elem_bytes: int):
    """Roofline columns for every row, and leantune's ratios to the peer of the same config."""
    for row in rows:
        if "median_s" not in row:
            continue
        cost = step_cost(cfg, row["batch"], row["seq"], row["rank"], row["targets"], elem_bytes)
        row["flops_per_step"] = cost["flops"]["total"]
        row["bytes_per_step"] = cost["bytes"]["total"]
        row["achieved_TFLOPs"] = cost["flops"]["total"] / row["median_s"] / 1e12
        row["achieved_GBps"] = cost["bytes"]["total"] / row["median_s"] / 1e9
        if machine:
            peak, bw = machine["matmul_TFLOPs"] * 1e12, machine["copy_GBps"] * 1e9
            intensity = cost["flops"]["total"] / cost["bytes"]["total"]
            row["frac_matmul"] = row["achieved_TFLOPs"] * 1e12 / peak
            row["frac_copy"] = row["achieved_GBps"] * 1e9 / bw
            row["frac_roofline"] = row["achieved_TFLOPs"] * 1e12 / min(peak, intensity * bw)
    by_key = {(r["batch"], r["seq"], r["rank"], r["provider"]): r for r in rows}
    for row in rows:
        # the peer of the same config: "peer", or "peer-bf16" where only it was measured; in a
        # 2-byte run "peer-bf16" first (bf16 compute with float32 adapters, like leantune's)
        order = ("peer-bf16", "peer") if elem_bytes == 2 else ("peer", "peer-bf16")
        peers = [by_key.get((row["batch"], row["seq"], row["rank"], p)) for p in order]
        peer = next((p for p in peers if p is not None and "median_s" in p), None)
        if not row["provider"].startswith("leantune") or peer is None or "median_s" not in row:
            continue
        row["vs_peer"] = peer["provider"]
        row["speedup_vs_peer"] = peer["median_s"] / row["median_s"]
        row["time_ratio_vs_peer"] = row["median_s"] / peer["median_s"]
        row["rss_ratio_vs_peer"] = row["rss_peak_bytes"] / peer["rss_peak_bytes"]
        row["rss_above_baseline_ratio_vs_peer"] = (row["rss_above_baseline_bytes"]
                                                   / max(peer["rss_above_baseline_bytes"], 1))
        if row.get("gpu_peak_bytes") and peer.get("gpu_peak_bytes"):
            row["gpu_peak_ratio_vs_peer"] = row["gpu_peak_bytes"] / peer["gpu_peak_bytes"]
        row["loss_first_diff_vs_peer"] = row["loss_first"] - peer["loss_first"]


# ------------------------------------------------------------------------------------------
# run metadata
# ------------------------------------------------------------------------------------------
def _cpu_isa() -> str:
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return platform.machine()
    if {"avx512f", "avx512bw"} <= flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine() or "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string(device: str) -> str:
    """``cpu-2core-avx512``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``)."""
    if device == "cuda":
        import torch

        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu-{cores}core-{_cpu_isa()}"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "leantune"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peer_missing() -> list[str]:
    return [p for p in PEER_PACKAGES if importlib.util.find_spec(p) is None]


# ------------------------------------------------------------------------------------------
# output: markdown, JSON, plots
# ------------------------------------------------------------------------------------------
def _gb(x):
    return "" if x is None else f"{x / 1e9:.2f}"


def markdown_table(run: dict) -> str:
    m = run.get("machine") or {}
    v = run["versions"]
    lines = [
        f"### {run['model']['name']} on {run['device']}, {run['date']}",
        "",
        f"{run.get('gpu') or run['cpu']}; threads {run['rows'][0].get('threads', '?') if run['rows'] else '?'}; "
        f"dtype {run['dtype']}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}; commit {run.get('git_commit')}; "
        f"{run['settings']['steps']} timed steps x {run['settings']['rounds']} rounds, "
        f"warmup {run['settings']['warmup']}.",
    ]
    if m:
        lines.append(f"Machine: copy {m['copy_GBps']:.1f} GB/s, matmul "
                     f"{m['matmul_TFLOPs'] * 1e3:.1f} GFLOP/s ({m['matmul_dtype']} {m['matmul_n']}^3).")
    if run.get("notes"):
        lines.append("Notes: " + "; ".join(run["notes"]) + ".")
    gpu = any(r.get("gpu_peak_bytes") for r in run["rows"])
    head = ["B", "T", "r", "provider", "s/step [q20, q80]", "tokens/s", "peak RSS GB",
            "above baseline GB"]
    if gpu:
        head.append("GPU peak GB")
    head += ["GFLOP/s", "% matmul", "GB/s", "% copy", "speedup vs peer",
             "GPU peak ratio" if gpu else "RSS ratio", "loss@0"]
    ratio_key = "gpu_peak_ratio_vs_peer" if gpu else "rss_ratio_vs_peer"
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in run["rows"]:
        if "median_s" not in r:
            cells = [str(r["batch"]), str(r["seq"]), str(r["rank"]), r["provider"],
                     "error: " + (r.get("errors") or ["?"])[0][:80].replace("|", "/")]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
            continue
        cells = [str(r["batch"]), str(r["seq"]), str(r["rank"]), r["provider"],
                 f"{r['median_s']:.3f} [{r['q20_s']:.3f}, {r['q80_s']:.3f}]", f"{r['tokens_per_s']:.0f}",
                 _gb(r["rss_peak_bytes"]), _gb(r["rss_above_baseline_bytes"])]
        if gpu:
            cells.append(_gb(r.get("gpu_peak_bytes")))
        cells += [f"{r['achieved_TFLOPs'] * 1e3:.1f}",
                  f"{100 * r['frac_matmul']:.0f}" if "frac_matmul" in r else "",
                  f"{r['achieved_GBps']:.2f}",
                  f"{100 * r['frac_copy']:.0f}" if "frac_copy" in r else "",
                  f"{r['speedup_vs_peer']:.2f}x" if "speedup_vs_peer" in r else "",
                  f"{r[ratio_key]:.2f}" if ratio_key in r else "",
                  f"{r['loss_first']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(run: dict, stem: Path, base: StepSpec) -> list[Path]:
    """Step time and peak memory per provider over each swept axis (one PNG an axis), or a
    bar chart of the single configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in run["rows"] if "median_s" in r]
    if not rows:
        return []
    mem_key = "gpu_peak_bytes" if any(r.get("gpu_peak_bytes") for r in rows) else "rss_peak_bytes"
    mem_label = "GPU allocator peak (GB)" if mem_key == "gpu_peak_bytes" else "peak RSS (GB)"
    providers = sorted({r["provider"] for r in rows}, key=PROVIDERS.index)
    title = f"{run['model']['name']}, {run['device']}, {run['date']}"
    written = []
    axes_swept = [a for a in SWEEP_AXES if len({r[a] for r in rows}) > 1]
    for axis in axes_swept:
        others = [a for a in SWEEP_AXES if a != axis]
        sel = [r for r in rows if all(r[a] == getattr(base, a) for a in others)]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        for prov in providers:
            pts = sorted((r[axis], r) for r in sel if r["provider"] == prov)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ax_t.errorbar(xs, [r["median_s"] for _, r in pts],
                          yerr=[[r["median_s"] - r["q20_s"] for _, r in pts],
                                [r["q80_s"] - r["median_s"] for _, r in pts]],
                          marker="o", capsize=3, label=prov)
            ax_m.plot(xs, [r[mem_key] / 1e9 for _, r in pts], marker="o", label=prov)
        for ax, ylabel in ((ax_t, "step time (s)"), (ax_m, mem_label)):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"{title}: sweep over {axis} (others: "
                     + ", ".join(f"{a}={getattr(base, a)}" for a in others) + ")", fontsize=9)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{axis}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if not axes_swept:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(8, 3.5))
        xs = range(len(rows))
        labels = [r["provider"] for r in rows]
        ax_t.bar(xs, [r["median_s"] for r in rows],
                 yerr=[[r["median_s"] - r["q20_s"] for r in rows], [r["q80_s"] - r["median_s"] for r in rows]],
                 capsize=4, color=[f"C{PROVIDERS.index(p)}" for p in labels])
        ax_m.bar(xs, [r[mem_key] / 1e9 for r in rows], color=[f"C{PROVIDERS.index(p)}" for p in labels])
        for ax, ylabel in ((ax_t, "step time (s)"), (ax_m, mem_label)):
            ax.set_xticks(list(xs), labels)
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"{title}: B={base.batch}, T={base.seq}, r={base.rank}", fontsize=9)
        fig.tight_layout()
        path = stem.with_suffix(".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def record(run: dict, out_dir: Path, base: StepSpec, tag: str = "", plots: bool = True) -> list[Path]:
    """Append the run to ``<device>-<date>-e2e[-tag].json`` and rewrite the markdown and plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (f"{run['device']}-{run['date'][:10]}-e2e" + (f"-{tag}" if tag else ""))
    path_json = stem.with_suffix(".json")
    runs = []
    if path_json.is_file():
        try:
            runs = json.loads(path_json.read_text())["runs"]
        except (ValueError, KeyError, TypeError):
            runs = []  # not ours or damaged: start a new list (the old file is replaced)
    runs.append(run)
    tmp = path_json.with_name(".tmp-" + path_json.name)
    tmp.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    os.replace(tmp, path_json)
    md = ["# End-to-end QLoRA training step: leantune vs transformers + PEFT + bitsandbytes", "",
          "Written by `python -m leantune.bench.e2e`; columns in bench/README.md.", ""]
    md += [markdown_table(r) for r in runs]
    path_md = stem.with_suffix(".md")
    path_md.write_text("\n".join(md))
    written = [path_json, path_md]
    if plots:
        written += write_plots(run, stem, base)
    return written
