"""The training / eval config: typed dataclasses, TOML loading, ``--set`` overrides.

Every key has a default (the CONTRACT's table). Unknown sections or keys are rejected with a
did-you-mean; values are type-checked and range-checked; every error names ``section.key``
(and the file) and exits with status 2.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from leantune.base import UsageError
from leantune.peft_core.adapters import AdapterConfig


@dataclass
class ModelSection:
    path: str = ""  # a Hugging Face model folder; "" -> the embedded SmolLM2 (imported once)
    quant: str = "nf4"  # "nf4" | "fp4" | "none"
    compute_dtype: str = "auto"  # "auto" (bf16 on GPU and bf16-capable CPUs, else fp32) | float32 | bfloat16 | float16
    blocksize: int = 64
    double_quant: bool = True


def _adapter_section():
    """The ``[adapter]`` section: the fields of ``peft_core.adapters.AdapterConfig`` with their
    defaults, read from ``dataclasses.fields`` so that a field added there is a TOML key here.
    Unlike ``AdapterConfig`` it also takes ``kind = "none"``: a full fine-tune (no adapter)."""
    specs = []
    for f in dataclasses.fields(AdapterConfig):
        if f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory)
        else:
            spec = field(default=f.default)
        specs.append((f.name, f.type, spec))
    return dataclasses.make_dataclass("AdapterSection", specs, namespace={"__doc__": _adapter_section.__doc__})


AdapterSection = _adapter_section()


def adapter_config(section) -> AdapterConfig | None:
    """The ``AdapterConfig`` the ``[adapter]`` section describes (every field copied; None for
    ``kind = "none"``). Raises UsageError naming ``adapter.<key>`` for a bad value."""
    if section.kind == "none":
        return None
    values = {f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(AdapterConfig)}
    return AdapterConfig(**values)


@dataclass
class DataSection:
    train: str = ""
    eval: str = ""
    max_len: int = 1024
    format: str = "auto"  # "auto" | "text" | "prompt_completion" | "messages"
    pack: bool = True
    mask_prompt: bool = True
    mask_mode: str = "all_assistant"  # or "last_assistant"


@dataclass
class TrainSection:
    out: str = "runs/leantune"
    seed: int = 0
    lr: float = 2e-4
    max_steps: int = 0  # 0 -> epochs decide
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "cosine"  # "constant" | "linear" | "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0  # 0 disables clipping
    grad_checkpoint: bool = False
    fsdp: bool = False  # under torchrun: shard the base and adapters over the processes (FSDP2)
    cuda_graphs: bool = False  # replay the decoder trunk's forward/backward as CUDA graphs (GPU)
    save_every: int = 0
    eval_every: int = 0
    log_every: int = 1
    optimizer: str = "adamw"  # "adamw" | "adamw8bit"
    loss_chunk: int = 256  # tokens per chunk of the chunked cross-entropy
    max_nan_steps: int = 5  # consecutive non-finite steps before aborting (with a checkpoint)
    keep_checkpoints: int = 0  # keep the N newest complete checkpoints; 0 keeps all


@dataclass
class EvalSection:
    data: str = ""
    metrics: list = field(default_factory=lambda: ["loss", "exact", "json"])
    baselines: list = field(default_factory=lambda: ["base", "prompted"])
    shots: int = 3
    max_new_tokens: int = 128
    require_lift: float = 0.0
    batch_size: int = 8
    max_items: int = 0  # 0 -> all
    general_text: str = ""  # "" -> the bundled general-text set for the regression check
    kl_threshold: float = 0.5


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    source: str = ""  # the file it was read from (for messages and relative paths)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


CHOICES = {
    ("model", "quant"): ("nf4", "fp4", "none"),
    ("model", "compute_dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("data", "format"): ("auto", "text", "prompt_completion", "messages"),
    ("data", "mask_mode"): ("all_assistant", "last_assistant"),
    ("train", "schedule"): ("constant", "linear", "cosine"),
    ("train", "optimizer"): ("adamw", "adamw8bit"),
}
POSITIVE = {("adapter", "r"), ("adapter", "alpha"), ("train", "lr"), ("data", "max_len"), ("train", "batch_size"), ("train", "grad_accum"),
            ("train", "epochs"), ("model", "blocksize"), ("train", "loss_chunk"),
            ("eval", "max_new_tokens"), ("eval", "batch_size"), ("train", "max_nan_steps")}
NON_NEGATIVE = {("train", "max_steps"), ("train", "warmup_steps"), ("train", "save_every"),
                ("train", "eval_every"), ("train", "weight_decay"), ("train", "clip"),
                ("eval", "shots"), ("eval", "max_items"), ("train", "seed"),
                ("train", "log_every"), ("train", "keep_checkpoints"), ("eval", "kl_threshold"),
                ("adapter", "loftq_iters")}
# inclusive integer bounds (ints not named here: at most INT_MAX); every float must be finite
INT_RANGES = {("data", "max_len"): (2, 2**20), ("train", "batch_size"): (1, 2**16),
              ("train", "grad_accum"): (1, 2**16), ("adapter", "r"): (1, 2**16),
              ("model", "blocksize"): (16, 2**16), ("train", "loss_chunk"): (1, 2**24),
              ("eval", "max_new_tokens"): (1, 2**20), ("eval", "batch_size"): (1, 2**16),
              ("train", "seed"): (0, 2**63 - 1), ("eval", "shots"): (0, 2**10),
              ("train", "epochs"): (1, 2**20), ("adapter", "loftq_iters"): (1, 2**10)}
INT_MAX = 2**40
FRACTION = {("adapter", "dropout")}  # in [0, 1)


def _suggest(word, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPE_NAMES = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number"),
               "bool": (bool, "true or false"), "list": (list, "a list"), "dict": (dict, "a table")}


def _check_annotated(value, annotation, where):
    """Validate a key whose default is None against its annotation (``"list | int | None"``)."""
    names = [n.strip() for n in str(annotation).split("|") if n.strip() in _TYPE_NAMES]
    for name in names:
        types, _ = _TYPE_NAMES[name]
        if isinstance(value, types) and (name == "bool" or not isinstance(value, bool)):
            return value
    if not names:
        return value
    raise UsageError(where, f"expected {' or '.join(_TYPE_NAMES[n][1] for n in names)}, got {value!r}")


def _check_range(value, key, where):
    """Finite floats; the POSITIVE / NON_NEGATIVE / FRACTION / INT_RANGES bounds."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(where, f"must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if key in FRACTION and not 0.0 <= value < 1.0:
        raise UsageError(where, f"must be in [0, 1), got {value!r}")
    if key in POSITIVE and value <= 0:
        raise UsageError(where, f"must be positive, got {value!r}")
    if key in NON_NEGATIVE and value < 0:
        raise UsageError(where, f"must be >= 0, got {value!r}")
    if isinstance(value, int):
        lo, hi = INT_RANGES.get(key, (None, INT_MAX))
        if (lo is not None and value < lo) or value > hi:
            raise UsageError(where, f"must be {'' if lo is None else f'at least {lo} and '}at most {hi}, "
                                    f"got {value!r}")


