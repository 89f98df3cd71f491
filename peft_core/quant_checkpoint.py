"""The bitsandbytes 4-bit checkpoint format, as transformers + bitsandbytes save it.

For a quantized linear ``P`` (see ../shared/CONTRACT.md)::

    P.weight                                  uint8 [ceil(numel / 2), 1]   packed codes
    P.weight.absmax                           fp32 [n_blocks] | uint8 [n_blocks] (double quant)
    P.weight.quant_map                        fp32 [16]
    P.weight.nested_absmax                    fp32 [ceil(n_blocks / 256)]  (double quant)
    P.weight.nested_quant_map                 fp32 [256]                   (double quant)
    P.weight.quant_state.bitsandbytes__nf4    uint8 [len]: UTF-8 JSON, ``json.dumps`` of
        {"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype",
         "nested_offset"]}   (``__fp4`` for FP4; dtype strings like "bfloat16")

and ``config.json`` gains the ``quantization_config`` that ``BitsAndBytesConfig.to_dict()``
writes. ``quantize_checkpoint`` turns a dense Hugging Face folder into such a checkpoint,
streaming: one input tensor in memory at a time.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from leantune.peft_core.checkpoint import checkpoint_files
from leantune.base import ModelError, UsageError

from leantune.quant import functional as F
from leantune.quant.state import NestedState, QuantState

QS_PREFIX = "quant_state.bitsandbytes__"
# dtype <-> the string bitsandbytes writes (``str(dtype).strip("torch.")``)
_DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# decoder linear weights quantized by quantize_checkpoint
QUANTIZED_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[A-Za-z0-9_]*proj\.weight$")
# files copied next to the quantized weights
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json")


def dtype_name(dtype: torch.dtype) -> str:
    """bitsandbytes' dtype string: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def _json_tensor(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def state_to_tensors(prefix: str, packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes saves for the 4-bit weight of module ``prefix`` (keys ``prefix.weight...``)."""
    F.check_state(packed, state)
    w = f"{prefix}.weight"
    out = {
        w: packed.reshape(-1, 1),
        f"{w}.absmax": state.absmax,
        f"{w}.quant_map": state.code,
    }
    meta = {"quant_type": state.quant_type, "blocksize": int(state.blocksize), "dtype": dtype_name(state.dtype),
            "shape": [int(s) for s in state.shape]}
    if state.nested is not None:
        out[f"{w}.nested_absmax"] = state.nested.absmax
        out[f"{w}.nested_quant_map"] = state.nested.code
        meta.update(nested_blocksize=int(state.nested.blocksize), nested_dtype="float32",
                    nested_offset=float(state.nested.offset))
    out[f"{w}.{QS_PREFIX}{state.quant_type}"] = _json_tensor(meta)
    return out


