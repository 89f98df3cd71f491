"""The LoRA layer, its variants and inits, named adapters, targets, merging and ``leantune merge``."""
import argparse
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.peft_core import adapters as ad
from leantune.peft_core.adapters import AdapterConfig, adapter_rows, delete_adapter, disable_adapters, inject_adapter, load_adapter, lora_layers, merge_adapter, merge_and_unload, save_adapter, set_active_adapter, trainable_report, unmerge_adapter
from leantune.base import ModelError, UsageError
from leantune.peft_core.lora import BASE, LoraLinear, LoraVariant, get_variant, register_variant
from leantune.peft_core.variants import dora
from leantune.quant.modules import Linear4bit, replace_linears
from tests.helpers import tiny_model, tiny_model_dir


def rel(got, want):
    return float((got - want).detach().abs().max() / want.detach().abs().max())


def randomize(layer_or_model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer_or_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------------------
def test_default_init_and_formula():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = LoraLinear(32, 24, r=4, alpha=8, base=base)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, 32) and B.shape == (24, 4)
    assert torch.all(B == 0) and A.abs().max() <= 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt 5)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    randomize(layer)
    want = base(x) + 2.0 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(layer(x), want)
    assert not base.weight.requires_grad and A.requires_grad and B.requires_grad
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_rslora_scaling_and_gaussian_init():
    layer = LoraLinear(64, 64, r=16, alpha=8, use_rslora=True, init="gaussian")
    assert layer.adapters["default"].scaling == 8 / 4
    assert abs(float(layer.lora_A["default"].weight.detach().std()) - 1 / 16) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be"), (dict(r=2.5), "r must be"), (dict(dropout=1.0), "dropout"),
    (dict(alpha=-1), "alpha"), (dict(init="zeros"), "unknown init"), (dict(kind="nope"), "unknown adapter kind"),
    (dict(base=nn.Linear(8, 24)), r"base is \[24, 8\]"), (dict(init="pissa", r=20), "r <= min"),
    (dict(init="pissa", kind="dora"), "cannot be combined"), (dict(base_quant={}), "base_quant"),
    (dict(adapter_name="a.b"), "adapter name"), (dict(base=nn.Conv1d(16, 24, 1)), "nn.Linear or Linear4bit"),
])
def test_contradictory_arguments_raise_value_error(kwargs, match):
    args = dict(r=4, alpha=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LoraLinear(16, 24, **args)


def test_loftq_needs_the_dense_weight():
    q = Linear4bit.from_linear(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="LoftQ needs the full-precision weight"):
        LoraLinear(64, 64, r=4, alpha=8, base=q, init="loftq")


# ------------------------------------------------------------------------------------------
# inits that rewrite the base
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_keep_the_function_and_the_original_base(init):
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 48)
    want = base(x).detach()
    layer = LoraLinear(48, 40, r=6, alpha=12, base=base, init=init)
    assert (base.weight - w0).abs().max() > 1e-3  # the base is now the residual
    assert rel(layer(x), want) < 1e-5
    randomize(layer)
    with disable_adapters_of(layer):
        assert rel(layer(x), want) < 1e-5  # disabled: s B0 A0 x is added back
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0
    assert rel(layer(x), x @ (layer.base.weight + delta).t() + base.bias) < 1e-5


class disable_adapters_of:
    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer.disabled = True

    def __exit__(self, *exc):
        self.layer.disabled = False


def test_pissa_on_a_4bit_base_quantizes_the_residual():
    """The principal part goes to A, B; quantizing the residual loses less than quantizing W."""
    torch.manual_seed(0)
    u, v = torch.randn(64, 3), torch.randn(3, 128)
    dense = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        dense.weight.copy_(u @ v + 0.05 * torch.randn(64, 128))  # a few large directions
    w = dense.weight.detach().clone()
    plain = Linear4bit.from_linear(dense)
    layer = LoraLinear(128, 64, r=4, alpha=4, base=dense, init="pissa", base_quant={"quant_type": "nf4"})
    assert layer.is_4bit
    eff = layer.base.dequantize(torch.float32) + layer.delta_weight("default")
    err_plain = torch.linalg.norm(plain.dequantize(torch.float32) - w)
    assert torch.linalg.norm(eff - w) < 0.5 * err_plain
    # PiSSA on an already 4-bit base: SVD of the dequantized weight, residual re-quantized
    layer4 = LoraLinear(128, 64, r=4, alpha=4, base=plain, init="pissa")
    assert layer4.is_4bit and layer4.base is not plain


