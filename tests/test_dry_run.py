"""``leantune train CONFIG --dry-run``: checks, a probe and the plan; nothing written (issue 21);
the probe of each objective: DPO's reference forward, GRPO's sampling (issue 16)."""
from __future__ import annotations

import json

import pytest

from leantune.cli import main
from tests.test_train_loop import write_config


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "24 examples" in out and "supervised" in out and "% of tokens have a loss" in out
    assert "6 steps of 2 micro-batch(es)" in out
    assert "s a step" in out and "estimated peak memory" in out
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) and not any("cache" in p.name for p in tmp_path.iterdir())


def test_dry_run_leaves_an_existing_folder_unchanged(tmp_path, capsys):
    cfg = write_config(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = _tree(tmp_path / "run")
    assert main(["--log-format", "json", "train", str(cfg), "--dry-run"]) == 0
    assert _tree(tmp_path / "run") == before
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    plan = objs[-1]["plan"]
    assert plan["examples"] == 24 and plan["steps"] == 6 and 0 < plan["supervised_share"] < 1
    assert plan["s_per_step"] > 0 and plan["est_peak_mem_mb"] > 0
    assert plan["objective"] == "sft" and plan["s_sampling_per_micro_batch"] == 0
    assert plan["s_update_per_micro_batch"] == plan["s_per_micro_batch"]


def test_dry_run_reports_bad_data(tmp_path, capsys):
    cfg = write_config(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": 1}\n')
    assert main(["train", str(cfg), "--dry-run"]) == 3
    assert not (tmp_path / "run").exists()


def dpo_config(tmp_path, **train):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"add {i} and 1: ", "chosen": f"{i + 1}",
                                         "rejected": f"{i + 2}"}) + "\n" for i in range(8)))
    return write_config(tmp_path, train={"objective": "dpo", "max_steps": 2, **train},
                        data={"train": str(pairs), "eval": ""}, adapter={"kind": "lora", "r": 4})


def json_plan(capsys) -> dict:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]["plan"]


def test_dry_run_of_a_dpo_config(tmp_path, capsys):
    assert main(["train", str(dpo_config(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 examples" in out and "2 steps" in out and "estimated peak memory" in out
    assert "reference forward, forward + backward" in out  # a step runs the reference too
    assert not (tmp_path / "run").exists()


def test_dry_run_of_dpo_with_a_precomputed_reference(tmp_path, capsys):
    cfg = dpo_config(tmp_path, precompute_ref=True)
    assert main(["--log-format", "json", "train", str(cfg), "--dry-run"]) == 0
    plan = json_plan(capsys)
    # the reference runs once before the first step (batches of 4: 2 of the 8 pairs), not in a step
    assert plan["s_setup"] > 0 and plan["s_sampling_per_micro_batch"] == 0
    assert plan["est_total_s"] == pytest.approx(plan["s_setup"] + plan["s_per_step"] * plan["steps"])
    assert not (tmp_path / "run").exists()


def test_dry_run_of_a_grpo_config_samples_and_times_both_parts(tmp_path, capsys, monkeypatch):
    from leantune.train.grpo import GRPOObjective
    from tests.test_grpo import write_config as grpo_config

    calls = []
    sample = GRPOObjective.sample

    def spy(self, model, prompts, seed, greedy=False):
        out = sample(self, model, prompts, seed, greedy)
        calls.append((len(prompts), self.t.max_new_tokens, greedy, [len(c) for c in out]))
        return out

    monkeypatch.setattr(GRPOObjective, "sample", spy)
    cfg = grpo_config(tmp_path, group_size=3, batch_size=2, grad_accum=2, max_new_tokens=8)
    assert main(["--log-format", "json", "train", str(cfg), "--dry-run"]) == 0
    plan = json_plan(capsys)
    # one micro-batch: 2 prompts x 3 completions, sampled (not greedy) with max_new_tokens
    assert [c[:3] for c in calls] == [(6, 8, False)]
    assert plan["objective"] == "grpo" and plan["completions_per_micro_batch"] == 6
    assert plan["probe_completion_tokens"] == pytest.approx(sum(calls[0][3]) / 6)
    assert 0 < plan["probe_completion_tokens"] <= plan["max_new_tokens"] == 8
    assert plan["examples"] == 6 and plan["steps"] == 4 and plan["micro_batches_per_step"] == 2
    assert plan["s_sampling_per_micro_batch"] > 0 and plan["s_update_per_micro_batch"] > 0
    micro = plan["s_sampling_per_micro_batch"] + plan["s_update_per_micro_batch"]
    assert plan["s_per_micro_batch"] == pytest.approx(micro)
    assert plan["s_per_step"] == pytest.approx(2 * micro)
    assert plan["est_total_s"] == pytest.approx(4 * 2 * micro)
    assert not (tmp_path / "run").exists()


def test_dry_run_grpo_log_line_names_sampling_and_update(tmp_path, capsys):
    from tests.test_grpo import write_config as grpo_config

    cfg = grpo_config(tmp_path, max_steps=1)
    assert main(["train", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 prompts" in out and "supervised" not in out
    probe = next(line for line in out.splitlines() if "probe:" in line)
    assert "sampling" in probe and "update" in probe and "s a step" in probe
