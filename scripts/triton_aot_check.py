"""Compile every autotune config of the Triton 4-bit kernels for sm_80 and sm_90, without a GPU.

Triton compiles ahead of time for a named target (``GPUTarget``) on any machine: the PTX is
built by the bundled LLVM and assembled by the bundled ptxas. A compiler crash on one tile
shape (seen with Triton 3.6: ``TritonGPUOptimizeDotOperands`` failing on an interleaved
dot operand) shows up here before any GPU time is spent. Run it against each Triton you
support, e.g. ``PYTHONPATH=/tmp/t36 python scripts/triton_aot_check.py`` for a 3.6 tree.

    python scripts/triton_aot_check.py [--arch 80 90] [--quick]

Exit status 1 when any config fails to compile; each failure is one line.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from leantune.quant import triton_matmul as TM  # noqa: E402
from leantune.quant.functional import get_code  # noqa: E402

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
LUT = {"bf16": TM.nibble_lut_asm(get_code("nf4", "cpu"), torch.bfloat16)}  # the PTX table lookup


def _matmul_jobs(quick: bool):
    for dt, configs in (("bf16", TM._tile_configs() + TM._small_m_configs()), ("fp32", TM._fp32_configs())):
        for transpose in (False, True):
            for even_k, row_aligned in ((True, True), (True, False), (False, False)):
                for c in (configs[:2] if quick else configs):
                    sig = {"x_ptr": DTYPES[dt], "packed_ptr": "*u8", "absmax_ptr": "*u8",
                           "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                           "y_ptr": DTYPES[dt], "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
                           "stride_xm": "i32", "stride_xk": "i32", "stride_ym": "i32", "stride_yn": "i32",
                           "nested_offset": "fp32"}
                    const = dict(TRANSPOSE=transpose, QBLOCK=64, NESTED=True, NESTED_QBLOCK=256,
                                 EVEN_K=even_k, ROW_ALIGNED=row_aligned,
                                 DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                                 LUT_ASM="" if dt == "fp32" else LUT["bf16"], **c.kwargs)
                    yield (TM._matmul_4bit_kernel, sig, const, c.num_warps, c.num_stages,
                           f"matmul {dt} T={transpose} even={even_k} aligned={row_aligned} {c}")
    for c in (TM._gemv_configs()[:2] if quick else TM._gemv_configs()):
        sig = {"x_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32",
               "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "y_ptr": "*bf16",
               "N": "i32", "K": "i32", "stride_xk": "i32", "stride_yn": "i32", "nested_offset": "fp32"}
        for lut in ("", LUT["bf16"]):
            const = dict(QBLOCK=64, NESTED=True, NESTED_QBLOCK=256, EVEN_K=True, ROW_ALIGNED=True,
                         LUT_ASM=lut, **c.kwargs)
            yield (TM._gemv_4bit_kernel, sig, const, c.num_warps, c.num_stages,
                   f"gemv lut={'registers' if lut else 'memory'} {c}")


def _compile(fn, sig, const, warps, stages, arch):
    full = dict(sig)
    for k in const:
        full[k] = "constexpr"
    src = ASTSource(fn=fn, signature=full, constexprs=const)
    triton.compile(src, target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": warps, "num_stages": stages})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quick", action="store_true", help="two configs a kernel variant")
    ap.add_argument("--match", default="", help="only jobs whose description contains this")
    args = ap.parse_args(argv)

    bad = ok = 0
    for fn, sig, const, warps, stages, what in _matmul_jobs(args.quick):
        if args.match not in what:
            continue
        for arch in args.arch:
            try:
                _compile(fn, sig, const, warps, stages, arch)
                ok += 1
            except Exception as exc:  # report every failure, one line each
                bad += 1
                msg = str(exc).strip().splitlines()
                print(f"FAIL sm_{arch} {what}: {type(exc).__name__}: {msg[-1] if msg else ''}", flush=True)
    print(f"triton {triton.__version__}: {ok} compiled, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
