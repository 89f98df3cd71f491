"""Adapters on the real SmolLM2-135M: PEFT-saved adapters (LoRA, rsLoRA with rank/alpha
patterns, DoRA) load into leantune with the same logits and greedy text, and an adapter
saved by leantune loads into PEFT with the same logits and greedy text."""
import pytest
import torch

from leantune.peft_core.adapters import AdapterConfig, inject_adapter, load_adapter, save_adapter
from leantune.peft_core.checkpoint import load_model
from leantune.peft_core.generate import generate
from tests.test_smollm2 import GOLDEN, smollm2_dir  # noqa: F401  (the module-scoped import fixture)

CASES = {
    "lora": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora-patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            use_rslora=True, rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32}),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
}


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _compare(ours, hf, ids):
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].double()
        got = ours(torch.tensor([ids]))[0].double()
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-5, rel
    new_ours = generate(ours, [ids], 16, eos_token_ids=[2])[0]
    out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=[2], pad_token_id=2)
    assert new_ours == out[0, len(ids):].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_on_smollm2_loads_into_ours(case, smollm2_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **CASES[case])).eval()
    _perturb(hf, 0)
    hf.save_pretrained(tmp_path)
    ours = load_model(smollm2_dir).eval()
    load_adapter(ours, tmp_path)
    _compare(ours, hf, GOLDEN["rows"][1]["prompt_ids"])


def test_our_adapter_on_smollm2_loads_into_peft(smollm2_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours = load_model(smollm2_dir).eval()
    inject_adapter(ours, AdapterConfig(kind="dora", r=8, alpha=16, targets="all-linear", rslora=True,
                                       rank_pattern={"gate_proj": 4}))
    _perturb(ours, 1)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(smollm2_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    _compare(ours, hf, GOLDEN["rows"][2]["prompt_ids"])
