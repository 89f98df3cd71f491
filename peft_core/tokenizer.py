"""The tokenizer of a Hugging Face model folder, and its chat template.

``Tokenizer.from_dir(model_dir)`` reads

- ``tokenizer.json``: the ``tokenizers`` pipeline (normalizer, pre-tokenizer, model,
  added tokens, decoder). Its post-processor is not used: BOS / EOS are added here, from
- ``tokenizer_config.json``: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``
  (strings, or ``{"content": ...}`` objects in older files), ``add_bos_token``,
  ``add_eos_token``, ``chat_template`` (a string, or a list of ``{"name", "template"}``),
- ``chat_template.jinja`` beside them, which wins over the config's template when present.

A folder with a sentencepiece ``tokenizer.model`` and no ``tokenizer.json`` gets a
``SentencePieceTokenizer`` (``peft_core.tokenizer_adapters``) instead, with the same config
and template files, both optional there.

Chat templates render in jinja2's sandbox with the globals and filters transformers gives
them (``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, the
``loopcontrols`` extension, ``{% generation %}`` blocks), so that ``apply_chat_template``
returns the same string as transformers' ``apply_chat_template``. A model without a
template gets ChatML (``DEFAULT_CHAT_TEMPLATE``).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from leantune.peft_core.config import read_json_object
from leantune.base import DataError, ModelError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(self, backend: _HFTokenizer, config: dict, chat_template: str | None = None,
                 where: str = "tokenizer"):
        self.backend = backend
        self.where = where
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.special_tokens = {}  # {"bos_token": "<s>", ...}, the names the template sees
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[name] = value
        self.chat_template = (chat_template or _config_template(config.get("chat_template"))
                              or DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        d = Path(model_dir)
        tok_path, cfg_path, jinja_path = (d / "tokenizer.json", d / "tokenizer_config.json",
                                          d / "chat_template.jinja")
        if not tok_path.is_file() and (d / "tokenizer.model").is_file():
            from leantune.peft_core.tokenizer_adapters import SentencePieceTokenizer

            return SentencePieceTokenizer.from_dir(d)
        for path in (tok_path, cfg_path):
            if not path.is_file():
                raise ModelError(str(path), "missing (a model folder needs tokenizer.json and "
                                            "tokenizer_config.json, or a sentencepiece "
                                            "tokenizer.model)")
        try:
            backend = _HFTokenizer.from_file(str(tok_path))
        except Exception as e:  # the tokenizers library raises a bare Exception for bad files
            raise ModelError(str(tok_path), f"not a valid tokenizer.json ({e})") from None
        config = read_json_object(cfg_path)
        template = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else None
        tok = cls(backend, config, template, where=str(d))
        h = hashlib.sha256(tok_path.read_bytes())
        h.update(cfg_path.read_bytes())
        h.update((template or "").encode())
        tok.fingerprint = h.hexdigest()  # keys the data pipeline's token cache
        _check_model_vocab(tok, d / "config.json")
        return tok

    # -- ids ------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        """The pad token, else the eos token."""
        pad = self.token_to_id(self.special_tokens.get("pad_token"))
        return self.eos_token_id if pad is None else pad

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, and the token that closes an assistant turn in the
        chat template (``<|im_end|>``, ``<|eot_id|>``, ...) when that is another token."""
        ids = {self.eos_token_id} if self.eos_token_id is not None else set()
        turn_end = self._turn_end_token()
        if turn_end is not None:
            ids.add(turn_end)
        return frozenset(ids)

    def _turn_end_token(self) -> int | None:
        """The special token right after an assistant message in the rendered template."""
        marker = "\u2063leantune-turn\u2063"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": marker}])
        except (DataError, TypeError, ValueError):
            return None  # the template rejects this conversation: no turn-end token then
        rest = text[text.rfind(marker) + len(marker):] if marker in text else ""
        specials = self._special_ids()
        for token in sorted(specials, key=len, reverse=True):
            if rest.lstrip().startswith(token):
                return specials[token]
        return None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- text -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS / EOS where the config's
        ``add_bos_token`` / ``add_eos_token`` ask for them. Special tokens written in the
        text (``<|im_start|>``) are always matched whole."""
        ids = self._encode_text(text)
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- backend hooks: tokenizer_adapters overrides these, token_to_id, vocab_size, decode --
    def _encode_text(self, text: str) -> list[int]:
        """The ids of ``text``: special tokens in it matched whole, nothing added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def _special_ids(self) -> dict[str, int]:
        """The vocabulary's special tokens, text -> id."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # -- chat -----------------------------------------------------------------------------
    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        return compile_chat_template(self.chat_template, self.where)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs):
        """Render ``messages`` (``[{"role", "content"}, ...]``) with the chat template, as
        transformers does: the template also sees the special tokens by name
        (``bos_token``, ...) and ``kwargs``. With ``tokenize``, the token ids of the text
        (special tokens in it matched whole, no BOS added: the template writes its own).
        A conversation the template rejects (``raise_exception``) is a ``DataError``."""
        try:
            text = self._compiled_template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                tools=kwargs.pop("tools", None), documents=kwargs.pop("documents", None),
                **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise DataError(f"chat template of {self.where}", str(e)) from None
        except (ArithmeticError, MemoryError, RecursionError, TypeError, ValueError) as e:
            # the sandbox blocks attribute access, not work: a template that overflows or
            # exhausts memory is the template's fault, reported as one line
            raise DataError(f"chat template of {self.where}", f"{type(e).__name__}: {e}") from None
        if len(text) > MAX_TEMPLATE_CHARS:
            raise DataError(f"chat template of {self.where}", f"renders {len(text):,} characters "
                                                             f"(more than {MAX_TEMPLATE_CHARS:,})")
        return self.encode(text) if tokenize else text


def _check_model_vocab(tok: "Tokenizer", cfg_path: Path):
    """A tokenizer whose ids reach past the embedding rows of the model beside it (config.json's
    ``vocab_size``) is a ModelError here, before an id reaches the embedding. A config.json
    that cannot be read is left to the model loader, which names its problem."""
    try:
        n = json.loads(cfg_path.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, RecursionError, AttributeError):
        return
    if isinstance(n, int) and not isinstance(n, bool) and 0 < n < tok.vocab_size:
        raise ModelError(str(cfg_path), f"vocab_size {n} is smaller than the tokenizer's {tok.vocab_size} "
                                        "tokens (a tokenizer for another model?)")


def _config_template(value) -> str | None:
    """``chat_template`` of tokenizer_config.json: a string, or named templates (the
    ``default`` one is used)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers'
    assistant masks; rendering keeps its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


