"""``leantune data pairs CONFIG --adapter DIR --samples N --metric M``: preference pairs from
the model's own samples.

For each record of ``data.train`` (``messages`` or ``prompt_completion``; the prompt is what
``leantune eval`` gives the model, ``train.data.split_for_generation``, and the record's answer
is the reference):

    samples   N completions of base + adapter, sampled with the KV cache (temperature, top_p,
              max_new_tokens: the flags, else train.temperature / top_p / max_new_tokens); the
              generator is seeded from (seed, the record's index), so a record draws the same
              samples whatever --max-records, and the same seed gives the same file
    scores    metric M of each sample against the reference (GRPO's reward metrics,
              ``train.rewards``: json_field_acc, json_exact, other json_* keys, exact, contains,
              regex with the pattern in the record's "regex" field)
    pair      the best sample as chosen, the worst as rejected (the first of equal scores), in
              the record's own shape: a string prompt for prompt_completion records, message
              lists for messages records (TRL's two shapes, ``train.preference``)

A record is skipped, and counted, when its best and worst scores are equal (a tie teaches
nothing), when fewer than two samples hold any text, or when its prompt leaves no room for
``max_new_tokens`` in ``data.max_len``. Samples are scored as decoded (special tokens dropped);
a messages pair's sides are stripped, as the eval runner strips outputs, while a prompt_completion
pair keeps the sample's leading space (it continues the prompt's text).

The output (default ``<train.out>/pairs.jsonl``) is written atomically (a temp file in the same
folder, then a rename); it may not be the training or eval file. ``make_pairs`` is the Python
entry; the CLI prints one summary line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from leantune.base import DataError, UsageError
from leantune.train.data import read_jsonl, split_for_generation
from leantune.train.grpo import PromptItem
from leantune.train.preference_curation import is_preference_file
from leantune.train.rewards import REWARD_METRICS, Reward

DEFAULT_NAME = "pairs.jsonl"
PROGRESS_EVERY = 30.0  # seconds between plain progress lines off a terminal


@dataclass
class Sampling:
    """How ``make_pairs`` samples: None takes the config's train.* value."""
    samples: int = 4
    metric: str = "json_field_acc"
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    max_records: int = 0  # 0 = every record

    def resolved(self, t) -> "Sampling":
        """Every None filled from the train section ``t``, each value checked (UsageError)."""
        s = dataclasses.replace(self, **{k: getattr(t, k) for k in ("temperature", "top_p", "max_new_tokens", "seed")
                                         if getattr(self, k) is None})
        if s.samples < 2:
            raise UsageError("--samples", f"must be at least 2 (a best and a worst), got {s.samples}")
        if s.metric not in REWARD_METRICS:
            raise UsageError("--metric", f"{s.metric!r} is not one of {', '.join(REWARD_METRICS)}")
        if not (s.temperature > 0 and math.isfinite(s.temperature)):
            raise UsageError("--temperature", f"must be > 0 (greedy samples are all the same), got {s.temperature}")
        if not 0.0 < s.top_p <= 1.0:
            raise UsageError("--top-p", f"must be in (0, 1], got {s.top_p}")
        if s.max_new_tokens < 1:
            raise UsageError("--max-new-tokens", f"must be at least 1, got {s.max_new_tokens}")
        if s.seed < 0:
            raise UsageError("--seed", f"must be >= 0, got {s.seed}")
        if s.max_records < 0:
            raise UsageError("--max-records", f"must be >= 0, got {s.max_records}")
        return s


@dataclass
class PairsSummary:
    out: str = ""
    metric: str = ""
    samples: int = 0
    records: int = 0
    pairs: int = 0
    ties: int = 0
    skipped: dict = field(default_factory=dict)
    chosen_sum: float = 0.0
    rejected_sum: float = 0.0

    def line(self) -> str:
        other = "".join(f", {n:,} skipped ({why})" for why, n in sorted(self.skipped.items()))
        scores = (f"; {self.metric} of chosen {self.chosen_sum / self.pairs:.3f}, rejected "
                  f"{self.rejected_sum / self.pairs:.3f} on average" if self.pairs else "")
        return (f"data pairs: {self.records:,} records x {self.samples} samples -> {self.pairs:,} pairs "
                f"written, {self.ties:,} ties skipped{other}{scores}; wrote {self.out}")

    def skip(self, why: str):
        self.skipped[why] = self.skipped.get(why, 0) + 1


