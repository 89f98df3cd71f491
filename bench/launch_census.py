"""Count the kernels a QLoRA training step launches, per decoder layer, without a GPU.

On a GPU the step of a 1B model was launch-bound (issue 19): the number of kernels a layer
runs is the figure to cut. This counts them on the CPU, on the path a CUDA run takes: the
Triton kernels forced (``LEANTUNE_BACKEND=triton``) and run by Triton's interpreter
(``TRITON_INTERPRET=1``), every other tensor op seen by a ``TorchDispatchMode``. It builds
the e2e benchmark's leantune step (random tiny Llama, NF4 with double quantization, LoRA on
every decoder linear, fp16) at two depths; the difference over the layers added is what one
layer costs, the rest is fixed (embedding, final norm, head and loss, and the input
gradients that the first layer skips).

    python -m leantune.bench.launch_census [--layers 1 3] [--spec-ops] [--json FILE]

Counted: the forward and backward of one step (the optimizer apart: on CUDA AdamW's foreach
path is a fixed handful of multi-tensor kernels). Triton launches are counted by kernel name,
other ops by aten name; views, allocations and profiler markers launch nothing and are left
out. ``.item()`` and friends are counted apart as host syncs (each one stalls the stream and
breaks a CUDA graph capture). What this cannot see: the kernels inside a cuBLAS or SDPA call
(one op here, one or a few launches there), the attention's CUDA-only path (the CPU one
runs here: on CUDA, k and v are also expanded for GQA, two copies more) and anything else
dispatch picks from the device type. The 4-bit matmul counts once: under the interpreter
it is the fused tile kernel, while on a GPU at training sizes it is Triton's dequantize and
cuBLAS, two launches (14 more a layer).

Measured 2026-12-04 (``make test`` checks these counts): a layer runs 81 kernels, 69 of them
Triton, with 0 host syncs a step; with ``--spec-ops`` (the row ops and LoRA products as
PyTorch ops) 238.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

# ops that allocate, reshape or mark: no kernel on a GPU
FREE_OPS = frozenset("""view _unsafe_view t transpose as_strided slice select expand detach unsqueeze squeeze
permute split split_with_sizes unbind alias empty empty_like empty_strided new_empty new_empty_strided
_reshape_alias reshape view_as chunk narrow unflatten flatten lift_fresh is_same_size promote_types
_record_function_enter_new _record_function_exit result_type sym_size sym_stride sym_numel""".split())
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal"})


def _environment(spec_ops: bool) -> None:
    """The interpreter and the forced Triton backend, set before Triton is first imported."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("launch_census: Triton was imported without TRITON_INTERPRET=1; run it in a fresh process")
    os.environ.update(TRITON_INTERPRET="1", LEANTUNE_BACKEND="triton", LEANTUNE_TRITON_AUTOTUNE="0")
    if spec_ops:
        os.environ["LEANTUNE_TRITON_FUSED_OPS"] = "0"


def count_step(layers: int, work: Path, seq: int = 32, batch: int = 2, rank: int = 16) -> dict:
    """The launches of one forward + backward at ``layers`` decoder layers: {"triton": Counter,
    "ops": Counter, "syncs": Counter}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    from leantune.bench import e2e_model, e2e_worker

    shape = f"tiny{layers}"
    e2e_model.SHAPES.setdefault(shape, dict(e2e_model.SHAPES["tiny"], num_hidden_layers=layers))
    model_dir = e2e_model.write_random_model(work / shape, shape, dtype=torch.float16)
    spec = e2e_worker.StepSpec(model_dir=str(model_dir), batch=batch, seq=seq, rank=rank, dtype="float16")
    counts = {"triton": collections.Counter(), "ops": collections.Counter(), "syncs": collections.Counter()}
    state = {"on": False, "depth": 0}  # depth > 0: inside a Triton kernel or the optimizer

    def quiet(real, count_as=None):
        def wrapped(self, *a, **k):
            if state["on"] and count_as is not None and state["depth"] == 0:
                counts["triton"][count_as(self)] += 1
            state["depth"] += 1
            try:
                return real(self, *a, **k)
            finally:
                state["depth"] -= 1
        return wrapped

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if state["on"] and state["depth"] == 0 and name not in FREE_OPS:
                counts["syncs" if name in SYNC_OPS else "ops"][name] += 1
            return func(*args, **(kwargs or {}))

    real_run, real_opt = InterpretedFunction.run, torch.optim.AdamW.step
    InterpretedFunction.run = quiet(real_run, lambda f: f.fn.__name__)
    torch.optim.AdamW.step = quiet(real_opt)
    try:
        step, _ = e2e_worker._setup_leantune(spec)
        step(), step()  # first-use work (caches, the quantized state on the device) out of the count
        state["on"] = True
        with Census():
            step()
    finally:
        state["on"] = False
        InterpretedFunction.run, torch.optim.AdamW.step = real_run, real_opt
    return counts


def census(layers=(1, 3), spec_ops: bool = False, work: Path | None = None) -> dict:
    """Per-layer and fixed launch counts from steps at two depths."""
    lo, hi = sorted(layers)
    if lo < 1 or hi <= lo:
        raise ValueError(f"two different depths >= 1 are needed, got {layers}")
    _environment(spec_ops)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        a, b = count_step(lo, work), count_step(hi, work)
    out = {"layers": [lo, hi], "spec_ops": spec_ops, "per_layer": {}, "fixed": {}}
    for kind in ("triton", "ops", "syncs"):
        names = sorted(set(a[kind]) | set(b[kind]))
        per = {n: (b[kind][n] - a[kind][n]) / (hi - lo) for n in names}
        out["per_layer"][kind] = {n: v for n, v in per.items() if v}
        out["fixed"][kind] = {n: a[kind][n] - per[n] * lo for n in names if a[kind][n] - per[n] * lo}
    for part in ("per_layer", "fixed"):
        out[part]["total"] = sum(sum(out[part][k].values()) for k in ("triton", "ops"))
    return out


def _table(counts: dict) -> str:
    return ", ".join(f"{n} {v:g}" for n, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[1, 3], help="the two depths (default 1 3)")
    ap.add_argument("--spec-ops", action="store_true",
                    help="the row ops and LoRA products as PyTorch's spec (LEANTUNE_TRITON_FUSED_OPS=0)")
    ap.add_argument("--json", help="also write the counts here")
    args = ap.parse_args(argv)
    try:
        res = census(tuple(args.layers), args.spec_ops)
    except ValueError as e:
        print(f"launch_census: {e}", file=sys.stderr)
        return 2
    print(f"launches of one forward + backward, fp16 tiny Llama, LoRA on every linear over NF4"
          f"{', spec row ops and LoRA products' if args.spec_ops else ''}")
    for part, title in (("per_layer", "a decoder layer"), ("fixed", "fixed")):
        p = res[part]
        print(f"{title}: {p['total']:g} ({sum(p['triton'].values()):g} Triton, {sum(p['ops'].values()):g} other)"
              f"; host syncs {sum(p['syncs'].values()):g}")
        print(f"  Triton: {_table(p['triton'])}")
        print(f"  other:  {_table(p['ops'])}")
        if p["syncs"]:
            print(f"  syncs:  {_table(p['syncs'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
