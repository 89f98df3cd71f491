"""The DPO family of losses, its metrics, and the reference model, for ``objective = "dpo"``.

With pi = the policy's and ref = the reference's summed log-probs of a pair's chosen (c) and
rejected (r) continuation, n their token counts (TRL's DPOTrainer / CPOTrainer math):

    sigmoid  h = (pi_c - pi_r) - (ref_c - ref_r)        loss = -logsigmoid(beta h)
    ipo      the same h on length-averaged log-probs    loss = (h - 1 / (2 beta))^2
    simpo    no reference; a = pi / n (length-averaged) loss = -logsigmoid(beta (a_c - a_r) - gamma)

    rewards/chosen  = beta (pi_c - ref_c)    (simpo: beta a_c)      likewise rewards/rejected
    rewards/margins = chosen - rejected      rewards/accuracies = chosen > rejected (ties: 0)
    logps/chosen, logps/rejected = pi_c, pi_r (averaged for ipo and simpo, as TRL logs them)

All are means over the pairs of the optimizer step. The reference is the same model with its
adapter switched off, or a frozen second adapter (``reference_adapter``) on the same base: no
second model in memory. ``precompute_ref`` computes the reference log-probs of every pair once
before training and keeps them in ``OUT/cache/ref-logps-KEY.safetensors``; KEY covers the
pairs' tokens (so the data, tokenizer and max_len), the base model, the compute dtype and the
reference adapter's files, so a change of any recomputes them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from leantune.base import file_sha256
from leantune.train.preference import PairPlan, pairs_digest, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo", "simpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")
REFERENCE_NAME = "reference"


# -- the losses ----------------------------------------------------------------------------
def dpo_losses(policy, counts, ref, loss_type: str, beta: float, gamma: float = 0.5):
    """Per-pair losses (B,) and the (B, 6) values behind METRICS.

    ``policy``, ``ref``: (B, 2) summed log-probs of (chosen, rejected); ``counts`` (B, 2) their
    token counts; ``ref`` is unused (may be None) for simpo."""
    if loss_type in ("ipo", "simpo"):
        policy = policy / counts
        ref = ref / counts if ref is not None else None
    pc, pr = policy[:, 0], policy[:, 1]
    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (pc - pr) - gamma)
        rc, rr = beta * pc, beta * pr
    else:
        h = (pc - pr) - (ref[:, 0] - ref[:, 1])
        losses = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2
        rc, rr = beta * (pc - ref[:, 0]), beta * (pr - ref[:, 1])
    rc, rr = rc.detach(), rr.detach()
    values = torch.stack([rc, rr, rc - rr, (rc > rr).to(rc.dtype), pc.detach(), pr.detach()], dim=1)
    return losses, values


# -- the reference -------------------------------------------------------------------------
@contextlib.contextmanager
def reference_mode(model, adapter: str | None):
    """The reference model, in eval mode: the adapter switched off, or ``adapter`` active alone."""
    from leantune.peft_core.adapters import disable_adapters, set_active_adapter

    was, active = model.training, list(getattr(model, "active_adapters", []))
    model.eval()
    try:
        if adapter is None:
            with disable_adapters(model):
                yield model
        else:
            set_active_adapter(model, [adapter])
            yield model
    finally:
        if adapter is not None:
            set_active_adapter(model, active)
        model.train(was)


def load_reference_adapter(model, path) -> None:
    """``reference_adapter``: the folder as a frozen adapter "reference", and the trained adapter
    ("default", active) as a copy of it."""
    from leantune.peft_core.adapters import load_adapter

    load_adapter(model, path, name=REFERENCE_NAME, trainable=False, activate=False)
    load_adapter(model, path, name="default", trainable=True, activate=True)


def adapter_digest(path) -> str:
    d = Path(path)
    return hashlib.sha256("".join(file_sha256(d / n) for n in
                                  ("adapter_config.json", "adapter_model.safetensors")).encode()).hexdigest()


@torch.no_grad()
def compute_reference(model, pairs, adapter, chunk: int, device, batch_size: int = 8, pad_id=0):
    """The reference's summed log-probs (N, 2) of every pair, in order."""
    plan = PairPlan(pairs, batch_size, pad_token_id=pad_id, shuffle=False)
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    with reference_mode(model, adapter):
        for i in range(len(plan)):
            batch = {k: v.to(device) for k, v in plan.batch(0, i).items()}
            logps, _ = sequence_logps(model, batch, chunk)
            out[batch["pair_index"].cpu()] = logps.float().cpu()
    return out


def reference_cache(run_dir: Path, key: dict, compute, log) -> torch.Tensor:
    """The cached table for ``key`` under ``run_dir/cache``, else ``compute()`` written there."""
    from leantune.peft_core.safetensors_io import read_safetensors, write_safetensors

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = Path(run_dir) / "cache" / f"ref-logps-{digest}.safetensors"
    if path.is_file():
        log(f"dpo: reference log-probs from {path}")
        return read_safetensors(path)["logps"]
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write_safetensors({"logps": table}, tmp)
    os.replace(tmp, path)
    log(f"dpo: reference log-probs of {len(table):,} pairs computed once, cached in {path}")
    return table


