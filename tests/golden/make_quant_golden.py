"""Write the 4-bit golden vectors: seeded inputs and what bitsandbytes computes for them.

    python tests/golden/make_quant_golden.py        # needs bitsandbytes (CPU is enough)

Files (tests/golden/), compared by tests/test_quant_reference.py without bitsandbytes:

- ``quant_inputs.safetensors``: the inputs ``in.<size>_<dtype>``, fp32 / bf16 / fp16 of odd
  sizes (341, 197 = 64*3+5, 4231 in fp32 only, and a 2-D ``edge`` tensor with ties, zero
  blocks and a constant block), and bitsandbytes' 4-bit tables ``code.nf4``, ``code.fp4``.
- ``quant_nf4.safetensors``, ``quant_fp4.safetensors``: for double quant on / off x
  blocksizes {32, 64, 256, 4096} x those inputs: the packed codes, absmax, nested absmax and
  offset, and (for sizes 197 and edge) bitsandbytes' dequantized tensor.
- ``quant_blockwise8.safetensors``: the 8-bit dynamic map and a blockwise 8-bit case.

Each file's metadata ``cases`` is a JSON list of {key, input, quant_type, double_quant,
blocksize, dtype, shape, has_deq}; tensors are ``in.<name>`` and ``<key>.<field>``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent
SEED = 1234
BLOCKSIZES = (32, 64, 256, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _edge_input() -> torch.Tensor:
    """fp32 (8, 31) = 248 values, blocks of 32 (and 64) full of corner cases.

    Ties: with a block absmax of exactly 1 (or 2), x * (1 / absmax) is exact, so the NF4 and
    FP4 midpoints land exactly on a quantization boundary. Also a full zero block, values
    around the FP4 zero bins, a constant block (nested quant of equal absmax) and a zero tail.
    """
    import bitsandbytes.functional as bf

    nf4 = bf.get_4bit_type("nf4", device="cpu")
    fp4 = bf.get_4bit_type("fp4", device="cpu")
    fp4_sorted = fp4.sort().values
    nf4_mid = (nf4[:-1] + nf4[1:]) / 2
    fp4_mid = (fp4_sorted[:-1] + fp4_sorted[1:]) / 2
    g = torch.Generator().manual_seed(SEED + 1)
    blocks = [
        torch.zeros(32),                                                        # absmax 0
        torch.cat([torch.tensor([1.0]), nf4_mid, fp4_mid, torch.tensor([0.0])]),  # ties, absmax 1
        torch.cat([torch.tensor([-1.0]), -nf4_mid, -fp4_mid, torch.tensor([-0.0])]),
        torch.cat([torch.tensor([2.0]), 2 * nf4[:15], 2 * fp4[1:8],
                   torch.tensor([0.0052, -0.0052, 0.0026, -0.0026, 0.005, -0.005, 1e-7, -1e-7, 0.0104])]),
        torch.full((32,), 0.5),                                                 # constant block
        torch.randn(32, generator=g) * 0.02,
        torch.cat([torch.randn(31, generator=g) * 0.01, torch.tensor([3.0])]),  # an outlier
    ]
    x = torch.cat(blocks + [torch.zeros(24)])                                  # a zero tail
    return x.reshape(8, 31)


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    inputs: dict[str, torch.Tensor] = {}
    base = {
        "n341": torch.randn(341, generator=g) * 0.05,
        "n197": torch.randn(197, generator=g) * 0.05,
        "n4231": torch.randn(4231, generator=g) * 0.05,
    }
    base["n4231"][::97] *= 8.0  # a few outliers spread the absmax
    for dname, dtype in DTYPES.items():
        for name, x in base.items():
            if name == "n4231" and dname != "float32":
                continue  # keep the files small: the big tail case in fp32 only
            inputs[f"{name}_{dname}"] = x.to(dtype)
    inputs["edge_float32"] = _edge_input()
    inputs["edge_bfloat16"] = _edge_input().to(torch.bfloat16)
    return inputs


def _sizes_for(blocksize: int, dtype_name: str) -> list[str]:
    if dtype_name == "float32" and blocksize in (256, 4096):
        return ["n341", "n197", "n4231"]
    names = ["n341", "n197"]
    if blocksize in (32, 64):
        names.append("edge")
    return names


def make_cases(quant_type: str, inputs: dict[str, torch.Tensor]):
    import bitsandbytes.functional as bf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for dq in (False, True):
        for bs in BLOCKSIZES:
            for dname, dtype in DTYPES.items():
                for size in _sizes_for(bs, dname):
                    in_key = f"{size}_{dname}"
                    if in_key not in inputs:
                        continue
                    w = inputs[in_key]
                    key = f"{'dq' if dq else 'plain'}.bs{bs}.{in_key}"
                    packed, st = bf.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=dq)
                    tensors[f"{key}.packed"] = packed.reshape(-1).contiguous()
                    tensors[f"{key}.absmax"] = st.absmax.contiguous()
                    if dq:
                        tensors[f"{key}.nested_absmax"] = st.state2.absmax.contiguous()
                        tensors[f"{key}.offset"] = st.offset.reshape(1).float().contiguous()
                    has_deq = size in ("n197", "edge")  # the others: codes and absmax only (file size)
                    if has_deq:
                        # bitsandbytes' flat-index dequantization (its default backend, which is
                        # also the CUDA kernels' indexing; its CPU C kernel assumes row-aligned
                        # blocks, see tests/test_quant_reference.py)
                        absmax = st.absmax
                        if dq:
                            absmax = bf.dequantize_blockwise(st.absmax, st.state2) + st.offset
                        code = bf.get_4bit_type(quant_type, device="cpu")
                        deq = _dequantize_4bit_compute(packed.reshape(-1), absmax, code, bs, tuple(w.shape), w.dtype)
                        tensors[f"{key}.deq"] = deq.contiguous()
                    cases.append(dict(key=key, input=f"in.{in_key}", quant_type=quant_type, double_quant=dq,
                                      blocksize=bs, dtype=dname, shape=list(w.shape), has_deq=has_deq))
    return tensors, cases


def make_blockwise8():
    import bitsandbytes.functional as bf

    g = torch.Generator().manual_seed(SEED + 2)
    code = bf.create_dynamic_map()
    x = torch.randn(700, generator=g) * torch.logspace(-3, 1, 700)
    x[256:512] = 0.0  # a zero block (at blocksize 256) and a short tail
    tensors = {"dynamic_map": code, "in.x": x}
    cases = []
    for bs in (64, 256):
        q, absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, bs)
        deq = bf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=bs)
        tensors[f"bs{bs}.q"], tensors[f"bs{bs}.absmax"] = q, absmax
        if bs == 256:
            tensors[f"bs{bs}.deq"] = deq
        cases.append(dict(key=f"bs{bs}", input="in.x", blocksize=bs))
    return tensors, cases


def main() -> int:
    try:
        import bitsandbytes
    except ImportError:
        print("make_quant_golden: bitsandbytes is not installed", file=sys.stderr)
        return 1
    torch._dynamo.config.disable = True  # bitsandbytes' default ops are wrapped in torch.compile
    meta_common = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__, "seed": str(SEED)}
    inputs = make_inputs()
    import bitsandbytes.functional as bf

    codes = {f"code.{qt}": bf.get_4bit_type(qt, device="cpu") for qt in ("nf4", "fp4")}
    save_file({**{f"in.{k}": v.contiguous() for k, v in inputs.items()}, **codes},
              str(OUT / "quant_inputs.safetensors"), metadata=meta_common)
    for qt in ("nf4", "fp4"):
        tensors, cases = make_cases(qt, inputs)
        save_file(tensors, str(OUT / f"quant_{qt}.safetensors"), metadata={**meta_common, "cases": json.dumps(cases)})
    tensors, cases = make_blockwise8()
    save_file(tensors, str(OUT / "quant_blockwise8.safetensors"), metadata={**meta_common, "cases": json.dumps(cases)})
    total = sum(p.stat().st_size for p in OUT.glob("quant_*.safetensors"))
    print(f"wrote {len(list(OUT.glob('quant_*.safetensors')))} files, {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