MAX_TEMPLATE_CHARS = 1 << 24  # a rendered chat template, or a string built inside one (16 Mi characters)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with ``*`` and ``**`` bounded: ``'ab' * 10**8`` or ``9 ** 10**9`` is a
    SecurityError (a TemplateError, so a DataError) instead of gigabytes or minutes of work."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                    raise jinja2.exceptions.SecurityError(
                        f"the template builds a sequence of {len(seq) * n:,} items (more than {MAX_TEMPLATE_CHARS:,})")
        if operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 4096:
            raise jinja2.exceptions.SecurityError(f"the template raises an integer to the power {right}")
        return super().call_binop(context, operator, left, right)


def compile_chat_template(template: str, where: str = "chat_template") -> jinja2.Template:
    """A chat template compiled in the sandboxed environment transformers uses (with ``*``
    and ``**`` bounded, see ``_BoundedSandbox``)."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelError(where, f"chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


class StreamDecoder:
    """Incremental detokenization for streaming: ``push(id)`` returns the text the new token
    completes, holding back bytes of a UTF-8 character split across tokens (which decode as
    U+FFFD until the rest arrives); ``flush()`` returns whatever is still held.

    Only a short window of ids is re-decoded at each step: the ids since the last emitted
    text, plus the ones before them as context (decoders such as sentencepiece's strip a
    leading space at the start of a sequence)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already emitted and serve as context
        self.read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
