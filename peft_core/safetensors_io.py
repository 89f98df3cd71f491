"""A validating, streaming reader for the safetensors format, and an atomic writer.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw data (offsets are relative to the end of the header).

The reader checks every header claim against the file size before allocating anything, so
a truncated or crafted file is a one-line ``ModelError``; tensors are read with ``readinto``
straight into their destination (one copy, no mmap pages left resident).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from leantune.base import ModelError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # 100 MB of JSON is far beyond any real checkpoint
MAX_DIM = 1 << 48  # no real tensor dimension comes near; torch's limit is 2^63


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    """json ``object_pairs_hook``: a name given twice is an error, not "the last one wins"."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"name {k[:100]!r} appears twice")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """Random access to the tensors of one ``.safetensors`` file."""

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelError(where, "truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, MAX_HEADER):
                    raise ModelError(where, f"header claims {n} bytes but the file has {size}")
                raw = f.read(n)
        except OSError as e:
            raise ModelError(where, f"cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except ValueError as e:  # bad UTF-8, bad JSON, a number of more than 4300 digits
            raise ModelError(where, f"corrupt safetensors header ({e})") from None
        except RecursionError:  # "[[[[..." : json's decoder recurses once per level
            raise ModelError(where, "corrupt safetensors header (nested too deeply)") from None
        if not isinstance(header, dict):
            raise ModelError(where, "corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise ModelError(where, "corrupt safetensors header (__metadata__ is not a table of strings)")
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple, int, int]] = {}
        for name, e in header.items():
            # strict: a shape is a list of integers ("64" is not [6, 4]), offsets two integers
            if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in DTYPES
                    and isinstance(e.get("shape"), list) and all(_is_int(s) for s in e["shape"])
                    and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                    and all(_is_int(o) for o in e["data_offsets"])):
                raise ModelError(where, f"tensor {name[:100]!r}: malformed header entry {str(e)[:200]}")
            dtype, shape = DTYPES[e["dtype"]], tuple(e["shape"])
            begin, end = e["data_offsets"]
            numel = 1
            for s in shape:
                if s < 0:
                    raise ModelError(where, f"tensor {name!r}: negative dimension in {list(shape)[:8]}")
                if s > MAX_DIM:
                    raise ModelError(where, f"tensor {name!r}: a dimension of {s.bit_length()} bits is too large")
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if not (0 <= begin <= end) or end - begin != nbytes:
                raise ModelError(where, f"tensor {name!r}: offsets {begin}..{end} do not match "
                                        f"{e['dtype']} {list(shape)} ({nbytes} bytes)")
            if end > data_len:
                raise ModelError(where, f"truncated: tensor {name!r} ends at byte "
                                        f"{self.data_start + end}, the file has {size}")
            self.entries[name] = (dtype, shape, begin, end)
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (_, end0, first), (begin1, _, second) in zip(spans, spans[1:]):
            if begin1 < end0:
                raise ModelError(where, f"tensors {first!r} and {second!r} overlap in the file")

    def keys(self):
        return list(self.entries)

    def dtype(self, name):
        return self.entries[name][0]

    def shape(self, name):
        return self.entries[name][1]

    def read(self, name, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor on the CPU, converted to ``dtype`` if given (one temporary of the file's
        dtype only when a conversion is needed)."""
        src_dtype, shape, begin, end = self.entries[name]
        out = torch.empty(shape, dtype=src_dtype)
        if end > begin:
            buf = out.view(-1).view(torch.uint8).numpy() if out.dim() else out.reshape(1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(memoryview(buf))
            if got != end - begin:
                raise ModelError(str(self.path), f"truncated while reading tensor {name!r}")
        if dtype is not None and dtype != src_dtype:
            out = out.to(dtype)
        return out


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> str:
    """Write ``tensors`` atomically: to a temp file in the same folder, fsync, rename.
    Returns the sha256 (hex) of the file's bytes, computed while writing."""
    path = Path(path)
    header, offset = {}, 0
    items = []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be saved")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        items.append(t)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data start to 8 bytes
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (struct.pack("<Q", len(raw)), raw):
                digest.update(chunk)
                f.write(chunk)
            for t in items:
                if t.numel():
                    view = memoryview(t.view(-1).view(torch.uint8).numpy())
                    digest.update(view)
                    f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def read_safetensors(path, dtype=None) -> dict:
    f = SafetensorsFile(path)
    return {k: f.read(k, dtype) for k in f.keys()}
