"""eval.metrics: every metric on hand-made cases with known answers, and the bootstrap."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leantune.eval.metrics import JSON_KEYS, bootstrap_ci, choice_accuracy, choice_scores, classification_accuracy, classification_scores, contains, default_primary, exact_match, expand_metrics, extract_json, json_equal, json_scores, normalize_text, paired_bootstrap_diff, regex_match, score_items
from leantune.base import DataError


# --------------------------------------------------------------------------- text

@pytest.mark.parametrize("raw, want", [
    ("  Hello   World \n", "hello world"),
    ("A\tB\r\nC", "a b c"),
    ("The answer.", "the answer."),          # articles and punctuation are kept
    ("Caf\u0065\u0301", "caf\u00e9"),        # NFC: e + combining acute == é
    ("", ""),
])
def test_normalize_text(raw, want):
    assert normalize_text(raw) == want


def test_exact_match():
    assert exact_match(" Paris\n", "paris") == 1.0
    assert exact_match("Paris.", "Paris") == 0.0
    assert exact_match("the Paris", "Paris") == 0.0
    assert exact_match("New  York", "new york") == 1.0


def test_contains():
    assert contains("The capital is Paris, France.", "paris") == 1.0
    assert contains("The capital is Lyon.", "Paris") == 0.0
    assert contains("anything", "") == 0.0
    assert contains("  ", "") == 1.0


def test_regex_match_search_semantics():
    assert regex_match("The date is 2024-01-05.", r"\d{4}-\d{2}-\d{2}") == 1.0
    assert regex_match("The date is 2024-01-05.", r"^\d{4}-\d{2}-\d{2}$") == 0.0
    assert regex_match("  2024-01-05\n", r"^\d{4}-\d{2}-\d{2}$") == 1.0   # stripped
    assert regex_match("YES", "yes") == 0.0                                # case sensitive
    assert regex_match("YES", "(?i)yes") == 1.0
    with pytest.raises(ValueError, match="invalid regex"):
        regex_match("x", "(")


# --------------------------------------------------------------------------- JSON extraction

@pytest.mark.parametrize("text, want", [
    ('{"a": 1}', {"a": 1}),
    ('Sure! Here it is: {"a": 1} Hope that helps {"b": 2}', {"a": 1}),
    ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
    ('See [1] above.\n```\n{"a": 1}\n```', {"a": 1}),           # the fence wins over prose
    ('[1, 2, {"x": "}"}] trailing', [1, 2, {"x": "}"}]),        # brackets inside strings
    ('{"q": "say \\"hi\\" {"}', {"q": 'say "hi" {'}),          # escaped quotes
    ("{'a': 1} then {\"b\": 2}", {"b": 2}),                    # single quotes are not JSON
    ('{"a": 1,} {"c": 3}', {"c": 3}),                           # trailing comma skipped whole
    ('{"a": {"b": 1}', None),                                  # truncated: no inner fragment
    ('{"a": 1]', None),                                        # wrong closing bracket
    ("no json here", None),
    ("42", None),                                              # scalars are not JSON output
    ('{"t": "line1\nline2"}', {"t": "line1\nline2"}),           # raw newline inside a string
])
def test_extract_json(text, want):
    assert extract_json(text) == want


@settings(max_examples=60, deadline=None)
@given(obj=st.dictionaries(st.text(min_size=1, max_size=5),
                           st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                        lambda c: st.lists(c, max_size=3)
                                        | st.dictionaries(st.text(max_size=4), c, max_size=3),
                                        max_leaves=8), max_size=4),
       prefix=st.text(alphabet="abc ,.:!\n", max_size=20))
def test_extract_json_roundtrip_in_prose(obj, prefix):
    assert extract_json(prefix + json.dumps(obj) + " done.") == obj


# --------------------------------------------------------------------------- JSON scoring

REF = {"name": "Ada Lovelace", "year": 1815, "tags": ["math", "poetry"],
       "address": {"city": "London", "zip": None}}


def test_json_scores_perfect_with_normalisation():
    pred = ('```json\n{"name": "  ada   LOVELACE", "year": 1815.0, "tags": ["Math", "poetry"], '
            '"address": {"city": "london", "zip": null}}\n```')
    assert json_scores(pred, REF) == dict.fromkeys(JSON_KEYS, 1.0)


def test_json_scores_malformed():
    assert json_scores('{"name": "Ada", "year": 1815', REF) == dict.fromkeys(JSON_KEYS, 0.0)
    assert json_scores("I cannot do that.", REF) == dict.fromkeys(JSON_KEYS, 0.0)


def test_json_scores_partial_fields():
    # leaves: name, year, tags, address.city, address.zip -> 5
    pred = {"name": "Ada Lovelace", "year": 1816, "address": {"city": "London"}}
    s = json_scores(json.dumps(pred), REF)
    assert s["json_valid"] == 1.0
    assert s["json_keys"] == 0.0           # "tags" missing at the top level
    assert s["json_types"] == 0.0
    assert s["json_field_acc"] == pytest.approx(2 / 5)  # name, address.city
    assert s["json_exact"] == 0.0


def test_json_scores_extra_keys_cost_only_exact():
    pred = dict(REF, extra="x", address={"city": "London", "zip": None, "country": "UK"})
    s = json_scores(json.dumps(pred), REF)
    assert s["json_keys"] == s["json_types"] == s["json_field_acc"] == 1.0
    assert s["json_exact"] == 0.0


def test_json_scores_null_vs_missing_and_number_strings():
    ref = {"a": None, "n": 3}
    assert json_scores('{"a": null, "n": 3}', ref)["json_exact"] == 1.0
    s = json_scores('{"n": 3}', ref)                    # missing "a" is wrong, not null
    assert (s["json_keys"], s["json_field_acc"]) == (0.0, 0.5)
    s = json_scores('{"a": "", "n": "3"}', ref)        # "" is not null, "3" is not 3
    assert (s["json_keys"], s["json_types"], s["json_field_acc"]) == (1.0, 0.0, 0.0)
    s = json_scores('{"a": null, "n": 3.0000000000001}', ref)
    assert s["json_field_acc"] == 1.0                  # numbers compared numerically
    assert json_scores('{"a": null, "n": true}', {"a": None, "n": 1})["json_field_acc"] == 0.5


def test_json_scores_nested_recursive():
    ref = {"a": {"b": {"c": 1, "d": "x"}, "e": 2}}
    s = json_scores('{"a": {"b": {"c": 1, "d": "y"}, "e": 2}}', ref)
    assert s["json_field_acc"] == pytest.approx(2 / 3)
    assert s["json_types"] == 1.0
    s = json_scores('{"a": {"b": 5, "e": 2}}', ref)   # object replaced by a number
    assert s["json_field_acc"] == pytest.approx(1 / 3)
    assert s["json_types"] == 0.0 and s["json_keys"] == 1.0


def test_json_scores_reference_as_text_and_arrays():
    assert json_scores('[1, 2]', "[1, 2.0]")["json_exact"] == 1.0
    s = json_scores('[2, 1]', "[1, 2]")
    assert (s["json_valid"], s["json_keys"], s["json_field_acc"], s["json_exact"]) == (1, 1, 0, 0)
    assert json_scores('{"a": 1}', "[1]")["json_keys"] == 0.0
    s = json_scores('{"z": 1}', {})
    assert s["json_field_acc"] == 1.0 and s["json_exact"] == 0.0
    with pytest.raises(ValueError, match="reference"):
        json_scores('{"a": 1}', "not json")


def test_json_scores_schema():
    schema = {"type": "object", "required": ["id", "score"],
              "properties": {"id": {"type": "integer"}, "score": {"type": ["number", "null"]},
                             "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}
    ref = {"id": 7, "score": 0.5}
    s = json_scores('{"id": 7, "score": null, "meta": {"ok": true}}', ref, schema)
    assert (s["json_keys"], s["json_types"], s["json_field_acc"]) == (1.0, 1.0, 0.5)
    assert json_scores('{"id": 7.5, "score": 1}', ref, schema)["json_types"] == 0.0
    assert json_scores('{"id": 7, "score": 1, "meta": {"ok": 1}}', ref, schema)["json_types"] == 0.0
    assert json_scores('{"id": 7}', ref, schema)["json_keys"] == 0.0


def test_json_equal():
    assert json_equal({"a": [1, "X "]}, {"a": [1.0, "x"]})
    assert not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal(True, 1) and not json_equal(0, False)
    assert not json_equal(None, "")


# --------------------------------------------------------------------------- choices, labels

def test_choice_argmax_and_ties():
    ll = [[-1.0, -2.0, -3.0],           # pred 0
          [-5.0, -1.0, -1.0],           # tie 1/2 -> 1
          [-1.0, -1.0, -4.0],           # tie 0/1 -> 0
          [float("nan"), -9.0]]         # NaN is -inf -> 1
    assert choice_scores(ll, [0, 1, 1, 1]) == [1.0, 1.0, 0.0, 1.0]
    assert choice_scores(ll, [0, 2, 0, 0]) == [1.0, 0.0, 1.0, 0.0]
    assert choice_accuracy(ll, [0, 1, 1, 1]) == 0.75
    assert choice_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        choice_scores([[-1.0]], [1])
    with pytest.raises(ValueError):
        choice_scores([[]], [0])


def test_classification():
    labels = ["positive", "negative", "neutral"]
    preds = ["Positive.", " NEGATIVE", "\"neutral\"", "positive-ish", "mixed"]
    golds = ["positive", "negative", "neutral", "positive", "neutral"]
    assert classification_scores(preds, golds, labels) == [1, 1, 1, 0, 0]
    assert classification_accuracy(preds, golds, labels) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="not in the label set"):
        classification_scores(["x"], ["other"], labels)
    with pytest.raises(ValueError, match="same after normalisation"):
        classification_scores(["x"], ["a"], ["a", "A."])


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    v = (rng.random(200) < 0.7).astype(float)
    m, lo, hi = bootstrap_ci(v, seed=3)
    assert m == pytest.approx(v.mean())
    assert lo <= m <= hi and lo < hi
    assert bootstrap_ci(v, seed=3) == (m, lo, hi)
    assert bootstrap_ci(list(v), seed=4) != (m, lo, hi)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=60), st.integers(0, 2**31))
def test_bootstrap_ci_brackets_mean(values, seed):
    m, lo, hi = bootstrap_ci(values, n_boot=400, seed=seed)
    assert lo - 1e-12 <= m <= hi + 1e-12


def test_bootstrap_narrows_with_more_items():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 500, 5000):
        _, lo, hi = bootstrap_ci((rng.random(n) < 0.5).astype(float), seed=0)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < widths[0] / 5


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], alpha=1.5)


def test_paired_diff():
    a = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_bootstrap_diff([1.0] * 40, [0.0] * 20 + [1.0] * 20)
    assert d == pytest.approx(0.5) and lo <= d <= hi and lo > 0
    # pairing: b = a + 0.1 everywhere has a zero-width interval, unpaired it would not
    x = np.random.default_rng(0).random(100)
    d, lo, hi = paired_bootstrap_diff(x + 0.1, x)
    assert d == pytest.approx(0.1) and hi - lo < 1e-12
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap_diff([1.0], [1.0, 0.0])


# --------------------------------------------------------------------------- dispatch

def test_score_items():
    items = [{"reference": '{"a": 1}', "regex": r"\d"},
             {"reference": '{"a": 2}', "regex": r"^x$", "where": "eval.jsonl:2"}]
    preds = ['{"a": 1}', 'the answer: {"a": 3, "b": 1}']
    out = score_items(preds, items, ["loss", "exact", "contains", "regex", "json", "choice"])
    assert set(out) == {"exact", "contains", "regex", *JSON_KEYS}
    assert out["exact"] == [1.0, 0.0]
    assert out["contains"] == [1.0, 0.0]
    assert out["regex"] == [1.0, 0.0]
    assert out["json_valid"] == [1.0, 1.0] and out["json_exact"] == [1.0, 0.0]
    assert all(len(v) == 2 for v in out.values())


def test_score_items_classification_and_errors():
    items = [{"reference": "yes", "label": "yes"}, {"reference": "no", "label": "no"}]
    assert score_items(["Yes.", "maybe"], items, ["classification"]) == {"classification": [1.0, 0.0]}
    with pytest.raises(ValueError, match="unknown metric"):
        score_items(["a"], [{"reference": "a"}], ["bleu"])
    with pytest.raises(DataError) as e:
        score_items(["a", "b"], [{"reference": "a"}, {"reference": "b"}], ["regex"])
    assert e.value.where == "eval item 1"
    with pytest.raises(DataError) as e:
        score_items(["a"], [{"reference": "oops", "where": "e.jsonl:7"}], ["json"])
    assert e.value.where == "e.jsonl:7"


def test_metric_names():
    assert expand_metrics(["loss", "exact", "json", "exact"]) == ["eval_loss", "exact", *JSON_KEYS]
    assert default_primary(["loss", "json", "exact"]) == "json_field_acc"
    assert default_primary(["loss"]) == "eval_loss"
    assert default_primary(["choice"]) == "choice"
