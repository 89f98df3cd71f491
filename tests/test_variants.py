"""The variant contract (issue 18): what trains, how a variant merges, how it is saved, and the
gated example variant (``peft_core/variants/gated.py``)."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.base import ModelError, UsageError
from leantune.peft_core import lora as lora_mod
from leantune.peft_core.adapters import (AdapterConfig, inject_adapter, load_adapter, lora_layers, merge_adapter,
                                         save_adapter, unmerge_adapter)
from leantune.peft_core.lora import LoraLinear, LoraVariant, get_variant, register_variant
from leantune.quant.modules import Linear4bit, replace_linears
from tests.helpers import tiny_model

IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def rel(got, want):
    return float((got - want).detach().abs().max() / want.detach().abs().max())


def randomize(model, seed=0, scale=0.3):
    """Move every trainable tensor (the adapters, whatever their names) away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def gated_model(seed=0):
    model = inject_adapter(tiny_model(seed=seed), AdapterConfig(kind="gated", r=4, alpha=8,
                                                                targets=["q_proj", "v_proj", "down_proj"]))
    randomize(model, seed=seed + 1)
    return model.eval()


# ------------------------------------------------------------------------------------------
# the gated variant
# ------------------------------------------------------------------------------------------
def test_gated_matches_its_formula_and_trains_its_gate():
    torch.manual_seed(0)
    model = inject_adapter(tiny_model(seed=2), AdapterConfig(kind="gated", r=4, alpha=8, dropout=0.1))
    layer = model.model.layers[0].mlp.up_proj
    gate = layer.rank_gate["default"]
    assert torch.equal(gate, torch.ones(4)) and gate.requires_grad  # not named lora_*, trains anyway
    assert not layer.base.weight.requires_grad
    g0 = gate.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p is gate for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(6):
        logits = model(ids[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if step > 0:  # dL/dg = s (B^T dY) * (A x) is 0 while B is 0
            assert gate.grad is not None and gate.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert not torch.allclose(gate.detach(), g0)
    # the formula: W x + b + s B diag(g) A x
    layer.eval()
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base(x) + 2.0 * ((x @ A.t()) * gate) @ B.t()  # s = 8 / 4
    assert rel(layer(x), want) < 1e-6


def test_gated_merge_and_unmerge():
    model = gated_model()
    with torch.no_grad():
        want = model(IDS)
        before = {n: layer.base.weight.detach().clone() for n, layer in lora_layers(model)}
        merge_adapter(model)
        assert rel(model(IDS), want) < 1e-5
        unmerge_adapter(model)
        for n, layer in lora_layers(model):
            assert (layer.base.weight - before[n]).abs().max() < 1e-6, n
        assert rel(model(IDS), want) < 1e-6


def test_gated_on_a_4bit_base_takes_the_reference_path(monkeypatch):
    calls = []
    monkeypatch.setattr(lora_mod, "lora_4bit", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(32, 16))
    layer = LoraLinear(32, 16, r=4, alpha=4, base=q, kind="gated")
    randomize(layer)
    x = torch.randn(2, 32)
    A, B, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.rank_gate["default"]
    want = q(x) + ((x @ A.t()) * g) @ B.t()
    assert rel(layer(x), want) < 1e-5 and not calls


def test_plain_lora_on_a_4bit_base_stays_fused(monkeypatch):
    calls = []
    real = lora_mod.lora_4bit
    monkeypatch.setattr(lora_mod, "lora_4bit", lambda *a: calls.append(1) or real(*a))
    model = replace_linears(tiny_model(seed=4))
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets=["q_proj"]))
    with torch.no_grad():
        model(IDS)
    assert len(calls) == 2  # one per layer
    calls.clear()
    model = replace_linears(tiny_model(seed=4))
    inject_adapter(model, AdapterConfig(kind="dora", r=4, alpha=8, targets=["q_proj"]))
    with torch.no_grad():
        model(IDS)
    assert not calls


def test_gated_round_trip_and_refuses_to_pose_as_peft_lora(tmp_path):
    model = gated_model()
    with torch.no_grad():
        want = model(IDS)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] != "LORA" and cfg["leantune_variant"] == "gated"
    again = load_adapter(tiny_model(seed=0).eval(), tmp_path, trainable=True)
    layer = again.model.layers[1].mlp.down_proj
    assert layer.adapters["default"].kind == "gated" and layer.rank_gate["default"].requires_grad
    with torch.no_grad():
        assert rel(again(IDS), want) < 1e-6


