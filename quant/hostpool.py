"""A caching pool for the large CPU tensors that leantune's kernels return (``csrc/hostpool.c``).

``empty(shape, dtype)`` is ``torch.empty`` for CPU tensors of at least ``MIN_BYTES``, served
from a pool of page-rounded blocks that torch hands back (through the DLPack deleter) when the
tensor is freed. A training step allocates the same shapes every step, so after the first
one nearly every request is a hit: no page faults (fresh mmaps cost ~15-30% of a CPU step)
and no heap holes (glibc's heap, with saved activations between freed temporaries, keeps the
peak RSS ~30% above what is live).

Used by the 4-bit linear (``quant/cpu_kernels.py``), the row ops (``quant/rowops.py``)
and the chunked cross-entropy. Beyond the bound above the pool does not shrink; ``release()`` unmaps the
free blocks (the trainer calls it after a run), ``stats()`` reports live / cached / peak.

Sizes are rounded up to classes (pages up to 1 MiB, then eighths of an octave: at most
12.5% over), and a request takes the smallest free block up to a quarter larger, so batches
of varying length reuse blocks too. The pool maps at most the most bytes ever live at once
(what a step needs): on a miss, the least recently freed blocks are unmapped first, so shapes
that vary from batch to batch cannot grow it. Free blocks beyond ``LEANTUNE_HOSTPOOL_LIMIT``
bytes (default a quarter of physical memory) are unmapped when freed as well.

Environment: ``LEANTUNE_HOSTPOOL=0`` turns it off (plain ``torch.empty``). Without a C
compiler it is off, like the other C kernels.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from leantune.quant.cpu_kernels import _Loader

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "hostpool.c"
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_LOADER = _Loader(SOURCE, {
    "lt_pool_alloc": (_P, [_I64, _INT, _INT]),
    "lt_pool_release": (_I64, []),
    "lt_pool_set_limit": (None, [_I64]),
    "lt_pool_stats": (None, [_P]),
}, what="host memory pool")

MIN_BYTES = 256 << 10  # smaller tensors come from torch's allocator

# torch dtype -> DLPack (type code, bits): kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4
_DL_TYPES = {torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16), torch.float64: (2, 64),
             torch.uint8: (1, 8), torch.int32: (0, 32), torch.int64: (0, 64)}

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


_configured = False


def _default_limit() -> int:
    raw = os.environ.get("LEANTUNE_HOSTPOOL_LIMIT", "").strip()
    if raw:
        try:
            return max(0, int(float(raw)))
        except ValueError:
            raise ValueError(f"LEANTUNE_HOSTPOOL_LIMIT={raw!r}: expected a number of bytes") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def enabled() -> bool:
    global _configured
    if os.environ.get("LEANTUNE_HOSTPOOL", "1") == "0" or _LOADER.get() is None:
        return False
    if not _configured:
        _LOADER.get().lt_pool_set_limit(_default_limit())
        _configured = True
    return True


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, pooled when large enough and possible."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    dl = _DL_TYPES.get(dtype)
    if dl is None or numel * dl[1] // 8 < MIN_BYTES or not enabled():
        return torch.empty(shape, dtype=dtype)
    managed = _LOADER.get().lt_pool_alloc(numel, *dl)
    if not managed:
        raise MemoryError(f"host pool: cannot map {numel * dl[1] // 8} bytes")
    return torch.from_dlpack(_capsule_new(managed, b"dltensor", None)).view(shape)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, t.dtype)


def stats() -> dict:
    """Bytes live (held by tensors), cached (free in the pool), peak of both (the pool's
    high-water mark), peak live; hits, misses, the limit on cached bytes."""
    if _LOADER.get() is None:
        return {}
    out = (ctypes.c_int64 * 7)()
    _LOADER.get().lt_pool_stats(out)
    return dict(zip(("live_bytes", "cached_bytes", "peak_bytes", "hits", "misses", "limit_bytes",
                     "peak_live_bytes"), out))


def release() -> int:
    """Unmap every free block; returns the bytes given back to the OS."""
    return int(_LOADER.get().lt_pool_release()) if _LOADER.get() is not None else 0


def set_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of free blocks (more are unmapped when freed)."""
    if _LOADER.get() is not None:
        _LOADER.get().lt_pool_set_limit(int(nbytes))


_LIBC: list = []


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    The tensors torch allocates itself (below ``MIN_BYTES``, or outside the kernels) come from
    glibc's heap; when every batch has another shape (packing, real data) their holes differ
    from step to step and the heap's resident size climbs. The trainer calls this after each
    CPU optimizer step, when almost nothing is live."""
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
            _LIBC.append(libc)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)
