"""The training loop: ``train()`` reads top to bottom as its steps.

    set up (output folder, data, model + adapter, optimizer, manifest, resume)
    for each optimizer step:
        for each micro-batch of the accumulation:
            loss_sum = chunked CE over supervised tokens          # (B, T) -> scalar
            (loss_sum / supervised tokens of the WHOLE accumulated batch).backward()
        clip, NaN guard, lr from the schedule, optimizer step, zero_grad(set_to_none=True)
        log (metrics.jsonl, progress line), eval loss, checkpoint
    export the adapter (or the model)

The data position is derived from the step: step s consumes micro-batches
[s * grad_accum, (s + 1) * grad_accum) of an endless sequence of epochs, each shuffled by
(seed, epoch). A checkpoint therefore needs only the step, the trainable tensors, the
optimizer state and the RNG state to resume bit-exactly (``train.checkpointing``).

Launched by torchrun, every process builds the same plan and runs its part of each step's
micro-batches; gradients and loss are summed over the processes once per optimizer step, so
the config describes the global batch and the result is that of one process (see
``train.distributed.Ranks``). Rank 0 alone writes files and prints. With ``[train] fsdp =
true`` the base and the adapters are sharded over the processes instead of replicated
(module ``train.fsdp``). Where a run came from is in ``train.provenance``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leantune.base import UsageError
from leantune.peft_core.build import compute_dtype_for, load_base, pick_device, resolve_model_dir
from leantune.quant import hostpool
from leantune.peft_core.checkpoint import write_json
from leantune.peft_core.model import make_attn_mask
from leantune.quant.chunked_ce import causal_lm_targets, chunked_cross_entropy
from leantune.train import fsdp
from leantune.train.checkpointing import (  # noqa: F401  (re-exported: the loop's old names)
    CHECKPOINT_FILES, TrainingAborted, _complete_checkpoints, _fsync_dir, _metrics_step,
    check_same_run, checkpoint_problem, clear_run, load_optimizer_tensors, newest_checkpoint,
    optimizer_tensors, prune_checkpoints, remove_stale_temps, restore_checkpoint,
    resume_checkpoint, save_checkpoint, trim_metrics)
from leantune.train.config import Config, adapter_config
from leantune.train.distributed import (  # noqa: F401  (re-exported)
    Ranks, checkpoint_rng, launch_ranks, process_group, rng_state)
from leantune.train.provenance import (  # noqa: F401  (re-exported)
    build_manifest, finish_manifest, git_commit, model_fingerprint, run_identity, versions)
from leantune.train.reporting import MetricsSink
from leantune.train.schedule import lr_factor


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    skipped_steps: int
    interrupted: bool = False


# -- model + adapter -----------------------------------------------------------------------
def build_model(cfg: Config, model_dir: Path, device, dtype):
    """The base (4-bit when configured) with the adapter injected; the trainable params.

    The base computes in ``dtype``; the adapter's weights are float32 whatever it is
    (``LoraLinear``'s ``param_dtype``), so its optimizer state is float32 too."""
    if cfg.adapter.kind == "none" and cfg.model.quant != "none":
        raise UsageError("adapter.kind", "full fine-tuning (kind = \"none\") needs model.quant = \"none\"")
    model = load_base(model_dir, quant=cfg.model.quant, blocksize=cfg.model.blocksize,
                      double_quant=cfg.model.double_quant, dtype=dtype, device=device)
    acfg = adapter_config(cfg.adapter)
    if acfg is None:
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.train.objective in ("dpo", "grpo") and cfg.train.reference_adapter:
        from leantune.train.dpo import load_reference_adapter

        load_reference_adapter(model, cfg.train.reference_adapter)  # the trained adapter: a copy
    else:
        from leantune.peft_core.adapters import inject_adapter

        inject_adapter(model, acfg)
    model.model.grad_checkpoint = cfg.train.grad_checkpoint
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UsageError("adapter.targets", "no module matched: nothing to train")
    return model, params


@dataclass(frozen=True)
class LossPlan:
    """What the next-token loss needs from a micro-batch's labels, worked out where the labels
    are: ``multi_doc`` (packed documents: the trunk needs a mask), ``rows`` (flat B*T indices
    of the positions that predict a supervised token, in order), ``targets`` (those tokens)
    and ``n_tok`` (their count)."""
    multi_doc: bool
    rows: torch.Tensor
    targets: torch.Tensor
    n_tok: int


def loss_plan(batch) -> LossPlan:
    """The batch's ``LossPlan``, computed on the batch's device (on a GPU: three host syncs)."""
    labels, doc_ids = batch["labels"], batch["doc_ids"]
    T = labels.shape[1]
    targets = causal_lm_targets(labels, doc_ids)  # (B, T-1)
    keep = targets != -100
    b, t = keep.nonzero(as_tuple=True)
    return LossPlan(bool((doc_ids[:, 1:] != doc_ids[:, :-1]).any()), b * T + t, targets[keep], len(b))


def prepare_batch(batch, device) -> dict:
    """A host micro-batch moved to ``device``, with its ``LossPlan`` made on the host first
    (key ``"loss_plan"``): ``batch_loss_sum`` then waits on the device for nothing."""
    plan = loss_plan(batch)
    out = {k: v.to(device) for k, v in batch.items()}
    out["loss_plan"] = LossPlan(plan.multi_doc, plan.rows.to(device), plan.targets.to(device), plan.n_tok)
    return out


def batch_loss_sum(model, batch, chunk: int, trunk=None):
    """Summed next-token loss over supervised tokens of one micro-batch, and their count.

    ``trunk``: what runs ``model.model`` (a ``train.cuda_graphs.GraphedTrunk``); default eager.
    The batch's ``"loss_plan"`` (``prepare_batch``) is used when there, else made here."""
    input_ids, doc_ids, position_ids = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    plan = batch.get("loss_plan") or loss_plan(batch)
    B, T = input_ids.shape
    mask = make_attn_mask(T, doc_ids=doc_ids, device=input_ids.device) if plan.multi_doc else None
    hidden = (trunk or model.model)(input_ids, position_ids, mask)  # (B, T, C)
    h = hidden.reshape(B * T, -1).index_select(0, plan.rows)  # (N, C) supervised positions only
    return chunked_cross_entropy(h, model.lm_head.weight, plan.targets, chunk), plan.n_tok


@torch.no_grad()
def eval_loss(model, plan, chunk: int, device, ranks: Ranks = Ranks()) -> float:
    """Mean loss per supervised token over the plan's batches (shared out among ranks; under
    FSDP a rank short of a batch runs batch 0 again, uncounted, to stay in step)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    mine = range(ranks.rank, len(plan), ranks.world)
    rounds = -(-len(plan) // ranks.world) if ranks.fsdp else len(mine)
    for j in range(rounds):
        batch = prepare_batch(plan.batch(0, mine[j] if j < len(mine) else 0), device)
        loss, n = batch_loss_sum(model, batch, chunk)
        if j < len(mine):
            total += float(loss)
            count += n
    model.train(was)
    if ranks.world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=ranks.device)
        ranks.sum_([t])
        total, count = t.tolist()
    return total / max(count, 1)


# -- set-up steps --------------------------------------------------------------------------
@dataclass
class _Data:
    plan: object  # train.data.BatchPlan
    eval_plan: object | None
    summary: object
    total: int  # optimizer steps of the run


def run_dtype(cfg: Config, device) -> torch.dtype:
    """The compute dtype; a full fine-tune on the CPU keeps "auto" at float32 (its trained
    weights are the model's own, which bf16 would round at every step)."""
    if cfg.adapter.kind == "none" and cfg.model.compute_dtype == "auto" and device.type != "cuda":
        return torch.float32
    return compute_dtype_for(cfg.model.compute_dtype, device)


def build_data(cfg: Config, tok, run_dir: Path, log) -> _Data:
    """examples -> rows (packed or not) -> a deterministic batch plan (and the eval plan)."""
    from leantune.train.data import BatchPlan, build_examples, pack_examples

    torch.manual_seed(cfg.train.seed)
    if cfg.train.objective == "dpo":  # preference pairs, one shared-prompt row each
        from leantune.train.preference import build_pair_data

        return _Data(*build_pair_data(cfg, tok, log))
    if cfg.train.objective == "grpo":  # prompts, each with its reference for the reward
        from leantune.train.grpo import build_prompt_data

        return _Data(*build_prompt_data(cfg, tok, log))
    cache = run_dir / "cache"
    examples, summary = build_examples(cfg.data.train, tok, cfg.data.format, cfg.data.max_len,
                                       cfg.data.mask_prompt, cfg.data.mask_mode, cache_dir=cache)
    for line in summary.lines():
        log(f"data: {line}")
    rows = pack_examples(examples, cfg.data.max_len, cfg.train.seed) if cfg.data.pack else examples
    plan = BatchPlan(rows, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id,
                     group_by_length=not cfg.data.pack, pad_multiple=cfg.data.pad_to_multiple_of)
    eval_plan = None
    if cfg.data.eval:
        ev, _ = build_examples(cfg.data.eval, tok, cfg.data.format, cfg.data.max_len,
                               cfg.data.mask_prompt, cfg.data.mask_mode, cache_dir=cache)
        eval_plan = BatchPlan(ev, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id, shuffle=False,
                              pad_multiple=cfg.data.pad_to_multiple_of)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(plan) / cfg.train.grad_accum)
    return _Data(plan, eval_plan, summary, total)


def shard(model, params: dict, ranks: Ranks, log):
    """Under FSDP: equal replicas, then each rank keeps its shard; (params, bytes held)."""
    if not ranks.fsdp:
        return params, None
    ranks.broadcast_([p.data for p in params.values()])
    params = fsdp.shard_model(model, ranks)
    held = ranks.gather(fsdp.packed_bytes(model))  # (bytes held, whole bytes) of each rank
    log(f"fsdp: sharded over {ranks.world} processes" + (
        f"; of the {held[0][1] / 2**20:.2f} MiB of packed 4-bit weights they hold "
        f"{', '.join(f'{h / 2**20:.2f}' for h, _ in held)}" if held[0][1] else ""))
    return params, held


def build_optimizer(cfg: Config, params: dict, device, dtype):
    """AdamW (or the 8-bit one) with decay on matrices only; a GradScaler for float16."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "adamw8bit":
        from leantune.quant.adamw8bit import AdamW8bit

        opt = AdamW8bit(groups, lr=cfg.train.lr)
    else:
        # on a GPU the multi-tensor (foreach) update: a few launches for all the adapters
        # instead of about ten a tensor; on the CPU the per-tensor loop (what runs there today)
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return opt, scaler


def build_trunk(cfg: Config, model, device, log):
    """The CUDA-graphed decoder trunk when ``train.cuda_graphs`` is set on a GPU; else None."""
    if not cfg.train.cuda_graphs:
        return None
    if device.type != "cuda":
        log(f"cuda graphs: train.cuda_graphs is set but the device is {device.type}; running eagerly")
        return None
    from leantune.train.cuda_graphs import GraphedTrunk

    return GraphedTrunk(model.model, log)


# -- the run's state -----------------------------------------------------------------------
@dataclass
class _Run:
    """What the step loop, the checkpoints and the export share; ``step`` is the number of
    optimizer steps done."""

    cfg: Config
    ranks: Ranks
    run_dir: Path
    model_dir: Path
    model: object
    params: dict
    opt: object
    scaler: object
    trunk: object
    dtype: torch.dtype
    identity: dict  # provenance.run_identity: what state.json records to recognise the run
    step: int = 0
    start: int = 0
    skipped: int = 0
    nan_streak: int = 0
    last_loss: float = float("nan")
    interrupted: bool = False
    manifest: dict = field(default_factory=dict)
    objective: object = None  # train.dpo.DPOObjective ("dpo"), train.grpo.GRPOObjective ("grpo"); None: SFT

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def full_state(self):
        """(params, opt) as checkpoints hold them: full tensors (under FSDP every rank gathers
        them, and the model's modules hold them while inside)."""
        return fsdp.full_state(self.model, self.params, self.opt) if self.ranks.fsdp \
            else nullcontext((self.params, self.opt))

    def checkpoint(self, gathered=None) -> Path | None:
        """checkpoints/step-N, written by rank 0 with every rank's RNG state; the others wait.
        ``gathered``: what ``full_state()`` yielded, when the caller holds it already."""
        rng = checkpoint_rng(self.ranks)
        extra = {"skipped_steps": self.skipped, "base_model": str(self.model_dir),
                 "micro_batches": self.step * self.cfg.train.grad_accum, **self.identity}
        path = None
        with nullcontext(gathered) if gathered else self.full_state() as (full, full_opt):
            if self.ranks.main:
                path = save_checkpoint(self.run_dir, self.step, self.model, full, full_opt, extra,
                                       self.cfg, rng)
                prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        self.ranks.barrier()
        return path


def restore(run: _Run, resume, log):
    """Continue from a checkpoint (``resume``: True for the newest that checks out, or a
    checkpoint folder), refusing one of another run; or start fresh. metrics.jsonl keeps
    the rows of the steps the checkpoint covers."""
    ranks = run.ranks
    ckpt = None
    if resume:
        ckpt = pick_checkpoint(run.run_dir, resume, log)
        if ckpt is None:
            log(f"resume: no complete checkpoint in {run.run_dir / 'checkpoints'}; starting fresh")
    if ckpt is None:
        if ranks.main:
            run.metrics_path.unlink(missing_ok=True)  # rows of the lost steps would repeat
    else:
        check_same_run(ckpt, json.loads((ckpt / "state.json").read_text()), run.identity)
        state = restore_checkpoint(ckpt, run.params, run.opt, ranks)
        run.start = run.step = state["step"]
        run.skipped = state.get("skipped_steps", 0)
        log(f"resume: continuing from {ckpt.name}")
        if ranks.main:
            trim_metrics(run.metrics_path, run.start)
            drop_newer_checkpoints(run.run_dir, run.start)
    if not ranks.fsdp:
        ranks.broadcast_([p.data for p in run.params.values()])  # equal replicas, as DDP makes them
    if ranks.main:
        remove_stale_temps(run.run_dir)
        write_json(run.run_dir / "manifest.json", run.manifest)


def pick_checkpoint(run_dir: Path, resume, log) -> Path | None:
    """``--resume``: the newest good checkpoint of ``run_dir``; ``--resume PATH``: that one."""
    if resume is True:
        return resume_checkpoint(run_dir, log)
    ckpt = Path(resume)
    from leantune.base import ModelError

    if not (ckpt / "state.json").is_file():
        raise ModelError(str(ckpt), "not a complete checkpoint folder (no state.json)")
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise ModelError(str(ckpt), f"cannot resume from it: {problem}")
    return ckpt


def drop_newer_checkpoints(run_dir: Path, step: int):
    """After resuming from an older checkpoint: the newer ones are of a discarded future."""
    import shutil

    for d in _complete_checkpoints(run_dir):
        if int(d.name[5:]) > step:
            shutil.rmtree(d, ignore_errors=True)


# -- one optimizer step --------------------------------------------------------------------
@dataclass
class _StepOut:
    loss: torch.Tensor  # the step's mean loss per supervised token (summed over ranks)
    grad_norm: torch.Tensor
    lr: float
    micro: list
    n_tok: int  # supervised tokens of the whole accumulated batch


def optimizer_step(run: _Run, data: _Data) -> _StepOut:
    """Forward/backward over the step's micro-batches, gradients summed over the ranks,
    clip, NaN guard, optimizer step, zero_grad; advances ``run.step``."""
    cfg, ranks, device, ga = run.cfg, run.ranks, run.ranks.device, run.cfg.train.grad_accum
    lr = cfg.train.lr * lr_factor(run.step, data.total, cfg.train.warmup_steps, cfg.train.schedule)
    for g in run.opt.param_groups:
        g["lr"] = lr
    micro = [data.plan.batch(*divmod(run.step * ga + j, len(data.plan))) for j in range(ga)]
    obj = run.objective  # its own normaliser (pairs) and loss; None: next-token loss per token
    n_tok = obj.count(micro) if obj else sum(int((causal_lm_targets(b["labels"], b["doc_ids"]) != -100).sum())
                                             for b in micro)
    loss_total = torch.zeros((), device=device)
    mine = ranks.part(micro)
    for j, b in enumerate(mine):
        if ranks.fsdp:  # reduce-scatter after the step's last backward only
            fsdp.set_grad_sync(run.model, j == len(mine) - 1)
        b = {k: v.to(device) for k, v in b.items()} if obj else prepare_batch(b, device)
        # no autocast: the base is in the compute dtype already and each adapter casts its
        # input to its own (float32) weights' dtype, as PEFT; autocast would run the adapter
        # products in bf16 (and breaks the fused 4-bit Function's fp32 LoRA path)
        if obj:
            loss_sum = obj.loss_sum(run.model, b, cfg.train.loss_chunk, run.trunk)
        else:
            loss_sum, _ = batch_loss_sum(run.model, b, cfg.train.loss_chunk, run.trunk)
        loss = loss_sum.float() / max(n_tok, 1)  # normalised by the whole accumulated batch
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        loss_total += loss.detach()
    if ranks.world > 1:  # the gradient and loss of the whole global batch, on every rank
        for p in run.params.values():
            if p.grad is None:  # no rows here this step
                p.grad = torch.zeros_like(p)
        # (FSDP has reduce-scattered the sharded ones)
        ranks.sum_([p.grad for p in run.params.values() if not fsdp.is_sharded(p)] + [loss_total]
                   + ([obj.stats()] if obj else []))
    if run.scaler:
        run.scaler.unscale_(run.opt)
    clip = cfg.train.clip if cfg.train.clip > 0 else float("inf")
    clip_ = fsdp.clip_grad_norm_ if ranks.fsdp else torch.nn.utils.clip_grad_norm_
    grad_norm = clip_(list(run.params.values()), clip)
    if bool(torch.isfinite(loss_total)) and bool(torch.isfinite(grad_norm)):
        if run.scaler:
            run.scaler.step(run.opt)
            run.scaler.update()
        else:
            run.opt.step()
        run.nan_streak = 0
    else:
        run.skipped += 1
        run.nan_streak += 1
    run.opt.zero_grad(set_to_none=True)
    if run.ranks.device.type == "cpu":
        hostpool.trim_heap()  # varying batch shapes must not grow the heap step after step
    run.step += 1
    return _StepOut(loss_total, grad_norm, lr, micro, n_tok)


# -- logging -------------------------------------------------------------------------------
class _Progress:
    """A live line on a terminal (stderr); when stdout is not a terminal, a plain line through
    ``log`` per logged step, at most every ``every`` seconds (and always the last step). With
    ``log_format = "json"``: instead, one JSON object a logged step on stdout."""

    def __init__(self, ranks: Ranks, total: int, start: int, log, every: float = 30.0,
                 log_format: str = "text"):
        self.json = ranks.main and log_format == "json"
        self.live = ranks.main and sys.stderr.isatty() and not self.json
        self.plain = ranks.main and not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()) and not self.json
        self.total, self.start, self.log, self.every = total, start, log, every
        self.t0 = time.time()
        self.last_plain = -math.inf

    def update(self, step: int, loss: float, lr: float, tps: float, eval_loss: float | None = None,
               extra: dict | None = None):
        """``extra``: more named values of the step (DPO's rewards/*), shown after the loss."""
        done = step - self.start
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s"
        shown = "".join(f"  {k} {v:.3f}" for k, v in (extra or {}).items())
        if self.json:
            row = {"step": step, "total": self.total, "loss": _finite_or_none(loss), "lr": lr,
                   "tokens_per_s": tps, "eta_s": round(eta, 1)}
            row = row if eval_loss is None else {**row, "eval_loss": eval_loss}
            print(json.dumps({**row, **(extra or {})}), flush=True)
        if self.live:
            sys.stderr.write(f"\rstep {step}/{self.total}  loss {loss:.4f}{shown}  {tps:,.0f} tok/s  ETA {eta_s} ")
            sys.stderr.flush()
        now = time.monotonic()
        if self.plain and (now - self.last_plain >= self.every or step == self.total):
            self.last_plain = now
            self.log(f"step {step}/{self.total}  loss {loss:.4f}{shown}  lr {lr:.3g}  {tps:,.0f} tok/s  ETA {eta_s}")

    def close(self):
        if self.live:
            sys.stderr.write("\n")


def log_step(run: _Run, data: _Data, out: _StepOut, dt: float, mlog, progress: _Progress):
    """metrics.jsonl row (and eval loss, progress) on the log_every steps and the last."""
    cfg, step = run.cfg, run.step
    if step % cfg.train.log_every and step != data.total:
        return
    run.last_loss = float(out.loss)
    rec = {"step": step, "loss": _finite_or_none(run.last_loss), "lr": out.lr,
           "grad_norm": _finite_or_none(float(out.grad_norm)),
           "tokens_per_s": sum(int(b["attention_mask"].sum()) for b in out.micro) / dt,
           "supervised_tokens": out.n_tok, "skipped_steps": run.skipped,
           "epoch": step * cfg.train.grad_accum / len(data.plan),
           "peak_mem_mb": peak_memory_mb(run.ranks.device)}
    if run.ranks.device.type == "cpu":
        rss = current_rss_mb()  # the RSS now, beside its high-water mark: creep shows here
        if rss is not None:
            rec["rss_mb"] = rss
        if hostpool.enabled():  # the pool's high-water mark
            rec["hostpool_peak_mb"] = hostpool.stats()["peak_bytes"] / 2**20
    obj = run.objective
    if obj:  # DPO: pairs, completion tokens and TRL's rewards/* and logps/*
        rec.update(obj.metrics())
    if cfg.train.eval_every and data.eval_plan is not None and step % cfg.train.eval_every == 0:
        if obj:
            rec.update(obj.evaluate(run.model, data.eval_plan, cfg.train.loss_chunk, run.ranks.device))
        else:
            rec["eval_loss"] = eval_loss(run.model, data.eval_plan, cfg.train.loss_chunk, run.ranks.device, run.ranks)
    mlog.record(rec)
    progress.update(step, run.last_loss, out.lr, rec["tokens_per_s"], rec.get("eval_loss"),
                    obj.progress() if obj else None)


# -- the step loop and the export ----------------------------------------------------------
def step_loop(run: _Run, data: _Data, on_step, log, log_format: str = "text"):
    """Optimizer steps until the plan's end, a run of non-finite steps (TrainingAborted, with
    a checkpoint), or SIGINT/SIGTERM (a checkpoint, ``run.interrupted``)."""
    cfg, ranks = run.cfg, run.ranks
    progress = _Progress(ranks, data.total, run.start, log, log_format=log_format)
    with _Signals() as sigs, MetricsSink(run.run_dir, cfg.train.report_to, ranks.main) as mlog:
        while run.step < data.total:
            t_step = time.time()
            out = optimizer_step(run, data)
            if run.nan_streak >= cfg.train.max_nan_steps:
                run.checkpoint()
                raise TrainingAborted("train", f"loss or gradients non-finite for {run.nan_streak} "
                                               f"steps in a row at step {run.step}; checkpoint saved")
            log_step(run, data, out, time.time() - t_step, mlog, progress)
            if on_step is not None:
                on_step(run.step)
            if cfg.train.save_every and run.step % cfg.train.save_every == 0 and run.step < data.total:
                run.checkpoint()
            if ranks.any(sigs.stop):  # every rank stops at the same step
                run.checkpoint()
                log(f"\n{sigs.stop or 'a signal to another rank'}: checkpoint saved at step {run.step}; "
                    "continue with --resume")
                run.interrupted = True
                break
    progress.close()


def export(run: _Run):
    """The final checkpoint, then ``OUT/adapter`` (or ``OUT/model`` for a full fine-tune) and
    the finished manifest; when the export fails (a full disk) nothing trained is lost."""
    cfg, ranks = run.cfg, run.ranks
    out = run.run_dir / ("adapter" if cfg.adapter.kind != "none" else "model")
    with run.full_state() as gathered:  # under FSDP every rank gathers, once, what rank 0 writes
        final = run.checkpoint(gathered)
        if not ranks.main:
            return
        try:
            if cfg.adapter.kind != "none":
                from leantune.peft_core.adapters import save_adapter

                save_adapter(run.model, out, base_model_name_or_path=str(run.model_dir))
            else:
                from leantune.peft_core.checkpoint import save_model

                save_model(run.model, out, copy_tokenizer_from=run.model_dir)
        except OSError as e:
            raise TrainingAborted(str(out), f"cannot write ({e.strerror or e}); the trained state is "
                                            f"in {final}: free space and rerun with --resume") from e
    write_json(run.run_dir / "manifest.json", finish_manifest(run.manifest, run.step, run.skipped))


# -- the output folder ---------------------------------------------------------------------
LOCK_NAME = ".leantune.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _take_lock(run_dir: Path, log) -> Path:
    """Create ``OUT/.leantune.lock`` holding ``pid@host``; a live holder is refused (exit 2),
    a dead process's lock on this host is taken over with one log line."""
    lock = run_dir / LOCK_NAME
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = lock.read_text(encoding="utf-8", errors="replace").strip()
            except FileNotFoundError:
                continue  # released meanwhile
            pid, _, host = holder.partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                log(f"lock: taking over {lock} from {holder} (that process is gone)")
                lock.unlink(missing_ok=True)
                continue
            raise UsageError(str(run_dir), f"another run is using this output folder (lock {lock} held by "
                                           f"{holder or 'an unknown process'}); wait for it, or remove "
                                           "the lock file if that run is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        return lock
    raise UsageError(str(run_dir), f"cannot take the lock {lock}")


@contextmanager
def output_folder(cfg: Config, ranks: Ranks, log, overwrite: bool | None, resume):
    """The output folder for the run's lifetime: created when missing, locked (rank 0), and
    checked: ``overwrite`` True clears an earlier run's outputs, False refuses a folder that
    holds checkpoints (unless resuming), None (the library default) starts over silently.
    A start that fails leaves no new, empty folder behind."""
    if not str(cfg.train.out).strip():
        raise UsageError("train.out", "is empty: name the output folder")
    run_dir = Path(cfg.train.out)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    started = False
    try:
        if ranks.main:
            lock = _take_lock(run_dir, log)
            if overwrite:
                clear_run(run_dir)
            elif overwrite is False and not resume and _complete_checkpoints(run_dir):
                raise UsageError(str(run_dir), "holds checkpoints of an earlier run: continue it with "
                                               "--resume, or start over with --overwrite")
        ranks.barrier()
        yield run_dir
        started = True
    finally:
        if lock is not None:
            lock.unlink(missing_ok=True)
        if created and not started and ranks.main and not _complete_checkpoints(run_dir) \
                and not (run_dir / "metrics.jsonl").exists():
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)


# -- train ---------------------------------------------------------------------------------
def train(cfg: Config, resume=False, log=print, tokenizer=None, on_step=None,
          overwrite: bool | None = None, log_format: str = "text") -> TrainResult:
    """Run (or resume) a fine-tune; ``on_step(step)`` is called after each optimizer step.

    ``resume``: True continues from the newest good checkpoint, a path from that checkpoint
    folder; it refuses (exit 2) a checkpoint whose config (``provenance.resume_config``: all
    but the keys in ``provenance.RESUME_FREE``: max_steps, epochs, save_every, eval_every,
    log_every, keep_checkpoints, max_nan_steps, grad_checkpoint, cuda_graphs, fsdp, the paths, and
    [eval]), data or base model differ from this run's. ``overwrite``: see ``output_folder``.
    The output folder is locked for the run (a second run into it is refused). ``log_format``
    "json": progress as one JSON object a logged step on stdout (``_Progress``).

    Under torchrun (WORLD_SIZE > 1) this runs data-parallel on every process: ``log`` is
    called on rank 0 only, ``on_step`` on every rank."""
    ranks = launch_ranks(fsdp=cfg.train.fsdp, device=pick_device())
    if ranks.device.type == "cpu":  # before the first oneDNN (bf16) matmul of the process
        bound_onednn_cache()
    if cfg.train.grad_accum % ranks.world and cfg.train.batch_size % ranks.world:
        raise UsageError("train.batch_size", f"the global batch does not split over {ranks.world} "
                                             f"processes (WORLD_SIZE): make batch_size "
                                             f"({cfg.train.batch_size}) or grad_accum "
                                             f"({cfg.train.grad_accum}) a multiple of {ranks.world}")
    log = log if ranks.main else (lambda msg: None)
    with process_group(ranks), output_folder(cfg, ranks, log, overwrite, resume) as run_dir:
        return _train(cfg, resume, log, tokenizer, on_step, ranks, run_dir, log_format)


def _train(cfg: Config, resume, log, tokenizer, on_step, ranks: Ranks, run_dir: Path,
           log_format: str = "text") -> TrainResult:
    from leantune.peft_core.tokenizer import Tokenizer

    if not cfg.data.train:
        raise UsageError("data.train", "no training file given")
    device, dtype = ranks.device, run_dtype(cfg, ranks.device)
    model_dir = resolve_model_dir(cfg.model.path)
    tok = tokenizer or Tokenizer.from_dir(model_dir)
    data = build_data(cfg, tok, run_dir, log)

    model, params = build_model(cfg, model_dir, device, dtype)
    model.train()
    params, held = shard(model, params, ranks, log)
    if ranks.rank:
        torch.manual_seed(cfg.train.seed + ranks.rank)  # its own dropout masks
    opt, scaler = build_optimizer(cfg, params, device, dtype)
    trunk = build_trunk(cfg, model, device, log)
    identity = run_identity(cfg, model_fingerprint(model_dir))
    run = _Run(cfg, ranks, run_dir, model_dir, model, params, opt, scaler, trunk, dtype, identity)
    run.manifest = build_manifest(cfg, model_dir, identity, device=device, ranks=ranks,
                                  total=data.total, summary=data.summary, held=held)

    if cfg.train.objective == "dpo":
        from leantune.train.dpo import make_objective

        run.objective = make_objective(cfg, model, data.plan, run_dir, identity["base_model_sha256"],
                                       dtype, device, log)
    elif cfg.train.objective == "grpo":
        from leantune.train.grpo import make_objective as make_grpo

        run.objective = make_grpo(cfg, tok, data.plan, log)
    restore(run, resume, log)
    step_loop(run, data, on_step, log, log_format)
    if not run.interrupted:
        export(run)
    return TrainResult(run_dir, run.step, run.last_loss, run.skipped, run.interrupted)


# -- small helpers -------------------------------------------------------------------------
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


def _finite_or_none(x: float):
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


ONEDNN_CACHE = "64"


def bound_onednn_cache() -> None:
    """oneDNN (torch's bf16 matmuls on the CPU) keeps up to 1024 compiled primitives, a few MB
    each, one set per GEMM shape: batches whose token count changes every step (packing, real
    data) grew the demo's RSS by ~450 MB over 50 steps. 64 holds a step's shapes. Read when
    oneDNN first runs; ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` set by the user wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)


def current_rss_mb() -> float | None:
    """The process's resident set now (Linux /proc/self/statm), in MiB; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:
        return float("nan")
