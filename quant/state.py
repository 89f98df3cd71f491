"""The state of one 4-bit quantized tensor, shared by the reference, C++ and Triton paths.

Layout (bitsandbytes' serialization, see ../shared/CONTRACT.md):

- ``packed``: uint8, ``ceil(numel / 2)`` bytes, two 4-bit codes a byte, element ``2j`` in
  the HIGH nibble and ``2j + 1`` in the low nibble. Stored flat; bitsandbytes keeps it as
  ``(ceil(numel / 2), 1)`` in checkpoints.
- ``absmax``: one scale per block of ``blocksize`` consecutive elements (row-major over the
  original shape; the last block may be short). fp32 without double quantization; with
  double quantization uint8 indices into ``nested.code``.
- ``code``: fp32 [16], the NF4 or FP4 value table (index = 4-bit code).

Dequantized value of element i::

    scale(b) = absmax[b]                                             (plain)
             = nested.code[absmax[b]] * nested.absmax[b // nested.blocksize] + nested.offset
    w[i]     = code[nibble(i)] * scale(i // blocksize)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NestedState:
    """Double quantization of the absmax vector (8-bit dynamic map, blockwise)."""

    absmax: torch.Tensor  # fp32 [ceil(n_blocks / blocksize)]
    code: torch.Tensor  # fp32 [256], bitsandbytes' signed dynamic map
    blocksize: int  # 256
    offset: float  # the mean of the absmax vector that was subtracted before quantizing


@dataclass
class QuantState:
    quant_type: str  # "nf4" | "fp4"
    blocksize: int  # 32 .. 4096, power of two
    shape: tuple  # the original tensor's shape
    dtype: torch.dtype  # the original (and default compute) dtype
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] when nested is set
    code: torch.Tensor  # fp32 [16]
    nested: NestedState | None = None
    # fp32 [n_blocks] decoded scales, a cache the owner may attach (never serialized): the CPU
    # kernels take decoded scales, and decoding per call would cost more than the dequantize
    scales: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device) -> "QuantState":
        nested = None
        if self.nested is not None:
            nested = NestedState(
                self.nested.absmax.to(device), self.nested.code.to(device),
                self.nested.blocksize, self.nested.offset,
            )
        return QuantState(
            self.quant_type, self.blocksize, tuple(self.shape), self.dtype,
            self.absmax.to(device), self.code.to(device), nested,
        )
