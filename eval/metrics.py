"""Scoring of eval outputs: per-item metric values and bootstrap confidence intervals.

Every metric here scores one item as a float in [0, 1] (mostly 0 or 1; ``json_field_acc`` is a
fraction), so a model's score is the mean of a list and the lists can be bootstrapped and
compared item by item. Pure Python plus numpy; no torch.

Choices, stated once (the tests pin each one):

* ``normalize_text`` is deliberately conservative, because the references are often structured
  outputs where punctuation and articles carry meaning: Unicode NFC, lowercase, strip, and every
  run of whitespace collapsed to one space. Punctuation and articles are kept (unlike SQuAD).
* ``contains``: the normalised reference is a substring of the normalised prediction. An empty
  reference is "contained" only in an empty prediction (else every output would score 1).
* ``regex_match``: ``re.search`` over the prediction stripped of surrounding whitespace, case
  sensitive, no flags. A pattern that must match the whole output says so itself (``^...$``,
  ``\\A...\\Z``); a case-insensitive one uses ``(?i)``.
* JSON (``extract_json`` / ``json_scores``): see those functions. In short: strings are compared
  after ``normalize_text``, numbers numerically (``3 == 3.0``), booleans are not numbers, a
  number written as a string (``"3"`` vs ``3``) is wrong, ``null`` matches only ``null``, a
  missing field is wrong, extra keys cost nothing in ``json_field_acc`` but fail ``json_exact``.
* multiple choice: the prediction is the argmax of the summed log-likelihoods; on a tie the
  lowest index wins (``numpy.argmax``), so a tie scores 1 only when gold is the lowest tied
  index. NaN log-likelihoods count as ``-inf``.
* classification: the prediction is normalised, stripped of surrounding punctuation and quotes,
  and must then equal one normalised label exactly; anything else is wrong.
* bootstrap: percentile intervals over ``n_boot`` resamples of the items, seeded numpy
  ``default_rng``; paired differences resample the item indices jointly.
"""
from __future__ import annotations

import math
import string

import numpy as np

from leantune.base import DataError

# exact / contains / regex / JSON are pure functions in train.text_metrics (GRPO's rewards use
# them too, and train is below eval), re-exported here
from leantune.train.text_metrics import (  # noqa: F401
    JSON_KEYS, contains, exact_match, extract_json, json_equal, json_scores, normalize_text, regex_match)

# the metric names of the [eval] config that score generated text; "json" expands to these keys
# (JSON_KEYS)
TEXT_METRICS = ("exact", "contains", "regex", "json", "classification")
# scored by the runner from log-likelihoods, not from generated text
LOGLIK_METRICS = ("loss", "choice")
# the report key a config metric name stands for when it is the primary metric
PRIMARY_ALIASES = {"json": "json_field_acc", "loss": "eval_loss"}
LOWER_IS_BETTER = {"eval_loss"}

_EDGE_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb "


# --------------------------------------------------------------------------- choices / labels

def choice_scores(logliks: list[list[float]], gold: list[int]) -> list[float]:
    """Per item: 1.0 when the argmax of the summed log-likelihoods is ``gold``.

    Ties go to the lowest index (so a tie counts only when gold is the lowest tied choice);
    NaN counts as ``-inf``. Raises ``ValueError`` on an empty choice list or gold out of range.
    """
    if len(logliks) != len(gold):
        raise ValueError(f"{len(logliks)} log-likelihood rows for {len(gold)} gold answers")
    out = []
    for i, (row, g) in enumerate(zip(logliks, gold)):
        if len(row) == 0:
            raise ValueError(f"item {i}: no choices")
        if not 0 <= int(g) < len(row):
            raise ValueError(f"item {i}: gold index {g} outside 0..{len(row) - 1}")
        a = np.asarray(row, dtype=np.float64)
        a = np.where(np.isnan(a), -np.inf, a)
        out.append(float(int(np.argmax(a)) == int(g)))
    return out


def choice_accuracy(logliks: list[list[float]], gold: list[int]) -> float:
    """Mean of ``choice_scores`` (0.0 for no items)."""
    s = choice_scores(logliks, gold)
    return sum(s) / len(s) if s else 0.0


def normalize_label(s: str) -> str:
    """``normalize_text`` with surrounding punctuation, quotes and spaces stripped."""
    return normalize_text(s).strip(_EDGE_PUNCT)


def classification_scores(preds: list[str], golds: list[str], labels: list[str]) -> list[float]:
    """Per item: 1.0 when the normalised prediction is exactly the gold label.

    A prediction that matches no label of ``labels`` is wrong. Raises ``ValueError`` when a
    gold label is not in ``labels`` or two labels normalise to the same string.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold labels")
    norm = {}
    for lab in labels:
        n = normalize_label(lab)
        if n in norm and norm[n] != lab:
            raise ValueError(f"labels {norm[n]!r} and {lab!r} are the same after normalisation")
        norm[n] = lab
    out = []
    for p, g in zip(preds, golds):
        ng = normalize_label(g)
        if ng not in norm:
            raise ValueError(f"gold label {g!r} is not in the label set {list(labels)!r}")
        out.append(float(normalize_label(p) == ng))
    return out


def classification_accuracy(preds: list[str], golds: list[str], labels: list[str]) -> float:
    """Mean of ``classification_scores`` (0.0 for no items)."""
    s = classification_scores(preds, golds, labels)
    return sum(s) / len(s) if s else 0.0


# --------------------------------------------------------------------------- bootstrap

def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values`` along axis 0.

    Resamples are drawn in row chunks so memory stays near 8 MB for any item count.
    """
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, (1 << 20) // max(n, 1)))
    means = np.empty(n_boot, dtype=np.float64)
    for s in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - s)
        idx = rng.integers(0, n, size=(rows, n))
        means[s:s + rows] = values[idx].mean(axis=1)
    return means


