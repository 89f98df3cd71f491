"""``leantune eval`` on preference data: per-pair scores of base and tuned against a float64
computation from separate forwards, bootstrap intervals and differences, the primary metric,
message pairs, and a bad record's one-line error (exit 3)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from leantune.train.config import load_config
from tests.helpers import tiny_model_dir

PAIRS = [("add 2 and 3: ", "5", "6"), ("add 10 and 4: ", "14", "15"), ("name a fruit: ", "apple", "rock"),
         ("say hi: ", "hi there", "no"), ("add 7 and 7: ", "14", "77"), ("colour of sky: ", "blue", "green"),
         ("add 1 and 1: ", "2", "11"), ("capital of France: ", "Paris", "Rome"), ("say yes: ", "yes", "maybe"),
         ("add 6 and 3: ", "9", "63")]


def random_adapter_dir(model_dir, out, seed=1, scale=0.05):
    """A LoRA adapter with random A and B (a "trained" one: its margins differ from the base's)."""
    from leantune.peft_core.adapters import AdapterConfig, inject_adapter, lora_layers, save_adapter
    from leantune.peft_core.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32)
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0.0, scale)
    return save_adapter(model, out)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_config(tmp, name, eval_data, **eval_keys):
    keys = {"data": str(eval_data), "batch_size": 3, "require_lift": -1000.0, **eval_keys}
    text = (f'[model]\npath = "{tmp / "model"}"\nquant = "none"\ncompute_dtype = "float32"\n'
            f'[data]\ntrain = "{eval_data}"\nmax_len = 64\n'
            f'[train]\nout = "{tmp / name}"\nbeta = 0.5\n[eval]\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread (two spin against each other on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefeval")
    model_dir = tiny_model_dir(tmp / "model", seed=3)
    adapter = random_adapter_dir(model_dir, tmp / "adapter")
    data = write_jsonl(tmp / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    return tmp, model_dir, adapter, data


def separate_logps(model, tok, prompt: str, side: str) -> float:
    """The spec: prompt + side (+ EOS) as its own sequence, full float64 logits."""
    p = tok.encode(prompt)
    s = tok.encode(side) + [tok.eos_token_id]
    ids = torch.tensor([p + s])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].double()[:-1], dim=-1)
    return float(logp[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum())


def plain_scores(model_dir, adapter):
    """Margins of base and tuned, each pair's two sides in separate float64 forwards."""
    from leantune.peft_core.adapters import disable_adapters, load_adapter
    from leantune.peft_core.checkpoint import load_model
    from leantune.peft_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch.float64).eval()
    load_adapter(model, adapter)
    tuned = [separate_logps(model, tok, p, c) - separate_logps(model, tok, p, r) for p, c, r in PAIRS]
    with disable_adapters(model):
        base = [separate_logps(model, tok, p, c) - separate_logps(model, tok, p, r) for p, c, r in PAIRS]
    return base, tuned


