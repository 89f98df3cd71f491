"""Adapters on a model: inject, name, activate, save and load in PEFT's format, merge.

    inject_adapter(model, AdapterConfig(...), name)     wrap the targeted linears in LoraLinear
    save_adapter(model, dir, name) / load_adapter(model, dir, name)
    set_active_adapter, disable_adapters (context), adapter_rows (context), delete_adapter
    merge_adapter / unmerge_adapter (dense bases), merge_and_unload (-> a plain model)
    trainable_report, cmd_merge (``leantune merge``)

Target selection follows PEFT's ``LoraConfig`` (``peft.tuners.tuners_utils.check_target_module_exists``):
- ``"all-linear"``: the leaf names of every linear except the output layer (``lm_head``),
  saved as that list, as PEFT does;
- a list: a module is targeted when its full name equals an entry or ends with ``"." + entry``;
  ``layers`` (``layers_to_transform``) then keeps the modules whose first numbered segment
  (``model.layers.<i>.``) is among the given indices;
- any other string: a regular expression that must match the full module name.
``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in order) with
``re.match(rf"(.*\\.)?({k})$", module_name)`` gives that module's r / alpha.

Saved files (what PEFT's ``save_pretrained`` writes): ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r], DoRA's ``...lora_magnitude_vector`` [out], and any other
tensor a variant's ``tensors`` lists; no adapter name in the keys. Only a variant that declares
``peft_compatible`` is saved with ``peft_type: "LORA"`` (and its ``peft_flags``, e.g.
``use_dora``); any other is saved with ``peft_type: "LEANTUNE"`` and ``leantune_variant:
<kind>``, so PEFT refuses it instead of loading it as a plain LoRA that computes something
else; leantune loads it back (or names the variant when this installation lacks it). An adapter whose init rewrote the base (PiSSA, OLoRA, LoftQ) is saved as the
equivalent plain LoRA on the original base, as PEFT's ``path_initial_model_for_weight_conversion``
does: W_res + s B A = W + s [B, -B0] [A; A0], rank 2r, alpha doubled (rsLoRA: times sqrt 2).
That is exact when W_res + s B0 A0 = W; LoftQ's 4-bit Q only approximates W - s B0 A0, so a
LoftQ adapter also gets ``loftq_base.safetensors`` (Q in bitsandbytes' layout): leantune's
``load_adapter`` puts Q back as the base and reproduces the trained model; PEFT ignores the
file and computes the export on the original W.

The model keeps its adapters' configs in ``model.adapter_configs`` and the active set in
``model.active_adapters``.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from leantune.quant.modules import Linear4bit

from leantune.base import ModelError, UsageError
from leantune.peft_core.lora import BASE, BASE_REWRITING_INITS, INITS, LoraLinear, get_variant, variant_names
from leantune.peft_core.safetensors_io import SafetensorsFile, write_safetensors

PREFIX = "base_model.model."
LOFTQ_BASE_FILE = "loftq_base.safetensors"  # a LoftQ adapter's 4-bit base (bitsandbytes layout)
LEANTUNE_PEFT_TYPE = "LEANTUNE"  # peft_type of a variant PEFT cannot load (PEFT refuses the file)
ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT's: the first numbered segment
# adapter_config.json keys leantune cannot honour: loading fails when one is set (truthy)
_UNSUPPORTED = ("lora_bias", "fan_in_fan_out", "modules_to_save", "layer_replication", "target_parameters",
                "trainable_token_indices", "use_qalora", "alora_invocation_tokens", "use_bdlora",
                "megatron_config", "arrow_config")


@dataclass
class AdapterConfig:
    """One adapter's settings (the ``[adapter]`` section, plus PEFT's selection options).

    kind: a registered variant ("lora", "dora", "lora_fa", ...); r, alpha, dropout;
    targets: "all-linear", a list of module-name suffixes, or a full-match regex;
    init: "default" | "gaussian" | "pissa" | "olora" | "loftq" | "none"; rslora: scale by
    alpha / sqrt(r); rank_pattern / alpha_pattern: per-module r / alpha (PEFT semantics);
    layers: ``layers_to_transform`` (list targets only); exclude: PEFT's ``exclude_modules``;
    base_quant: quantize the bases to 4 bits after a base-rewriting init (see ``LoraLinear``);
    loftq_iters: LoftQ's alternating steps. Bad values raise UsageError naming ``adapter.<key>``.
    """

    kind: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list = ALL_LINEAR
    init: str = "default"
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers: list | int | None = None
    exclude: str | list | None = None
    base_quant: dict | None = None
    loftq_iters: int = 1

    def __post_init__(self):
        try:
            get_variant(self.kind)
        except ValueError as e:
            raise UsageError("adapter.kind", str(e)) from None
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UsageError("adapter.r", f"must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                and math.isfinite(self.alpha) and self.alpha > 0):
            raise UsageError("adapter.alpha", f"must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise UsageError("adapter.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise UsageError("adapter.init", f"unknown init {self.init!r} (choose {', '.join(INITS)})")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise UsageError("adapter.targets", "must be \"all-linear\", a regex, or a non-empty list of names")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str) or not self.targets:
            raise UsageError("adapter.targets", f"must be a string or a list of strings, got {self.targets!r}")
        elif self.targets != ALL_LINEAR:
            _compile(self.targets, "adapter.targets")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, key)
            if not isinstance(pattern, dict):
                raise UsageError(f"adapter.{key}", f"must be a table of pattern = value, got {pattern!r}")
            for k, v in pattern.items():
                _compile(k, f"adapter.{key}")
                ok = isinstance(v, int) if key == "rank_pattern" else isinstance(v, (int, float))
                if not ok or isinstance(v, bool) or v <= 0:
                    raise UsageError(f"adapter.{key}.{k}", f"must be a positive number, got {v!r}")
        if isinstance(self.exclude, str):
            _compile(self.exclude, "adapter.exclude")
        elif self.exclude is not None and not (isinstance(self.exclude, (list, tuple))
                                               and all(isinstance(e, str) for e in self.exclude)):
            raise UsageError("adapter.exclude", f"must be a regex or a list of module names, got {self.exclude!r}")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else self.layers
            if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in layers):
                raise UsageError("adapter.layers", f"must be a layer index or a list of them, got {self.layers!r}")
            if layers and isinstance(self.targets, str) and self.targets != ALL_LINEAR:
                # PEFT: "layers_to_transform cannot be used when target_modules is a str"
                raise UsageError("adapter.layers", "cannot be combined with a regex adapter.targets (put the layer "
                                                   "index in the regex, or give adapter.targets as a list)")

    def rank_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) of one module after rank_pattern / alpha_pattern."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))


def _compile(pattern: str, where: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(where, f"bad regular expression {pattern!r} ({e})") from None


def _pattern_value(pattern: dict, module_name: str, default):
    for key, value in pattern.items():  # PEFT's get_pattern_key: the first key that matches
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------
def _linears(model: nn.Module):
    """(name, module) of every linear (nn.Linear, Linear4bit, LoraLinear), none inside a LoraLinear."""
    inside = None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if isinstance(m, LoraLinear):
            inside = name + "."
        if isinstance(m, (nn.Linear, Linear4bit, LoraLinear)):
            yield name, m


def lora_layers(model: nn.Module):
    """(name, LoraLinear) of every adapted linear of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _all_linear_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, _ in _linears(model) if n != OUTPUT_LAYER})


