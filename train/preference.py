"""Preference pairs: TRL's JSONL shapes -> shared-prompt rows -> per-sequence log-probs.

    read_pairs(path)              stream and validate records; a bad one is a DataError "FILE:LINE"
    encode_pair(record, tok)      one record -> PairExample(prompt, chosen, rejected token ids)
    build_pairs(path, tok)        the whole file, with a PairSummary (drops counted, not fatal)
    PairRow / PairPlan            one row = prompt + chosen + rejected; batches as BatchPlan's
    pair_attn_mask(segments)      the block-causal mask of such rows
    sequence_logps(model, batch)  (B, 2) summed log-probs of chosen and rejected, (B, 2) lengths

Record shapes (TRL's):

    {"prompt": str, "chosen": str, "rejected": str}
        [BOS] prompt | chosen EOS | rejected EOS            (tokenized separately, as TRL)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
        prompt = the chat template of the prompt turns with the generation prompt; each side is
        the rest of the template's rendering of prompt + that side (its end-of-turn included)

Shared prompt. TRL runs prompt + chosen and prompt + rejected as two sequences, so the prompt
is encoded twice. Here one row holds the prompt once, then chosen, then rejected, with
segments 0 / 1 / 2. Under ``pair_attn_mask`` a token sees the earlier tokens of the prompt and
of its own segment only (rejected never sees chosen), and the rejected tokens' position ids
restart where the prompt ends, so RoPE gives each side exactly what a separate forward gives.
The first rejected token is predicted from the last prompt token, like the first chosen one.

Log-probs come from the chunked cross-entropy (``quant.chunked_ce``): per sequence,
log p = -(summed CE over its tokens), so no (B, T, V) logits tensor ever exists.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from leantune.base import DataError
from leantune.quant.chunked_ce import chunked_cross_entropy
from leantune.train.data import (IGNORE, BatchPlan, _check_messages, _eos, _lines, _open, _short,
                                 bos_prefix, parse_line, render_chat)

SIDES = ("prompt", "chosen", "rejected")
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # segment ids; -1 is padding


# -- records -------------------------------------------------------------------------------
def is_preference_record(record) -> bool:
    return isinstance(record, dict) and ("chosen" in record or "rejected" in record)


def check_pair(record, where: str) -> str:
    """Validate one preference record; its shape, "strings" or "messages"."""
    if not isinstance(record, dict):
        raise DataError(where, f"a record must be a JSON object, got {type(record).__name__}")
    for side in SIDES:
        if side not in record:
            raise DataError(where, f"preference record is missing {side!r} (needs prompt, chosen, rejected)")
    kinds = {type(record[s]).__name__ for s in SIDES}
    if kinds == {"str"}:
        for side in SIDES:
            if not record[side].strip():
                raise DataError(where, f"field {side!r} is empty")
        return "strings"
    if kinds == {"list"}:
        prompt = record["prompt"]
        if not prompt or any(not isinstance(m, dict) for m in prompt):
            raise DataError(where, "field 'prompt' must be a non-empty list of messages")
        for side in ("chosen", "rejected"):
            msgs = record[side]
            if not msgs or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in msgs):
                raise DataError(where, f"field {side!r} must be a non-empty list of assistant messages")
            _check_messages(prompt + msgs, where)
        return "messages"
    got = ", ".join(f"{s} {type(record[s]).__name__}" for s in SIDES)
    raise DataError(where, f"prompt, chosen and rejected must all be strings or all be lists of "
                           f"messages (got {got})")


def read_pairs(path):
    """``(line_no, record, shape)`` of every non-blank line, each validated; the first bad one
    raises DataError("FILE:LINE", ...); a file with no record raises DataError("FILE", ...)."""
    name, n = str(path), 0
    with _open(path, name) as f:
        for line_no, raw in _lines(f, name):
            if not raw.strip():
                continue
            where = f"{name}:{line_no}"
            record = parse_line(raw, where)
            shape = check_pair(record, where)
            n += 1
            yield line_no, record, shape
    if n == 0:
        raise DataError(name, "no records (the file is empty)")


# -- encoding ------------------------------------------------------------------------------
@dataclass
class PairExample:
    prompt: list
    chosen: list
    rejected: list
    line: int = 0
    truncated: bool = False

    def __len__(self) -> int:  # the shared-prompt row
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def encode_texts(record, tok, shape: str, where: str) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) token ids, untruncated."""
    if shape == "strings":
        prompt = bos_prefix(tok) + _encode(tok, record["prompt"])
        return prompt, _encode(tok, record["chosen"]) + _eos(tok), _encode(tok, record["rejected"]) + _eos(tok)
    head = render_chat(tok, record["prompt"], add_generation_prompt=True, where=where)
    sides = []
    for side in ("chosen", "rejected"):
        full = render_chat(tok, record["prompt"] + record[side], where=where)
        if not full.startswith(head):
            raise DataError(where, f"the chat template's rendering of prompt + {side} does not start "
                                   "with the prompt's; cannot split the continuation")
        sides.append(_encode(tok, full[len(head):].rstrip()))
    return _encode(tok, head), sides[0], sides[1]


