"""Smoke tests of the end-to-end benchmark harness (bench/e2e.py) on a tiny random Llama.

The harness run starts one worker process per provider; the peer side (transformers + PEFT +
bitsandbytes) runs only when those packages are installed.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from leantune.bench import e2e
from leantune.base import UsageError

PEER = not e2e.peer_missing()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return e2e.write_random_model(tmp_path_factory.mktemp("bench") / "tiny", "tiny", seed=0)


def test_random_model_loads_in_both_layouts(tiny_dir):
    from leantune.peft_core.checkpoint import load_model

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 512 and cfg["tie_word_embeddings"]
    model = load_model(tiny_dir, dtype=torch.float32, quant="nf4")
    assert model.config.num_hidden_layers == 2
    # reused, not rewritten, on a second call
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert e2e.write_random_model(tiny_dir, "tiny") == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_step_cost_by_hand():
    cfg = {"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "vocab_size": 10,
           "num_attention_heads": 2, "num_key_value_heads": 1}
    c = e2e.step_cost(cfg, batch=3, seq=5, rank=2)
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16 each, down 16x8
    P = 2 * (64 + 32 + 32 + 64 + 128 * 3)
    P_lora = 2 * 2 * ((8 + 8) + (8 + 4) * 2 + (8 + 8) + (8 + 16) * 3)
    assert c["params_base_linear"] == P and c["params_lora"] == P_lora
    T = 15
    assert c["flops"]["base"] == 4 * P * T
    assert c["flops"]["lora"] == 6 * P_lora * T
    assert c["flops"]["lm_head"] == 4 * 10 * 8 * 3 * 4
    assert c["flops"]["attention"] == 6 * 2 * 3 * 25 * 2 * 4
    assert c["flops"]["total"] == sum(v for k, v in c["flops"].items() if k != "total")
    only_q = e2e.step_cost(cfg, batch=3, seq=5, rank=2, targets="q_proj")
    assert only_q["params_lora"] == 2 * 2 * 16


def test_sweeps_one_axis_at_a_time():
    sweeps = e2e.parse_sweeps(["seq=16,32", "rank=4,8"])
    base = e2e.StepSpec(model_dir="x", batch=2, seq=16, rank=4)
    keys = [s.key() for s in e2e.configurations(base, sweeps)]
    assert keys == [(2, 16, 4), (2, 32, 4), (2, 16, 8)]  # base once, then each axis alone
    for bad in (["depth=1,2"], ["seq"], ["seq=a"], ["rank=0"]):
        with pytest.raises(UsageError):
            e2e.parse_sweeps(bad)


def test_harness_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "results"
    providers = "leantune,peer,peer-bf16" if PEER else "leantune"
    code = e2e.main(["--model", str(tiny_dir), "--dtype", "float32", "--batch", "2", "--seq", "16", "--rank", "4",
                     "--steps", "2", "--warmup", "1", "--roofline", "quick", "--providers", providers,
                     "--out", str(out), "--tag", "smoke"])
    assert code == 0
    assert "| leantune |" in capsys.readouterr().out
    [path] = out.glob("*-e2e-smoke.json")
    run = json.loads(path.read_text())["runs"][-1]
    assert run["versions"]["torch"] and run["device"] and run["date"] and run["machine"]["copy_GBps"] > 0
    rows = {r["provider"]: r for r in run["rows"]}
    lt = rows["leantune"]
    assert "errors" not in lt, lt.get("errors")
    assert lt["n"] == 2 and lt["q20_s"] <= lt["median_s"] <= lt["q80_s"]
    assert lt["rss_peak_bytes"] >= lt["rss_baseline_bytes"] > 0  # a tiny model may not raise the peak
    assert lt["n_trainable"] == e2e.step_cost(json.loads((tiny_dir / "config.json").read_text()),
                                              2, 16, 4)["params_lora"]
    assert lt["achieved_TFLOPs"] > 0 and 0 < lt["frac_matmul"]
    assert path.with_suffix(".md").read_text().count("| leantune |") == 1
    assert path.with_suffix(".png").is_file() or not _has_matplotlib()
    if PEER:
        peer = rows["peer"]
        assert "errors" not in peer, peer.get("errors")
        assert peer["n_trainable"] == lt["n_trainable"]
        # same NF4 weights, same batch, LoRA B = 0: the first losses agree
        assert abs(lt["loss_first"] - peer["loss_first"]) < 1e-3
        assert lt["speedup_vs_peer"] > 0 and lt["rss_ratio_vs_peer"] > 0
        assert lt["vs_peer"] == "peer"  # a float32 run compares with the float32 peer
        # peer-bf16: bnb computes in bf16 under autocast, the adapters stay float32
        pb = rows["peer-bf16"]
        assert "errors" not in pb, pb.get("errors")
        assert pb["n_trainable"] == lt["n_trainable"]
        assert abs(lt["loss_first"] - pb["loss_first"]) < 0.05


def test_dtype_auto_is_leantunes_choice(monkeypatch):
    assert e2e.leantune_dtype("cuda") == "bfloat16"
    monkeypatch.setenv("LEANTUNE_CPU_BF16", "0")
    assert e2e.leantune_dtype("cpu") == "float32"
    monkeypatch.delenv("LEANTUNE_CPU_BF16")
    from leantune.quant.cpu_kernels import _cpu_has

    native = _cpu_has("avx512_bf16") or _cpu_has("amx_bf16")
    assert e2e.leantune_dtype("cpu") == ("bfloat16" if native else "float32")
    assert "peer-bf16" in e2e.PROVIDERS and e2e.add_bench_arguments(
        __import__("argparse").ArgumentParser()).parse_args([]).providers == "leantune,peer"


def test_worker_error_becomes_a_row(tmp_path, capsys):
    spec = e2e.StepSpec(model_dir=str(tmp_path / "missing"), steps=1)
    assert e2e._worker_entry("leantune", json.dumps(dataclasses.asdict(spec))) == 1
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(e2e.RESULT_MARK)]
    res = json.loads(line[len(e2e.RESULT_MARK):])
    assert "ModelError" in res["error"] and res["provider"] == "leantune"
    row = e2e.summarize("leantune", spec, [res])
    assert row["errors"] and "median_s" not in row


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_sweep_plots_and_appended_records(tmp_path):
    pytest.importorskip("matplotlib")
    base = e2e.StepSpec(model_dir="x", batch=2, seq=16, rank=4)
    rows = []
    for seq in (16, 32, 64):
        for prov, t in (("leantune", 0.01 * seq), ("peer", 0.02 * seq)):
            rows.append({"provider": prov, "batch": 2, "seq": seq, "rank": 4, "targets": "all-linear",
                         "median_s": t, "q20_s": t * 0.9, "q80_s": t * 1.1, "n": 3, "tokens_per_s": 32 * seq / t,
                         "rss_peak_bytes": 1e9 + seq * 1e6, "rss_baseline_bytes": 5e8,
                         "rss_above_baseline_bytes": 5e8 + seq * 1e6, "loss_first": 6.0, "threads": 2})
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2}
    e2e.add_derived(rows, cfg, {"copy_GBps": 10.0, "matmul_TFLOPs": 0.1}, 4)
    assert rows[0]["speedup_vs_peer"] == pytest.approx(2.0)
    run = {"date": "2026-01-02T03:04:05+00:00", "device": "cpu-test", "cpu": "test", "dtype": "float32",
           "versions": {"torch": torch.__version__}, "git_commit": None, "notes": [],
           "model": {"name": "tiny"}, "machine": {"copy_GBps": 10.0, "matmul_TFLOPs": 0.1, "matmul_n": 256,
                                                  "matmul_dtype": "float32"},
           "settings": {"steps": 3, "warmup": 1, "rounds": 1}, "rows": rows}
    for _ in range(2):
        written = e2e.record(run, tmp_path, base)
    names = sorted(p.name for p in written)
    assert names == ["cpu-test-2026-01-02-e2e-seq.png", "cpu-test-2026-01-02-e2e.json",
                     "cpu-test-2026-01-02-e2e.md"]
    assert len(json.loads((tmp_path / "cpu-test-2026-01-02-e2e.json").read_text())["runs"]) == 2
    assert (tmp_path / "cpu-test-2026-01-02-e2e.md").read_text().count("| 2.00x |") == 6


def test_profile_step_runs_the_e2e_step_under_the_profiler(tiny_dir, capsys):
    """bench/profile_step.py (gpu_suite.sh's profile stage) on the CPU: the e2e harness's step,
    timed, then profiled; the table lists the step's own ops."""
    from leantune.bench import profile_step

    assert profile_step.main(["--model", str(tiny_dir), "--seq", "16", "--batch", "2", "--rank", "4",
                              "--dtype", "float32", "--top", "40"]) == 0
    out = capsys.readouterr().out
    assert "leantune tiny float32 B=2 T=16 r=4: step" in out and " ms wall" in out
    assert "aten::mm" in out and "Self CPU" in out
