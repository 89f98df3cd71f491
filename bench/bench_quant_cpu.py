"""Benchmark: 4-bit NF4 quantize / dequantize / linear on the CPU.

Providers compared in one run on one shared setup per case:
    reference   quant.functional (pure PyTorch, the spec)
    C           quant.cpu_kernels (csrc/quant4bit.c)
    bnb         bitsandbytes' public CPU functions (a test-only peer; skipped if absent)
    dense       torch on the fp32 weight (linear only: the target to come close to)

Each case is timed in interleaved rounds (every provider once a round, so a noisy
neighbour hurts all providers alike); reported: median and 20 % / 80 % quantiles, and the
derived Gelem/s and GB/s. The memory-copy bound is measured in the same run as a large
torch tensor copy (read + write bytes / time). Rows are appended as JSON lines, with the
device, date and versions, to bench/records/bench_quant_cpu.jsonl (--record to change,
--no-record to skip).

    python bench/bench_quant_cpu.py                 # everything, ~2 minutes on 2 cores
    python bench/bench_quant_cpu.py --only dequant --rounds 30
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from leantune.quant import cpu_kernels  # noqa: E402
from leantune.quant import functional as ref  # noqa: E402
from leantune.quant.state import QuantState  # noqa: E402

try:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes.functional as bnbF
except ImportError:  # the peer is optional
    bnbF = None

BLOCKSIZE = 64
# flat weight sizes: SmolLM2-135M's 576x576 and 576x1536, then 2048^2, 4096^2 and 8192^2
SIZES = [576 * 576, 576 * 1536, 2048 * 2048, 4096 * 4096, 8192 * 8192]
# (M, in_features K, out_features N) for the linear
LINEAR_SHAPES = [
    (256, 576, 576), (256, 576, 1536), (256, 1536, 576), (512, 576, 1536),
    (256, 2048, 2048), (256, 4096, 4096), (1024, 2048, 2048),
    (1, 576, 576), (1, 576, 1536), (1, 2048, 2048), (1, 4096, 4096), (4, 2048, 2048),
]


def _quantiles(ts: list[float]) -> dict:
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
    return {"median_s": statistics.median(ts), "q20_s": q[1], "q80_s": q[7], "n": len(ts)}


def time_providers(fns: dict, rounds: int, min_time: float = 0.0) -> dict:
    """Interleaved timing: each round calls every provider once (after two warm-up rounds).

    A call that takes less than `min_time` is repeated inside its timing and averaged.
    """
    inner = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(min_time / max(dt, 1e-9)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            k = inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - t0) / k)
    return {name: _quantiles(ts) for name, ts in times.items()}


def copy_bound(rounds: int) -> dict:
    """Large-tensor copy bandwidth, read + write bytes / second (the memory-copy bound)."""
    n = 1 << 26  # 256 MiB each way, far beyond the caches
    src, dst = torch.randn(n), torch.empty(n)
    r = time_providers({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    r["GB/s"] = 8 * n / r["median_s"] / 1e9
    return r


def _state(absmax, code, shape) -> QuantState:
    return QuantState("nf4", BLOCKSIZE, tuple(shape), torch.float32, absmax, code)


def bench_dequant(n: int, rounds: int, copy_gbs: float) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(n)
    code = ref.get_code("nf4")
    packed, absmax = cpu_kernels.quantize_4bit_cpu(w, code, BLOCKSIZE)
    state = _state(absmax, code, (n,))
    out = torch.empty(n)
    fns = {
        "reference": lambda: ref.dequantize_4bit(packed, state, torch.float32),
        "C": lambda: cpu_kernels.dequantize_4bit_cpu(packed, absmax, code, BLOCKSIZE, n),
        "C out=": lambda: cpu_kernels.dequantize_4bit_cpu(packed, absmax, code, BLOCKSIZE, n, out=out),
    }
    if bnbF is not None:
        bp, bs = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
        fns["bnb"] = lambda: bnbF.dequantize_4bit(bp, bs)
        kernel = _bnb_native_dequant(bp, bs.absmax, n)
        if kernel is not None:
            fns["bnb kernel"] = kernel
    if n > 1 << 24:
        fns.pop("reference")  # seconds per call; not informative at this size
    res = time_providers(fns, rounds, min_time=0.002)
    nbytes = n // 2 + 4 * n + 4 * (n // BLOCKSIZE)  # codes + absmax in, fp32 out
    rows = []
    for name, r in res.items():
        r.update(op="dequantize_fp32", provider=name, numel=n, blocksize=BLOCKSIZE,
                 **{"Gelem/s": n / r["median_s"] / 1e9, "GB/s": nbytes / r["median_s"] / 1e9})
        r["frac_copy_bound"] = r["GB/s"] / copy_gbs
        rows.append(r)
    _ratios(rows, "bnb")
    _ratios(rows, "bnb kernel", key="speedup_vs_bnb_kernel")
    return rows


def _bnb_native_dequant(packed, absmax, n: int):
    """bitsandbytes' own C kernel into a preallocated output (what its public function runs
    after allocating), to compare kernels without page faults; None if it cannot be reached."""
    try:
        import ctypes as ct

        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import get_ptr

        fn = lib.cdequantize_blockwise_cpu_nf4_fp32
    except Exception:  # an internal API of the peer: optional
        return None
    out = torch.empty(n)
    a = packed.reshape(1, n // 2)
    return lambda: fn(get_ptr(a), get_ptr(absmax), get_ptr(out), ct.c_longlong(BLOCKSIZE),
                      ct.c_longlong(1), ct.c_longlong(n))


def bench_quant(n: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(n)
    code = ref.get_code("nf4")
    fns = {
        "reference": lambda: ref.quantize_4bit(w, BLOCKSIZE, "nf4", double_quant=False),
        "C": lambda: cpu_kernels.quantize_4bit_cpu(w, code, BLOCKSIZE),
    }
    if bnbF is not None:
        fns["bnb"] = lambda: bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)
    res = time_providers(fns, rounds if n <= 1 << 24 else max(3, rounds // 4), min_time=0.002)
    nbytes = 4 * n + n // 2 + 4 * (n // BLOCKSIZE)
    rows = []
    for name, r in res.items():
        r.update(op="quantize", provider=name, numel=n, blocksize=BLOCKSIZE,
                 **{"Gelem/s": n / r["median_s"] / 1e9, "GB/s": nbytes / r["median_s"] / 1e9})
        rows.append(r)
    _ratios(rows, "bnb")
    return rows


def bench_linear(M: int, K: int, N: int, rounds: int) -> list[dict]:
    """Forward y = x @ W^T plus the input gradient dX = dY @ W, per provider."""
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    x, dy = torch.randn(M, K), torch.randn(M, N)
    code = ref.get_code("nf4")
    packed, absmax = cpu_kernels.quantize_4bit_cpu(w, code, BLOCKSIZE)
    state = _state(absmax, code, (N, K))
    wd = ref.dequantize_4bit(packed, state, torch.float32)  # the dense twin of the 4-bit weight

    def dense():
        return x @ wd.t(), dy @ wd

    def c4():
        return (cpu_kernels.linear_4bit_cpu(x, packed, absmax, code, BLOCKSIZE, N, K),
                cpu_kernels.linear_4bit_cpu(dy, packed, absmax, code, BLOCKSIZE, N, K, transpose=True))

    def reference():
        wr = ref.dequantize_4bit(packed, state, torch.float32)
        y = x @ wr.t()
        wr = ref.dequantize_4bit(packed, state, torch.float32)  # again: backward re-dequantizes
        return y, dy @ wr

    fns = {"dense": dense, "C": c4, "reference": reference}
    if bnbF is not None:
        import bitsandbytes as bnb

        bp, bs = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=False)

        def bnb4():
            y = bnb.matmul_4bit(x, bp.t(), bs)  # bitsandbytes' forward (its backward dequantizes + mm)
            return y, dy @ bnbF.dequantize_4bit(bp, bs)

        fns["bnb"] = bnb4
    res = time_providers(fns, rounds, min_time=0.01 if M * N * K < 1 << 28 else 0.0)
    flops = 4 * M * N * K
    rows = []
    for name, r in res.items():
        r.update(op="linear_fwd_bwd_x", provider=name, M=M, K=K, N=N, blocksize=BLOCKSIZE,
                 **{"GFLOP/s": flops / r["median_s"] / 1e9})
        rows.append(r)
    _ratios(rows, "dense", key="vs_dense")
    return rows


def _ratios(rows: list[dict], base: str, key: str | None = None):
    """Speed-up of every provider over `base` (its median time / theirs)."""
    key = key or f"speedup_vs_{base}"
    base_t = next((r["median_s"] for r in rows if r["provider"] == base), None)
    for r in rows:
        if base_t is not None:
            if key == "vs_dense":
                r["time_vs_dense"] = r["median_s"] / base_t  # < 1.15 is the goal for C
            else:
                r[key] = base_t / r["median_s"]


def _fmt_row(r: dict) -> str:
    t = f"{r['median_s'] * 1e3:9.3f} ms [{r['q20_s'] * 1e3:.3f}, {r['q80_s'] * 1e3:.3f}]"
    extra = []
    for k in ("Gelem/s", "GB/s", "GFLOP/s"):
        if k in r:
            extra.append(f"{r[k]:7.2f} {k}")
    if "frac_copy_bound" in r:
        extra.append(f"{100 * r['frac_copy_bound']:5.1f}% copy")
    if "speedup_vs_bnb" in r:
        extra.append(f"x{r['speedup_vs_bnb']:.2f} vs bnb")
    if "speedup_vs_bnb_kernel" in r:
        extra.append(f"x{r['speedup_vs_bnb_kernel']:.2f} vs bnb kernel")
    if "time_vs_dense" in r:
        extra.append(f"{r['time_vs_dense']:.3f}x dense time")
    return f"  {r['provider']:<10} {t}  " + "  ".join(extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="dequant,quant,linear", help="comma list of dequant, quant, linear")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--sizes", default="", help="comma list of numel for dequant / quant")
    p.add_argument("--shapes", default="", help="semicolon list of M,K,N for linear")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--record", default=str(ROOT / "bench" / "records" / "bench_quant_cpu.jsonl"))
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    globals()["BLOCKSIZE"] = args.blocksize  # read by every bench_* function
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else SIZES
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
              if args.shapes else LINEAR_SHAPES)

    if not cpu_kernels.available():
        print("C kernels unavailable; nothing to benchmark", file=sys.stderr)
        return 1
    info = cpu_kernels.build_info()
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": platform.processor() or platform.machine(), "cpu": _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "bitsandbytes": getattr(sys.modules.get("bitsandbytes"), "__version__", None),
        "isa": info["isa"], "flags": " ".join(info["flags"]), "compiler": info["compiler"],
        "load_avg_1m": os.getloadavg()[0],
    }
    print(f"# {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"bnb {meta['bitsandbytes']}, C isa {meta['isa']}, load {meta['load_avg_1m']:.2f}")
    rows = []
    copy = copy_bound(args.rounds)
    copy.update(op="copy", provider="torch", numel=1 << 26)
    rows.append(copy)
    print(f"copy bound: {copy['GB/s']:.1f} GB/s (read + write, 256 MiB tensor)")
    if "dequant" in only:
        for n in sizes:
            print(f"dequantize nf4 -> fp32, numel {n}, blocksize {BLOCKSIZE}")
            for r in bench_dequant(n, args.rounds, copy["GB/s"]):
                print(_fmt_row(r))
                rows.append(r)
    if "quant" in only:
        for n in sizes:
            print(f"quantize fp32 -> nf4, numel {n}, blocksize {BLOCKSIZE}")
            for r in bench_quant(n, args.rounds):
                print(_fmt_row(r))
                rows.append(r)
    if "linear" in only:
        for M, K, N in shapes:
            print(f"linear fwd + dX, M {M}, K {K}, N {N}")
            for r in bench_linear(M, K, N, args.rounds):
                print(_fmt_row(r))
                rows.append(r)
    if not args.no_record:
        path = Path(args.record)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps({**meta, **r}) + "\n")
        print(f"appended {len(rows)} rows to {path}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
