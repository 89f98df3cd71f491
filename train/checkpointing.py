"""Checkpoints of a run: ``OUT/checkpoints/step-N/`` written atomically, found, verified,
restored, pruned; and the bookkeeping of the output folder that goes with them.

A checkpoint holds the trainable tensors, the optimizer state as named tensors (no pickle),
every rank's RNG state, the adapter (when there is one) and ``state.json``: the step, the
sha256 of each tensor file, and what the run was (``resume_config``, ``data_sha256``,
``base_model_sha256``) so that ``--resume`` can refuse a run that is not the same one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from leantune.base import LeantuneError, ModelError, UsageError, file_sha256
from leantune.peft_core.checkpoint import write_json
from leantune.peft_core.safetensors_io import SafetensorsFile, read_safetensors, write_safetensors
from leantune.train import fsdp
from leantune.train.distributed import Ranks, rng_state


class TrainingAborted(LeantuneError):
    exit_code = 1


# -- checkpoints ---------------------------------------------------------------------------
def optimizer_tensors(opt, names: dict) -> dict:
    """AdamW state as named tensors (no pickle): ``{param}.{exp_avg|exp_avg_sq|step}``."""
    out = {}
    for p, st in opt.state.items():
        name = names[p]
        for k, v in st.items():
            out[f"{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt, params: dict, tensors: dict):
    states: dict = {}
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        if name not in params:
            raise UsageError(key, "optimizer state for a parameter this run does not train")
        states.setdefault(name, {})[field] = fsdp.local_like(params[name], value)
    for name, st in states.items():
        opt.state[params[name]] = st


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")


def remove_stale_temps(run_dir: Path):
    """Delete what a killed run left half-written: ``checkpoints/.tmp-*`` folders and the
    ``.tmp-*`` files of the atomic writers in the output folder, ``adapter/`` and ``model/``.
    None of them is ever read (complete files are renamed into place)."""
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        for d in ckpts.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    for folder in (run_dir, run_dir / "adapter", run_dir / "model"):
        if folder.is_dir():
            for f in folder.glob(".tmp-*"):
                if f.is_file():
                    f.unlink(missing_ok=True)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model, params: dict, opt, extra: dict, cfg,
                    rng: dict | None = None):
    """checkpoints/step-N/ written to a temp folder, fsynced, then renamed into place;
    ``rng`` defaults to this process's RNG state.

    state.json is written last and records the sha256 of every tensor file, so a checkpoint
    damaged later (a bit flip, a truncation) is recognised on resume. An OSError (a full
    disk) removes the temp folder and raises TrainingAborted naming the newest checkpoint
    that is still intact."""
    ckpts = run_dir / "checkpoints"
    final = ckpts / f"step-{step}"
    tmp = ckpts / f".tmp-step-{step}-{os.getpid()}"
    try:
        ckpts.mkdir(exist_ok=True)
        remove_stale_temps(run_dir)
        tmp.mkdir()
        names = {p: n for n, p in params.items()}
        files = {
            "trainable.safetensors": write_safetensors({n: p.detach() for n, p in params.items()},
                                                       tmp / "trainable.safetensors"),
            "optimizer.safetensors": write_safetensors(optimizer_tensors(opt, names),
                                                       tmp / "optimizer.safetensors"),
            "rng.safetensors": write_safetensors(rng or rng_state(), tmp / "rng.safetensors"),
        }
        if cfg.adapter.kind != "none":
            from leantune.peft_core.adapters import save_adapter

            save_adapter(model, tmp / "adapter", base_model_name_or_path=extra.get("base_model", ""))
        write_json(tmp / "state.json", {"step": step, **extra, "files": files})  # last: marks complete
        _fsync_dir(tmp)
        old = ckpts / f".tmp-old-step-{step}-{os.getpid()}"
        if final.exists():  # the same step saved again (after a resume): swap, then delete
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(ckpts)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = newest_checkpoint(run_dir)
        kept = f"{prev.name} is intact" if prev is not None else "there is no earlier checkpoint"
        raise TrainingAborted(str(final), f"cannot write the checkpoint ({e.strerror or e}); {kept}; "
                                          "free space and continue with --resume") from e
    return final


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint (one with state.json) of the highest step, unverified."""
    found = _complete_checkpoints(run_dir)
    return found[0] if found else None


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` folders holding a state.json, newest first."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = []
    for d in ckpts.iterdir():
        n = d.name[5:]
        if d.name.startswith("step-") and n.isascii() and n.isdigit() and (d / "state.json").is_file():
            found.append((int(n), d))
    return [d for _, d in sorted(found, reverse=True)]


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (unreadable state.json, a missing, truncated or
    altered tensor file), or None when it checks out."""
    try:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return f"state.json is unreadable ({e})"
    if not isinstance(state, dict):
        return "state.json is not a JSON object"
    step = state.get("step")
    if type(step) is not int or step < 0 or f"step-{step}" != ckpt.name:
        return f"state.json has step {step!r}, the folder is {ckpt.name}"
    if type(state.get("skipped_steps", 0)) is not int:
        return "state.json has a malformed skipped_steps"
    hashes = state.get("files")
    for name in CHECKPOINT_FILES:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if isinstance(hashes, dict):  # checkpoints of older versions carry no hashes
            if hashes.get(name) != file_sha256(path):
                return f"{name} does not match the sha256 recorded in state.json"
        else:
            try:
                SafetensorsFile(path)
            except LeantuneError as e:
                return e.what
    return None


def resume_checkpoint(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that checks out; damaged newer ones are named and skipped.
    None when there is no complete checkpoint; ModelError when every one is damaged."""
    found = _complete_checkpoints(run_dir)
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log(f"resume: skipping {ckpt} ({problem})")
    if found:
        raise ModelError(str(found[0]), f"no usable checkpoint to resume from: "
                                        f"{checkpoint_problem(found[0])}")
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` folders holding a state.json, newest first."""
    return _complete_checkpoints(run_dir)


def prune_checkpoints(run_dir: Path, keep: int):
    """Delete all but the ``keep`` newest complete checkpoints (``keep`` 0: keep them all)."""
    if keep > 0:
        for old in _complete_checkpoints(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def check_same_run(ckpt: Path, state: dict, current: dict):
    """Refuse (UsageError, exit 2) to resume from ``ckpt`` when it belongs to another run.

    ``current`` holds this run's ``resume_config`` (the config keys that decide the trained
    result, flattened as ``section.key``), ``data_sha256`` and ``base_model_sha256``; a
    checkpoint of an older version that lacks one of them is not checked on it, nor on a
    config key it does not record (one added since)."""
    diffs = []
    old_cfg, new_cfg = state.get("resume_config"), current["resume_config"]
    if isinstance(old_cfg, dict):
        diffs += [f"{k} ({old_cfg.get(k)!r} in the checkpoint, {new_cfg.get(k)!r} now)"
                  for k in sorted(set(old_cfg) & set(new_cfg)) if old_cfg[k] != new_cfg[k]]
    old_data = state.get("data_sha256")
    if isinstance(old_data, dict):
        diffs += [f"data.{k} (its contents changed)" for k in sorted(set(old_data) | set(current["data_sha256"]))
                  if old_data.get(k) != current["data_sha256"].get(k)]
    if state.get("base_model_sha256") not in (None, current["base_model_sha256"]):
        diffs.append("model.path (a different base model)")
    if diffs:
        raise UsageError(str(ckpt), "this run differs from the checkpoint's: " + "; ".join(diffs)
                         + " (start over with --overwrite, or restore the old settings)")


def restore_checkpoint(ckpt: Path, params: dict, opt, ranks: Ranks) -> dict:
    """Load ``ckpt``'s trainable tensors, optimizer state and this rank's RNG state; its
    state.json."""
    state = json.loads((ckpt / "state.json").read_text())
    saved = read_safetensors(ckpt / "trainable.safetensors")
    missing = [n for n in params if n not in saved]
    if missing:
        raise UsageError(str(ckpt), f"checkpoint lacks trainable tensor {missing[0]!r} "
                                    "(was the adapter config changed?)")
    try:  # a checkpoint of another shape (or an old format with damaged tensors) is refused
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(fsdp.local_like(p, saved[n]))
        load_optimizer_tensors(opt, params, read_safetensors(ckpt / "optimizer.safetensors"))
        rng = read_safetensors(ckpt / "rng.safetensors")
        mine = f".rank{ranks.rank}" if f"torch_cpu.rank{ranks.rank}" in rng else ""
        if "torch_cpu" + mine not in rng:
            raise ValueError("rng.safetensors lacks the CPU generator state")
        torch.set_rng_state(rng["torch_cpu" + mine])
        if "torch_cuda" + mine in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda" + mine])
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ModelError(str(ckpt), f"checkpoint does not fit this run ({type(e).__name__}: {e})") from None
    return state


def trim_metrics(metrics_path: Path, last_step: int):
    """Keep the metrics.jsonl rows of steps up to ``last_step``; drop later and half-written ones."""
    if metrics_path.exists():
        kept = [ln for ln in metrics_path.read_text(errors="replace").splitlines()
                if (st := _metrics_step(ln)) is not None and st <= last_step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))


def _metrics_step(line: str):
    """The step of one metrics.jsonl line; None for a blank or half-written one."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if type(step) is int else None


# what a run writes into its output folder; ``--overwrite`` removes these (and nothing else)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.csv", "tensorboard", "manifest.json", "adapter",
               "model", "eval")


def clear_run(run_dir: Path):
    """Remove the outputs of an earlier run from ``run_dir`` (``train --overwrite``); the token
    cache and files the run did not write stay."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
