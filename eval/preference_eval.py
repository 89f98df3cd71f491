"""``leantune eval`` on preference data: held-out pairs scored by log-probs, no generation.

When the eval file holds TRL's preference records (``{"prompt", "chosen", "rejected"}``, strings
or message lists; read and validated by ``train.preference``), ``eval.runner.run_eval`` hands
over to ``run_preference_eval``. Each pair is one shared-prompt row, as in DPO training
(``train.preference.sequence_logps``), under each model: the base (adapter off) and every tuned
adapter. With pi = a model's and ref = the reference's (below) summed log-probs of chosen (c) and
rejected (r):

    chosen_preferred     per pair 1 when pi_c > pi_r            (the base has its own value)
    preference_accuracy  per pair 1 when pi_c - pi_r > ref_c - ref_r   (TRL's rewards/accuracies;
                         the base against itself is 0 by definition, ties count as misses)
    mean_margin          pi_c - pi_r                             (nats; not a rate)
    eval_loss            the DPO loss of train.loss_type / beta / gamma against the reference,
                         as DPO's eval_every computes it (with "loss" in eval.metrics; the
                         reference itself scores log 2 under sigmoid)

The report is the SFT eval's (``eval.report``): means with bootstrap intervals, paired
bootstrap differences against the base, ``report.json`` / ``report.md`` / ``predictions.jsonl``
(there each model's "output" is its two log-probs and margin), and the gate on the primary
metric: ``chosen_preferred`` unless ``eval.metrics`` names another preference metric first.

What does not apply is skipped: the ``prompted`` baseline (few-shot examples make no sense in
front of a pair) and the text metrics (``exact``, ``json``, ...: nothing is generated); each is
said in one log line. The general-text regression check (perplexity and KL(base || tuned) of the
first adapter) is kept: it costs two forwards of a few thousand tokens.

The reference is the one the run trained against, as in DPO's ``eval_every`` and TRL's
evaluation: the base with the adapter off, or the frozen ``train.reference_adapter`` (an SFT
adapter under a DPO run on it). With a reference adapter, its log-probs decide
``preference_accuracy`` and ``eval_loss``, and the base, still its own row, scores against it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from leantune.base import DataError, UsageError
from leantune.train.dpo import REFERENCE_NAME, compute_reference, dpo_losses
from leantune.train.preference import encode_pair, read_pairs
from leantune.train.preference_curation import is_preference_file

from leantune.eval.metrics import LOGLIK_METRICS, TEXT_METRICS
from leantune.eval.report import build_report
from leantune.eval.runner import finish_report, regression_check

PREFERENCE_METRICS = ("chosen_preferred", "preference_accuracy", "mean_margin")
DEFAULT_PRIMARY = "chosen_preferred"


def is_preference_data(path) -> bool:
    """Whether the eval file's first record is a preference pair."""
    return is_preference_file(path)


def preference_primary(metrics: list[str]) -> str:
    """The first preference metric named in ``eval.metrics``, else ``chosen_preferred``; a name
    that is neither a preference nor an SFT metric is a UsageError."""
    for name in metrics:
        if name not in PREFERENCE_METRICS + TEXT_METRICS + LOGLIK_METRICS:
            raise UsageError("eval.metrics", f"unknown metric {name!r} (preference data: "
                                             f"{', '.join(PREFERENCE_METRICS)}, loss)")
    return next((m for m in metrics if m in PREFERENCE_METRICS), DEFAULT_PRIMARY)


# -- the pairs ------------------------------------------------------------------------------
def _side_text(value) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(str(m.get("content", "")) for m in value)


def _prompt_text(value) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)


def load_pair_items(path, tok, max_len: int, max_items: int = 0) -> tuple[list, list[dict], dict]:
    """The file's pairs (``PairExample``), the report items (``where``, ``prompt`` as text,
    ``reference`` {chosen, rejected} as text) and a summary (records, shape, truncated,
    dropped). A malformed record is a DataError "FILE:LINE" (exit 3)."""
    pairs, items = [], []
    summary = {"records": 0, "shape": None, "truncated": 0, "dropped": {}}

    def drop(reason):
        summary["dropped"][reason] = summary["dropped"].get(reason, 0) + 1

    for line_no, record, shape in read_pairs(path):
        summary["records"] += 1
        summary["shape"] = summary["shape"] or shape
        where = f"{path}:{line_no}"
        ex = encode_pair(record, tok, max_len, shape, where, drop)
        if ex is not None:
            ex.line = line_no
            summary["truncated"] += ex.truncated
            pairs.append(ex)
            items.append({"where": where, "prompt": _prompt_text(record["prompt"]),
                          "reference": {"chosen": _side_text(record["chosen"]),
                                        "rejected": _side_text(record["rejected"])}})
        if max_items and len(pairs) >= max_items:
            break
    return pairs, items, summary