def _is_target(cfg: AdapterConfig, name: str, targets) -> bool:
    ex = cfg.exclude
    if ex:
        if isinstance(ex, str) and re.fullmatch(ex, name):
            return False
        if not isinstance(ex, str) and (name in ex or any(name.endswith("." + e) for e in ex)):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if cfg.layers is None or cfg.layers == []:
        return True
    m = _LAYER_INDEX.match(name)
    if m is None:
        return False
    layers = [cfg.layers] if isinstance(cfg.layers, int) else cfg.layers
    return int(m.group("idx")) in layers


def resolve_targets(model: nn.Module, cfg: AdapterConfig) -> tuple[list, str | list]:
    """The (name, module) pairs ``cfg`` targets, and target_modules as saved (all-linear expanded).

    A module that matches but is not a linear raises UsageError (as PEFT does)."""
    targets = _all_linear_names(model) if cfg.targets == ALL_LINEAR else cfg.targets
    linear = dict(_linears(model))
    found = []
    for name, m in model.named_modules():
        if name and _is_target(cfg, name, targets):
            if name in linear:
                found.append((name, m))
            elif not any(name.startswith(n + ".") for n, l in linear.items() if isinstance(l, LoraLinear)):
                raise UsageError("adapter.targets", f"module {name!r} ({type(m).__name__}) is not a linear layer")
    return found, targets


