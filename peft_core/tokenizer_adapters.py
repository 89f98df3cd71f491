"""Tokenizers other than a ``tokenizer.json``, behind the interface of ``Tokenizer``.

- ``SentencePieceTokenizer``: a sentencepiece model (``tokenizer.model``, a
  ``SentencePieceProcessor``). ``Tokenizer.from_dir`` picks it for a folder that has a
  ``tokenizer.model`` and no ``tokenizer.json``.
- ``TiktokenTokenizer``: a tiktoken ``Encoding``.
- ``CustomTokenizer``: any object with ``encode(text) -> list[int]``, ``decode(ids) -> str``
  and an int ``eos_token_id``, completed to what the data pipeline and trainer use.

``load_tokenizer(source)`` takes any of these (or a folder) and returns the right one. Both
adapters behave as ``Tokenizer`` does: ``encode`` adds no BOS unless asked
(``add_special_tokens=True`` and the config's ``add_bos_token``), special tokens written in
the text are matched whole, the special tokens and chat template come from a
``tokenizer_config.json``-style dict, and ``fingerprint`` (the token cache's key) hashes the
vocabulary, that dict and the template. sentencepiece and tiktoken are imported only when used.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
import re
import sys
from pathlib import Path

from leantune.base import ModelError
from leantune.peft_core.config import read_json_object
from leantune.peft_core.tokenizer import Tokenizer

_NEEDS = "a tokenizer needs encode(text) -> list[int], decode(ids) -> str and an int eos_token_id"


def _fingerprint(kind: str, vocab: bytes, config: dict, template: str) -> str:
    h = hashlib.sha256(kind.encode() + b"\0" + vocab)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(template.encode())
    return h.hexdigest()


def _split_pattern(tokens) -> re.Pattern | None:
    """A regex whose split() keeps ``tokens`` as whole parts (longest first)."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. Its special tokens default to the model's ``<unk>``, ``<s>``,
    ``</s>`` and pad pieces, with ``add_bos_token`` true when it has a BOS piece (as in
    transformers' Llama tokenizer); ``config`` (tokenizer_config.json keys) overrides them.
    Control pieces and ``<unk>`` written in the text are matched whole; the rest is encoded
    by the model, which puts its dummy-prefix space before each stretch of text."""

    def __init__(self, processor, config: dict | None = None, chat_template: str | None = None,
                 where: str = "sentencepiece"):
        sp = processor
        defaults = {"add_bos_token": sp.bos_id() >= 0}
        for name, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                        ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
            if i >= 0:
                defaults[name] = sp.id_to_piece(i)
        config = {**defaults, **(config or {})}
        super().__init__(sp, config, chat_template, where)
        self._specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                          if sp.is_control(i) or sp.is_unknown(i)}
        self._special_pieces = {i: piece for piece, i in self._specials.items()}
        self._pattern = _split_pattern(self._specials)
        self.fingerprint = _fingerprint("sentencepiece", sp.serialized_model_proto(), config,
                                        self.chat_template)

    @classmethod
    def from_dir(cls, model_dir) -> "SentencePieceTokenizer":
        """``tokenizer.model`` of a folder, with its ``tokenizer_config.json`` and
        ``chat_template.jinja`` when they are there."""
        d = Path(model_dir)
        cfg_path, jinja_path = d / "tokenizer_config.json", d / "chat_template.jinja"
        config = read_json_object(cfg_path) if cfg_path.is_file() else {}
        template = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else None
        return cls(_load_sentencepiece(d / "tokenizer.model"), config, template, where=str(d))

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self.backend.piece_to_id(token)
        return i if self.backend.id_to_piece(i) == token else None  # unknown pieces map to <unk>

    @property
    def vocab_size(self) -> int:
        return self.backend.get_piece_size()

    def _encode_text(self, text: str) -> list[int]:
        ids = []
        for part in self._pattern.split(text) if self._pattern else [text]:
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids += self.backend.encode(part, add_bos=False, add_eos=False, enable_sampling=False)
        return ids

    def _special_ids(self) -> dict[str, int]:
        return dict(self._specials)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; special pieces are written as themselves (``<s>``) unless
        skipped, and each stretch between them is decoded by the model. Ids outside the
        vocabulary (padded embedding rows a model may sample) are skipped, as the tokenizers
        library does."""
        parts, run, n = [], [], self.backend.get_piece_size()
        for i in map(int, ids):
            if not 0 <= i < n:
                continue
            if i in self._special_pieces:
                parts.append(self.backend.decode(run))
                run = []
                if not skip_special_tokens:
                    parts.append(self._special_pieces[i])
            else:
                run.append(i)
        parts.append(self.backend.decode(run))
        return "".join(parts)


def _load_sentencepiece(path: Path):
    try:
        import sentencepiece
    except ImportError:
        raise ModelError(str(path), "a sentencepiece model needs the sentencepiece package "
                                    "(pip install sentencepiece)") from None
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as e:  # sentencepiece's one-line status message
        raise ModelError(str(path), f"not a sentencepiece model ({e})") from None


class TiktokenTokenizer(Tokenizer):
    """A tiktoken ``Encoding``. ``config`` holds tokenizer_config.json keys (``bos_token``,
    ``eos_token``, ``pad_token``, ``add_bos_token``, ``chat_template``); ``eos_token``
    defaults to ``<|endoftext|>`` when the encoding has it. Every special token of the
    encoding written in the text is matched whole."""

    def __init__(self, encoding, config: dict | None = None, chat_template: str | None = None,
                 where: str | None = None):
        eot = "<|endoftext|>"
        defaults = {"eos_token": eot} if eot in encoding.special_tokens_set else {}
        config = {**defaults, **(config or {})}
        super().__init__(encoding, config, chat_template, where or f"tiktoken {encoding.name}")
        # the Encoding's constructor arguments; tiktoken has no public getter for the whole table
        ranks = sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1])
        vocab = json.dumps([encoding.name, encoding._pat_str, [[t.hex(), r] for t, r in ranks],
                            sorted(encoding._special_tokens.items())]).encode()
        self.fingerprint = _fingerprint("tiktoken", vocab, config, self.chat_template)
        self._specials = {t: encoding.encode_single_token(t) for t in encoding.special_tokens_set}

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        try:
            return self.backend.encode_single_token(token)
        except KeyError:
            return None

    @property
    def vocab_size(self) -> int:
        return self.backend.n_vocab

    def _encode_text(self, text: str) -> list[int]:
        return self.backend.encode(text, allowed_special="all")

    def _special_ids(self) -> dict[str, int]:
        return dict(self._specials)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ids outside the vocabulary are skipped, as the tokenizers
        library does."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = set(self._specials.values())
            ids = [i for i in ids if i not in special]
        try:
            return self.backend.decode(ids)
        except KeyError:  # tiktoken's error for an unknown id: decode again without them
            return self.backend.decode([i for i in ids if self._known(i)])

    def _known(self, i: int) -> bool:
        try:
            self.backend.decode_single_token_bytes(i)
        except KeyError:
            return False
        return True


