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
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source tree (or the installed package)

from leantune.base import LeantuneError, ModelError, UsageError

RESULT_MARK = "@@bench.e2e result@@ "
# leantune-graphs: leantune with the decoder trunk replayed as CUDA graphs (train.cuda_graphs)
PROVIDERS = ("leantune", "leantune-graphs", "peer")
PEER_PACKAGES = ("transformers", "peft", "bitsandbytes")
SWEEP_AXES = ("seq", "rank", "batch")
BLOCKSIZE = 64

# Llama-architecture shapes for random-weight models (never committed; written on the fly).
# 1b ~ Llama-3.2-1B, 3b ~ Llama-3.2-3B (both tie the head to the embeddings), 8b ~ Llama-3.1-8B.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


# ------------------------------------------------------------------------------------------
# one measurement's settings (what a worker receives as --json-args)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSpec:
    model_dir: str
    batch: int = 4
    seq: int = 256
    rank: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"  # or a comma-separated list of module names
    dtype: str = "float32"  # compute dtype (and the dtype of everything not quantized)
    device: str = "cpu"
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    threads: int = 0  # torch.set_num_threads in the worker; 0: torch's default
    chunk: int = 256  # leantune's chunked cross-entropy: tokens per chunk
    lr: float = 2e-4

    def key(self) -> tuple:
        return (self.batch, self.seq, self.rank)


def _target_list(targets: str):
    return "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]


# ------------------------------------------------------------------------------------------
# memory readings (worker side)
# ------------------------------------------------------------------------------------------
def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def rss_now_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------
# the providers (worker side): imports, then setup -> a step function
# ------------------------------------------------------------------------------------------
def _import_provider(provider: str):
    """Import everything the provider needs before the baseline RSS is read."""
    import torch  # noqa: F401

    if provider.startswith("leantune"):
        import leantune.peft_core.adapters  # noqa: F401
        import leantune.peft_core.checkpoint  # noqa: F401
        import leantune.peft_core.quant_loading  # noqa: F401
        import leantune.train.loop  # noqa: F401
    else:
        import warnings

        warnings.filterwarnings("ignore")
        import logging

        for name in ("bitsandbytes", "transformers", "peft"):
            logging.getLogger(name).setLevel(logging.ERROR)
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401  (what from_pretrained builds)

        transformers.logging.set_verbosity_error()


def _token_batch(spec: StepSpec, vocab: int):
    """The same random batch for both providers: (B, T) token ids from a seeded CPU generator."""
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, vocab, (spec.batch, spec.seq), generator=g).to(spec.device)


def _setup_leantune(spec: StepSpec, graphs: bool = False):
    import torch

    from leantune.peft_core.adapters import AdapterConfig, inject_adapter
    from leantune.peft_core.checkpoint import load_model, resolve_dtype
    from leantune.train.loop import batch_loss_sum

    model = load_model(spec.model_dir, dtype=resolve_dtype(spec.dtype), device=spec.device, quant="nf4",
                       quant_options={"blocksize": BLOCKSIZE, "double_quant": True})
    inject_adapter(model, AdapterConfig(kind="lora", r=spec.rank, alpha=spec.alpha,
                                        targets=_target_list(spec.targets)))
    model.model.grad_checkpoint = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr)
    ids = _token_batch(spec, model.config.vocab_size)  # (B, T)
    batch = {"input_ids": ids, "labels": ids, "doc_ids": torch.zeros_like(ids),
             "position_ids": torch.arange(spec.seq, device=ids.device).expand_as(ids)}
    trunk = None
    if graphs:
        from leantune.train.cuda_graphs import GraphedTrunk

        trunk = GraphedTrunk(model.model, log=lambda msg: print(msg, file=sys.stderr))

    def step():
        loss_sum, n_tok = batch_loss_sum(model, batch, spec.chunk, trunk)  # summed over B x (T-1)
        loss = loss_sum / n_tok
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, sum(p.numel() for p in params)


