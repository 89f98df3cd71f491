"""C kernels for 4-bit NF4 / FP4 on the CPU: the ctypes loader and the Python wrappers.

The kernels live in ``csrc/quant4bit.c``; the layout and the math are written at its top
and in ``quant/state.py``. The PyTorch reference in ``quant/functional.py`` is the spec:

    w[i] = code[nibble(i)] * absmax[i // blocksize]     element 2j in the HIGH nibble

``available()`` compiles the C file on first use into a cache directory
(``$LEANTUNE_CACHE`` or ``~/.cache/leantune``), keyed by a hash of the source, the flags and
the compiler's version, and loads it with ctypes. Without a compiler, or when the build
fails, it returns False and says so once on stderr; callers then use the reference.

Environment:
    LEANTUNE_CC        the C compiler (default ``$CC``, else ``cc``)
    LEANTUNE_CACHE     the cache directory
    LEANTUNE_CPU_ISA   ``auto`` (default: AVX2 + FMA + F16C when the CPU has them, plus
                       the AVX-512 decode loop when it has AVX-512 F + BW), ``avx2``
                       (never AVX-512), ``avx512`` (same as auto), or ``scalar`` (the
                       portable loops only; the tests check each build)

Threads follow ``torch.get_num_threads()``. The library links libgomp, and torch's copy is
already loaded when it is opened, so the C kernels and torch's GEMMs share one thread pool.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "quant4bit.c"

# The tiled linear dequantizes at most this many weights at a time into one buffer (4 MiB of
# fp32): it stays in the caches between the dequantize and the GEMM reading it, and its
# GEMMs are wide enough for sgemm to run at full speed. Measured on 2 cores (AMD EPYC, 1 MiB
# L2 a core, 32 MiB L3), fwd + dX time vs dense at M=256: 64K elems 1.22-1.42x,
# 256K 1.07-1.11x, 1M 1.03-1.08x, 4M 1.01-1.11x.
TILE_ELEMS = 1 << 20
# At or below this many rows of x the linear runs a C GEMV straight from the codes instead
# of the tiled dequantize + sgemm (forward: weights decoded in registers, 4 rows of x per
# decode; transpose: 4 rows of W decoded per pass into an L1 buffer). Measured crossovers on
# 2 cores, K, N in 576 .. 4096: forward GEMV ahead of the tiled path up to M = 32-64, the
# transpose one up to M = 16-32.
GEMV_MAX_M = 32
GEMV_T_MAX_M = 16
# bf16 x: the tiles' GEMMs run natively in bf16 (avx512_bf16: 2-3x fp32's rate) while the GEMV
# stays fp32, so the crossover comes sooner. AMD EPYC (avx512_bf16, 2 cores, 2026-12-03), ms
# GEMV / tiled, idle: [576 x 576] M12 0.094/0.141, M16 0.143/0.153, M20 0.178/0.153;
# [1536 x 576] M16 0.329/0.294, M20 0.431/0.320; [576 x 1536] M12 0.263/0.265, M20 0.471/0.390.
# (fp32 on the same CPU: the GEMV ahead at every M <= 32.) Decode batches of 16-20 rows (eval,
# GRPO sampling) take the tiles.
GEMV_MAX_M_BF16 = 12

# Pointers cross as plain addresses (tensor.data_ptr()); the C prototypes give their types.
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int

# name -> (restype, argtypes)
_SIGNATURES = {
    "lt_dequant4_f32": (None, [_P, _P, _P, _I64, _I64, _P, _INT]),
    "lt_dequant4_bf16": (None, [_P, _P, _P, _I64, _I64, _P, _INT]),
    "lt_dequant4_f16": (None, [_P, _P, _P, _I64, _I64, _P, _INT]),
    "lt_dequant4_tile_f32": (None, [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _INT]),
    "lt_dequant4_tile_bf16": (None, [_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _INT]),
    "lt_quant4_f32": (_I64, [_P, _I64, _P, _P, _I64, _P, _P, _INT]),
    "lt_gemv4_f32": (_INT, [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _I64, _INT]),
    "lt_gemv4_t_f32": (_INT, [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _P, _I64, _INT]),
    "lt_advise_hugepages": (_INT, [_P, _I64]),
}
_INFO_SIGNATURES = {"lt_isa_level": (_INT, []), "lt_has_openmp": (_INT, [])}


class _Loader:
    """Builds and opens the library of one C source once per process; remembers why when it
    cannot. ``signatures``: exported name -> (restype, argtypes); the source must also export
    ``lt_isa_level`` and ``lt_has_openmp``. ``peft_core/rowops.py`` and ``quant/hostpool.py``
    build their own sources with it."""

    def __init__(self, source: Path, signatures: dict, what: str = "C kernels"):
        self.source, self.signatures, self.what = source, signatures, what
        self.lock = threading.Lock()
        self.tried = False
        self.lib = None
        self.info: dict = {}

    def get(self):
        if not self.tried:
            with self.lock:
                if not self.tried:
                    try:
                        self.lib = self._load()
                    except Exception as e:  # never crash the caller: report once, fall back
                        reason = str(e) if isinstance(e, _Unavailable) else f"{type(e).__name__}: {e}"
                        self.info["error"] = reason
                        print(f"leantune: {self.what} unavailable ({reason}); using the PyTorch reference",
                              file=sys.stderr)
                    self.tried = True
        return self.lib

    def _load(self):
        cc = os.environ.get("LEANTUNE_CC") or os.environ.get("CC") or "cc"
        cc_path = shutil.which(cc)
        if cc_path is None:
            raise _Unavailable(f"no C compiler: {cc!r} not found")
        if not self.source.is_file():
            raise _Unavailable(f"source {self.source} missing")
        try:
            version = subprocess.run([cc_path, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.splitlines()[:1]
        except (OSError, subprocess.SubprocessError) as e:
            raise _Unavailable(f"{cc} --version failed: {e}") from None
        source = self.source.read_bytes()
        cache = Path(os.environ.get("LEANTUNE_CACHE") or Path.home() / ".cache" / "leantune")
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _Unavailable(f"cache directory {cache}: {e.strerror}") from None

        errors = []
        # With OpenMP first; a compiler without it (clang on macOS) still gets a serial build.
        for flags in (_flags(openmp=True), _flags(openmp=False)):
            key = hashlib.sha256(source + " ".join(flags).encode() + "".join(version).encode())
            path = cache / f"{self.source.stem}-{key.hexdigest()[:16]}.so"
            if not path.is_file():
                err = _compile(cc_path, flags, self.source, path)
                if err:
                    errors.append(err)
                    continue
            try:
                lib = ctypes.CDLL(str(path))
                for name, (restype, argtypes) in {**self.signatures, **_INFO_SIGNATURES}.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = restype, argtypes
            except (OSError, AttributeError) as e:
                errors.append(f"cannot load {path.name}: {e}")
                continue
            self.info = {"path": str(path), "flags": flags, "compiler": "".join(version),
                         "isa": ("scalar", "avx2", "avx512")[lib.lt_isa_level()],
                         "openmp": bool(lib.lt_has_openmp())}
            return lib
        raise _Unavailable(errors[0])


class _Unavailable(Exception):
    pass


def _cpu_has(*features: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return all(f in have for f in features)
    return False


def _flags(openmp: bool) -> list[str]:
    flags = ["-O3", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden"]
    isa = os.environ.get("LEANTUNE_CPU_ISA", "auto")
    if isa not in ("auto", "avx512", "avx2", "scalar"):
        raise _Unavailable(f"LEANTUNE_CPU_ISA={isa!r}: expected auto, avx512, avx2 or scalar")
    if isa in ("auto", "avx512", "avx2") and _cpu_has("avx2", "fma", "f16c"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
        if isa in ("auto", "avx512") and _cpu_has("avx512f", "avx512bw"):
            flags += ["-mavx512f", "-mavx512bw"]
    if openmp:
        flags.append("-fopenmp")
    return flags


def _compile(cc_path: str, flags: list[str], source: Path, path: Path) -> str | None:
    """Compile to a temporary name beside `path`, then rename; returns an error or None."""
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc_path, *flags, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()
            return f"build failed: {lines[0].strip() if lines else f'exit status {proc.returncode}'}"
        os.replace(tmp, path)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"build failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_LOADER = _Loader(SOURCE, _SIGNATURES)


def available() -> bool:
    """True when the C kernels are built and loaded (builds them on the first call)."""
    return _LOADER.get() is not None


def build_info() -> dict:
    """Where the library is and how it was built ({"error": ...} when unavailable)."""
    _LOADER.get()
    return dict(_LOADER.info)


def _lib():
    lib = _LOADER.get()
    if lib is None:
        raise RuntimeError("leantune C kernels are unavailable: " + _LOADER.info.get("error", "?"))
    return lib


# ----------------------------------------------------------------------------------------
# Argument checks: a ValueError naming the argument, never a crash inside C.

def _check(t, name: str, dtype: torch.dtype, min_numel: int | None = None, ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_numel is not None and t.numel() < min_numel:
        raise ValueError(f"{name} has {t.numel()} elements, needs at least {min_numel}")


def _check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even int, got {blocksize!r}")
    return blocksize


def _check_codes(packed, absmax, code, blocksize: int, numel: int):
    _check(packed, "packed", torch.uint8, min_numel=(numel + 1) // 2)
    _check(absmax, "absmax", torch.float32, min_numel=-(-numel // blocksize))
    _check(code, "code", torch.float32)
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries, got {code.numel()}")


def _ptr(t: torch.Tensor) -> int:
    """The address of t's first element (ctypes passes it as the C pointer)."""
    return t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


