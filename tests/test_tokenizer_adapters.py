"""peft_core.tokenizer_adapters: sentencepiece and tiktoken adapters, duck-typed tokenizers.

The sentencepiece model is trained here on a few lines (vocab 150) and the tiktoken Encoding
is built from an explicit table (256 bytes + a few merges); nothing is downloaded. Each
adapter is checked against its library called directly, and through train.data's loader.
"""
from __future__ import annotations

import io
import json
import sys

import pytest

from leantune.peft_core.checkpoint import copy_tokenizer_files
from leantune.base import ModelError
from leantune.peft_core.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from leantune.peft_core.tokenizer_adapters import CustomTokenizer, TiktokenTokenizer, load_tokenizer
from leantune.train.data import IGNORE, TokenizerLike, build_examples, encode_record, tokenizer_identity

CORPUS = ["Hello, world! This is a tiny corpus for a tiny tokenizer.",
          "The quick brown fox jumps over the lazy dog.",
          "[INST] What is two plus two? [/INST] It is four.",
          "Questions and answers: 1, 2, 3; yes or no?"]
TEXTS = ["Hello world.", "What is two plus two?", "the lazy dog jumps, 123"]
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                   "[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}"
                   "{% endif %}{% endfor %}")
QA = {"prompt": "What is two plus two?", "completion": "It is four."}
CHAT = {"messages": [{"role": "user", "content": "What is two plus two?"},
                     {"role": "assistant", "content": "It is four."}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def supervised(ex):
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]


# -- sentencepiece ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_bytes():
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf,
                                   vocab_size=150, model_type="bpe", minloglevel=2)
    return buf.getvalue()


@pytest.fixture
def sp(sp_bytes):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=sp_bytes)


def sp_dir(path, sp_bytes, config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(sp_bytes)
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_sentencepiece_matches_library(sp):
    tok = load_tokenizer(sp)
    assert isinstance(tok, TokenizerLike)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert tok.pad_token_id == sp.eos_id()  # the model has no pad piece
    assert tok.eos_token_ids == {sp.eos_id()} and tok.vocab_size == sp.get_piece_size() == 150
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text)  # no BOS unless asked
        assert tok.encode(text, add_special_tokens=True) == [sp.bos_id()] + ids
        assert tok.decode(ids) == sp.decode(ids) == text
    # control pieces written in the text are matched whole; decode writes them back
    ids = tok.encode("<s>Hello world.</s>")
    assert ids == [sp.bos_id()] + sp.encode("Hello world.") + [sp.eos_id()]
    assert tok.decode(ids) == "<s>Hello world.</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world."
    assert tok.decode([-1, *ids[1:3], 150, 10**6]) == sp.decode(ids[1:3])  # unknown ids skipped
    assert tok.token_to_id("</s>") == sp.eos_id() and tok.token_to_id("no such piece") is None


def test_sentencepiece_folder_and_identity(tmp_path, sp, sp_bytes):
    tok = Tokenizer.from_dir(sp_dir(tmp_path / "plain", sp_bytes))
    assert type(tok).__name__ == "SentencePieceTokenizer" and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    # the same model and settings have the same identity however they are loaded
    assert tokenizer_identity(tok) == tokenizer_identity(load_tokenizer(sp)) == \
        tokenizer_identity(load_tokenizer(tmp_path / "plain" / "tokenizer.model"))
    cfg = {"chat_template": LLAMA2_TEMPLATE, "add_bos_token": False}
    chat = load_tokenizer(sp_dir(tmp_path / "chat", sp_bytes, cfg))
    assert chat.chat_template == LLAMA2_TEMPLATE
    assert chat.encode("Hello", add_special_tokens=True) == sp.encode("Hello")
    assert tokenizer_identity(chat) != tokenizer_identity(tok)
    (tmp_path / "merged").mkdir()
    copy_tokenizer_files(tmp_path / "chat", tmp_path / "merged")  # what merge / export write
    assert tokenizer_identity(Tokenizer.from_dir(tmp_path / "merged")) == tokenizer_identity(chat)
    # tokenizer.json wins over tokenizer.model: existing folders load as before
    from tests.helpers import byte_tokenizer_files

    both = sp_dir(byte_tokenizer_files(tmp_path / "both"), sp_bytes)
    assert type(Tokenizer.from_dir(both)) is Tokenizer


