"""``leantune train CONFIG --dry-run``: checks, a probe and the plan; nothing written (issue 21)."""
from __future__ import annotations

import json

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


def test_dry_run_reports_bad_data(tmp_path, capsys):
    cfg = write_config(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"text": 1}\n')
    assert main(["train", str(cfg), "--dry-run"]) == 3
    assert not (tmp_path / "run").exists()


def test_dry_run_of_a_dpo_config(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"add {i} and 1: ", "chosen": f"{i + 1}",
                                         "rejected": f"{i + 2}"}) + "\n" for i in range(8)))
    cfg = write_config(tmp_path, train={"objective": "dpo", "max_steps": 2},
                       data={"train": str(pairs), "eval": ""}, adapter={"kind": "lora", "r": 4})
    assert main(["train", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 examples" in out and "2 steps" in out and "estimated peak memory" in out
    assert not (tmp_path / "run").exists()
