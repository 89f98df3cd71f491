"""The eval runner end to end: a short QLoRA run on a tiny JSON-extraction task puts the
tuned model above both baselines with a lower held-out loss than the base; the gate exits 5."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_model_dir
from leantune.train.config import load_config
from leantune.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime"]


def record(fruit):
    return {"messages": [{"role": "user", "content": f"item {fruit}"},
                         {"role": "assistant", "content": json.dumps({"fruit": fruit})}]}


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    tiny_model_dir(tmp / "model", "llama", seed=0, hidden_size=128, intermediate_size=256)
    (tmp / "train.jsonl").write_text("".join(json.dumps(record(f)) + "\n" for f in FRUITS * 8))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(record(f)) + "\n" for f in FRUITS))
    (tmp / "c.toml").write_text(f"""
[model]
path = "{tmp}/model"
quant = "nf4"
[adapter]
r = 16
alpha = 32
[data]
train = "{tmp}/train.jsonl"
eval = "{tmp}/eval.jsonl"
max_len = 64
[train]
out = "{tmp}/run"
lr = 1e-2
max_steps = 120
batch_size = 8
warmup_steps = 5
[eval]
metrics = ["loss", "json"]
shots = 2
max_new_tokens = 24
""")
    cfg = load_config(tmp / "c.toml")
    train(cfg, log=lambda m: None)
    return tmp, cfg


def test_tuned_beats_both_baselines(tuned_run):
    from leantune.eval.runner import run_eval

    tmp, cfg = tuned_run
    report = run_eval(cfg, log=lambda m: None)
    m = report["models"]
    assert report["primary_metric"] == "json_field_acc"
    assert set(m) == {"base", "prompted", "tuned"}
    best_baseline = max(m["base"]["json_field_acc"], m["prompted"]["json_field_acc"])
    assert m["tuned"]["json_field_acc"] > best_baseline
    assert m["tuned"]["json_exact"] >= 0.8
    assert m["tuned"]["eval_loss"] < m["base"]["eval_loss"]
    assert report["gate"]["ok"]
    saved = json.loads((tmp / "run" / "eval" / "report.json").read_text())
    assert saved["primary_metric"] == "json_field_acc" and "tuned" in saved["models"]
    assert (tmp / "run" / "eval" / "report.md").read_text().startswith("#")
    assert "kl_base_tuned" in saved["regression"]


def test_gate_exits_5(tuned_run):
    tmp, cfg = tuned_run
    res = subprocess.run([sys.executable, "-m", "leantune", "eval", str(tmp / "c.toml"), "--set",
                          "eval.require_lift=2.0", "--set", "eval.baselines=['base']"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 5, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("leantune: error: eval.require_lift:")


def test_prefix_loss_equals_the_full_forward_loss(tmp_path, monkeypatch):
    """Few-shot records share their examples: the held-out loss computed with the prefix run
    once equals the plain batched loss over full rows."""
    import torch

    from leantune.eval import runner
    from leantune.peft_core.checkpoint import load_model
    from leantune.peft_core.tokenizer import Tokenizer

    model_dir = tiny_model_dir(tmp_path / "m", seed=4)
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    shots = "Q: apple? A: red. Q: banana? A: yellow. Q: plum? A: purple. "
    records = [{"prompt": shots + f"Q: {q}? A:", "completion": f" {a}."}
               for q, a in [("kiwi", "green"), ("grape", "green or red"), ("fig", "brown"), ("lime", "green")]]
    seen = []
    real = runner.prefix_loss
    monkeypatch.setattr(runner, "prefix_loss", lambda *a: seen.append(a[2]) or real(*a))
    got = runner.heldout_loss(model, tok, records, "prompt_completion", 512, 3, torch.device("cpu"))
    assert seen and seen[0] >= len(shots)  # the shared prefix took the shared path
    monkeypatch.setattr(runner, "shared_prefix", lambda rows: 0)
    want = runner.heldout_loss(model, tok, records, "prompt_completion", 512, 3, torch.device("cpu"))
    assert abs(got - want) <= 1e-5 * abs(want)