def test_loftq_alternation_beats_plain_quantization():
    torch.manual_seed(0)
    dense = nn.Linear(128, 96, bias=False)
    w = dense.weight.detach().clone()
    err_plain = torch.linalg.norm(Linear4bit.from_linear(dense).dequantize(torch.float32) - w)
    errs = []
    for iters in (1, 3):
        base = nn.Linear(128, 96, bias=False)
        base.weight.data.copy_(w)
        layer = LoraLinear(128, 96, r=8, alpha=16, base=base, init="loftq", loftq_iters=iters)
        assert layer.is_4bit
        errs.append(torch.linalg.norm(layer.base.dequantize(torch.float32) + layer.delta_weight("default") - w))
    assert errs[0] < err_plain and errs[1] <= errs[0] * 1.001


# ------------------------------------------------------------------------------------------
# DoRA
# ------------------------------------------------------------------------------------------
def dora_naive(x, w, bias, A, B, m, s):
    """DoRA written out: W' = m (W + sBA) / ||W + sBA||_row (norm detached)."""
    wp = w + s * B @ A
    norm = torch.linalg.norm(wp, dim=1).detach()
    return F.linear(x, (m / norm)[:, None] * wp, bias)


@pytest.mark.parametrize("four_bit", [False, True])
def test_dora_matches_the_formula_with_gradients(four_bit):
    torch.manual_seed(0)
    dense = nn.Linear(40, 24)
    base = Linear4bit.from_linear(dense) if four_bit else dense
    w = base.dequantize(torch.float32) if four_bit else dense.weight.detach()
    layer = LoraLinear(40, 24, r=4, alpha=6, base=base, kind="dora")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    torch.testing.assert_close(m.detach(), torch.linalg.norm(w, dim=1))
    randomize(layer)
    torch.testing.assert_close(dora.weight_norm(layer, "default"),
                               torch.linalg.norm(w + 1.5 * B.detach() @ A.detach(), dim=1))
    x = torch.randn(3, 5, 40)
    y = layer(x)
    params = (A, B, m)
    got = torch.autograd.grad(y.square().sum(), params)
    want_y = dora_naive(x, w, dense.bias.detach(), A, B, m, 1.5)
    want = torch.autograd.grad(want_y.square().sum(), params)
    assert rel(y, want_y) < 1e-5
    for g, h in zip(got, want):
        assert rel(g, h) < 1e-5


def test_dora_norm_cache_follows_base_changes():
    layer = LoraLinear(16, 8, r=2, alpha=2, kind="dora")
    n0 = dora.row_sq_norm(layer).clone()
    with torch.no_grad():
        layer.base.weight.mul_(2)
    torch.testing.assert_close(dora.row_sq_norm(layer), 4 * n0)


