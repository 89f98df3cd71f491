"""Defects found by comparing leantune with PEFT and bitsandbytes (issue 20), one test each.

PEFT / transformers / bitsandbytes are the oracle where installed (the tests that need them
skip cleanly without); float64 references otherwise.
"""
import pytest
import torch

from leantune.base import UsageError
from leantune.peft_core.adapters import AdapterConfig, inject_adapter, load_adapter, save_adapter
from tests.helpers import tiny_model


def rel(got, want):
    return float((got - want).detach().abs().max() / want.detach().abs().max())


def randomize(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(12))


# ------------------------------------------------------------------------------------------
# 2. a regex target with layers (PEFT: "layers_to_transform cannot be used when
#    target_modules is a str")
# ------------------------------------------------------------------------------------------
def test_regex_targets_with_layers_is_a_usage_error():
    with pytest.raises(UsageError, match="adapter.layers.*adapter.targets|adapter.targets.*adapter.layers"):
        AdapterConfig(targets=r".*\.q_proj", layers=[0])
    AdapterConfig(targets=["q_proj"], layers=[0])  # a list is fine
    AdapterConfig(targets="all-linear", layers=[0])  # PEFT expands all-linear to a list first


# ------------------------------------------------------------------------------------------
# 4. a frozen adapter loaded into a model in eval mode stays in eval mode
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("second", [False, True])
def test_frozen_adapter_loaded_into_an_eval_model_is_in_eval_mode(tmp_path, second):
    src = inject_adapter(tiny_model(seed=3), AdapterConfig(r=4, alpha=8, dropout=0.5, targets=["q_proj", "v_proj"]))
    randomize(src, seed=1)
    save_adapter(src, tmp_path)
    model = tiny_model(seed=3).eval()
    if second:  # the adapter's layers exist already: add_adapter, not a new LoraLinear
        inject_adapter(model, AdapterConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]), "other")
        model.eval()
    load_adapter(model, tmp_path, "loaded", trainable=False, activate=True)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS), model(IDS))


# ------------------------------------------------------------------------------------------
# 1. several active adapters with DoRA: PEFT 0.21 applies them in turn, DoRA's magnitude on
#    the output so far; merging takes DoRA's norm from the unmerged base
# ------------------------------------------------------------------------------------------
MULTI = {"lora+lora": (False, False), "dora+dora": (True, True), "lora+dora": (False, True),
         "dora+lora": (True, False)}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from leantune.peft_core.checkpoint import save_model

    base_dir = tmp_path_factory.mktemp("base")
    save_model(tiny_model("llama-bias", seed=11), base_dir)

    def hf_model():
        return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    return base_dir, hf_model


@pytest.mark.parametrize("case", sorted(MULTI))
def test_several_active_adapters_match_peft(case, hf_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    from leantune.peft_core.adapters import lora_layers, merge_adapter, set_active_adapter, unmerge_adapter
    from leantune.peft_core.checkpoint import load_model

    base_dir, hf_model = hf_base
    dora_a, dora_b = MULTI[case]
    torch.manual_seed(21)
    peft_model = get_peft_model(hf_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                       use_dora=dora_a, init_lora_weights=False), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "up_proj", "o_proj"],
                                           use_dora=dora_b, init_lora_weights=False))
    with torch.no_grad():  # magnitudes away from the norms, so m/n - 1 matters
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape))
    peft_model.base_model.set_adapter(["a", "b"])
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path)  # each non-default adapter in its own folder
    ours = load_model(base_dir).eval()
    load_adapter(ours, tmp_path / "a", "a")
    load_adapter(ours, tmp_path / "b", "b")
    set_active_adapter(ours, ["a", "b"])
    with torch.no_grad():
        got = ours(IDS)
        assert rel(got, want) < 1e-5, rel(got, want)
        before = {n: layer.base.weight.clone() for n, layer in lora_layers(ours)}
        merge_adapter(ours)
        assert rel(ours(IDS), got) < 1e-5
        unmerge_adapter(ours)
        for n, layer in lora_layers(ours):
            assert (layer.base.weight - before[n]).abs().max() < 1e-6, n
        assert rel(ours(IDS), got) < 1e-5


# ------------------------------------------------------------------------------------------
# 5. double quantization of absmax values whose fp32 mean overflows: bitsandbytes stores an
#    inf offset and nested absmax (its dequantize gives NaN); leantune refuses at quantize time
#    instead of producing a state its own loader refuses
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["reference", "dispatch"])
def test_double_quant_overflow_is_refused_at_quantize_time(path):
    from leantune.quant import dispatch
    from leantune.quant import functional as F

    quantize = F.quantize_4bit if path == "reference" else dispatch.quantize_4bit
    w = torch.full((640,), 3e38)
    with pytest.raises(ValueError, match="double_quant"):
        quantize(w, double_quant=True)
    packed, state = quantize(w, double_quant=False)  # without double quantization it is fine
    assert torch.isfinite(F.dequantize_4bit(packed, state)).all()
    packed, state = quantize(torch.full((640,), 3e37), double_quant=True)  # the mean fits: fine
    torch.testing.assert_close(F.dequantize_4bit(packed, state), torch.full((640,), 3e37))


def test_bitsandbytes_state_for_the_overflow_is_unusable():
    """Why refusing is right: bitsandbytes' own state for the same input dequantizes to NaN."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    q, st = bnb_f.quantize_4bit(torch.full((640,), 3e38), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert not torch.isfinite(st.offset) and not torch.isfinite(bnb_f.dequantize_4bit(q, st)).any()