def test_scores_match_separate_float64_forwards(setup):
    from leantune.eval.runner import run_eval

    tmp, model_dir, adapter, data = setup
    cfg = load_config(write_config(tmp, "run", data, metrics=["loss"]))
    logs = []
    report = run_eval(cfg, adapters={"tuned": adapter}, log=logs.append)
    assert any("prompted baseline does not apply" in m for m in logs)
    assert report["primary_metric"] == "chosen_preferred"
    assert set(report["models"]) == {"base", "tuned"} and report["n_items"] == len(PAIRS)

    base, tuned = plain_scores(model_dir, adapter)
    n = len(PAIRS)
    per = report["per_item"]
    for label, want_margins in (("base", base), ("tuned", tuned)):
        got = torch.tensor(per[label]["mean_margin"], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(want_margins, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    assert min(abs(b - t) for b, t in zip(base, tuned)) > 1e-3  # no near-tie for the indicators
    want = {"base": {"chosen_preferred": [float(m > 0) for m in base], "preference_accuracy": [0.0] * n},
            "tuned": {"chosen_preferred": [float(m > 0) for m in tuned],
                      "preference_accuracy": [float(t > b) for b, t in zip(base, tuned)]}}
    for label, metrics in want.items():
        for metric, vals in metrics.items():
            assert per[label][metric] == vals, (label, metric)
            assert report["models"][label][metric] == pytest.approx(sum(vals) / n)
    acc = report["models"]["tuned"]["preference_accuracy"]
    assert 0.0 < acc < 1.0  # the test means something
    assert report["models"]["tuned"]["mean_margin"] == pytest.approx(sum(tuned) / n, abs=1e-4)

    # eval_loss: DPO sigmoid with beta 0.5 against the base; log 2 for the base itself
    h = torch.tensor(tuned, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    assert report["models"]["tuned"]["eval_loss"] == pytest.approx(float(-F.logsigmoid(0.5 * h).mean()), abs=1e-5)
    assert report["models"]["base"]["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)

    # bootstrap intervals for every metric, paired differences against the base
    for label in ("base", "tuned"):
        for metric in ("chosen_preferred", "preference_accuracy", "mean_margin"):
            lo, hi = report["ci"][label][metric]
            assert lo is not None and lo <= report["models"][label][metric] <= hi
    d = report["diffs"]["tuned-vs-base"]
    for metric in ("chosen_preferred", "preference_accuracy", "mean_margin"):
        assert d[metric]["lo"] <= d[metric]["diff"] <= d[metric]["hi"]
    assert d["mean_margin"]["diff"] == pytest.approx((sum(tuned) - sum(base)) / n, abs=1e-4)

    saved = json.loads((tmp / "run" / "eval" / "report.json").read_text())
    assert saved["primary_metric"] == "chosen_preferred" and saved["preference"]["pairs"] == n
    assert saved["preference"]["reference"] == "base (adapter off)" and "kl_base_tuned" in saved["regression"]
    md = (tmp / "run" / "eval" / "report.md").read_text()
    assert "**chosen_preferred**" in md and "preference_accuracy" in md and "tuned-vs-base" in md
    pred = [json.loads(x) for x in (tmp / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(pred) == n and pred[0]["reference"] == {"chosen": "5", "rejected": "6"}
    assert pred[0]["outputs"]["tuned"].startswith("logp(chosen) ")


def test_reference_adapter_is_the_reference(setup):
    """A DPO run trained against ``train.reference_adapter`` is scored against it, as its
    eval_every was: preference_accuracy and eval_loss from the reference's margins. With the
    tuned adapter as its own reference, it beats itself on no pair and scores log 2; the base
    is scored against the reference too (its accuracy no longer 0 by definition)."""
    from leantune.base import UsageError
    from leantune.eval.runner import run_eval

    tmp, model_dir, adapter, data = setup
    path = write_config(tmp, "refrun", data, metrics=["loss"])
    text = path.read_text().replace("beta = 0.5\n", f'beta = 0.5\nobjective = "dpo"\nreference_adapter = "{adapter}"\n')
    path.write_text(text)
    cfg = load_config(path)
    logs = []
    report = run_eval(cfg, adapters={"tuned": adapter}, log=logs.append)
    assert any("reference (train.reference_adapter" in m for m in logs)
    assert report["preference"]["reference"] == f"the adapter {adapter}"
    base, tuned = plain_scores(model_dir, adapter)
    per = report["per_item"]
    assert per["tuned"]["preference_accuracy"] == [0.0] * len(PAIRS)
    assert per["base"]["preference_accuracy"] == [float(b > t) for b, t in zip(base, tuned)]
    assert 0.0 < report["models"]["base"]["preference_accuracy"] < 1.0  # the test means something
    assert report["models"]["tuned"]["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    h = torch.tensor(base, dtype=torch.float64) - torch.tensor(tuned, dtype=torch.float64)
    assert report["models"]["base"]["eval_loss"] == pytest.approx(float(-F.logsigmoid(0.5 * h).mean()), abs=1e-5)
    # the label is the reference's
    with pytest.raises(UsageError):
        run_eval(load_config(path), adapters={"reference": adapter}, log=lambda m: None)


def test_primary_metric_from_eval_metrics_and_max_items(setup):
    from leantune.eval.runner import run_eval

    tmp, _, adapter, data = setup
    cfg = load_config(write_config(tmp, "primary", data, metrics=["exact", "mean_margin"], max_items=4,
                                   baselines=["base"]))
    logs = []
    report = run_eval(cfg, adapters={"tuned": adapter}, log=logs.append)
    assert report["primary_metric"] == "mean_margin" and report["n_items"] == 4
    assert report["models"]["tuned"]["eval_loss"] is None  # "loss" not asked for
    assert any("exact do not apply" in m for m in logs)


def test_message_pairs(tmp_path, setup):
    from leantune.eval.runner import run_eval

    tmp, _, adapter, _ = setup
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    said = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    data = write_jsonl(tmp_path / "m.jsonl", [{"prompt": user(p), "chosen": said(c), "rejected": said(r)}
                                              for p, c, r in PAIRS[:5]])
    cfg = load_config(write_config(tmp, "msgs", data))
    report = run_eval(cfg, adapters={"tuned": adapter}, log=lambda m: None)
    assert report["preference"]["shape"] == "messages" and report["n_items"] == 5
    for metric in ("chosen_preferred", "preference_accuracy", "mean_margin"):
        assert report["models"]["tuned"][metric] is not None and report["ci"]["tuned"][metric][0] is not None


def test_gate_on_preference_data(setup):
    from leantune.base import GateError
    from leantune.eval.runner import run_eval

    tmp, _, adapter, data = setup
    cfg = load_config(write_config(tmp, "gate", data, require_lift=2.0))
    with pytest.raises(GateError) as e:
        run_eval(cfg, adapters={"tuned": adapter}, log=lambda m: None)
    assert "chosen_preferred" in e.value.what and e.value.exit_code == 5


def test_bad_record_is_one_line_exit_3(setup, tmp_path, capsys):
    from leantune.cli import main

    tmp, _, adapter, _ = setup
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                                {"prompt": "a", "chosen": "b"}])
    cfg = write_config(tmp, "bad", data)
    assert main(["eval", str(cfg), "--adapter", str(adapter)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"leantune: error: {data}:2: preference record is missing 'rejected' "
                   "(needs prompt, chosen, rejected)"]


def test_unknown_metric_is_a_usage_error(setup):
    from leantune.base import UsageError
    from leantune.eval.runner import run_eval

    tmp, _, adapter, data = setup
    cfg = load_config(write_config(tmp, "unknown", data, metrics=["chosen_prefered"]))
    with pytest.raises(UsageError) as e:
        run_eval(cfg, adapters={"tuned": adapter}, log=lambda m: None)
    assert e.value.where == "eval.metrics" and e.value.exit_code == 2