# ------------------------------------------------------------------------------------------
# injection and named adapters
# ------------------------------------------------------------------------------------------
def _configs(model) -> dict:
    if not hasattr(model, "adapter_configs"):
        model.adapter_configs = {}
        model.active_adapters = []
    return model.adapter_configs


def inject_adapter(model: nn.Module, cfg: AdapterConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Wrap every linear ``cfg`` targets in a ``LoraLinear`` holding adapter ``name``.

    Freezes everything but the adapters (existing adapters keep their flags), makes ``name``
    the active adapter when ``activate``, and returns ``model``. No module matched, or
    contradictory options: UsageError.
    """
    configs = _configs(model)
    if name in configs:
        raise UsageError(name, "an adapter of that name is already on the model")
    found, targets = resolve_targets(model, cfg)
    if not found:
        raise UsageError("adapter.targets", f"no linear layer of the model matches {cfg.targets!r}")
    for mod_name, m in found:
        r, alpha = cfg.rank_alpha(mod_name)
        kw = dict(use_rslora=cfg.rslora, init=cfg.init, kind=cfg.kind, base_quant=cfg.base_quant,
                  loftq_iters=cfg.loftq_iters)
        try:
            if isinstance(m, LoraLinear):
                m.add_adapter(name, r, alpha, cfg.dropout, activate=False, **kw)
            else:
                layer = LoraLinear(m.in_features, m.out_features, r, alpha, cfg.dropout, base=m,
                                   adapter_name=name, **kw).train(m.training)  # the model's mode, as PEFT
                parent, _, child = mod_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer)
        except ValueError as e:
            raise UsageError(f"adapter ({mod_name})", str(e)) from None
    # what trains is what each variant's ``tensors`` lists, whatever the names; all else is frozen
    keep = {id(t) for _, layer in lora_layers(model) for n in layer.adapters
            for t in layer.variant(n).tensors(layer, n).values()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    configs[name] = replace(cfg, targets=targets)
    set_trainable(model, name, True)
    set_active_adapter(model, [name] if activate else list(model.active_adapters))
    return model


def set_active_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Apply adapters ``names`` (one name or a list whose outputs add up) in every layer."""
    names = [names] if isinstance(names, str) else list(names)
    configs = _configs(model)
    for n in names:
        if n not in configs:
            raise ValueError(f"no adapter {n!r} on the model (have {sorted(configs)})")
    model.active_adapters = names
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.adapters]


