"""Run safety (issue 22) and the command line's loose ends (issue 21): a fresh run never
silently replaces an earlier one's checkpoints, --resume refuses another run's checkpoint,
the output folder is locked, every config value is range-checked; and the model build
shared by train and eval (bf16 on CPUs with native bf16), the [adapter] section fed by
AdapterConfig, --version, --debug anywhere, help defaults, --resume PATH, keep_checkpoints,
plain progress lines, merge "" and export-gguf."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leantune.peft_core.build as build
from leantune.base import VERSION, UsageError
from leantune.cli import build_parser, main
from leantune.peft_core.safetensors_io import read_safetensors
from leantune.train.config import Config, adapter_config, apply_dict, load_config
from leantune.train.loop import LOCK_NAME, build_model, train
from tests.test_train_loop import assert_same, trainable, write_config

QUIET = dict(log=lambda m: None)
LORA = {"model": {"quant": "none"}, "adapter": {"kind": "lora", "r": 4, "alpha": 8}}


def cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantune: error: "), err
    assert "internal:" not in err and "Traceback" not in err, err
    return lines[0]


def losses(run_dir) -> list:
    return [json.loads(ln)["loss"] for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# -- the model build: compute dtype -------------------------------------------------------
@pytest.mark.parametrize("flags,env,want", [
    ({"avx512_bf16"}, None, torch.bfloat16), ({"amx_bf16"}, None, torch.bfloat16),
    (set(), None, torch.float32), ({"avx512_bf16"}, "0", torch.float32), ({"avx512_bf16"}, "1", torch.bfloat16)])
def test_auto_compute_dtype_follows_the_cpu_flags(monkeypatch, flags, env, want):
    monkeypatch.setattr(build, "_cpu_has", lambda *features: all(f in flags for f in features))
    if env is None:
        monkeypatch.delenv("LEANTUNE_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("LEANTUNE_CPU_BF16", env)
    assert build.compute_dtype_for("auto", torch.device("cpu")) == want
    assert build.compute_dtype_for("auto", torch.device("cuda")) == torch.bfloat16
    assert build.compute_dtype_for("float32", torch.device("cpu")) == torch.float32


def test_bf16_cpu_training_keeps_fp32_adapters_and_the_loss(tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(write_config(tmp_path, f"run-{dtype}", **LORA, train={"max_steps": 2, "save_every": 0}),
                          [f"model.compute_dtype={dtype}"])
        train(cfg, **QUIET)
        runs[dtype] = cfg.train.out
        model, params = build_model(cfg, Path(cfg.model.path), torch.device("cpu"), torch.bfloat16)
        assert params and all(p.dtype == torch.float32 for p in params.values())  # adapters fp32
    saved = trainable(runs["bfloat16"])
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    opt = read_safetensors(Path(runs["bfloat16"]) / "checkpoints" / "step-2" / "optimizer.safetensors")
    assert all(t.dtype == torch.float32 for k, t in opt.items() if not k.endswith(".step"))
    fp32, bf16 = losses(runs["float32"])[0], losses(runs["bfloat16"])[0]
    assert abs(bf16 - fp32) <= 0.01 * abs(fp32), (fp32, bf16)


# -- [adapter] from AdapterConfig ---------------------------------------------------------
def test_adapter_layers_and_exclude_reach_the_adapter_from_toml(tmp_path):
    path = write_config(tmp_path, "sel", **LORA)
    cfg = load_config(path, ['adapter.targets=["q_proj", "v_proj"]', "adapter.layers=[0]",
                             'adapter.exclude=["v_proj"]'])
    acfg = adapter_config(cfg.adapter)
    assert acfg.layers == [0] and acfg.exclude == ["v_proj"]
    _, params = build_model(cfg, Path(cfg.model.path), torch.device("cpu"), torch.float32)
    assert params and all(".layers.0." in n and "q_proj" in n for n in params), list(params)
    with pytest.raises(UsageError, match=r"adapter.layers: expected a list or an integer"):
        apply_dict(Config(), {"adapter": {"layers": "0"}}, "")
    with pytest.raises(UsageError, match=r"adapter.lyers: unknown key \(did you mean 'layers'\?\)"):
        apply_dict(Config(), {"adapter": {"lyers": [0]}}, "")
    assert Config().adapter.kind == "lora" and adapter_config(type(Config().adapter)(kind="none")) is None


# -- a fresh run into a folder with checkpoints; --resume checks the run ----------------------
def test_fresh_run_into_an_old_run_is_refused_and_resume_continues_the_new_one(tmp_path):
    path = write_config(tmp_path, "run", train={"save_every": 1})
    out = Path(load_config(path).train.out)
    code, _, err = cli(["train", path])
    assert code == 0, err
    code, _, err = cli(["train", path, "--set", "train.lr=0.005"])
    assert code == 2 and str(out) in one_error_line(err) and "--resume" in err and "--overwrite" in err

    class Killed(BaseException):
        pass

    def kill_after_2(step):
        if step == 3:  # (before step-3's checkpoint)
            raise Killed
    with pytest.raises(Killed):  # the new run (lr 0.005) dies after its step-2 checkpoint
        train(load_config(path, ["train.lr=0.005"]), overwrite=True, on_step=kill_after_2, **QUIET)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    code, _, err = cli(["train", path, "--resume"])  # lr 0.001 again: not the run of step-2
    assert code == 2 and "train.lr" in one_error_line(err)
    logs = []
    res = train(load_config(path, ["train.lr=0.005"]), resume=True, log=logs.append)
    assert "resume: continuing from step-2" in logs and res.steps == 6
    ref = load_config(write_config(tmp_path, "ref", train={"save_every": 1}), ["train.lr=0.005"])
    train(ref, **QUIET)
    assert_same(trainable(out), trainable(ref.train.out))
    data = (tmp_path / "train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text(data + data.splitlines()[0] + "\n")  # one more record
    code, _, err = cli(["train", path, "--resume", "--set", "train.lr=0.005"])
    assert code == 2 and "data.train" in one_error_line(err)


def test_resume_from_a_named_checkpoint_and_keep_checkpoints(tmp_path):
    path = write_config(tmp_path, "run", train={"save_every": 1})
    out = Path(load_config(path).train.out)
    assert cli(["train", path, "--set", "train.keep_checkpoints=3"])[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-5", "step-6"]
    ref = trainable(out)
    code, _, err = cli(["train", path, "--resume", out / "checkpoints" / "step-4"])
    assert code == 0, err
    assert_same(trainable(out), ref)  # the same 6 steps, from step-4
    code, _, err = cli(["train", path, "--resume", tmp_path / "nowhere"])
    assert code == 4 and "nowhere" in one_error_line(err)


# -- the lock -------------------------------------------------------------------------------
def test_a_locked_output_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    path = write_config(tmp_path, "run", train={"max_steps": 1})
    out = Path(load_config(path).train.out)
    out.mkdir()
    holder = f"{os.getppid()}@{socket.gethostname()}"  # alive: pytest's parent
    (out / LOCK_NAME).write_text(holder + "\n")
    code, _, err = cli(["train", path])
    assert code == 2 and holder in one_error_line(err)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid}@{socket.gethostname()}\n")
    logs = []
    train(load_config(path), log=logs.append)
    assert [ln for ln in logs if ln.startswith("lock: taking over")] and str(dead.pid) in " ".join(logs)
    assert not (out / LOCK_NAME).exists()  # released at the end


# -- config values -------------------------------------------------------------------------
@pytest.mark.parametrize("section,key,value", [
    ("train", "lr", float("inf")), ("train", "lr", float("nan")), ("train", "lr", 0.0),
    ("train", "weight_decay", float("nan")), ("train", "weight_decay", -1.0), ("train", "clip", float("inf")),
    ("train", "clip", -0.5), ("adapter", "dropout", 1.0), ("adapter", "alpha", float("inf")),
    ("data", "max_len", 1), ("data", "max_len", 10**9), ("data", "max_len", 2**62),
    ("train", "batch_size", 0), ("train", "max_steps", 2**62), ("eval", "require_lift", float("nan"))])
def test_config_numbers_are_finite_and_in_range(section, key, value):
    with pytest.raises(UsageError) as e:
        apply_dict(Config(), {section: {key: value}}, "")
    assert e.value.where == f"{section}.{key}"


@pytest.mark.parametrize("override", ["train.lr=inf", "train.weight_decay=nan", "train.lr=nan",
                                      "data.max_len=1", "data.max_len=1000000000", 'train.out=""'])
def test_bad_values_exit_2_naming_the_key(tmp_path, override):
    path = write_config(tmp_path, "run")
    code, _, err = cli(["train", path, "--set", override])
    assert code == 2 and override.split("=")[0] in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_new_folder(tmp_path):
    path = write_config(tmp_path, "run")
    code, _, err = cli(["train", path, "--set", f"data.train='{tmp_path / 'missing.jsonl'}'"])
    assert code in (2, 3) and "missing.jsonl" in one_error_line(err)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="train.out"):
        cfg = load_config(path)
        cfg.train.out = ""
        train(cfg, **QUIET)


# -- the command line ----------------------------------------------------------------------
def test_version_and_debug_anywhere(tmp_path):
    code, out, err = cli(["--version"])
    assert code == 0 and out.strip() == f"leantune {VERSION}" and not err
    path = write_config(tmp_path, "run")
    with pytest.raises(UsageError, match="unknown key"):  # --debug after the sub-command: the traceback
        main(["train", str(path), "--set", "train.lrr=1", "--debug"])


def test_every_option_shows_its_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    seen = 0
    for name, sub in subs.items():
        nested = [a for a in sub._actions if isinstance(a.choices, dict)]
        parsers = [sub] + [p for a in nested for p in a.choices.values()]
        for p in parsers:
            text = p.format_help()
            for a in p._actions:
                if a.option_strings and a.dest != "help":
                    assert a.help, (name, a.option_strings)
                    seen += 1
            assert "(default:" in text or not any(a.option_strings and a.dest != "help" for a in p._actions), name
    assert seen > 20


def test_plain_progress_lines_when_stdout_is_not_a_terminal(tmp_path):
    path = write_config(tmp_path, "run")
    code, out, err = cli(["train", path])
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert lines and lines[-1].startswith("step 6/6") and "loss" in lines[-1] and "lr" in lines[-1]
    assert "tok/s" in lines[-1] and "ETA" in lines[-1]


def test_merge_takes_the_adapter_base_and_export_gguf(tmp_path):
    path = write_config(tmp_path, "run", **LORA, train={"max_steps": 2})
    assert cli(["train", path])[0] == 0
    code, _, err = cli(["merge", "", tmp_path / "run" / "adapter", tmp_path / "merged", "--dtype", "float32"])
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    code, out, err = cli(["export-gguf", tmp_path / "merged", tmp_path / "m.gguf", "--type", "q8_0"])
    assert code == 0, err
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    code, _, err = cli(["export-gguf", tmp_path / "merged", tmp_path / "m.gguf", "--type", "q5_k"])
    assert code == 2 and "--type" in one_error_line(err)
