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

import json
import math
import re
import string
import unicodedata

import numpy as np

from leantune.base import DataError

# the metric names of the [eval] config that score generated text; "json" expands to these keys
JSON_KEYS = ("json_valid", "json_keys", "json_types", "json_field_acc", "json_exact")
TEXT_METRICS = ("exact", "contains", "regex", "json", "classification")
# scored by the runner from log-likelihoods, not from generated text
LOGLIK_METRICS = ("loss", "choice")
# the report key a config metric name stands for when it is the primary metric
PRIMARY_ALIASES = {"json": "json_field_acc", "loss": "eval_loss"}
LOWER_IS_BETTER = {"eval_loss"}

_WS = re.compile(r"\s+")
_EDGE_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb "


# --------------------------------------------------------------------------- text metrics

def normalize_text(s: str) -> str:
    """NFC, lowercase, strip, collapse whitespace runs to one space. Punctuation is kept."""
    s = unicodedata.normalize("NFC", str(s))
    return _WS.sub(" ", s).strip().lower()


def exact_match(pred: str, ref: str) -> float:
    """1.0 when prediction and reference are equal after ``normalize_text``."""
    return float(normalize_text(pred) == normalize_text(ref))


def contains(pred: str, ref: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction.

    An empty reference counts as contained only in an empty prediction.
    """
    p, r = normalize_text(pred), normalize_text(ref)
    if not r:
        return float(not p)
    return float(r in p)


def regex_match(pred: str, pattern: str) -> float:
    """1.0 when ``re.search(pattern, pred.strip())`` finds a match (case sensitive).

    Anchor the pattern (``^...$``) to require the whole output; use ``(?i)`` to ignore case.
    Raises ``ValueError`` for a pattern that does not compile.
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None
    return float(rx.search(str(pred).strip()) is not None)


# --------------------------------------------------------------------------- JSON

_OPEN = {"{": "}", "[": "]"}
_CLOSE = set(_OPEN.values())
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder(strict=False)  # tolerate raw newlines / tabs inside strings
_MISSING = object()


def _balanced_end(text: str, start: int) -> tuple[int, bool]:
    """From the bracket at ``start``: (index after its matching close, brackets matched).

    String-aware (brackets inside ``"..."`` do not count, ``\\"`` escapes). Returns
    ``(len(text), False)`` when the text ends first (a truncated object) and ``(i + 1, False)``
    at a closing bracket of the wrong kind.
    """
    stack = [_OPEN[text[start]]]
    in_str = esc = False
    for i in range(start + 1, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in _OPEN:
            stack.append(_OPEN[c])
        elif c in _CLOSE:
            if c != stack.pop():
                return i + 1, False
            if not stack:
                return i + 1, True
    return len(text), False


def _decode(span: str):
    try:
        return _DECODER.decode(span)
    except ValueError:
        return _MISSING


def _first_json(text: str):
    i = 0
    while i < len(text):
        if text[i] not in _OPEN:
            i += 1
            continue
        end, ok = _balanced_end(text, i)
        if ok:
            obj = _decode(text[i:end])
            if obj is not _MISSING:
                return obj
            # balanced but not JSON (single quotes, trailing comma): skip the whole span
        # A span that never closes runs to the end of the text: it is a truncated object, and
        # its inner fragments are not offered as the answer. A wrong closing bracket or a
        # span that does not parse is skipped whole, for the same reason.
        i = end
    return None


def extract_json(text: str):
    """The first JSON object or array in ``text``, parsed; ``None`` when there is none.

    Looks inside the first Markdown code fence (```` ```json ... ``` ````) first, then in the
    whole text. The candidate is the first ``{`` or ``[`` whose brackets balance (string-aware)
    and whose span parses as JSON. A bracket that never closes (generation cut off at
    ``max_new_tokens``) makes the rest of the text unusable, so a truncated object yields
    ``None`` rather than one of its nested fragments. Only objects and arrays are returned;
    a bare scalar such as ``3`` is not JSON output for these purposes.
    """
    text = str(text)
    m = _FENCE.search(text)
    if m:
        obj = _first_json(m.group(1))
        if obj is not None:
            return obj
    return _first_json(text)


def _kind(v) -> str:
    """The JSON type name of a parsed value (bool before number: ``True`` is not ``1``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    raise TypeError(f"not a JSON value: {type(v).__name__}")


def json_equal(a, b) -> bool:
    """Deep equality of parsed JSON: strings after ``normalize_text``, numbers numerically
    (``math.isclose`` with rel_tol 1e-9), arrays in order, objects with the same key set."""
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        return False
    if ka == "string":
        return normalize_text(a) == normalize_text(b)
    if ka == "number":
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if ka == "array":
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if ka == "object":
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b  # null, boolean


def _leaves(obj, path=()):
    """(path, value) for every non-object value inside nested objects; an empty object is a leaf."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, obj



def _get(obj, path):
    for k in path:
        if not isinstance(obj, dict) or k not in obj:
            return _MISSING
        obj = obj[k]
    return obj


def _schema_types(schema) -> list[str] | None:
    t = schema.get("type") if isinstance(schema, dict) else None
    if t is None:
        return None
    types = [t] if isinstance(t, str) else list(t)
    # JSON Schema's "integer" is a number here; the value check below adds the integrality
    return ["number" if x == "integer" else x for x in types]


def _types_match_schema(value, schema) -> bool:
    types = _schema_types(schema)
    if types is not None:
        k = _kind(value)
        if k not in types:
            return False
        if schema.get("type") == "integer" and not float(value).is_integer():
            return False
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key, sub in schema["properties"].items():
            if key in value and not _types_match_schema(value[key], sub):
                return False
        if any(k not in value for k in schema.get("required", ())):
            return False
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return all(_types_match_schema(x, schema["items"]) for x in value)
    return True


def _parse_reference(ref):
    if isinstance(ref, (dict, list)):
        return ref
    obj = extract_json(ref)
    if obj is None:
        raise ValueError("the reference is not a JSON object or array")
    return obj


def json_scores(pred_text: str, ref, schema: dict | None = None) -> dict[str, float]:
    """Score generated JSON against a reference (object, array, or text holding one).

    Returns the five ``JSON_KEYS``, each in [0, 1]; all are 0 when no JSON can be extracted:

    * ``json_valid``: the prediction holds a JSON object or array (``extract_json``).
    * ``json_keys``: every required top-level key is present (a ``null`` value counts as
      present). Required = ``schema["required"]`` when a schema is given, else the reference's
      keys. For an array reference there are no keys: 1 when the prediction is an array.
    * ``json_types``: every reference leaf field (nested objects walked recursively) is present
      with the same JSON type (null / boolean / number / string / array / object; ``"3"`` is a
      string, not a number; ``null`` expects ``null``). With a schema, the prediction is checked
      against the schema's ``type`` / ``properties`` / ``required`` / ``items`` instead.
    * ``json_field_acc``: the fraction of reference leaf fields (paths through nested objects;
      arrays and empty objects are single leaves) whose predicted value is ``json_equal``; a
      missing field is wrong, extra keys are not penalised. A reference with no leaves (``{}``)
      scores 1 when the prediction is an object.
    * ``json_exact``: ``json_equal`` on the whole value, so extra keys anywhere fail it.

    ``schema`` is a small JSON Schema subset and changes ``json_keys`` / ``json_types`` only;
    values are always compared with the reference. Raises ``ValueError`` when the reference
    itself is not JSON.
    """
    ref_obj = _parse_reference(ref)
    pred = extract_json(pred_text)
    out = dict.fromkeys(JSON_KEYS, 0.0)
    if pred is None:
        return out
    out["json_valid"] = 1.0

    if schema is not None:
        required = list(schema.get("required", ()))
    else:
        required = list(ref_obj) if isinstance(ref_obj, dict) else []
    if isinstance(ref_obj, dict) or schema is not None and schema.get("type", "object") == "object":
        out["json_keys"] = float(isinstance(pred, dict) and all(k in pred for k in required))
    else:
        out["json_keys"] = float(_kind(pred) == _kind(ref_obj))

    leaves = list(_leaves(ref_obj))
    if schema is not None:
        out["json_types"] = float(_types_match_schema(pred, schema))
    else:
        ok = True
        for path, rv in leaves:
            pv = _get(pred, path)
            if pv is _MISSING or _kind(pv) != _kind(rv):
                ok = False
                break
        out["json_types"] = float(ok)

    if leaves == [((), ref_obj)] and isinstance(ref_obj, dict):  # the empty object {}
        out["json_field_acc"] = float(isinstance(pred, dict))
    else:
        hits = 0
        for path, rv in leaves:
            pv = _get(pred, path)
            hits += pv is not _MISSING and json_equal(pv, rv)
        out["json_field_acc"] = hits / len(leaves)
    out["json_exact"] = float(json_equal(pred, ref_obj))
    return out


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
