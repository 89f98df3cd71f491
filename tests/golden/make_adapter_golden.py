"""Make the golden PEFT adapters that tests/test_adapters_peft.py checks without PEFT.

    python tests/golden/make_adapter_golden.py      (needs transformers and peft)

Writes, next to this script:
- adapter_base/: a tiny seeded Llama (hidden 32, 2 layers, vocab 61) saved by leantune;
- adapter_<case>/: adapters made and saved by PEFT on that model as transformers loads it,
  with random non-zero B (``init_lora_weights=False``);
- adapter_logits.safetensors: the input ids, the base logits and each adapter's logits, all
  computed by transformers + PEFT (fp32).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from leantune.peft_core.checkpoint import save_model  # noqa: E402
from leantune.peft_core.safetensors_io import write_safetensors  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

OUT = Path(__file__).parent
CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora_patterns": dict(r=4, lora_alpha=6, target_modules="all-linear", use_rslora=True,
                            rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                            alpha_pattern={"q_proj": 3, "gate_proj": 12}),
    "dora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "regex_layers": dict(r=3, lora_alpha=7, target_modules=r".*\.1\.self_attn\.(q|o)_proj"),
}


def main():
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    base_dir = OUT / "adapter_base"
    shutil.rmtree(base_dir, ignore_errors=True)
    model = tiny_model("llama", seed=21, hidden_size=32, intermediate_size=48, vocab_size=61)
    save_model(model, base_dir)
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(22))
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = {"input_ids": ids, "base": hf(ids).logits}
    for i, (name, kw) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        pm = get_peft_model(hf, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kw)).eval()
        with torch.no_grad():
            out[name] = pm(ids).logits
        folder = OUT / f"adapter_{name}"
        shutil.rmtree(folder, ignore_errors=True)
        pm.save_pretrained(folder)
        (folder / "README.md").unlink(missing_ok=True)
    write_safetensors(out, OUT / "adapter_logits.safetensors",
                      metadata={"peft": peft.__version__, "transformers": transformers.__version__})
    print(f"wrote {len(CASES)} adapters (peft {peft.__version__}) to {OUT}")


if __name__ == "__main__":
    main()