# ----------------------------------------------------------------------------------------
# Dequantize

_DEQUANT_FN = {torch.float32: "lt_dequant4_f32", torch.bfloat16: "lt_dequant4_bf16",
               torch.float16: "lt_dequant4_f16"}


# A fresh output at least this large gets huge pages (see _empty_output).
HUGEPAGE_MIN_BYTES = 8 << 20


def _empty_output(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty, plus madvise(MADV_HUGEPAGE) when large: a large fresh buffer is a new
    mmap whose 4 KiB page faults cost more than the dequantize itself (~1 us each); with
    huge pages it is one fault per 2 MiB. torch does the same under THP_MEM_ALLOC_ENABLE."""
    out = torch.empty(numel, dtype=dtype)
    nbytes = numel * out.element_size()
    if nbytes >= HUGEPAGE_MIN_BYTES:
        _lib().lt_advise_hugepages(out.data_ptr(), nbytes)
    return out


def dequantize_4bit_cpu(packed, absmax, code, blocksize, numel, dtype=torch.float32, out=None):
    """w[i] = code[nibble(i)] * absmax[i // blocksize] for i < numel, as a 1-D `dtype` tensor.

    packed: uint8 [>= ceil(numel / 2)], absmax: fp32 [>= ceil(numel / blocksize)],
    code: fp32 [16]. dtype: fp32, bf16 or fp16 (the fp32 product rounded to nearest even,
    as ``.to(dtype)`` does). out: an optional contiguous CPU tensor of `numel` `dtype`s.
    Bit-exact with the reference.
    """
    blocksize = _check_blocksize(blocksize)
    numel = int(numel)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if dtype not in _DEQUANT_FN:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    _check_codes(packed, absmax, code, blocksize, numel)
    if out is None:
        out = _empty_output(numel, dtype)
    else:
        _check(out, "out", dtype)
        if out.numel() != numel:
            raise ValueError(f"out has {out.numel()} elements, expected {numel}")
    if numel:
        getattr(_lib(), _DEQUANT_FN[dtype])(_ptr(packed), _ptr(absmax), _ptr(code),
                                            blocksize, numel, _ptr(out), _threads())
    return out.view(-1)


# ----------------------------------------------------------------------------------------
# Quantize

_BOUNDS_CACHE: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}


def _bounds_and_order(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted table's midpoints and the sort order, with bitsandbytes' exact expressions:
    ``order = argsort(code)``, ``bounds = (code[order[:-1]] + code[order[1:]]) / 2``."""
    key = code.numpy().tobytes()
    hit = _BOUNDS_CACHE.get(key)
    if hit is None:
        order = torch.argsort(code)
        bounds = ((code[order[:-1]] + code[order[1:]]) / 2).contiguous()
        hit = (bounds, order.to(torch.uint8).contiguous())
        _BOUNDS_CACHE[key] = hit
    return hit


def quantize_4bit_cpu(x, code, blocksize):
    """x (any shape, contiguous, fp32 / bf16 / fp16) -> (packed uint8 [ceil(n/2)], absmax fp32 [n_blocks]).

    Per block: absmax = max |x|; the scaled value (x * (1 / absmax) in full blocks,
    x / max(absmax, 1e-38) in the short tail block) goes to the nearest code, ties to the
    lower bucket, exactly as bitsandbytes' CPU path. bf16 / fp16 inputs are converted with
    ``.float()`` first, as the reference does. A NaN or Inf in x raises ValueError (as the
    reference does).
    """
    blocksize = _check_blocksize(blocksize)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a float32, bfloat16 or float16 tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    _check(x, "x", x.dtype)
    _check(code, "code", torch.float32)
    if code.numel() != 16:
        raise ValueError(f"code must have 16 entries, got {code.numel()}")
    x = x.reshape(-1).float()
    numel = x.numel()
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-numel // blocksize), dtype=torch.float32)
    if numel:
        bounds, order = _bounds_and_order(code)
        non_finite = _lib().lt_quant4_f32(_ptr(x), numel, _ptr(bounds), _ptr(order),
                                          blocksize, _ptr(packed), _ptr(absmax), _threads())
        if non_finite:
            raise ValueError(f"x contains non-finite values ({int(torch.isnan(x).sum())} NaN, "
                             f"{int(torch.isinf(x).sum())} Inf); cannot quantize")
    return packed, absmax


# ----------------------------------------------------------------------------------------
# Linear

def _tile_width(extent: int, depth: int) -> int:
    """Rows (or columns) a tile: at most TILE_ELEMS // depth, a multiple of 16, and equal
    tiles (no sliver at the end), e.g. extent 576 fits one tile, 4096 x 4096 takes 16."""
    widest = max(16, TILE_ELEMS // depth // 16 * 16)
    n_tiles = -(-extent // widest)
    per_tile = -(-extent // n_tiles)
    return min(extent, (per_tile + 15) // 16 * 16)


_WORKSPACE = threading.local()


def _workspace(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's tile buffer of ``dtype``, at least ``numel`` long: kept between calls
    (grown, never shrunk; at most max(TILE_ELEMS, 16 x depth) weights) instead of a fresh
    allocation per matmul, which costs page faults and leaves holes in the heap."""
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def linear_4bit_cpu(x, packed, absmax, code, blocksize, out_features, in_features, transpose=False):
    """The 4-bit linear without bias, W [out_features, in_features] stored 4-bit row-major.

    transpose=False:  y = x @ W^T,  x (M, in_features)  -> (M, out_features)   (forward)
    transpose=True:   y = x @ W,    x (M, out_features) -> (M, in_features)    (dX = dY @ W)

    Small M (<= GEMV_MAX_M, GEMV_MAX_M_BF16 for bf16 x, GEMV_T_MAX_M with transpose) runs a C GEMV straight from the
    codes (decode, M = 1, goes 2-4x faster than the dense fp32 GEMV). Larger M dequantizes W a
    tile at a time into one reusable buffer (TILE_ELEMS weights, cache-sized) and lets
    torch's sgemm do the FLOPs:
        forward:   tile = W[n0:n1, :]      y[:, n0:n1] = x @ tile^T
        transpose: tile = W[:, k0:k1]      y[:, k0:k1] = x @ tile
    The weights are bit-exact; the sums follow the GEMM's order (fp32, ~1e-6 relative).

    x may be fp32 or bf16; y has x's dtype. In bf16 the tiles are dequantized straight to
    bf16 (the fp32 products rounded to nearest even, what ``dequantize_4bit(..., bf16)``
    gives) and the GEMMs run in bf16 (oneDNN: native on CPUs with avx512_bf16 / AMX, with
    fp32 accumulation); the GEMV path computes in fp32 and rounds y once.
    """
    blocksize = _check_blocksize(blocksize)
    N, K = int(out_features), int(in_features)
    if N <= 0 or K <= 0:
        raise ValueError(f"out_features and in_features must be positive, got {N}, {K}")
    _check(x, "x", torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32, ndim=2)
    _check_codes(packed, absmax, code, blocksize, N * K)
    x_cols, y_cols = (N, K) if transpose else (K, N)
    if x.shape[1] != x_cols:
        raise ValueError(f"x must have {x_cols} columns for W [{N}, {K}] with transpose={transpose}, "
                         f"got shape {tuple(x.shape)}")
    M = x.shape[0]
    from leantune.quant import hostpool  # (imports this module: not at the top)

    gemv_max = GEMV_T_MAX_M if transpose else GEMV_MAX_M_BF16 if x.dtype == torch.bfloat16 else GEMV_MAX_M
    if M <= gemv_max:
        if x.dtype == torch.bfloat16:  # the GEMV reads fp32 rows
            return linear_4bit_cpu(x.float(), packed, absmax, code, blocksize, N, K, transpose).bfloat16()
        y = hostpool.empty((M, y_cols), torch.float32)
        if M == 0:
            return y
        gemv = _lib().lt_gemv4_t_f32 if transpose else _lib().lt_gemv4_f32
        if gemv(_ptr(x), x_cols, M, _ptr(packed), _ptr(absmax), _ptr(code), blocksize, N, K,
                _ptr(y), y_cols, _threads()) != 0:
            raise MemoryError("linear_4bit_cpu: out of memory for the GEMV row buffer")
        return y

    y = hostpool.empty((M, y_cols), x.dtype)
    nt = _threads()
    args = (_ptr(packed), _ptr(absmax), _ptr(code), blocksize)
    dequant_tile = _lib().lt_dequant4_tile_bf16 if x.dtype == torch.bfloat16 else _lib().lt_dequant4_tile_f32

    if not transpose:
        rows = _tile_width(N, K)
        buf = _workspace(rows * K, x.dtype)
        for n0 in range(0, N, rows):
            nr = min(rows, N - n0)
            tile = buf[: nr * K].view(nr, K)
            # tile = W[n0:n0+nr, :]
            dequant_tile(*args, K, n0, nr, 0, K, _ptr(tile), K, nt)
            # y[:, n0:n0+nr] = x @ tile^T
            torch.mm(x, tile.t(), out=y[:, n0:n0 + nr])
    else:
        cols = _tile_width(K, N)
        buf = _workspace(N * cols, x.dtype)
        for k0 in range(0, K, cols):
            kc = min(cols, K - k0)
            tile = buf[: N * kc].view(N, kc)
            # tile = W[:, k0:k0+kc]
            dequant_tile(*args, K, 0, N, k0, kc, _ptr(tile), kc, nt)
            # y[:, k0:k0+kc] = x @ tile
            torch.mm(x, tile, out=y[:, k0:k0 + kc])
    return y
