"""bench/demo_memory.py's pure parts: arguments, per-step rows -> summary, ratios, table,
record name and merge (issue 15). The bench itself (minutes per provider) is not run here."""
from __future__ import annotations

import argparse
import json
import types

import pytest

from leantune.bench import demo_memory as dm


def _rows(values, hostpool=None):
    return [{"step": i, "peak_mb": v, **({"hostpool_peak_mb": hostpool} if hostpool else {})}
            for i, v in enumerate(values, 1)]


def test_parse_args_defaults_and_providers():
    a = dm.parse_args([])
    assert (a.steps, a.out, a.providers) == (50, "bench/results", ["leantune", "peer", "peer-bf16"])
    a = dm.parse_args(["--steps", "7", "--out", "x", "--providers", "peer-bf16, leantune,peer-bf16"])
    assert (a.steps, a.out, a.providers) == (7, "x", ["peer-bf16", "leantune"])
    for bad in (["--providers", "leantune,hf"], ["--providers", ","], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            dm.parse_args(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        dm.parse_providers("leantune-graphs")


def test_summarize_steps_ratios_and_hostpool():
    rows = _rows([900, 1000, 1010, 1020, 1000] + [1100] * 20 + [1200] * 25, hostpool=300.0)
    s = dm.summarize(list(reversed(rows)), 50)  # order does not matter
    assert s["at"] == {"1": 900, "5": 1000, "25": 1100, "50": 1200}
    assert s["peak_mb"] == 1200 and s["steps_done"] == 50
    assert s["last_over_5"] == pytest.approx(1.2) and s["max_over_5"] == pytest.approx(1.2)
    assert s["hostpool_peak_mb"] == 300.0
    short = dm.summarize(_rows([900, 1000, 1300]), 50)  # cut short: the missing steps are None
    assert short["at"]["5"] is None and short["at"]["50"] is None
    assert short["last_over_5"] is None and short["max_over_5"] is None and short["peak_mb"] == 1300


def test_compare_and_table():
    summaries = {"leantune": dm.summarize(_rows([1000] * 4 + [1000] + [1300] * 45), 50),
                 "peer": dm.summarize(_rows([3000] * 50), 50),
                 "peer-bf16": dm.summarize(_rows([2000] * 10), 50)}  # a peer cut short at 10 steps
    c = dm.compare(summaries)
    assert c["leantune_over"] == {"peer": pytest.approx(1300 / 3000), "peer-bf16": pytest.approx(0.65)}
    assert c["acceptance"] == {"leantune_within_1.25x_of_step5": False,  # 1.3 > 1.25
                               "leantune_le_0.5x_peer": True, "leantune_le_0.5x_peer-bf16": False}
    table = dm.markdown_table(summaries, c, 50)
    lines = table.splitlines()
    assert lines[0].startswith("| provider | step 1 | step 5 | step 25 | step 50 | run peak |")
    assert "| leantune | 1,000 | 1,000 | 1,300 | 1,300 | 1,300 | 1.300 | 1.300 | 1.000 |" in lines
    assert "| peer | 3,000 | 3,000 | 3,000 | 3,000 | 3,000 | 1.000 | 1.000 | 0.433 |" in lines
    assert "| peer-bf16 | 2,000 | 2,000 | - | - | 2,000 | - | 1.000 | 0.650 |" in lines
    assert "acceptance leantune_within_1.25x_of_step5: FAIL" in table
    # fewer steps than 25: no duplicated column
    assert dm.markdown_table({"peer": dm.summarize(_rows([1, 2, 3, 4, 5]), 5)}, dm.compare({}), 5) \
        .startswith("| provider | step 1 | step 5 | step 25 | run peak |")


def test_rows_from_metrics_and_peer_output():
    lines = [json.dumps({"step": 1, "loss": 1.0, "peak_mem_mb": 1000.5, "hostpool_peak_mb": 250.0}), "",
             json.dumps({"step": 2, "loss": 0.9, "peak_mem_mb": 1001.0}),
             json.dumps({"event": "something else"})]
    assert dm.leantune_rows(lines) == [
        {"step": 1, "peak_mb": 1000.5, "hostpool_peak_mb": 250.0, "loss": 1.0},
        {"step": 2, "peak_mb": 1001.0, "hostpool_peak_mb": None, "loss": 0.9}]
    out = "Loading weights\n" + dm.STEP_MARK + json.dumps({"step": 1, "peak_mb": 3.0}) + "\nnoise\n"
    assert dm.peer_rows(out) == [{"step": 1, "peak_mb": 3.0}]


def test_record_name_and_merge():
    assert dm.record_name("AMD EPYC 9654 96-Core Processor", "2026-12-03") == \
        "demo-memory-amd-epyc-9654-96-core-processor-2026-12-03.json"
    old = {"settings": {"steps": 50}, "runs": {"leantune": {"rows": [1]}, "peer": {"rows": [2]}}}
    assert dm.merge_runs(old, {"peer": {"rows": [3]}}, 50) == {"leantune": {"rows": [1]}, "peer": {"rows": [3]}}
    assert dm.merge_runs(old, {"peer": {"rows": [3]}}, 10) == {"peer": {"rows": [3]}}  # other step count
    assert dm.merge_runs(None, {}, 50) == {}


def test_cpu_info_shape():
    info = dm.cpu_info()
    assert set(info) == {"model", "cores", "avx512_bf16", "amx_bf16"}
    assert isinstance(info["avx512_bf16"], bool) and isinstance(info["amx_bf16"], bool)


def test_the_e2e_peer_step_still_closes_over_what_the_worker_takes():
    """peer_worker reuses bench.e2e_worker._setup_peer and takes the model, optimizer and
    autocast from its step function's closure: fail here, cheaply, if that function changes."""
    from leantune.bench import e2e_worker

    inner = [c for c in e2e_worker._setup_peer.__code__.co_consts
             if isinstance(c, types.CodeType) and c.co_name == "step"]
    assert inner and {"model", "opt", "autocast"} <= set(inner[0].co_freevars)

    def make():
        model, opt = "m", "o"

        def autocast():
            return None

        def step():
            return model, opt, autocast

        return step

    got = dm._closure(make())
    assert got["model"] == "m" and got["opt"] == "o" and callable(got["autocast"])
