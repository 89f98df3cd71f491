"""Training data: JSON Lines records -> token examples -> packed rows -> deterministic batches.

    read_jsonl(path)            stream and validate records; every bad one is a DataError "FILE:LINE"
    encode_record(record, tok)  one record -> Example(input_ids, labels) with the prompt masked (-100)
    build_examples(path, tok)   the whole file, with a DataSummary and an on-disk token cache
    pack_examples(examples)     best-fit-decreasing bin packing into rows of <= max_len tokens
    BatchPlan(rows, ...)        batch (epoch, index) -> padded LongTensors, order fixed by (seed, epoch)

Record formats (one per file; ``format="auto"`` detects it from the first record and every
later record must agree):

    {"text": "..."}                                  every token supervised, EOS appended
    {"prompt": "...", "completion": "..."}           [BOS] prompt completion EOS; prompt masked
    {"messages": [{"role": ..., "content": ...}]}    the chat template's rendering; the assistant
                                                     turns (all, or the last) supervised, their
                                                     end-of-turn token included
    {"input_ids": [...], "labels": [...]}            pre-tokenized; labels optional (= input_ids)

Labels are aligned with ``input_ids`` (the loss shifts them: position t predicts labels[t+1]),
and ``labels[0]`` is always -100 because no token predicts the first one; so the count of
labels != -100 is exactly the number of tokens the loss is taken on.

Memory: records are streamed (never the whole file in memory) and the tokens of all examples
live in two flat int32 arrays plus an int64 offsets array (8 bytes a token, not the ~70 of
Python lists). With a cache folder the arrays are written to disk while tokenizing and
memory-mapped afterwards, so a tokenized set larger than RAM is paged in as batches need it.
``JsonlIndex`` keeps the byte offset of every record so one record can be re-read without
scanning the file. Packed rows hold example indices, not copies of the tokens.

The tokenizer is anything with ``encode(text, add_special_tokens=False) -> list[int]``,
``decode(ids)`` and the special ids (``TokenizerLike``); messages are rendered with its
``apply_chat_template`` when it has one, else with the built-in ChatML renderer.
``peft_core.tokenizer_adapters.load_tokenizer`` makes one from a sentencepiece model, a
tiktoken ``Encoding`` or any object with ``encode(text)``, ``decode(ids)`` and ``eos_token_id``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import stat
import struct
import sys
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from leantune.base import DataError, sha256_update

IGNORE = -100
FORMATS = ("text", "prompt_completion", "messages", "tokens")
ROLES = ("system", "user", "assistant")
MASK_MODES = ("all_assistant", "last_assistant")
CACHE_VERSION = 1
MAX_TOKEN_ID = 2**31 - 1
_SHOW = 60  # characters of an offending value shown in a message


@runtime_checkable
class TokenizerLike(Protocol):
    """What the data side needs from a tokenizer (``apply_chat_template`` is optional)."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids, skip_special_tokens: bool = False) -> str: ...


