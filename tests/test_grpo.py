"""GRPO: advantages, the chunked per-token log-probs, the loss against a float64 reference from
separate forwards, KL at a zero-init adapter, rewards and their errors, config validation, and
the objective in the training loop (metrics, resume bit-exact, a failing reward function)."""
from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leantune.base import DataError, UsageError
from leantune.peft_core.adapters import AdapterConfig, disable_adapters, inject_adapter, lora_layers
from leantune.peft_core.generate import generate
from leantune.train.grpo import (METRICS, PromptItem, completion_logps, completion_rows, group_advantages,
                                 grpo_loss, token_logps)
from leantune.train.rewards import Reward
from tests.helpers import tiny_model, tiny_model_dir


def lora_model(seed=0, zero_b=False):
    model = tiny_model(seed=seed)
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(seed + 1)
    if not zero_b:
        with torch.no_grad():
            for _, layer in lora_layers(model):  # policy != reference
                layer.lora_B["default"].weight.normal_(0.0, 0.05)
    return model.eval()


# -- the math ------------------------------------------------------------------------------
def test_group_advantages_normalise_each_group():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2, 3.0, 1.0, 2.0, 0.0])
    got = group_advantages(r, 4).double()
    for g in range(3):
        x = r[4 * g:4 * g + 4].double()
        mean = x.mean()
        std = ((x - mean) ** 2).sum().div(3).sqrt()  # unbiased, as torch.std and TRL
        torch.testing.assert_close(got[4 * g:4 * g + 4], (x - mean) / (std + 1e-4), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[4:8], torch.zeros(4, dtype=torch.float64))  # equal rewards: no signal


@pytest.mark.parametrize("n, chunk", [(13, 4), (5, 256), (1, 1)])
def test_token_logps_equal_full_log_softmax_with_gradients(n, chunk):
    torch.manual_seed(0)
    h = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (n,))
    g = torch.randn(n, dtype=torch.float64)
    got = token_logps(h, w, t, chunk, temperature=0.7)
    (got * g).sum().backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.log_softmax(h @ w.T / 0.7, -1).gather(1, t[:, None]).squeeze(1)
    (want * g).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dh, h.grad)
    torch.testing.assert_close(dw, w.grad)


def sampled_batch(model, G=3, seed=5):
    """Prompts (each G times) and completions sampled from the model, with fake rewards."""
    prompts = [[5, 9, 13, 2], [7, 1], [40, 41, 42, 43, 44, 45]]
    prompts = [p for p in prompts for _ in range(G)]
    comps = generate(model, prompts, 6, temperature=1.0, seed=seed, eos_token_ids=[3])
    rewards = torch.tensor([float(len(c) % 3) for c in comps]) + torch.arange(len(comps)) * 0.01
    return prompts, comps, rewards


def reference_loss(model64, prompts, comps, adv, old_shift, eps, beta, temperature):
    """The spec in float64: each sequence its own forward with full logits; TRL's formulas."""
    losses, kls, clipped, tokens = [], [], 0, 0
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([list(p) + list(c)])

        def logps():
            logits = model64(ids)[0, len(p) - 1:-1] / temperature  # (C, V): predicts c
            return F.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)

        lp = logps()
        with torch.no_grad(), disable_adapters(model64):
            ref = logps()
        old = lp.detach() + old_shift[i, :len(c)]
        ratio = torch.exp(lp - old)
        a = adv[i]
        per = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        losses.append((per + beta * kl).mean())
        kls.append(kl.detach().sum())
        clipped += int((((ratio < 1 - eps) & (a < 0)) | ((ratio > 1 + eps) & (a > 0))).sum())
        tokens += len(c)
    return torch.stack(losses).mean(), float(torch.stack(kls).sum()) / tokens, clipped / tokens


