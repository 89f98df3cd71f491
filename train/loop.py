"""The training loop: one flat function you can read top to bottom.

    set up (output folder, manifest, model, adapter, data, optimizer, resume)
    for each optimizer step:
        for each micro-batch of the accumulation:
            loss_sum = chunked CE over supervised tokens          # (B, T) -> scalar
            (loss_sum / supervised tokens of the WHOLE accumulated batch).backward()
        clip, NaN guard, lr from the schedule, optimizer step, zero_grad(set_to_none=True)
        log (metrics.jsonl, progress line), eval loss, checkpoint

The data position is derived from the step: step s consumes micro-batches
[s * grad_accum, (s + 1) * grad_accum) of an endless sequence of epochs, each shuffled by
(seed, epoch). A checkpoint therefore needs only the step, the trainable tensors, the
optimizer state and the RNG state to resume bit-exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_core.checkpoint import load_model, write_json
from peft_core.errors import LeantuneError, UsageError
from peft_core.model import make_attn_mask
from peft_core.safetensors_io import read_safetensors, write_safetensors

from .chunked_ce import causal_lm_targets, chunked_cross_entropy
from .config import Config
from .schedule import lr_factor

VERSION = "0.1.0"


class TrainingAborted(LeantuneError):
    exit_code = 1


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    skipped_steps: int
    interrupted: bool = False


# -- set-up helpers ------------------------------------------------------------------------
def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(cfg: Config, device) -> torch.dtype:
    name = cfg.model.compute_dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model_dir(cfg: Config) -> Path:
    if cfg.model.path:
        return Path(cfg.model.path)
    from peft_core.embedded import default_model_dir

    return default_model_dir()


def file_sha256(path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and the weight files (what the adapter was trained on)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name == "config.json" or name.endswith(".safetensors"):
            h.update(name.encode())
            h.update(file_sha256(model_dir / name).encode())
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    v = {"leantune": VERSION, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


# -- model + adapter -----------------------------------------------------------------------
def build_model(cfg: Config, model_dir: Path, device, dtype):
    """The base (4-bit when configured) with the adapter injected; the trainable params."""
    quant = None if cfg.model.quant == "none" else cfg.model.quant
    if cfg.adapter.kind == "none" and quant:
        raise UsageError("adapter.kind", "full fine-tuning (kind = \"none\") needs model.quant = \"none\"")
    model = load_model(model_dir, dtype=dtype, device=device, quant=quant,
                       quant_options={"blocksize": cfg.model.blocksize,
                                      "double_quant": cfg.model.double_quant})
    if cfg.adapter.kind == "none":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft_core.adapters import AdapterConfig, inject_adapter

        for p in model.parameters():
            p.requires_grad_(False)
        acfg = AdapterConfig(kind=cfg.adapter.kind, r=cfg.adapter.r, alpha=cfg.adapter.alpha,
                             dropout=cfg.adapter.dropout, targets=cfg.adapter.targets,
                             init=cfg.adapter.init, rslora=cfg.adapter.rslora,
                             rank_pattern=dict(cfg.adapter.rank_pattern),
                             alpha_pattern=dict(cfg.adapter.alpha_pattern))
        inject_adapter(model, acfg)
    model.model.grad_checkpoint = cfg.train.grad_checkpoint
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UsageError("adapter.targets", "no module matched: nothing to train")
    return model, params


def batch_loss_sum(model, batch, chunk: int):
    """Summed next-token loss over supervised tokens of one micro-batch, and their count."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    doc_ids, position_ids = batch["doc_ids"], batch["position_ids"]
    B, T = input_ids.shape
    multi_doc = bool((doc_ids[:, 1:] != doc_ids[:, :-1]).any())
    mask = make_attn_mask(T, doc_ids=doc_ids, device=input_ids.device) if multi_doc else None
    hidden = model.model(input_ids, position_ids, mask)  # (B, T, C)
    targets = causal_lm_targets(labels, doc_ids)  # (B, T-1)
    keep = targets != -100
    h = hidden[:, :-1][keep]  # (N, C) supervised positions only
    return chunked_cross_entropy(h, model.lm_head.weight, targets[keep], chunk), int(keep.sum())


@torch.no_grad()
def eval_loss(model, plan, chunk: int, device) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(len(plan)):
        batch = {k: v.to(device) for k, v in plan.batch(0, i).items()}
        loss, n = batch_loss_sum(model, batch, chunk)
        total += float(loss)
        count += n
    model.train(was)
    return total / max(count, 1)


