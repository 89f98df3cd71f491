"""The eval runner: the same held-out items through the base model, the base model with a
few-shot prompt, and each tuned adapter; then scores, confidence intervals, a general-text
regression check, the report and the gate.

    items  = held-out records -> (prompt tokens, reference)
    for each model (base | prompted | tuned...):
        outputs  = batched greedy generation (left padding, KV cache)
        scores   = eval.metrics.score_items(outputs, items, metrics)
        eval_loss = held-out loss with the training masking (the answer tokens only)
    regression = perplexity and KL(base || tuned) on general text
    report -> eval/report.json, eval/report.md, plots; exit 5 when the gate fails

Preference data (TRL's prompt / chosen / rejected records) goes to ``eval.preference_eval``:
log-prob scores of each pair instead of generation.

Usable from Python: ``run_eval(cfg, adapters={"tuned": DIR})`` returns the report dict.
"""
from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from leantune.base import DataError, GateError, UsageError
from leantune.peft_core.generate import generate, shared_prefix
from leantune.train.config import Config
from leantune.train.data import BatchPlan, encode_record, read_jsonl, split_for_generation

from leantune.eval.metrics import choice_scores, default_primary, score_items
from leantune.eval.report import build_report, gate, write_report

GENERAL_TEXT = Path(__file__).with_name("general_text.txt")


# -- items and few-shot prompts -----------------------------------------------------------
def load_items(path, max_items: int = 0) -> tuple[list[dict], str]:
    """Held-out records -> items ({"record", "where", "reference", ...}) and the file format."""
    items, fmt = [], None
    for line_no, record, rec_fmt in read_jsonl(path, with_format=True):
        fmt = rec_fmt
        if rec_fmt not in ("messages", "prompt_completion"):
            raise DataError(f"{path}:{line_no}", f"eval needs prompt_completion or messages "
                                                 f"records, got {rec_fmt!r}")
        item = {k: v for k, v in record.items() if k not in ("messages", "prompt", "completion")}
        item.update(record=record, where=f"{path}:{line_no}")
        items.append(item)
        if max_items and len(items) >= max_items:
            break
    return items, fmt


def with_shots(record: dict, shots: list[dict], fmt: str) -> dict:
    """The record with ``shots`` solved examples in front (the "prompted" baseline)."""
    if fmt == "prompt_completion":
        prefix = "".join(s["prompt"] + s["completion"] + "\n\n" for s in shots)
        return {**record, "prompt": prefix + record["prompt"]}
    msgs = record["messages"]
    system = [m for m in msgs[:1] if m["role"] == "system"]
    demo = [m for s in shots for m in s["messages"] if m["role"] != "system"]
    return {**record, "messages": system + demo + msgs[len(system):]}


def pick_shots(train_path, n: int, seed: int, fmt: str) -> list[dict]:
    if n <= 0 or not train_path:
        return []
    records = [r for _, r, f in read_jsonl(train_path, with_format=True) if f == fmt]
    return random.Random(seed).sample(records, min(n, len(records)))