def test_peft_refuses_the_gated_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import PeftModel

    from leantune.peft_core.checkpoint import save_model

    save_model(tiny_model(seed=0), tmp_path / "base")
    save_adapter(gated_model(), tmp_path / "adapter")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with pytest.raises(Exception):  # an unknown peft_type: PEFT does not load it as plain LoRA
        PeftModel.from_pretrained(hf, tmp_path / "adapter")


def test_missing_variant_is_named_on_load(tmp_path):
    save_adapter(gated_model(), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "leantune_variant": "no_such_variant"}))
    with pytest.raises(ModelError, match="variant 'no_such_variant' is not available"):
        load_adapter(tiny_model(seed=0), tmp_path)


def test_unknown_kind_hint_with_extra_tensors_names_it(tmp_path):
    """A PEFT-compatible save whose metadata names a variant this installation lacks, and whose
    file holds a tensor plain LoRA does not know: the error names the variant."""
    from leantune.peft_core.safetensors_io import read_safetensors, write_safetensors

    model = inject_adapter(tiny_model(seed=0), AdapterConfig(r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path)
    t = read_safetensors(tmp_path / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.q_proj.extra"] = torch.zeros(3)
    write_safetensors(t, tmp_path / "adapter_model.safetensors",
                      metadata={"format": "pt", "leantune_kind": "elsewhere_variant"})
    with pytest.raises(ModelError, match="variant 'elsewhere_variant', which this installation lacks"):
        load_adapter(tiny_model(seed=0), tmp_path)


# ------------------------------------------------------------------------------------------
# the contract's traps
# ------------------------------------------------------------------------------------------
def test_a_variant_that_overrides_only_delta_cannot_be_merged():
    @register_variant("test_delta_only")
    class DeltaOnly(LoraVariant):
        fused_4bit = False

        def delta(self, layer, name, x, result):
            return 2.0 * super().delta(layer, name, x, result)

    model = inject_adapter(tiny_model(seed=5), AdapterConfig(kind="test_delta_only", r=2, targets=["q_proj"]))
    randomize(model)
    w = model.model.layers[0].self_attn.q_proj.base.weight.detach().clone()
    with pytest.raises(UsageError, match="test_delta_only.*merge"):
        merge_adapter(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight, w)  # nothing changed
    with pytest.raises(UsageError, match="test_delta_only"):
        lora_layers(model)[0][1].merged_weight()


def test_a_parameter_not_named_lora_trains_when_tensors_lists_it(tmp_path):
    @register_variant("test_scaled")
    class Scaled(LoraVariant):
        """y = W x + c * s B A x, c a learned scalar per layer, saved as "scale"."""

        fused_4bit = False
        peft_compatible = False

        def init(self, layer, name):
            if not hasattr(layer, "out_scale"):
                layer.out_scale = nn.ParameterDict()
            layer.out_scale[name] = nn.Parameter(torch.ones(1))

        def delta(self, layer, name, x, result):
            return layer.out_scale[name] * super().delta(layer, name, x, result)

        def delta_weight(self, layer, name):
            return layer.out_scale[name].float() * layer.delta_weight(name)

        def shapes(self, i, o, r):
            return {**super().shapes(i, o, r), "scale": (1,)}

        def tensors(self, layer, name):
            return {**super().tensors(layer, name), "scale": layer.out_scale[name]}

    model = inject_adapter(tiny_model(seed=6), AdapterConfig(kind="test_scaled", r=2, targets=["v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.v_proj.out_scale.default" in trainable
    assert all(".lora_" in n or ".out_scale." in n for n in trainable)
    randomize(model)
    model(IDS).square().mean().backward()
    assert model.model.layers[0].self_attn.v_proj.out_scale["default"].grad is not None
    save_adapter(model, tmp_path)
    again = load_adapter(tiny_model(seed=6), tmp_path)
    torch.testing.assert_close(again.model.layers[1].self_attn.v_proj.out_scale["default"],
                               model.model.layers[1].self_attn.v_proj.out_scale["default"])


def test_dora_lives_in_its_variant_file_and_saves_as_peft_dora(tmp_path):
    assert type(get_variant("dora")).__module__ == "leantune.peft_core.variants.dora"
    assert not hasattr(LoraLinear, "dora_weight_norm") and not hasattr(LoraLinear, "weight_row_sq_norm")
    model = inject_adapter(tiny_model(seed=7), AdapterConfig(kind="dora", r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and "leantune_variant" not in cfg
