"""The training loop: one flat function you can read top to bottom.

    set up (output folder, manifest, model, adapter, data, optimizer, resume)
    for each optimizer step:
        for each micro-batch of the accumulation:
            loss_sum = chunked CE over supervised tokens          # (B, T) -> scalar
            (loss_sum / supervised tokens of the WHOLE accumulated batch).backward()
        clip, NaN guard, lr from the schedule, optimizer step, zero_grad(set_to_none=True)
        log (metrics.jsonl, progress line), eval loss, checkpoint

The data position is derived from the step: step s consumes micro-batches
[s * grad_accum, (s + 1) * grad_accum) of an endless sequence of epochs, each shuffled by
(seed, epoch). A checkpoint therefore needs only the step, the trainable tensors, the
optimizer state and the RNG state to resume bit-exactly.

Launched by torchrun, every process builds the same plan and runs its part of each step's
micro-batches; gradients and loss are summed over the processes once per optimizer step, so
the config describes the global batch and the result is that of one process (see
``Ranks``). Rank 0 alone writes files and prints. With ``[train] fsdp = true`` the base and the
adapters are sharded over the processes instead of replicated (module ``train.fsdp``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from leantune.peft_core.checkpoint import load_model, write_json
from leantune.base import VERSION, LeantuneError, ModelError, UsageError, file_sha256
from leantune.peft_core.model import make_attn_mask
from leantune.peft_core.safetensors_io import SafetensorsFile, read_safetensors, write_safetensors

from leantune.train import fsdp
from leantune.quant.chunked_ce import causal_lm_targets, chunked_cross_entropy
from leantune.train.config import Config
from leantune.train.schedule import lr_factor



class TrainingAborted(LeantuneError):
    exit_code = 1


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    skipped_steps: int
    interrupted: bool = False


# -- set-up helpers ------------------------------------------------------------------------
def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(cfg: Config, device) -> torch.dtype:
    name = cfg.model.compute_dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model_dir(cfg: Config) -> Path:
    if cfg.model.path:
        return Path(cfg.model.path)
    from leantune.peft_core.embedded import default_model_dir

    return default_model_dir()


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


# -- data parallel (torchrun) --------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch; rank 0 of 1 when not launched by one.

    Data parallelism is plain collectives rather than DistributedDataParallel: the gradients
    are summed once per optimizer step, after the accumulation, in a few flat buckets (DDP
    would need ``no_sync`` for that, a forward through the wrapped module, which the loop
    does not make, and a forward on every rank, which a short last batch of an epoch may not
    give). A summed buffer is bit-identical on every rank, so clipping, the NaN guard and the
    optimizer step agree everywhere and the replicas stay equal.

    ``fsdp``: the model is sharded (``[train] fsdp``, module ``train.fsdp``). Its forwards and
    backwards are collectives then, so ``part`` and ``eval_loss`` give every rank the same
    number of them."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, micro: list) -> list:
        """This rank's part of a step's micro-batches: whole micro-batches, a contiguous run
        of them, when their number splits evenly over the ranks (each is then computed
        exactly as one process computes it); otherwise its contiguous share of the rows of
        each (a short last batch of an epoch may leave it none; under FSDP it then gets the
        batch's first row with every label masked, which adds nothing but keeps it in step)."""
        if len(micro) % self.world == 0:
            k = len(micro) // self.world
            return micro[self.rank * k:(self.rank + 1) * k]
        out = []
        for b in micro:
            q, r = divmod(len(b["input_ids"]), self.world)
            lo = self.rank * q + min(self.rank, r)
            rows = slice(lo, lo + q + (self.rank < r))
            if rows.stop > rows.start:
                out.append({key: v[rows] for key, v in b.items()})
            elif self.fsdp:
                out.append({key: torch.full_like(v[:1], -100) if key == "labels" else v[:1]
                            for key, v in b.items()})
        return out

    def sum_(self, tensors: list, bucket: int = 1 << 25):
        """Sum ``tensors`` over the ranks, in place: one all_reduce per bucket of up to
        ``bucket`` elements of one dtype."""
        if self.world == 1:
            return
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            while group:
                n, size = 0, 0
                while n < len(group) and (n == 0 or size + group[n].numel() <= bucket):
                    size += group[n].numel()
                    n += 1
                chunk, group = group[:n], group[n:]
                flat = torch.cat([t.reshape(-1) for t in chunk])
                dist.all_reduce(flat)
                for t, v in zip(chunk, flat.split([t.numel() for t in chunk])):
                    t.copy_(v.view_as(t))

    def any(self, flag) -> bool:
        """Whether ``flag`` is set on any rank: the same answer on every rank."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([float(bool(flag))], device=self.device)
        self.sum_([t])
        return bool(t > 0)

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors: list):
        """Rank 0's values of ``tensors`` on every rank."""
        if self.world > 1:
            for t in tensors:
                dist.broadcast(t, 0)

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def launch_ranks(fsdp: bool = False) -> Ranks:
    """Rank, world size and device from torchrun's environment (cuda:LOCAL_RANK on a GPU);
    ``fsdp`` (``train.fsdp``) shards the model when there is more than one process."""
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    device = pick_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(env.get("LOCAL_RANK", 0)))
    return Ranks(rank, world, device, fsdp=fsdp and world > 1)


