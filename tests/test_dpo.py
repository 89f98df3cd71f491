"""DPO: shared-prompt rows against separate forwards, the losses and TRL's metrics against a
float64 reference, preference records, and the objective in the training loop."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from leantune.base import DataError
from leantune.peft_core.adapters import AdapterConfig, disable_adapters, inject_adapter, lora_layers
from leantune.train.dpo import METRICS, DPOObjective, dpo_losses
from leantune.train.preference import PairExample, PairPlan, build_pairs, sequence_logps
from tests.helpers import byte_tokenizer_files, tiny_model


def random_pairs(n=5, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [PairExample(ids(1, 9), ids(1, 12), ids(1, 12)) for _ in range(n)]


def lora_model(dtype=torch.float32, seed=0):
    model = tiny_model(seed=seed)
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):  # a trained-looking adapter: policy != reference
            layer.lora_B["default"].weight.normal_(0.0, 0.05)
        for p in model.parameters():  # (not model.to(): LoraLinear._apply shadows Module._apply)
            p.data = p.data.to(dtype)
    return model.eval()


def separate_logps(model, ex: PairExample, dtype=torch.float64):
    """The spec: prompt + side as its own sequence, full logits, summed log-probs."""
    out = []
    for side in (ex.chosen, ex.rejected):
        ids = torch.tensor([ex.prompt + side])
        logits = model(ids)[0].to(dtype)  # (T, V)
        logp = F.log_softmax(logits[:-1], dim=-1)
        P = len(ex.prompt)
        tgt = ids[0, P:]
        out.append(logp[P - 1:].gather(1, tgt[:, None]).sum())
    return torch.stack(out)


def test_shared_prompt_logps_equal_separate_forwards_fp32():
    model = lora_model(torch.float32)
    pairs = random_pairs(6)
    plan = PairPlan(pairs, batch_size=3, shuffle=False)
    for i in range(len(plan)):
        batch = plan.batch(0, i)
        with torch.no_grad():
            logps, counts = sequence_logps(model, batch, chunk=7)
        for row, k in enumerate(batch["pair_index"].tolist()):
            ex = pairs[k]
            with torch.no_grad():
                want = separate_logps(model, ex, torch.float32)
            torch.testing.assert_close(logps[row], want, rtol=1e-5, atol=1e-5)
            assert counts[row].tolist() == [len(ex.chosen), len(ex.rejected)]


def test_shared_prompt_row_layout():
    ex = PairExample([1, 2, 3], [4, 5], [6, 7, 8])
    plan = PairPlan([ex], batch_size=1, shuffle=False)
    b = plan.batch(0, 0)
    assert b["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert b["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def reference_values(loss_type, beta, gamma, pol, ref, counts):
    """TRL's formulas in float64 from separately computed log-probs (B, 2)."""
    if loss_type in ("ipo", "simpo"):
        pol, ref = pol / counts, ref / counts
    pc, pr, rc, rr = pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1]
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
        ch, rj = beta * (pc - rc), beta * (pr - rr)
    elif loss_type == "ipo":
        loss = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2
        ch, rj = beta * (pc - rc), beta * (pr - rr)
    else:
        loss = -F.logsigmoid(beta * (pc - pr) - gamma)
        ch, rj = beta * pc, beta * pr
    return {"loss": loss.mean(), "rewards/chosen": ch.mean(), "rewards/rejected": rj.mean(),
            "rewards/margins": (ch - rj).mean(), "rewards/accuracies": (ch > rj).double().mean()}


class _Train:
    def __init__(self, loss_type, beta, gamma):
        self.loss_type, self.beta, self.gamma = loss_type, beta, gamma


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_loss_and_rewards_match_float64_reference(loss_type):
    beta, gamma = 0.7, 0.3
    model = lora_model(torch.float64)
    pairs = random_pairs(6, seed=3)
    plan = PairPlan(pairs, batch_size=6, shuffle=False)
    batch = plan.batch(0, 0)
    obj = DPOObjective(_Train(loss_type, beta, gamma))
    obj.count([batch])
    loss = obj.loss_sum(model, batch, chunk=5) / len(pairs)
    got = {"loss": float(loss.detach()), **obj.metrics()}
    with torch.no_grad():
        pol = torch.stack([separate_logps(model, pairs[k]) for k in batch["pair_index"].tolist()])
        with disable_adapters(model):
            ref = torch.stack([separate_logps(model, pairs[k]) for k in batch["pair_index"].tolist()])
    counts = torch.tensor([[len(pairs[k].chosen), len(pairs[k].rejected)] for k in batch["pair_index"].tolist()],
                          dtype=torch.float64)
    want = reference_values(loss_type, beta, gamma, pol, ref, counts)
    assert 0.0 < want["rewards/accuracies"] < 1.0 or loss_type == "simpo"
    for name, value in want.items():
        assert math.isclose(got[name], float(value), rel_tol=1e-5, abs_tol=1e-12), (name, got[name], float(value))
    assert set(METRICS) <= set(got)


