"""NF4 / FP4 blockwise quantization in plain PyTorch: the spec every kernel is tested against.

Everything here reproduces, bit for bit, what bitsandbytes 0.50 computes on CPU
(``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` /
``quantize_blockwise``); tests/test_quant_reference.py checks it against golden files and,
when installed, against bitsandbytes itself. The layout is :mod:`quant.state`.

4-bit quantization of a tensor ``w`` (``numel`` n, block size B, code table ``code``)::

    x        = w.flatten().float()                     # bf16 / fp16 are exact in fp32
    absmax_b = max |x[i]|  over block b = [bB, (b+1)B) (the last block may be short)
    s_i      = clamp(x[i] * (1 / absmax_b), -1, 1)     # full blocks (reciprocal, then multiply)
             = clamp(x[i] / absmax_b, -1, 1)           # the short tail block (true division)
    q_i      = index of the code value nearest to s_i; a tie at a midpoint goes to the
               smaller code VALUE                       # torch.bucketize, right=False
    packed_j = q_{2j} << 4 | q_{2j+1}                  # element 2j in the HIGH nibble;
                                                       # odd n: the pad element is s = 0

Double quantization (``double_quant=True``) then stores absmax as 8 bits::

    offset   = mean(absmax)                            # fp32, torch's mean
    absmax   -> quantize_blockwise_8bit(absmax - offset, dynamic map, 256)
    scale_b  = dyn[absmax_q[b]] * nested_absmax[b // 256] + offset   # two fp32 roundings

and dequantization is ``w_i = (code[q_i] * scale_{i // B}).to(dtype)`` (fp32 product, one
rounding to the output dtype, round-to-nearest-even).

Details of bitsandbytes' CPU path that matter for bit identity (and differ from its CUDA
kernels, whose decision trees compare with strict ``>`` against literal thresholds):

* full blocks multiply by ``1 / absmax`` while the short tail block divides by absmax;
* absmax is clamped to >= 1e-38 before dividing; a full all-zero block stores absmax 0,
  an all-zero *tail* block stores the clamped 1e-38;
* FP4 ties: bucketize over the value-sorted table, so a tie goes to the lower value (for
  negative numbers the larger magnitude; CUDA picks the smaller magnitude). The sorted order
  is bitsandbytes' ``torch.argsort`` of the FP4 table, which puts code 0 before code 8 (both
  are +0.0 in the table): s in (-0.0026, 0] gets code 0, s in (0, 0.0026] gets code 8
  (CUDA: code 8 for s < 0, code 0 for s >= 0);
* the 8-bit blockwise quantizer of the nested absmax (C, ``cquantize_blockwise_cpu_fp32``) is
  not a nearest-code search: it maps ``v = clamp(x * (1 / absmax), -1, 1)`` to the bin
  ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` of a 65536-entry table that holds, for each bin
  centre ``-1 + 2 i / 65535``, the nearest code (ties to the lower code). Near a midpoint
  that can differ by one code from the exact nearest code; a block whose absmax is 0 gets
  code 0 everywhere;
* dequantization indexes blocks over the flattened tensor (element i, block i // B), as
  bitsandbytes' CUDA kernels and its default backend do. Its CPU C dequantize kernel instead
  assumes no block straddles a row (``shape[-1] % blocksize == 0``) and returns wrong values
  otherwise (bitsandbytes 0.50.2); the tests compare against it on row-aligned shapes only.
"""
from __future__ import annotations

import math

import torch

from leantune.quant.state import NestedState, QuantState

