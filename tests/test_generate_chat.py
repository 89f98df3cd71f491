"""``generate --system`` and ``generate --interactive`` (issue 21, item 2), on a tiny random
model with a byte tokenizer and a ChatML template."""
from __future__ import annotations

import io

import pytest
import torch

from leantune import cli
from leantune.peft_core.checkpoint import load_model
from leantune.peft_core.generate import generate
from leantune.peft_core.tokenizer import Tokenizer
from tests.helpers import tiny_model_dir

N = 6  # new tokens per reply


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("chat") / "model", seed=3)


def run(monkeypatch, argv, stdin=""):
    """main(argv) with ``stdin`` as standard input; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def direct_reply(model_dir, messages) -> str:
    """The greedy reply to ``messages`` computed without the CLI."""
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    new = generate(model, [ids], N, eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)[0]
    return tok.decode([t for t in new if t not in tok.eos_token_ids], skip_special_tokens=True)


def test_system_prompt_goes_through_the_chat_template(model_dir, monkeypatch):
    seen = []
    real = generate

    def spy(model, prompts, *a, **kw):
        seen.append(list(prompts[0]))
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr("leantune.peft_core.generate.generate", spy)
    argv = ["generate", str(model_dir), "--chat", "hello", "--max-new-tokens", str(N)]
    code, plain, _ = run(monkeypatch, argv)
    assert code == 0
    code, with_system, err = run(monkeypatch, argv + ["--system", "You answer in French."])
    assert code == 0, err
    tok = Tokenizer.from_dir(model_dir)
    assert tok.decode(seen[0]) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(seen[1]) == ("<|im_start|>system\nYou answer in French.<|im_end|>\n"
                                   "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    sys_msg = {"role": "system", "content": "You answer in French."}
    assert with_system == direct_reply(model_dir, [sys_msg, {"role": "user", "content": "hello"}]) + "\n"


def test_interactive_keeps_the_conversation(model_dir, monkeypatch):
    argv = ["generate", str(model_dir), "--interactive", "--system", "Be brief.",
            "--max-new-tokens", str(N)]
    code, out, err = run(monkeypatch, argv, stdin="hi there\n\nand then?\n/exit\nnever read\n")
    assert code == 0, err
    system = {"role": "system", "content": "Be brief."}
    first = direct_reply(model_dir, [system, {"role": "user", "content": "hi there"}])
    second = direct_reply(model_dir, [system, {"role": "user", "content": "hi there"},
                                      {"role": "assistant", "content": first},
                                      {"role": "user", "content": "and then?"}])
    alone = direct_reply(model_dir, [system, {"role": "user", "content": "and then?"}])
    assert out == f"{first}\n{second}\n"
    assert second != alone  # the history changed the second prompt


def test_interactive_first_turn_equals_chat(model_dir, monkeypatch):
    base = ["generate", str(model_dir), "--max-new-tokens", str(N)]
    code, chat, _ = run(monkeypatch, base + ["--chat", "what is 2+2?"])
    assert code == 0
    code, inter, err = run(monkeypatch, base + ["--interactive"], stdin="what is 2+2?")  # EOF ends it
    assert code == 0, err
    assert inter == chat and chat.strip()


@pytest.mark.parametrize("extra, needle", [
    (["--prompt", "x", "--interactive"], "exactly one of"),
    (["--prompt", "x", "--system", "s"], "--system"),
    ([], "exactly one of"),
])
def test_generate_mode_mistakes_are_usage_errors(model_dir, monkeypatch, extra, needle):
    code, _, err = run(monkeypatch, ["generate", str(model_dir), *extra])
    assert code == 2 and needle in err and err.count("\n") == 1