# ------------------------------------------------------------------------------------------
# named adapters
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", [False, True])
def test_mixed_rows_compute_the_base_once_and_match_each_adapter(quant, monkeypatch):
    """A batch whose rows pick different adapters (the server's decode batch) runs each base
    linear once for all rows; every row equals that adapter's own forward."""
    model = tiny_model(seed=3).eval()
    if quant:
        replace_linears(model, "nf4", blocksize=32)
    for name, kind in (("a", "lora"), ("g", "gated"), ("d", "dora")):
        inject_adapter(model, AdapterConfig(kind=kind, r=4, alpha=8, targets="all-linear"), name,
                       activate=False)
    randomize(model, seed=4)
    ids = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(1))
    rows = ["a", "g", BASE, "a"]
    with torch.no_grad():
        want = {}
        for n in ("a", "g"):
            set_active_adapter(model, n)
            want[n] = model(ids)
        with disable_adapters(model):
            want[BASE] = model(ids)
        calls = []
        for _, layer in lora_layers(model):
            orig = layer.base.forward
            monkeypatch.setattr(layer.base, "forward",
                                lambda x, orig=orig: calls.append(x.shape[0]) or orig(x))
        with adapter_rows(model, rows):
            mixed = model(ids)
    n_lora = len(lora_layers(model))
    assert calls.count(4) == n_lora and len(calls) == n_lora  # one full-batch base pass a layer
    for i, n in enumerate(rows):
        torch.testing.assert_close(mixed[i], want[n][i], rtol=1e-4, atol=1e-5)
    for rows in (["g", BASE, "a", "g"], ["a", "g", BASE, "a"]):  # the layers' cached row scales follow
        with torch.no_grad(), adapter_rows(model, rows):
            mixed = model(ids)
        for i, n in enumerate(rows):
            torch.testing.assert_close(mixed[i], want[n][i], rtol=1e-4, atol=1e-5)
    rows = ["d", "a", BASE, "g"]  # DoRA has its own forward: its rows take their own base pass
    with torch.no_grad():
        set_active_adapter(model, "d")
        want["d"] = model(ids)
        with adapter_rows(model, rows):
            mixed = model(ids)
    for i, n in enumerate(rows):
        torch.testing.assert_close(mixed[i], want[n][i], rtol=1e-4, atol=1e-5)


def test_named_adapters_active_set_and_per_row_selection():
    model = tiny_model(seed=1).eval()
    with torch.no_grad():
        base = model(IDS)
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), "a")
    inject_adapter(model, AdapterConfig(kind="dora", r=2, alpha=4, targets=["v_proj", "down_proj"]), "b",
                   activate=False)
    randomize(model, seed=2)
    assert model.active_adapters == ["a"]
    with torch.no_grad():
        out_a = model(IDS)
        set_active_adapter(model, "b")
        out_b = model(IDS)
        with adapter_rows(model, ["b", BASE]):
            mixed = model(IDS)
        with adapter_rows(model, ["a", "b"]):
            mixed2 = model(IDS)
        with disable_adapters(model):
            off = model(IDS)
    assert rel(out_a, base) > 1e-2 and rel(out_b, base) > 1e-2
    torch.testing.assert_close(mixed[0], out_b[0])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed2[0], out_a[0])
    torch.testing.assert_close(mixed2[1], out_b[1])
    torch.testing.assert_close(off, base)
    with pytest.raises(ValueError, match="no adapter 'c'"):
        set_active_adapter(model, "c")
    delete_adapter(model, "a")
    assert all("a" not in layer.adapters for _, layer in lora_layers(model))
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)  # only "a" was there
    delete_adapter(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base)


def test_two_active_adapters_add_up():
    torch.manual_seed(0)
    layer = LoraLinear(16, 8, r=2, alpha=2)
    layer.add_adapter("second", 3, 3.0)
    randomize(layer)
    x = torch.randn(4, 16)
    base = layer.base(x)
    layer.active = ["default"]
    d1 = layer(x) - base
    layer.active = ["second"]
    d2 = layer(x) - base
    layer.active = ["default", "second"]
    torch.testing.assert_close(layer(x), base + d1 + d2)


# ------------------------------------------------------------------------------------------
# targets, patterns, report
# ------------------------------------------------------------------------------------------
def adapted(model):
    return {n: (layer.adapters["default"].r, layer.adapters["default"].alpha) for n, layer in lora_layers(model)}


