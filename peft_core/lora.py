"""The LoRA layer, the registry of LoRA variants, and the built-in variant "lora".

    y = W0 x + b + (alpha / r) B A dropout(x)       (rsLoRA: alpha / sqrt(r))

W0 [out, in] is the frozen base (``nn.Linear`` or a 4-bit ``quant.modules.Linear4bit``),
A = ``lora_A[name].weight`` [r, in], B = ``lora_B[name].weight`` [out, r] (Hu et al. 2021,
https://arxiv.org/abs/2106.09685). Default init as Microsoft's loralib and PEFT: A
Kaiming-uniform with a = sqrt(5) (what ``nn.Linear`` does, so A x starts at the scale of a
fresh linear), B = 0 (the adapter starts as the identity edit, training starts from the base)
-- https://github.com/microsoft/LoRA/blob/a0a92e0/loralib/layers.py#L124.
rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by alpha / sqrt(r) so
that higher ranks keep learning.

Other inits (PEFT's names and math):
- ``gaussian``: A ~ N(0, 1/r), B = 0.
- ``pissa`` (https://arxiv.org/abs/2404.02948): W = U S V^T, A = sqrt(S_r / s) V_r^T,
  B = U_r sqrt(S_r / s); the base becomes the residual W - s B A (on a 4-bit base that
  residual is what gets quantized).
- ``olora`` (https://arxiv.org/abs/2406.01775): W = Q R, A = R[:r], B = Q[:, :r]; residual base.
- ``loftq`` (https://arxiv.org/abs/2310.08659): for a base that is to be 4-bit: alternate
  Q = quant(W - s B A) and (A, B) = the rank-r SVD of (W - dequant(Q)) / s; the base becomes
  Q. Needs the full-precision weight (a dense base, quantized here).
- ``none``: A = B = 0, for a layer whose weights are about to be loaded.
An init that rewrites the base keeps the initial (A0, B0) as buffers: when that adapter is
not applied (disabled, another adapter active, a "__base__" row) the layer adds s B0 A0 x
back, so "the base" is always the original W; and a saved adapter is converted to a plain
LoRA on the original W (rank 2r, see ``peft_core.adapters.save_adapter``).

Several named adapters live side by side (``lora_A[name]`` ModuleDicts, as PEFT). ``active``
lists the adapters applied (in turn, see Variants); ``disabled`` switches all of them off;
``forward(x, adapter_names=[...])`` (or ``row_adapters``) picks one adapter per batch row,
"__base__" for none.

Variants: a variant is one small class registered with ``@register_variant(name)``; its
hooks (``init``, ``tensors``/``shapes``, ``forward``, ``delta``, ``delta_weight``,
``merge``/``unmerge``, ``set_trainable``) are called with the layer and the adapter name, and
its class properties (``fused_4bit``, ``linear``, ``peft_compatible``, ``peft_flags``) say
what it allows; :class:`LoraVariant` spells out the contract. "lora" is :class:`LoraVariant`;
the others (``dora``, ``lora_fa``, ``gated``) live in ``peft_core/variants/<name>.py`` and are
imported on first use. Several active adapters are applied in turn, each ``delta`` seeing the
output so far (PEFT's order). Standard LoRA on a 4-bit base runs as one fused autograd
Function (``quant.fused_lora``); every other variant takes the reference path.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.quant import dispatch
from leantune.quant import functional as QF
from leantune.quant.fused_lora import lora_4bit
from leantune.quant.matmul4bit import MatMul4bit
from leantune.quant.modules import Linear4bit

BASE = "__base__"  # per-row selection: this row gets no adapter
INITS = ("default", "gaussian", "pissa", "olora", "loftq", "none")
BASE_REWRITING_INITS = ("pissa", "olora", "loftq")

_VARIANTS: dict[str, "LoraVariant"] = {}


def register_variant(name: str):
    """Class decorator: ``@register_variant("dora")`` makes ``kind = "dora"`` available."""

    def deco(cls):
        if name in _VARIANTS:
            raise ValueError(f"LoRA variant {name!r} is already registered")
        cls.name = name
        _VARIANTS[name] = cls()
        return cls

    return deco


def variant_names() -> list[str]:
    """Registered variants plus the modules of ``peft_core/variants`` (not yet imported)."""
    try:
        from leantune.peft_core import variants
    except ImportError:  # an installation without the variants package
        return sorted(_VARIANTS)
    found = {m.name for m in pkgutil.iter_modules(variants.__path__) if not m.name.startswith("_")}
    return sorted(set(_VARIANTS) | found)


def get_variant(name: str) -> "LoraVariant":
    """The variant registered as ``name``, importing ``peft_core.variants.<name>`` on first use."""
    if name not in _VARIANTS and isinstance(name, str) and name.isidentifier():
        try:
            importlib.import_module(f"leantune.peft_core.variants.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"leantune.peft_core.variants.{name}":
                raise
    if name not in _VARIANTS:
        raise ValueError(f"unknown adapter kind {name!r} (choose {', '.join(variant_names())})")
    return _VARIANTS[name]


@dataclass
class AdapterSpec:
    """One adapter's settings in one layer."""

    kind: str
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# ------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------
class LoraVariant:
    """Standard LoRA; the base class of every variant (override only what differs).

    The contract (every hook gets the layer and the adapter name):

    - ``init(layer, name)``: create the variant's own parameters on the layer (after A and B
      are initialised), e.g. in an ``nn.ParameterDict`` attribute; per-adapter state that is
      not a parameter goes in ``layer.variant_state[name]``, caches that depend on the base
      weight in ``layer.variant_cache`` (cleared whenever the base weight changes).
    - ``tensors(layer, name)``: the adapter's parameters by saved key suffix. They are what is
      saved, what loading copies into, and what trains (``set_trainable``), whatever their
      names; every other parameter of the model is frozen by ``inject_adapter``.
      ``shapes`` gives the same keys with their shapes (checked before loading).
    - ``forward(layer, name, x)``: base(x) plus this adapter, when it is the only one applied.
    - ``delta(layer, name, x, result)``: what the adapter adds to ``result``, the layer's
      output so far (base(x) for the first adapter; several active adapters are applied in
      turn, as PEFT does).
    - ``delta_weight(layer, name)`` / ``merge(layer, name, w, w0)`` / ``unmerge(layer, name, w)``:
      the weight view (``w`` the current fp32 weight, ``w0`` the base with no adapter merged).
      The defaults fold in ``delta_weight``, s B A by default. A variant that overrides
      ``delta`` or ``forward`` must override ``delta_weight`` or ``merge``/``unmerge``;
      otherwise merging it raises UsageError (never a silently wrong weight).
    - ``set_trainable(layer, name, trainable)``.

    Class properties: ``fused_4bit``: may run as ``quant.fused_lora.LoRA4bitFunction`` on a
    4-bit base (only used while ``forward`` and ``delta`` are LoRA's own). ``linear``: the
    merged weight is W + s B A (a base-rewriting init can be exported as a plain LoRA).
    ``peft_compatible``: PEFT loads the saved adapter as LoRA (with ``peft_flags``, the
    adapter_config.json keys that tell PEFT the variant, e.g. ``use_dora``) and computes the
    same output. A variant that is not is saved with ``peft_type`` "LEANTUNE" and
    ``leantune_variant`` in adapter_config.json, so PEFT refuses it instead of loading it as
    plain LoRA. ``aliases``: other key suffixes accepted on load -> the canonical suffix.
    """

    name = "lora"
    fused_4bit = True
    linear = True
    peft_compatible = True
    peft_flags = {"use_dora": False}
    aliases: dict = {}

    def init(self, layer: "LoraLinear", name: str) -> None:
        """Create extra parameters (after A and B are initialised)."""

    def forward(self, layer: "LoraLinear", name: str, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus this adapter: the layer's path when it is the only adapter applied
        (and the fused 4-bit path does not apply). A variant that overrides only ``delta``
        gets base(x) + delta."""
        return self.on_base(layer, name, x, layer.base(x))

    def on_base(self, layer: "LoraLinear", name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``forward`` given base(x) already computed (a mixed-adapter batch computes the base
        once for all its rows). Not used for a variant that overrides ``forward``."""
        if not self.standard_math():
            return (base_out + self.delta(layer, name, x, base_out)).to(base_out.dtype)
        spec = layer.adapters[name]
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        y = base_out.reshape(-1, B.shape[0]).to(A.dtype)  # (M, out)
        # in the adapter's dtype (fp32 adapters on a bf16 base: x cast up, as PEFT)
        xa = F.linear(layer.lora_dropout[name](x.to(A.dtype)), A).reshape(-1, A.shape[0])  # (M, r)
        # y += s * (x_d A^T) B^T
        y = torch.addmm(y, xa, B.t(), alpha=spec.scaling).to(base_out.dtype)
        return y.reshape(*x.shape[:-1], B.shape[0])

    def standard_math(self) -> bool:
        """True when the output is plain LoRA's (neither ``forward`` nor ``delta`` overridden)."""
        return type(self).forward is LoraVariant.forward and type(self).delta is LoraVariant.delta

    def delta(self, layer: "LoraLinear", name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to ``result`` (the output so far): s B A dropout(x), in the
        adapter weights' dtype (as PEFT; the layer casts the sum back to the base's dtype)."""
        spec = layer.adapters[name]
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        xd = layer.lora_dropout[name](x.to(A.dtype))
        return F.linear(F.linear(xd, A), B) * spec.scaling

    def delta_weight(self, layer: "LoraLinear", name: str) -> torch.Tensor:
        """The merged update, fp32 [out, in]: s B A."""
        self._check_mergeable()
        return layer.delta_weight(name)

    def merge(self, layer: "LoraLinear", name: str, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """The weight ``w`` (fp32 [out, in]) with the adapter folded in; ``w0``: the base
        weight with no adapter merged (for variants whose update depends on it)."""
        return w + self.delta_weight(layer, name)

    def unmerge(self, layer: "LoraLinear", name: str, w: torch.Tensor) -> torch.Tensor:
        return w - self.delta_weight(layer, name)

    def _check_mergeable(self) -> None:
        if not self.standard_math() and type(self).delta_weight is LoraVariant.delta_weight:
            from leantune.base import UsageError

            raise UsageError(f"adapter kind {self.name!r}", "the variant overrides delta/forward but says nothing "
                                                           "about merging (override delta_weight, or merge and "
                                                           "unmerge): refusing to merge it as plain LoRA")

    def shapes(self, in_features: int, out_features: int, r: int) -> dict[str, tuple]:
        """Saved tensors: key suffix (after the module name) -> shape."""
        return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}

    def tensors(self, layer: "LoraLinear", name: str) -> dict[str, torch.Tensor]:
        """The adapter's parameters behind ``shapes``: saved, loaded, and trained."""
        return {"lora_A.weight": layer.lora_A[name].weight, "lora_B.weight": layer.lora_B[name].weight}

    def set_trainable(self, layer: "LoraLinear", name: str, trainable: bool) -> None:
        for t in self.tensors(layer, name).values():
            t.requires_grad_(trainable)


_VARIANTS["lora"] = LoraVariant()

# ------------------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """y = W0 x + b + s B A dropout(x) with s = alpha / r (rsLoRA: alpha / sqrt(r)).

    Arguments: ``in_features``, ``out_features``; ``r`` (rank), ``alpha``, ``dropout`` (on the
    adapter's input only); ``base``: the frozen linear (``nn.Linear`` or ``Linear4bit``; None
    makes a fresh ``nn.Linear``); ``use_rslora``; ``init`` (see the module docstring);
    ``kind`` (a registered variant); ``adapter_name``; ``base_quant``: quantize the base to 4
    bits after init (dict of ``quant_type``, ``blocksize``, ``double_quant``,
    ``compute_dtype``; LoftQ always quantizes, nf4 / 64 / double by default);
    ``loftq_iters``; ``param_dtype`` of A and B (fp32: they are cast to the input's dtype in
    the forward, so bf16 compute keeps fp32 master weights).

    ``disabled = True`` gives the original base. Raises ValueError on contradictory
    arguments. More adapters: :meth:`add_adapter`.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, base: nn.Module | None = None, *, use_rslora: bool = False,
                 init: str = "default", kind: str = "lora", adapter_name: str = "default",
                 base_quant: dict | None = None, loftq_iters: int = 1, param_dtype: torch.dtype = torch.float32):
        super().__init__()
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        if base is None:
            base = nn.Linear(in_features, out_features, bias=False)
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise ValueError(f"base must be nn.Linear or Linear4bit, got {type(base).__name__}")
        if (base.in_features, base.out_features) != (in_features, out_features):
            raise ValueError(f"base is [{base.out_features}, {base.in_features}] (out, in) but "
                             f"in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.base = base
        self.base.requires_grad_(False)
        self.param_dtype = param_dtype
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.adapters: dict[str, AdapterSpec] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: list[str] | None = None  # per-row selection set by adapters.adapter_rows
        self.init_owner: str | None = None  # the adapter whose init rewrote the base ("" once deleted)
        self.init_scaling = 0.0
        self.variant_state: dict[str, dict] = {}  # adapter -> its variant's non-parameter state
        self.variant_cache: dict = {}  # variants' caches of base-weight functions (cleared when it changes)
        self._stack_cache = None  # (key, A, B) of the last mixed-adapter batch (_stacked_weights)
        self._scale_cache = None  # (key, scales) of the last mixed-adapter batch (_row_scales)
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora=use_rslora, init=init, kind=kind,
                         base_quant=base_quant, loftq_iters=loftq_iters)

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, *, use_rslora: bool = False,
                    init: str = "default", kind: str = "lora", base_quant: dict | None = None,
                    loftq_iters: int = 1, activate: bool | None = None) -> None:
        """Add adapter ``name`` (active when it is the first, or with ``activate=True``)."""
        if not isinstance(name, str) or not name or "." in name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string without '.', not {BASE!r}; got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r} (choose {', '.join(INITS)})")
        variant = get_variant(kind)
        if init in BASE_REWRITING_INITS:
            if self.init_owner is not None:
                raise ValueError(f"init {init!r} rewrites the base, which adapter {self.init_owner!r} already did")
            if not variant.linear:
                raise ValueError(f"init {init!r} cannot be combined with kind {kind!r}")
            if r > min(self.in_features, self.out_features):
                raise ValueError(f"init {init!r} needs r <= min(in, out) = "
                                 f"{min(self.in_features, self.out_features)}, got {r}")
            if init == "loftq" and self.is_4bit:
                raise ValueError("LoftQ needs the full-precision weight: give it the dense linear, "
                                 "it quantizes the base itself")
            if not (isinstance(loftq_iters, int) and loftq_iters >= 1):
                raise ValueError(f"loftq_iters must be an int >= 1, got {loftq_iters!r}")
        elif base_quant is not None:
            raise ValueError(f"base_quant is for the base-rewriting inits {BASE_REWRITING_INITS}, not {init!r}")
        if base_quant is not None and self.is_4bit:
            raise ValueError("base_quant given but the base is already 4-bit")
        spec = AdapterSpec(kind, r, float(alpha), float(dropout), bool(use_rslora), init)
        dev = self.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=self.param_dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=self.param_dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            d[name].train(self.training)  # a new adapter takes the layer's mode (eval stays eval)
        self.adapters[name] = spec
        self.variant_state[name] = {}
        try:
            self._init_weights(name, base_quant, loftq_iters)
            variant.init(self, name)
        except BaseException:
            self._drop(name)
            raise
        if activate or (activate is None and not self.active):
            self.active = self.active + [name]

    @torch.no_grad()
    def _init_weights(self, name: str, base_quant: dict | None, loftq_iters: int) -> None:
        spec = self.adapters[name]
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        s, r = spec.scaling, spec.r
        if spec.init == "default":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
            return
        if spec.init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
            nn.init.zeros_(B)
            return
        if spec.init == "none":
            A.zero_()
            B.zero_()
            return
        w = self.base_weight(torch.float32).float()  # (out, in)
        quant = None
        if spec.init == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            sr = (S[:r] / s).sqrt()
            a, b = sr[:, None] * Vh[:r], U[:, :r] * sr[None, :]
        elif spec.init == "olora":
            Q, R = torch.linalg.qr(w)
            a, b = R[:r].contiguous(), Q[:, :r].contiguous()
        else:  # loftq
            quant = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, **(base_quant or {})}
            res = w
            for _ in range(loftq_iters):
                packed, state = QF.quantize_4bit(res, blocksize=quant["blocksize"], quant_type=quant["quant_type"],
                                                 double_quant=quant["double_quant"])
                U, S, Vh = torch.linalg.svd(w - QF.dequantize_4bit(packed, state, torch.float32),
                                            full_matrices=False)
                sr = (S[:r] / s).sqrt()
                a, b = sr[:, None] * Vh[:r], U[:, :r] * sr[None, :]
                res = w - s * (b @ a)
        A.copy_(a)
        B.copy_(b)
        self.init_owner, self.init_scaling = name, s
        self.register_buffer("init_lora_A", a.clone().to(self.param_dtype), persistent=False)
        self.register_buffer("init_lora_B", b.clone().to(self.param_dtype), persistent=False)
        if spec.init == "loftq":
            state.dtype = self._weight_dtype  # dequantize to the dtype the dense weight had
            self.base = Linear4bit.from_quantized(packed, state, bias=self.base.bias,
                                                  compute_dtype=quant.get("compute_dtype"))
            self.base.requires_grad_(False)
        else:
            self._set_base_weight(w - s * (b @ a), base_quant)

    def _set_base_weight(self, w: torch.Tensor, base_quant: dict | None = None) -> None:
        """Replace the base weight with ``w`` (dense: in place; 4-bit or base_quant: quantized)."""
        if self.is_4bit or base_quant is not None:
            opts = ({"quant_type": self.base.quant_type, "blocksize": self.base.blocksize,
                     "double_quant": self.base.double_quant, "compute_dtype": self.base.compute_dtype}
                    if self.is_4bit else {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                          "compute_dtype": None, **base_quant})
            packed, state = QF.quantize_4bit(w.to(self._weight_dtype), blocksize=opts["blocksize"],
                                             quant_type=opts["quant_type"], double_quant=opts["double_quant"])
            self.base = Linear4bit.from_quantized(packed, state, bias=self.base.bias,
                                                  compute_dtype=opts["compute_dtype"])
            self.base.requires_grad_(False)
        else:
            self.base.weight.data.copy_(w.to(self.base.weight.dtype))
        self.variant_cache.clear()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerged first; a rewritten base gets its s B0 A0 back)."""
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r} in this layer")
        if name in self.merged:
            self.unmerge()
        if self.init_owner == name:
            if self.is_4bit:
                self.init_owner = ""  # keep adding s B0 A0: the 4-bit residual cannot absorb it exactly
            else:
                with torch.no_grad():
                    self._set_base_weight(self.base.weight.float() + self._init_delta_weight())
                self._clear_init()
        self._drop(name)

    def _drop(self, name: str) -> None:
        for d in self.children():  # lora_A, lora_B, lora_dropout and any variant's dicts
            if isinstance(d, (nn.ModuleDict, nn.ParameterDict)) and name in d:
                del d[name]
        self.adapters.pop(name, None)
        self.variant_state.pop(name, None)
        self.active = [n for n in self.active if n != name]
        if self.init_owner == name:
            self._clear_init()

    def _clear_init(self) -> None:
        self.init_owner = None
        for b in ("init_lora_A", "init_lora_B"):
            self._buffers.pop(b, None)

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        get_variant(self.adapters[name].kind).set_trainable(self, name, trainable)

    def variant(self, name: str) -> LoraVariant:
        return get_variant(self.adapters[name].kind)

    # -- the base ------------------------------------------------------------------------
    @property
    def is_4bit(self) -> bool:
        return isinstance(self.base, Linear4bit)

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    @property
    def _weight_dtype(self) -> torch.dtype:
        return self.base.weight_dtype if self.is_4bit else self.base.weight.dtype

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense base weight [out, in] (the parameter itself for nn.Linear; dequantized for 4-bit)."""
        if self.is_4bit:
            return self.base.dequantize(dtype)
        w = self.base.weight
        return w if dtype is None else w.to(dtype)

    def base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias, differentiable in x."""
        if self.is_4bit:
            cdt = self.base.compute_dtype or x.dtype
            return MatMul4bit.apply(x.to(cdt), self.base.weight, self.base.quant_state, None).to(x.dtype)
        return F.linear(x, self.base.weight.to(x.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """s B A [out, in] in fp32."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.adapters[name].scaling * (B @ A)

    def _init_delta_weight(self) -> torch.Tensor:
        return self.init_scaling * (self.init_lora_B.float() @ self.init_lora_A.float())

    # -- forward -------------------------------------------------------------------------
    def _needs_init_delta(self, applied) -> bool:
        return self.init_owner is not None and self.init_owner not in applied and self.init_owner not in self.merged

    def _init_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s B0 A0 x: what a base-rewriting init took out of the base."""
        A0, B0 = self.init_lora_A.to(x.dtype), self.init_lora_B.to(x.dtype)
        return F.linear(F.linear(x, A0), B0) * self.init_scaling

    def _fusable(self, name: str) -> bool:
        v = self.variant(name)
        return self.is_4bit and v.fused_4bit and v.standard_math()

    def _fused(self, x: torch.Tensor, name: str) -> torch.Tensor:
        spec, base = self.adapters[name], self.base
        cdt = base.compute_dtype or x.dtype
        xc = x.to(cdt)
        dropout = self.lora_dropout[name]
        x_drop = dropout(xc) if (self.training and not isinstance(dropout, nn.Identity)) else None
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # the LoRA products in their dtype
        y = lora_4bit(xc, base.weight, base.quant_state, base.bias, A, B, spec.scaling, x_drop)
        return y.to(x.dtype)

    def _compute(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """base(x) plus the adapters ``names`` (and s B0 A0 x when the init owner is not among them)."""
        if len(names) == 1:
            n = names[0]
            out = self._fused(x, n) if self._fusable(n) else self.variant(n).forward(self, n, x)
        else:
            out = self.base(x)
            dt = out.dtype
            for n in names:  # in turn, each on the output so far (PEFT's order and DoRA chaining)
                out = out + self.variant(n).delta(self, n, x, out)
            out = out.to(dt)  # deltas in the adapters' dtype (fp32), the output in the base's
        if self._needs_init_delta(names):
            out = out + self._init_delta(x)
        return out

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        rows = adapter_names if adapter_names is not None else self.row_adapters
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self._compute(x, [])
        if rows is not None:
            return self._forward_rows(x, rows)
        return self._compute(x, [n for n in self.active if n in self.adapters and n not in self.merged])

    def _forward_rows(self, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
        if self.merged:
            raise ValueError("per-row adapter selection needs unmerged adapters (call unmerge first)")
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries for a batch of {x.shape[0]} rows")
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(rows):
            groups.setdefault(n, []).append(i)
        if len(groups) == 1:
            n = rows[0]
            return self._compute(x, [n] if n in self.adapters else [])
        base_out = self.base(x)  # once for every row (the base dominates a decode step)
        stacked = [n for n in groups if self._stackable(n)]
        out = self._stacked_lora(x, base_out, rows, stacked) if stacked else base_out
        for n, idx in groups.items():
            names = [n] if n in self.adapters else []
            if (n in stacked or not names) and not self._needs_init_delta(names):
                continue  # already right: a stacked adapter's rows, or base rows (base(x) itself)
            idx_t = torch.tensor(idx, device=x.device)
            xs = x.index_select(0, idx_t)
            if n in stacked:
                ys = out.index_select(0, idx_t) + self._init_delta(xs)
            elif names and type(self.variant(n)).forward is not LoraVariant.forward:
                ys = self._compute(xs, names)  # a variant with its own forward: its own base pass
            else:
                ys = base_out.index_select(0, idx_t)
                ys = self.variant(n).on_base(self, n, xs, ys) if names else ys
                if self._needs_init_delta(names):
                    ys = ys + self._init_delta(xs)
            out = out.index_copy(0, idx_t, ys.to(out.dtype))
        return out

    def _stackable(self, name: str) -> bool:
        """Standard LoRA with no dropout running: its rows join one stacked product."""
        if name not in self.adapters or not self.variant(name).standard_math():
            return False
        return not self.training or isinstance(self.lora_dropout[name], nn.Identity)

    def _stacked_weights(self, names):
        """[A_1; A_2; ...] (R, in) and [B_1, B_2, ...] (out, R), kept while no weight changes
        (a server's decode steps reuse them; training bumps the versions every step)."""
        ws = [(self.lora_A[n].weight, self.lora_B[n].weight) for n in names]
        key = tuple((n, id(a), a._version, id(b), b._version) for n, (a, b) in zip(names, ws))
        hit = self._stack_cache
        if hit is None or hit[0] != key or torch.is_grad_enabled():
            stacked = torch.cat([a for a, _ in ws]), torch.cat([b for _, b in ws], dim=1)
            if torch.is_grad_enabled():
                return stacked
            self._stack_cache = hit = (key, *stacked)
        return hit[1], hit[2]

    def _stacked_lora(self, x, base_out, rows, names):
        """base(x) plus, on each row, its own adapter's s B A x, for all the ``names`` at once
        (S-LoRA's batched form): xa = x [A_1; A_2; ...]^T with every column outside the row's
        adapter zeroed (its scale inside), then one addmm with [B_1, B_2, ...]. Rows of other
        adapters (and of the base) get exact zeros: their output stays base(x)."""
        A, B = self._stacked_weights(names)
        scale = self._row_scales(rows, names, A.dtype, x.device)
        lead = x.shape[:-1]
        xa = F.linear(x.to(A.dtype), A) * scale.view(len(rows), *([1] * (len(lead) - 1)), -1)
        y = base_out.reshape(-1, B.shape[0]).to(A.dtype)
        y = torch.addmm(y, xa.reshape(-1, A.shape[0]), B.t())
        return y.to(base_out.dtype).reshape(*lead, B.shape[0])

    def _row_scales(self, rows, names, dtype, device):
        """(rows, R): row i's adapter scaling on its adapter's columns of the stacked A, 0
        elsewhere; kept while the rows and adapters stay (a decode batch keeps them for many
        steps)."""
        key = (tuple(rows), tuple((n, self.adapters[n].r, self.adapters[n].scaling) for n in names), dtype, device)
        hit = self._scale_cache
        if hit is not None and hit[0] == key:
            return hit[1]
        scale = torch.zeros(len(rows), sum(self.adapters[n].r for n in names), dtype=dtype)
        col = 0
        for n in names:
            r = self.adapters[n].r
            scale[torch.tensor([row == n for row in rows]), col:col + r] = self.adapters[n].scaling
            col += r
        scale = scale.to(device)
        self._scale_cache = (key, scale)
        return scale

    # -- merging -------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the dense base weight."""
        if self.is_4bit:
            raise ValueError("cannot merge into a 4-bit base in place (use adapters.merge_and_unload)")
        w0 = None
        for n in (self.active if names is None else names):
            if n not in self.adapters or n in self.merged:
                continue
            w0 = self.unmerged_base_weight() if w0 is None else w0
            w = self.base.weight
            w.data.copy_(self.variant(n).merge(self, n, w.float(), w0).to(w.dtype))
            self.merged.append(n)
            self.variant_cache.clear()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out again (in reverse order)."""
        while self.merged:
            n = self.merged.pop()
            w = self.base.weight
            w.data.copy_(self.variant(n).unmerge(self, n, w.float()).to(w.dtype))
            self.variant_cache.clear()

    @torch.no_grad()
    def unmerged_base_weight(self) -> torch.Tensor:
        """fp32 [out, in]: the base weight with the merged adapters taken out (a copy)."""
        w = self.base_weight(torch.float32).float().clone()
        for n in reversed(self.merged):
            w = self.variant(n).unmerge(self, n, w)
        return w

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """fp32 [out, in]: the base with the merged and the active adapters folded in (and
        s B0 A0 when the adapter that rewrote the base is neither)."""
        applied = [n for n in self.active if n in self.adapters and n not in self.merged]
        w = self.base_weight(torch.float32).float().clone()
        w0 = self.unmerged_base_weight() if (self.merged and applied) else w.clone()
        if self._needs_init_delta(applied):
            w += self._init_delta_weight()
        for n in applied:  # a copy: the variants' merge state of an unmerged adapter is unused
            w = self.variant(n).merge(self, n, w, w0)
        return w

    def extra_repr(self) -> str:
        specs = ", ".join(f"{n}: {s.kind} r={s.r} alpha={s.alpha:g}" + (" rslora" if s.use_rslora else "")
                          for n, s in self.adapters.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, [{specs}], "
                f"active={self.active}" + (", disabled" if self.disabled else ""))
