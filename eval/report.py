"""The eval report: ``eval/report.json`` (the contract's shape), ``eval/report.md``, the gate.

``build_report`` turns per-item scores into means, bootstrap intervals and paired differences;
``write_report`` writes the JSON, a Markdown summary (models x metrics with intervals, the
differences, and the items where the tuned model and the best baseline disagree) and every
output in ``eval/predictions.jsonl``; ``gate`` decides exit status 5.

Labels: ``base`` and ``prompted`` are the baselines; every other label (``tuned``, and extra
adapters by name) is a candidate that gets a ``"<label>-vs-<baseline>"`` difference against each
baseline, and each candidate after the first one also a ``"<label>-vs-<first>"`` difference
against the first (``sft+rl-vs-sft`` when the adapters are given in that order). The gate looks
at ``tuned``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from leantune.eval.metrics import LOWER_IS_BETTER, PRIMARY_ALIASES, bootstrap_ci, paired_bootstrap_diff

BASELINES = ("base", "prompted")
LABEL_ORDER = ("base", "prompted", "tuned")
RESERVED = ("primary_metric", "models", "ci", "diffs", "n_items", "best_baseline", "per_item",
            "outputs", "bootstrap")
GATE_TOL = 1e-9  # float slack at the gate's boundary: 0.7 - 0.6 meets a required lift of 0.1


def _ordered(labels) -> list[str]:
    labels = list(labels)
    first = [x for x in LABEL_ORDER if x in labels]
    return first + [x for x in labels if x not in first]


def _num(x):
    """A JSON-safe float: NaN / inf / None become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def best_baseline(models: dict, primary: str) -> str | None:
    """The baseline label with the best primary value (first in order on a tie); None if none."""
    best = None
    for lab in _ordered(models):
        if lab not in BASELINES or models[lab].get(primary) is None:
            continue
        if best is None or _better(primary, models[lab][primary], models[best][primary]):
            best = lab
    return best