class CustomTokenizer:
    """Any object with ``encode(text) -> list[int]``, ``decode(ids) -> str`` and an int
    ``eos_token_id``, given the rest of the interface: ``bos_token_id`` and ``pad_token_id``
    (default: none, and eos), ``eos_token_ids``, a BOS from ``encode(text,
    add_special_tokens=True)`` when the object's ``add_bos_token`` is true (an ``encode`` that
    takes ``add_special_tokens`` itself is passed it instead), and ``decode(ids,
    skip_special_tokens=True)`` dropping those ids. The object's ``apply_chat_template``,
    ``chat_template`` and ``fingerprint`` are used when it has them (without a template the
    data pipeline renders ChatML)."""

    def __init__(self, inner):
        self.inner = inner
        self.bos_token_id = getattr(inner, "bos_token_id", None)
        self.eos_token_id = inner.eos_token_id
        pad = getattr(inner, "pad_token_id", None)
        self.pad_token_id = self.eos_token_id if pad is None else pad
        self.eos_token_ids = frozenset(getattr(inner, "eos_token_ids", None) or {self.eos_token_id})
        self.add_bos_token = bool(getattr(inner, "add_bos_token", False))
        self._passes_flag = _takes_keyword(inner.encode, "add_special_tokens")
        for name in ("apply_chat_template", "chat_template", "fingerprint"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self._passes_flag:
            return [int(i) for i in self.inner.encode(text, add_special_tokens=add_special_tokens)]
        ids = [int(i) for i in self.inner.encode(text)]
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = {self.bos_token_id, self.pad_token_id, *self.eos_token_ids}
            ids = [i for i in ids if i not in special]
        return self.inner.decode(ids)


def _takes_keyword(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some C extensions)
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_duck(obj):
    """TypeError (one line) naming what ``obj`` lacks of a tokenizer."""
    name = type(obj).__name__
    missing = [what for what, ok in (
        ("encode()", callable(getattr(obj, "encode", None))),
        ("decode()", callable(getattr(obj, "decode", None))),
        ("int eos_token_id", isinstance(getattr(obj, "eos_token_id", None), numbers.Integral)),
    ) if not ok]
    if missing:
        raise TypeError(f"load_tokenizer: {name} has no {' and no '.join(missing)} ({_NEEDS})")
    ids = obj.encode("a")
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__") or \
            not all(isinstance(i, numbers.Integral) for i in ids):
        raise TypeError(f"load_tokenizer: {name}.encode('a') returned {type(ids).__name__}, "
                        f"not a list of ints ({_NEEDS})")


def load_tokenizer(source):
    """The tokenizer for the data pipeline and trainer (``train(cfg, tokenizer=...)``) from:
    a model folder (``tokenizer.json``, else a sentencepiece ``tokenizer.model``), a
    sentencepiece model file, a ``SentencePieceProcessor``, a tiktoken ``Encoding``, a
    ``Tokenizer`` (returned as is), or any object with ``encode(text) -> list[int]``,
    ``decode(ids)`` and an int ``eos_token_id`` (wrapped in ``CustomTokenizer``)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return SentencePieceTokenizer(_load_sentencepiece(path), where=str(path))
        return Tokenizer.from_dir(path)
    if isinstance(source, Tokenizer):
        return source
    # an object of a library can only exist once that library is imported
    sentencepiece, tiktoken = sys.modules.get("sentencepiece"), sys.modules.get("tiktoken")
    if sentencepiece is not None and isinstance(source, sentencepiece.SentencePieceProcessor):
        return SentencePieceTokenizer(source)
    if tiktoken is not None and isinstance(source, tiktoken.Encoding):
        return TiktokenTokenizer(source)
    _check_duck(source)
    return CustomTokenizer(source)