def _setup_peer(spec: StepSpec):
    import peft
    import torch
    import transformers

    dtype = getattr(torch, spec.dtype)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    device_map = {"": 0} if spec.device == "cuda" else {"": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec.model_dir, quantization_config=qc, dtype=dtype, attn_implementation="sdpa",
        device_map=device_map)
    model.config.use_cache = False
    lcfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                           target_modules=_target_list(spec.targets), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr)
    ids = _token_batch(spec, model.config.vocab_size)  # (B, T)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # mean over B x (T-1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, sum(p.numel() for p in params)


def run_steps(step, steps: int, warmup: int, sync) -> tuple[list[float], list[float]]:
    """(timed step seconds, every step's loss): ``warmup`` untimed steps, then ``steps`` timed."""
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
    return times, losses


def worker(provider: str, spec: StepSpec) -> dict:
    """One provider, one configuration, in this (fresh) process."""
    _import_provider(provider)
    import torch

    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    cuda = spec.device == "cuda"
    # after imports, before the model: the current RSS (ru_maxrss would report the parent's
    # RSS at fork, which Linux carries into the child's high-water mark across exec)
    rss_baseline = rss_now_bytes() or maxrss_bytes()
    t0 = time.perf_counter()
    if provider == "leantune-graphs" and not cuda:
        raise UsageError("--providers", "leantune-graphs needs a CUDA device")
    step, n_trainable = (_setup_peer(spec) if provider == "peer"
                         else _setup_leantune(spec, graphs=provider == "leantune-graphs"))
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    rss_after_load = rss_now_bytes()
    peak_load = maxrss_bytes()
    hwm_ok = _reset_vm_hwm()  # VmHWM from here on: the training steps alone
    gpu_load_peak = None
    if cuda:
        gpu_load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = run_steps(step, spec.steps, spec.warmup, sync)
    # ru_maxrss after a VmHWM reset may forget the load phase: keep the max of both readings
    rss_peak = max(peak_load, maxrss_bytes())
    out = {
        "provider": provider, "times_s": times, "losses": losses, "load_s": load_s,
        "n_trainable": n_trainable, "threads": torch.get_num_threads(),
        "rss_baseline_bytes": rss_baseline, "rss_after_load_bytes": rss_after_load,
        "rss_peak_bytes": rss_peak, "rss_peak_steps_bytes": _vm_hwm_bytes() if hwm_ok else None,
    }
    if cuda:
        steps_peak = torch.cuda.max_memory_allocated()
        out.update(gpu_peak_bytes=max(gpu_load_peak, steps_peak), gpu_peak_steps_bytes=steps_peak,
                   gpu_name=torch.cuda.get_device_name(0))
    return out


def _worker_entry(provider: str, raw: str) -> int:
    try:
        spec = StepSpec(**json.loads(raw))
        res = worker(provider, spec)
        code = 0
    except Exception as e:  # reported to the parent as an error row, with the traceback tail
        res = {"provider": provider, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-3000:]}
        code = 1
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(res), flush=True)
    return code


# ------------------------------------------------------------------------------------------
# the parent: model folder, workers, summaries
# ------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    from leantune.peft_core.embedded import cache_dir

    return cache_dir()