def _check_boot_args(n_boot: int, alpha: float):
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and the percentile bootstrap ``1 - alpha`` interval.

    Deterministic for a given seed. No values gives NaNs; one value gives a zero-width interval.
    """
    _check_boot_args(n_boot, alpha)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    means = _boot_means(v, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_bootstrap_diff(a, b, n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi): item indices are resampled jointly for both systems.

    ``a`` and ``b`` are per-item scores of two models on the same items (same order).
    """
    _check_boot_args(n_boot, alpha)
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired scores differ in length: {x.size} vs {y.size}")
    return bootstrap_ci(x - y, n_boot=n_boot, alpha=alpha, seed=seed)


# --------------------------------------------------------------------------- dispatch

def expand_metrics(names: list[str]) -> list[str]:
    """The report keys of config metric names: ``json`` becomes the five ``JSON_KEYS``,
    ``loss`` becomes ``eval_loss``; order kept, duplicates dropped."""
    out = []
    for n in names:
        keys = JSON_KEYS if n == "json" else (PRIMARY_ALIASES.get(n, n),)
        out.extend(k for k in keys if k not in out)
    return out


def default_primary(names: list[str]) -> str:
    """The primary metric for a config metric list: the first task metric (``json`` means
    ``json_field_acc``), else ``eval_loss``."""
    for n in names:
        if n != "loss":
            return PRIMARY_ALIASES.get(n, n)
    return "eval_loss"


def _where(i: int, item: dict) -> str:
    return str(item.get("where") or f"eval item {i + 1}")


def score_items(preds: list[str], items: list[dict], metrics: list[str]) -> dict[str, list[float]]:
    """Per-item scores of generated ``preds`` for each text metric in ``metrics``.

    ``metrics`` uses the config names: ``exact``, ``contains``, ``regex`` (pattern in
    ``item["regex"]``), ``json`` (five ``json_*`` keys; optional ``item["schema"]``) and
    ``classification`` (gold in ``item["label"]``, else the reference; the label set is
    ``item["labels"]`` or every gold label in ``items``). ``loss`` and ``choice`` are skipped:
    the runner scores them from log-likelihoods (``choice_scores``). Every item needs
    ``reference`` (text; for ``json`` also an object or array).

    Raises ``ValueError`` for an unknown metric name and ``DataError`` (where = the item's
    ``where`` key, else ``eval item N``, 1-based) for an item that lacks what a metric needs.
    """
    if len(preds) != len(items):
        raise ValueError(f"{len(preds)} predictions for {len(items)} items")
    for m in metrics:
        if m not in TEXT_METRICS and m not in LOGLIK_METRICS:
            raise ValueError(f"unknown metric {m!r}; known: {', '.join(TEXT_METRICS + LOGLIK_METRICS)}")
    out: dict[str, list[float]] = {}
    for m in metrics:
        if m in ("exact", "contains"):
            fn = exact_match if m == "exact" else contains
            out[m] = [fn(p, str(_need(it, i, "reference", m))) for i, (p, it) in enumerate(zip(preds, items))]
        elif m == "regex":
            vals = []
            for i, (p, it) in enumerate(zip(preds, items)):
                try:
                    vals.append(regex_match(p, _need(it, i, "regex", m)))
                except ValueError as e:
                    raise DataError(_where(i, it), str(e)) from None
            out[m] = vals
        elif m == "json":
            cols = {k: [] for k in JSON_KEYS}
            for i, (p, it) in enumerate(zip(preds, items)):
                try:
                    s = json_scores(p, _need(it, i, "reference", m), it.get("schema"))
                except ValueError as e:
                    raise DataError(_where(i, it), f"metric 'json': {e}") from None
                for k in JSON_KEYS:
                    cols[k].append(s[k])
            out.update(cols)
        elif m == "classification":
            golds = [str(it["label"]) if "label" in it else str(_need(it, i, "reference", m))
                     for i, it in enumerate(items)]
            vals = []
            for i, (p, it, g) in enumerate(zip(preds, items, golds)):
                labels = it.get("labels") or sorted(set(golds))
                try:
                    vals.extend(classification_scores([p], [g], labels))
                except ValueError as e:
                    raise DataError(_where(i, it), str(e)) from None
            out[m] = vals
    return out


def _need(item: dict, i: int, key: str, metric: str):
    if key not in item or item[key] is None:
        raise DataError(_where(i, item), f"metric {metric!r} needs a {key!r} field")
    return item[key]
