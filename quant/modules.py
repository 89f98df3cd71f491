"""``Linear4bit``, a linear layer whose weight is frozen in NF4 / FP4, and the swap function.

The packed codes and the quantization state are buffers, so ``.to(device)`` moves them and
``state_dict`` / ``load_state_dict`` carry them; the checkpoint format of bitsandbytes
(``P.weight.absmax`` ...) is written and read by ``quant.serialize``.

    buffer              dtype / shape
    weight              uint8 [ceil(out * in / 2)]   two codes a byte, element 2j high nibble
    absmax              fp32 [n_blocks], or uint8 [n_blocks] with double quantization
    quant_map           fp32 [16]
    nested_absmax       fp32 [ceil(n_blocks / 256)]          (double quantization only)
    nested_quant_map    fp32 [256]                            (double quantization only)
    nested_offset       fp32 []                               (double quantization only)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from leantune.base import ModelError

from leantune.quant import dispatch
from leantune.quant import functional as F
from leantune.quant.matmul4bit import MatMul4bit
from leantune.quant.state import NestedState, QuantState


class Linear4bit(nn.Module):
    """y = x W^T + b with W [out_features, in_features] frozen in 4 bits.

    ``compute_dtype``: x is cast to it (and W dequantized in it) for the matmul, and the
    output cast back to x's dtype; None computes in x's dtype. Only x (and the bias, if it
    requires grad) get gradients; W is a buffer. Build one with :meth:`from_linear` or
    :meth:`from_quantized`; the constructor makes zero buffers of the right shapes (for
    ``load_state_dict``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 weight_dtype: torch.dtype = torch.float32, nested_blocksize: int = 256, device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        F.check_blocksize(blocksize)
        F.get_code(quant_type)  # validates quant_type
        if double_quant:
            F.check_blocksize(nested_blocksize, "nested_blocksize")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.nested_blocksize = int(nested_blocksize)
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        numel = self.in_features * self.out_features
        n_blocks = -(-numel // self.blocksize)
        self.register_buffer("weight", torch.zeros(-(-numel // 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(
            n_blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device))
        self.register_buffer("quant_map", F.get_code(quant_type, device))
        self._offset = 0.0
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // self.nested_blocksize), device=device))
            self.register_buffer("nested_quant_map", F.create_dynamic_map().to(device))
            self.register_buffer("nested_offset", torch.zeros((), device=device))
        self.register_buffer("scales", None, persistent=False)  # decoded absmax cache
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """A layer holding an already quantized weight (``state.shape`` = [out, in])."""
        if len(state.shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D [out, in], got shape {tuple(state.shape)}")
        F.check_state(packed, state)
        out_features, in_features = (int(s) for s in state.shape)
        nested = state.nested
        layer = cls(in_features, out_features, bias=bias is not None, quant_type=state.quant_type,
                    blocksize=state.blocksize, double_quant=nested is not None, compute_dtype=compute_dtype,
                    weight_dtype=state.dtype, nested_blocksize=nested.blocksize if nested else 256,
                    device="meta")
        layer.weight = packed.reshape(-1)
        layer.absmax = state.absmax
        layer.quant_map = state.code
        if nested is not None:
            layer.nested_absmax = nested.absmax
            layer.nested_quant_map = nested.code
            layer.nested_offset = torch.tensor(nested.offset, dtype=torch.float32, device=packed.device)
            layer._offset = float(nested.offset)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize ``linear.weight`` (fp32 / fp16 / bf16); the bias is copied as is.

        Raises ValueError for a bad blocksize / quant type or a NaN / Inf weight.
        """
        packed, state = F.quantize_4bit(linear.weight.detach(), blocksize=blocksize, quant_type=quant_type,
                                        double_quant=double_quant)
        return cls.from_quantized(packed, state, bias=linear.bias, compute_dtype=compute_dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.double_quant:
            self._offset = float(self.nested_offset)  # cached: no device sync in forward
        self.scales = None

    @property
    def quant_state(self) -> QuantState:
        """The :class:`QuantState` of the current buffers (cheap: no copies)."""
        nested = None
        if self.double_quant:
            nested = NestedState(self.nested_absmax, self.nested_quant_map, self.nested_blocksize, self._offset)
        state = QuantState(self.quant_type, self.blocksize, (self.out_features, self.in_features),
                           self.weight_dtype, self.absmax, self.quant_map, nested)
        if self.weight.device.type == "cpu":
            if self.scales is None or self.scales.device != self.weight.device:
                F.check_state(self.weight, state)
                self.scales = F.decode_absmax(state).contiguous()
            state.scales = self.scales
        return state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] in ``dtype`` (default: the dtype it was quantized from)."""
        return dispatch.dequantize_4bit(self.weight, self.quant_state, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        y = MatMul4bit.apply(x, self.weight, self.quant_state, self.bias)  # (..., out)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def replace_linears(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, skip=("lm_head",)) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` for a :class:`Linear4bit`, in place; returns ``model``.

    A linear is skipped when an entry of ``skip`` is its full name or a dotted suffix of it
    ("lm_head" skips "lm_head" and "model.lm_head"). Each linear is quantized and swapped in
    turn, so its full-precision weight can be freed before the next one is quantized. A NaN /
    Inf weight raises ModelError naming the parameter.
    """
    F.check_blocksize(blocksize)
    F.get_code(quant_type)
    if isinstance(skip, str):
        skip = (skip,)
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and not _skipped(name, skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        try:
            q = Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=blocksize,
                                       double_quant=double_quant, compute_dtype=compute_dtype)
        except ValueError as e:
            raise ModelError(f"{name}.weight", str(e)) from None
        setattr(parent, child, q)
        del linear  # the last reference to the full-precision layer
    return model
