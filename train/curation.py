"""``leantune data check|stats|dedup|redact FILE``: data curation (and ``data pairs CONFIG``,
preference pairs from a model's samples: ``train/self_pairs.py``).

    check   schema, role order, empty fields, lengths (chars; tokens with --tokenizer),
            duplicates, a length histogram. Every problem is printed as FILE:LINE: what;
            exit status 3 when there is any.
    stats   counts, format, length percentiles, role counts, duplicate rate.
    dedup   exact duplicates (after lowercasing, stripping punctuation, collapsing whitespace)
            and near duplicates: MinHash signatures over word n-gram shingles, candidates from
            LSH banding, kept when the estimated Jaccard similarity reaches --threshold. The
            first occurrence is kept; OUT is written atomically; --report lists what was
            dropped (line, the kept line it duplicates, estimated Jaccard).
    redact  emails, phone numbers, card numbers (Luhn-valid only), IBANs (mod-97 valid only),
            IPv4/IPv6 addresses and SSN-like ids in every string of every record, replaced by
            [EMAIL] [PHONE] [CARD] [IBAN] [IP] [SSN]; counts per kind; OUT written atomically.
            --score prints span-level precision and recall per kind on the labelled set
            eval/pii_labelled.jsonl (made by scripts/make_pii_labelled.py).

With --skip-invalid, every action skips malformed lines instead of refusing the file:
they are counted in the summary and written to a rejects file (--rejects, default
FILE's name + .rejects.jsonl beside the output) as {"line", "error", "raw"} objects.

``add_data_parser(subparsers)`` adds the ``data`` sub-command to the CLI; ``cmd_data(args)``
runs it. The pieces (``check_file``, ``file_stats``, ``dedup_file``, ``redact_text``, ...)
are plain functions usable without the CLI.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leantune.base import DataError, UsageError

from leantune.train.data import (FORMATS, IGNORE, _lines, _open, check_record, encode_record, file_format,
                                 parse_line, read_jsonl)

MAX_LISTED = 20  # warnings of one kind printed before "... and N more"


# -- shared helpers ------------------------------------------------------------------------
def record_text(record: dict) -> str:
    """The text of a record that duplicates are judged on (all its content, roles included)."""
    if isinstance(record.get("messages"), list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in record["messages"]
                         if isinstance(m, dict))
    if "prompt" in record or "completion" in record:
        return f"{record.get('prompt', '')}\n{record.get('completion', '')}"
    if "text" in record:
        return str(record["text"])
    if "input_ids" in record:
        return " ".join(map(str, record["input_ids"]))
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def record_chars(record: dict, fmt: str) -> int:
    """Length in characters (pre-tokenized records: in tokens)."""
    if fmt == "text":
        return len(record["text"])
    if fmt == "prompt_completion":
        return len(record["prompt"]) + len(record["completion"])
    if fmt == "messages":
        return sum(len(m["content"]) for m in record["messages"])
    return len(record["input_ids"])


def normalize(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: the key of exact deduplication."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def _digest(text: str) -> str:
    return hashlib.sha1(normalize(text).encode("utf-8", "surrogatepass")).hexdigest()


def percentiles(values, qs=(0, 50, 90, 99, 100)) -> dict:
    if len(values) == 0:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q}" if q not in (0, 100) else ("min" if q == 0 else "max"):
           float(np.percentile(arr, q, method="lower")) for q in qs}
    out["mean"] = float(arr.mean())
    return out


def _fmt_pct(p: dict) -> str:
    return "  ".join(f"{k} {v:,.0f}" if k != "mean" else f"mean {v:,.1f}" for k, v in p.items())


def histogram(values, width: int = 40) -> list[str]:
    """A text histogram over power-of-two buckets."""
    if not values:
        return []
    buckets: dict[int, int] = {}
    for v in values:
        b = 0 if v <= 0 else int(v).bit_length()
        buckets[b] = buckets.get(b, 0) + 1
    top = max(buckets.values())
    lines = []
    for b in range(min(buckets), max(buckets) + 1):
        lo, hi = (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)
        n = buckets.get(b, 0)
        bar = "#" * max(1 if n else 0, round(width * n / top))
        lines.append(f"  {lo:>8,}-{hi:<8,} {bar:<{width}} {n:,}")
    return lines


def atomic_write(path, chunks) -> Path:
    """Write the byte ``chunks`` to ``path`` through a temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (links and ``..`` resolved)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def _raw_lines(path, on_invalid=None):
    """``(line_no, raw bytes)`` of the non-blank lines (a regular file only, lines bounded
    as the training reader bounds them; a longer one goes to ``on_invalid`` if given)."""
    with _open(path, str(path)) as f:
        for line_no, raw in _lines(f, str(path), on_invalid):
            if raw.strip():
                yield line_no, raw