def set_trainable(model: nn.Module, name: str, trainable: bool = True) -> None:
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.set_trainable(name, trainable)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` the original base model (merged adapters are unmerged)."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: list[str]):
    """``with adapter_rows(model, ["a", "__base__", "b"]):`` row i of the batch uses adapter
    names[i] ("__base__": none) in every layer, whatever the active set."""
    configs = _configs(model)
    for n in names:
        if n != BASE and n not in configs:
            raise ValueError(f"no adapter {n!r} on the model (have {sorted(configs)}, or {BASE!r})")
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.row_adapters = list(names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a linear left with no adapter gets its plain base back."""
    configs = _configs(model)
    if name not in configs:
        raise ValueError(f"no adapter {name!r} on the model (have {sorted(configs)})")
    for mod_name, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
        if not layer.adapters and layer.init_owner is None:
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base)
    del configs[name]
    set_active_adapter(model, [n for n in model.active_adapters if n != name])


def trainable_report(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line; 4-bit weights count as their element count."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


# ------------------------------------------------------------------------------------------
# saving and loading (PEFT's format)
# ------------------------------------------------------------------------------------------
def _num(x):
    return int(x) if float(x).is_integer() else float(x)


def peft_config_dict(cfg: AdapterConfig, base_model_name_or_path: str = "", rank_factor: int = 1) -> dict:
    """adapter_config.json for ``cfg`` with PEFT 0.21's LoraConfig keys. ``rank_factor`` 2:
    the rank-2r export of a base-rewriting init (alpha scaled so s is unchanged)."""
    a = rank_factor if not cfg.rslora else math.sqrt(rank_factor)
    variant = get_variant(cfg.kind)
    return {
        "alpha_pattern": {k: _num(v * a) for k, v in cfg.alpha_pattern.items()},
        "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path) if base_model_name_or_path else None,
        "bias": "none",
        "exclude_modules": cfg.exclude,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": cfg.layers,
        "loftq_config": {},
        "lora_alpha": _num(cfg.alpha * a),
        "lora_bias": False,
        "lora_dropout": cfg.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA" if variant.peft_compatible else LEANTUNE_PEFT_TYPE,
        "r": cfg.r * rank_factor,
        "rank_pattern": {k: v * rank_factor for k, v in cfg.rank_pattern.items()},
        "revision": None,
        "target_modules": cfg.targets,
        "task_type": "CAUSAL_LM",
        "use_rslora": cfg.rslora,
        **(variant.peft_flags if variant.peft_compatible else {"use_dora": False, "leantune_variant": cfg.kind}),
    }


def adapter_state(model: nn.Module, name: str = "default") -> tuple[dict, int]:
    """The tensors to save (PEFT keys) and the rank factor (2 for an exported base-rewriting init)."""
    cfg = _configs(model).get(name)
    if cfg is None:
        raise ValueError(f"no adapter {name!r} on the model (have {sorted(_configs(model))})")
    export = cfg.init in BASE_REWRITING_INITS
    tensors = {}
    for mod_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        ts = {k: t.detach() for k, t in layer.variant(name).tensors(layer, name).items()}
        if export:
            if layer.init_owner != name:
                raise ValueError(f"{mod_name}: the base rewritten by adapter {name!r} is gone; cannot export")
            # W_res + s B A = W + s [B, -B0] [A; A0]
            A0, B0 = layer.init_lora_A.to(ts["lora_A.weight"].dtype), layer.init_lora_B.to(ts["lora_B.weight"].dtype)
            ts["lora_A.weight"] = torch.cat([ts["lora_A.weight"], A0], 0)
            ts["lora_B.weight"] = torch.cat([ts["lora_B.weight"], -B0], 1)
        for suffix, t in ts.items():
            tensors[f"{PREFIX}{mod_name}.{suffix}"] = t
    return tensors, 2 if export else 1


def save_adapter(model: nn.Module, out_dir, name: str = "default", base_model_name_or_path: str = "") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) to ``out_dir``."""
    from leantune.peft_core.checkpoint import write_json

    tensors, factor = adapter_state(model, name)
    cfg = model.adapter_configs[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / "adapter_model.safetensors",
                      metadata={"format": "pt", "leantune_kind": cfg.kind})
    write_json(out / "adapter_config.json", peft_config_dict(cfg, base_model_name_or_path, factor))
    if cfg.init == "loftq":
        _save_loftq_base(model, name, out / LOFTQ_BASE_FILE)
    return out


def _save_loftq_base(model: nn.Module, name: str, path: Path) -> None:
    """The 4-bit bases LoftQ made (Q, with W ~ Q + s B0 A0), in bitsandbytes' layout.

    The rank-2r export W + s [B, -B0] [A; A0] alone is exact only when Q + s B0 A0 = W, which
    LoftQ only approximates; with this file leantune's ``load_adapter`` puts Q back as the base
    (and adds s B0 A0 x, as the live layer does), so the reloaded model is the trained one.
    PEFT ignores the file and gets the export on the original W."""
    from leantune.peft_core.quant_checkpoint import state_to_tensors

    tensors = {}
    for mod_name, layer in lora_layers(model):
        if name in layer.adapters and layer.init_owner == name and layer.is_4bit:
            tensors.update(state_to_tensors(f"{PREFIX}{mod_name}", layer.base.weight, layer.base.quant_state))
    write_safetensors(tensors, path, metadata={"format": "pt", "leantune": "loftq_base"})


def _load_loftq_base(model: nn.Module, name: str, path: Path) -> None:
    """Put the saved LoftQ base back under adapter ``name`` (see :func:`_save_loftq_base`): the
    layer's base becomes Q, and s B0 A0 (the export's second half) is added as the live layer does."""
    from leantune.peft_core.quant_checkpoint import state_from_tensors
    from leantune.peft_core.safetensors_io import read_safetensors

    try:
        tensors = read_safetensors(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the adapter's fault
        raise ModelError(str(path), f"cannot read the LoftQ base: {e}") from None
    for mod_name, layer in lora_layers(model):
        prefix = f"{PREFIX}{mod_name}"
        if name not in layer.adapters or f"{prefix}.weight" not in tensors:
            continue
        if layer.init_owner is not None:
            raise ModelError(str(path), f"{mod_name}: the base was already rewritten by another adapter")
        try:
            packed, state = state_from_tensors(prefix, tensors)
        except (ValueError, KeyError) as e:
            raise ModelError(str(path), f"{mod_name}: {e}") from None
        if tuple(state.shape) != (layer.out_features, layer.in_features):
            raise ModelError(str(path), f"{mod_name}: LoftQ base has shape {list(state.shape)}, this model needs "
                                        f"{[layer.out_features, layer.in_features]}")
        spec = layer.adapters[name]
        r = spec.r // 2
        A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        cdt = layer.base.compute_dtype if layer.is_4bit else None
        layer.base = Linear4bit.from_quantized(packed.to(layer.device), state, bias=layer.base.bias, compute_dtype=cdt)
        layer.base.requires_grad_(False)
        # "" owner: s B0 A0 x is always added (as after deleting the adapter that made a 4-bit base)
        layer.init_owner, layer.init_scaling = "", spec.scaling
        layer.register_buffer("init_lora_A", A[r:].clone(), persistent=False)
        layer.register_buffer("init_lora_B", -B[:, r:].clone(), persistent=False)
        layer.variant_cache.clear()


def config_from_peft(raw, where: str, kind_hint: str | None = None) -> AdapterConfig:
    """An ``AdapterConfig`` from a PEFT adapter_config.json dict; ModelError for what leantune cannot load."""
    if not isinstance(raw, dict):
        raise ModelError(where, "adapter_config.json is not a JSON object")
    own = raw.get("leantune_variant")
    if raw.get("peft_type") == LEANTUNE_PEFT_TYPE or own is not None:
        if not isinstance(own, str) or not own:
            raise ModelError(where, f"peft_type {LEANTUNE_PEFT_TYPE!r} needs a leantune_variant name, got {own!r}")
        try:
            get_variant(own)
        except ValueError:
            raise ModelError(where, f"adapter variant {own!r} is not available in this installation "
                                    f"(have {', '.join(variant_names())})") from None
    elif raw.get("peft_type") != "LORA":
        raise ModelError(where, f"peft_type {raw.get('peft_type')!r} is not supported (only \"LORA\")")
    for key in _UNSUPPORTED:
        if raw.get(key):
            raise ModelError(where, f"{key} = {raw[key]!r} is not supported")
    if raw.get("bias", "none") != "none":
        raise ModelError(where, f"bias = {raw['bias']!r} is not supported (only \"none\")")
    if raw.get("layers_pattern") not in (None, "", [], "layers", ["layers"]):
        raise ModelError(where, f"layers_pattern = {raw['layers_pattern']!r} is not supported")
    if raw.get("target_modules") is None:
        raise ModelError(where, "target_modules is missing")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in ("pissa", "olora"):
        init = init.lower()  # PEFT re-runs these inits on load: the weights are relative to the residual
    elif isinstance(init, str) and init.lower().startswith(("pissa_niter", "corda", "lora_ga")):
        raise ModelError(where, f"init_lora_weights = {init!r} is not supported (convert it to plain LoRA)")
    else:
        init = "none"  # the file holds the weights
    kind = own or ("dora" if raw.get("use_dora") else "lora")
    if not own and not raw.get("use_dora") and kind_hint not in (None, "", "lora", "dora"):
        try:
            v = get_variant(kind_hint)
            if v.peft_compatible and v.peft_flags == get_variant("lora").peft_flags:
                kind = kind_hint
        except ValueError:
            # a PEFT-compatible variant this installation lacks (peft_type "LORA" promises that
            # PEFT's plain LoRA computes its output): load it as plain LoRA
            pass
    try:
        return AdapterConfig(kind=kind, r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8),
                             dropout=raw.get("lora_dropout", 0.0), targets=raw["target_modules"], init=init,
                             rslora=bool(raw.get("use_rslora", False)), rank_pattern=raw.get("rank_pattern") or {},
                             alpha_pattern=raw.get("alpha_pattern") or {}, layers=raw.get("layers_to_transform"),
                             exclude=raw.get("exclude_modules"))
    except UsageError as e:
        raise ModelError(where, f"{e.where.replace('adapter.', '')}: {e.what}") from None


def load_adapter(model: nn.Module, adapter_dir, name: str = "default", trainable: bool = False,
                 activate: bool | None = None) -> nn.Module:
    """Load a PEFT LoRA / DoRA adapter folder as adapter ``name``.

    Every tensor is checked against the model before the model is touched: a key that is not
    a weight of a targeted module, or a shape that differs (an adapter for another base), is a
    ModelError naming the first offending key; so is a missing tensor. The adapter is frozen
    unless ``trainable``, and becomes active when it is the first one (or ``activate``).
    """
    d = Path(adapter_dir)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not d.is_dir():
        raise ModelError(str(d), "adapter folder not found")
    if not cfg_path.is_file():
        raise ModelError(str(d), "no adapter_config.json (not a PEFT adapter folder)")
    if not w_path.is_file():
        has_bin = (d / "adapter_model.bin").exists()
        extra = " (adapter_model.bin is not supported: save with safetensors)" if has_bin else ""
        raise ModelError(str(d), f"no adapter_model.safetensors{extra}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(str(cfg_path), f"not valid JSON ({e})") from None
    except RecursionError:
        raise ModelError(str(cfg_path), "not valid JSON (nested too deeply)") from None
    f = SafetensorsFile(w_path)
    cfg = config_from_peft(raw, str(cfg_path), f.metadata.get("leantune_kind"))
    if name in _configs(model):
        raise UsageError(name, "an adapter of that name is already on the model")
    try:
        found, _ = resolve_targets(model, cfg)
    except UsageError as e:
        raise ModelError(str(cfg_path), e.what) from None
    if not found:
        raise ModelError(str(cfg_path), f"target_modules {cfg.targets!r} match no linear layer of this model")
    variant = get_variant(cfg.kind)
    expected = {}  # key -> (module name, suffix, shape)
    for mod_name, m in found:
        r, _ = cfg.rank_alpha(mod_name)
        for suffix, shape in variant.shapes(m.in_features, m.out_features, r).items():
            expected[f"{PREFIX}{mod_name}.{suffix}"] = (mod_name, suffix, tuple(shape))
    plan = []
    for key in f.keys():
        canon = key
        for alias, suffix in variant.aliases.items():
            if key.endswith("." + alias):
                canon = key[: -len(alias)] + suffix
        if canon not in expected or any(canon == p[1] for p in plan):
            hint = f.metadata.get("leantune_kind")
            why = (f"; the file was saved with leantune's variant {hint!r}, which this installation lacks"
                   if hint and hint != cfg.kind and hint not in variant_names() else "")
            raise ModelError(str(w_path), f"unexpected tensor {key!r}: not a weight of adapter kind {cfg.kind!r} "
                                          f"on a module that target_modules selects in this model{why}")
        mod_name, suffix, shape = expected[canon]
        if tuple(f.shape(key)) != shape:
            raise ModelError(str(w_path), f"tensor {key!r} has shape {list(f.shape(key))}, this model needs "
                                          f"{list(shape)} (an adapter for another base model?)")
        if not f.dtype(key).is_floating_point:
            raise ModelError(str(w_path), f"tensor {key!r} has dtype {f.dtype(key)}, not a float")
        plan.append((key, canon, mod_name, suffix))
    missing = [k for k in expected if k not in {p[1] for p in plan}]
    if missing:
        raise ModelError(str(w_path), f"adapter lacks tensor {missing[0]!r} ({len(missing)} missing)")
    was_first = not _configs(model)
    inject_adapter(model, cfg, name, activate=False)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, _, mod_name, suffix in plan:
            layer = layers[mod_name]
            target = layer.variant(name).tensors(layer, name)[suffix]
            target.copy_(f.read(key, target.dtype).to(target.device))
        if (d / LOFTQ_BASE_FILE).is_file():
            _load_loftq_base(model, name, d / LOFTQ_BASE_FILE)
    set_trainable(model, name, trainable)
    if activate or (activate is None and (was_first or not model.active_adapters)):
        set_active_adapter(model, [name])
    return model


# ------------------------------------------------------------------------------------------
# merging
# ------------------------------------------------------------------------------------------
def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (default: the active ones) into the dense base weights, in place."""
    for mod_name, layer in lora_layers(model):
        try:
            layer.merge(None if name is None else [name])
        except ValueError as e:
            raise ValueError(f"{mod_name}: {e}") from None


def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def _dense(weight: torch.Tensor, bias, dtype) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    return lin


@torch.no_grad()
def merge_and_unload(model: nn.Module, requantize: str | None = None, quant_options: dict | None = None,
                     stats: dict | None = None, dequantize_rest: bool = False) -> nn.Module:
    """Fold the merged and active adapters into the bases and drop the adapter layers.

    Each adapted linear becomes a plain ``nn.Linear`` in its weight's dtype (a 4-bit base is
    dequantized first), or with ``requantize`` ("nf4" | "fp4", ``quant_options``: blocksize,
    double_quant, compute_dtype) a new ``Linear4bit``; then ``stats[module] = ||W - Q(W)|| / ||W||``
    (relative Frobenius error introduced). ``dequantize_rest`` also turns every other
    ``Linear4bit`` dense. Returns ``model``.
    """
    opts = {"blocksize": 64, "double_quant": True, "compute_dtype": None, **(quant_options or {})}
    for mod_name, layer in lora_layers(model):
        w = layer.merged_weight()
        new = _dense(w, layer.base.bias, layer._weight_dtype)
        if requantize:
            new = Linear4bit.from_linear(new, quant_type=requantize, **opts).requires_grad_(False)
            if stats is not None:
                stats[mod_name] = float(torch.linalg.norm(w - new.dequantize(torch.float32)) / torch.linalg.norm(w))
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if dequantize_rest:
        for mod_name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    _dense(m.dequantize(), m.bias, m.weight_dtype))
    for attr in ("adapter_configs", "active_adapters"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def requantization_error(model: nn.Module, quant_type: str, blocksize: int = 64, double_quant: bool = True) -> dict:
    """||W - dequant(quant(W))|| / ||W|| for every decoder linear (what ``quantize`` will store)."""
    from leantune.quant import functional as QF
    from leantune.peft_core.quant_loading import QUANTIZED_LINEAR

    errors = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and QUANTIZED_LINEAR.match(name):
            w = m.weight.detach()
            packed, state = QF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
            deq = QF.dequantize_4bit(packed, state, torch.float32)
            errors[name] = float(torch.linalg.norm(w.float() - deq) / torch.linalg.norm(w.float()))
    return errors


def cmd_merge(args, log=print) -> Path:
    """``leantune merge MODEL_DIR ADAPTER_DIR OUT_DIR [--dtype D] [--quant nf4|fp4]``.

    The base is loaded in fp32 (a 4-bit checkpoint is dequantized), the adapter folded in, and
    the result written as a plain checkpoint in ``--dtype``; with ``--quant`` it is then
    re-quantized to a bitsandbytes 4-bit checkpoint and the relative weight error is reported.
    """
    from leantune.peft_core.checkpoint import load_model, resolve_dtype, save_model

    model_dir, out = Path(args.model_dir), Path(args.out_dir)
    try:
        dtype = resolve_dtype(getattr(args, "dtype", None) or "bfloat16")
    except ValueError as e:
        raise UsageError("--dtype", str(e)) from None
    quant = getattr(args, "quant", None)
    quant = None if quant in (None, "none") else quant
    if quant not in (None, "nf4", "fp4"):
        raise UsageError("--quant", f"unknown quant type {quant!r} (nf4, fp4 or none)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(str(out), "output folder exists and is not empty")
    model = load_model(model_dir, dtype=torch.float32)
    load_adapter(model, args.adapter_dir)
    n = len(lora_layers(model))
    merge_and_unload(model, dequantize_rest=True)
    model.to(dtype)
    if quant is None:
        save_model(model, out, dtype=dtype, copy_tokenizer_from=model_dir)
        log(f"merged the adapter into {n} linear layers; wrote {out}")
        return out
    from leantune.peft_core.quant_checkpoint import quantize_checkpoint

    errors = requantization_error(model, quant)
    tmp = out.parent / f".{out.name}.merged-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp, dtype=dtype, copy_tokenizer_from=model_dir)
        if out.exists():
            out.rmdir()
        quantize_checkpoint(tmp, out, quant_type=quant, compute_dtype=dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = max(errors, key=errors.get)
    log(f"merged the adapter into {n} linear layers; re-quantized to {quant}: relative weight error "
        f"mean {sum(errors.values()) / len(errors):.4f}, max {errors[worst]:.4f} ({worst}); wrote {out}")
    return out