def _need(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ModelError(key, "missing from the 4-bit checkpoint")
    t = tensors[key]
    if not isinstance(t, torch.Tensor):
        raise ModelError(key, f"expected a tensor, got {type(t).__name__}")
    return t


MAX_NESTED_BLOCKSIZE = 1 << 16  # bitsandbytes writes 256; a crafted 2^62 must not reach the kernels


def _field(meta: dict, name: str, key: str, kind):
    if name not in meta:
        raise ModelError(key, f"quant_state JSON lacks {name!r}")
    value = meta[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModelError(key, f"quant_state {name!r} must be an integer, got {str(value)[:60]}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ModelError(key, f"quant_state {name!r} must be a number, got {str(value)[:60]}")
    if kind is str and not isinstance(value, str):
        raise ModelError(key, f"quant_state {name!r} must be a string, got {str(value)[:60]}")
    return value


def _check_numel(t: torch.Tensor, key: str, expected: int, what: str) -> None:
    if t.numel() != expected:
        raise ModelError(key, f"has {t.numel()} values, expected {expected} ({what})")


def state_from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, QuantState]:
    """Read the 4-bit weight of module ``prefix`` -> (packed uint8 flat, QuantState).

    ``tensors`` maps checkpoint keys to tensors (a dict or any Mapping). Every inconsistency
    (a missing key, unparsable JSON, sizes that disagree with the shape) is a ModelError
    naming the key.
    """
    w = f"{prefix}.weight"
    qs_keys = [f"{w}.{QS_PREFIX}{qt}" for qt in ("nf4", "fp4") if f"{w}.{QS_PREFIX}{qt}" in tensors]
    if not qs_keys:
        raise ModelError(f"{w}.{QS_PREFIX}nf4", "missing from the 4-bit checkpoint (no quant_state for "
                                                  f"{w}, nf4 or fp4)")
    if len(qs_keys) > 1:
        raise ModelError(w, "has both an nf4 and an fp4 quant_state")
    qs_key = qs_keys[0]
    raw = _need(tensors, qs_key)
    try:
        meta = json.loads(bytes(raw.detach().to("cpu", torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, RecursionError, RuntimeError) as e:  # ValueError: UTF-8, JSON, ints over 4300 digits
        raise ModelError(qs_key, f"not a UTF-8 JSON quant_state ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ModelError(qs_key, "quant_state JSON is not an object")

    quant_type = _field(meta, "quant_type", qs_key, str)
    if quant_type not in ("nf4", "fp4") or not qs_key.endswith(quant_type):
        raise ModelError(qs_key, f"quant_type {quant_type!r} does not match the key")
    blocksize = _field(meta, "blocksize", qs_key, int)
    try:
        F.check_blocksize(blocksize)
    except ValueError as e:
        raise ModelError(qs_key, str(e)) from None
    dtype_str = _field(meta, "dtype", qs_key, str)
    if dtype_str not in _DTYPE_BY_NAME:
        raise ModelError(qs_key, f"unsupported dtype {dtype_str!r} (float32, float16 or bfloat16)")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ModelError(qs_key, f"shape must be a list of positive integers, got {str(shape)[:100]}")
    numel = 1
    for s in shape:
        numel *= s
    n_blocks = -(-numel // blocksize)

    packed = _need(tensors, w)
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes
        if packed.dtype.is_floating_point or packed.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            packed = packed.contiguous().reshape(-1).view(torch.uint8)
        else:
            raise ModelError(w, f"packed weight has dtype {packed.dtype}, expected uint8")
    packed = packed.reshape(-1)
    _check_numel(packed, w, -(-numel // 2), f"bytes for shape {shape}")

    code = _need(tensors, f"{w}.quant_map")
    _check_numel(code, f"{w}.quant_map", 16, "the 4-bit code table")
    absmax = _need(tensors, f"{w}.absmax")
    _check_numel(absmax, f"{w}.absmax", n_blocks, f"blocks of {blocksize} in shape {shape}")

    nested = None
    has_nested = "nested_blocksize" in meta or f"{w}.nested_absmax" in tensors
    if has_nested:
        nested_blocksize = _field(meta, "nested_blocksize", qs_key, int)
        if not 0 < nested_blocksize <= MAX_NESTED_BLOCKSIZE:
            raise ModelError(qs_key, f"nested_blocksize must be from 1 to {MAX_NESTED_BLOCKSIZE}, "
                                     f"got {str(nested_blocksize)[:40]}")
        nested_dtype = _field(meta, "nested_dtype", qs_key, str)
        if nested_dtype != "float32":
            raise ModelError(qs_key, f"unsupported nested_dtype {nested_dtype!r} (float32)")
        offset = float(_field(meta, "nested_offset", qs_key, float))
        if offset != offset or offset in (float("inf"), float("-inf")):
            raise ModelError(qs_key, f"nested_offset {offset!r} is not finite")
        nested_absmax = _need(tensors, f"{w}.nested_absmax")
        _check_numel(nested_absmax, f"{w}.nested_absmax", -(-n_blocks // nested_blocksize),
                     f"nested blocks of {nested_blocksize}")
        nested_code = _need(tensors, f"{w}.nested_quant_map")
        _check_numel(nested_code, f"{w}.nested_quant_map", 256, "the 8-bit dynamic map")
        if absmax.dtype != torch.uint8:
            raise ModelError(f"{w}.absmax", f"must be uint8 with double quantization, got {absmax.dtype}")
        nested = NestedState(nested_absmax.reshape(-1).float(), nested_code.reshape(-1).float(),
                             nested_blocksize, offset)
        absmax = absmax.reshape(-1)
    else:
        if not absmax.dtype.is_floating_point:
            raise ModelError(f"{w}.absmax", f"must be float32 without double quantization, got {absmax.dtype}")
        absmax = absmax.reshape(-1).float()
    state = QuantState(quant_type=quant_type, blocksize=blocksize, shape=tuple(shape),
                       dtype=_DTYPE_BY_NAME[dtype_str], absmax=absmax, code=code.reshape(-1).float(), nested=nested)
    return packed, state


def _dtype_str(compute_dtype) -> str:
    if compute_dtype is None:
        return "float32"  # BitsAndBytesConfig's default compute dtype
    if isinstance(compute_dtype, torch.dtype):
        name = dtype_name(compute_dtype)
    else:
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(str(compute_dtype), str(compute_dtype))
    if name not in _DTYPE_BY_NAME:
        raise UsageError("--compute-dtype", f"unknown compute dtype {compute_dtype!r} (float32, bfloat16 or float16)")
    return name


def _check_options(quant_type, blocksize) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise UsageError("--quant", f"unknown quant type {quant_type!r} (nf4 or fp4)")
    try:
        F.check_blocksize(blocksize)
    except ValueError as e:
        raise UsageError("--blocksize", str(e)) from None


def quantization_config_dict(quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                             compute_dtype="bfloat16", skip_modules=None) -> dict:
    """``quantization_config`` as transformers writes it (``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()``).

    transformers has no key for the blocksize: each weight's quant_state JSON carries it, so
    ``blocksize`` is only validated here.
    """
    _check_options(quant_type, blocksize)
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": _dtype_str(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


# ---------------------------------------------------------------------------------------
# quantize_checkpoint: dense HF folder -> bitsandbytes 4-bit folder, streaming


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise ModelError(str(path), f"cannot read safetensors file ({e})") from None


def quantize_checkpoint(model_dir, out_dir, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                        compute_dtype="bfloat16",
                        progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write a bitsandbytes 4-bit copy of the Hugging Face folder ``model_dir`` to ``out_dir``.

    The decoder linear weights (``model.layers.N.(self_attn|mlp).*_proj.weight``) are
    quantized; every other tensor (embeddings, norms, biases, lm_head) is copied unchanged.
    Writes ``model.safetensors``, ``config.json`` with ``quantization_config``, and the
    tokenizer / chat-template files, into a temporary folder renamed to ``out_dir`` at the
    end. Input tensors are read one at a time and the output is written as it is produced.
    ``progress(i, n, name)`` is called per tensor. Bad options: UsageError; missing or bad
    files, NaN / Inf weights: ModelError.
    """
    _check_options(quant_type, blocksize)
    qcfg = quantization_config_dict(quant_type, blocksize, double_quant, compute_dtype, None)
    src, out = Path(model_dir), Path(out_dir)
    if not src.is_dir():
        raise ModelError(str(src), "model folder not found")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ModelError(str(cfg_path), "missing config.json")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(str(cfg_path), f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(str(cfg_path), "not a JSON object")
    if config.get("quantization_config"):
        raise ModelError(str(cfg_path), "the model is already quantized (quantization_config is set)")
    files = checkpoint_files(src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(str(out), "output folder exists and is not empty")
    if out.resolve() == src.resolve():
        raise UsageError(str(out), "output folder must differ from the model folder")

    # Pass 1: read the headers, plan every output tensor.
    sources: list[tuple] = []  # (file, tensor name, quantize?, shape, dtype)
    seen: set[str] = set()
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name in seen:
                    raise ModelError(str(path), f"tensor {name!r} appears in more than one shard")
                seen.add(name)
                sl = f.get_slice(name)
                st_dtype = sl.get_dtype()
                if st_dtype not in _ST_DTYPES:
                    raise ModelError(str(path), f"tensor {name!r} has unsupported dtype {st_dtype}")
                shape, dtype = tuple(sl.get_shape()), _ST_DTYPES[st_dtype]
                quantize = (QUANTIZED_WEIGHT.match(name) is not None and len(shape) == 2
                            and dtype in (torch.float32, torch.float16, torch.bfloat16))
                sources.append((path, name, quantize, shape, dtype))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_quantized(sources, tmp / "model.safetensors", quant_type, blocksize, double_quant, progress)
        config["quantization_config"] = qcfg
        with open(tmp / "config.json", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tensor_bytes(t: torch.Tensor):
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else b""


def _header(entries: list, metadata: dict) -> bytes:
    """safetensors header JSON for ``entries`` [(name, dtype, shape, begin, end)]."""
    header = {name: {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [b, e]}
              for name, dtype, shape, b, e in entries}
    header["__metadata__"] = metadata
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def _state_layout(prefix: str, shape: tuple, dtype: torch.dtype, quant_type: str, blocksize: int,
                  double_quant: bool) -> list[tuple[str, torch.dtype, tuple]]:
    """(key, dtype, shape) of ``state_to_tensors`` output but the quant_state JSON, without quantizing."""
    numel = 1
    for s in shape:
        numel *= int(s)
    n_blocks = -(-numel // blocksize)
    w = f"{prefix}.weight"
    layout = [(w, torch.uint8, (-(-numel // 2), 1)),
              (f"{w}.absmax", torch.uint8 if double_quant else torch.float32, (n_blocks,)),
              (f"{w}.quant_map", torch.float32, (16,))]
    if double_quant:
        layout += [(f"{w}.nested_absmax", torch.float32, (-(-n_blocks // 256),)),
                   (f"{w}.nested_quant_map", torch.float32, (256,))]
    return layout


def _json_capacity(shape: tuple, quant_type: str, blocksize: int, dtype: torch.dtype, double_quant: bool) -> int:
    """An upper bound on the quant_state JSON length (the longest float repr as the offset)."""
    meta = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype_name(dtype),
            "shape": [int(s) for s in shape]}
    if double_quant:
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=-2.2250738585072014e-308)
    return len(json.dumps(meta).encode("utf-8")) + 8


def _write_quantized(sources, path: Path, quant_type: str, blocksize: int, double_quant: bool,
                     progress) -> None:
    """Stream ``sources`` into one safetensors file: read a tensor, quantize, write, free.

    The header comes first in the file but the quant_state JSON lengths are known only after
    quantizing (the offset's digits), so: every other tensor is laid out in ``sources`` order
    from the shapes alone; the small JSON tensors go last; the header space is reserved for
    the largest JSON lengths possible and the real header, written at the end, is padded
    with spaces to it (safetensors pads its own headers with spaces the same way).
    """
    fixed: list[tuple[str, torch.dtype, tuple, int, int]] = []
    qs_plan: list[tuple[str, int]] = []  # (key, capacity)
    offset = 0
    for file, name, quantize, shape, dtype in sources:
        if quantize:
            layout = _state_layout(name[: -len(".weight")], shape, dtype, quant_type, blocksize, double_quant)
            qs_plan.append((f"{name}.{QS_PREFIX}{quant_type}",
                            _json_capacity(shape, quant_type, blocksize, dtype, double_quant)))
        else:
            layout = [(name, dtype, shape)]
        for key, dt, shp in layout:
            n = 1
            for s in shp:
                n *= int(s)
            nbytes = n * torch.empty((), dtype=dt).element_size()
            fixed.append((key, dt, tuple(shp), offset, offset + nbytes))
            offset += nbytes
    metadata = {"format": "pt"}
    bound, b = [], offset
    for key, cap in qs_plan:
        bound.append((key, torch.uint8, (cap,), b, b + cap))
        b += cap
    reserved = len(_header(fixed + bound, metadata))
    reserved += -reserved % 8

    plan_by_key = {e[0]: e for e in fixed}
    qs_data: dict[str, torch.Tensor] = {}
    total = len(sources)
    with open(path, "wb") as fh:
        fh.seek(8 + reserved)
        i = 0
        for file, group in itertools.groupby(sources, key=lambda s: s[0]):
            with _open(file) as f:
                for _, name, quantize, _, _ in group:
                    t = f.get_tensor(name)
                    if quantize:
                        try:
                            packed, state = F.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type,
                                                            double_quant=double_quant)
                        except ValueError as e:
                            raise ModelError(str(file), f"tensor {name!r}: {e}") from None
                        del t
                        out = state_to_tensors(name[: -len(".weight")], packed, state)
                    else:
                        out = {name: t}
                    for key, value in out.items():
                        if ".quant_state." in key:
                            qs_data[key] = value
                            continue
                        _, dt, shp, begin, _ = plan_by_key[key]
                        if value.dtype != dt or tuple(value.shape) != shp or fh.tell() != 8 + reserved + begin:
                            raise RuntimeError(f"internal: {key} does not match its planned layout")
                        fh.write(_tensor_bytes(value))
                    del out
                    i += 1
                    if progress is not None:
                        progress(i, total, name)
        entries = list(fixed)
        b = offset
        for key, _ in qs_plan:
            data = qs_data[key]
            fh.write(_tensor_bytes(data))
            entries.append((key, torch.uint8, tuple(data.shape), b, b + data.numel()))
            b += data.numel()
        header = _header(entries, metadata)
        if len(header) > reserved:
            raise RuntimeError("internal: safetensors header outgrew its reserved space")
        fh.seek(0)
        fh.write(struct.pack("<Q", reserved))
        fh.write(header + b" " * (reserved - len(header)))
        fh.flush()
        os.fsync(fh.fileno())