@contextmanager
def process_group(ranks: Ranks):
    """torch.distributed for a torchrun launch (gloo on the CPU, NCCL on CUDA), destroyed on
    the way out, also after an error. Nothing to do for one process, or when the caller has
    set a group up already."""
    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    if ranks.device.type == "cuda":
        torch.cuda.set_device(ranks.device)
        dist.init_process_group("nccl", device_id=ranks.device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
        # A gloo worker thread lets go of a collective's tensors just after the wait returns;
        # when that needs the GIL while the interpreter shuts down, the process aborts
        # ("terminate called without an active exception"; seen after FSDP's last gathers,
        # 2.5% of runs). Waiting in a last barrier, without the GIL, lets them finish first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rng_state() -> dict:
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    return rng


def checkpoint_rng(ranks: Ranks) -> dict:
    """The RNG states a checkpoint keeps: rank 0's as ``torch_cpu``/``torch_cuda``, rank N's
    (N > 0, under torchrun) as ``torch_cpu.rankN``/``torch_cuda.rankN``."""
    states = ranks.gather(rng_state())
    return {k + (f".rank{r}" if r else ""): v for r, st in enumerate(states) for k, v in st.items()}


# -- model + adapter -----------------------------------------------------------------------
def build_model(cfg: Config, model_dir: Path, device, dtype):
    """The base (4-bit when configured) with the adapter injected; the trainable params."""
    quant = None if cfg.model.quant == "none" else cfg.model.quant
    if cfg.adapter.kind == "none" and quant:
        raise UsageError("adapter.kind", "full fine-tuning (kind = \"none\") needs model.quant = \"none\"")
    model = load_model(model_dir, dtype=dtype, device=device, quant=quant,
                       quant_options={"blocksize": cfg.model.blocksize,
                                      "double_quant": cfg.model.double_quant})
    if cfg.adapter.kind == "none":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from leantune.peft_core.adapters import AdapterConfig, inject_adapter

        for p in model.parameters():
            p.requires_grad_(False)
        acfg = AdapterConfig(kind=cfg.adapter.kind, r=cfg.adapter.r, alpha=cfg.adapter.alpha,
                             dropout=cfg.adapter.dropout, targets=cfg.adapter.targets,
                             init=cfg.adapter.init, rslora=cfg.adapter.rslora,
                             rank_pattern=dict(cfg.adapter.rank_pattern),
                             alpha_pattern=dict(cfg.adapter.alpha_pattern))
        inject_adapter(model, acfg)
    model.model.grad_checkpoint = cfg.train.grad_checkpoint
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise UsageError("adapter.targets", "no module matched: nothing to train")
    return model, params


def batch_loss_sum(model, batch, chunk: int, trunk=None):
    """Summed next-token loss over supervised tokens of one micro-batch, and their count.

    ``trunk``: what runs ``model.model`` (a ``train.cuda_graphs.GraphedTrunk``); default eager."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    doc_ids, position_ids = batch["doc_ids"], batch["position_ids"]
    B, T = input_ids.shape
    multi_doc = bool((doc_ids[:, 1:] != doc_ids[:, :-1]).any())
    mask = make_attn_mask(T, doc_ids=doc_ids, device=input_ids.device) if multi_doc else None
    hidden = (trunk or model.model)(input_ids, position_ids, mask)  # (B, T, C)
    targets = causal_lm_targets(labels, doc_ids)  # (B, T-1)
    keep = targets != -100
    h = hidden[:, :-1][keep]  # (N, C) supervised positions only
    return chunked_cross_entropy(h, model.lm_head.weight, targets[keep], chunk), int(keep.sum())


@torch.no_grad()
def eval_loss(model, plan, chunk: int, device, ranks: Ranks = Ranks()) -> float:
    """Mean loss per supervised token over the plan's batches (shared out among ranks; under
    FSDP a rank short of a batch runs batch 0 again, uncounted, to stay in step)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    mine = range(ranks.rank, len(plan), ranks.world)
    rounds = -(-len(plan) // ranks.world) if ranks.fsdp else len(mine)
    for j in range(rounds):
        batch = {k: v.to(device) for k, v in plan.batch(0, mine[j] if j < len(mine) else 0).items()}
        loss, n = batch_loss_sum(model, batch, chunk)
        if j < len(mine):
            total += float(loss)
            count += n
    model.train(was)
    if ranks.world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=ranks.device)
        ranks.sum_([t])
        total, count = t.tolist()
    return total / max(count, 1)


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


