"""``leantune demo --rl`` (issue 16): the GRPO stage's config, its run on a tiny model (GRPO from
the SFT adapter, then sft against sft+rl with paired differences), the summary, and the report's
difference between two adapters. The real-model acceptance run is marked slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.cli import build_parser
from leantune.demo import rl_lines, rl_summary, run_rl
from leantune.eval.report import build_report, gate
from leantune.train.config import load_config
from leantune.train.demo_task import (DEMO_CONFIG, DEMO_RL_CONFIG, QUICK_RL, RL_TARGET, demo_toml, rl_config,
                                      rl_target_met)
from tests.helpers import tiny_model_dir


def demo_conf(tmp_path) -> dict:
    conf = {k: dict(v) for k, v in DEMO_CONFIG.items()}
    conf["model"]["path"] = str(tmp_path / "model-nf4")
    conf["data"].update(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "heldout.jsonl"))
    conf["eval"]["data"] = str(tmp_path / "heldout.jsonl")
    conf["train"]["out"] = str(tmp_path / "run")
    return conf


# -- the config ----------------------------------------------------------------------------
def test_rl_config_starts_from_the_sft_adapter_and_keeps_the_demo_paths(tmp_path):
    before = json.dumps(DEMO_CONFIG, sort_keys=True)
    conf = demo_conf(tmp_path)
    rl = rl_config(conf, tmp_path / "run" / "adapter", tmp_path / "rl")
    assert json.dumps(DEMO_CONFIG, sort_keys=True) == before and conf["train"]["out"] == str(tmp_path / "run")
    t = rl["train"]
    assert t["objective"] == "grpo" and t["reference_adapter"] == str(tmp_path / "run" / "adapter")
    assert t["out"] == str(tmp_path / "rl")
    assert rl["model"] == conf["model"] and rl["data"] == conf["data"] and rl["adapter"] == conf["adapter"]
    assert t["reward"] == ["json_exact", "json_field_acc"] and len(t["reward_weights"]) == 2
    # the ranges the issue's budget was sized in (see the comment above DEMO_RL_CONFIG)
    assert 4 <= t["group_size"] <= 8 and 0.7 <= t["temperature"] <= 1.0 and 1e-5 <= t["lr"] <= 1e-4
    assert t["kl_beta"] <= 0.04 and t["max_new_tokens"] >= 61  # the longest answer + its EOS
    assert rl["eval"]["baselines"] == [] and rl["eval"]["data"] == conf["eval"]["data"]
    # the SFT stage's keys do not leak into the RL stage
    assert (t["max_steps"], t["batch_size"], t["lr"]) == tuple(DEMO_RL_CONFIG["train"][k]
                                                               for k in ("max_steps", "batch_size", "lr"))

    path = tmp_path / "demo-rl.toml"
    path.write_text(demo_toml(rl))
    cfg = load_config(path)
    assert cfg.train.objective == "grpo" and cfg.train.group_size == t["group_size"]
    assert cfg.train.reference_adapter == str(tmp_path / "run" / "adapter")

    quick = rl_config(conf, "sft", tmp_path / "rl", quick=True)
    for section, values in QUICK_RL.items():
        assert {k: quick[section][k] for k in values} == values


def test_the_demo_parser_takes_rl():
    parser = build_parser()
    assert parser.parse_args(["demo", "--rl"]).rl is True
    assert parser.parse_args(["demo"]).rl is False


# -- the report: two adapters compared ------------------------------------------------------
def test_report_compares_later_adapters_with_the_first_and_gates_none():
    items = [{"reference": "x"}] * 4
    results = {"sft": {"json_exact": [0.0, 1.0, 0.0, 0.0]}, "sft+rl": {"json_exact": [1.0, 1.0, 0.0, 1.0]}}
    r = build_report(results, {"sft": 0.5, "sft+rl": 0.4}, "json_exact", items, {})
    assert set(r["diffs"]) == {"sft+rl-vs-sft"}
    d = r["diffs"]["sft+rl-vs-sft"]
    assert d["json_exact"]["diff"] == pytest.approx(0.5) and d["json_exact"]["lo"] is not None
    assert d["eval_loss"]["diff"] == pytest.approx(-0.1)
    ok, msg = gate(r, 0.2)
    assert ok and "not applied" in msg
    # with baselines, every candidate is also compared with them, and the gate looks at tuned
    three = {"base": results["sft"], "tuned": results["sft"], "dora": results["sft+rl"]}
    r = build_report(three, {}, "json_exact", items, {})
    assert set(r["diffs"]) == {"tuned-vs-base", "dora-vs-base", "dora-vs-tuned"}
    with pytest.raises(ValueError):
        gate(build_report({"base": results["sft"], "sft": results["sft"]}, {}, "json_exact", items, {}), 0.0)


def test_rl_target():
    def rl(exact, field):
        return {"diff": {"json_exact": dict(zip(("diff", "lo", "hi"), exact)),
                         "json_field_acc": dict(zip(("diff", "lo", "hi"), field))}}

    assert rl_target_met(rl((0.1, 0.02, 0.18), (-0.01, -0.04, 0.02)))
    assert rl_target_met(rl((RL_TARGET, 0.01, 0.1), (0.0, -0.01, 0.0)))
    assert not rl_target_met(rl((0.04, 0.01, 0.1), (0.0, -0.01, 0.01)))   # lift too small
    assert not rl_target_met(rl((0.1, 0.0, 0.2), (0.0, -0.01, 0.01)))     # interval touches 0
    assert not rl_target_met(rl((0.1, 0.02, 0.2), (-0.05, -0.08, -0.01)))  # fields lowered
    assert not rl_target_met(rl((None, None, None), (0.0, 0.0, 0.0)))


# -- the stage on a tiny model --------------------------------------------------------------
def write_tickets(path, n, offset=0):
    recs = [{"messages": [{"role": "user", "content": f"ticket {i}"},
                          {"role": "assistant", "content": json.dumps({"id": i, "ok": i % 2 == 0})}]}
            for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_rl_stage_on_a_tiny_model(tmp_path):
    from leantune.train.loop import train

    tiny_model_dir(tmp_path / "model", "llama", seed=0)
    conf = demo_conf(tmp_path)
    conf["model"] = {"path": str(tmp_path / "model"), "quant": "none", "compute_dtype": "float32"}
    conf["adapter"].update(r=4, alpha=8)
    conf["data"]["max_len"] = 96
    conf["train"].update(max_steps=2, batch_size=2, save_every=0)
    write_tickets(tmp_path / "train.jsonl", 8)
    write_tickets(tmp_path / "heldout.jsonl", 4, offset=100)
    sft_path = tmp_path / "demo.toml"
    sft_path.write_text(demo_toml(conf))
    train(load_config(sft_path), log=lambda m: None)
    sft = tmp_path / "run" / "adapter"

    logged = []
    rl = run_rl(conf, sft, tmp_path, quick=True, log=logged.append)
    assert rl["steps"] == QUICK_RL["train"]["max_steps"] and (tmp_path / "rl" / "adapter").is_dir()
    cfg = load_config(rl["config"])
    assert cfg.train.objective == "grpo" and cfg.train.reference_adapter == str(sft)
    assert set(rl["scores"]) == {"sft", "sft+rl"} and rl["n_items"] == 4
    for m in ("json_exact", "json_field_acc"):
        assert set(rl["diff"][m]) == {"diff", "lo", "hi"}
        assert rl["diff"][m]["diff"] == pytest.approx(rl["scores"]["sft+rl"][m] - rl["scores"]["sft"][m])
    assert rl["reward"] is not None and rl["timings"]["train_s"] > 0 and rl["timings"]["eval_s"] > 0
    assert isinstance(rl["target_met"], bool)
    report = json.loads((tmp_path / "rl" / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["sft", "sft+rl"] and "sft+rl-vs-sft" in report["diffs"]
    assert "sft+rl-vs-sft" in Path(rl["report"]).read_text()
    assert any("RL (GRPO) from the SFT adapter" in m for m in logged)
    lines = rl_lines(rl)
    assert "json_exact" in lines[1] and "points" in lines[1] and "target" in lines[-2]


def test_rl_summary_from_a_report(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": r}) + "\n"
                                                    for s, r in enumerate([0.5, 0.7, 1.1, 1.3], 1)))
    report = {"n_items": 60, "models": {"sft": {"json_exact": 0.3, "json_field_acc": 0.8},
                                        "sft+rl": {"json_exact": 0.4, "json_field_acc": 0.82}},
              "diffs": {"sft+rl-vs-sft": {"json_exact": {"diff": 0.1, "lo": 0.03, "hi": 0.17},
                                          "json_field_acc": {"diff": 0.02, "lo": -0.01, "hi": 0.05}}}}
    rl = rl_summary(report, 32, {"train_s": 480.0, "eval_s": 200.0}, tmp_path, tmp_path / "demo-rl.toml")
    assert rl["reward"] == {"first_steps": pytest.approx(0.6), "last_steps": pytest.approx(1.2)}
    assert rl["target_met"] and rl["scores"]["sft+rl"]["json_exact"] == 0.4
    json.dumps(rl)  # summary.json holds it
    text = "\n".join(rl_lines(rl))
    assert "30.0% ->  40.0%  (+10.0 points, 95% CI [+3.0, +17.0])" in text and ": met" in text


# -- the acceptance: the real model ---------------------------------------------------------
@pytest.mark.slow
def test_demo_rl_on_the_real_model_reports_and_does_no_harm(tmp_path):
    """The issue's acceptance run on the embedded SmolLM2: the full demo (SFT stage), then --rl.
    The issue's goal (json_exact +5 points, interval above 0) is not reached on 2 cores (the
    README's "leantune demo --rl" says what was measured and why), so this checks what the
    stage must hold: it reports both models and the paired differences, its ``target_met`` is
    the issue's rule, and GRPO lowers neither json_exact nor json_field_acc beyond its interval.
    The RL stage's time is recorded in summary.json, not asserted."""
    from leantune.demo import run_demo

    summary = run_demo(out=tmp_path / "demo", rl=True, log=print)
    rl = summary["rl"]
    print(json.dumps(rl, indent=2))
    exact, field = rl["diff"]["json_exact"], rl["diff"]["json_field_acc"]
    assert rl["n_items"] == 60 and rl["steps"] == DEMO_RL_CONFIG["train"]["max_steps"]
    assert exact["hi"] >= 0, exact
    assert field["hi"] >= 0, field
    assert rl["target_met"] == rl_target_met(rl)