def test_loss_and_gradient_match_float64_separate_forwards():
    model = lora_model()
    prompts, comps, rewards = sampled_batch(model)
    adv = group_advantages(rewards, 3)
    L = max(len(c) for c in comps)
    shift = torch.randn(len(comps), L, generator=torch.Generator().manual_seed(3)) * 0.3  # clipping happens
    eps, beta, temp = 0.2, 0.1, 0.9

    rows = completion_rows(prompts, comps, 3, 0, "cpu")
    with torch.no_grad(), disable_adapters(model):
        ref = completion_logps(model, rows, chunk=5, temperature=temp)
    logp = completion_logps(model, rows, chunk=5, temperature=temp)
    losses, kl, clipped = grpo_loss(logp, logp.detach() + shift * rows["mask"], ref, adv, rows["mask"], eps, beta)
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model64 = copy.deepcopy(model)
    for p in model64.parameters():
        p.data, p.grad = p.data.double(), None
    want, want_kl, want_clip = reference_loss(model64, prompts, comps, adv.double(), shift.double(), eps, beta, temp)
    want.backward()
    n_tok = int(rows["mask"].sum())
    torch.testing.assert_close(losses.mean().double(), want, rtol=1e-5, atol=1e-6)
    assert float(kl.sum()) / n_tok == pytest.approx(want_kl, rel=1e-4, abs=1e-7)
    assert int(clipped.sum()) / n_tok == pytest.approx(want_clip) and want_clip > 0
    for n, p in model64.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n].double(), p.grad, rtol=1e-4, atol=1e-6)


def test_group_row_holds_the_prompt_once():
    rows = completion_rows([[1, 2, 3]] * 2 + [[4]] * 2, [[5, 6], [7], [8], [9, 10, 11]], 2, 0, "cpu")
    assert rows["ids"].tolist() == [[1, 2, 3, 5, 6, 7], [4, 8, 9, 10, 11, 0]]
    assert rows["pos"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]
    assert rows["seg"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 2, 2, 2, -1]]
    assert rows["src"].tolist() == [2, 3, 2, 0, 0, 2, 3]  # a completion's first token: the prompt's last
    assert rows["mask"].sum(1).tolist() == [2, 1, 1, 3]
    with pytest.raises(ValueError, match="share their prompt"):
        completion_rows([[1], [2]], [[3], [4]], 2, 0, "cpu")


def test_ratio_one_has_the_policy_gradient_and_no_clipping():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])
    losses, kl, clipped = grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0)
    losses.sum().backward()
    # d/dlogp of -A * exp(logp - old) at logp = old: -A, over the completion's length
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert not clipped.any() and float(kl.sum()) == 0.0


class ToyTok:
    """Bytes as tokens (the tiny model's vocabulary: 0..96), 0 = pad, 96 = eos."""

    eos_token_ids = [96]
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 96).decode("utf-8", "replace")


def test_kl_is_zero_at_a_zero_init_adapter():
    from leantune.train.config import Config
    from leantune.train.grpo import GRPOObjective, PromptPlan

    model = lora_model(zero_b=True)
    t = Config().train
    t.objective, t.max_new_tokens, t.group_size = "grpo", 5, 2
    items = [PromptItem([5, 9, 13, 2], '{"a": 1}', "x:1"), PromptItem([7, 1], '{"a": 2}', "x:2")]
    obj = GRPOObjective(t, ToyTok(), items, Reward(["json_field_acc"]))
    plan = PromptPlan(items, 2, pad_token_id=0)
    batch = plan.batch(0, 0)
    assert obj.count([batch]) == 4
    model.train()
    loss = obj.loss_sum(model, batch, chunk=3)
    loss.backward()
    m = obj.metrics()
    assert m["kl"] == 0.0 and m["clip_ratio"] == 0.0 and m["completions"] == 4
    assert 1 <= m["completion_length"] <= 5 and m["reward"] == 0.0  # random tokens: no JSON
    assert set(METRICS) <= set(m)


# -- rewards -------------------------------------------------------------------------------
def item(ref='{"name": "Ann", "urgent": true}', regex=None):
    return PromptItem([1], ref, "data.jsonl:7", "the prompt", regex)