# -- the objective -------------------------------------------------------------------------
class DPOObjective:
    """What the training loop asks of an objective: ``count`` (the step's normaliser: pairs),
    ``loss_sum`` (a micro-batch's summed loss, the step's metrics accumulated), ``stats`` (the
    tensor summed over ranks), ``metrics`` (the step's row) and ``evaluate`` (held-out pairs)."""

    def __init__(self, train_cfg, reference_adapter: str | None = None, table=None):
        self.loss_type, self.beta, self.gamma = train_cfg.loss_type, train_cfg.beta, train_cfg.gamma
        self.adapter = reference_adapter
        self.table = table  # precomputed reference log-probs (N, 2), or None
        self.sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)  # METRICS, completion tokens
        self.pairs = 0

    @property
    def uses_reference(self) -> bool:
        return self.loss_type != "simpo"

    def count(self, micro) -> int:
        """Pairs in the step's micro-batches (every rank's); resets the step's metrics."""
        self.sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64)
        self.pairs = sum(int(b["input_ids"].shape[0]) for b in micro)
        return self.pairs

    def reference(self, model, batch, chunk: int):
        if not self.uses_reference:
            return None
        if self.table is not None:
            return self.table[batch["pair_index"].cpu()].to(batch["input_ids"].device)
        with torch.no_grad(), reference_mode(model, self.adapter):
            return sequence_logps(model, batch, chunk)[0]

    def loss_sum(self, model, batch, chunk: int, trunk=None):
        """Summed loss over the micro-batch's pairs; its metric sums are kept for the step."""
        ref = self.reference(model, batch, chunk)
        policy, counts = sequence_logps(model, batch, chunk, trunk)
        losses, values = dpo_losses(policy.float(), counts, None if ref is None else ref.float(),
                                    self.loss_type, self.beta, self.gamma)
        step = torch.cat([values.sum(0), counts.sum().reshape(1).to(values.dtype)]).double()
        self.sums = self.sums.to(step.device) + step
        return losses.sum()

    def stats(self) -> torch.Tensor:
        """The step's sums (of METRICS, and completion tokens), to be summed over ranks in place."""
        return self.sums

    def metrics(self) -> dict:
        """The step's row: METRICS (means over its pairs), pairs and completion tokens."""
        sums = self.sums.tolist()
        return {**{name: v / max(self.pairs, 1) for name, v in zip(METRICS, sums)},
                "pairs": self.pairs, "supervised_tokens": int(sums[-1])}

    @torch.no_grad()
    def evaluate(self, model, plan, chunk: int, device) -> dict:
        """eval_loss and the eval_ metrics over a PairPlan (reference computed on the fly)."""
        was = model.training
        model.eval()
        table, self.table = self.table, None
        loss, sums, n = 0.0, torch.zeros(len(METRICS), dtype=torch.float64), 0
        try:
            for i in range(len(plan)):
                batch = {k: v.to(device) for k, v in plan.batch(0, i).items()}
                ref = self.reference(model, batch, chunk)
                policy, counts = sequence_logps(model, batch, chunk)
                losses, values = dpo_losses(policy.float(), counts, None if ref is None else ref.float(),
                                            self.loss_type, self.beta, self.gamma)
                loss += float(losses.sum())
                sums += values.sum(0).double().cpu()
                n += losses.shape[0]
        finally:
            self.table = table
            model.train(was)
        return {"eval_loss": loss / max(n, 1),
                **{f"eval_{name}": float(v) / max(n, 1) for name, v in zip(METRICS, sums)}}

    def progress(self) -> dict:
        """What the progress line shows of a step (TRL's names)."""
        m = self.metrics()
        return {k: m[k] for k in ("rewards/margins", "rewards/accuracies")}


def make_objective(cfg, model, plan, run_dir: Path, base_hash: str, dtype, device, log) -> DPOObjective:
    """The run's DPOObjective; with ``precompute_ref`` its reference table (cached on disk)."""
    t = cfg.train
    adapter = REFERENCE_NAME if t.reference_adapter else None
    table = None
    if t.precompute_ref and t.loss_type != "simpo":
        pairs = [row.ex for row in plan.rows]
        key = {"version": 1, "pairs": pairs_digest(pairs), "base": base_hash, "dtype": str(dtype),
               "quant": [cfg.model.quant, cfg.model.blocksize, cfg.model.double_quant],
               "reference": adapter_digest(t.reference_adapter) if adapter else "adapter-off",
               "max_len": cfg.data.max_len}
        table = reference_cache(run_dir, key, lambda: compute_reference(
            model, pairs, adapter, t.loss_chunk, device, t.batch_size, plan.pad_token_id), log)
    ref = "none (simpo)" if t.loss_type == "simpo" else (
        f"the adapter {t.reference_adapter}" if adapter else "the base, adapter off")
    log(f"dpo: loss {t.loss_type}, beta {t.beta}" + (f", gamma {t.gamma}" if t.loss_type == "simpo" else "")
        + f"; reference: {ref}" + (", precomputed" if table is not None else ""))
    return DPOObjective(t, adapter, table)