# -- records -------------------------------------------------------------------------------
def _short(value) -> str:
    s = repr(value)
    return s if len(s) <= _SHOW else s[:_SHOW - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_line(raw: bytes, where: str):
    """One JSONL line -> its JSON object; DataError for bad UTF-8, bad JSON or a non-object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(where, f"not valid UTF-8 (byte {e.start})") from None
    text = text.lstrip("\ufeff")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(where, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise DataError(where, f"invalid JSON: {e}") from None
    except RecursionError:
        raise DataError(where, "invalid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise DataError(where, f"a record must be a JSON object, got {type(value).__name__}")
    return value


def detect_format(record: dict, where: str) -> str:
    """The format a record's keys announce; DataError when none or several do."""
    found = []
    if "messages" in record:
        found.append("messages")
    if "prompt" in record or "completion" in record:
        found.append("prompt_completion")
    if "input_ids" in record:
        found.append("tokens")
    if "text" in record:
        found.append("text")
    if not found:
        keys = ", ".join(_short(k) for k in sorted(map(str, record))[:6]) or "none"
        raise DataError(where, "record has none of the keys text, prompt/completion, messages, "
                               f"input_ids (it has: {keys})")
    if len(found) > 1:
        raise DataError(where, f"record has keys of several formats ({', '.join(found)}); "
                               "keep one or set data.format")
    return found[0]


def _string_field(record: dict, key: str, where: str, name: str | None = None) -> str:
    name = name or key
    if key not in record:
        raise DataError(where, f"missing field {name!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(where, f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(where, f"field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(where, f"field {name!r} contains an unpaired surrogate") from None
    return value


def _check_messages(messages, where: str, require_assistant_last: bool = True):
    if not isinstance(messages, list):
        raise DataError(where, f"field 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError(where, "field 'messages' is empty")
    expect = "user"
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(where, f"{name} must be an object, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise DataError(where, f"{name}.role must be a string, got {_short(role)}")
        if role not in ROLES:
            raise DataError(where, f"{name}.role {_short(role)} is not one of system, user, assistant")
        _string_field(m, "content", where, f"{name}.content")
        if role == "system":
            if i != 0:
                raise DataError(where, f"{name}: a system message may only come first")
            continue
        if role != expect:
            raise DataError(where, f"{name}: role {role!r} out of order (expected {expect!r}; "
                                   "after an optional system message, user and assistant alternate)")
        expect = "assistant" if role == "user" else "user"
    if require_assistant_last and messages[-1]["role"] != "assistant":
        raise DataError(where, "the last message must be an assistant turn")


def _check_ids(values, key: str, where: str, allow_ignore: bool):
    if not isinstance(values, list):
        raise DataError(where, f"field {key!r} must be a list of token ids, got {type(values).__name__}")
    if not values:
        raise DataError(where, f"field {key!r} is empty")
    for i, v in enumerate(values):
        if type(v) is not int or not (0 <= v <= MAX_TOKEN_ID or (allow_ignore and v == IGNORE)):
            allowed = "-100 or an id in [0, 2^31)" if allow_ignore else "an id in [0, 2^31)"
            raise DataError(where, f"{key}[{i}] = {_short(v)} is not {allowed}")


def check_record(record, fmt: str = "auto", where: str = "record") -> str:
    """Validate one record against ``fmt`` ("auto" detects it); returns the record's format."""
    if not isinstance(record, dict):
        raise DataError(where, f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, where)
    if fmt == "text":
        _string_field(record, "text", where)
    elif fmt == "prompt_completion":
        _string_field(record, "prompt", where)
        _string_field(record, "completion", where)
    elif fmt == "messages":
        if "messages" not in record:
            raise DataError(where, "missing field 'messages'")
        _check_messages(record["messages"], where)
    elif fmt == "tokens":
        if "input_ids" not in record:
            raise DataError(where, "missing field 'input_ids'")
        _check_ids(record["input_ids"], "input_ids", where, allow_ignore=False)
        if record.get("labels") is not None:
            _check_ids(record["labels"], "labels", where, allow_ignore=True)
            if len(record["labels"]) != len(record["input_ids"]):
                raise DataError(where, f"labels has {len(record['labels'])} entries for "
                                       f"{len(record['input_ids'])} input_ids")
    else:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    return fmt


def _check_fmt_arg(fmt: str):
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")


# Bounds on what one record may make the tokenizer see. A line is read at most
# MAX_LINE_BYTES at a time (a 50 MB line is refused, not held); the text a record gives the
# tokenizer (its strings, or the chat template's rendering) may have at most
# max_chars(max_len) characters: the tokens past max_len are cut anyway, and tokenizing a
# huge string whole can abort the process. (Module constants, not config keys: a config key
# would belong to train/config.py.)
MAX_LINE_BYTES = 32 << 20
CHARS_PER_TOKEN = 64  # far more characters than any tokenizer puts in one token
MIN_MAX_CHARS = 1 << 20
DROPPED_LINES_SHOWN = 5  # the summary names the lines of the first few dropped records


def max_chars(max_len: int) -> int:
    """The characters a record may give the tokenizer at ``max_len`` tokens."""
    return max(CHARS_PER_TOKEN * max_len, MIN_MAX_CHARS)


def _open(path, where: str):
    """A data file opened for reading; only a regular file (a FIFO or a device such as
    /dev/zero would block or never end)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(where, "not a regular file (a data file must be a plain file, "
                                   "not a pipe, device or folder)")
        return open(path, "rb")
    except OSError as e:
        raise DataError(where, f"cannot read data file ({e.strerror or e})") from None


def _lines(f, name: str, on_invalid=None):
    """``(line_no, raw bytes)`` of an open file, each line read at most MAX_LINE_BYTES. A
    longer line is a DataError, or with ``on_invalid`` is passed to
    ``on_invalid(line_no, first bytes, error)`` and skipped."""
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE_BYTES:
            error = DataError(f"{name}:{line_no}", f"line longer than {MAX_LINE_BYTES >> 20} MiB "
                                                   "(a record that large is refused)")
            if on_invalid is None:
                raise error
            on_invalid(line_no, raw, error)
            while raw and not raw.endswith(b"\n"):  # the rest of the long line
                raw = f.readline(MAX_LINE_BYTES + 1)
            continue
        yield line_no, raw


def file_format(file_fmt: str | None, first_line: int, rec_fmt: str, line_no: int, where: str):
    """(file_fmt, first_line) after a record of ``rec_fmt`` at ``line_no``: the first record
    sets the file's format and every later one must have it (one format per file)."""
    if file_fmt is None:
        return rec_fmt, line_no
    if rec_fmt != file_fmt:
        raise DataError(where, f"record is {rec_fmt!r} but the file's first record "
                               f"(line {first_line}) is {file_fmt!r}; one format per file")
    return file_fmt, first_line


def read_jsonl(path, fmt: str = "auto", with_format: bool = False, on_invalid=None) -> Iterator:
    """Stream the records of a JSONL file as ``(line_no, record)`` (1-based line numbers),
    each validated against ``fmt``; with ``fmt="auto"`` the first record fixes the format and
    every later one must agree. Blank lines are skipped. Any malformed record raises
    ``DataError("FILE:LINE", what)``, or with ``on_invalid`` is passed to
    ``on_invalid(line_no, raw bytes, error)`` and skipped; a file without (valid) records
    raises ``DataError("FILE", ...)``. ``with_format=True`` yields ``(line_no, record, fmt)``."""
    _check_fmt_arg(fmt)
    name = str(path)
    file_fmt, first_line, n = (None if fmt == "auto" else fmt), 0, 0
    skipped = []  # the lines handed to on_invalid

    def skip(line_no, raw, error):
        skipped.append(line_no)
        on_invalid(line_no, raw, error)

    with _open(path, name) as f:
        for line_no, raw in _lines(f, name, None if on_invalid is None else skip):
            if not raw.strip():
                continue
            where = f"{name}:{line_no}"
            try:
                record = parse_line(raw, where)
                rec_fmt = check_record(record, fmt, where)
                file_fmt, first_line = file_format(file_fmt, first_line, rec_fmt, line_no, where)
            except DataError as e:
                if on_invalid is None:
                    raise
                skip(line_no, raw, e)
                continue
            n += 1
            yield (line_no, record, rec_fmt) if with_format else (line_no, record)
    if n == 0:
        raise DataError(name, f"no valid records ({len(skipped)} invalid line(s) skipped)" if skipped
                        else "no records (the file is empty)")


class JsonlIndex:
    """Byte offsets of the non-blank lines of a JSONL file, so record ``i`` can be re-read
    (seek + one line) without scanning or holding the file: 16 bytes a record."""

    def __init__(self, path, fmt: str = "auto"):
        _check_fmt_arg(fmt)
        self.path, self.fmt = str(path), fmt
        offsets, lines = array("q"), array("q")
        pos = 0
        with _open(path, self.path) as f:
            for line_no, raw in _lines(f, self.path):
                if raw.strip():
                    offsets.append(pos)
                    lines.append(line_no)
                pos += len(raw)
        self.offsets = np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, np.int64)
        self.line_numbers = np.frombuffer(lines, dtype=np.int64) if lines else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int):
        """``(line_no, record)`` of the i-th record, validated against the index's format."""
        line_no = int(self.line_numbers[i])
        where = f"{self.path}:{line_no}"
        with _open(self.path, self.path) as f:
            f.seek(int(self.offsets[i]))
            record = parse_line(f.readline(), where)
        check_record(record, self.fmt, where)
        return line_no, record


# -- chat rendering ------------------------------------------------------------------------
def render_chatml(messages, add_generation_prompt: bool = False) -> str:
    """The ChatML rendering used when a tokenizer has no chat template of its own."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_chat(tok, messages, add_generation_prompt: bool = False, where: str = "record") -> str:
    """``tok.apply_chat_template(messages)`` as text (ChatML when the tokenizer has none);
    a template that fails on the record is a DataError naming the record."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    fn = getattr(tok, "apply_chat_template", None)
    if fn is None or getattr(tok, "chat_template", "") is None:
        return render_chatml(messages, add_generation_prompt)
    try:
        text = fn(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except DataError as e:  # the template's raise_exception(): say which record caused it
        raise DataError(where, f"chat template failed: {_one_line(e.what)}") from e
    except Exception as e:  # a template's raise_exception() or a Jinja error, caused by this record
        raise DataError(where, f"chat template failed: {_one_line(e)}") from e
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


# -- encoding ------------------------------------------------------------------------------
@dataclass
class Example:
    """One training example; ``labels[t]`` is ``input_ids[t]`` where supervised, else -100."""

    input_ids: list
    labels: list
    line: int = 0  # the source line (0 when unknown)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def bos_prefix(tok) -> list[int]:
    """``[bos]`` when the tokenizer adds a BOS token by itself (its post-processor), else []."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    ids = tok.encode("", add_special_tokens=True)
    return [bos] if ids[:1] == [bos] else []


def _eos(tok) -> list[int]:
    eos = getattr(tok, "eos_token_id", None)
    return [] if eos is None else [eos]


def _token_boundary(tok, text: str, char_pos: int, full_ids: list, side: str) -> int:
    """The token index of character ``char_pos`` of ``text`` (tokenized as ``full_ids``), found
    by encoding the prefix ``text[:char_pos]``: where the prefix's tokens stop matching, a token
    straddles the boundary; it counts as inside the span (start: the span begins with it; end:
    the span ends after it), since generating the span means generating that token."""
    if char_pos <= 0:
        return 0
    if char_pos >= len(text):
        return len(full_ids)
    prefix = tok.encode(text[:char_pos], add_special_tokens=False)
    if full_ids[:len(prefix)] == prefix:
        return len(prefix)
    j = 0
    while j < len(prefix) and j < len(full_ids) and prefix[j] == full_ids[j]:
        j += 1
    # The prefix's last pre-token may merge differently at the end of a string ("\n\n" alone,
    # "\n" "\n" before a letter): walk on over full-text tokens that still end at or before
    # char_pos, checking each token's text against the text (a token whose decoding does not
    # match, e.g. part of a UTF-8 character, stops the walk: the conservative answer).
    done = tok.decode(full_ids[:j])
    if text.startswith(done):
        pos = len(done)
        while j < len(full_ids):
            piece = tok.decode(full_ids[j:j + 1])
            if not piece or pos + len(piece) > char_pos or not text.startswith(piece, pos):
                break
            pos, j = pos + len(piece), j + 1
            if pos == char_pos:
                return j
    return j if side == "start" else min(j + 1, len(full_ids))


def _assistant_char_spans(tok, messages, full: str, which: list[int], where: str) -> list[tuple]:
    """Character spans in ``full`` (the rendering of all ``messages``) of the assistant turns at
    indices ``which``: from where the template's generation prompt ends to the end of the
    turn's end-of-turn marker (trailing whitespace after it excluded). Found by rendering
    prefixes of the conversation; falls back to searching the content when a template does not
    render prefixes as prefixes (templates that rewrite earlier turns)."""
    spans, floor = [], 0
    for k in which:
        content = messages[k]["content"]
        head = render_chat(tok, messages[:k], add_generation_prompt=True, where=where)
        through = render_chat(tok, messages[:k + 1], where=where)
        if full.startswith(head) and len(head) >= floor:
            start = len(head)
        else:
            start = full.find(content.strip(), floor)
            if start < 0:
                raise DataError(where, f"the chat template's rendering does not contain assistant "
                                       f"turn messages[{k}]; cannot mask it")
        if full.startswith(through) and len(through.rstrip()) > start:
            end = len(through.rstrip())
        else:
            at = full.find(content.strip(), start)
            if at < 0:
                raise DataError(where, f"cannot find the end of assistant turn messages[{k}] in "
                                       "the chat template's rendering")
            end = at + len(content.strip())
            eos_ids = getattr(tok, "eos_token_ids", None) or _eos(tok)
            for eos_text in (tok.decode([i]) for i in eos_ids):
                if eos_text and full.startswith(eos_text, end):
                    end += len(eos_text)
                    break
        spans.append((start, end))
        floor = end
    return spans


def _check_chars(n_chars: int, cap: int, max_len: int, where: str):
    if n_chars > cap:
        raise DataError(where, f"the record gives the tokenizer {n_chars:,} characters, more than "
                               f"{cap:,} (max({CHARS_PER_TOKEN} x max_len={max_len}, {MIN_MAX_CHARS:,})); "
                               "split or shorten it")


def _encode_messages(record, tok, mask_prompt: bool, mask_mode: str, where: str, max_len: int = 1024):
    messages = record["messages"]
    full = render_chat(tok, messages, where=where)
    _check_chars(len(full), max_chars(max_len), max_len, where)
    ids = tok.encode(full, add_special_tokens=False)
    if not mask_prompt:
        return ids, list(ids)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if mask_mode == "last_assistant":
        turns = turns[-1:]
    labels = [IGNORE] * len(ids)
    for start, end in _assistant_char_spans(tok, messages, full, turns, where):
        t0 = _token_boundary(tok, full, start, ids, "start")
        t1 = _token_boundary(tok, full, end, ids, "end")
        labels[t0:t1] = ids[t0:t1]
    return ids, labels


def encode_record(record, tok, fmt: str = "auto", max_len: int = 1024, mask_prompt: bool = True,
                  mask_mode: str = "all_assistant", *, where: str = "record",
                  on_drop: Callable[[str], None] | None = None) -> Example | None:
    """One record -> an Example, truncated to ``max_len`` tokens (the end is cut).

    text: [BOS] text EOS, all supervised. prompt_completion: [BOS] prompt completion EOS, the
    prompt masked when ``mask_prompt``. messages: the chat template's rendering, the assistant
    turns (``mask_mode`` all_assistant / last_assistant) supervised including their end-of-turn
    token. tokens: as given (labels default to input_ids). ``labels[0]`` is always -100.

    Returns None when no supervised token is left (after truncation); ``on_drop(reason)`` is
    told why. A malformed record raises DataError(where, ...)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    _check_fmt_arg(fmt)
    fmt = check_record(record, fmt, where)
    cap = max_chars(max_len)
    if fmt in ("text", "prompt_completion"):
        n_chars = sum(len(record[k]) for k in (("text",) if fmt == "text" else ("prompt", "completion")))
        _check_chars(n_chars, cap, max_len, where)
    if fmt == "text":
        ids = bos_prefix(tok) + tok.encode(record["text"], add_special_tokens=False) + _eos(tok)
        labels = list(ids)
    elif fmt == "prompt_completion":
        prompt = bos_prefix(tok) + tok.encode(record["prompt"], add_special_tokens=False)
        completion = tok.encode(record["completion"], add_special_tokens=False) + _eos(tok)
        ids = prompt + completion
        labels = ([IGNORE] * len(prompt) if mask_prompt else list(prompt)) + list(completion)
    elif fmt == "messages":
        ids, labels = _encode_messages(record, tok, mask_prompt, mask_mode, where, max_len)
    else:  # tokens
        ids = list(record["input_ids"])
        vocab = getattr(tok, "vocab_size", None)
        if isinstance(vocab, int) and max(ids) >= vocab:
            raise DataError(where, f"input_ids has id {max(ids)}, outside the tokenizer's "
                                   f"vocabulary of {vocab} (tokenized with another tokenizer?)")
        labels = list(record["labels"]) if record.get("labels") is not None else list(ids)
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    if not any(v != IGNORE for v in labels):
        if on_drop:
            on_drop("no supervised tokens")
        return None
    truncated = len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
        if not any(v != IGNORE for v in labels):
            if on_drop:
                on_drop(f"all supervised tokens past max_len={max_len}")
            return None
    return Example(ids, labels, truncated=truncated)


def split_for_generation(record, tok, fmt: str = "auto", where: str = "record") -> tuple[list, str]:
    """For the eval runner: ``(prompt_ids, reference_text)``. prompt_completion: the prompt's
    tokens exactly as training sees them ([BOS] prompt) and the completion; messages: the chat
    template of the turns before the last assistant turn with the generation prompt, and that
    turn's content. text (and pre-tokenized) records have no reference: ValueError."""
    _check_fmt_arg(fmt)
    fmt = check_record(record, fmt, where)
    if fmt == "prompt_completion":
        return bos_prefix(tok) + tok.encode(record["prompt"], add_special_tokens=False), record["completion"]
    if fmt == "messages":
        messages = record["messages"]
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        text = render_chat(tok, messages[:last], add_generation_prompt=True, where=where)
        return tok.encode(text, add_special_tokens=False), messages[last]["content"]
    raise ValueError(f"{where}: a {fmt!r} record has no prompt / reference split; "
                     "eval needs prompt_completion or messages records")


# -- the example set, the summary and the token cache --------------------------------------
class ExampleSet(Sequence):
    """A read-only sequence of Examples stored as flat int32 arrays (possibly memory-mapped):
    example i is ``input_ids[offsets[i]:offsets[i+1]]``. Indexing builds the Example (lists)."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                 lines: np.ndarray | None = None):
        if len(input_ids) != len(labels) or offsets[0] != 0 or offsets[-1] != len(input_ids):
            raise ValueError("inconsistent example arrays")
        self.input_ids, self.labels, self.offsets = input_ids, labels, offsets
        self.lines = lines if lines is not None else np.zeros(len(offsets) - 1, np.int64)
        self.lengths = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range ({n} examples)")
        i %= n
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Example(self.input_ids[a:b].tolist(), self.labels[a:b].tolist(), line=int(self.lines[i]))

    def supervised(self, i: int) -> int:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return int((self.labels[a:b] != IGNORE).sum())

    @classmethod
    def from_examples(cls, examples) -> "ExampleSet":
        ids, labels, offsets, lines = array("i"), array("i"), array("q", [0]), array("q")
        for ex in examples:
            ids.extend(ex.input_ids)
            labels.extend(ex.labels)
            offsets.append(len(ids))
            lines.append(getattr(ex, "line", 0))
        return cls(np.frombuffer(ids, np.int32) if ids else np.zeros(0, np.int32),
                   np.frombuffer(labels, np.int32) if labels else np.zeros(0, np.int32),
                   np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int64) if lines else None)


@dataclass
class DataSummary:
    path: str = ""
    format: str = ""
    max_len: int = 0
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count
    dropped_lines: list = field(default_factory=list)  # the first DROPPED_LINES_SHOWN dropped records' lines
    fully_masked: int = 0  # records with no supervised token at all (also counted in dropped)
    supervised_tokens: int = 0
    total_tokens: int = 0
    cache: str = "off"  # "off" | "hit" | "miss"

    def lines(self) -> list[str]:
        pct = 100.0 * self.supervised_tokens / max(self.total_tokens, 1)
        out = [f"{self.path}: {self.records:,} records ({self.format}) -> {self.examples:,} examples, "
               f"{self.total_tokens:,} tokens, {self.supervised_tokens:,} supervised ({pct:.1f}%)"]
        if self.truncated:
            out.append(f"truncated to max_len={self.max_len}: {self.truncated:,} examples")
        n_drop = sum(self.dropped.values())
        if n_drop:
            why = ", ".join(f"{r}: {c:,}" for r, c in sorted(self.dropped.items()))
            where = ""
            if self.dropped_lines:
                more = " ..." if n_drop > len(self.dropped_lines) else ""
                where = f"; lines {', '.join(map(str, self.dropped_lines))}{more}"
            out.append(f"dropped {n_drop:,} records ({why}{where})")
        if self.cache != "off":
            out.append(f"token cache: {self.cache}")
        return out


class _Int32Sink:
    """Collects int32 values in memory, or streams them into a .npy file when given a path:
    the 128-byte header is written last, once the length is known."""

    HEADER = 128

    def __init__(self, path: Path | None = None):
        self.path, self.n, self.buf = path, 0, array("i")
        self.f = None
        if path is not None:
            self.f = open(path, "wb")
            self.f.write(b"\0" * self.HEADER)

    def extend(self, values):
        self.buf.extend(values)
        if self.f is not None and len(self.buf) >= 1 << 20:
            self._flush()

    def _flush(self):
        if sys.byteorder != "little":
            self.buf.byteswap()
        self.f.write(self.buf.tobytes())
        self.n += len(self.buf)
        self.buf = array("i")

    def finish(self) -> np.ndarray:
        if self.f is None:
            return np.frombuffer(self.buf, np.int32) if self.buf else np.zeros(0, np.int32)
        self._flush()
        header = "{'descr': '<i4', 'fortran_order': False, 'shape': (%d,), }" % self.n
        header = header.ljust(self.HEADER - 10 - 1) + "\n"
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("ascii"))
        self.f.close()
        return np.load(self.path, mmap_mode="r")

    def abort(self):
        if self.f is not None and not self.f.closed:
            self.f.close()


def _file_sha256(path, h):
    with _open(path, str(path)) as f:  # a missing or unreadable file is a DataError naming it
        sha256_update(h, f)
    return h


PROBE = ("Hello, world! 12345 naïve café 日本語 🙂 \n\t  <s></s><|im_start|><|im_end|><|endoftext|>"
         "<|begin_of_text|><|eot_id|> def f(x): return x**2")


def tokenizer_identity(tok) -> str:
    """``tok.fingerprint`` when the tokenizer has one; else a hash of how it encodes a probe
    string, its special ids and its chat template (two tokenizers that agree on all of these
    share cache entries: the probe covers bytes, digits, whitespace and common special tokens)."""
    fp = getattr(tok, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return fp
    parts = [type(tok).__name__, tok.encode(PROBE, add_special_tokens=False),
             tok.encode(PROBE, add_special_tokens=True),
             getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None),
             getattr(tok, "pad_token_id", None), sorted(getattr(tok, "eos_token_ids", None) or [])]
    template = getattr(tok, "chat_template", None)
    parts.append(template if isinstance(template, str) else None)
    probe_chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}]
    try:
        parts.append(render_chat(tok, probe_chat, where="tokenizer probe"))
    except DataError as e:  # a template that refuses a system turn still has an identity
        parts.append(e.what)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cache_key(path, tok, settings: dict) -> str:
    h = hashlib.sha256(f"leantune-tokens-v{CACHE_VERSION}\0".encode())
    _file_sha256(path, h)
    h.update(b"\0" + tokenizer_identity(tok).encode())
    h.update(b"\0" + json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _load_cache(folder: Path):
    """(ExampleSet, DataSummary) from a complete cache folder, or None if unusable."""
    try:
        summary = DataSummary(**json.loads((folder / "summary.json").read_text()))
        ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy", mmap_mode="r")
        offsets = np.load(folder / "offsets.npy")
        lines = np.load(folder / "lines.npy")
        return ExampleSet(ids, labels, offsets, lines), summary
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None


def build_examples(path, tok, fmt: str = "auto", max_len: int = 1024, mask_prompt: bool = True,
                   mask_mode: str = "all_assistant", cache_dir=None) -> tuple[ExampleSet, DataSummary]:
    """Tokenize a JSONL file: ``(examples, summary)``; examples is an ExampleSet (a sequence of
    Example). With ``cache_dir`` the tokens are stored under a key of (file bytes, tokenizer
    identity, settings) and reused, memory-mapped, on the next call. Raises DataError for the
    first malformed record, or when no example survives."""
    name = str(path)
    settings = {"format": fmt, "max_len": max_len, "mask_prompt": bool(mask_prompt),
                "mask_mode": mask_mode}
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"tokens-{cache_key(path, tok, settings)[:32]}"
        if (folder / "summary.json").is_file():
            hit = _load_cache(folder)
            if hit is not None:
                examples, summary = hit
                summary.path, summary.cache = name, "hit"
                return examples, summary
            shutil.rmtree(folder, ignore_errors=True)  # unreadable: rebuild it

    summary = DataSummary(path=name, format=fmt, max_len=max_len, cache="off" if folder is None else "miss")
    tmp = None
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokens-", dir=folder.parent))
    ids_sink = _Int32Sink(tmp / "input_ids.npy" if tmp else None)
    labels_sink = _Int32Sink(tmp / "labels.npy" if tmp else None)
    offsets, lines = array("q", [0]), array("q")
    reasons: dict[str, int] = {}

    dropped_lines: list[int] = []
    current = [0]

    def on_drop(reason):
        reasons[reason] = reasons.get(reason, 0) + 1
        if len(dropped_lines) < DROPPED_LINES_SHOWN:
            dropped_lines.append(current[0])

    try:
        for line_no, record, rec_fmt in read_jsonl(path, fmt, with_format=True):
            summary.records += 1
            summary.format = rec_fmt
            current[0] = line_no
            ex = encode_record(record, tok, rec_fmt, max_len, mask_prompt, mask_mode,
                               where=f"{name}:{line_no}", on_drop=on_drop)
            if ex is None:
                continue
            ex.line = line_no
            ids_sink.extend(ex.input_ids)
            labels_sink.extend(ex.labels)
            offsets.append(offsets[-1] + len(ex.input_ids))
            lines.append(line_no)
            summary.examples += 1
            summary.truncated += ex.truncated
            summary.total_tokens += len(ex.input_ids)
            summary.supervised_tokens += sum(1 for v in ex.labels if v != IGNORE)
        summary.dropped = reasons
        summary.dropped_lines = dropped_lines
        summary.fully_masked = reasons.get("no supervised tokens", 0)
        if summary.examples == 0:
            why = ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items()))
            raise DataError(name, f"no usable examples: all {summary.records} records were dropped ({why})")
        input_ids, labels = ids_sink.finish(), labels_sink.finish()
        offsets_np = np.frombuffer(offsets, np.int64)
        lines_np = np.frombuffer(lines, np.int64)
        if tmp is not None:
            np.save(tmp / "offsets.npy", offsets_np)
            np.save(tmp / "lines.npy", lines_np)
            (tmp / "summary.json").write_text(json.dumps({**summary.__dict__, "cache": "miss"}))
            try:
                os.replace(tmp, folder)
                tmp = None
            except OSError:  # another process finished the same cache entry first
                pass
            hit = _load_cache(folder)
            if hit is not None:
                return hit[0], summary
            raise OSError(f"{folder}: token cache written but unreadable")
        return ExampleSet(input_ids, labels, offsets_np, lines_np), summary
    finally:
        ids_sink.abort()
        labels_sink.abort()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- packing -------------------------------------------------------------------------------
def _row_len(row) -> int:
    return len(row) if hasattr(row, "__len__") else len(row.input_ids)


def _lengths(examples) -> list[int]:
    lengths = getattr(examples, "lengths", None)
    if lengths is not None:
        return [int(v) for v in lengths]
    return [_row_len(ex) for ex in examples]


class PackedRow:
    """Several examples laid end to end (``members`` are indices into ``source``).
    ``position_ids`` restart at 0 for each document; ``doc_ids`` number them 0, 1, ... ."""

    __slots__ = ("source", "members", "doc_lengths")

    def __init__(self, source, members: list[int], doc_lengths: list[int]):
        self.source, self.members, self.doc_lengths = source, members, doc_lengths

    def __len__(self) -> int:
        return sum(self.doc_lengths)

    def _docs(self):
        return [self.source[i] for i in self.members]

    @property
    def input_ids(self) -> list[int]:
        return [t for ex in self._docs() for t in ex.input_ids]

    @property
    def labels(self) -> list[int]:
        return [t for ex in self._docs() for t in ex.labels]

    @property
    def position_ids(self) -> list[int]:
        return [p for n in self.doc_lengths for p in range(n)]

    @property
    def doc_ids(self) -> list[int]:
        return [d for d, n in enumerate(self.doc_lengths) for _ in range(n)]

    def __repr__(self) -> str:
        return f"PackedRow(members={self.members}, doc_lengths={self.doc_lengths})"


class _BestFit:
    """Counts of open bins by remaining capacity (0..cap) in a segment tree, so the best fit
    (the smallest remaining capacity >= n) is found in O(log cap)."""

    def __init__(self, cap: int):
        self.size = 2
        while self.size < cap + 1:
            self.size *= 2
        self.tree = [0] * (2 * self.size)
        self.bins: dict[int, list[int]] = {}

    def add(self, capacity: int, bin_id: int, delta: int = 1):
        if delta > 0:
            self.bins.setdefault(capacity, []).append(bin_id)
        node = capacity + self.size
        while node:
            self.tree[node] += delta
            node //= 2

    def pop_best(self, n: int) -> tuple[int, int] | None:
        """Remove and return (capacity, bin) of the smallest capacity >= n, or None."""
        if n >= self.size:
            return None
        node = n + self.size
        if not self.tree[node]:
            while node > 1:
                if node % 2 == 0 and self.tree[node + 1]:
                    node += 1
                    break
                node //= 2
            else:
                return None
            while node < self.size:
                node = 2 * node if self.tree[2 * node] else 2 * node + 1
        capacity = node - self.size
        bin_id = self.bins[capacity].pop()
        self.add(capacity, bin_id, -1)
        return capacity, bin_id


def pack_examples(examples, max_len: int, seed: int = 0) -> list[PackedRow]:
    """Best-fit-decreasing bin packing: examples longest first (equal lengths in an order
    fixed by ``seed``), each into the open row with the least room that still fits it, else a
    new row. Every example lands in exactly one row; no row exceeds ``max_len`` tokens."""
    lengths = _lengths(examples)
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}")
        if n == 0:
            raise ValueError(f"example {i} is empty")
    tiebreak = list(range(len(lengths)))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    rows: list[list[int]] = []
    fit = _BestFit(max_len)
    for i in order:
        n = lengths[i]
        best = fit.pop_best(n)
        if best is None:
            rows.append([i])
            fit.add(max_len - n, len(rows) - 1)
        else:
            capacity, b = best
            rows[b].append(i)
            fit.add(capacity - n, b)
    return [PackedRow(examples, members, [lengths[i] for i in members]) for members in rows]


# -- batching ------------------------------------------------------------------------------
class BatchPlan:
    """Batches of rows (Examples or PackedRows) for any (epoch, index), right-padded.

    The order of an epoch depends only on (seed, epoch): ``random.Random(seed * 1000003 +
    epoch)`` shuffles the rows; with ``group_by_length`` the shuffled rows are cut into
    mega-batches of 50 * batch_size and each is sorted by length (longest first) before being
    cut into batches, so rows of a batch have similar lengths. Nothing is dropped: the last
    batch of an epoch may be smaller. A resumed run asks for (epoch, index) directly.
    """

    MEGA = 50

    def __init__(self, rows, batch_size: int, seed: int = 0, pad_token_id: int | None = 0,
                 shuffle: bool = True, group_by_length: bool = False, pad_multiple: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(rows) == 0:
            raise ValueError("no rows to batch")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.pad_multiple = max(1, int(pad_multiple))
        self.lengths = _lengths(rows)
        self._cached_epoch, self._cached_order = None, None

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The row indices of the epoch, in batch order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._cached_epoch == epoch:
            return self._cached_order
        idx = list(range(len(self.rows)))
        if self.shuffle:
            rng = random.Random(self.seed * 1000003 + epoch)
            rng.shuffle(idx)
        if self.group_by_length:
            mega = self.MEGA * self.batch_size
            idx = [i for s in range(0, len(idx), mega)
                   for i in sorted(idx[s:s + mega], key=lambda i: -self.lengths[i])]
        self._cached_epoch, self._cached_order = epoch, idx
        return idx

    def batch_rows(self, epoch: int, index: int) -> list[int]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches an epoch)")
        return self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

    def batch(self, epoch: int, index: int) -> dict:
        """``input_ids, labels, position_ids, doc_ids, attention_mask``: LongTensors (B, T),
        T = the longest row rounded up to ``pad_multiple``; padding has label -100, doc id -1,
        position 0, mask 0."""
        rows = [self.rows[i] for i in self.batch_rows(epoch, index)]
        T = -(-max(_row_len(r) for r in rows) // self.pad_multiple) * self.pad_multiple
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        doc_ids = torch.full((B, T), -1, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, row in enumerate(rows):
            n = _row_len(row)
            input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
            labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
            pos = getattr(row, "position_ids", None)
            position_ids[b, :n] = torch.tensor(pos, dtype=torch.long) if pos is not None else torch.arange(n)
            docs = getattr(row, "doc_ids", None)
            doc_ids[b, :n] = torch.tensor(docs, dtype=torch.long) if docs is not None else 0
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "doc_ids": doc_ids, "attention_mask": attention_mask}

    def batch_tokens(self, epoch: int, index: int) -> int:
        """Supervised tokens (labels != -100) in batch (epoch, index)."""
        total = 0
        for i in self.batch_rows(epoch, index):
            row = self.rows[i]
            total += sum(1 for v in row.labels if v != IGNORE)
        return total

    def iter_epoch(self, epoch: int) -> Iterator[dict]:
        for index in range(len(self)):
            yield self.batch(epoch, index)