# -- model passes --------------------------------------------------------------------------
def generate_outputs(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy outputs for every prompt, batched by similar length (order restored)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    eos = set(tok.eos_token_ids)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        new = generate(model, [prompts[i] for i in idx], max_new_tokens,
                       eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
        for i, ids in zip(idx, new):
            out[i] = tok.decode([t for t in ids if t not in eos], skip_special_tokens=True).strip()
    return out


def heldout_loss(model, tok, records: list[dict], fmt: str, max_len: int, batch_size: int, device) -> float:
    """Mean loss per answer token (the last assistant turn / the completion), as trained."""
    from leantune.train.loop import eval_loss

    rows = [e for e in (encode_record(r, tok, fmt, max_len, True, "last_assistant") for r in records) if e]
    if not rows:
        return float("nan")
    P = shared_prefix([r.input_ids for r in rows])
    while P and any(r.labels[P] != -100 for r in rows):  # the prefix predicts no answer token
        P -= 1
    if P:
        return prefix_loss(model, rows, P, batch_size, device)
    return eval_loss(model, BatchPlan(rows, batch_size, shuffle=False, pad_token_id=tok.pad_token_id),
                     1024, device)


@torch.no_grad()
def prefix_loss(model, rows, P: int, batch_size: int, device) -> float:
    """``heldout_loss`` of rows that share their first P tokens (the few-shot examples): the
    prefix runs once and its keys and values serve every row, whose own tokens follow it.
    The same per-token losses as full forwards (position ids and causal masking unchanged)."""
    from leantune.peft_core.model import KVCache, make_attn_mask
    from leantune.quant.chunked_ce import chunked_cross_entropy

    was = model.training
    model.eval()
    cfg, dtype = model.config, model.model.embed_tokens.weight.dtype
    one = KVCache(cfg, 1, P, device, dtype)
    model.model(torch.tensor([rows[0].input_ids[:P]], device=device), None, None, one)
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for s in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[s:s + batch_size]]
        B, T = len(batch), max(len(r) for r in batch) - P
        ids = torch.zeros(B, T, dtype=torch.long, device=device)
        targets = torch.full((B, T), -100, dtype=torch.long, device=device)  # token t+1 of each row
        keys = torch.zeros(B, P + T, dtype=torch.bool, device=device)
        keys[:, :P] = True
        for b, r in enumerate(batch):
            n = len(r) - P
            ids[b, :n] = torch.tensor(r.input_ids[P:], device=device)
            targets[b, :n - 1] = torch.tensor(r.labels[P + 1:], device=device)
            keys[b, P:P + n] = True
        cache = KVCache(cfg, B, P + T, device, dtype)
        cache.fill_prefix(one)
        positions = torch.arange(P, P + T, device=device).expand(B, T)
        hidden = model.model(ids, positions, make_attn_mask(T, P + T, pad_mask=keys, device=device), cache)
        keep = targets != -100
        total += float(chunked_cross_entropy(hidden[keep], model.lm_head.weight, targets[keep], 1024))
        count += int(keep.sum())
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def choice_logliks(model, tok, prompt_ids: list[int], choices: list[str], device) -> list[float]:
    """Summed log-likelihood of each choice's tokens after the prompt."""
    out = []
    for c in choices:
        cont = tok.encode(c, add_special_tokens=False)
        ids = torch.tensor([prompt_ids + cont], device=device)
        logp = F.log_softmax(model(ids)[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        out.append(float(logp[len(prompt_ids) - 1:].gather(1, tgt[len(prompt_ids) - 1:, None]).sum()))
    return out


@torch.no_grad()
def general_regression(model, tok, text_path, adapter_ctx, device, block: int = 128,
                       max_blocks: int = 16) -> dict:
    """Perplexity of base and tuned on general text, and mean next-token KL(base || tuned)."""
    text = Path(text_path).read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    blocks = [ids[i:i + block] for i in range(0, len(ids) - 1, block)][:max_blocks]
    blocks = [b for b in blocks if len(b) > 1]
    nll = {"base": 0.0, "tuned": 0.0}
    kl_sum, n = 0.0, 0
    for b in blocks:
        x = torch.tensor([b], device=device)
        with adapter_ctx():
            lb = F.log_softmax(model(x)[0].float(), -1)
        lt = F.log_softmax(model(x)[0].float(), -1)
        tgt = x[0, 1:, None]
        nll["base"] -= float(lb[:-1].gather(1, tgt).sum())
        nll["tuned"] -= float(lt[:-1].gather(1, tgt).sum())
        kl_sum += float((lb.exp() * (lb - lt)).sum())
        n += len(b) - 1
    return {"tokens": n, "ppl_base": math.exp(nll["base"] / max(n, 1)),
            "ppl_tuned": math.exp(nll["tuned"] / max(n, 1)), "kl_base_tuned": kl_sum / max(n, 1)}


# -- the runner ----------------------------------------------------------------------------
def run_eval(cfg: Config, adapters: dict | None = None, log=print, model=None, tok=None) -> dict:
    """Evaluate; writes ``eval/`` in ``cfg.train.out``; raises GateError (exit 5) when the
    tuned model misses the best baseline by more than ``eval.require_lift``."""
    from leantune.peft_core.adapters import disable_adapters, load_adapter, set_active_adapter
    from leantune.peft_core.build import compute_dtype_for, load_base, pick_device, resolve_model_dir
    from leantune.peft_core.tokenizer import Tokenizer

    data_path = cfg.eval.data or cfg.data.eval
    if not data_path:
        raise UsageError("eval.data", "no held-out file given")
    out_dir = Path(cfg.train.out)
    if adapters is None:
        default = out_dir / "adapter"
        if not (default / "adapter_config.json").is_file():
            raise UsageError("train.out", f"no adapter at {default} (train first, or pass one)")
        adapters = {"tuned": default}
    unknown = [b for b in cfg.eval.baselines if b not in ("base", "prompted")]
    if unknown:
        raise UsageError("eval.baselines", f"unknown baseline {unknown[0]!r} (use base, prompted)")

    device = pick_device()
    model_dir = resolve_model_dir(cfg.model.path)
    tok = tok or Tokenizer.from_dir(model_dir)
    if model is None:
        model = load_base(model_dir, quant=cfg.model.quant, blocksize=cfg.model.blocksize,
                          double_quant=cfg.model.double_quant,
                          dtype=compute_dtype_for(cfg.model.compute_dtype, device), device=device)
    model.eval()
    for name, path in adapters.items():
        load_adapter(model, path, name=name)

    from leantune.eval.preference_eval import is_preference_data, run_preference_eval

    if is_preference_data(data_path):  # pairs: scored by log-probs, no generation
        return run_preference_eval(cfg, model, tok, adapters, data_path, device=device,
                                   model_dir=model_dir, log=log)
    items, fmt = load_items(data_path, cfg.eval.max_items)
    shots = pick_shots(cfg.data.train, cfg.eval.shots, cfg.train.seed, fmt) if "prompted" in cfg.eval.baselines else []
    records = {"plain": [it["record"] for it in items]}
    records["prompted"] = [with_shots(r, shots, fmt) for r in records["plain"]]
    prompts, refs = {}, []
    for kind, recs in records.items():
        prompts[kind] = []
        for it, rec in zip(items, recs):
            p, ref = split_for_generation(rec, tok, fmt, where=it["where"])
            prompts[kind].append(p)
            if kind == "plain":
                refs.append(ref)
    for it, ref in zip(items, refs):
        it["reference"] = ref
        it["prompt"] = (it["record"].get("prompt") if fmt == "prompt_completion"
                        else it["record"]["messages"][-2]["content"])

    metrics = [m for m in cfg.eval.metrics]
    runs = [(b, "prompted" if b == "prompted" else "plain", None) for b in cfg.eval.baselines]
    runs += [(name, "plain", name) for name in adapters]
    results, losses, preds = {}, {}, {}
    for label, kind, adapter in runs:
        ctx = (lambda: disable_adapters(model)) if adapter is None else contextlib.nullcontext
        if adapter is not None:
            set_active_adapter(model, adapter)
        log(f"eval: {label}: generating {len(items)} outputs")
        with ctx():
            preds[label] = generate_outputs(model, tok, prompts[kind], cfg.eval.max_new_tokens,
                                            cfg.eval.batch_size)
            results[label] = score_items(preds[label], items, metrics)
            if "choice" in metrics:
                golds = [it["choices"].index(it["reference"]) for it in items]
                ll = [choice_logliks(model, tok, p, it["choices"], device)
                      for p, it in zip(prompts[kind], items)]
                results[label]["choice"] = choice_scores(ll, golds)
            if "loss" in metrics:
                # a longer window than training's: few-shot prompts must not push the answer out
                max_len = max(cfg.data.max_len, 4096)
                losses[label] = heldout_loss(model, tok, records[kind], fmt, max_len,
                                             cfg.eval.batch_size, device)
    extra = {"config": {"model": str(model_dir), "adapters": {k: str(v) for k, v in adapters.items()},
                        "shots": len(shots), "data": str(data_path)}}
    first = next(iter(adapters))
    set_active_adapter(model, first)
    extra["regression"] = regression_check(cfg, model, tok, device)
    primary = default_primary(metrics)
    report = build_report(results, losses, primary, items, preds, extra, seed=cfg.train.seed)
    return finish_report(cfg, report, out_dir, items, preds, log)


def regression_check(cfg: Config, model, tok, device) -> dict:
    """``general_regression`` of the active adapter against the base on ``eval.general_text``,
    flagged when KL(base || tuned) passes ``eval.kl_threshold``."""
    from leantune.peft_core.adapters import disable_adapters

    reg = general_regression(model, tok, cfg.eval.general_text or GENERAL_TEXT,
                             lambda: disable_adapters(model), device)
    reg["flagged"] = reg["kl_base_tuned"] > cfg.eval.kl_threshold
    reg["threshold"] = cfg.eval.kl_threshold
    return reg


def finish_report(cfg: Config, report: dict, out_dir: Path, items, preds, log, off_axis=()) -> dict:
    """The gate, report.json / report.md / predictions, the plots (the bar chart without the
    metrics in ``off_axis``, which are not rates), the regression flag's log line; GateError
    (exit 5) when the gate fails."""
    from leantune.eval.plots import plot_loss_curves, plot_metric_comparison

    ok, message = gate(report, cfg.eval.require_lift)
    report["gate"] = {"ok": ok, "message": message, "require_lift": cfg.eval.require_lift}
    write_report(report, out_dir, items, preds)
    if (out_dir / "metrics.jsonl").is_file():
        plot_loss_curves(out_dir / "metrics.jsonl", out_dir / "eval" / "loss.png")
    rates = {lab: {m: v for m, v in vals.items() if m not in off_axis} for lab, vals in report["models"].items()}
    plot_metric_comparison({**report, "models": rates}, out_dir / "eval" / "metrics.png")
    reg = report.get("regression") or {}
    if reg.get("flagged"):
        log(f"eval: regression flag: KL(base||tuned) on general text {reg['kl_base_tuned']:.3f} "
            f"> {cfg.eval.kl_threshold}")
    if not ok:
        raise GateError("eval.require_lift", message)
    return report