def encode_pair(record, tok, max_len: int, shape: str | None = None, where: str = "record",
                on_drop=None) -> PairExample | None:
    """One record -> a PairExample; each side cut so that prompt + side <= ``max_len`` (the
    end of the side is cut). None (``on_drop(reason)``) when the prompt leaves no room."""
    shape = shape or check_pair(record, where)
    prompt, chosen, rejected = encode_texts(record, tok, shape, where)
    room = max_len - len(prompt)
    if room < 1:
        if on_drop:
            on_drop(f"prompt leaves no room in max_len={max_len}")
        return None
    truncated = max(len(chosen), len(rejected)) > room
    return PairExample(prompt, chosen[:room], rejected[:room], truncated=truncated)


@dataclass
class PairSummary:
    path: str = ""
    shape: str = ""
    max_len: int = 0
    records: int = 0
    pairs: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)
    row_tokens: int = 0  # prompt once + chosen + rejected
    prompt_tokens: int = 0  # what running the prompt twice (TRL) would add

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.records:,} preference records ({self.shape}) -> {self.pairs:,} pairs, "
               f"{self.row_tokens:,} tokens in shared-prompt rows; the prompt once instead of twice "
               f"saves {self.prompt_tokens:,} tokens "
               f"({100.0 * self.prompt_tokens / max(self.row_tokens + self.prompt_tokens, 1):.1f}%)"]
        if self.truncated:
            out.append(f"truncated to max_len={self.max_len}: {self.truncated:,} pairs")
        if self.dropped:
            out.append("dropped " + ", ".join(f"{r}: {c:,}" for r, c in sorted(self.dropped.items())))
        return out


def build_pairs(path, tok, max_len: int) -> tuple[list, PairSummary]:
    """Every pair of a file and its summary; DataError for a malformed record or no pair."""
    summary = PairSummary(path=str(path), max_len=max_len)
    pairs = []

    def drop(reason):
        summary.dropped[reason] = summary.dropped.get(reason, 0) + 1

    for line_no, record, shape in read_pairs(path):
        summary.records += 1
        summary.shape = shape
        ex = encode_pair(record, tok, max_len, shape, f"{path}:{line_no}", drop)
        if ex is None:
            continue
        ex.line = line_no
        pairs.append(ex)
        summary.truncated += ex.truncated
        summary.row_tokens += len(ex)
        summary.prompt_tokens += len(ex.prompt)
    summary.pairs = len(pairs)
    if not pairs:
        raise DataError(str(path), f"no usable pairs: all {summary.records} records were dropped "
                                   f"({', '.join(summary.dropped)})")
    return pairs, summary


def pairs_digest(pairs) -> str:
    """sha256 of the pairs' tokens (a cache key part that covers tokenizer and template)."""
    h = hashlib.sha256()
    for ex in pairs:
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected]).encode())
    return h.hexdigest()