class Rejects:
    """The lines skipped under ``--skip-invalid``: called as ``on_invalid(line_no, raw,
    error)``, each kept as ``{"line": N, "error": "...", "raw": "..."}`` (raw as text, bad
    UTF-8 replaced, cut after MAX_RAW characters) and written as JSONL by ``write``."""

    MAX_RAW = 10_000

    def __init__(self):
        self.items: list[dict] = []

    def __call__(self, line_no: int, raw: bytes, error: DataError):
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if len(text) > self.MAX_RAW:
            text = text[:self.MAX_RAW] + "..."
        self.items.append({"line": line_no, "error": error.what, "raw": text})

    def __len__(self) -> int:
        return len(self.items)

    def write(self, path) -> Path:
        return atomic_write(path, ((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8")
                                   for r in self.items))


def _counted(on_invalid, stats: dict):
    """``on_invalid`` that also counts each line it is given in ``stats["skipped"]`` (None
    stays None: bad lines raise)."""
    if on_invalid is None:
        return None

    def skip(line_no, raw, error):
        stats["skipped"] += 1
        on_invalid(line_no, raw, error)
    return skip


def _ignore(line_no, raw, error):
    """on_invalid for a second pass over a file whose bad lines were recorded by the first."""


def _load_tokenizer(model_dir):
    from leantune.peft_core.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


# -- check ---------------------------------------------------------------------------------
@dataclass
class CheckReport:
    path: str
    format: str = "?"
    records: int = 0
    problems: list = field(default_factory=list)  # "FILE:LINE: what"
    warnings: list = field(default_factory=list)  # (kind, "FILE:LINE: what")
    chars: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    duplicates: int = 0
    truncated: int = 0
    skipped: int = 0  # invalid lines skipped (--skip-invalid)

    def lines(self) -> list[str]:
        out = [f"checked {self.path}: {self.records:,} records ({self.format}), {len(self.problems)} problem(s)"
               + (f", {self.skipped:,} invalid line(s) skipped" if self.skipped else "")]
        out += self.problems
        kinds: dict[str, list] = {}
        for kind, text in self.warnings:
            kinds.setdefault(kind, []).append(text)
        for kind, texts in kinds.items():
            out.append(f"warning: {len(texts):,} {kind}")
            out += [f"  {t}" for t in texts[:MAX_LISTED]]
            if len(texts) > MAX_LISTED:
                out.append(f"  ... and {len(texts) - MAX_LISTED:,} more")
        if self.chars:
            out.append(f"length (chars): {_fmt_pct(percentiles(self.chars))}")
        if self.tokens:
            out.append(f"length (tokens): {_fmt_pct(percentiles(self.tokens))}")
        hist = self.tokens or self.chars
        if hist:
            out.append(f"histogram ({'tokens' if self.tokens else 'chars'}):")
            out += histogram(hist)
        if self.records:
            out.append(f"duplicates (exact, normalised): {self.duplicates:,} of {self.records:,} "
                       f"({100.0 * self.duplicates / self.records:.1f}%)")
        return out


def _checked_tokens(record, fmt, tok, max_len, mask_prompt, mask_mode, where) -> int:
    """The record's length in tokens; DataError when training would drop it (no supervised
    token at all, or none within ``max_len``)."""
    reasons: list[str] = []
    ex = encode_record(record, tok, fmt, sys.maxsize, mask_prompt, mask_mode, where=where,
                       on_drop=reasons.append)
    if ex is None:
        raise DataError(where, f"no supervised tokens ({reasons[0]}); it would be dropped")
    if max_len is not None and len(ex) > max_len and all(v == IGNORE for v in ex.labels[:max_len]):
        raise DataError(where, f"{len(ex):,} tokens and no supervised token within "
                               f"max_len={max_len}; it would be dropped")
    return len(ex)


def check_file(path, tok=None, max_len: int | None = None, fmt: str = "auto",
               mask_prompt: bool = True, mask_mode: str = "all_assistant",
               on_invalid=None) -> CheckReport:
    """Every problem of a data file (not only the first): malformed lines, schema, role order,
    empty fields, a format that changes within the file, and, with a tokenizer, records that
    would be dropped (no supervised token within ``max_len``). Truncation and duplicates are
    warnings. With ``on_invalid``, a bad line is handed to ``on_invalid(line_no, raw, error)``
    and counted in ``skipped`` instead of listed as a problem."""
    name = str(path)
    rep = CheckReport(name)
    file_fmt, first_line = (None if fmt == "auto" else fmt), 0
    seen: dict[str, int] = {}
    count = {"skipped": 0}
    skip = _counted(on_invalid, count)
    for line_no, raw in _raw_lines(path, skip):
        where = f"{name}:{line_no}"
        try:
            record = parse_line(raw, where)
            rec_fmt = check_record(record, fmt, where)
            file_fmt, first_line = file_format(file_fmt, first_line, rec_fmt, line_no, where)
            n_tokens = None if tok is None else _checked_tokens(record, rec_fmt, tok, max_len,
                                                                mask_prompt, mask_mode, where)
        except DataError as e:
            if skip is None:
                rep.problems.append(str(e))
            else:
                skip(line_no, raw, e)
            continue
        rep.records += 1
        rep.chars.append(record_chars(record, rec_fmt))
        key = _digest(record_text(record))
        if key in seen:
            rep.duplicates += 1
            rep.warnings.append(("exact duplicates", f"{where}: duplicate of line {seen[key]}"))
        else:
            seen[key] = line_no
        if n_tokens is not None:
            rep.tokens.append(n_tokens)
            if max_len is not None and n_tokens > max_len:
                rep.truncated += 1
                rep.warnings.append(("records longer than max_len (truncated)",
                                     f"{where}: {n_tokens:,} tokens > max_len={max_len}"))
    rep.format, rep.skipped = file_fmt or "?", count["skipped"]
    if rep.records == 0 and not rep.problems:
        rep.problems.append(f"{name}: no records (the file is empty)")
    return rep


# -- stats ---------------------------------------------------------------------------------
def file_stats(path, tok=None, fmt: str = "auto", on_invalid=None) -> dict:
    """Counts, format, length percentiles, role counts and the duplicate rate of a valid file
    (the first malformed record raises DataError; ``data check`` lists them all; with
    ``on_invalid`` bad lines are handed to it and counted in ``skipped``)."""
    out: dict = {"path": str(path), "records": 0, "format": None, "skipped": 0}
    chars, tokens, turns, prompt_chars, completion_chars = [], [], [], [], []
    roles: dict[str, int] = {}
    seen, dups = set(), 0
    for _, record, rec_fmt in read_jsonl(path, fmt, with_format=True,
                                                 on_invalid=_counted(on_invalid, out)):
        out["records"] += 1
        out["format"] = rec_fmt
        chars.append(record_chars(record, rec_fmt))
        if rec_fmt == "messages":
            turns.append(len(record["messages"]))
            for m in record["messages"]:
                roles[m["role"]] = roles.get(m["role"], 0) + 1
        elif rec_fmt == "prompt_completion":
            prompt_chars.append(len(record["prompt"]))
            completion_chars.append(len(record["completion"]))
        if tok is not None:
            ex = encode_record(record, tok, rec_fmt, sys.maxsize)
            tokens.append(len(ex) if ex is not None else 0)
        key = _digest(record_text(record))
        dups += key in seen
        seen.add(key)
    out["length_chars" if out["format"] != "tokens" else "length_tokens"] = percentiles(chars)
    if tokens:
        out["length_tokens"] = percentiles(tokens)
        out["total_tokens"] = int(sum(tokens))
    if prompt_chars:
        out["prompt_chars"] = percentiles(prompt_chars)
        out["completion_chars"] = percentiles(completion_chars)
    if turns:
        out["messages_per_record"] = percentiles(turns)
        out["roles"] = roles
    out["duplicates"] = dups
    out["duplicate_rate"] = dups / max(out["records"], 1)
    return out


def stats_lines(st: dict) -> list[str]:
    lines = [f"{st['path']}: {st['records']:,} records, format {st['format']}"]
    for key, label in (("length_chars", "length (chars)"), ("length_tokens", "length (tokens)"),
                       ("prompt_chars", "prompt (chars)"), ("completion_chars", "completion (chars)"),
                       ("messages_per_record", "messages per record")):
        if key in st:
            lines.append(f"{label}: {_fmt_pct(st[key])}")
    if "total_tokens" in st:
        lines.append(f"total tokens: {st['total_tokens']:,}")
    if "roles" in st:
        lines.append("roles: " + ", ".join(f"{r} {n:,}" for r, n in sorted(st["roles"].items())))
    lines.append(f"duplicates (exact, normalised): {st['duplicates']:,} "
                 f"({100.0 * st['duplicate_rate']:.1f}%)")
    if st.get("skipped"):
        lines.append(f"invalid lines skipped: {st['skipped']:,}")
    return lines


# -- dedup: MinHash + LSH ------------------------------------------------------------------
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective mix of uint64 values (arithmetic wraps mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class MinHasher:
    """MinHash over word ``ngram`` shingles of the normalised text with ``num_perm`` hash
    functions h_i(x) = splitmix64(x XOR s_i) of the 64-bit shingle hashes x, the s_i drawn from
    ``seed``: P[sig_i(A) == sig_i(B)] = Jaccard(A, B). (Linear hashes (a x + b) mod p of 32-bit
    x are too close to monotone in x to act as independent permutations.)"""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.salts = rng.integers(0, 2**64 - 1, num_perm, dtype=np.uint64, endpoint=True)

    def shingles(self, text: str) -> set[str]:
        words = normalize(text).split()
        if len(words) <= self.ngram:
            return {" ".join(words)}
        return {" ".join(words[i:i + self.ngram]) for i in range(len(words) - self.ngram + 1)}

    def signature(self, text: str) -> np.ndarray:
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"),
                                                     digest_size=8).digest(), "little")
                      for s in self.shingles(text)], dtype=np.uint64)
        with np.errstate(over="ignore"):
            return splitmix64(x[:, None] ^ self.salts[None, :]).min(axis=0)  # (num_perm,)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the equally weighted areas of
    false positives (similarity < threshold yet a candidate) and false negatives; a pair is a
    candidate with probability 1 - (1 - s^rows)^bands."""
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0, threshold, 101), np.linspace(threshold, 1, 101)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = _trapezoid((1 - hi ** r) ** b, hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


def dedup_records(texts, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0):
    """Which of ``texts`` (an iterable of (key, text)) to drop: ``(kept_keys, dropped)`` where
    dropped lists ``{"line": key, "duplicate_of": kept key, "kind": "exact"|"near",
    "jaccard": estimate}``. Records are judged in order against the kept ones only."""
    hasher = MinHasher(num_perm, ngram, seed)
    bands, rows = lsh_params(threshold, num_perm)
    tables: list[dict] = [{} for _ in range(bands)]
    exact: dict[str, object] = {}
    sigs: dict[object, np.ndarray] = {}
    kept_order: dict[object, int] = {}
    kept, dropped = [], []
    for key, text in texts:
        digest = _digest(text)
        if digest in exact:
            dropped.append({"line": key, "duplicate_of": exact[digest], "kind": "exact", "jaccard": 1.0})
            continue
        sig = hasher.signature(text)
        band_keys = [sig[i * rows:(i + 1) * rows].tobytes() for i in range(bands)]
        candidates = {c for table, bk in zip(tables, band_keys) for c in table.get(bk, ())}
        best, best_j = None, -1.0
        for c in sorted(candidates, key=lambda c: kept_order[c]):
            j = float(np.mean(sigs[c] == sig))
            if j > best_j:
                best, best_j = c, j
        if best is not None and best_j >= threshold:
            dropped.append({"line": key, "duplicate_of": best, "kind": "near", "jaccard": round(best_j, 4)})
            continue
        exact[digest] = key
        sigs[key] = sig
        kept_order[key] = len(kept)
        kept.append(key)
        for table, bk in zip(tables, band_keys):
            table.setdefault(bk, []).append(key)
    return kept, dropped


def dedup_file(path, out, threshold: float = 0.8, report=None, num_perm: int = 128,
               ngram: int = 5, seed: int = 0, on_invalid=None) -> dict:
    """Drop exact and near duplicates from a JSONL file, keeping first occurrences; writes
    ``out`` (the kept lines byte for byte) and, if asked, a JSON ``report``. Returns it.
    With ``on_invalid``, bad lines are handed to it and left out of ``out``."""
    if not 0.0 < threshold <= 1.0:
        raise UsageError("--threshold", f"must be in (0, 1], got {threshold}")
    if num_perm < 1 or ngram < 1:
        raise UsageError("--num-perm/--ngram", "must be at least 1")
    # the input is read while OUT is written: neither output may be the input file
    for flag, target in (("--out", out), ("--report", report)):
        if target and _same_file(target, path):
            raise UsageError(flag, f"{target} is the input file; write the {flag[2:]} elsewhere")
    if report and out and _same_file(report, out):
        raise UsageError("--report", "is the same file as --out")
    count = {"skipped": 0}
    records = ((line_no, record_text(rec)) for line_no, rec
               in read_jsonl(path, on_invalid=_counted(on_invalid, count)))
    kept, dropped = dedup_records(records, threshold, num_perm, ngram, seed)
    keep = set(kept)
    lines = _raw_lines(path, None if on_invalid is None else _ignore)
    atomic_write(out, (raw if raw.endswith(b"\n") else raw + b"\n"
                       for line_no, raw in lines if line_no in keep))
    bands, rows = lsh_params(threshold, num_perm)
    result = {"input": str(path), "output": str(out), "records": len(kept) + len(dropped),
              "skipped": count["skipped"],
              "kept": len(kept), "dropped_exact": sum(d["kind"] == "exact" for d in dropped),
              "dropped_near": sum(d["kind"] == "near" for d in dropped), "threshold": threshold,
              "num_perm": num_perm, "ngram": ngram, "bands": bands, "rows": rows, "seed": seed,
              "dropped": dropped}
    if report:
        atomic_write(report, [(json.dumps(result, indent=2) + "\n").encode()])
    return result


# -- redact --------------------------------------------------------------------------------
KINDS = ("email", "iban", "card", "ssn", "ip", "phone")  # the order they are applied in
PLACEHOLDER = {k: f"[{k.upper()}]" for k in KINDS}

# (user@host:path is an ssh / git remote, not a mail address)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-]|:\S)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\w-])(?<![A-Z]{2}\d\d )\d(?:[ -]?\d){12,18}(?![\w-]|[ -]\d)")  # not an IBAN's tail
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                   r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?![\w:])")
# a dotted quad after these words is a version or a section number, not an address
# (also the later items of a list: "versions 1.2.3.4 and 1.2.3.5")
_NOT_IP_BEFORE = re.compile(r"(?i)(?:\b(?:version|ver|release|rel|build|firmware|fw|patch|section|sec|"
                            r"chapter|ch|clause|article|art|figure|fig|table|step|rule|oid)s?\.?"
                            r"(?:\s+(?:level|number|no\.?|id))?|§)(?:\s*[\d.]+\s*(?:,|and|or|&))*\s*$")
# phone candidates: digit groups with one separator between them, an optional international
# prefix (+CC or 00CC), area codes in parentheses and the "(0)" of trunk prefixes; after
# "tel:" (RFC 3966 links) too
_PHONE = re.compile(r"(?:(?<![\w+.,:/-])|(?<=tel:))(?<!\d[ .-])(?:\+|\b00)?(?:\(\d{1,5}\)|\d+)"
                    r"(?:(?:[ .-]?\(0?\d{0,4}\)[ .-]?|[ .-])\d+)*(?![\w]|[.,:/-]?\d|[ ]\d)")
# national shapes a reader takes for a phone number without being told: North American
# 3-3-4, and trunk-prefix numbers (0 + area code, then groups: France, UK, Germany, Japan, ...)
_PHONE_NANP = re.compile(r"(?:1-)?[2-9]\d\d-[2-9]\d\d-\d{4}|[2-9]\d\d\.[2-9]\d\d\.\d{4}"
                         r"|\([2-9]\d\d\) ?[2-9]\d\d-\d{4}")
_PHONE_TRUNK = re.compile(r"(?:0[1-9]\d{0,3}|\(0[1-9]\d{0,3}\))(?:[ .-]\d{2,8})+")
_PHONE_WORDS = re.compile(r"(?i)(?:\b(?:tel|fax|sms|call|ring|dial|cell|text|phone|mobile|mobil|tél|"
                          r"telefon|téléphone|handy|portable|cellulare|móvil|whatsapp|hotline)\b)"
                          r"[^\d\n]{0,20}$")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit()):
        return False
    digits = "".join(str(int(ch, 36)) for ch in s[4:] + s[:4])
    return int(digits) % 97 == 1


def _iban_span(text, m):
    candidate = m.group(0)
    while len(candidate.replace(" ", "")) >= 15:  # the regex may swallow a following word: back off
        if iban_ok(candidate):
            return m.start(), m.start() + len(candidate)
        candidate = candidate[:-1].rstrip()
    return None


def _card_groups_ok(number: str) -> bool:
    """Printed as cards are: no separators, or one kind of separator between groups of four
    (the last one shorter), or Amex's 4-6-5 and Diners' 4-6-4."""
    seps = set(re.findall(r"[ -]", number))
    lengths = [len(g) for g in re.split(r"[ -]", number)]
    return not seps or (len(seps) == 1 and (all(n == 4 for n in lengths[:-1]) and lengths[-1] <= 4
                                            or lengths in ([4, 6, 5], [4, 6, 4])))


def _card_span(text, m):
    digits = re.sub(r"\D", "", m.group(0))
    # ISO/IEC 7812: the payment card issuers' industry digits are 2 to 6
    ok = digits[0] in "23456" and luhn_ok(digits) and _card_groups_ok(m.group(0))
    return m.span() if ok else None


def _ipv4_span(text, m):
    return None if _NOT_IP_BEFORE.search(text, max(0, m.start() - 64), m.start()) else m.span()


def _ipv6_span(text, m):
    try:
        ipaddress.IPv6Address(m.group(0))
    except ValueError:
        return None
    return m.span()


def _phone_span(text, m):
    """International numbers (+CC or 00CC) of 8 to 15 digits; national ones in a shape only
    phones have (3-3-4, trunk prefix + area code); any 7 to 15 digits after a phone word."""
    number = m.group(0)
    n = sum(ch.isdigit() for ch in number)
    if _DATE.fullmatch(number):
        return None
    if number.startswith("+") or number.startswith("00"):
        ok = 8 <= n - 2 * number.startswith("00") <= 15
    elif _PHONE_WORDS.search(text, max(0, m.start() - 40), m.start()):
        ok = 7 <= n <= 15
    else:
        ok = bool(_PHONE_NANP.fullmatch(number)) or (bool(_PHONE_TRUNK.fullmatch(number)) and 9 <= n <= 12)
    return m.span() if ok else None


# (kind, pattern, span of a match or None): applied in this order, each on the text with the
# spans found so far blanked, so that a card number is not also taken for a phone number
_RULES = (
    ("email", _EMAIL, lambda text, m: m.span()),
    ("iban", _IBAN, _iban_span),
    ("card", _CARD, _card_span),
    ("ssn", _SSN, lambda text, m: m.span()),
    ("ip", _IPV6, _ipv6_span),
    ("ip", _IPV4, _ipv4_span),
    ("phone", _PHONE, _phone_span),
)


def parse_kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().lower() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        what = f"unknown kind {unknown[0]!r}" if unknown else "no kind given"
        raise UsageError("--kinds", f"{what}; choose from {','.join(KINDS)}")
    return kinds


def _splice(text: str, spans, fill) -> str:
    """``text`` with each of the ordered, disjoint ``spans`` (start, end, ...) replaced by
    ``fill(span)``, in one pass."""
    out, pos = [], 0
    for span in spans:
        out += [text[pos:span[0]], fill(span)]
        pos = span[1]
    return "".join(out) + text[pos:]


def find_pii(text: str, kinds=KINDS) -> list[tuple[int, int, str]]:
    """The PII of ``kinds`` in ``text``: sorted, non-overlapping ``(start, end, kind)``."""
    spans = []
    for kind, pattern, span_of in _RULES:
        if kind not in kinds:
            continue
        found = [s for s in (span_of(text, m) for m in pattern.finditer(text)) if s]
        spans += [(start, end, kind) for start, end in found]
        text = _splice(text, found, lambda s: "\0" * (s[1] - s[0]))  # blanked for the next rules
    return sorted(spans)


def redact_text(text: str, kinds=KINDS) -> tuple[str, dict]:
    """``text`` with the PII of ``kinds`` replaced by placeholders, and counts per kind."""
    spans = find_pii(text, kinds)
    counts = {k: sum(s[2] == k for s in spans) for k in kinds}
    return _splice(text, spans, lambda s: PLACEHOLDER[s[2]]), counts


def redact_value(value, kinds, counts: dict):
    """Every string inside a JSON value redacted (keys are left alone)."""
    if isinstance(value, str):
        new, c = redact_text(value, kinds)
        for k, n in c.items():
            counts[k] += n
        return new
    if isinstance(value, list):
        return [redact_value(v, kinds, counts) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, kinds, counts) for k, v in value.items()}
    return value


def redact_file(path, out, kinds=KINDS, on_invalid=None) -> dict:
    """Redact every string field of every record; unchanged lines are copied byte for byte.
    Returns ``{"records", "changed", "skipped", "counts": {kind: n}}``. A line that is not a
    JSON object is a DataError, or with ``on_invalid`` is handed to it and left out."""
    counts = {k: 0 for k in kinds}
    stats = {"records": 0, "changed": 0, "skipped": 0}
    name = str(path)
    skip = _counted(on_invalid, stats)

    def lines():
        for line_no, raw in _raw_lines(path, skip):
            try:
                record = parse_line(raw, f"{name}:{line_no}")
            except DataError as e:
                if skip is None:
                    raise
                skip(line_no, raw, e)
                continue
            stats["records"] += 1
            before = sum(counts.values())
            new = redact_value(record, kinds, counts)
            if sum(counts.values()) == before:
                yield raw if raw.endswith(b"\n") else raw + b"\n"
            else:
                stats["changed"] += 1
                yield (json.dumps(new, ensure_ascii=False) + "\n").encode("utf-8")

    atomic_write(out, lines())
    return {**stats, "counts": counts}


# -- measuring the redactor ------------------------------------------------------------------
PII_LABELLED = Path(__file__).resolve().parents[1] / "eval" / "pii_labelled.jsonl"


def redaction_scores(path=PII_LABELLED) -> dict:
    """Span-level precision and recall of ``find_pii`` per labelled type on a JSONL file of
    ``{"text", "spans": [{"start", "end", "type"}]}`` (default: the shipped labelled set): a
    found span counts when its start, end and kind equal a labelled span's."""
    gold, found = set(), set()
    for line_no, record in read_jsonl(path, "text"):
        try:
            gold |= {(line_no, s["start"], s["end"], s["type"]) for s in record.get("spans", [])}
        except (KeyError, TypeError):
            raise DataError(f"{path}:{line_no}", 'spans must be [{"start", "end", "type"}, ...]') from None
        found |= {(line_no, *span) for span in find_pii(record["text"])}
    scores = {}
    for kind in sorted({g[3] for g in gold}):
        g = {x for x in gold if x[3] == kind}
        f = {x for x in found if x[3] == kind}
        tp = len(g & f)
        scores[kind] = {"precision": tp / len(f) if f else 1.0, "recall": tp / len(g),
                        "labelled": len(g), "found": len(f), "correct": tp}
    return scores