def test_loss_gradient_flows_to_adapter_only():
    model = lora_model(torch.float32)
    model.train()
    batch = PairPlan(random_pairs(3), batch_size=3, shuffle=False).batch(0, 0)
    obj = DPOObjective(_Train("sigmoid", 0.1, 0.5))
    obj.count([batch])
    obj.loss_sum(model, batch, chunk=4).backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_dpo_losses_at_equal_policy_and_reference():
    pol = torch.tensor([[-3.0, -4.0]], dtype=torch.float64)
    counts = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    losses, values = dpo_losses(pol, counts, pol.clone(), "sigmoid", 0.1)
    assert float(losses[0]) == pytest.approx(math.log(2))
    assert values[0, 3] == 0  # a tie is not an accurate pair (TRL)


# -- records -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from leantune.peft_core.tokenizer import Tokenizer

    return Tokenizer.from_dir(byte_tokenizer_files(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_string_and_message_pairs(tmp_path, tok):
    p = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "ab", "chosen": "cd", "rejected": "xyz"}])
    pairs, summary = build_pairs(p, tok, 64)
    ex = pairs[0]
    assert tok.decode(ex.chosen) == "cd<|im_end|>" and tok.decode(ex.rejected) == "xyz<|im_end|>"
    assert summary.prompt_tokens == len(ex.prompt) and summary.pairs == 1
    m = write_jsonl(tmp_path / "m.jsonl", [{
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}]}])
    (ex,), _ = build_pairs(m, tok, 64)
    assert tok.decode(ex.prompt) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex.chosen) == "yes<|im_end|>" and tok.decode(ex.rejected) == "no<|im_end|>"


@pytest.mark.parametrize("record, what", [
    ({"prompt": "a", "chosen": "b"}, "missing 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": 3}, "all be strings"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "'chosen' is empty"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "assistant messages"),
])
def test_bad_pair_names_file_and_line(tmp_path, tok, record, what):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    p = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataError) as e:
        build_pairs(p, tok, 64)
    assert e.value.where == f"{p}:2" and what in e.value.what and e.value.exit_code == 3


def test_prompt_without_room_is_dropped(tmp_path, tok):
    p = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "chosen": "b", "rejected": "c"},
                                              {"prompt": "a", "chosen": "b" * 40, "rejected": "c"}])
    pairs, summary = build_pairs(p, tok, 16)
    assert len(pairs) == 1 and summary.truncated == 1
    assert list(summary.dropped) == ["prompt leaves no room in max_len=16"]
    assert len(pairs[0].prompt) + len(pairs[0].chosen) == 16


# -- the objective in the training loop ----------------------------------------------------
def write_pairs(path, n=16, seed=0):
    import random

    rng = random.Random(seed)
    recs = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        recs.append({"prompt": f"add {a} and {b}: ", "chosen": f"{a + b}", "rejected": f"{a + b + rng.randint(1, 9)}"})
    return write_jsonl(path, recs)


def dpo_config(tmp_path, name, adapter=None, **train_over):
    from tests.helpers import tiny_model_dir

    model, data = tmp_path / "model", tmp_path / "pairs.jsonl"
    if not model.exists():
        tiny_model_dir(model, "llama", seed=0)
        write_pairs(data)
    train_keys = {"out": str(tmp_path / name), "objective": "dpo", "max_steps": 4, "batch_size": 4,
                  "grad_accum": 2, "lr": 1e-2, "log_every": 1, "save_every": 2, "beta": 0.5}
    train_keys.update(train_over)
    conf = {"model": {"path": str(model), "quant": "none", "compute_dtype": "float32"},
            "adapter": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1, **(adapter or {})},
            "data": {"train": str(data), "eval": str(data), "max_len": 32},
            "train": train_keys}
    text = "".join(f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                   for sec, vals in conf.items())
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    from leantune.train.config import load_config

    return load_config(path)


