"""Where a run came from: the base model's fingerprint, the data's hashes, the code and
library versions, and the manifest.json that records them in the output folder.

``resume_config`` is the part of the config that decides the trained result: a checkpoint
stores it, and ``--resume`` refuses a run whose value differs. The keys that may differ on
resume (``RESUME_FREE``) only say how long to run, how often to log (and to which writers), evaluate and save, how
the same math is laid out (grad_checkpoint, cuda_graphs, fsdp), and where things are: the output folder, the data and model paths (their contents are checked by
hash instead: ``data_sha256``, ``base_model_sha256``), and the whole ``[eval]`` section.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from leantune.base import VERSION, file_sha256

RESUME_FREE = {"train.max_steps", "train.epochs", "train.save_every", "train.eval_every",
               "train.log_every", "train.keep_checkpoints", "train.max_nan_steps", "train.out",
               "train.grad_checkpoint", "train.cuda_graphs", "train.fsdp", "train.report_to", "data.train",
               "data.eval", "model.path"}


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and the weight files (what the adapter was trained on)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name == "config.json" or name.endswith(".safetensors"):
            h.update(name.encode())
            h.update(file_sha256(model_dir / name).encode())
    return h.hexdigest()


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    v = {"leantune": VERSION, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def data_hashes(cfg) -> dict:
    """{"train": sha256, "eval": sha256} of the configured data files (those given)."""
    return {k: file_sha256(p) for k, p in (("train", cfg.data.train), ("eval", cfg.data.eval)) if p}


def resume_config(cfg) -> dict:
    """The config keys that must match on resume, flattened as ``section.key``."""
    flat = {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() if sec != "eval" for k, v in d.items()}
    return {k: v for k, v in sorted(flat.items()) if k not in RESUME_FREE}


def run_identity(cfg, base_hash: str) -> dict:
    """What a checkpoint's state.json records to recognise its run (see ``check_same_run``)."""
    conf = resume_config(cfg)
    digest = hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()
    return {"resume_config": conf, "config_sha256": digest, "data_sha256": data_hashes(cfg),
            "base_model_sha256": base_hash}


def build_manifest(cfg, model_dir: Path, identity: dict, *, device, ranks, total: int, summary,
                   held=None) -> dict:
    """manifest.json: the config, seed, base and data hashes, versions, device and plan."""
    return {
        "config": cfg.to_dict(), "seed": cfg.train.seed, "base_model": str(model_dir),
        "base_model_sha256": identity["base_model_sha256"],
        "datasets": {k: {"path": getattr(cfg.data, k), "sha256": h} for k, h in identity["data_sha256"].items()},
        "versions": versions(), "git_commit": git_commit(), "device": str(device),
        "world_size": ranks.world,
        **({"fsdp": {"packed_4bit_bytes": held[0][1], "packed_4bit_bytes_per_rank": [h for h, _ in held]}}
           if held else {}),
        "total_steps": total, "data_summary": summary.__dict__ if hasattr(summary, "__dict__") else {},
    }


def finish_manifest(manifest: dict, step: int, skipped: int) -> dict:
    manifest.update(final_step=step, skipped_steps=skipped,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return manifest