def test_metric_rewards_and_weights():
    good, half = '{"name": "Ann", "urgent": true}', 'x {"name": "ann", "urgent": false}'
    assert Reward(["json_field_acc"])("p", half, item()) == 0.5
    assert Reward(["json_exact"])("p", good, item()) == 1.0
    assert Reward(["json_field_acc", "json_exact"], [0.5, 2.0])("p", half, item()) == 0.25
    assert Reward(["contains"])("p", "yes: Paris.", item("paris")) == 1.0
    assert Reward(["regex"])("p", "id 42", item("", r"\d+$")) == 1.0
    with pytest.raises(DataError, match="not a JSON"):
        Reward(["json_exact"]).check(item("plain text"))
    with pytest.raises(DataError, match="needs a \"regex\" field"):
        Reward(["regex"]).check(item())


def write_module(tmp_path, body, name="user_rewards"):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, what", [
    ("def f(p, c, r):\n    raise ValueError('boom')\n", "raised ValueError: boom"),
    ("def f(p, c, r):\n    return 'high'\n", "returned 'high', not a finite number"),
    ("def f(p, c, r):\n    return float('nan')\n", "returned nan"),
    ("def f(p, c, r):\n    return True\n", "returned True"),
])
def test_user_reward_errors_name_function_and_record(tmp_path, body, what):
    path = write_module(tmp_path, body)
    reward = Reward([], [], f"{path}:f")
    with pytest.raises(DataError) as e:
        reward("p", "c", item())
    assert e.value.where == "data.jsonl:7" and f"{path}:f" in e.value.what and what in e.value.what
    assert e.value.exit_code == 3


def test_user_reward_gets_prompt_completion_reference(tmp_path):
    path = write_module(tmp_path, "def f(p, c, r):\n    return len(p) + 10 * len(c) + 100 * len(r)\n")
    assert Reward([], [], f"{path}:f")("ab", "c", item("xyz")) == 2 + 10 + 300


