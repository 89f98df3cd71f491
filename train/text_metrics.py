"""Pure text scorers of generated output against a reference: exact, contains, regex and the
JSON scores. Used by the eval runner (``eval.metrics`` re-exports them, with the choices stated
there) and as GRPO's verifiable rewards (``train.rewards``), so they live in the lower layer."""
from __future__ import annotations

import json
import math
import re
import unicodedata

JSON_KEYS = ("json_valid", "json_keys", "json_types", "json_field_acc", "json_exact")
_WS = re.compile(r"\s+")

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
