"""Plots of a run: loss curves from ``metrics.jsonl`` and a models x metrics bar chart.

matplotlib is optional (the ``plots`` extra). Without it every function returns ``None`` and
the first call prints one note to stderr. Figures are drawn on matplotlib's Agg canvas
directly (``matplotlib.figure.Figure``), so pyplot's global state and the process-wide
backend are never touched, and PNGs are written atomically.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

from leantune.base import DataError

from leantune.eval.metrics import LOWER_IS_BETTER


@functools.lru_cache(maxsize=1)
def _figure_class():
    """matplotlib's Figure class, or None (with a one-time note) when it is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("leantune: note: matplotlib is not installed; skipping plots "
              "(pip install 'leantune[plots]')", file=sys.stderr)
        return None
    return Figure


def plots_available() -> bool:
    return _figure_class() is not None


def _save(fig, out_png) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, out)
    return out


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A malformed last line (a run killed mid-write) is
    dropped; a malformed line elsewhere raises ``DataError`` with its line number."""
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    recs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):
                break
            raise DataError(f"{p}:{n}", "not a JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}", "not a JSON object")
        recs.append(rec)
    return recs


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def plot_loss_curves(metrics_jsonl_path, out_png) -> Path | None:
    """Train loss per step (line) and eval loss (points) from the records' ``step``, ``loss``
    and ``eval_loss`` keys. Returns the PNG path, or None without matplotlib."""
    Figure = _figure_class()
    if Figure is None:
        return None
    recs = read_metrics(metrics_jsonl_path)
    train = [(r["step"], r["loss"]) for r in recs if _finite(r.get("step")) and _finite(r.get("loss"))]
    ev = [(r["step"], r["eval_loss"]) for r in recs
          if _finite(r.get("step")) and _finite(r.get("eval_loss"))]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    if train:
        xs, ys = zip(*sorted(train))
        ax.plot(xs, ys, lw=1.2, label="train loss")
    if ev:
        xs, ys = zip(*sorted(ev))
        ax.plot(xs, ys, "o-", ms=5, lw=1.0, label="eval loss")
    if train or ev:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def _bars(ax, labels, metrics, models, ci):
    width = 0.8 / max(len(labels), 1)
    for j, lab in enumerate(labels):
        xs, hs, lo_err, hi_err = [], [], [], []
        for k, m in enumerate(metrics):
            v = models[lab].get(m)
            if v is None:
                continue
            xs.append(k - 0.4 + width * (j + 0.5))
            hs.append(v)
            lohi = ci.get(lab, {}).get(m) or [None, None]
            lo_err.append(max(v - lohi[0], 0.0) if lohi[0] is not None else 0.0)
            hi_err.append(max(lohi[1] - v, 0.0) if lohi[1] is not None else 0.0)
        has_ci = any(lo_err) or any(hi_err) or any(ci.get(lab, {}).get(m) for m in metrics)
        ax.bar(xs, hs, width, yerr=[lo_err, hi_err] if has_ci else None, capsize=3, label=lab)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=20, ha="right")
    ax.grid(axis="y", alpha=0.3)


def plot_metric_comparison(report: dict, out_png) -> Path | None:
    """Grouped bars: for each metric, one bar per model with its bootstrap interval as the
    error bar. Rates share a [0, 1] axis; ``eval_loss`` (lower is better) gets its own panel.
    Returns the PNG path, or None without matplotlib."""
    Figure = _figure_class()
    if Figure is None:
        return None
    models, ci = report["models"], report.get("ci", {})
    labels = list(models)
    rates = []
    for lab in labels:
        rates += [m for m, v in models[lab].items()
                  if m not in rates and m not in LOWER_IS_BETTER and v is not None]
    losses = [m for m in sorted(LOWER_IS_BETTER)
              if any(models[lab].get(m) is not None for lab in labels)]
    panels = [p for p in (rates, losses) if p]
    fig = Figure(figsize=(max(5.0, 1.2 * len(rates) * max(len(labels), 1) / 2 + 3), 4))
    ratios = [max(len(p), 1) * 2 if p is rates else 1.2 for p in panels] or [1]
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False,
                        gridspec_kw={"width_ratios": ratios})[0]
    if not panels:
        axes[0].text(0.5, 0.5, "no metrics", ha="center", va="center", transform=axes[0].transAxes)
    for ax, metrics in zip(axes, panels):
        _bars(ax, labels, metrics, models, ci)
        if metrics is rates:
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("score")
        else:
            ax.set_ylabel("loss (lower is better)")
    axes[0].legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=max(len(labels), 1),
                   frameon=False)
    primary = report.get("primary_metric")
    fig.suptitle(f"Models on {report.get('n_items', '?')} items (primary: {primary})", y=1.06)
    return _save(fig, out_png)