# -- the scores -----------------------------------------------------------------------------
def preference_scores(policy: torch.Tensor, ref: torch.Tensor, is_reference: bool = False) -> dict:
    """Per-pair scores from summed log-probs (N, 2) of chosen and rejected: the policy's and
    the reference's. ``is_reference``: the policy is the reference itself (accuracy 0)."""
    margin = (policy[:, 0] - policy[:, 1]).double()  # (N,)
    ref_margin = (ref[:, 0] - ref[:, 1]).double()
    won = torch.zeros_like(margin) if is_reference else (margin > ref_margin).double()
    return {"chosen_preferred": (margin > 0).double().tolist(),
            "preference_accuracy": won.tolist(),
            "mean_margin": margin.tolist()}


def _reference_logps(model, ref_dir, adapters: dict, logps, log) -> torch.Tensor:
    """The pairs' log-probs under ``train.reference_adapter``, loaded frozen beside the tuned
    adapters (a UsageError when it is missing or its label is taken)."""
    from leantune.peft_core.adapters import load_adapter

    if REFERENCE_NAME in adapters:
        raise UsageError("--adapter", f"the label {REFERENCE_NAME!r} is train.reference_adapter's; "
                                      "name the adapter otherwise")
    if not (Path(ref_dir) / "adapter_config.json").is_file():
        raise UsageError("train.reference_adapter", f"no adapter at {ref_dir}")
    load_adapter(model, ref_dir, name=REFERENCE_NAME, trainable=False, activate=False)
    log(f"eval: reference (train.reference_adapter {ref_dir}): scoring the pairs")
    return logps(REFERENCE_NAME)


def _detail(logps: torch.Tensor) -> list[str]:
    """What predictions.jsonl and report.md show as a model's "output" for each pair."""
    return [f"logp(chosen) {c:.4f}  logp(rejected) {r:.4f}  margin {c - r:+.4f}"
            for c, r in logps.double().tolist()]


def run_preference_eval(cfg, model, tok, adapters: dict, data_path, *, device, model_dir, log=print) -> dict:
    """Score the held-out pairs under the base and each adapter (already loaded on ``model``
    under their labels); write ``eval/`` in ``cfg.train.out``; returns the report. Raises
    GateError (exit 5) when ``tuned`` misses the base by more than ``eval.require_lift``."""
    from leantune.peft_core.adapters import set_active_adapter

    out_dir = Path(cfg.train.out)
    primary = preference_primary(list(cfg.eval.metrics))
    skipped = [m for m in cfg.eval.metrics if m in TEXT_METRICS or m == "choice"]
    if skipped:
        log(f"eval: preference data: no generation, so {', '.join(skipped)} do not apply; scoring "
            f"{', '.join(PREFERENCE_METRICS)} from log-probs")
    if "prompted" in cfg.eval.baselines:
        log("eval: preference data: the prompted baseline does not apply (skipped)")

    pairs, items, summary = load_pair_items(data_path, tok, cfg.data.max_len, cfg.eval.max_items)
    if not pairs:
        raise DataError(str(data_path), f"no usable pairs: all {summary['records']} records were dropped "
                                        f"({', '.join(summary['dropped'])})")
    t, pad = cfg.train, tok.pad_token_id or 0
    counts = torch.tensor([[len(ex.chosen), len(ex.rejected)] for ex in pairs], dtype=torch.float64)

    def logps(adapter):  # (N, 2): adapter None = the base, adapter off; else that adapter alone
        return compute_reference(model, pairs, adapter, t.loss_chunk, device, cfg.eval.batch_size, pad).double()

    ref_dir = t.reference_adapter if t.objective in ("dpo", "grpo") and t.loss_type != "simpo" else ""
    log(f"eval: base: scoring {len(pairs)} preference pairs ({summary['shape']})")
    base = logps(None)
    ref = base if not ref_dir else _reference_logps(model, ref_dir, adapters, logps, log)
    runs = [("base", base)] if "base" in cfg.eval.baselines else []
    for name in adapters:
        log(f"eval: {name}: scoring {len(pairs)} preference pairs")
        runs.append((name, logps(name)))

    results, losses, details = {}, {}, {}
    for label, pol in runs:
        results[label] = preference_scores(pol, ref, is_reference=label == "base" and not ref_dir)
        details[label] = _detail(pol)
        if "loss" in cfg.eval.metrics:
            lo, _ = dpo_losses(pol, counts, ref, t.loss_type, t.beta, t.gamma)
            losses[label] = float(lo.mean())

    extra = {"config": {"model": str(model_dir), "adapters": {k: str(v) for k, v in adapters.items()},
                        "data": str(data_path), "kind": "preference"},
             "preference": {"pairs": len(pairs), "records": summary["records"], "shape": summary["shape"],
                            "truncated": summary["truncated"], "dropped": summary["dropped"],
                            "max_len": cfg.data.max_len,
                            "reference": f"the adapter {ref_dir}" if ref_dir else "base (adapter off)",
                            "eval_loss": (f"dpo {t.loss_type}, beta {t.beta}"
                                          + (f", gamma {t.gamma}" if t.loss_type == "simpo" else ""))
                            if losses else None}}
    set_active_adapter(model, next(iter(adapters)))
    extra["regression"] = regression_check(cfg, model, tok, device)
    report = build_report(results, losses, primary, items, {}, extra, seed=cfg.train.seed)
    # mean_margin is in nats, off the bar chart's [0, 1] axis
    return finish_report(cfg, report, out_dir, items, details, log, off_axis=("mean_margin",))