# -- checkpoints ---------------------------------------------------------------------------
def optimizer_tensors(opt, names: dict) -> dict:
    """AdamW state as named tensors (no pickle): ``{param}.{exp_avg|exp_avg_sq|step}``."""
    out = {}
    for p, st in opt.state.items():
        name = names[p]
        for k, v in st.items():
            out[f"{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt, params: dict, tensors: dict):
    states: dict = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        if name not in params:
            raise UsageError(key, "optimizer state for a parameter this run does not train")
        states.setdefault(name, {})[field] = value.to(params[name].device)
    for name, st in states.items():
        opt.state[params[name]] = st


def save_checkpoint(run_dir: Path, step: int, model, params: dict, opt, extra: dict, cfg: Config):
    """checkpoints/step-N/ written to a temp folder, fsynced, then renamed into place."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    final = ckpts / f"step-{step}"
    tmp = ckpts / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_safetensors({n: p.detach() for n, p in params.items()}, tmp / "trainable.safetensors")
    names = {p: n for n, p in params.items()}
    write_safetensors(optimizer_tensors(opt, names), tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    write_safetensors(rng, tmp / "rng.safetensors")
    if cfg.adapter.kind != "none":
        from peft_core.adapters import save_adapter

        save_adapter(model, tmp / "adapter", base_model_name_or_path=extra.get("base_model", ""))
    write_json(tmp / "state.json", {"step": step, **extra})  # written last: marks complete
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(ckpts, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def newest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return None
    found = []
    for d in ckpts.iterdir():
        if d.name.startswith("step-") and (d / "state.json").is_file():
            try:
                found.append((int(d.name[5:]), d))
            except ValueError:
                continue
    return max(found)[1] if found else None


# -- the loop ------------------------------------------------------------------------------
class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops after the step."""

    def __init__(self):
        self.stop = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        self.stop = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _progress(step, total, loss, tps, t0, start_step):
    done = step - start_step
    eta = (time.time() - t0) / max(done, 1) * (total - step)
    sys.stderr.write(f"\rstep {step}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s  "
                     f"ETA {int(eta // 60)}m{int(eta % 60):02d}s ")
    sys.stderr.flush()


def train(cfg: Config, resume: bool = False, log=print, tokenizer=None, on_step=None) -> TrainResult:
    """Run (or resume) a fine-tune; ``on_step(step)`` is called after each optimizer step."""
    from peft_core.tokenizer import Tokenizer
    from train.data import BatchPlan, build_examples, pack_examples

    device = pick_device()
    dtype = compute_dtype_for(cfg, device)
    run_dir = Path(cfg.train.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train:
        raise UsageError("data.train", "no training file given")
    model_dir = resolve_model_dir(cfg)
    tok = tokenizer or Tokenizer.from_dir(model_dir)

    # data: examples -> rows (packed or not) -> a deterministic batch plan
    torch.manual_seed(cfg.train.seed)
    cache = run_dir / "cache"
    examples, summary = build_examples(cfg.data.train, tok, cfg.data.format, cfg.data.max_len,
                                       cfg.data.mask_prompt, cfg.data.mask_mode, cache_dir=cache)
    for line in summary.lines():
        log(f"data: {line}")
    rows = pack_examples(examples, cfg.data.max_len, cfg.train.seed) if cfg.data.pack else examples
    plan = BatchPlan(rows, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id,
                     group_by_length=not cfg.data.pack)
    eval_plan = None
    if cfg.data.eval:
        ev, _ = build_examples(cfg.data.eval, tok, cfg.data.format, cfg.data.max_len,
                               cfg.data.mask_prompt, cfg.data.mask_mode, cache_dir=cache)
        eval_plan = BatchPlan(ev, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id, shuffle=False)

    ga = cfg.train.grad_accum
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(plan) / ga)

    # model, adapter, optimizer
    model, params = build_model(cfg, model_dir, device, dtype)
    model.train()
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "adamw8bit":
        from train.adamw8bit import AdamW8bit

        opt = AdamW8bit(groups, lr=cfg.train.lr)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=False)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    base_hash = model_fingerprint(model_dir)
    manifest = {
        "config": cfg.to_dict(), "seed": cfg.train.seed, "base_model": str(model_dir),
        "base_model_sha256": base_hash,
        "datasets": {k: {"path": p, "sha256": file_sha256(p)} for k, p in
                     (("train", cfg.data.train), ("eval", cfg.data.eval)) if p},
        "versions": versions(), "git_commit": git_commit(), "device": str(device),
        "total_steps": total, "data_summary": summary.__dict__ if hasattr(summary, "__dict__") else {},
    }

    start, skipped, nan_streak = 0, 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = newest_checkpoint(run_dir)
        if ckpt is None:
            log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting fresh")
        else:
            state = json.loads((ckpt / "state.json").read_text())
            if state.get("base_model_sha256") not in (None, base_hash):
                raise UsageError(str(ckpt), "checkpoint was trained on a different base model")
            saved = read_safetensors(ckpt / "trainable.safetensors")
            missing = [n for n in params if n not in saved]
            if missing:
                raise UsageError(str(ckpt), f"checkpoint lacks trainable tensor {missing[0]!r} "
                                            "(was the adapter config changed?)")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
            load_optimizer_tensors(opt, params, read_safetensors(ckpt / "optimizer.safetensors"))
            rng = read_safetensors(ckpt / "rng.safetensors")
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["torch_cuda"])
            start, skipped = state["step"], state.get("skipped_steps", 0)
            log(f"resume: continuing from {ckpt.name}")
            # keep the metrics of the steps the checkpoint covers, drop the rest
            if metrics_path.exists():
                kept = [ln for ln in metrics_path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= start]
                metrics_path.write_text("".join(ln + "\n" for ln in kept))
    elif metrics_path.exists():
        metrics_path.unlink()
    write_json(run_dir / "manifest.json", manifest)

    def ckpt_extra():
        return {"skipped_steps": skipped, "base_model_sha256": base_hash,
                "base_model": str(model_dir), "micro_batches": step * ga}

    tty = sys.stderr.isatty()
    t0 = time.time()
    last_loss = float("nan")
    interrupted = False
    step = start
    with _Signals() as sigs, open(metrics_path, "a", encoding="utf-8") as mlog:
        while step < total:
            t_step = time.time()
            lr = cfg.train.lr * lr_factor(step, total, cfg.train.warmup_steps, cfg.train.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [plan.batch(*divmod(step * ga + j, len(plan))) for j in range(ga)]
            n_tok = sum(int((causal_lm_targets(b["labels"], b["doc_ids"]) != -100).sum()) for b in micro)
            loss_total = torch.zeros((), device=device)
            for b in micro:
                b = {k: v.to(device) for k, v in b.items()}
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss_sum, _ = batch_loss_sum(model, b, cfg.train.loss_chunk)
                loss = loss_sum / max(n_tok, 1)  # normalised by the whole accumulated batch
                (scaler.scale(loss) if scaler else loss).backward()
                loss_total += loss.detach()
            if scaler:
                scaler.unscale_(opt)
            clip = cfg.train.clip if cfg.train.clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
            finite = bool(torch.isfinite(loss_total)) and bool(torch.isfinite(grad_norm))
            if finite:
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                nan_streak = 0
            else:
                skipped += 1
                nan_streak += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            if nan_streak >= cfg.train.max_nan_steps:
                save_checkpoint(run_dir, step, model, params, opt, ckpt_extra(), cfg)
                raise TrainingAborted("train", f"loss or gradients non-finite for {nan_streak} "
                                               f"steps in a row at step {step}; checkpoint saved")
            dt = time.time() - t_step
            if step % cfg.train.log_every == 0 or step == total:
                last_loss = float(loss_total)
                rec = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": sum(int(b["attention_mask"].sum()) for b in micro) / dt,
                       "supervised_tokens": n_tok, "skipped_steps": skipped,
                       "epoch": step * ga / len(plan),
                       "peak_mem_mb": peak_memory_mb(device)}
                if cfg.train.eval_every and eval_plan is not None and step % cfg.train.eval_every == 0:
                    rec["eval_loss"] = eval_loss(model, eval_plan, cfg.train.loss_chunk, device)
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                if tty:
                    _progress(step, total, last_loss, rec["tokens_per_s"], t0, start)
            if on_step is not None:
                on_step(step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
                save_checkpoint(run_dir, step, model, params, opt, ckpt_extra(), cfg)
            if sigs.stop:
                save_checkpoint(run_dir, step, model, params, opt, ckpt_extra(), cfg)
                log(f"\n{sigs.stop}: checkpoint saved at step {step}; continue with --resume")
                interrupted = True
                break
    if tty:
        sys.stderr.write("\n")
    if not interrupted:
        if cfg.adapter.kind != "none":
            from peft_core.adapters import save_adapter

            save_adapter(model, run_dir / "adapter", base_model_name_or_path=str(model_dir))
        else:
            from peft_core.checkpoint import save_model

            save_model(model, run_dir / "model", copy_tokenizer_from=model_dir)
        save_checkpoint(run_dir, step, model, params, opt, ckpt_extra(), cfg)
        manifest.update(final_step=step, skipped_steps=skipped, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(run_dir / "manifest.json", manifest)
    return TrainResult(run_dir, step, last_loss, skipped, interrupted)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:
        return float("nan")