def test_targets_all_linear_list_regex_layers_and_patterns():
    m = inject_adapter(tiny_model(), AdapterConfig(r=4))
    assert len(adapted(m)) == 14 and "lm_head" not in adapted(m)
    assert sorted(m.adapter_configs["default"].targets) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                            "q_proj", "up_proj", "v_proj"]
    m = inject_adapter(tiny_model(), AdapterConfig(r=4, targets=["q_proj"], layers=[1]))
    assert list(adapted(m)) == ["model.layers.1.self_attn.q_proj"]
    m = inject_adapter(tiny_model(), AdapterConfig(r=4, targets=r"model\.layers\.0\.mlp\..*"))
    assert sorted(adapted(m)) == [f"model.layers.0.mlp.{p}_proj" for p in ("down", "gate", "up")]
    m = inject_adapter(tiny_model(), AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"],
                                                   rank_pattern={r"layers\.1\.self_attn\.v_proj": 2, "o_proj": 3},
                                                   alpha_pattern={"q_proj": 1}))
    got = adapted(m)
    assert got["model.layers.0.self_attn.v_proj"] == (4, 8) and got["model.layers.1.self_attn.v_proj"] == (2, 8)
    assert got["model.layers.0.self_attn.o_proj"] == (3, 8) and got["model.layers.1.self_attn.q_proj"] == (4, 1)
    m = inject_adapter(tiny_model(), AdapterConfig(r=4, targets=["lm_head"]))
    assert list(adapted(m)) == ["lm_head"]


def test_target_errors():
    with pytest.raises(UsageError, match="no linear layer"):
        inject_adapter(tiny_model(), AdapterConfig(targets=["nothing"]))
    with pytest.raises(UsageError, match="not a linear layer"):
        inject_adapter(tiny_model(), AdapterConfig(targets=["self_attn"]))
    with pytest.raises(UsageError, match="adapter.targets"):
        AdapterConfig(targets="(")
    with pytest.raises(UsageError, match="adapter.kind"):
        AdapterConfig(kind="vera2")
    model = inject_adapter(tiny_model(), AdapterConfig())
    with pytest.raises(UsageError, match="already on the model"):
        inject_adapter(model, AdapterConfig())


