"""The end-to-end benchmark's worker side: one measurement's settings (``StepSpec``), the
providers (leantune, leantune with CUDA graphs, transformers + PEFT + bitsandbytes), memory
readings, and the worker process's entry point. See ``leantune.bench.e2e``."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass

from leantune.base import UsageError

RESULT_MARK = "@@bench.e2e result@@ "
# leantune-graphs: leantune with the decoder trunk replayed as CUDA graphs (train.cuda_graphs);
# peer-bf16 (CPU): the peer with bnb_4bit_compute_dtype=bfloat16 and the step under
# torch.autocast("cpu", dtype=torch.bfloat16), its adapter weights (and everything else not
# quantized) kept float32, whatever the run's --dtype
# leantune-spec-ops: leantune with LEANTUNE_TRITON_FUSED_OPS=0 (CUDA): the row ops and LoRA
# products as PyTorch's spec, the A/B baseline of quant/triton_rowops.py and quant/triton_lora.py
PROVIDERS = ("leantune", "leantune-graphs", "leantune-spec-ops", "peer", "peer-bf16")
PROVIDER_ENV = {"leantune-spec-ops": {"LEANTUNE_TRITON_FUSED_OPS": "0"}}
PEER_PROVIDERS = ("peer", "peer-bf16")
PEER_PACKAGES = ("transformers", "peft", "bitsandbytes")
SWEEP_AXES = ("seq", "rank", "batch")  # the axes a run may sweep (StepSpec.key())
BLOCKSIZE = 64



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
    from leantune.train.loop import batch_loss_sum, prepare_batch

    model = load_model(spec.model_dir, dtype=resolve_dtype(spec.dtype), device=spec.device, quant="nf4",
                       quant_options={"blocksize": BLOCKSIZE, "double_quant": True})
    inject_adapter(model, AdapterConfig(kind="lora", r=spec.rank, alpha=spec.alpha,
                                        targets=_target_list(spec.targets)))
    model.model.grad_checkpoint = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr)
    ids = _token_batch(spec, model.config.vocab_size).cpu()  # (B, T)
    # the loss's row selection planned on the host, as the training loop does (no host sync)
    batch = prepare_batch({"input_ids": ids, "labels": ids, "doc_ids": torch.zeros_like(ids),
                           "position_ids": torch.arange(spec.seq).expand_as(ids)}, spec.device)
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


def _setup_peer(spec: StepSpec, bf16_autocast: bool = False):
    """transformers + PEFT + bitsandbytes. ``bf16_autocast`` (the ``peer-bf16`` provider, CPU):
    4-bit compute in bfloat16, the step under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
    the model's other weights and the LoRA adapters float32."""
    import contextlib

    import peft
    import torch
    import transformers

    if bf16_autocast and spec.device != "cpu":
        raise UsageError("--providers", "peer-bf16 is a CPU configuration")
    dtype = torch.float32 if bf16_autocast else getattr(torch, spec.dtype)
    compute = torch.bfloat16 if bf16_autocast else dtype
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    device_map = {"": 0} if spec.device == "cuda" else {"": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec.model_dir, quantization_config=qc, dtype=dtype, attn_implementation="sdpa",
        device_map=device_map)
    model.config.use_cache = False
    lcfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                           target_modules=_target_list(spec.targets), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    if bf16_autocast:  # fp32 adapter weights (and fp32 optimizer state)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr)
    ids = _token_batch(spec, model.config.vocab_size)  # (B, T)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext()

    def step():
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # mean over B x (T-1)
        loss.float().backward()
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
    step, n_trainable = (_setup_peer(spec, bf16_autocast=provider == "peer-bf16") if provider in PEER_PROVIDERS
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
