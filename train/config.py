"""The training / eval config: typed dataclasses, TOML loading, ``--set`` overrides.

Every key has a default (the CONTRACT's table). Unknown sections or keys are rejected with a
did-you-mean; values are type-checked and range-checked; every error names ``section.key``
(and the file) and exits with status 2.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from leantune.base import UsageError
from leantune.peft_core.adapters import AdapterConfig
from leantune.peft_core.build import HUB_ID


def key(default, doc: str, objective: str | tuple = ()):
    """A config key: its default and the comment ``leantune config`` prints beside it (the one
    place a key is documented: the README's config block is generated from these). A list or
    table default is copied for every config. ``objective``: the ``train.objective`` value(s)
    the key belongs to; such a key is printed only for them (``leantune config --kind K``)."""
    meta = {"doc": doc, "objective": (objective,) if isinstance(objective, str) else tuple(objective)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    path: str = key("", 'a Hugging Face folder, or "org/name" from the local Hugging Face cache;\n'
                        '"" = the embedded SmolLM2 (imported once)')
    quant: str = key("nf4", '"nf4" | "fp4" | "none"')
    compute_dtype: str = key("auto", '"auto" | "float32" | "bfloat16" | "float16"; auto: bf16 on GPU and on CPUs\n'
                                     'with native bf16, else fp32 (LEANTUNE_CPU_BF16=0 keeps fp32).\n'
                                     'Adapters, optimizer and loss stay fp32')
    blocksize: int = key(64, "weights per 4-bit absmax block")
    double_quant: bool = key(True, "quantize the absmax values too (QLoRA's double quantization)")


# the [adapter] keys' comments (its fields are AdapterConfig's, in peft_core)
ADAPTER_DOCS = {
    "kind": '"lora" | "dora" | "lora_fa" | any registered variant | "none" (full fine-tune)',
    "r": "the adapter rank",
    "alpha": "scale alpha / r (alpha / sqrt(r) with rslora)",
    "dropout": "dropout on the adapter's input, in [0, 1)",
    "targets": '"all-linear", a list of module-name suffixes, or a regex string (PEFT semantics)',
    "init": '"default" | "gaussian" | "pissa" | "olora" | "loftq" | "none"',
    "rslora": "scale by alpha / sqrt(r)",
    "rank_pattern": "per-module rank overrides, PEFT semantics",
    "alpha_pattern": "per-module alpha overrides, PEFT semantics",
    "layers": "only these layer indices (an integer or a list; list targets only)",
    "exclude": "module names (a list or a regex) to leave without an adapter",
    "base_quant": 'after a base-rewriting init, quantize the bases: {quant = "nf4", ...}',
    "loftq_iters": "LoftQ's alternating quantize / SVD steps",
}

def _adapter_section():
    """The ``[adapter]`` section: the fields of ``peft_core.adapters.AdapterConfig`` with their
    defaults, read from ``dataclasses.fields`` so that a field added there is a TOML key here.
    Unlike ``AdapterConfig`` it also takes ``kind = "none"``: a full fine-tune (no adapter)."""
    specs = []
    for f in dataclasses.fields(AdapterConfig):
        meta = {"doc": ADAPTER_DOCS.get(f.name, ""), "objective": ()}
        if f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory, metadata=meta)
        else:
            spec = field(default=f.default, metadata=meta)
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
    train: str = key("", "the training JSONL file (required)")
    eval: str = key("", 'a held-out JSONL file for train.eval_every; "" = none')
    max_len: int = key(1024, "tokens a row at most (longer examples are cut)")
    format: str = key("auto", '"auto" | "text" | "prompt_completion" | "messages"')
    pack: bool = key(True, "best-fit packing; attention never crosses documents")
    mask_prompt: bool = key(True, "loss on completions / assistant turns only")
    mask_mode: str = key("all_assistant", '"all_assistant" | "last_assistant"')
    pad_to_multiple_of: int = key(16, "a batch's length is rounded up to a multiple of this (1 = the\n"
                                      "longest row): fewer distinct shapes, so the CPU kernels' caches\n"
                                      "stop growing with every new length")


@dataclass
class TrainSection:
    out: str = key("runs/leantune", "the output folder")
    objective: str = key("sft", '"sft" | "dpo" | "grpo"; `leantune config --kind K` shows its keys')
    loss_type: str = key("sigmoid", '"sigmoid" (DPO) | "ipo" | "simpo" (reference-free, length-normalised)', "dpo")
    beta: float = key(0.1, "DPO's beta: how far the policy may move from the reference", "dpo")
    gamma: float = key(0.5, "SimPO's target reward margin (loss_type = \"simpo\" only)", "dpo")
    reference_adapter: str = key("", 'a frozen SFT adapter folder as the reference (the trained\n'
                                     'adapter starts as a copy of it); "" = the base, adapter off', ("dpo", "grpo"))
    precompute_ref: bool = key(False, "reference log-probs computed once before training, cached\n"
                                      "under OUT/cache", "dpo")
    group_size: int = key(4, "completions sampled for each prompt: the group whose rewards are\n"
                             "normalised into advantages", "grpo")
    max_new_tokens: int = key(64, "tokens a sampled completion at most", "grpo")
    temperature: float = key(1.0, "sampling temperature (> 0); the log-probs are of logits / temperature", "grpo")
    top_p: float = key(1.0, "nucleus sampling, in (0, 1]", "grpo")
    kl_beta: float = key(0.04, "weight of the per-token KL to the reference; 0 = no KL term", "grpo")
    clip_eps: float = key(0.2, "the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]", "grpo")
    reward: list = key(["json_field_acc"], 'metrics of a completion against the record\'s reference, summed:\n'
                                           '"json_field_acc" | "json_exact" | other "json_*" keys | "exact" |\n'
                                           '"contains" | "regex" (the record\'s "regex" field)', "grpo")
    reward_weights: list = key([], "one weight per reward metric; [] = 1.0 each", "grpo")
    reward_fn: str = key("", '"module:function" or "file.py:function" called as\n'
                             'f(prompt, completion, reference) -> float; replaces `reward`', "grpo")
    seed: int = key(0, "data order, dropout and init")
    lr: float = key(2e-4, "peak learning rate")
    max_steps: int = key(0, "optimizer steps; 0 = run `epochs` epochs")
    epochs: int = key(1, "passes over the data when max_steps = 0")
    batch_size: int = key(4, "rows a micro-batch (the global batch is batch_size x grad_accum)")
    grad_accum: int = key(1, "micro-batches an optimizer step")
    warmup_steps: int = key(0, "linear warmup steps")
    schedule: str = key("cosine", '"constant" | "linear" | "cosine"')
    weight_decay: float = key(0.0, "AdamW decay, on matrices only")
    clip: float = key(1.0, "gradient-norm clipping; 0 = off")
    grad_checkpoint: bool = key(False, "recompute each block in the backward (less memory)")
    fsdp: bool = key(False, "under torchrun: shard the 4-bit base and the adapters (FSDP2);\n"
                            'one process: no effect. Not with optimizer = "adamw8bit"')
    cuda_graphs: bool = key(False, "GPU: replay the decoder trunk's forward and backward as CUDA\n"
                                   "graphs. Not with fsdp or grad_checkpoint")
    save_every: int = key(0, "a checkpoint every N steps; 0 = only at the end")
    eval_every: int = key(0, "eval loss on data.eval every N steps; 0 = never")
    log_every: int = key(1, "a metrics row every N steps (off a terminal also a progress line,\n"
                            "at most every 30 s)")
    optimizer: str = key("adamw", '"adamw" | "adamw8bit" (8-bit blockwise states)')
    loss_chunk: int = key(256, "tokens per chunk of the chunked cross-entropy")
    max_nan_steps: int = key(5, "consecutive non-finite steps before stopping (with a checkpoint)")
    keep_checkpoints: int = key(0, "keep the newest N complete checkpoints; 0 = all")
    report_to: list = key([], 'more writers of the metrics rows: "csv" (OUT/metrics.csv),\n'
                              '"tensorboard" (event files under OUT/tensorboard/, offline)')


@dataclass
class EvalSection:
    data: str = key("", "held-out JSONL; its completion / last assistant turn is the reference")
    metrics: list = key(["loss", "exact", "json"], 'also "contains", "regex", "choice", "classification"')
    baselines: list = key(["base", "prompted"], "prompted: the base with `shots` examples from the train set")
    shots: int = key(3, "few-shot examples of the prompted baseline")
    max_new_tokens: int = key(128, "tokens generated an item at most")
    require_lift: float = key(0.0, "exit 5 when tuned - best baseline < this on the primary metric")
    batch_size: int = key(8, "items generated together")
    max_items: int = key(0, "evaluate the first N items; 0 = all")
    general_text: str = key("", '"" = the bundled general-text sample for the KL / perplexity check')
    kl_threshold: float = key(0.5, "flag a mean KL(base || tuned) on general text above this")


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
    ("train", "objective"): ("sft", "dpo", "grpo"),
    ("train", "loss_type"): ("sigmoid", "ipo", "simpo"),
}
# list keys whose items must be among these
LIST_CHOICES = {("train", "report_to"): ("csv", "tensorboard")}
POSITIVE = {("adapter", "r"), ("adapter", "alpha"), ("train", "lr"), ("data", "max_len"), ("train", "batch_size"), ("train", "grad_accum"),
            ("train", "epochs"), ("model", "blocksize"), ("train", "loss_chunk"),
            ("eval", "max_new_tokens"), ("eval", "batch_size"), ("train", "max_nan_steps"),
            ("train", "beta"), ("train", "max_new_tokens"), ("train", "temperature"),
            ("train", "clip_eps")}
NON_NEGATIVE = {("train", "max_steps"), ("train", "warmup_steps"), ("train", "save_every"),
                ("train", "eval_every"), ("train", "weight_decay"), ("train", "clip"),
                ("eval", "shots"), ("eval", "max_items"), ("train", "seed"),
                ("train", "log_every"), ("train", "keep_checkpoints"), ("eval", "kl_threshold"),
                ("adapter", "loftq_iters"), ("train", "gamma"), ("train", "kl_beta")}
# inclusive integer bounds (ints not named here: at most INT_MAX); every float must be finite
INT_RANGES = {("data", "max_len"): (2, 2**20), ("data", "pad_to_multiple_of"): (1, 4096), ("train", "batch_size"): (1, 2**16),
              ("train", "grad_accum"): (1, 2**16), ("adapter", "r"): (1, 2**16),
              ("model", "blocksize"): (16, 2**16), ("train", "loss_chunk"): (1, 2**24),
              ("eval", "max_new_tokens"): (1, 2**20), ("eval", "batch_size"): (1, 2**16),
              ("train", "seed"): (0, 2**63 - 1), ("eval", "shots"): (0, 2**10),
              ("train", "epochs"): (1, 2**20), ("adapter", "loftq_iters"): (1, 2**10),
              ("train", "group_size"): (2, 2**12), ("train", "max_new_tokens"): (1, 2**16)}
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
            _check_items(value, LIST_CHOICES.get((sec_name, key)), where)
            setattr(section, key, value)
    return cfg


def _check_items(value, choices, where):
    for item in value if choices else ():
        if item not in choices:
            raise UsageError(where, f"{item!r} is not one of {', '.join(choices)}" + _suggest(str(item), choices))


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


def _hub_id(sec: str, key: str, value: str, base: Path) -> bool:
    """A ``model.path`` like ``org/name`` that is no folder beside the config: a Hugging Face
    repo id, looked up in the local cache (``peft_core.build.resolve_model_dir``)."""
    return (sec, key) == ("model", "path") and bool(HUB_ID.fullmatch(value)) and not (base / value).is_dir()


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
    check_objective(cfg, str(path))
    # relative data / output paths are relative to the config file's folder
    base = path.resolve().parent
    for sec, key in (("data", "train"), ("data", "eval"), ("eval", "data"), ("train", "out"),
                     ("model", "path"), ("eval", "general_text"), ("train", "reference_adapter")):
        section = getattr(cfg, sec)
        value = getattr(section, key)
        if value and not Path(value).is_absolute() and not _hub_id(sec, key, value, base):
            setattr(section, key, str(base / value))
    return cfg


def check_objective(cfg: Config, path: str):
    """The objective's own rules (one line naming the key, exit 2)."""
    t = cfg.train
    if t.objective == "grpo":
        check_grpo(cfg, path)
    if t.objective != "dpo":
        return
    if t.reference_adapter and t.loss_type == "simpo":
        raise UsageError(f"{path}: train.reference_adapter", 'loss_type = "simpo" uses no reference')
    if cfg.adapter.kind == "none" and t.loss_type != "simpo" and not t.precompute_ref:
        raise UsageError(f"{path}: train.precompute_ref", 'a full fine-tune (adapter.kind = "none") has '
                                                          "no adapter to switch off for the reference: "
                                                          "set precompute_ref = true")
    if cfg.adapter.kind == "none" and t.reference_adapter:
        raise UsageError(f"{path}: train.reference_adapter", 'needs an adapter (adapter.kind is "none")')


def check_grpo(cfg: Config, path: str):
    """GRPO's keys beyond their types and ranges."""
    from leantune.train.rewards import REWARD_METRICS, load_reward_fn

    t = cfg.train
    if cfg.adapter.kind == "none" and (t.kl_beta or t.reference_adapter):
        key = "reference_adapter" if t.reference_adapter else "kl_beta"
        raise UsageError(f"{path}: train.{key}", 'a full fine-tune (adapter.kind = "none") has no adapter '
                                                 "to switch off for the reference: set kl_beta = 0")

    if not 0.0 < t.top_p <= 1.0:
        raise UsageError(f"{path}: train.top_p", f"must be in (0, 1], got {t.top_p!r}")
    if not 0.0 < t.clip_eps < 1.0:
        raise UsageError(f"{path}: train.clip_eps", f"must be in (0, 1), got {t.clip_eps!r}")
    if not t.reward and not t.reward_fn:
        raise UsageError(f"{path}: train.reward", "is empty: name a metric, or set train.reward_fn")
    for name in t.reward:
        if name not in REWARD_METRICS:
            raise UsageError(f"{path}: train.reward", f"{name!r} is not one of {', '.join(REWARD_METRICS)}"
                             + _suggest(str(name), REWARD_METRICS))
    w = t.reward_weights
    if w and len(w) != len(t.reward):
        raise UsageError(f"{path}: train.reward_weights", f"has {len(w)} weights for {len(t.reward)} metrics")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in w):
        raise UsageError(f"{path}: train.reward_weights", f"must be finite numbers, got {w!r}")
    if t.reward_fn:
        load_reward_fn(t.reward_fn, f"{path}: train.reward_fn")


