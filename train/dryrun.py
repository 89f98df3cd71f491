"""``leantune train CONFIG --dry-run``: the run's set-up steps (``train.loop``) without the
run. It checks the config, the data and the model, then measures one forward + backward on a
real micro-batch, and returns (and logs) the plan. The output folder is not touched: the
token cache goes to a temporary folder that is removed afterwards.

The estimates: time per step = the probe's micro-batch time x the micro-batches a step;
peak memory = the memory high-water mark after the probe (CUDA: allocated; CPU: the process's
peak RSS) plus the optimizer's state (AdamW: two float32 moments per trainable element,
the 8-bit AdamW about two bytes), which the probe does not create.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from leantune.base import UsageError
from leantune.peft_core.build import pick_device, resolve_model_dir
from leantune.train.config import Config
from leantune.train.loop import _complete_checkpoints, batch_loss_sum, build_data, build_model, peak_memory_mb, run_dtype


@dataclass
class Plan:
    examples: int
    tokens: int
    supervised_tokens: int
    supervised_share: float
    rows: int
    steps: int
    micro_batches_per_step: int
    trainable_params: int
    device: str
    dtype: str
    s_per_micro_batch: float
    s_per_step: float
    est_total_s: float
    est_peak_mem_mb: float

    def lines(self) -> list[str]:
        return [
            f"{self.examples:,} examples, {self.tokens:,} tokens, {self.supervised_tokens:,} supervised "
            f"({100 * self.supervised_share:.1f}% of tokens have a loss)",
            f"{self.rows:,} rows -> {self.steps:,} steps of {self.micro_batches_per_step} micro-batch(es)",
            f"{self.trainable_params:,} trainable parameters; {self.device}, {self.dtype}",
            f"probe: {self.s_per_micro_batch:.3f} s a micro-batch (forward + backward) -> about "
            f"{self.s_per_step:.3f} s a step, {_hms(self.est_total_s)} for the run",
            f"estimated peak memory: {self.est_peak_mem_mb:,.0f} MiB "
            f"({'GPU allocated' if self.device == 'cuda' else 'process RSS'}, optimizer state included)",
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def dry_run(cfg: Config, log=print, tokenizer=None) -> Plan:
    """Validate config, data and model and probe one micro-batch; writes nothing to the
    output folder. Raises the errors a real run would raise at set-up (exit 2, 3 or 4)."""
    from leantune.peft_core.tokenizer import Tokenizer

    if not cfg.data.train:
        raise UsageError("data.train", "no training file given")
    device = pick_device()
    dtype = run_dtype(cfg, device)
    model_dir = resolve_model_dir(cfg.model.path)
    tok = tokenizer or Tokenizer.from_dir(model_dir)
    # the token cache (rows may be memory-mapped from it) lives in a scratch folder
    with tempfile.TemporaryDirectory(prefix="leantune-dry-run-") as scratch:
        data = build_data(cfg, tok, Path(scratch), log)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model, params = build_model(cfg, model_dir, device, dtype)
        model.train()
        probe_s = probe(cfg, model, data.plan, device)
        examples, tokens, supervised = token_counts(data.summary, data.plan)
    ga = cfg.train.grad_accum
    plan = Plan(examples=examples, tokens=tokens, supervised_tokens=supervised,
                supervised_share=supervised / max(tokens, 1),
                rows=len(data.plan.rows), steps=data.total, micro_batches_per_step=ga,
                trainable_params=sum(p.numel() for p in params.values()),
                device=device.type, dtype=str(dtype).removeprefix("torch."),
                s_per_micro_batch=probe_s, s_per_step=probe_s * ga, est_total_s=probe_s * ga * data.total,
                est_peak_mem_mb=peak_memory_mb(device) + optimizer_state_mb(cfg, params))
    for line in plan.lines() + [_out_note(Path(cfg.train.out))]:
        log(f"plan: {line}")
    return plan


def token_counts(summary, plan) -> tuple[int, int, int]:
    """(examples, tokens, tokens with a loss) of the training data. Preference pairs: the
    chosen and rejected tokens (segments 1 and 2 of the shared-prompt rows) carry the loss."""
    if hasattr(summary, "supervised_tokens"):
        return summary.examples, summary.total_tokens, summary.supervised_tokens
    supervised = sum(int((plan.batch(0, i)["doc_ids"] > 0).sum()) for i in range(len(plan)))
    return summary.pairs, summary.row_tokens, supervised


def probe_loss(cfg: Config, model, batch):
    """The loss a step takes of one micro-batch: next-token loss, or for ``objective = "dpo"``
    the policy's summed sequence log-probs (the reference's no-grad forward is not timed)."""
    if cfg.train.objective == "dpo":
        from leantune.train.preference import sequence_logps

        logps, _ = sequence_logps(model, batch, cfg.train.loss_chunk)
        return logps.float().sum()
    loss_sum, n = batch_loss_sum(model, batch, cfg.train.loss_chunk)
    return loss_sum.float() / max(n, 1)


def probe(cfg: Config, model, plan, device) -> float:
    """Seconds for one forward + backward of the plan's first micro-batch (after one untimed
    pass that builds kernels and buffers); gradients cleared afterwards."""
    batch = {k: v.to(device) for k, v in plan.batch(0, 0).items()}
    seconds = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        probe_loss(cfg, model, batch).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def optimizer_state_mb(cfg: Config, params: dict) -> float:
    n = sum(p.numel() for p in params.values())
    return n * (2 if cfg.train.optimizer == "adamw8bit" else 8) / 2**20


def _out_note(out: Path) -> str:
    if not out.exists():
        return f"output folder {out} (would be created); dry run: nothing written"
    held = len(_complete_checkpoints(out)) if out.is_dir() else 0
    note = f", holding {held} checkpoint(s): a run needs --resume or --overwrite" if held else ""
    return f"output folder {out} (exists{note}); dry run: nothing written"


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"