# -- config --------------------------------------------------------------------------------
def write_config(tmp_path, name="run", data=None, **train_over):
    model = tmp_path / "model"
    if not model.exists():
        tiny_model_dir(model, "llama", seed=0)
    data = data or write_tickets(tmp_path / "prompts.jsonl")
    train_keys = {"out": str(tmp_path / name), "objective": "grpo", "max_steps": 4, "batch_size": 2,
                  "grad_accum": 2, "lr": 1e-2, "log_every": 1, "save_every": 2, "group_size": 3,
                  "max_new_tokens": 8, "reward": ["json_field_acc", "contains"]}
    train_keys.update(train_over)
    conf = {"model": {"path": str(model), "quant": "none", "compute_dtype": "float32"},
            "adapter": {"kind": "lora", "r": 4, "alpha": 8},
            "data": {"train": str(data), "eval": str(data), "max_len": 64},
            "train": train_keys}
    text = "".join(f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                   for sec, vals in conf.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def write_tickets(path, n=6):
    recs = [{"messages": [{"role": "user", "content": f"ticket {i}"},
                          {"role": "assistant", "content": json.dumps({"id": i})}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("key, value, what", [
    ("group_size", 1, "at least 2"),
    ("max_new_tokens", 0, "must be positive"),
    ("temperature", 0.0, "must be positive"),
    ("top_p", 1.5, "must be in (0, 1]"),
    ("kl_beta", -0.1, "must be >= 0"),
    ("clip_eps", 1.0, "must be in (0, 1)"),
    ("reward", ["json_exactt"], "did you mean 'json_exact'"),
    ("reward", [], "is empty"),
    ("reward_weights", [1.0], "has 1 weights for 2 metrics"),
    ("reward_fn", "no_colon", "expected \"module:function\""),
    ("reward_fn", "leantune_no_such_module:f", "cannot import"),
    ("reward_fn", "json:no_such_function", "has no function"),
    ("kl_beta", 0.04, "no adapter to switch off"),  # with adapter.kind = "none" below
])
def test_grpo_config_errors_name_the_key(tmp_path, key, value, what):
    from leantune.train.config import load_config

    tmp_path.joinpath("prompts.jsonl").write_text("")
    over = ["adapter.kind=none"] if what == "no adapter to switch off" else []
    with pytest.raises(UsageError) as e:
        load_config(write_config(tmp_path, data=tmp_path / "prompts.jsonl", **{key: value}), over)
    assert f"train.{key}" in e.value.where and what in e.value.what and e.value.exit_code == 2


def test_grpo_default_config_loads(tmp_path):
    from leantune.train.config import config_toml, load_config

    path = tmp_path / "c.toml"
    path.write_text(config_toml("grpo"))
    cfg = load_config(path)
    t = cfg.train
    assert (t.objective, t.group_size, t.max_new_tokens, t.kl_beta, t.clip_eps, t.reward) == \
        ("grpo", 4, 64, 0.04, 0.2, ["json_field_acc"])


# -- the training loop ---------------------------------------------------------------------
def read_rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_run_logs_trl_metrics_and_resumes_bit_exact(tmp_path):
    from leantune.peft_core.safetensors_io import read_safetensors
    from leantune.train.config import load_config
    from leantune.train.loop import newest_checkpoint, train

    # a random model writes no JSON: a reward that varies with what it does write
    fn = write_module(tmp_path, "def score(p, c, r):\n    return sum(ord(x) % 7 for x in c) / (1 + len(c))\n")
    full = load_config(write_config(tmp_path, "full", reward_fn=f"{fn}:score", eval_every=2))
    train(full, log=lambda m: None)
    rows = read_rows(full.train.out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in METRICS:
        assert name in rows[0] and rows[0][name] is not None, name
    assert rows[0]["completions"] == 12 and rows[0]["kl"] == 0.0  # fresh adapter: policy == reference
    assert "eval_reward" in rows[1] and "eval_reward" not in rows[0]
    assert rows[0]["reward_std"] > 0 and rows[0]["grad_norm"] > 0 and rows[-1]["kl"] > 0

    part = load_config(write_config(tmp_path, "part", reward_fn=f"{fn}:score", eval_every=2))

    def stop_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(part, log=lambda m: None, on_step=stop_at_2).steps == 2
    train(part, resume=True, log=lambda m: None)
    timing = {"tokens_per_s", "peak_mem_mb", "hostpool_peak_mb", "rss_mb"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_rows(part.train.out)) == strip(rows)  # the same samples, rewards, losses
    a = read_safetensors(newest_checkpoint(Path(full.train.out)) / "trainable.safetensors")
    b = read_safetensors(newest_checkpoint(Path(part.train.out)) / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failing_reward_function_stops_with_exit_3_and_keeps_checkpoints(tmp_path):
    from leantune.train.config import load_config
    from leantune.train.loop import train

    calls = tmp_path / "calls.txt"
    path = write_module(tmp_path, f"""
from pathlib import Path
CALLS = Path({str(calls)!r})

def score(prompt, completion, reference):
    n = int(CALLS.read_text()) if CALLS.exists() else 0
    CALLS.write_text(str(n + 1))
    if n >= 2 * 2 * 2 * 3:  # steps 1 and 2 (2 micro-batches of 2 prompts x 3) are scored
        raise RuntimeError("judge offline")
    return len(completion) / 10
""", "flaky")
    cfg = load_config(write_config(tmp_path, "flaky", reward_fn=f"{path}:score", save_every=1))
    with pytest.raises(DataError) as e:
        train(cfg, log=lambda m: None)
    assert e.value.exit_code == 3 and "judge offline" in e.value.what and f"{path}:score" in e.value.what
    assert str(tmp_path / "prompts.jsonl") in e.value.where
    out = Path(cfg.train.out)
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert [r["step"] for r in read_rows(out)] == [1, 2]


def test_cli_reward_error_is_one_line_and_exit_3(tmp_path):
    import subprocess
    import sys

    fn = write_module(tmp_path, "def score(p, c, r):\n    return None\n", "none_reward")
    cfg = write_config(tmp_path, "cli", reward_fn=f"{fn}:score", max_steps=1)
    res = subprocess.run([sys.executable, "-m", "leantune", "train", str(cfg)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 3, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leantune: error: ") and "Traceback" not in res.stderr
    assert "prompts.jsonl:" in err[0] and f"{fn}:score returned None, not a finite number" in err[0]
