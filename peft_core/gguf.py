"""A minimal, validating reader for GGUF v2/v3 files (llama.cpp's model format).

File layout (all integers little-endian)::

    header      b"GGUF", uint32 version (2 or 3), uint64 tensor_count, uint64 kv_count
    metadata    kv_count times: string key, uint32 value_type, value
    tensor info tensor_count times: string name, uint32 n_dims, uint64 ne[n_dims],
                uint32 ggml_type, uint64 offset (relative to the data section)
    padding     up to a multiple of ``general.alignment`` (default 32)
    data        the tensors, each at an offset that is a multiple of the alignment

    string      uint64 byte length, then that many UTF-8 bytes (no terminator)
    array       uint32 element type, uint64 count, then the elements

``ne[0]`` is the fastest-varying dimension, so a tensor's numpy shape is ``ne`` reversed:
a linear layer stored as ``ne = [in, out]`` reads as ``(out, in)``, the layout of
``nn.Linear.weight``. Quantized types store rows as blocks of ``block_size`` values in
``type_size`` bytes; the block layouts are documented on the ``_dequant_*`` functions.

Every count, length and offset read from the file is checked against the file size before
anything is allocated for it, so a truncated or crafted file is a one-line ``ModelError``
naming the file. Tensor data is never read eagerly: ``raw`` returns a view of a read-only
memory map and ``tensor`` dequantizes that view to float32.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leantune.base import ModelError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# Metadata value types: id -> (name, numpy dtype of one element; None for string / array)
VALUE_TYPES = {
    0: ("UINT8", np.dtype("<u1")), 1: ("INT8", np.dtype("<i1")),
    2: ("UINT16", np.dtype("<u2")), 3: ("INT16", np.dtype("<i2")),
    4: ("UINT32", np.dtype("<u4")), 5: ("INT32", np.dtype("<i4")),
    6: ("FLOAT32", np.dtype("<f4")), 7: ("BOOL", np.dtype("<u1")),
    8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", np.dtype("<u8")), 11: ("INT64", np.dtype("<i8")),
    12: ("FLOAT64", np.dtype("<f8")),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_MIN_VALUE_SIZE = {t: (dt.itemsize if dt is not None else (8 if t == _STRING else 12))
                   for t, (_, dt) in VALUE_TYPES.items()}

# ggml tensor types: id -> (name, block_size in values, type_size in bytes). The sizes of the
# types we cannot dequantize are still listed, so that their files parse and validate.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. ``shape`` is numpy order (``ne`` reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


class _Cursor:
    """Sequential little-endian reads from a buffer; every read is bounds-checked."""

    def __init__(self, buf: memoryview, where: str):
        self.buf, self.where, self.pos, self.size = buf, where, 0, len(buf)

    def need(self, n: int, what: str):
        if n > self.size - self.pos:
            raise ModelError(self.where, f"truncated or corrupt GGUF file: {what} needs {n} bytes "
                                         f"at offset {self.pos}, but the file has {self.size}")

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(self.where, f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype not in VALUE_TYPES:
            raise ModelError(self.where, f"{what} has unknown value type {vtype}")
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        dtype = VALUE_TYPES[vtype][1]
        self.need(dtype.itemsize, what)
        v = np.frombuffer(self.buf, dtype, 1, self.pos)[0].item()
        self.pos += dtype.itemsize
        return bool(v) if vtype == _BOOL else v

    def array(self, what: str) -> list:
        etype, count = self.unpack("<IQ", what)
        if etype not in VALUE_TYPES:
            raise ModelError(self.where, f"{what} is an array of unknown value type {etype}")
        self.need(count * _MIN_VALUE_SIZE[etype], f"{what} ({count} elements)")
        dtype = VALUE_TYPES[etype][1]
        if dtype is None:
            return [self.value(etype, what) for _ in range(count)]
        out = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += count * dtype.itemsize
        return (out != 0).tolist() if etype == _BOOL else out.tolist()


class GGUFFile:
    """The metadata and tensors of one GGUF file.

    ``metadata``: ``{key: value}`` with Python scalars, ``str`` and (nested) lists;
    ``tensors``: ``{name: TensorInfo}`` in file order; ``version``, ``alignment``.
    """

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise ModelError(where, f"cannot read GGUF file ({e.strerror})") from None
        if size < 24:
            raise ModelError(where, f"not a GGUF file (only {size} bytes)")
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ModelError(where, f"cannot map GGUF file ({e})") from None
        cur = _Cursor(memoryview(self._map), where)

        magic = bytes(cur.buf[:4])
        if magic != GGUF_MAGIC:
            raise ModelError(where, f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        (self.version,) = cur.unpack("<I", "version")
        if self.version not in (2, 3):
            hint = " (big-endian files are not supported)" if self.version in (2 << 24, 3 << 24) else ""
            raise ModelError(where, f"unsupported GGUF version {self.version}{hint}; expected 2 or 3")
        n_tensors, n_kv = cur.unpack("<QQ", "header")
        # The smallest key/value is 13 bytes, the smallest tensor info 24: reject impossible counts now.
        if n_kv * 13 + n_tensors * 24 > size - cur.pos:
            raise ModelError(where, f"header claims {n_tensors} tensors and {n_kv} metadata keys, "
                                    f"more than a {size}-byte file can hold")

        self.metadata: dict = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            (vtype,) = cur.unpack("<I", f"metadata {key!r}")
            if key in self.metadata:
                raise ModelError(where, f"duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")

        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(self.alignment, int) or isinstance(self.alignment, bool) or self.alignment <= 0
                or self.alignment & (self.alignment - 1)):
            raise ModelError(where, f"general.alignment must be a power of two, got {self.alignment!r}")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            (n_dims,) = cur.unpack("<I", f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelError(where, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            ne = cur.unpack(f"<{n_dims}Q", f"tensor {name!r} shape")
            ggml_type, offset = cur.unpack("<IQ", f"tensor {name!r}")
            infos.append((name, ne, ggml_type, offset))
        data_start = -(-cur.pos // self.alignment) * self.alignment

        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, offset in infos:
            self.tensors[name] = self._check_tensor(name, ne, ggml_type, offset, data_start, size)
        if len(self.tensors) != len(infos):
            raise ModelError(where, "duplicate tensor names")

    def _check_tensor(self, name, ne, ggml_type, offset, data_start, size) -> TensorInfo:
        where = str(self.path)
        if ggml_type not in GGML_TYPES:
            raise ModelError(where, f"tensor {name!r} has unknown ggml type {ggml_type}")
        type_name, block, type_size = GGML_TYPES[ggml_type]
        if ne[0] % block:
            raise ModelError(where, f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                                    f"{type_name} block size {block}")
        n = 1
        for d in ne:
            n *= d
        nbytes = n // block * type_size
        if offset % self.alignment:
            raise ModelError(where, f"tensor {name!r}: offset {offset} is not a multiple of the "
                                    f"alignment {self.alignment}")
        if data_start + offset + nbytes > size:
            raise ModelError(where, f"truncated or corrupt GGUF file: tensor {name!r} ({nbytes} bytes "
                                    f"at {data_start + offset}) runs past the end of the {size}-byte file")
        return TensorInfo(name, tuple(reversed(ne)), ggml_type, data_start + offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` (a read-only uint8 view of the file)."""
        info = self.tensors[name]
        return self._map[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to a new float32 array of its numpy shape."""
        info = self.tensors[name]
        if info.ggml_type not in DEQUANTIZERS:
            raise ModelError(str(self.path), f"tensor {name!r} has type {info.type_name}, which "
                                             f"cannot be dequantized (supported: {supported_types()})")
        return dequantize(self.raw(name), info.ggml_type).reshape(info.shape)


def supported_types() -> str:
    return ", ".join(GGML_TYPES[t][0] for t in DEQUANTIZERS)


def dequantize(data: np.ndarray, ggml_type: int) -> np.ndarray:
    """Bytes of whole blocks of ``ggml_type`` to a flat float32 array (in chunks of about 4M
    values, to bound the temporaries of the bit twiddling)."""
    _, block, type_size = GGML_TYPES[ggml_type]
    fn = DEQUANTIZERS[ggml_type]
    chunk_blocks = max(1, (1 << 22) // block)
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    for i in range(0, blocks.shape[0], chunk_blocks):
        out[i:i + chunk_blocks] = fn(blocks[i:i + chunk_blocks])
    return out.reshape(-1)


# -- block formats: each function maps (n_blocks, type_size) uint8 to (n_blocks, block_size) float32.
# The float32 operations follow ggml's reference dequantization (ggml-quants.c) in the same
# order, so the results are bit-identical to it and to the gguf package.

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of each block, as a (n_blocks, 1) float32 column."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) packed bytes -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _dequant_f32(blocks):
    return blocks.copy().view(np.float32)


def _dequant_f16(blocks):
    return blocks.copy().view(np.float16).astype(np.float32)


def _dequant_bf16(blocks):
    """bfloat16 is the high half of a float32."""
    return (blocks.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequant_q8_0(blocks):
    """Q8_0, 34 bytes per 32 values: fp16 d, int8 q[32]; x = q * d."""
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _f16(blocks, 0)


def _dequant_q4_0(blocks):
    """Q4_0, 18 bytes per 32 values: fp16 d, q[16] (value j in the low nibble of byte j,
    value j + 16 in its high nibble); x = (q - 8) * d."""
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return _f16(blocks, 0) * q.astype(np.float32)


def _dequant_q4_1(blocks):
    """Q4_1, 20 bytes per 32 values: fp16 d, fp16 m, q[16] (nibbles as Q4_0); x = q * d + m."""
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks, 2)


def _q5_high_bits(blocks, at):
    """Bit j of the little-endian uint32 at byte ``at`` is the 5th bit of value j."""
    qh = blocks[:, at:at + 4].copy().view("<u4")  # (n, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _dequant_q5_0(blocks):
    """Q5_0, 22 bytes per 32 values: fp16 d, uint32 qh, q[16] (low 4 bits, nibbles as Q4_0);
    x = ((q | high bit << 4) - 16) * d."""
    q = (_nibbles(blocks[:, 6:]) | _q5_high_bits(blocks, 2)).astype(np.int8) - np.int8(16)
    return _f16(blocks, 0) * q.astype(np.float32)


def _dequant_q5_1(blocks):
    """Q5_1, 24 bytes per 32 values: fp16 d, fp16 m, uint32 qh, q[16]; x = q5 * d + m."""
    q = _nibbles(blocks[:, 8:]) | _q5_high_bits(blocks, 4)
    return _f16(blocks, 0) * q.astype(np.float32) + _f16(blocks, 2)


# K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each with its own scale.

def _dequant_q2_k(blocks):
    """Q2_K, 84 bytes per 256: scales[16] (low nibble scale, high nibble min, per 16 values),
    qs[64], fp16 d, fp16 dmin. Value 128h + 32j + l is bits 2j..2j+1 of qs[32h + l];
    x = d * scale * q - dmin * min."""
    n = blocks.shape[0]
    sc = blocks[:, :16]
    dl = (_f16(blocks, 80) * (sc & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    ml = (_f16(blocks, 82) * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)
    qs = blocks[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (qs & 3).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _dequant_q3_k(blocks):
    """Q3_K, 110 bytes per 256: hmask[32], qs[64], scales[12] (sixteen 6-bit scales: low 4 bits
    from bytes 0-7, high 2 bits from bytes 8-11), fp16 d. Value 128h + 32j + l: low 2 bits from
    qs[32h + l] >> 2j, and 4 is subtracted unless bit 4h + j of hmask[l] is set;
    x = d * (scale - 32) * q."""
    n = blocks.shape[0]
    raw = blocks[:, 96:108]
    low = (raw[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (raw[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    scales = ((low & 0x0F) | ((high & 3) << 4)).astype(np.int8) - np.int8(32)
    dl = (_f16(blocks, 108) * scales.astype(np.float32)).reshape(n, 16, 1)
    ql = blocks[:, 32:96].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hm = blocks[:, :32].reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    ql = (ql & 3).reshape(n, 16, 16)
    hm = (hm & 1).reshape(n, 16, 16) ^ np.uint8(1)
    q = (ql.astype(np.int8) - (hm << 2).astype(np.int8)).astype(np.float32)
    return (dl * q).reshape(n, 256)


def _k4_scale_min(raw: np.ndarray):
    """The eight 6-bit (scale, min) pairs of Q4_K / Q5_K, packed in 12 bytes:
    j < 4: scale = b[j] & 63, min = b[j + 4] & 63;
    j >= 4: scale = (b[j + 4] & 15) | (b[j - 4] >> 6) << 4, min = (b[j + 4] >> 4) | (b[j] >> 6) << 4."""
    d, m, md = raw[:, 0:4], raw[:, 4:8], raw[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _dequant_q4_k(blocks):
    """Q4_K, 144 bytes per 256: fp16 d, fp16 dmin, scales[12], qs[128]. Sub-block s (32 values)
    uses the low (even s) or high (odd s) nibbles of qs[32 (s // 2):][:32];
    x = d * scale_s * q - dmin * min_s."""
    n = blocks.shape[0]
    sc, mn = _k4_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.astype(np.float32)).reshape(n, 8, 1)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32).astype(np.float32)
    return (d * q - dm).reshape(n, 256)


def _dequant_q5_k(blocks):
    """Q5_K, 176 bytes per 256: as Q4_K with qh[32] before qs[128]; the 5th bit of value l of
    sub-block s is bit s of qh[l]."""
    n = blocks.shape[0]
    sc, mn = _k4_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.astype(np.float32)).reshape(n, 8, 1)
    ql = blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = blocks[:, 16:48].reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 1).reshape(n, 8, 32) << 4)).astype(np.float32)
    return (d * q - dm).reshape(n, 256)


def _dequant_q6_k(blocks):
    """Q6_K, 210 bytes per 256: ql[128], qh[64], int8 scales[16] (one per 16 values), fp16 d.
    Value 128h + 32k + l: low 4 bits from ql[64h + 32 (k % 2) + l] >> 4 (k // 2), high 2 bits
    from qh[32h + l] >> 2k; x = d * scale * (q - 32)."""
    n = blocks.shape[0]
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    ql = blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 3).reshape(n, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


DEQUANTIZERS = {
    GGML_TYPE_IDS["F32"]: _dequant_f32, GGML_TYPE_IDS["F16"]: _dequant_f16,
    GGML_TYPE_IDS["BF16"]: _dequant_bf16, GGML_TYPE_IDS["Q8_0"]: _dequant_q8_0,
    GGML_TYPE_IDS["Q4_0"]: _dequant_q4_0, GGML_TYPE_IDS["Q4_1"]: _dequant_q4_1,
    GGML_TYPE_IDS["Q5_0"]: _dequant_q5_0, GGML_TYPE_IDS["Q5_1"]: _dequant_q5_1,
    GGML_TYPE_IDS["Q2_K"]: _dequant_q2_k, GGML_TYPE_IDS["Q3_K"]: _dequant_q3_k,
    GGML_TYPE_IDS["Q4_K"]: _dequant_q4_k, GGML_TYPE_IDS["Q5_K"]: _dequant_q5_k,
    GGML_TYPE_IDS["Q6_K"]: _dequant_q6_k,
}