def _check_type(value, default, where, annotation=""):
    """Coerce/validate one value against the type of its default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(where, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(where, f"expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(where, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise UsageError(where, f"expected a table, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise UsageError(where, f"expected a list, got {value!r}")
        return value
    if default is None:
        return _check_annotated(value, annotation, where)
    if isinstance(default, str) and not isinstance(default, bool):
        if where.endswith("adapter.targets") and isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise UsageError(where, "expected a list of module-name patterns")
            return value
        if not isinstance(value, str):
            raise UsageError(where, f"expected a string, got {value!r}")
        return value
    return value


def apply_dict(cfg: Config, data: dict, source: str) -> Config:
    prefix = f"{source}: " if source else ""
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    for sec_name, values in data.items():
        if sec_name not in sections:
            raise UsageError(f"{prefix}[{sec_name}]", "unknown section" + _suggest(sec_name, sections))
        if not isinstance(values, dict):
            raise UsageError(f"{prefix}[{sec_name}]", "expected a table of keys")
        section = getattr(cfg, sec_name)
        keys = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            where = f"{prefix}{sec_name}.{key}"
            if key not in keys:
                raise UsageError(where, "unknown key" + _suggest(key, keys))
            value = _check_type(value, getattr(section, key), where, keys[key].type)
            choices = CHOICES.get((sec_name, key))
            if choices and value not in choices:
                raise UsageError(where, f"must be one of {', '.join(choices)}; got {value!r}"
                                 + _suggest(str(value), choices))
            _check_range(value, (sec_name, key), where)
            setattr(section, key, value)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """``section.key=value`` with a TOML value (bare words are taken as strings)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UsageError("--set", f"expected section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path, overrides=()) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(str(path), "config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(str(path), f"cannot read ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(str(path), f"invalid TOML: {e}") from None
    cfg = apply_dict(Config(source=str(path)), data, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        apply_dict(cfg, {section: {key: value}}, "--set")
    if cfg.train.fsdp and cfg.train.optimizer == "adamw8bit":
        raise UsageError(f"{path}: train.fsdp", "the 8-bit AdamW quantizes its states in blocks of the "
                                                "whole tensor, which shards do not hold: use "
                                                "train.optimizer = \"adamw\" with fsdp")
    if cfg.train.cuda_graphs and (cfg.train.fsdp or cfg.train.grad_checkpoint):
        other = "fsdp" if cfg.train.fsdp else "grad_checkpoint"
        raise UsageError(f"{path}: train.cuda_graphs", f"does not combine with train.{other} "
                                                       "(turn one of them off)")
    if not cfg.train.out.strip():
        raise UsageError(f"{path}: train.out", "is empty: name the output folder")
    adapter_config(cfg.adapter)  # AdapterConfig's own checks, at load time
    # relative data / output paths are relative to the config file's folder
    base = path.resolve().parent
    for sec, key in (("data", "train"), ("data", "eval"), ("eval", "data"), ("train", "out"),
                     ("model", "path"), ("eval", "general_text")):
        section = getattr(cfg, sec)
        value = getattr(section, key)
        if value and not Path(value).is_absolute():
            setattr(section, key, str(base / value))
    return cfg