def test_sentencepiece_through_the_loader(tmp_path, sp, sp_bytes):
    bos, eos = sp.bos_id(), sp.eos_id()
    tok = load_tokenizer(sp_dir(tmp_path / "m", sp_bytes, {"chat_template": LLAMA2_TEMPLATE}))
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    cache = tmp_path / "cache"
    examples, summary = build_examples(path, tok, max_len=64, cache_dir=cache)
    for ex, text in zip(examples, TEXTS):
        assert ex.input_ids == [bos] + sp.encode(text) + [eos]
        assert ex.labels == [IGNORE] + ex.input_ids[1:]
    _, again = build_examples(path, load_tokenizer(tmp_path / "m"), max_len=64, cache_dir=cache)
    assert (summary.cache, again.cache) == ("miss", "hit")

    ex = encode_record(QA, tok, max_len=64)
    prompt = [bos] + sp.encode(QA["prompt"])
    assert ex.input_ids == prompt + sp.encode(QA["completion"]) + [eos]
    assert ex.labels == [IGNORE] * len(prompt) + ex.input_ids[len(prompt):]

    # "<s>[INST] q [/INST] a </s>": control tokens matched whole, the rest one library call
    ex = encode_record(CHAT, tok, max_len=64)
    rendered = "[INST] What is two plus two? [/INST] It is four. "
    assert ex.input_ids == [bos] + sp.encode(rendered) + [eos]
    answer = sp.encode("It is four.") + [eos]
    assert ex.labels == [IGNORE] * (len(ex.input_ids) - len(answer)) + answer


# -- tiktoken --------------------------------------------------------------------------------
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" th", b" thing", b"is", b" is",
          b"ou", b" f", b" fou", b" four"]
SPECIALS = {"<|endoftext|>": 300, "<|im_start|>": 301, "<|im_end|>": 302}


def tiktoken_encoding(merges=MERGES, name="toy"):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        ranks[m] = len(ranks)
    return tiktoken.Encoding(name, pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens=SPECIALS)


def test_tiktoken_matches_library():
    enc = tiktoken_encoding()
    tok = load_tokenizer(enc)
    assert isinstance(tok, TokenizerLike)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, 300, 300)
    assert tok.vocab_size == 303
    assert tok.eos_token_ids == {300, 302}  # <|im_end|> closes a turn of the (ChatML) template
    for text in TEXTS + ["the thing is four 🙂 naïve\n\n  x"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == enc.encode(text) and tok.decode(ids) == enc.decode(ids) == text
    ids = tok.encode("<|im_start|>the thing<|im_end|>")
    assert ids == [301] + enc.encode("the thing") + [302]
    assert tok.decode(ids) == "<|im_start|>the thing<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "the thing"
    assert tok.decode([*ids, 299, 400]) == tok.decode(ids)  # unknown ids (299 is a gap) skipped
    with_bos = TiktokenTokenizer(enc, {"bos_token": "<|im_start|>", "add_bos_token": True})
    assert with_bos.encode("the", add_special_tokens=True) == [301] + enc.encode("the")
    # identity: the same table and settings agree; another table or setting differs
    assert tokenizer_identity(tok) == tokenizer_identity(load_tokenizer(tiktoken_encoding()))
    assert tokenizer_identity(tok) != tokenizer_identity(load_tokenizer(tiktoken_encoding(MERGES[:-1])))
    assert tokenizer_identity(tok) != tokenizer_identity(with_bos)


def test_tiktoken_through_the_loader(tmp_path):
    enc = tiktoken_encoding()
    tok = load_tokenizer(enc)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    examples, _ = build_examples(path, tok, max_len=64)
    assert [ex.input_ids for ex in examples] == [enc.encode(t) + [300] for t in TEXTS]
    ex = encode_record(QA, tok, max_len=64)
    prompt = enc.encode(QA["prompt"])
    assert ex.input_ids == prompt + enc.encode(QA["completion"]) + [300]
    assert ex.labels == [IGNORE] * len(prompt) + ex.input_ids[len(prompt):]
    ex = encode_record(CHAT, tok, max_len=64)
    rendered = ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                "<|im_start|>assistant\nIt is four.<|im_end|>\n")
    assert ex.input_ids == enc.encode(rendered, allowed_special="all")
    answer = enc.encode("It is four.") + [302]
    assert ex.labels == [IGNORE] * (len(ex.input_ids) - len(answer) - 1) + answer + [IGNORE]
    pretokenized = {"input_ids": [1, 2, 302], "labels": [IGNORE, 2, 302]}
    assert encode_record(pretokenized, tok).labels == [IGNORE, 2, 302]