# -- the default config as commented TOML (``leantune config``, the README's block) ----------
COMMENT_COLUMN = 24
README_BEGIN, README_END = "<!-- config:begin -->", "<!-- config:end -->"


def toml_value(value) -> str:
    """A default as a TOML value (strings as basic strings, tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _key_lines(f, value, label: str) -> list[str]:
    """``name = default   # comment`` (a None default, which TOML cannot hold, commented out);
    a comment of several lines continues under the first."""
    text = f"# {f.name} = (unset)" if value is None else f"{f.name} = {toml_value(value)}"
    doc = (label + f.metadata.get("doc", "")).split("\n")
    if not doc[0]:
        return [text]
    lines = [f"{text:<{COMMENT_COLUMN - 2}}  # {doc[0]}"]
    return lines + [f"{'':<{COMMENT_COLUMN - 2}}  # {d}" for d in doc[1:]]


def config_toml(kind: str | None = "sft") -> str:
    """Every key of the config at its default, one a line with its comment, as TOML that
    ``load_config`` reads back to the defaults. ``kind``: the ``train.objective`` shown, with
    that objective's own keys; None shows every key, each objective's marked (the README)."""
    cfg = Config()
    if kind is not None:
        cfg.train.objective = kind
    out = []
    for sec in dataclasses.fields(Config):
        if sec.name == "source" or not _for_kind(sec, kind):
            continue
        out += ["", f"[{sec.name}]"]
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            if _for_kind(f, kind):
                only = f.metadata.get("objective", ())
                label = f"({' | '.join(only)} only) " if only and kind is None else ""
                out += _key_lines(f, getattr(section, f.name), label)
    return "\n".join(out[1:]) + "\n"


def _for_kind(f, kind) -> bool:
    only = f.metadata.get("objective", ())
    return kind is None or not only or kind in only


def readme_block() -> str:
    """What stands between README_BEGIN and README_END in README.md."""
    return f"{README_BEGIN}\n```toml\n{config_toml(None)}```\n{README_END}"


def update_readme(path) -> bool:
    """Rewrite README.md's config block from the defaults; True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise UsageError(str(path), f"has no {README_BEGIN} ... {README_END} block")
    new = text[:start] + readme_block() + text[end + len(README_END):]
    path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # python -m leantune.train.config --readme [README.md]
    import sys

    if sys.argv[1:2] != ["--readme"]:
        sys.exit("usage: python -m leantune.train.config --readme [README.md]")
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "README.md"
    print(f"{target}: {'updated' if update_readme(target) else 'already up to date'}")