# -- records ---------------------------------------------------------------------------------
def read_records(path, tok, fmt: str, reward: Reward, max_records: int = 0) -> list[tuple[dict, str, PromptItem]]:
    """``(record, format, item)`` of the SFT records of ``path`` (at most ``max_records``), each
    checked for the metric (a JSON metric needs a JSON reference, regex a "regex" pattern)."""
    if is_preference_file(path):
        raise DataError(str(path), "holds preference pairs already; data pairs samples from SFT records "
                                   "(messages or prompt_completion)")
    out = []
    for line_no, record, rec_fmt in read_jsonl(path, fmt, with_format=True):
        where = f"{path}:{line_no}"
        if rec_fmt not in ("messages", "prompt_completion"):
            raise DataError(where, f"data pairs needs messages or prompt_completion records (a prompt and "
                                   f"its reference), got {rec_fmt!r}")
        ids, ref = split_for_generation(record, tok, rec_fmt, where)
        regex = record.get("regex") if isinstance(record.get("regex"), str) else None
        item = PromptItem(ids, ref, where, tok.decode(ids), regex)
        reward.check(item)
        out.append((record, rec_fmt, item))
        if max_records and len(out) >= max_records:
            break
    return out


def pick_pair(scores: list[float], usable: list[bool]) -> tuple[int, int] | None:
    """(best, worst) sample indices among the usable ones (the first of equal scores); None
    when fewer than two are usable or best and worst score the same."""
    idx = [i for i, ok in enumerate(usable) if ok]
    if len(idx) < 2:
        return None
    best = max(idx, key=lambda i: scores[i])  # max / min keep the first of equal keys
    worst = min(idx, key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def pair_record(record: dict, fmt: str, chosen: str, rejected: str) -> dict:
    """The preference record in the SFT record's shape (TRL's)."""
    if fmt == "prompt_completion":
        return {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected}
    msgs = record["messages"]
    last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen.strip()}],
            "rejected": [{"role": "assistant", "content": rejected.strip()}]}


def sample_seed(seed: int, index: int) -> int:
    return (seed * 1000003 + index) % 2**63


# -- the command -------------------------------------------------------------------------------
def default_out(cfg) -> Path:
    return Path(cfg.train.out) / DEFAULT_NAME


def _check_out(out: Path, cfg):
    for key, other in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval), ("eval.data", cfg.eval.data)):
        if other and Path(other).exists() and out.exists() and out.resolve() == Path(other).resolve():
            raise UsageError("--out", f"{out} is the config's {key} file; write the pairs elsewhere")


class _Ticker:
    """Records done: a live line on a terminal (stderr), else a plain line through ``say`` at
    most every PROGRESS_EVERY seconds."""

    def __init__(self, total: int, say):
        self.total, self.say = total, say
        self.live = sys.stderr.isatty()
        self.plain = not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty())
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, pairs: int):
        now = time.monotonic()
        text = f"data pairs: record {done}/{self.total}, {pairs} pairs, {now - self.t0:.0f} s"
        if self.live:
            sys.stderr.write(f"\r{text} ")
            sys.stderr.flush()
        elif self.plain and now - self.last >= PROGRESS_EVERY and done < self.total:
            self.last = now
            self.say(text)

    def close(self):
        if self.live:
            sys.stderr.write("\n")


