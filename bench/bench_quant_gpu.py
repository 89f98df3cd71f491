"""GPU benchmark of the Triton 4-bit kernels (``quant/triton_dequant.py``, ``quant/triton_matmul.py``).

Providers compared in one run, median with 20/80 quantiles (``triton.testing.do_bench``):

1. dequantize (NF4, double quant, bf16 out): GB/s against the device's measured copy
   bandwidth (``dst.copy_(src)``). Target: >= 85 %.
2. 4-bit matmul, M = 4096, N = K = 4096, bf16, forward and transposed: the fused kernel and
   leantune's dispatch (at this M: Triton dequantize + cuBLAS) against dense ``torch.matmul``
   on the bf16 weight (target: within 1.15x) and, when bitsandbytes is importable, its
   dequantize + matmul. A crossover sweep over M times the fused kernel against dequantize +
   cuBLAS, which sets ``quant.triton_matmul.FUSED_MAX_M``.
3. decoding, M = 1, (N, K) = (14336, 4096) and (4096, 14336): against the dense bf16 GEMV
   (target: >= 2.5x faster) and bitsandbytes' ``matmul_4bit`` (its GEMV path).

4. the row ops and LoRA products (``quant/triton_rowops.py``, ``quant/triton_lora.py``) at
   Llama-8B shapes, 2048 tokens, r16, bf16 activations, fp32 adapter: each kernel against the
   PyTorch spec it replaces (``LEANTUNE_BACKEND=reference``), forward + backward, with the
   largest error of the output and gradients against the spec's (``rel_err``).

Rows are appended to ``bench/results/<device>-<date>.json`` (a JSON list) with device, date
and versions. Without CUDA it prints a line and exits 0.

``--rehearse`` runs every section once on the CPU under ``TRITON_INTERPRET=1`` at toy shapes
(each case called once and timed with a wall clock; the numbers mean nothing) and writes
``rehearsal-cpu-interpret-<date>.json``: ``make test`` runs it, so a benchmark that no longer
matches the kernels' API fails in CI, not in the first minutes of a lent GPU.

    python bench/bench_quant_gpu.py [--quick] [--out bench/results]
    python bench/bench_quant_gpu.py --rehearse --out /tmp/rehearsal
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

QUANTILES = [0.5, 0.2, 0.8]
# where the benchmark runs and its activation dtype: "cuda" and bf16, or for --rehearse "cpu"
# (Triton's interpreter, toy shapes) and fp16 (the interpreter's bf16 dot returns garbage)
DEVICE = "cuda"
DTYPE = torch.bfloat16


def _versions() -> dict:
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # bitsandbytes is an optional peer: absent or broken both mean "not compared"
        out["bitsandbytes"] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        out["git_commit"] = None
    return out


def _bnb():
    try:
        import bitsandbytes.functional as bnbf

        return bnbf
    except Exception:  # see _versions
        return None


def _quantize(w: torch.Tensor, blocksize: int = 64):
    """(packed, QuantState) of ``w`` with NF4 + double quantization, via the reference."""
    from leantune.quant import functional as F

    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", double_quant=True)
    return packed.to(w.device), state.to(w.device)


def _bench(fn) -> tuple[float, float, float]:
    if DEVICE != "cuda":  # rehearsal: one call, wall clock
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, ms
    import triton.testing

    fn()  # autotune and compile outside the timing
    torch.cuda.synchronize()
    ms, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=QUANTILES)
    return ms, lo, hi


class Recorder:
    def __init__(self, meta: dict):
        self.meta, self.rows = meta, []

    def add(self, bench: str, provider: str, shape, t: tuple, **derived) -> dict:
        row = dict(bench=bench, provider=provider, shape=list(shape), ms=t[0], ms_p20=t[1],
                   ms_p80=t[2], **derived, **self.meta)
        self.rows.append(row)
        extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in derived.items())
        print(f"{bench:<12} {provider:<22} {str(tuple(shape)):<22} {t[0] * 1e3:9.1f} us "
              f"[{t[1] * 1e3:.1f}, {t[2] * 1e3:.1f}]  {extra}", flush=True)
        return row


def bench_dequant(rec: Recorder, shapes, copy_gbps: float, sweep: bool = True) -> None:
    from leantune.quant import triton_dequant
    from leantune.quant.triton_dequant import dequantize_4bit_triton

    for n, k in shapes:
        w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
        packed, state = _quantize(w)
        nested_bytes = state.nested.absmax.numel() * 4 + 256 * 4 if state.nested is not None else 0
        moved = packed.numel() + state.absmax.numel() * state.absmax.element_size() + nested_bytes \
            + w.numel() * 2
        t = _bench(lambda: dequantize_4bit_triton(packed, state, dtype=DTYPE))
        gbps = moved / (t[0] * 1e-3) / 1e9
        rec.add("dequantize", "triton", (n, k), t, gbps=gbps, frac_of_copy=gbps / copy_gbps,
                target=0.85, met=gbps / copy_gbps >= 0.85,
                block_bytes=triton_dequant.BLOCK_BYTES, num_warps=triton_dequant.NUM_WARPS)
        for bb in ((1024, 2048, 4096, 8192) if sweep else ()):
            for nw in (4, 8):
                t = _bench(lambda: dequantize_4bit_triton(packed, state, dtype=DTYPE,
                                                          block_bytes=bb, num_warps=nw))
                gbps = moved / (t[0] * 1e-3) / 1e9
                rec.add("dequant_sweep", f"triton {bb}B/{nw}w", (n, k), t, gbps=gbps,
                        frac_of_copy=gbps / copy_gbps)
        bnbf = _bnb()
        if bnbf is not None:
            p_bnb, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            t = _bench(lambda: bnbf.dequantize_4bit(p_bnb, qs))
            rec.add("dequantize", "bitsandbytes", (n, k), t, gbps=moved / (t[0] * 1e-3) / 1e9)


def measure_copy_gbps(rec: Recorder, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    gbps = 2 * nbytes / (t[0] * 1e-3) / 1e9
    rec.add("copy", "torch", (nbytes,), t, gbps=gbps)
    del src, dst
    return gbps


@contextlib.contextmanager
def _lut(registers):
    """The fused kernels' code lookup: PTX in registers (True), the table in memory (False),
    or as configured (None)."""
    from leantune.quant import triton_matmul

    was = triton_matmul.LUT_IN_REGISTERS
    if registers is not None:
        triton_matmul.LUT_IN_REGISTERS = registers
    try:
        yield
    finally:
        triton_matmul.LUT_IN_REGISTERS = was


def bench_matmul(rec: Recorder, m: int, n: int, k: int, transpose: bool) -> None:
    from leantune.quant import functional as F
    from leantune.quant.triton_matmul import matmul_4bit_triton

    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
    packed, state = _quantize(w)
    x = torch.randn(m, n if transpose else k, device=DEVICE, dtype=DTYPE)
    flops = 2.0 * m * n * k
    name = "matmul_bwd" if transpose else ("decode" if m == 1 else "matmul")
    wd = w.clone()

    dense = (lambda: x @ wd) if transpose else (lambda: x @ wd.T)
    t_dense = _bench(dense)
    rec.add(name, "torch dense bf16", (m, n, k), t_dense, tflops=flops / (t_dense[0] * 1e-3) / 1e12)

    w_deq = F.dequantize_4bit(packed, state, torch.float32)
    ref = x.float() @ (w_deq if transpose else w_deq.T)
    variants = [("triton fused 4-bit", True, False), ("triton fused 4-bit, LUT in registers", True, True)]
    variants += [("leantune dispatch", None, None)] if m > 1 else []
    t = None
    for provider, fused_flag, lut in variants:
        fn = lambda: matmul_4bit_triton(x, packed, state, transpose=transpose, fused=fused_flag)  # noqa: E731
        with _lut(lut):
            t_v = _bench(fn)
        rel_err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
        derived = dict(tflops=flops / (t_v[0] * 1e-3) / 1e12, rel_err=rel_err)
        if m == 1:
            derived.update(speedup_vs_dense=t_dense[0] / t_v[0], target=2.5, met=t_dense[0] / t_v[0] >= 2.5)
        else:
            derived.update(slowdown_vs_dense=t_v[0] / t_dense[0], target=1.15,
                           met=t_v[0] / t_dense[0] <= 1.15)
        rec.add(name, provider, (m, n, k), t_v, **derived)
        t = t_v if t is None or t_v[0] < t[0] else t

    bnbf = _bnb()
    if bnbf is not None:
        import bitsandbytes as bnb

        p_bnb, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        if transpose:
            fn = lambda: x @ bnbf.dequantize_4bit(p_bnb, qs)  # noqa: E731
        elif m == 1:
            fn = lambda: bnb.matmul_4bit(x, p_bnb.t(), quant_state=qs)  # noqa: E731  (its GEMV)
        else:
            fn = lambda: x @ bnbf.dequantize_4bit(p_bnb, qs).T  # noqa: E731
        t_bnb = _bench(fn)
        rec.add(name, "bitsandbytes", (m, n, k), t_bnb,
                tflops=flops / (t_bnb[0] * 1e-3) / 1e12, leantune_speedup=t_bnb[0] / t[0])


def bench_crossover(rec: Recorder, ms, n: int = 4096, k: int = 4096) -> None:
    """Fused kernel vs Triton dequantize + cuBLAS over M (forward and transposed), bf16."""
    from leantune.quant.triton_matmul import matmul_4bit_triton

    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
    packed, state = _quantize(w)
    for transpose in (False, True):
        for m in ms:
            x = torch.randn(m, n if transpose else k, device=DEVICE, dtype=DTYPE)
            with _lut(True):
                t_r = _bench(lambda: matmul_4bit_triton(x, packed, state, transpose=transpose, fused=True))
            with _lut(False):
                t_f = _bench(lambda: matmul_4bit_triton(x, packed, state, transpose=transpose, fused=True))
            t_u = _bench(lambda: matmul_4bit_triton(x, packed, state, transpose=transpose, fused=False))
            t_d = _bench((lambda: x @ w) if transpose else (lambda: x @ w.T))
            rec.add("crossover_bwd" if transpose else "crossover", "fused / unfused / dense",
                    (m, n, k), t_f, unfused_ms=t_u[0], dense_ms=t_d[0], fused_over_unfused=t_f[0] / t_u[0],
                    fused_registers_ms=t_r[0], fused_registers_over_unfused=t_r[0] / t_u[0],
                    best_over_dense=min(t_f[0], t_r[0], t_u[0]) / t_d[0])


@contextlib.contextmanager
def _backend(value: str | None):
    old = os.environ.get("LEANTUNE_BACKEND")
    if value is None:
        os.environ.pop("LEANTUNE_BACKEND", None)
    else:
        os.environ["LEANTUNE_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LEANTUNE_BACKEND", None)
        else:
            os.environ["LEANTUNE_BACKEND"] = old


def bench_row_ops(rec: Recorder, tokens: int = 2048, hidden: int = 4096, inter: int = 14336, heads: int = 32,
                  head_dim: int = 128, rank: int = 16, vocab: int = 128256, xent_rows: int = 1024,
                  xent_hidden: int = 2048) -> None:
    """Triton kernels against the PyTorch spec, forward and backward (the autograd Functions).
    On a GPU the kernel side is leantune's own choice (no backend forced); a rehearsal on the
    CPU forces Triton (its interpreter), since the CPU's own choice is the C kernels."""
    from leantune.quant import lora_mixed, rowops
    from leantune.quant.chunked_ce import chunked_cross_entropy

    bf = dict(device=DEVICE, dtype=DTYPE)
    x = torch.randn(tokens, hidden, **bf, requires_grad=True)
    w = torch.ones(hidden, **bf, requires_grad=True)
    g = torch.randn(tokens, inter, **bf, requires_grad=True)
    u = torch.randn(tokens, inter, **bf, requires_grad=True)
    q = torch.randn(1, tokens, heads, head_dim, **bf).transpose(1, 2).requires_grad_()
    ang = torch.rand(1, 1, tokens, head_dim, device=DEVICE)
    cos, sin = ang.cos().to(DTYPE), ang.sin().to(DTYPE)
    A = torch.randn(rank, hidden, device=DEVICE) * 0.01
    B = torch.randn(hidden, rank, device=DEVICE) * 0.01
    xa = torch.randn(tokens, rank, device=DEVICE)
    head = torch.randn(vocab, xent_hidden, **bf) * 0.02
    hh = torch.randn(xent_rows, xent_hidden, **bf, requires_grad=True)
    tgt = torch.randint(0, vocab, (xent_rows,), device=DEVICE)

    def fwd_bwd(f, inputs):
        def run():
            out = f()
            return (out, *torch.autograd.grad(out, inputs, torch.ones_like(out)))
        return run

    cases = {
        "rmsnorm": fwd_bwd(lambda: rowops.rms_norm(x, w, 1e-5), (x, w)),
        "swiglu": fwd_bwd(lambda: rowops.SwiGLU.apply(g, u), (g, u)),
        "rope": fwd_bwd(lambda: rowops.apply_rope(q, cos, sin), (q,)),
        "lora_down": lambda: lora_mixed.down(x.detach(), A),
        "lora_up": lambda: lora_mixed.up(x.detach(), xa, B.t(), 2.0),
        "lora_tgrad": lambda: lora_mixed.tgrad(xa, x.detach(), 2.0),
        f"xent_{xent_rows}_rows": fwd_bwd(lambda: chunked_cross_entropy(hh, head, tgt, 1024), (hh,)),
    }
    kernels = None if DEVICE == "cuda" else "triton"
    for name, fn in cases.items():
        with _backend(kernels):
            t_k = _bench(fn)
            got = fn()
        with _backend("reference"):
            t_r = _bench(fn)
            want = fn()
        # the largest error of the output and each gradient, relative to that tensor's largest value
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        rel_err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                      for a, b in zip(got, want))
        rec.add(name, "triton / spec", (tokens, hidden), t_k, spec_ms=t_r[0], speedup=t_r[0] / t_k[0],
                rel_err=rel_err)