# -- the command line ----------------------------------------------------------------------
def add_data_parser(subparsers):
    """Add ``data check|stats|dedup|redact`` to an argparse sub-parser set; returns the parser."""
    p = subparsers.add_parser("data", help="check, describe, deduplicate or redact a JSONL data file, "
                                           "or make preference pairs from a model's samples")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    fmt_help = "record format (default: detected from the first record)"

    c = sub.add_parser("check", help="list every problem of a data file (exit 3 if any)")
    c.add_argument("file")
    c.add_argument("--tokenizer", metavar="MODEL_DIR", help="also count tokens with this model's tokenizer")
    c.add_argument("--max-len", type=int, help="flag records longer than this many tokens")
    c.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help=fmt_help)

    s = sub.add_parser("stats", help="counts, lengths, roles and duplicates")
    s.add_argument("file")
    s.add_argument("--tokenizer", metavar="MODEL_DIR")
    s.add_argument("--format", default="auto", choices=("auto",) + FORMATS, help=fmt_help)
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")

    d = sub.add_parser("dedup", help="drop exact and near duplicates (MinHash + LSH)")
    d.add_argument("file")
    d.add_argument("--out", required=True)
    d.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard to call a near duplicate")
    d.add_argument("--report", help="write the dropped records as JSON here")
    d.add_argument("--num-perm", type=int, default=128)
    d.add_argument("--ngram", type=int, default=5, help="words per shingle")
    d.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("redact", help="replace emails, phones, cards, IBANs, IPs, SSNs")
    r.add_argument("file", nargs="?", help="the JSONL file to redact (with --score: a labelled set)")
    r.add_argument("--out", help="the redacted file to write (required unless --score)")
    r.add_argument("--score", action="store_true",
                   help="print the redactor's span-level precision and recall per kind on the shipped "
                        "labelled set (or on FILE, lines {text, spans: [{start, end, type}]})")
    r.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {','.join(KINDS)}")

    for action in (c, s, d, r):
        action.add_argument("--skip-invalid", action="store_true",
                            help="skip malformed lines (counted, and written to the rejects file) "
                                 "instead of refusing the file")
        action.add_argument("--rejects", metavar="PATH",
                            help="where --skip-invalid writes the skipped lines as JSONL "
                                 "(default: FILE's name + .rejects.jsonl, beside --out if given, else beside FILE)")
    from leantune.train.self_pairs import add_pairs_parser

    add_pairs_parser(sub)
    p.set_defaults(func=cmd_data)
    return p


