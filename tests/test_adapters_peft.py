"""Adapters in PEFT's format: golden files made by PEFT (always run), and live parity with
PEFT both ways (skipped without transformers + peft).

Live: a tiny random model of ours is saved with ``save_model`` and loaded by transformers;
PEFT adapters with random non-zero B (LoRA, rsLoRA with rank / alpha patterns, DoRA, a regex
target with layers) are saved by PEFT and loaded by us, and ours (perturbed away from init)
are saved by us and loaded by PEFT; the logits must agree to 1e-5 relative (fp32).
"""
from pathlib import Path

import pytest
import torch

from leantune.peft_core.adapters import AdapterConfig, inject_adapter, load_adapter, save_adapter
from leantune.peft_core.checkpoint import load_model, save_model
from leantune.peft_core.safetensors_io import read_safetensors
from tests.helpers import tiny_model

GOLDEN = Path(__file__).parent / "golden"


def assert_rel(got, want, tol=1e-5):
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= tol, f"max relative error {rel:.2e} > {tol:.0e}"


def perturb(model, seed=0):
    """Move every adapter tensor away from its init (B = 0 would hide most mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------
# golden files (tests/golden/make_adapter_golden.py, made with PEFT 0.21)
# ------------------------------------------------------------------------------------------
GOLDEN_ADAPTERS = ["lora", "rslora_patterns", "dora", "regex_layers"]


@pytest.mark.parametrize("which", GOLDEN_ADAPTERS)
def test_golden_peft_adapter_logits(which):
    expected = read_safetensors(GOLDEN / "adapter_logits.safetensors")
    model = load_model(GOLDEN / "adapter_base").eval()
    with torch.no_grad():
        assert_rel(model(expected["input_ids"]), expected["base"])
        load_adapter(model, GOLDEN / f"adapter_{which}")
        assert_rel(model(expected["input_ids"]), expected[which])


def test_golden_roundtrip_is_identical(tmp_path):
    """Load a PEFT file, save it again: same keys, shapes and values; PEFT's config keys kept."""
    import json

    model = load_model(GOLDEN / "adapter_base")
    load_adapter(model, GOLDEN / "adapter_dora")
    save_adapter(model, tmp_path)
    want = read_safetensors(GOLDEN / "adapter_dora" / "adapter_model.safetensors")
    got = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    src = json.loads((GOLDEN / "adapter_dora" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "task_type", "bias"):
        assert cfg[key] == src[key], key
    assert sorted(cfg["target_modules"]) == sorted(src["target_modules"])


# ------------------------------------------------------------------------------------------
# live parity with PEFT
# ------------------------------------------------------------------------------------------
PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora_patterns": dict(r=4, lora_alpha=6, target_modules="all-linear", use_rslora=True,
                            rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                            alpha_pattern={"q_proj": 3, "gate_proj": 12}),
    "dora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    "dora_rslora_patterns": dict(r=2, lora_alpha=5, target_modules=["o_proj", "up_proj", "k_proj"],
                                 use_dora=True, use_rslora=True, rank_pattern={"up_proj": 3}),
    "regex_layers": dict(r=3, lora_alpha=7, target_modules=r".*\.1\.self_attn\.(q|o)_proj"),
    "list_layers": dict(r=3, lora_alpha=7, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    base_dir = tmp_path_factory.mktemp("base")
    save_model(tiny_model("llama", seed=11), base_dir)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(12))

    def hf_model():
        return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    return base_dir, ids, hf_model


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_saved_adapter_loads_into_ours(case, hf_setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir, ids, hf_model = hf_setup
    torch.manual_seed(13)
    peft_model = get_peft_model(hf_model(), LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM",
                                                       **PEFT_CASES[case])).eval()
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    ours = load_model(base_dir).eval()
    with torch.no_grad():
        base = ours(ids)
    assert (want - base).abs().max() > 1e-2 * base.abs().max()  # the adapter changes the output
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        assert_rel(ours(ids), want)


def test_peft_dora_on_a_model_with_biases(tmp_path):
    """DoRA takes the bias out of the base output before scaling (q/k/v/o and MLP biases)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    save_model(tiny_model("llama-bias", seed=15), base_dir)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(16))
    torch.manual_seed(17)
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                               init_lora_weights=False, exclude_modules=["k_proj"])).eval()
    with torch.no_grad():
        want = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_model(base_dir).eval()
    load_adapter(ours, tmp_path / "adapter")
    assert type(ours.model.layers[0].self_attn.k_proj) is torch.nn.Linear  # excluded
    with torch.no_grad():
        assert_rel(ours(ids), want)


OUR_CASES = {
    "lora": AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "rslora_patterns": AdapterConfig(r=4, alpha=6, rslora=True, rank_pattern={"v_proj": 2, "down_proj": 5},
                                     alpha_pattern={"o_proj": 2.5}),
    "dora": AdapterConfig(kind="dora", r=4, alpha=8),
    "lora_fa": AdapterConfig(kind="lora_fa", r=4, alpha=8, targets=r".*mlp\.(up|down)_proj"),
    "pissa": AdapterConfig(r=4, alpha=8, init="pissa", targets=["q_proj", "gate_proj"]),
    "olora_rslora": AdapterConfig(r=3, alpha=5, init="olora", rslora=True, targets=["k_proj"], layers=[0]),
}


@pytest.mark.parametrize("case", sorted(OUR_CASES))
def test_our_saved_adapter_loads_into_peft(case, hf_setup, tmp_path):
    from peft import PeftModel

    base_dir, ids, hf_model = hf_setup
    ours = load_model(base_dir).eval()
    with torch.no_grad():
        base = ours(ids)
    inject_adapter(ours, OUR_CASES[case])
    perturb(ours, seed=14)
    with torch.no_grad():
        want = ours(ids)
    assert (want - base).abs().max() > 1e-2 * base.abs().max()
    save_adapter(ours, tmp_path, base_model_name_or_path=str(base_dir))
    peft_model = PeftModel.from_pretrained(hf_model(), tmp_path).eval()
    with torch.no_grad():
        assert_rel(peft_model(ids).logits, want)
    # and back into a fresh model of ours
    again = load_model(base_dir).eval()
    load_adapter(again, tmp_path)
    with torch.no_grad():
        assert_rel(again(ids), want)
