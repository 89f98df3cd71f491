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