def build_report(results: dict[str, dict[str, list[float]]], losses: dict[str, float],
                 primary_metric: str, items: list[dict], preds: dict[str, list[str]],
                 extra: dict | None = None, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict:
    """The report dict (JSON-ready) in the contract's shape.

    ``results[label][metric]`` are per-item scores in item order (``metrics.score_items`` and
    ``choice_scores``); ``losses[label]`` the eval loss (``None`` or absent: not computed);
    ``primary_metric`` a report key or a config name (``json`` -> ``json_field_acc``,
    ``loss`` -> ``eval_loss``); ``preds[label]`` the generated outputs (may be empty for a label
    scored only by log-likelihood). ``extra`` keys are added at the top level (they must not
    collide with the report's own keys).

    Keys: ``primary_metric``; ``models`` {label: {metric: mean, "eval_loss": loss}};
    ``ci`` {label: {metric: [lo, hi]}}; ``diffs`` {"<cand>-vs-<baseline>": {metric: {"diff",
    "lo", "hi"}}} (paired bootstrap; eval_loss has a point difference only, lo/hi null);
    ``n_items``; ``best_baseline``; ``per_item`` {label: {metric: [score per item]}};
    ``outputs`` {label: {"mean_chars", "empty_rate"}}; ``bootstrap`` {n_boot, alpha, seed}.
    Raises ``ValueError`` on lists of the wrong length or a primary metric no model has.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"extra keys collide with report keys: {clash}")
    n = len(items)
    primary = PRIMARY_ALIASES.get(primary_metric, primary_metric)
    labels = _ordered(list(results) + [x for x in losses if x not in results])

    models: dict[str, dict] = {}
    ci: dict[str, dict] = {}
    per_item: dict[str, dict] = {}
    for lab in labels:
        scores = results.get(lab, {})
        if "eval_loss" in scores:
            raise ValueError(f"{lab}: eval_loss comes from `losses`, not per-item results")
        models[lab], ci[lab], per_item[lab] = {}, {}, {}
        for metric, vals in scores.items():
            if len(vals) != n:
                raise ValueError(f"{lab}/{metric}: {len(vals)} scores for {n} items")
            mean, lo, hi = bootstrap_ci(vals, n_boot=n_boot, alpha=alpha, seed=seed)
            models[lab][metric] = _num(mean)
            ci[lab][metric] = [_num(lo), _num(hi)]
            per_item[lab][metric] = [_num(v) for v in vals]
        models[lab]["eval_loss"] = _num(losses.get(lab))

    if not any(models[lab].get(primary) is not None for lab in labels):
        raise ValueError(f"primary metric {primary!r} has no value for any model")

    diffs: dict[str, dict] = {}
    baselines = [x for x in labels if x in BASELINES]
    candidates = [x for x in labels if x not in BASELINES]
    pairs = [(cand, base) for cand in candidates for base in baselines]
    pairs += [(cand, candidates[0]) for cand in candidates[1:]]  # e.g. sft+rl against sft
    for cand, base in pairs:
        d = {}
        for metric, vals in results.get(cand, {}).items():
            other = results.get(base, {}).get(metric)
            if other is None:
                continue
            mean, lo, hi = paired_bootstrap_diff(vals, other, n_boot=n_boot, alpha=alpha,
                                                 seed=seed)
            d[metric] = {"diff": _num(mean), "lo": _num(lo), "hi": _num(hi)}
        la, lb = models[cand]["eval_loss"], models[base]["eval_loss"]
        if la is not None and lb is not None:
            d["eval_loss"] = {"diff": la - lb, "lo": None, "hi": None}
        diffs[f"{cand}-vs-{base}"] = d

    outputs = {}
    for lab, outs in preds.items():
        if not outs:
            continue
        if len(outs) != n:
            raise ValueError(f"{lab}: {len(outs)} outputs for {n} items")
        outputs[lab] = {"mean_chars": float(np.mean([len(o) for o in outs])),
                        "empty_rate": float(np.mean([not o.strip() for o in outs]))}

    report = {
        "primary_metric": primary,
        "models": models,
        "ci": ci,
        "diffs": diffs,
        "n_items": n,
        "best_baseline": best_baseline(models, primary),
        "bootstrap": {"n_boot": n_boot, "alpha": alpha, "seed": seed},
        "outputs": outputs,
        "per_item": per_item,
    }
    report.update(extra)
    return report


# --------------------------------------------------------------------------- the gate

def gate(report: dict, require_lift: float) -> tuple[bool, str]:
    """Whether ``tuned`` clears the best baseline on the primary metric by ``require_lift``.

    lift = tuned - best_baseline (best_baseline - tuned for ``eval_loss``, where lower is
    better); the gate fails when ``lift < require_lift`` (with 1e-9 of float slack), so with
    ``require_lift = 0`` a tuned model equal to the best baseline passes. A negative
    ``require_lift`` tolerates a tuned model that is worse by up to that much. Without a
    baseline the gate passes and says so (also when no model is named ``tuned``: adapters
    compared with each other only, as the demo's ``sft`` and ``sft+rl``). Raises
    ``ValueError`` when a report with a baseline has no ``tuned`` model, or tuned has no
    primary value.
    """
    primary = report["primary_metric"]
    models = report["models"]
    if "tuned" not in models and not any(lab in BASELINES for lab in models):
        return True, "no baseline and no model named tuned: gate not applied"
    if "tuned" not in models:
        raise ValueError("the report has no 'tuned' model to gate")
    t = models["tuned"].get(primary)
    if t is None:
        raise ValueError(f"tuned has no value for the primary metric {primary!r}")
    best = best_baseline(models, primary)
    if best is None:
        return True, f"tuned {primary} {t:.4f}: no baseline to compare against; gate not applied"
    b = models[best][primary]
    lift = (b - t) if primary in LOWER_IS_BETTER else (t - b)
    ok = lift >= require_lift - GATE_TOL
    ci = report.get("diffs", {}).get(f"tuned-vs-{best}", {}).get(primary, {})
    ci_txt = ""
    if ci.get("lo") is not None:
        ci_txt = f" (95% CI of the difference [{ci['lo']:+.4f}, {ci['hi']:+.4f}])"
    verdict = "meets" if ok else "misses"
    msg = (f"tuned {primary} {t:.4f} vs best baseline {best} {b:.4f}: lift {lift:+.4f} "
           f"{verdict} the required {require_lift:+.4f}{ci_txt}")
    return ok, msg


# --------------------------------------------------------------------------- writing

def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _num(x)
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _truncate(s: str, limit: int) -> str:
    """Keep the head and tail of a long text, marking how much was cut from the middle."""
    s = str(s)
    if len(s) <= limit:
        return s
    keep = max(limit - 30, 10)
    head, tail = keep // 2, keep - keep // 2
    return f"{s[:head]} [... {len(s) - head - tail} chars ...] {s[-tail:]}"


def prompt_text(item: dict) -> str:
    """The prompt of an eval item: ``prompt``, else the messages before the last assistant turn
    (as ``role: content`` lines), else ``text``."""
    if item.get("prompt") is not None:
        return str(item["prompt"])
    msgs = item.get("messages")
    if isinstance(msgs, list) and msgs:
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in msgs[:last])
    return str(item.get("text", ""))


def _as_text(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)


def _fenced(s: str) -> str:
    run, longest = 0, 0
    for c in s:
        run = run + 1 if c == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{s}\n{fence}"


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if metric == "eval_loss" else f"{v:.3f}"


def render_markdown(report: dict, items: list[dict], preds: dict[str, list[str]],
                    max_disagreements: int = 20, excerpt_chars: int = 300,
                    output_chars: int = 400) -> str:
    primary = report["primary_metric"]
    models = report["models"]
    labels = _ordered(models)
    metrics = []
    for lab in labels:
        metrics += [m for m in models[lab] if m not in metrics and m != "eval_loss"]
    metrics.append("eval_loss")
    boot = report.get("bootstrap", {})
    level = f"{100 * (1 - boot.get('alpha', 0.05)):g}%"

    out = ["# Eval report", ""]
    out.append(f"- items: {report['n_items']}")
    out.append(f"- primary metric: `{primary}`")
    out.append(f"- best baseline: {report.get('best_baseline') or 'none'}")
    if isinstance(report.get("gate"), dict):
        g = report["gate"]
        out.append(f"- gate: {'PASS' if g.get('ok') else 'FAIL'}: {g.get('message', '')}")
    out.append(f"- intervals: {level} percentile bootstrap, {boot.get('n_boot', '?')} resamples "
               f"of the items (paired for differences)")
    out += ["", "## Models", ""]
    head = ["model"] + [f"**{m}**" if m == primary else m for m in metrics]
    out.append("| " + " | ".join(_cell(h) for h in head) + " |")
    out.append("|" + "---|" * len(head))
    for lab in labels:
        row = [lab]
        for m in metrics:
            v = models[lab].get(m)
            cell = _fmt(m, v)
            lohi = report.get("ci", {}).get(lab, {}).get(m)
            if v is not None and lohi and lohi[0] is not None:
                cell += f" [{_fmt(m, lohi[0])}, {_fmt(m, lohi[1])}]"
            row.append(cell)
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")

    diffs = report.get("diffs", {})
    if diffs:
        out += ["", "## Differences", "", f"| comparison | metric | difference | {level} interval |",
                "|---|---|---|---|"]
        for name, d in diffs.items():
            for m, v in d.items():
                nd = 4 if m == "eval_loss" else 3
                interval = "-" if v.get("lo") is None else f"[{v['lo']:+.{nd}f}, {v['hi']:+.{nd}f}]"
                diff = "-" if v.get("diff") is None else f"{v['diff']:+.{nd}f}"
                mark = f"**{m}**" if m == primary else m
                out.append(f"| {_cell(name)} | {_cell(mark)} | {diff} | {interval} |")

    out += ["", "## Disagreements", ""]
    best = report.get("best_baseline")
    per_item = report.get("per_item", {})
    t_scores = per_item.get("tuned", {}).get(primary)
    b_scores = per_item.get(best, {}).get(primary) if best else None
    if t_scores is None or b_scores is None:
        out.append(f"No per-item `{primary}` scores for tuned and a baseline; nothing to compare.")
        return "\n".join(out) + "\n"
    idx = [i for i, (a, b) in enumerate(zip(t_scores, b_scores)) if a != b]
    wins = sum(1 for i in idx if _better(primary, t_scores[i], b_scores[i]))
    out.append(f"Items where tuned and the best baseline ({best}) differ on `{primary}`: "
               f"{len(idx)} of {report['n_items']} (tuned better on {wins}, worse on "
               f"{len(idx) - wins}).")
    if len(idx) > max_disagreements:
        out.append(f"Showing the first {max_disagreements}; every output is in "
                   f"`predictions.jsonl`.")
    for i in idx[:max_disagreements]:
        item = items[i]
        out += ["", f"### Item {i + 1}", "", "Prompt:", "",
                _fenced(_truncate(prompt_text(item), excerpt_chars)), "", "Reference:", "",
                _fenced(_truncate(_as_text(item.get("reference", "")), output_chars))]
        for lab in labels:
            outs = preds.get(lab) or []
            if i >= len(outs):
                continue
            score = per_item.get(lab, {}).get(primary, [None] * (i + 1))[i]
            out += ["", f"{lab} ({primary} = {_fmt(primary, score)}):", "",
                    _fenced(_truncate(outs[i], output_chars))]
    return "\n".join(out) + "\n"


def write_report(report: dict, out_dir, items: list[dict], preds: dict[str, list[str]],
                 max_disagreements: int = 20) -> dict[str, Path]:
    """Write ``OUT_DIR/eval/report.json``, ``report.md`` and ``predictions.jsonl`` (each atomic).

    ``out_dir`` is the run's output folder (the ``eval/`` subfolder is created). The JSONL has
    one line per item: ``index``, ``prompt``, ``reference``, ``outputs`` {label: text} and
    ``scores`` {label: {metric: score}}. Returns the three paths by name.
    """
    d = Path(out_dir) / "eval"
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "report.json", "md": d / "report.md", "predictions": d / "predictions.jsonl"}
    _atomic_write_text(paths["json"], json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    _atomic_write_text(paths["md"], render_markdown(report, items, preds, max_disagreements))
    per_item = report.get("per_item", {})
    lines = []
    for i, item in enumerate(items):
        rec = {"index": i, "prompt": prompt_text(item), "reference": item.get("reference"),
               "outputs": {lab: outs[i] for lab, outs in preds.items() if i < len(outs or [])},
               "scores": {lab: {m: v[i] for m, v in ms.items()} for lab, ms in per_item.items()}}
        lines.append(json.dumps(_json_safe(rec), ensure_ascii=False))
    _atomic_write_text(paths["predictions"], "".join(line + "\n" for line in lines))
    return paths