__all__ = [
    "NF4_CODE", "FP4_CODE", "VALID_BLOCKSIZES", "create_dynamic_map",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "quantize_4bit", "dequantize_4bit", "decode_absmax", "get_code", "check_blocksize",
    "check_state", "unpack_codes",
]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), sorted; code 7 is 0.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, divided
# (in fp32, as bitsandbytes does) by the largest magnitude 12. Code 8 ("-0") is +0.0: the
# table bitsandbytes writes has the integer -0, which is 0.
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
).div_(12.0)
# torch.argsort(FP4_CODE) as bitsandbytes gets it on CPU (of the two zeros, code 0 first).
_FP4_ORDER = torch.tensor([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=torch.int64)

_LUT_SIZE = 65536  # bins of the CPU 8-bit quantizer's lookup table


def check_blocksize(blocksize, what: str = "blocksize") -> int:
    """Return ``blocksize`` as int, or raise ValueError naming it (32..4096, a power of two)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(
            f"invalid {what} {blocksize!r}: must be a power of two from 32 to 4096 "
            f"({', '.join(map(str, VALID_BLOCKSIZES))})"
        )
    return blocksize


def get_code(quant_type: str, device=None) -> torch.Tensor:
    """The fp32 [16] value table of ``quant_type`` ("nf4" | "fp4"), a fresh copy."""
    if quant_type == "nf4":
        code = NF4_CODE
    elif quant_type == "fp4":
        code = FP4_CODE
    else:
        raise ValueError(f"invalid quant_type {quant_type!r}: must be 'nf4' or 'fp4'")
    return code.to(device=device, copy=True)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (Dettmers 2015): 256 sorted fp32 values in [-1, 1].

    For each exponent ``e`` (0 .. 6) the fraction range [0.1, 1] is split into linear bins
    whose means, times ``10 ** (e - 6)``, are the codes (with both signs when signed); then
    0 and 1.0. The arithmetic (fp32 linspace, fp32 means, Python-float scaling) is the same
    as bitsandbytes', so the table is bit-identical.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic map has {len(data)} values, expected {2 ** total_bits}")
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_DYNAMIC_MAP = create_dynamic_map()


def _check_float(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {x.dtype}")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf); cannot quantize")


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """The CPU quantizer's table: for bin centre -1 + 2i/65535, the nearest code (ties down)."""
    code = code.float()
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    centre = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)
    # number of midpoints strictly below the centre = index of the nearest code
    return torch.searchsorted(midpoints, centre, right=False)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256):
    """8-bit blockwise quantization -> (uint8 codes shaped like x, fp32 absmax [n_blocks]).

    bitsandbytes' CPU ``quantize_blockwise`` (used for the nested absmax)::

        absmax_b = max |x| over block b          (NaN ignored)
        v        = clamp(x * (1 / absmax_b), -1, 1)
        q        = lut[trunc(((v + 1) * 0.5) * 65535 + 0.5)]      (absmax_b == 0: q = 0)

    ``code`` must be sorted ascending (the dynamic map is); default: the signed dynamic map.
    """
    if blocksize <= 0:
        raise ValueError(f"invalid blocksize {blocksize!r}: must be positive")
    _check_float(x, "input")
    if code is None:
        code = _DYNAMIC_MAP
    code = code.to(device=x.device, dtype=torch.float32)
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(n_blocks, blocksize)
    absmax = blocks.abs().nan_to_num(nan=0.0).amax(dim=1) if n else blocks.new_zeros(0)
    inv = 1.0 / absmax  # fp32 reciprocal, then multiply, as the C kernel does
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    t = ((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5
    idx = t.nan_to_num(nan=0.0).to(torch.int64).clamp_(0, _LUT_SIZE - 1)  # trunc toward zero
    q = _lut_8bit(code)[idx]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``code[q[i]] * absmax[i // blocksize]`` in fp32, then cast; shaped like ``q``."""
    if blocksize <= 0:
        raise ValueError(f"invalid blocksize {blocksize!r}: must be positive")
    if q.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {q.dtype}")
    if code is None:
        code = _DYNAMIC_MAP
    flat = q.reshape(-1).to(torch.int32)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} values, expected {n_blocks} for {n} codes / {blocksize}")
    values = code.to(device=q.device, dtype=torch.float32)[flat]
    return _scale_blocks(values, absmax.to(device=q.device, dtype=torch.float32), blocksize).to(dtype).reshape(q.shape)


def _scaled_blocks(x: torch.Tensor, blocksize: int):
    """absmax and the clamped scaled values of flat fp32 ``x``, exactly as bitsandbytes' CPU path."""
    n = x.numel()
    rem = n % blocksize
    full = n - rem
    body = x[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().max(dim=-1)[0]
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # The short tail block divides (full blocks multiply by the reciprocal) and keeps
        # the clamped absmax: bitsandbytes' default-backend quantize_4bit does this.
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
    nested_blocksize: int = 256,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` (fp32 / fp16 / bf16, any shape) to packed 4-bit codes.

    Returns ``(packed, state)``: ``packed`` uint8 flat ``[ceil(numel / 2)]`` (element 2j in
    the high nibble), ``state`` a :class:`QuantState` (see the module docstring for the math).
    Raises ValueError for a bad blocksize / quant type / dtype, a NaN / Inf in ``w``, or (with
    ``double_quant``) block absmax values whose float32 mean overflows.
    """
    check_blocksize(blocksize)
    if double_quant:
        check_blocksize(nested_blocksize, "nested_blocksize")
    code = get_code(quant_type, w.device)
    _check_float(w, "weight")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    _check_finite(w, "weight")

    absmax, scaled = _scaled_blocks(w.detach().reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    # bucketize over the value-sorted table: nearest code, a tie to the lower value
    order = torch.arange(16, device=w.device) if quant_type == "nf4" else _FP4_ORDER.to(w.device)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    q = order[torch.bucketize(scaled, bounds, out_int32=True)].to(torch.uint8)
    packed = (q[::2] << 4) | q[1::2]

    return packed, make_quant_state(absmax, w, blocksize, quant_type, double_quant, nested_blocksize)


def make_quant_state(absmax: torch.Tensor, w: torch.Tensor, blocksize: int, quant_type: str,
                     double_quant: bool, nested_blocksize: int = 256) -> QuantState:
    """The QuantState of ``w`` quantized with per-block ``absmax`` (fp32), the absmax itself
    double-quantized when asked: minus its mean, 8-bit dynamic map, ``nested_blocksize`` blocks."""
    nested = None
    if double_quant:
        offset = absmax.mean()
        if not bool(torch.isfinite(offset)):
            # bitsandbytes stores the inf offset (and an inf nested absmax) and dequantizes
            # to NaN; refuse here rather than make a state dequantize_4bit refuses
            raise ValueError("double_quant: the mean of the block absmax values overflows float32 "
                             f"(largest {float(absmax.max()):.4g}); quantize with double_quant=False")
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, _DYNAMIC_MAP, nested_blocksize)
        nested = NestedState(
            absmax=nested_absmax, code=_DYNAMIC_MAP.to(w.device, copy=True),
            blocksize=nested_blocksize, offset=float(offset),
        )
        absmax = qabsmax
    return QuantState(
        quant_type=quant_type, blocksize=blocksize, shape=tuple(w.shape), dtype=w.dtype,
        absmax=absmax, code=get_code(quant_type, w.device), nested=nested,
    )


def decode_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block scales ``[n_blocks]`` (undoing double quantization if present).

    ``scale_b = nested.code[absmax[b]] * nested.absmax[b // nested.blocksize] + nested.offset``
    with two fp32 roundings (no fused multiply-add), as bitsandbytes computes it.
    """
    if state.nested is None:
        if state.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {state.absmax.dtype}")
        return state.absmax
    nested = state.nested
    if state.absmax.dtype != torch.uint8:
        raise ValueError(f"absmax must be uint8 with double quantization, got {state.absmax.dtype}")
    scale = dequantize_blockwise_8bit(state.absmax, nested.absmax, nested.code, nested.blocksize)
    offset = torch.tensor(nested.offset, dtype=torch.float32, device=scale.device)
    return scale + offset


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes of ``packed`` as int32 ``[numel]`` (element 2j = high nibble of byte j)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:numel].to(torch.int32)


def _scale_blocks(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] * scale[i // blocksize]`` (fp32, one rounding), without expanding ``scale``."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, blocksize) * scale[: full // blocksize, None]).view(-1)
    if full < n:
        out[full:] = values[full:] * scale[full // blocksize]
    return out


def check_state(packed: torch.Tensor, state: QuantState) -> None:
    """Raise ValueError unless ``packed`` and ``state`` have consistent sizes and dtypes."""
    check_blocksize(state.blocksize)
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"invalid quant_type {state.quant_type!r}: must be 'nf4' or 'fp4'")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weight must be uint8, got {packed.dtype}")
    if packed.numel() != -(-state.numel // 2):
        raise ValueError(
            f"packed weight has {packed.numel()} bytes, expected {-(-state.numel // 2)} for shape {tuple(state.shape)}"
        )
    if state.absmax.numel() != state.n_blocks:
        raise ValueError(f"absmax has {state.absmax.numel()} values, expected {state.n_blocks}")
    if state.code.numel() != 16:
        raise ValueError(f"quant_map has {state.code.numel()} values, expected 16")
    if state.nested is not None:
        expected = -(-state.n_blocks // state.nested.blocksize)
        if state.nested.absmax.numel() != expected:
            raise ValueError(f"nested_absmax has {state.nested.absmax.numel()} values, expected {expected}")
        if state.nested.code.numel() != 256:
            raise ValueError(f"nested_quant_map has {state.nested.code.numel()} values, expected 256")
        if not math.isfinite(state.nested.offset):
            raise ValueError(f"nested_offset {state.nested.offset!r} is not finite")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense tensor ``[state.shape]``: ``(code[q_i] * scale_{i // blocksize}).to(dtype)``.

    ``dtype`` defaults to ``state.dtype``; the product is fp32 and rounded once.
    """
    check_state(packed, state)
    dtype = state.dtype if dtype is None else dtype
    n = state.numel
    values = state.code.to(device=packed.device, dtype=torch.float32)[unpack_codes(packed, n)]
    scale = decode_absmax(state).to(packed.device)
    return _scale_blocks(values, scale, state.blocksize).to(dtype).reshape(state.shape)
