"""GRPO's verifiable rewards: eval metrics against a record's reference, or a user function.

    [train] reward = ["json_field_acc", "json_exact"]   reward_weights = [0.5, 0.5]
        reward = sum_k w_k * metric_k(completion, reference)      (weights default to 1.0 each)
    [train] reward_fn = "my_rewards:score"   (or "path/to/file.py:score")
        reward = score(prompt, completion, reference), the metrics above not used

The metrics are the eval runner's (``train.text_metrics``): ``json_field_acc``, ``json_exact``
and the other ``json_*`` keys, ``exact``, ``contains``, and ``regex`` (the pattern is the
record's own ``"regex"`` field, as in eval). Records are checked before training starts: a
JSON metric needs a reference that holds JSON, ``regex`` a pattern that compiles.

Errors. A ``reward_fn`` that cannot be imported, or is not callable, is a config error (exit 2,
``train.reward_fn``). One that raises, or returns something that is not a finite number
(``bool`` is not a number), is a ``DataError`` (exit 3) naming the function and the record
``FILE:LINE`` it was scoring: the reward is a property of the data it judges, and the run stops
at that step with every checkpoint and metrics row written so far kept.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import sys
from pathlib import Path

from leantune.base import DataError, UsageError
from leantune.train.text_metrics import JSON_KEYS, contains, exact_match, json_scores, regex_match

REWARD_METRICS = (*JSON_KEYS, "exact", "contains", "regex")


def metric_score(name: str, completion: str, reference: str, pattern: str | None = None) -> float:
    """One metric of one completion, in [0, 1]."""
    if name in JSON_KEYS:
        return json_scores(completion, reference)[name]
    if name == "exact":
        return exact_match(completion, reference)
    if name == "contains":
        return contains(completion, reference)
    if name == "regex":
        return regex_match(completion, pattern)
    raise ValueError(f"unknown reward metric {name!r}; known: {', '.join(REWARD_METRICS)}")


def load_reward_fn(spec: str, where: str = "train.reward_fn"):
    """``"module:function"`` or ``"file.py:function"`` -> the callable (UsageError otherwise)."""
    module, _, name = spec.rpartition(":")
    if not module or not name.isidentifier():
        raise UsageError(where, f"expected \"module:function\" or \"file.py:function\", got {spec!r}")
    try:
        if module.endswith(".py"):
            path = Path(module).resolve()
            loaded = importlib.util.spec_from_file_location(f"leantune_reward_{path.stem}", path)
            mod = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(mod)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # a module beside where the run starts
            mod = importlib.import_module(module)
    except Exception as e:  # the user's module: whatever it raises while loading
        raise UsageError(where, f"cannot import {module!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UsageError(where, f"{module!r} has no function {name!r}")
    return fn


class Reward:
    """The configured reward: ``reward(prompt, completion, item)`` -> float, where ``item`` has
    ``reference``, ``where`` (FILE:LINE) and ``regex`` (or None)."""

    def __init__(self, metrics=("json_field_acc",), weights=(), fn_spec: str = ""):
        self.metrics = list(metrics)
        self.weights = list(weights) or [1.0] * len(self.metrics)
        self.spec = fn_spec
        self.fn = load_reward_fn(fn_spec) if fn_spec else None

    def describe(self) -> str:
        if self.fn is not None:
            return f"the user function {self.spec}"
        return " + ".join(f"{w:g} {m}" for w, m in zip(self.weights, self.metrics))

    def check(self, item) -> None:
        """Before training: the record holds what the metrics need (DataError naming it)."""
        if self.fn is not None:
            return
        if any(m in JSON_KEYS for m in self.metrics):
            try:
                json_scores("", item.reference)
            except ValueError as e:
                raise DataError(item.where, f"reward {self.describe()}: {e}") from None
        if "regex" in self.metrics:
            if not isinstance(item.regex, str):
                raise DataError(item.where, "reward 'regex' needs a \"regex\" field (the pattern) in the record")
            try:
                re.compile(item.regex)
            except re.error as e:
                raise DataError(item.where, f"reward 'regex': invalid pattern {item.regex!r}: {e}") from None

    def __call__(self, prompt: str, completion: str, item) -> float:
        if self.fn is None:
            return sum(w * metric_score(m, completion, item.reference, item.regex)
                       for w, m in zip(self.weights, self.metrics))
        try:
            value = self.fn(prompt, completion, item.reference)
        except Exception as e:  # the user's function: any error ends the run, naming the record
            raise DataError(item.where, f"reward function {self.spec} raised {type(e).__name__}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DataError(item.where, f"reward function {self.spec} returned {value!r}, not a finite number")
        return float(value)