def test_dpo_run_logs_trl_metrics_and_resumes_bit_exact(tmp_path):
    import os
    import signal
    from pathlib import Path

    from leantune.peft_core.safetensors_io import read_safetensors
    from leantune.train.loop import newest_checkpoint, train

    full = dpo_config(tmp_path, "full", eval_every=2)
    train(full, log=lambda m: None)
    rows = [json.loads(x) for x in (Path(full.train.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in METRICS + ("pairs", "eval_rewards/accuracies"):
        assert name in rows[1], name
    assert rows[0]["pairs"] == 8 and rows[0]["rewards/margins"] == 0.0  # policy == reference at step 0
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["loss"] < rows[0]["loss"]

    part = dpo_config(tmp_path, "part", eval_every=2)

    def stop_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(part, log=lambda m: None, on_step=stop_at_2).steps == 2
    train(part, resume=True, log=lambda m: None)
    a = read_safetensors(newest_checkpoint(Path(full.train.out)) / "trainable.safetensors")
    b = read_safetensors(newest_checkpoint(Path(part.train.out)) / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_is_cached_and_keyed(tmp_path):
    from pathlib import Path

    from leantune.train.loop import train

    logs = []
    cfg = dpo_config(tmp_path, "pre", precompute_ref=True, max_steps=2, save_every=0)
    train(cfg, log=logs.append)
    assert any("computed once" in m for m in logs)
    cached = list((Path(cfg.train.out) / "cache").glob("ref-logps-*.safetensors"))
    assert len(cached) == 1
    logs.clear()
    train(cfg, log=logs.append, overwrite=True)
    assert any("reference log-probs from" in m for m in logs)
    cfg.data.max_len = 31  # a changed input: another key
    logs.clear()
    train(cfg, log=logs.append, overwrite=True)
    assert any("computed once" in m for m in logs)
    assert len(list((Path(cfg.train.out) / "cache").glob("ref-logps-*.safetensors"))) == 2


def test_reference_adapter_is_frozen_copy(tmp_path):
    from pathlib import Path

    from leantune.peft_core.safetensors_io import read_safetensors
    from leantune.train.loop import train

    sft = dpo_config(tmp_path, "sft", adapter={"dropout": 0.0}, max_steps=1, save_every=0)
    train(sft, log=lambda m: None)
    ref_dir = Path(sft.train.out) / "adapter"
    cfg = dpo_config(tmp_path, "ref", reference_adapter=str(ref_dir), max_steps=2, save_every=0)
    train(cfg, log=lambda m: None)
    rows = [json.loads(x) for x in (Path(cfg.train.out) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards/margins"] == 0.0  # a copy of the reference (its config: no dropout)
    before = read_safetensors(ref_dir / "adapter_model.safetensors")
    after = read_safetensors(Path(cfg.train.out) / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("key, value, what", [
    ("objective", "ppo", "must be one of sft, dpo, grpo"),
    ("loss_type", "hinge", "must be one of sigmoid, ipo, simpo"),
    ("beta", 0.0, "must be positive"),
    ("gamma", -1.0, "must be >= 0"),
    ("precompute_ref", "yes", "expected true or false"),
])
def test_dpo_config_errors_name_the_key(tmp_path, key, value, what):
    from leantune.base import UsageError

    with pytest.raises(UsageError) as e:
        dpo_config(tmp_path, "bad", **{key: value})
    assert f"train.{key}" in e.value.where and what in e.value.what and e.value.exit_code == 2


# -- data check | stats on preference files ------------------------------------------------
def test_data_check_flags_pair_problems(tmp_path, capsys):
    from leantune.cli import main

    tok_dir = byte_tokenizer_files(tmp_path / "tok")
    p = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "a", "chosen": "good answer", "rejected": "bad"},
        {"prompt": "b", "chosen": "same", "rejected": "same"},
        {"prompt": "c", "chosen": "x"},
        {"prompt": "d" * 40, "chosen": "y", "rejected": "z"},
        {"prompt": "e", "chosen": "", "rejected": "z"},
    ])
    assert main(["data", "check", str(p), "--tokenizer", str(tok_dir), "--max-len", "16"]) == 3
    out = capsys.readouterr().out
    assert f"{p}:2: chosen and rejected are identical" in out
    assert f"{p}:3: preference record is missing 'rejected'" in out
    assert f"{p}:4: the prompt has 40 tokens and leaves no room in max_len=16" in out
    assert f"{p}:5: field 'chosen' is empty" in out
    assert "4 problem(s)" in out


def test_data_stats_reports_length_bias(tmp_path, capsys):
    from leantune.cli import main

    p = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "x" * 10, "rejected": "y" * 4},
                                               {"prompt": "q", "chosen": "x" * 6, "rejected": "y" * 8}])
    assert main(["data", "stats", str(p)]) == 0
    out = capsys.readouterr().out
    assert "length bias (chars): mean chosen - rejected = +2.0" in out
    assert main(["data", "stats", str(p), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["length_bias_chars"] == 2.0 and st["records"] == 2 and st["identical_pairs"] == 0


def test_shared_prompt_gradients_equal_separate_forwards():
    model = lora_model(torch.float64)
    pairs = random_pairs(4, seed=5)
    batch = PairPlan(pairs, batch_size=4, shuffle=False).batch(0, 0)
    weights = torch.tensor([1.0, -0.5], dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    logps, _ = sequence_logps(model, batch, chunk=3)
    packed = torch.autograd.grad((logps * weights).sum(), params)
    sep = torch.stack([separate_logps(model, pairs[k]) for k in batch["pair_index"].tolist()])
    separate = torch.autograd.grad((sep * weights).sum(), params)
    for a, b in zip(packed, separate):  # (RMSNorm's backward keeps fp32 row statistics)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