def rejects_path(args) -> Path | None:
    """Where ``--skip-invalid`` writes the skipped lines (None without it); never one of the
    files the action reads or writes."""
    if not args.skip_invalid:
        if args.rejects:
            raise UsageError("--rejects", "goes with --skip-invalid")
        return None
    if not args.file:
        raise UsageError("--skip-invalid", "give the FILE to read")
    src = Path(args.file)
    beside = Path(getattr(args, "out", None) or src).parent
    path = Path(args.rejects) if args.rejects else beside / f"{src.stem}.rejects.jsonl"
    for flag in ("file", "out", "report"):
        other = getattr(args, flag, None)
        if other and _same_file(path, other):
            raise UsageError("--rejects", f"{path} is the {'input' if flag == 'file' else '--' + flag} "
                                          "file; write the rejects elsewhere")
    return path


def _data_check(args, say, on_invalid):
    if args.max_len is not None and args.max_len < 2:
        raise UsageError("--max-len", "must be at least 2")
    tok = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    rep = check_file(args.file, tok, args.max_len, args.format, on_invalid=on_invalid)
    for line in rep.lines():
        say(line)
    if rep.problems:
        raise DataError(args.file, f"{len(rep.problems)} problem(s) found (listed above)")


def _data_stats(args, say, on_invalid):
    tok = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    st = file_stats(args.file, tok, args.format, on_invalid=on_invalid)
    if args.json:
        say(json.dumps(st, indent=2))
    else:
        for line in stats_lines(st):
            say(line)


