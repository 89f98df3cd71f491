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


# ------------------------------------------------------------------------------------------
# 6. precision: an unmerged fp32 adapter on a bf16 base computes its path in fp32 (as PEFT:
#    input cast to the adapter's dtype, added to the base output, cast back once)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_bf16_base_keeps_the_adapter_path_in_fp32_like_peft(tmp_path, kind, monkeypatch):
    transformers = pytest.importorskip("transformers")
    # attention as PEFT's model runs it (SDPA), so the errors compared are the adapter path's;
    # the CPU GEMM attention's own bf16 error is tested in tests/test_attention.py
    monkeypatch.setenv("LEANTUNE_CPU_ATTENTION", "0")
    pytest.importorskip("peft")
    from peft import PeftModel

    from leantune.peft_core.checkpoint import save_model

    src = inject_adapter(tiny_model(seed=13), AdapterConfig(kind=kind, r=8, alpha=16, targets="all-linear"))
    randomize(src, seed=2, scale=0.05)
    save_model(tiny_model(seed=13), tmp_path / "base")
    save_adapter(src, tmp_path / "adapter")
    with torch.no_grad():
        exact = src.eval()(IDS).double()
        ours = load_adapter(tiny_model(seed=13, dtype=torch.bfloat16).eval(), tmp_path / "adapter")
        assert ours.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
        got = ours(IDS)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
        peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        want = peft(IDS).logits
        for name, p in ours.named_parameters():  # the former path: the adapter computed in bf16
            if ".lora_" in name:
                p.data = p.data.bfloat16()
        for layer in ours.modules():  # (and DoRA's cached norms with them)
            if hasattr(layer, "variant_cache"):
                layer.variant_cache.clear()
        old = ours(IDS)
    err_ours, err_peft, err_old = (rel(t.double(), exact) for t in (got, want, old))
    print(f"{kind}: bf16 logits vs fp32: leantune {err_ours:.3g}, PEFT {err_peft:.3g}, adapter in bf16 {err_old:.3g}")
    assert got.dtype == torch.bfloat16
    assert err_ours <= 1.25 * err_peft and err_ours < err_old, (err_ours, err_peft, err_old)


def test_fused_4bit_bf16_lora_products_in_fp32():
    """The fused path on a 4-bit base with bf16 compute: the base GEMM in bf16, the LoRA
    products in the adapter's fp32; closer to the float64 result than an all-bf16 LoRA path."""
    import torch.nn as nn

    from leantune.quant.functional import dequantize_4bit
    from leantune.quant.fused_lora import lora_4bit, lora_4bit_reference
    from leantune.quant.modules import Linear4bit

    g = torch.Generator().manual_seed(5)
    q = Linear4bit.from_linear(nn.Linear(256, 128))
    x = torch.randn(4, 9, 256, generator=g)
    A = torch.randn(16, 256, generator=g) / 16
    B = torch.randn(128, 16, generator=g)
    w = dequantize_4bit(q.weight, q.quant_state, torch.float64)
    xb = x.to(torch.bfloat16)
    exact = xb.double() @ w.t() + q.bias.double() + 2.0 * (xb.double() @ A.double().t()) @ B.double().t()
    fused = lora_4bit(xb, q.weight, q.quant_state, q.bias, A, B, 2.0)
    ref = lora_4bit_reference(xb, q.weight, q.quant_state, q.bias, A, B, 2.0)
    all_bf16 = lora_4bit(xb, q.weight, q.quant_state, q.bias, A.bfloat16(), B.bfloat16(), 2.0)
    assert fused.dtype == ref.dtype == torch.bfloat16
    e_fused, e_ref, e_bf16 = (rel(t.double(), exact) for t in (fused, ref, all_bf16))
    print(f"4-bit bf16 vs float64: fused fp32-LoRA {e_fused:.3g}, reference {e_ref:.3g}, all-bf16 {e_bf16:.3g}")
    assert e_fused <= 1.5 * e_ref + 1e-6 and e_fused < e_bf16
    # gradients flow in the adapter's dtype
    Al, Bl, xl = A.clone().requires_grad_(), B.clone().requires_grad_(), xb.clone().requires_grad_()
    lora_4bit(xl, q.weight, q.quant_state, q.bias, Al, Bl, 2.0).float().square().sum().backward()
    assert Al.grad.dtype == Bl.grad.dtype == torch.float32 and xl.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# 3. a saved LoftQ adapter reproduces the trained model: the LoftQ base (4-bit, bitsandbytes
#    layout) is saved alongside, and leantune's loader puts it back
# ------------------------------------------------------------------------------------------
def test_loftq_adapter_reloads_the_live_model(tmp_path):
    from leantune.peft_core.adapters import LOFTQ_BASE_FILE, lora_layers
    from leantune.quant.modules import Linear4bit, replace_linears

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    fp32 = tiny_model(seed=8).eval()
    with torch.no_grad():
        exact = fp32(IDS)
    live = inject_adapter(tiny_model(seed=8), AdapterConfig(r=4, alpha=8, init="loftq", loftq_iters=2,
                                                            targets=targets)).eval()
    randomize(live, seed=4, scale=0.02)  # "trained"
    qlora = tiny_model(seed=8).eval()
    for mod_name, m in list(qlora.named_modules()):
        if mod_name.rsplit(".", 1)[-1] in targets:
            parent, child = mod_name.rsplit(".", 1)
            setattr(qlora.get_submodule(parent), child, Linear4bit.from_linear(m))
    inject_adapter(qlora, AdapterConfig(r=4, alpha=8, targets=targets))
    with torch.no_grad():
        want = live(IDS)
    save_adapter(live, tmp_path)
    assert (tmp_path / LOFTQ_BASE_FILE).is_file()
    again = load_adapter(tiny_model(seed=8).eval(), tmp_path)
    with torch.no_grad():
        got = again(IDS)
    assert rel(got, want) < 1e-5, rel(got, want)
    # onto a 4-bit (QLoRA) base: each targeted layer is the live one (the others stay 4-bit)
    again4 = dict(lora_layers(load_adapter(replace_linears(tiny_model(seed=8)).eval(), tmp_path)))
    for mod_name, layer in lora_layers(live):
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert rel(again4[mod_name](x), layer(x)) < 1e-5, mod_name
    # at init (before training), LoftQ's reloaded model is closer to the fp32 model than plain
    # QLoRA's (the same layers in 4 bits, B = 0)
    init = inject_adapter(tiny_model(seed=8), AdapterConfig(r=4, alpha=8, init="loftq", loftq_iters=2,
                                                            targets=targets)).eval()
    save_adapter(init, tmp_path / "init")
    reloaded = load_adapter(tiny_model(seed=8).eval(), tmp_path / "init")
    with torch.no_grad():
        err_loftq, err_qlora = rel(reloaded(IDS), exact), rel(qlora(IDS), exact)
    print(f"vs the fp32 model: LoftQ reloaded {err_loftq:.3g}, plain QLoRA {err_qlora:.3g}")
    assert err_loftq < err_qlora
