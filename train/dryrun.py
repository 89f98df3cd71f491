"""``leantune train CONFIG --dry-run``: the run's set-up steps (``train.loop``) without the
run. It checks the config, the data and the model, then measures what a step does to one real
micro-batch, and returns (and logs) the plan. The output folder is not touched: the token
cache goes to a temporary folder that is removed afterwards.

The probe, by objective (each timed after an untimed pass that builds kernels and buffers):

    sft   update    forward + backward of the next-token loss
    dpo   update    the reference's forward (no grad) + the policy's forward + backward of the
                    DPO loss; with precompute_ref the reference is timed apart: a step reads the
                    table, and building it (one reference pass over every pair) is ``s_setup``
    grpo  sampling  group_size completions of each prompt, max_new_tokens at most (batched
                    generation with the KV cache, as a step), and their rewards
          update    the reference's forward + the policy's forward + backward of the GRPO loss
                    on those completions

The estimates: time per step = (sampling + update) x the micro-batches a step; the run =
``s_setup`` + steps x that. Peak memory = the memory high-water mark after the probe (CUDA:
allocated; CPU: the process's peak RSS) plus the optimizer's state (AdamW: two float32
moments per trainable element, the 8-bit AdamW about two bytes), which the probe does not
create. GRPO's sampling time is that of the probe's completions: a policy that learns to stop
sooner (or to run on to max_new_tokens) changes it.
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
from leantune.train.loop import (_complete_checkpoints, batch_loss_sum, build_data, build_model, peak_memory_mb,
                                 prepare_batch, run_dtype)


@dataclass
class Plan:
    examples: int  # GRPO: prompts
    tokens: int  # GRPO: prompt tokens
    supervised_tokens: int  # GRPO: 0 (the completions are sampled)
    supervised_share: float
    rows: int
    steps: int
    micro_batches_per_step: int
    trainable_params: int
    device: str
    dtype: str
    s_per_micro_batch: float  # sampling + update
    s_per_step: float
    est_total_s: float
    est_peak_mem_mb: float
    objective: str = "sft"
    s_sampling_per_micro_batch: float = 0.0  # GRPO: the completions and their rewards
    s_update_per_micro_batch: float = 0.0  # forward + backward (the reference forward included)
    s_setup: float = 0.0  # DPO with precompute_ref: the reference pass over every pair, once
    completions_per_micro_batch: int = 0  # GRPO: batch_size x group_size
    probe_completion_tokens: float = 0.0  # GRPO: the mean length of the probe's completions
    max_new_tokens: int = 0  # GRPO

    def lines(self) -> list[str]:
        if self.objective == "grpo":
            data = (f"{self.examples:,} prompts, {self.tokens:,} prompt tokens; the loss is on the "
                    f"completions sampled each step ({self.completions_per_micro_batch:,} a micro-batch)")
        else:
            data = (f"{self.examples:,} examples, {self.tokens:,} tokens, {self.supervised_tokens:,} supervised "
                    f"({100 * self.supervised_share:.1f}% of tokens have a loss)")
        return [
            data,
            f"{self.rows:,} rows -> {self.steps:,} steps of {self.micro_batches_per_step} micro-batch(es)",
            f"{self.trainable_params:,} trainable parameters; {self.device}, {self.dtype}",
            f"probe: {self.s_per_micro_batch:.3f} s a micro-batch ({self._parts()}) -> about "
            f"{self.s_per_step:.3f} s a step, {_hms(self.est_total_s)} for the run"
            + (f" (setup {_hms(self.s_setup)} included)" if self.s_setup else ""),
            f"estimated peak memory: {self.est_peak_mem_mb:,.0f} MiB "
            f"({'GPU allocated' if self.device == 'cuda' else 'process RSS'}, optimizer state included)",
        ]

    def _parts(self) -> str:
        if self.objective == "grpo":
            return (f"sampling {self.s_sampling_per_micro_batch:.3f} s: {self.completions_per_micro_batch} "
                    f"completions, {self.probe_completion_tokens:.1f} tokens on average of at most "
                    f"{self.max_new_tokens}, and their rewards; update {self.s_update_per_micro_batch:.3f} s: "
                    f"reference forward, forward + backward")
        if self.objective == "dpo":
            if self.s_setup:
                return "forward + backward; the reference's log-probs computed once, before the first step"
            return "reference forward, forward + backward"
        return "forward + backward"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Probe:
    """What the probe measured of one micro-batch (seconds)."""

    update_s: float
    sampling_s: float = 0.0
    setup_s: float = 0.0
    completions: int = 0
    completion_tokens: float = 0.0


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
        measured = probe(cfg, model, data.plan, device, tok, log)
        examples, tokens, supervised = token_counts(data.summary, data.plan)
    t, ga = cfg.train, cfg.train.grad_accum
    micro = measured.sampling_s + measured.update_s
    grpo = t.objective == "grpo"
    plan = Plan(examples=examples, tokens=tokens, supervised_tokens=supervised,
                supervised_share=supervised / max(tokens, 1),
                rows=len(data.plan.rows), steps=data.total, micro_batches_per_step=ga,
                trainable_params=sum(p.numel() for p in params.values()),
                device=device.type, dtype=str(dtype).removeprefix("torch."),
                s_per_micro_batch=micro, s_per_step=micro * ga,
                est_total_s=measured.setup_s + micro * ga * data.total,
                est_peak_mem_mb=peak_memory_mb(device) + optimizer_state_mb(cfg, params),
                objective=t.objective, s_sampling_per_micro_batch=measured.sampling_s,
                s_update_per_micro_batch=measured.update_s, s_setup=measured.setup_s,
                completions_per_micro_batch=measured.completions,
                probe_completion_tokens=measured.completion_tokens,
                max_new_tokens=t.max_new_tokens if grpo else 0)
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


def probe(cfg: Config, model, plan, device, tok=None, log=print) -> Probe:
    """Time what a step does to the plan's first micro-batch (see the module's table); each
    part timed after an untimed pass; gradients cleared afterwards."""
    objective = cfg.train.objective
    host = plan.batch(0, 0)
    batch = ({k: v.to(device) for k, v in host.items()} if objective in ("grpo", "dpo")
             else prepare_batch(host, device))
    if objective == "grpo":
        out = probe_grpo(cfg, model, plan, batch, device, tok, log)
    elif objective == "dpo":
        out = probe_dpo(cfg, model, plan, batch, device)
    else:
        def step():
            loss_sum, n = batch_loss_sum(model, batch, cfg.train.loss_chunk)
            (loss_sum.float() / max(n, 1)).backward()

        step()
        out = Probe(update_s=_timed(step, device)[0])
    model.zero_grad(set_to_none=True)
    return out


def probe_dpo(cfg: Config, model, plan, batch, device) -> Probe:
    """The reference's forward and the policy's forward + backward of the DPO loss; with
    ``precompute_ref`` the step reads a table instead, built once (one reference pass over
    every pair, ``compute_reference``'s batches: the plan's)."""
    from leantune.train.dpo import REFERENCE_NAME, DPOObjective

    t = cfg.train
    obj = DPOObjective(t, REFERENCE_NAME if t.reference_adapter else None)

    def step():
        obj.loss_sum(model, batch, t.loss_chunk).backward()

    step()  # untimed: kernels and buffers
    if not (t.precompute_ref and obj.uses_reference):
        return Probe(update_s=_timed(step, device)[0])
    ref_s = _timed(lambda: obj.reference(model, batch, t.loss_chunk), device)[0]
    obj.table = torch.zeros(len(plan.rows), 2)  # a stand-in: the steps read the table
    return Probe(update_s=_timed(step, device)[0], setup_s=ref_s * len(plan))


def probe_grpo(cfg: Config, model, plan, batch, device, tok, log) -> Probe:
    """GRPO's step on one micro-batch: sample group_size completions of each prompt (at most
    max_new_tokens, the step's own seeded sampling) and score them, timed; then the reference's
    forward and the policy's forward + backward of the loss on those completions, timed on a
    second pass."""
    from leantune.peft_core.generate import generate
    from leantune.train.grpo import make_objective

    t = cfg.train
    obj = make_objective(cfg, tok, plan, log)
    obj.count([batch])
    prompts = [obj.items[i].ids for i in batch["prompt_index"].tolist() for _ in range(t.group_size)]
    # untimed: the prefill and a decode step, so kernels and buffers exist before the timing
    generate(model, prompts, min(2, t.max_new_tokens), eos_token_ids=tok.eos_token_ids,
             pad_token_id=tok.pad_token_id)
    sampling_s, rollout = _timed(lambda: obj.rollout(model, batch), device)

    def step():
        obj.update_loss(model, rollout, t.loss_chunk).backward()

    step()
    completions = rollout[1]
    return Probe(update_s=_timed(step, device)[0], sampling_s=sampling_s, completions=len(completions),
                 completion_tokens=sum(len(c) for c in completions) / max(len(completions), 1))


def _timed(fn, device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, the GPU's queue drained before the clock stops."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


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