def _data_dedup(args, say, on_invalid):
    res = dedup_file(args.file, args.out, args.threshold, args.report, args.num_perm,
                     args.ngram, args.seed, on_invalid=on_invalid)
    say(f"kept {res['kept']:,} of {res['records']:,} records; dropped {res['dropped_exact']:,} "
        f"exact and {res['dropped_near']:,} near duplicates (threshold {res['threshold']}, "
        f"{res['bands']} bands x {res['rows']} rows)")
    say(f"wrote {args.out}" + (f" and {args.report}" if args.report else ""))


def _data_redact(args, say, on_invalid):
    if args.score:
        if args.skip_invalid or args.out:
            raise UsageError("--score", "reads a labelled set and writes nothing: drop --out/--skip-invalid")
        path = args.file or PII_LABELLED
        say(f"redactor on {path} (span level: start, end and kind must match)")
        say(f"  {'kind':<6} {'precision':>9} {'recall':>7} {'labelled':>9} {'found':>6} {'correct':>8}")
        for kind, v in redaction_scores(path).items():
            say(f"  {kind:<6} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['labelled']:>9} "
                f"{v['found']:>6} {v['correct']:>8}")
        return
    if not args.file or not args.out:
        raise UsageError("data redact", "give FILE and --out OUT (or --score)")
    kinds = parse_kinds(args.kinds)
    res = redact_file(args.file, args.out, kinds, on_invalid=on_invalid)
    say(f"redacted {res['changed']:,} of {res['records']:,} records: "
        + ", ".join(f"{k} {n:,}" for k, n in res["counts"].items()))
    say(f"wrote {args.out}")