def _plan(rehearse: bool, quick: bool) -> dict:
    """The shapes of each section: a GPU run's (fewer with ``quick``), or a rehearsal's toy
    shapes, which the interpreter runs in seconds."""
    if rehearse:
        return dict(copy_bytes=1 << 20, dequant=[(128, 256)], sweep=False, matmul=(32, 128, 256), matmul_bwd=True,
                    decode=[(256, 128)],
                    row_ops=dict(tokens=32, hidden=128, inter=256, heads=2, head_dim=64, rank=16, vocab=512,
                                 xent_rows=32, xent_hidden=64),
                    crossover=dict(ms=[16, 32], n=128, k=128))
    return dict(copy_bytes=1 << 30, dequant=[(14336, 4096)] if quick else [(4096, 4096), (14336, 4096)],
                sweep=not quick, matmul=(4096, 4096, 4096), matmul_bwd=not quick,
                decode=[(14336, 4096), (4096, 14336)], row_ops={},
                crossover=None if quick else dict(ms=[16, 64, 256, 512, 1024, 2048, 4096]))


def main(argv=None) -> int:
    global DEVICE, DTYPE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape a section")
    ap.add_argument("--rehearse", action="store_true",
                    help="every section once, on the CPU under TRITON_INTERPRET=1, at toy shapes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.rehearse:
        if not interpret:
            print("bench_quant_gpu: --rehearse needs TRITON_INTERPRET=1 set before Python starts")
            return 2
        DEVICE, DTYPE = "cpu", torch.float16
        device = "rehearsal-cpu-interpret"
    else:
        if not torch.cuda.is_available():
            print("bench_quant_gpu: no CUDA device, skipped")
            return 0
        if interpret:
            print("bench_quant_gpu: TRITON_INTERPRET is set; unset it to benchmark")
            return 2
        device = torch.cuda.get_device_name()
    date = dt.datetime.now(dt.timezone.utc)
    meta = dict(device=device, date=date.isoformat(timespec="seconds"), dtype=str(DTYPE).removeprefix("torch."),
                **_versions())
    rec = Recorder(meta)

    # one sequence of sections for both runs; a rehearsal only shrinks the shapes
    plan = _plan(args.rehearse, args.quick)
    copy_gbps = measure_copy_gbps(rec, nbytes=plan["copy_bytes"])
    bench_dequant(rec, plan["dequant"], copy_gbps, sweep=plan["sweep"])
    m, n, k = plan["matmul"]
    bench_matmul(rec, m, n, k, transpose=False)
    if plan["matmul_bwd"]:
        bench_matmul(rec, m, n, k, transpose=True)
    for n, k in plan["decode"]:
        bench_matmul(rec, 1, n, k, transpose=False)
    bench_row_ops(rec, **plan["row_ops"])
    if plan["crossover"] is not None:
        bench_crossover(rec, **plan["crossover"])

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = out_dir / f"{slug}-{date.strftime('%Y-%m-%d')}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.extend(rec.rows)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"bench_quant_gpu: {len(rec.rows)} rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