def test_trainable_report_like_peft():
    model = inject_adapter(tiny_model(), AdapterConfig(r=4, targets=["q_proj"]))
    total = sum(p.numel() for p in model.parameters())
    trainable = 2 * (4 * 64 + 64 * 4)
    assert trainable_report(model) == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}")
    q = replace_linears(tiny_model())
    rep = trainable_report(inject_adapter(q, AdapterConfig(r=4, targets=["q_proj"])))
    assert rep.endswith(f"all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# ------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_and_unmerge_round_trip(kind):
    model = tiny_model(seed=3).eval()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_adapter(model, AdapterConfig(kind=kind, r=4, alpha=8))
    randomize(model, seed=4, scale=0.1)
    with torch.no_grad():
        want = model(IDS)
        merge_adapter(model)
        assert rel(model(IDS), want) < 1e-5
        unmerge_adapter(model)
        assert rel(model(IDS), want) < 1e-5
    for n, p in model.named_parameters():
        key = n.replace(".base.", ".")
        if key in w0:
            assert (p - w0[key]).abs().max() <= 1e-6, n
    with torch.no_grad():
        plain = merge_and_unload(model)
        assert not lora_layers(plain) and not hasattr(plain, "adapter_configs")
        assert rel(plain(IDS), want) < 1e-5


def test_disabling_a_merged_model_unmerges_it():
    model = tiny_model(seed=3).eval()
    with torch.no_grad():
        base = model(IDS)
    inject_adapter(model, AdapterConfig(r=4))
    randomize(model)
    merge_adapter(model)
    with torch.no_grad(), disable_adapters(model):
        assert rel(model(IDS), base) < 1e-5  # the weights are back to within 1e-6 (fp32 rounding)


def test_merge_and_unload_on_a_4bit_base_with_requantize():
    model = replace_linears(tiny_model(seed=5)).eval()
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize(model, seed=6)
    with torch.no_grad():
        want = model(IDS)
    with pytest.raises(ValueError, match="4-bit base"):
        merge_adapter(model)
    import copy

    dense = merge_and_unload(copy.deepcopy(model))
    q_proj = dense.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and isinstance(dense.model.layers[0].self_attn.k_proj, Linear4bit)
    with torch.no_grad():
        assert rel(dense(IDS), want) < 1e-5
    stats = {}
    requant = merge_and_unload(model, requantize="nf4", stats=stats)
    assert isinstance(requant.model.layers[0].self_attn.q_proj, Linear4bit)
    assert set(stats) == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    assert all(0 < e < 0.2 for e in stats.values())


def test_pissa_adapter_exports_as_plain_lora(tmp_path):
    model = tiny_model(seed=7).eval()
    inject_adapter(model, AdapterConfig(r=4, alpha=8, init="pissa", targets=["q_proj", "up_proj"]))
    randomize(model, seed=8)
    with torch.no_grad():
        want = model(IDS)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    fresh = tiny_model(seed=7).eval()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert rel(fresh(IDS), want) < 1e-5
        assert rel(merge_and_unload(model)(IDS), want) < 1e-5


# ------------------------------------------------------------------------------------------
# loading errors
# ------------------------------------------------------------------------------------------
def saved_adapter(tmp_path, **cfg):
    model = inject_adapter(tiny_model(), AdapterConfig(**cfg))
    return save_adapter(model, tmp_path / "adapter")


def test_adapter_for_another_base_names_the_first_offending_key(tmp_path):
    path = saved_adapter(tmp_path, r=4, targets=["q_proj", "v_proj"])
    other = tiny_model(hidden_size=48, num_attention_heads=4)
    with pytest.raises(ModelError) as e:
        load_adapter(other, path)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 4
    assert "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape [4, 64]" in msg
    assert not lora_layers(other)  # the model was not touched


def test_unknown_and_missing_keys(tmp_path):
    from leantune.peft_core.safetensors_io import read_safetensors, write_safetensors

    path = saved_adapter(tmp_path, r=4, targets=["q_proj"])
    tensors = read_safetensors(path / "adapter_model.safetensors")
    bad = dict(tensors)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2)
    write_safetensors(bad, path / "adapter_model.safetensors")
    with pytest.raises(ModelError, match=r"unexpected tensor '.*q_proj\.lora_C\.weight'"):
        load_adapter(tiny_model(), path)
    missing = {k: v for k, v in tensors.items() if "layers.1" not in k}
    write_safetensors(missing, path / "adapter_model.safetensors")
    with pytest.raises(ModelError, match=r"adapter lacks tensor '.*layers\.1\.self_attn\.q_proj\.lora_A\.weight'"):
        load_adapter(tiny_model(), path)
    (path / "adapter_model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ModelError, match="truncated"):
        load_adapter(tiny_model(), path)


def test_unsupported_configs(tmp_path):
    path = saved_adapter(tmp_path, r=4, targets=["q_proj"])
    cfg = json.loads((path / "adapter_config.json").read_text())
    for key, value, match in [("peft_type", "IA3", "peft_type"), ("modules_to_save", ["lm_head"], "modules_to_save"),
                              ("bias", "all", "bias"), ("r", 0, "r: must be")]:
        (path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ModelError, match=match):
            load_adapter(tiny_model(), path)
    with pytest.raises(ModelError, match="adapter folder not found"):
        load_adapter(tiny_model(), tmp_path / "nope")


# ------------------------------------------------------------------------------------------
# the registry and the example variant
# ------------------------------------------------------------------------------------------
def test_register_a_variant():
    @register_variant("test_halved")
    class Halved(LoraVariant):
        fused_4bit = False

        def delta(self, layer, name, x, base_out):
            return 0.5 * super().delta(layer, name, x, base_out)

    assert isinstance(get_variant("test_halved"), Halved)
    with pytest.raises(ValueError, match="already registered"):
        register_variant("test_halved")(Halved)
    layer = LoraLinear(8, 8, r=2, alpha=2, kind="test_halved")
    layer.add_adapter("full", 2, 2.0)
    with torch.no_grad():
        for d in (layer.lora_A, layer.lora_B):
            d["full"].weight.copy_(d["default"].weight.add_(0.5))
    x = torch.randn(3, 8)
    half = layer(x) - layer.base(x)
    layer.active = ["full"]
    torch.testing.assert_close(2 * half, layer(x) - layer.base(x))


@pytest.mark.parametrize("kind, quant", [("lora_fa", False), ("lora_fa", True), ("dora", False)])
def test_variant_trains_end_to_end(kind, quant):
    """A few AdamW steps on a tiny model lower the loss; LoRA-FA's A stays where it was."""
    torch.manual_seed(0)
    model = tiny_model(seed=9)
    if quant:
        replace_linears(model)
    inject_adapter(model, AdapterConfig(kind=kind, r=4, alpha=8, dropout=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    a0 = model.model.layers[0].mlp.up_proj.lora_A["default"].weight.detach().clone()
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    a1 = model.model.layers[0].mlp.up_proj.lora_A["default"].weight
    assert torch.equal(a0, a1) == (kind == "lora_fa")


def test_lora_fa_round_trips_with_its_kind(tmp_path):
    model = inject_adapter(tiny_model(), AdapterConfig(kind="lora_fa", r=2, targets=["q_proj"]))
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_model(), tmp_path, trainable=True)
    layer = fresh.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].kind == "lora_fa"
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad


# ------------------------------------------------------------------------------------------
# leantune merge
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_cmd_merge(tmp_path, quant):
    from leantune.peft_core.checkpoint import load_model

    model_dir = tiny_model_dir(tmp_path / "base", seed=10)
    model = load_model(model_dir).eval()
    inject_adapter(model, AdapterConfig(kind="dora", r=4, alpha=8))
    randomize(model, seed=11)
    ids = torch.randint(0, 259, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    save_adapter(model, tmp_path / "adapter")
    logs = []
    args = argparse.Namespace(model_dir=str(model_dir), adapter_dir=str(tmp_path / "adapter"),
                              out_dir=str(tmp_path / "merged"), dtype="float32", quant=quant)
    ad.cmd_merge(args, log=logs.append)
    merged = load_model(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        got = merged(ids)
    if quant == "none":
        assert rel(got, want) < 1e-5
    else:
        assert isinstance(merged.model.layers[0].mlp.up_proj, Linear4bit)
        assert "re-quantized to nf4: relative weight error mean" in logs[-1]
        with torch.no_grad():  # the same codes as quantizing the merged model here
            assert rel(got, replace_linears(merge_and_unload(model))(ids)) < 1e-5
    with pytest.raises(UsageError, match="not empty"):
        ad.cmd_merge(args, log=logs.append)


def test_dora_on_4bit_equals_dora_on_the_dequantized_weight_with_dropout():
    """The 4-bit DoRA path ([X; X_d; A] W^T in one pass) == the dense path, in training."""
    torch.manual_seed(0)
    dense = nn.Linear(40, 24)
    q = Linear4bit.from_linear(dense)
    deq = nn.Linear(40, 24)
    with torch.no_grad():
        deq.weight.copy_(q.dequantize(torch.float32))
        deq.bias.copy_(dense.bias)
    layers = [LoraLinear(40, 24, r=4, alpha=6, dropout=0.2, base=b, kind="dora") for b in (q, deq)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_A["default"].weight.copy_(torch.linspace(-0.3, 0.3, 160).reshape(4, 40))
            layer.lora_B["default"].weight.copy_(torch.linspace(-0.2, 0.2, 96).reshape(24, 4))
            layer.lora_magnitude_vector["default"].mul_(1.1)
    x = torch.randn(2, 5, 40)
    outs = []
    for layer in layers:
        torch.manual_seed(1)  # the same dropout mask
        xl = x.clone().requires_grad_(True)
        y = layer.train()(xl)
        y.square().sum().backward()
        outs.append([y, xl.grad] + [p.grad for n, p in layer.named_parameters() if p.requires_grad])
    for got, want in zip(*outs):
        assert rel(got, want) < 1e-5


def test_a_model_with_adapters_moves_and_casts_like_any_module():
    """``model.to(...)`` / ``.double()`` reach LoraLinear's tensors (nn.Module._apply is not
    shadowed by the layer's own forward helper)."""
    model = tiny_model(seed=5).eval()
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model, seed=6)
    with torch.no_grad():
        want = model(IDS).double()
        model.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        torch.testing.assert_close(model(IDS), want, rtol=1e-5, atol=1e-5)
        model.to("cpu", torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