def make_pairs(cfg, adapter, sampling: Sampling, out=None, *, say=print, model=None, tok=None) -> PairsSummary:
    """Sample, score and write the pairs (see the module docstring); returns the summary.
    ``model`` / ``tok``: an already loaded base (the adapter is loaded onto it) and tokenizer."""
    from leantune.peft_core.adapters import load_adapter
    from leantune.peft_core.build import compute_dtype_for, load_base, pick_device, resolve_model_dir
    from leantune.peft_core.generate import generate
    from leantune.peft_core.tokenizer import Tokenizer
    from leantune.train.curation import atomic_write

    s = sampling.resolved(cfg.train)
    if not cfg.data.train:
        raise UsageError("data.train", "no training file given (the records to sample from)")
    out = Path(out) if out else default_out(cfg)
    _check_out(out, cfg)
    reward = Reward([s.metric])
    model_dir = resolve_model_dir(cfg.model.path)
    tok = tok or Tokenizer.from_dir(model_dir)
    records = read_records(cfg.data.train, tok, cfg.data.format, reward, s.max_records)
    device = pick_device() if model is None else model.lm_head.weight.device
    if model is None:
        model = load_base(model_dir, quant=cfg.model.quant, blocksize=cfg.model.blocksize,
                          double_quant=cfg.model.double_quant,
                          dtype=compute_dtype_for(cfg.model.compute_dtype, device), device=device)
    load_adapter(model, adapter, name="pairs", activate=True)
    model.eval()

    summary = PairsSummary(out=str(out), metric=s.metric, samples=s.samples)
    room = cfg.data.max_len - s.max_new_tokens
    lines, ticker = [], _Ticker(len(records), say)
    eos = set(tok.eos_token_ids)
    try:
        for index, (record, fmt, item) in enumerate(records):
            summary.records += 1
            if len(item.ids) > room:
                summary.skip(f"prompt over {room} tokens, data.max_len - max_new_tokens")
                continue
            new = generate(model, [item.ids] * s.samples, s.max_new_tokens, temperature=s.temperature,
                           top_p=s.top_p, seed=sample_seed(s.seed, index), eos_token_ids=tok.eos_token_ids,
                           pad_token_id=tok.pad_token_id or 0)
            texts = [tok.decode([t for t in ids if t not in eos], skip_special_tokens=True) for ids in new]
            scores = [reward(item.text, text, item) for text in texts]
            picked = pick_pair(scores, [bool(t.strip()) for t in texts])
            if picked is None:
                if sum(bool(t.strip()) for t in texts) < 2:
                    summary.skip("fewer than 2 samples with text")
                else:
                    summary.ties += 1
            else:
                best, worst = picked
                summary.pairs += 1
                summary.chosen_sum += scores[best]
                summary.rejected_sum += scores[worst]
                rec = pair_record(record, fmt, texts[best], texts[worst])
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            ticker.update(index + 1, summary.pairs)
    finally:
        ticker.close()
    atomic_write(out, (line.encode("utf-8") for line in lines))
    return summary


def add_pairs_parser(sub):
    """``data pairs`` on the ``data`` sub-parser set (``train.curation.add_data_parser``)."""
    p = sub.add_parser("pairs", help="preference pairs from the model's own samples (best vs worst by a metric)")
    p.add_argument("config", metavar="CONFIG", help="the run's TOML config: model, data.train, train.*")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter to sample with (on the config's base)")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="completions sampled a record")
    p.add_argument("--metric", required=True, choices=REWARD_METRICS, metavar="M",
                   help=f"score against the record's answer: {', '.join(REWARD_METRICS)}")
    p.add_argument("--out", metavar="FILE", help=f"the pairs file; none: <train.out>/{DEFAULT_NAME}")
    p.add_argument("--max-records", type=int, default=0, metavar="K", help="the first K records; 0 = all")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature; none: train.temperature")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling; none: train.top_p")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens a sample at most; none: train.max_new_tokens")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed; none: train.seed")
    return p


def cmd_pairs(args, say) -> PairsSummary:
    from leantune.train.config import load_config

    cfg = load_config(args.config, args.set or [])
    sampling = Sampling(samples=args.samples, metric=args.metric, temperature=args.temperature,
                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        max_records=args.max_records)
    summary = make_pairs(cfg, args.adapter, sampling, args.out, say=say)
    say(summary.line())
    return summary