# -- rows and batches ----------------------------------------------------------------------
class PairRow:
    """prompt + chosen + rejected as one row for ``BatchPlan``: ``doc_ids`` are the segments
    (0 prompt, 1 chosen, 2 rejected); rejected positions restart at the prompt's length."""

    __slots__ = ("ex",)

    def __init__(self, ex: PairExample):
        self.ex = ex

    def __len__(self) -> int:
        return len(self.ex)

    @property
    def input_ids(self) -> list[int]:
        return self.ex.prompt + self.ex.chosen + self.ex.rejected

    @property
    def labels(self) -> list[int]:
        return [IGNORE] * len(self.ex.prompt) + self.ex.chosen + self.ex.rejected

    @property
    def position_ids(self) -> list[int]:
        p = len(self.ex.prompt)
        return list(range(p + len(self.ex.chosen))) + list(range(p, p + len(self.ex.rejected)))

    @property
    def doc_ids(self) -> list[int]:
        ex = self.ex
        return [PROMPT] * len(ex.prompt) + [CHOSEN] * len(ex.chosen) + [REJECTED] * len(ex.rejected)


class PairPlan(BatchPlan):
    """BatchPlan over PairRows; each batch also carries ``pair_index`` (B,): the pairs' indices
    (for precomputed reference log-probs)."""

    def __init__(self, pairs, batch_size: int, seed: int = 0, pad_token_id=0, shuffle: bool = True):
        super().__init__([PairRow(ex) for ex in pairs], batch_size, seed, pad_token_id,
                         shuffle=shuffle, group_by_length=shuffle)

    def batch(self, epoch: int, index: int) -> dict:
        out = super().batch(epoch, index)
        out["pair_index"] = torch.tensor(self.batch_rows(epoch, index), dtype=torch.long)
        return out


def pair_attn_mask(segments):
    """(B, T) segments -> (B, 1, T, T) boolean mask, True = may attend: causal, and a key is
    seen when it is a prompt token or of the query's own segment (padding, -1, sees itself)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    mask = causal & (k >= 0) & ((k == PROMPT) | (k == q))
    return (mask | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]


def completion_tokens(segments):
    """Where the chosen and rejected tokens are and what predicts them: ``(b, j, src, seq)``,
    1-D over those tokens in row order: row b, token column j, the column whose hidden state
    predicts it (j - 1; the last prompt token for the first rejected token), and the sequence
    2b (chosen) or 2b + 1 (rejected)."""
    B, T = segments.shape
    b, j = (segments > PROMPT).nonzero(as_tuple=True)
    seg = segments[b, j]
    src = j - 1
    prompt_len = (segments == PROMPT).sum(dim=1)  # (B,)
    first_rej = (seg == REJECTED) & (segments[b, (j - 1).clamp(min=0)] != REJECTED)
    src = torch.where(first_rej, prompt_len[b] - 1, src)
    return b, j, src, 2 * b + (seg - 1)


def sequence_logps(model, batch, chunk: int = 256, trunk=None):
    """Summed log-probs (B, 2) of each pair's chosen and rejected continuation, float32 (or
    the hidden states' dtype if wider), and their token counts (B, 2)."""
    ids, seg, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    B = ids.shape[0]
    hidden = (trunk or model.model)(ids, pos, pair_attn_mask(seg))  # (B, T, C)
    b, j, src, seq = completion_tokens(seg)
    h = hidden[b, src]  # (N, C): the states that predict the completion tokens
    targets = ids[b, j]  # (N,)
    counts = torch.bincount(seq, minlength=2 * B)  # (2B,); tokens come grouped by sequence
    logps = [-chunked_cross_entropy(hs, model.lm_head.weight, ts, chunk)
             for hs, ts in zip(h.split(counts.tolist()), targets.split(counts.tolist()))]
    return torch.stack(logps).view(B, 2), counts.view(B, 2)


def build_pair_data(cfg, tok, log):
    """For ``objective = "dpo"``: (plan, eval plan or None, summary, total optimizer steps)."""
    import math

    pairs, summary = build_pairs(cfg.data.train, tok, cfg.data.max_len)
    for line in summary.lines():
        log(f"data: {line}")
    plan = PairPlan(pairs, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id)
    eval_plan = None
    if cfg.data.eval:
        ev, _ = build_pairs(cfg.data.eval, tok, cfg.data.max_len)
        eval_plan = PairPlan(ev, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id, shuffle=False)
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(plan) / cfg.train.grad_accum)
    return plan, eval_plan, summary, total