def save_checkpoint(run_dir: Path, step: int, model, params: dict, opt, extra: dict, cfg: Config,
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


# -- the loop ------------------------------------------------------------------------------
class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and stops after the step."""

    def __init__(self):
        self.stop = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        self.stop = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _progress(step, total, loss, tps, t0, start_step):
    done = step - start_step
    eta = (time.time() - t0) / max(done, 1) * (total - step)
    sys.stderr.write(f"\rstep {step}/{total}  loss {loss:.4f}  {tps:,.0f} tok/s  "
                     f"ETA {int(eta // 60)}m{int(eta % 60):02d}s ")
    sys.stderr.flush()


def train(cfg: Config, resume: bool = False, log=print, tokenizer=None, on_step=None) -> TrainResult:
    """Run (or resume) a fine-tune; ``on_step(step)`` is called after each optimizer step.

    Under torchrun (WORLD_SIZE > 1) this runs data-parallel on every process: ``log`` is
    called on rank 0 only, ``on_step`` on every rank."""
    ranks = launch_ranks(fsdp=cfg.train.fsdp)
    if cfg.train.grad_accum % ranks.world and cfg.train.batch_size % ranks.world:
        raise UsageError("train.batch_size", f"the global batch does not split over {ranks.world} "
                                             f"processes (WORLD_SIZE): make batch_size "
                                             f"({cfg.train.batch_size}) or grad_accum "
                                             f"({cfg.train.grad_accum}) a multiple of {ranks.world}")
    with process_group(ranks):
        return _train(cfg, resume, log if ranks.main else (lambda msg: None), tokenizer, on_step, ranks)


def _train(cfg: Config, resume: bool, log, tokenizer, on_step, ranks: Ranks) -> TrainResult:
    from leantune.peft_core.tokenizer import Tokenizer
    from leantune.train.data import BatchPlan, build_examples, pack_examples

    device = ranks.device
    dtype = compute_dtype_for(cfg, device)
    run_dir = Path(cfg.train.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.data.train:
        raise UsageError("data.train", "no training file given")
    model_dir = resolve_model_dir(cfg)
    tok = tokenizer or Tokenizer.from_dir(model_dir)

    # data: examples -> rows (packed or not) -> a deterministic batch plan
    torch.manual_seed(cfg.train.seed)
    cache = run_dir / "cache"
    examples, summary = build_examples(cfg.data.train, tok, cfg.data.format, cfg.data.max_len,
                                       cfg.data.mask_prompt, cfg.data.mask_mode, cache_dir=cache)
    for line in summary.lines():
        log(f"data: {line}")
    rows = pack_examples(examples, cfg.data.max_len, cfg.train.seed) if cfg.data.pack else examples
    plan = BatchPlan(rows, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id,
                     group_by_length=not cfg.data.pack)
    eval_plan = None
    if cfg.data.eval:
        ev, _ = build_examples(cfg.data.eval, tok, cfg.data.format, cfg.data.max_len,
                               cfg.data.mask_prompt, cfg.data.mask_mode, cache_dir=cache)
        eval_plan = BatchPlan(ev, cfg.train.batch_size, cfg.train.seed, tok.pad_token_id, shuffle=False)

    ga = cfg.train.grad_accum
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(plan) / ga)

    # model, adapter, optimizer
    model, params = build_model(cfg, model_dir, device, dtype)
    model.train()
    if ranks.fsdp:  # equal replicas, then each rank keeps its shard of them
        ranks.broadcast_([p.data for p in params.values()])
        params = fsdp.shard_model(model, ranks)
        held = ranks.gather(fsdp.packed_bytes(model))  # (bytes held, whole bytes) of each rank
        log(f"fsdp: sharded over {ranks.world} processes" + (
            f"; of the {held[0][1] / 2**20:.2f} MiB of packed 4-bit weights they hold "
            f"{', '.join(f'{h / 2**20:.2f}' for h, _ in held)}" if held[0][1] else ""))
    if ranks.rank:
        torch.manual_seed(cfg.train.seed + ranks.rank)  # its own dropout masks
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "adamw8bit":
        from leantune.quant.adamw8bit import AdamW8bit

        opt = AdamW8bit(groups, lr=cfg.train.lr)
    else:
        # on a GPU the multi-tensor (foreach) update: a few launches for all the adapters
        # instead of about ten a tensor; on the CPU the per-tensor loop (what runs there today)
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    trunk = None
    if cfg.train.cuda_graphs:
        if device.type == "cuda":
            from leantune.train.cuda_graphs import GraphedTrunk

            trunk = GraphedTrunk(model.model, log)
        else:
            log(f"cuda graphs: train.cuda_graphs is set but the device is {device.type}; running eagerly")

    base_hash = model_fingerprint(model_dir)
    manifest = {
        "config": cfg.to_dict(), "seed": cfg.train.seed, "base_model": str(model_dir),
        "base_model_sha256": base_hash,
        "datasets": {k: {"path": p, "sha256": file_sha256(p)} for k, p in
                     (("train", cfg.data.train), ("eval", cfg.data.eval)) if p},
        "versions": versions(), "git_commit": git_commit(), "device": str(device),
        "world_size": ranks.world,
        **({"fsdp": {"packed_4bit_bytes": held[0][1], "packed_4bit_bytes_per_rank": [h for h, _ in held]}}
           if ranks.fsdp else {}),
        "total_steps": total, "data_summary": summary.__dict__ if hasattr(summary, "__dict__") else {},
    }

    start, skipped, nan_streak = 0, 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = resume_checkpoint(run_dir, log)
        if ckpt is None:
            log(f"resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting fresh")
            if ranks.main:
                metrics_path.unlink(missing_ok=True)  # rows of the lost steps would repeat
        else:
            state = json.loads((ckpt / "state.json").read_text())
            if state.get("base_model_sha256") not in (None, base_hash):
                raise UsageError(str(ckpt), "checkpoint was trained on a different base model")
            saved = read_safetensors(ckpt / "trainable.safetensors")
            missing = [n for n in params if n not in saved]
            if missing:
                raise UsageError(str(ckpt), f"checkpoint lacks trainable tensor {missing[0]!r} "
                                            "(was the adapter config changed?)")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(fsdp.local_like(p, saved[n]))
            load_optimizer_tensors(opt, params, read_safetensors(ckpt / "optimizer.safetensors"))
            rng = read_safetensors(ckpt / "rng.safetensors")
            mine = f".rank{ranks.rank}" if f"torch_cpu.rank{ranks.rank}" in rng else ""
            torch.set_rng_state(rng["torch_cpu" + mine])
            if "torch_cuda" + mine in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["torch_cuda" + mine])
            start, skipped = state["step"], state.get("skipped_steps", 0)
            log(f"resume: continuing from {ckpt.name}")
            # keep the metrics of the steps the checkpoint covers, drop the rest
            if ranks.main and metrics_path.exists():
                kept = [ln for ln in metrics_path.read_text(errors="replace").splitlines()
                        if (st := _metrics_step(ln)) is not None and st <= start]  # and half-written lines
                metrics_path.write_text("".join(ln + "\n" for ln in kept))
    elif ranks.main and metrics_path.exists():
        metrics_path.unlink()
    if not ranks.fsdp:
        ranks.broadcast_([p.data for p in params.values()])  # equal replicas, as DDP makes them
    if ranks.main:
        remove_stale_temps(run_dir)
        write_json(run_dir / "manifest.json", manifest)

    def full_state():
        """(params, opt) as checkpoints hold them: full tensors (under FSDP every rank gathers
        them, and the model's modules hold them while inside)."""
        return fsdp.full_state(model, params, opt) if ranks.fsdp else nullcontext((params, opt))

    def checkpoint(gathered=None):
        """checkpoints/step-N, written by rank 0 with every rank's RNG state; the others wait.
        ``gathered``: what ``full_state()`` yielded, when the caller holds it already."""
        rng = checkpoint_rng(ranks)
        extra = {"skipped_steps": skipped, "base_model_sha256": base_hash,
                 "base_model": str(model_dir), "micro_batches": step * ga}
        with nullcontext(gathered) if gathered else full_state() as (full, full_opt):
            path = save_checkpoint(run_dir, step, model, full, full_opt, extra, cfg, rng) if ranks.main else None
        ranks.barrier()
        return path

    tty = ranks.main and sys.stderr.isatty()
    t0 = time.time()
    last_loss = float("nan")
    interrupted = False
    step = start
    with _Signals() as sigs, open(metrics_path if ranks.main else os.devnull, "a", encoding="utf-8") as mlog:
        while step < total:
            t_step = time.time()
            lr = cfg.train.lr * lr_factor(step, total, cfg.train.warmup_steps, cfg.train.schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [plan.batch(*divmod(step * ga + j, len(plan))) for j in range(ga)]
            n_tok = sum(int((causal_lm_targets(b["labels"], b["doc_ids"]) != -100).sum()) for b in micro)
            loss_total = torch.zeros((), device=device)
            mine = ranks.part(micro)
            for j, b in enumerate(mine):
                if ranks.fsdp:  # reduce-scatter after the step's last backward only
                    fsdp.set_grad_sync(model, j == len(mine) - 1)
                b = {k: v.to(device) for k, v in b.items()}
                # (no autocast weight cache: the model is in the compute dtype already, and a
                # CUDA graph capture refuses the cache)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                                    cache_enabled=False):
                    loss_sum, _ = batch_loss_sum(model, b, cfg.train.loss_chunk, trunk)
                loss = loss_sum / max(n_tok, 1)  # normalised by the whole accumulated batch
                (scaler.scale(loss) if scaler else loss).backward()
                loss_total += loss.detach()
            if ranks.world > 1:  # the gradient and loss of the whole global batch, on every rank
                for p in params.values():
                    if p.grad is None:  # no rows here this step
                        p.grad = torch.zeros_like(p)
                # (FSDP has reduce-scattered the sharded ones)
                ranks.sum_([p.grad for p in params.values() if not fsdp.is_sharded(p)] + [loss_total])
            if scaler:
                scaler.unscale_(opt)
            clip = cfg.train.clip if cfg.train.clip > 0 else float("inf")
            clip_ = fsdp.clip_grad_norm_ if ranks.fsdp else torch.nn.utils.clip_grad_norm_
            grad_norm = clip_(list(params.values()), clip)
            finite = bool(torch.isfinite(loss_total)) and bool(torch.isfinite(grad_norm))
            if finite:
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                nan_streak = 0
            else:
                skipped += 1
                nan_streak += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            if nan_streak >= cfg.train.max_nan_steps:
                checkpoint()
                raise TrainingAborted("train", f"loss or gradients non-finite for {nan_streak} "
                                               f"steps in a row at step {step}; checkpoint saved")
            dt = time.time() - t_step
            if step % cfg.train.log_every == 0 or step == total:
                last_loss = float(loss_total)
                rec = {"step": step, "loss": _finite_or_none(last_loss), "lr": lr,
                       "grad_norm": _finite_or_none(float(grad_norm)),
                       "tokens_per_s": sum(int(b["attention_mask"].sum()) for b in micro) / dt,
                       "supervised_tokens": n_tok, "skipped_steps": skipped,
                       "epoch": step * ga / len(plan),
                       "peak_mem_mb": peak_memory_mb(device)}
                if cfg.train.eval_every and eval_plan is not None and step % cfg.train.eval_every == 0:
                    rec["eval_loss"] = eval_loss(model, eval_plan, cfg.train.loss_chunk, device, ranks)
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                if tty:
                    _progress(step, total, last_loss, rec["tokens_per_s"], t0, start)
            if on_step is not None:
                on_step(step)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total:
                checkpoint()
            if ranks.any(sigs.stop):  # every rank stops at the same step
                checkpoint()
                log(f"\n{sigs.stop or 'a signal to another rank'}: checkpoint saved at step {step}; "
                    "continue with --resume")
                interrupted = True
                break
    if tty:
        sys.stderr.write("\n")
    if not interrupted:
        export = run_dir / ("adapter" if cfg.adapter.kind != "none" else "model")
        with full_state() as gathered:  # under FSDP every rank gathers, once, what rank 0 writes
            # the checkpoint first: when the export below fails (a full disk), nothing trained is lost
            final = checkpoint(gathered)
            if not ranks.main:
                return TrainResult(run_dir, step, last_loss, skipped)
            try:
                if cfg.adapter.kind != "none":
                    from leantune.peft_core.adapters import save_adapter

                    save_adapter(model, export, base_model_name_or_path=str(model_dir))
                else:
                    from leantune.peft_core.checkpoint import save_model

                    save_model(model, export, copy_tokenizer_from=model_dir)
            except OSError as e:
                raise TrainingAborted(str(export), f"cannot write ({e.strerror or e}); the trained state is "
                                                   f"in {final}: free space and rerun with --resume") from e
        manifest.update(final_step=step, skipped_steps=skipped, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(run_dir / "manifest.json", manifest)
    return TrainResult(run_dir, step, last_loss, skipped, interrupted)


def _finite_or_none(x: float):
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


def _metrics_step(line: str):
    """The step of one metrics.jsonl line; None for a blank or half-written one."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if type(step) is int else None


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:
        return float("nan")