# -- any object with encode / decode / eos_token_id ------------------------------------------
class Bytes:
    """The least a tokenizer needs: UTF-8 bytes 0-255, EOS 256, BOS 257."""

    eos_token_id = 256
    bos_token_id = 257
    add_bos_token = True

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_duck_typed_tokenizer_through_the_loader(tmp_path):
    tok = load_tokenizer(Bytes())
    assert isinstance(tok, CustomTokenizer) and isinstance(tok, TokenizerLike)
    assert (tok.pad_token_id, tok.eos_token_ids) == (256, {256})
    assert tok.decode([257, 104, 105, 256], skip_special_tokens=True) == "hi"
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    (ex,), _ = build_examples(path, tok, max_len=256)
    rendered = ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n"  # no template: ChatML
                "<|im_start|>assistant\nIt is four.<|im_end|>\n")
    assert ex.input_ids == list(rendered.encode())
    assert bytes(supervised(ex)).decode() == "It is four.<|im_end|>"
    ex = encode_record({"text": "hé"}, tok)
    assert ex.input_ids == [257, 104, 195, 169, 256] and ex.labels == [IGNORE, 104, 195, 169, 256]

    class OwnSpecials(Bytes):  # an encode that takes add_special_tokens is left to add them
        def encode(self, text, add_special_tokens=False):
            return [258] * add_special_tokens + super().encode(text)

    assert load_tokenizer(OwnSpecials()).encode("a", add_special_tokens=True) == [258, 97]
    assert tokenizer_identity(load_tokenizer(Bytes())) == tokenizer_identity(tok)
    assert tokenizer_identity(load_tokenizer(OwnSpecials())) != tokenizer_identity(tok)


def test_load_tokenizer_errors(tmp_path):
    class NoDecode:
        eos_token_id = 0

        def encode(self, text):
            return [1]

    with pytest.raises(TypeError, match=r"^load_tokenizer: NoDecode has no decode\(\) \("):
        load_tokenizer(NoDecode())
    with pytest.raises(TypeError, match="has no encode.. and no decode.. and no int eos_token_id"):
        load_tokenizer(object())

    class StrIds(Bytes):
        def encode(self, text):
            return text

    with pytest.raises(TypeError, match=r"StrIds.encode\('a'\) returned str, not a list of ints"):
        load_tokenizer(StrIds())
    with pytest.raises(ModelError, match="or a sentencepiece tokenizer.model"):
        load_tokenizer(tmp_path)


def test_not_a_sentencepiece_model(tmp_path):
    pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(ModelError, match="tokenizer.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_sentencepiece_not_installed(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.model").write_text("any")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"tokenizer.model: .*\(pip install sentencepiece\)"):
        Tokenizer.from_dir(tmp_path)
