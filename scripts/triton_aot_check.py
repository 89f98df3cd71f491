"""Compile every autotune config of the Triton kernels for sm_80 and sm_90, without a GPU.

The 4-bit matmul and GEMV configs, the LoRA products of ``quant/triton_lora.py``, and the row kernels of ``quant/triton_rowops.py`` (RMSNorm,
SwiGLU, RoPE, cross-entropy rows) in bf16, fp16 and fp32 at the launch settings their
launchers pick for Llama shapes.

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
from leantune.quant import triton_lora as TL  # noqa: E402
from leantune.quant import triton_rowops as TR  # noqa: E402
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


def _rowops_jobs(quick: bool):
    """The row kernels at the launch settings of their launchers (hidden sizes 576 to 8192,
    head_dim 64 and 128, vocabularies up to 128256)."""
    for dt in (("bf16",) if quick else ("bf16", "fp16", "fp32")):
        p = DTYPES[dt]
        for C in (576, 2048, 4096, 8192):
            block = triton.next_power_of_2(C)
            yield (TR._rmsnorm_fwd_kernel,
                   {"x_ptr": p, "w_ptr": p, "y_ptr": p, "rstd_ptr": "*fp32", "stride_x": "i32", "stride_y": "i32",
                    "C": "i32", "eps": "fp32"}, dict(BLOCK_C=block), TR._warps(block), 1, f"rmsnorm fwd {dt} C={C}")
            for need_dx, need_dw in ((True, True), (True, False), (False, True)):
                yield (TR._rmsnorm_bwd_kernel,
                       {"x_ptr": p, "w_ptr": p, "rstd_ptr": "*fp32", "dy_ptr": p, "dx_ptr": p, "dw_ptr": "*fp32",
                        "stride_x": "i32", "stride_dy": "i32", "stride_dx": "i32", "n_rows": "i32", "C": "i32",
                        "rows_per_program": "i32"}, dict(NEED_DX=need_dx, NEED_DW=need_dw, BLOCK_C=block),
                       TR._warps(block), 1, f"rmsnorm bwd {dt} C={C} dx={need_dx} dw={need_dw}")
        yield (TR._swiglu_fwd_kernel, {"g_ptr": p, "u_ptr": p, "h_ptr": p, "n": "i32"},
               dict(BLOCK=TR.ELEMENTS), 4, 1, f"swiglu fwd {dt}")
        yield (TR._swiglu_bwd_kernel, {"g_ptr": p, "u_ptr": p, "dh_ptr": p, "dg_ptr": p, "du_ptr": p, "n": "i32"},
               dict(BLOCK=TR.ELEMENTS), 4, 1, f"swiglu bwd {dt}")
        for D in (64, 128):
            for backward in (False, True):
                block_d = D // 2
                yield (TR._rope_kernel,
                       {"x_ptr": p, "c_ptr": p, "s_ptr": p, "o_ptr": p, "sxb": "i32", "sxh": "i32", "sxt": "i32",
                        "scb": "i32", "H": "i32", "T": "i32", "HALF": "i32"},
                       dict(BACKWARD=backward, BLOCK_T=TR.ROPE_TILE // block_d, BLOCK_D=block_d), 4, 1,
                       f"rope {dt} D={D} backward={backward}")
        for V in (49152, 128256):
            block = min(TR.XENT_BLOCK, triton.next_power_of_2(V))
            yield (TR._xent_rows_kernel, {"z_ptr": p, "t_ptr": "*i64", "lse_ptr": "*fp32", "zt_ptr": "*fp32",
                                          "V": "i32", "stride_z": "i32"},
                   dict(BLOCK_V=block), TR._warps(block), 1, f"xent rows {dt} V={V}")


def _lora_jobs(quick: bool):
    """The LoRA products of ``quant/triton_lora.py`` (fp32 weights, half-precision activations)."""
    i32 = "i32"
    for dt in (("bf16",) if quick else ("bf16", "fp16")):
        p = DTYPES[dt]
        for br in (16, 32):
            const = dict(BLOCK_M=TL.BM, BLOCK_N=TL.BN, BLOCK_R=br)
            yield (TL._down_kernel, {"x_ptr": p, "w_ptr": "*fp32", "o_ptr": "*fp32", "M": i32, "N": i32, "R": i32,
                                     "sxm": i32, "sxn": i32, "swr": i32, "swn": i32, "som": i32, "sor": i32},
                   dict(BLOCK_M=TL.BM_DOWN, BLOCK_K=TL.BN, BLOCK_R=br), 4, 1, f"lora down {dt} r-chunk {br}")
            yield (TL._up_kernel, {"y_ptr": p, "u_ptr": "*fp32", "v_ptr": "*fp32", "o_ptr": p, "M": i32, "N": i32,
                                   "R": i32, "s": "fp32", "sym": i32, "syn": i32, "sum_": i32, "sur": i32,
                                   "svr": i32, "svn": i32, "som": i32, "son": i32}, const, 4, 1,
                   f"lora up {dt} r-chunk {br}")
            yield (TL._tgrad_kernel, {"u_ptr": "*fp32", "x_ptr": p, "o_ptr": "*fp32", "M": i32, "N": i32, "R": i32,
                                      "s": "fp32", "sum_": i32, "sur": i32, "sxm": i32, "sxn": i32, "sos": i32,
                                      "sor": i32, "son": i32, "rows_per_split": i32}, const, 4, 1,
                   f"lora tgrad {dt} r-chunk {br}")


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
    for fn, sig, const, warps, stages, what in (*_matmul_jobs(args.quick), *_rowops_jobs(args.quick), *_lora_jobs(args.quick)):
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