_ACTIONS = {"check": _data_check, "stats": _data_stats, "dedup": _data_dedup, "redact": _data_redact}


def cmd_data(args, out=None):
    """Run ``data ACTION``; with ``--skip-invalid`` the bad lines go to the rejects file
    (written also when the data fails as a whole) and their count is printed last (to stderr
    under ``stats --json``, so that stdout stays JSON)."""
    out = out or sys.stdout
    action = getattr(args, "data_command", None)
    if action == "pairs":  # a config and a model, not a FILE: train/self_pairs.py
        from leantune.train.self_pairs import cmd_pairs

        cmd_pairs(args, lambda line="": print(line, file=out))
        return 0
    if action not in _ACTIONS:
        raise UsageError("data", "give an action: check, stats, dedup, redact or pairs" if action is None
                         else f"unknown action {action!r}")
    path = rejects_path(args)
    rejects = None if path is None else Rejects()
    try:
        _action(action, args.file)(args, lambda line="": print(line, file=out), rejects)
    except DataError:
        _write_rejects(rejects, path, sys.stderr)
        raise
    _write_rejects(rejects, path, sys.stderr if getattr(args, "json", False) else out)
    return 0


def _action(action: str, path):
    """check / stats of a preference file (TRL's prompt / chosen / rejected) are its own."""
    from leantune.train.preference_curation import PAIR_ACTIONS, is_preference_file

    if action in PAIR_ACTIONS and is_preference_file(path):
        return PAIR_ACTIONS[action]
    return _ACTIONS[action]


def _write_rejects(rejects, path, out):
    if rejects is not None:
        rejects.write(path)
        print(f"skipped {len(rejects):,} invalid line(s); wrote them to {path}", file=out)