def write_random_model(out_dir, shape: str, seed: int = 0, dtype=None) -> Path:
    """A Llama-architecture folder of random weights (config.json + safetensors, sharded by
    layers above ~2 GB) in the given shape; weights N(0, 1/in_features), norms 1.

    Written atomically (a temp folder renamed into place) and reused when already there.
    Generated on the GPU when there is one (an 8B model is 16 GB of bf16)."""
    import torch

    from leantune.peft_core.safetensors_io import write_safetensors

    if shape not in SHAPES:
        raise UsageError("--random-shape", f"unknown shape {shape!r} (choose {', '.join(SHAPES)})")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    s = SHAPES[shape]
    dtype = dtype or (torch.float32 if shape == "tiny" else torch.bfloat16)
    C, I, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    nh, nkv, V = s["num_attention_heads"], s["num_key_value_heads"], s["vocab_size"]
    hd = C // nh
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s, "head_dim": hd,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
              "max_position_embeddings": 131072, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_device).manual_seed(seed)

    def rand(rows, cols):  # (out, in) ~ N(0, 1 / in)
        w = torch.randn(rows, cols, generator=g, device=gen_device, dtype=torch.float32)
        return (w * cols ** -0.5).to(dtype).cpu()

    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    limit = 2 << 30

    def flush():
        nonlocal current, size
        if current:
            shards.append(current)
            write_safetensors(current, tmp / f"shard-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0

    def add(name, t):
        nonlocal size
        current[name] = t
        size += t.numel() * t.element_size()

    add("model.embed_tokens.weight", (torch.randn(V, C, generator=g, device=gen_device) * 0.02).to(dtype).cpu())
    for i in range(L):
        p = f"model.layers.{i}."
        for name, (o, k) in {"self_attn.q_proj": (nh * hd, C), "self_attn.k_proj": (nkv * hd, C),
                             "self_attn.v_proj": (nkv * hd, C), "self_attn.o_proj": (C, nh * hd),
                             "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C), "mlp.down_proj": (C, I)}.items():
            add(p + name + ".weight", rand(o, k))
        add(p + "input_layernorm.weight", torch.ones(C, dtype=dtype))
        add(p + "post_attention_layernorm.weight", torch.ones(C, dtype=dtype))
        if size > limit:
            flush()
    add("model.norm.weight", torch.ones(C, dtype=dtype))
    if not s["tie_word_embeddings"]:
        add("lm_head.weight", rand(V, C))
    flush()
    names = []
    for j, shard in enumerate(shards, 1):
        final = ("model.safetensors" if len(shards) == 1
                 else f"model-{j:05d}-of-{len(shards):05d}.safetensors")
        os.replace(tmp / f"shard-{j}.safetensors", tmp / final)
        names.append((final, list(shard)))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": {k: f for f, keys in names for k in keys}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a concurrent writer won
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def resolve_model(opts) -> tuple[Path, str]:
    """(model folder, a short name for the tables)."""
    if opts.model and opts.random_shape:
        raise UsageError("--model/--random-shape", "give one of them, not both")
    if opts.model:
        d = Path(opts.model)
        if not (d / "config.json").is_file():
            raise ModelError(str(d), "no config.json: not a model folder")
        return d, d.name
    if opts.random_shape:
        shape = opts.random_shape
        return write_random_model(_cache_dir() / "bench-models" / f"llama-{shape}-random-seed0", shape), \
            f"llama-{shape}-random"
    from leantune.peft_core.embedded import DEFAULT_MODEL_NAME, default_model_dir

    return default_model_dir(), DEFAULT_MODEL_NAME


def run_worker(provider: str, spec: StepSpec, timeout: float) -> dict:
    """One measurement in a fresh ``python -m leantune.bench.e2e --worker`` process."""
    cmd = [sys.executable, "-m", "leantune.bench.e2e", "--worker", provider, "--json-args", json.dumps(asdict(spec))]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        peer = by_key.get((row["batch"], row["seq"], row["rank"], "peer"))
        if (not row["provider"].startswith("leantune") or peer is None or "median_s" not in row
                or "median_s" not in peer):
            continue
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
    dtype = opts.dtype if opts.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    notes = []
    missing = peer_missing()
    if "peer" in providers and missing:
        providers.remove("peer")
        notes.append(f"peer skipped: {', '.join(missing)} not installed")
    if device != "cuda" and "leantune-graphs" in providers:
        providers.remove("leantune-graphs")
        notes.append("leantune-graphs skipped: CUDA graphs need a CUDA device")
    if not providers:
        raise UsageError("--providers", "nothing to measure (the peer's packages are not installed)")
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
                   help="compute dtype (auto: float32 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (fresh processes)")
    p.add_argument("--sweep", action="append", metavar="AXIS=V1,V2",
                   help=f"vary one of {', '.join(SWEEP_AXES)} with the others at the base (repeatable)")
    p.add_argument("--providers", default="leantune,peer",
                   help="comma-separated: leantune, leantune-graphs (CUDA), peer")
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
