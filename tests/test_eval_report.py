"""eval.report and eval.plots: the contract's report shape, the Markdown, the gate, the PNGs."""
from __future__ import annotations

import json

import pytest

from leantune.eval.metrics import JSON_KEYS, score_items
from leantune.eval.report import build_report, gate, write_report

ITEMS = [
    {"prompt": "Extract the person as JSON: Ada Lovelace, born 1815.",
     "reference": '{"name": "Ada Lovelace", "year": 1815}'},
    {"prompt": "Extract the person as JSON: Alan Turing, born 1912.",
     "reference": '{"name": "Alan Turing", "year": 1912}'},
    {"messages": [{"role": "system", "content": "Answer in JSON."},
                  {"role": "user", "content": "Grace Hopper, born 1906. " + "filler " * 200},
                  {"role": "assistant", "content": '{"name": "Grace Hopper", "year": 1906}'}],
     "reference": '{"name": "Grace Hopper", "year": 1906}'},
    {"prompt": "Extract: Edsger Dijkstra, born 1930.",
     "reference": '{"name": "Edsger Dijkstra", "year": 1930}'},
]
PREDS = {
    "base": ["Ada Lovelace was born in 1815.", '{"name": "Alan Turing", "year": 1912}',
             "I don't know", '{"name": "Edsger Dijkstra"'],
    "prompted": ['{"name": "Ada Lovelace", "year": 1816}', '{"name": "Alan Turing", "year": 1912}',
                 '{"name": "Grace Hopper", "year": 1906}', "```" + "x" * 1000],
    "tuned": ['{"name": "Ada Lovelace", "year": 1815}', '{"name": "Alan Turing", "year": 1912}',
              '{"name": "Grace Hopper", "year": 1906}', '{"name": "E. Dijkstra", "year": 1930}'],
}
LOSSES = {"base": 2.5, "prompted": 2.4, "tuned": 1.1}


def _report(preds=PREDS, losses=LOSSES, primary="json", extra=None):
    results = {lab: score_items(p, ITEMS, ["loss", "exact", "json"]) for lab, p in preds.items()}
    return build_report(results, losses, primary, ITEMS, preds, extra or {"run": "t"}, n_boot=200)


def test_report_shape_matches_contract():
    r = _report()
    json.dumps(r, allow_nan=False)  # JSON-ready as is
    assert r["primary_metric"] == "json_field_acc"
    assert list(r["models"]) == ["base", "prompted", "tuned"]
    for lab, m in r["models"].items():
        assert set(m) == {"exact", "eval_loss", *JSON_KEYS}
        for k, v in m.items():
            if k != "eval_loss":
                assert 0.0 <= v <= 1.0
                lo, hi = r["ci"][lab][k]
                assert lo <= v <= hi
    assert r["models"]["tuned"]["eval_loss"] == 1.1
    assert r["models"]["tuned"]["json_exact"] == 0.75
    assert r["models"]["base"]["json_valid"] == 0.25
    assert set(r["diffs"]) == {"tuned-vs-base", "tuned-vs-prompted"}
    d = r["diffs"]["tuned-vs-prompted"]["json_field_acc"]
    assert d["diff"] == pytest.approx(r["models"]["tuned"]["json_field_acc"]
                                      - r["models"]["prompted"]["json_field_acc"])
    assert d["lo"] <= d["diff"] <= d["hi"]
    assert r["diffs"]["tuned-vs-base"]["eval_loss"] == {"diff": pytest.approx(-1.4), "lo": None,
                                                        "hi": None}
    assert r["n_items"] == 4 and r["run"] == "t"
    assert r["best_baseline"] == "prompted"
    assert len(r["per_item"]["tuned"]["json_exact"]) == 4


def test_report_extra_adapters_missing_loss_and_errors():
    preds = dict(PREDS, dora=PREDS["tuned"])
    r = _report(preds=preds, losses={"tuned": 1.0})
    assert list(r["models"]) == ["base", "prompted", "tuned", "dora"]
    assert "dora-vs-base" in r["diffs"] and "eval_loss" not in r["diffs"]["dora-vs-base"]
    assert r["models"]["base"]["eval_loss"] is None
    with pytest.raises(ValueError, match="collide"):
        _report(extra={"models": 1})
    with pytest.raises(ValueError, match="primary"):
        _report(primary="bleu")
    with pytest.raises(ValueError, match="scores for 3 items"):
        build_report({"tuned": {"exact": [1.0]}}, {}, "exact", ITEMS[:3], {})


def test_write_report(tmp_path):
    r = _report()
    ok, msg = gate(r, 0.0)
    r["gate"] = {"ok": ok, "message": msg}
    paths = write_report(r, tmp_path, ITEMS, PREDS)
    assert paths["json"] == tmp_path / "eval" / "report.json"
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(r))
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.startswith(".")]  # no temp left
    md = paths["md"].read_text()
    assert "| model |" in md and "**json_field_acc**" in md and "## Differences" in md
    assert "tuned-vs-prompted" in md and "gate: PASS" in md
    # tuned vs prompted (best baseline) differ on json_field_acc at items 1 and 4 only
    assert "differ on `json_field_acc`: 2 of 4 (tuned better on 2, worse on 0)" in md
    assert "### Item 1" in md and "### Item 4" in md
    assert "### Item 2" not in md and "### Item 3" not in md
    assert '{"name": "E. Dijkstra", "year": 1930}' in md
    assert "chars ...]" in md                    # the 1000-char output was truncated
    assert "````text" in md                      # a fence longer than the output's backticks
    lines = paths["predictions"].read_text().splitlines()
    assert len(lines) == 4
    rec = json.loads(lines[2])
    assert rec["prompt"].startswith("system: Answer in JSON.\nuser: Grace Hopper")
    assert rec["outputs"]["tuned"] == PREDS["tuned"][2]
    assert rec["scores"]["tuned"]["json_exact"] == 1.0


def test_write_report_without_disagreement_scores(tmp_path):
    r = _report(primary="loss")
    md = write_report(r, tmp_path, ITEMS, PREDS)["md"].read_text()
    assert "nothing to compare" in md


def _gate_report(tuned, base, prompted=None, primary="exact"):
    models = {"base": {primary: base}, "tuned": {primary: tuned}}
    if prompted is not None:
        models["prompted"] = {primary: prompted}
    return {"primary_metric": primary, "models": models}


def test_gate_boundary():
    assert gate(_gate_report(0.5, 0.5), 0.0)[0]                 # equal to best passes at 0
    assert not gate(_gate_report(0.49, 0.5), 0.0)[0]
    assert gate(_gate_report(0.7, 0.6), 0.1)[0]                 # exactly the lift (float slack)
    assert not gate(_gate_report(0.69, 0.6), 0.1)[0]
    assert gate(_gate_report(0.45, 0.5), -0.05)[0]              # negative lift is a tolerance
    ok, msg = gate(_gate_report(0.6, 0.5, prompted=0.65), 0.0)  # the best baseline counts
    assert not ok and "prompted" in msg and "misses" in msg
    # eval_loss: lower is better
    assert gate(_gate_report(1.0, 1.2, primary="eval_loss"), 0.2)[0]
    assert not gate(_gate_report(1.1, 1.2, primary="eval_loss"), 0.2)[0]
    ok, msg = gate({"primary_metric": "exact", "models": {"tuned": {"exact": 0.1}}}, 0.5)
    assert ok and "no baseline" in msg
    with pytest.raises(ValueError):
        gate({"primary_metric": "exact", "models": {"base": {"exact": 0.1}}}, 0.0)


def test_gate_on_built_report():
    r = _report()
    ok, msg = gate(r, 0.0)
    assert ok and "tuned json_field_acc" in msg and "CI" in msg
    assert not gate(r, 0.5)[0]


# --------------------------------------------------------------------------- plots

def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from leantune.eval.plots import plot_loss_curves, plot_metric_comparison

    m = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 21)]
    recs += [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.4}]
    m.write_text("\n".join(json.dumps(x) for x in recs) + '\n{"step": 21, "lo')  # torn last line
    png = plot_loss_curves(m, tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    png = plot_metric_comparison(_report(), tmp_path / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_loss_curves(empty, tmp_path / "empty.png").stat().st_size > 0


def test_plots_bad_metrics_line(tmp_path):
    pytest.importorskip("matplotlib")
    from leantune.eval.plots import plot_loss_curves
    from leantune.base import DataError

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(DataError) as e:
        plot_loss_curves(m, tmp_path / "x.png")
    assert e.value.where.endswith("metrics.jsonl:2")


def test_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    import leantune.eval.plots as plots

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    plots._figure_class.cache_clear()
    try:
        assert plots.plot_loss_curves(tmp_path / "m.jsonl", tmp_path / "a.png") is None
        assert plots.plot_metric_comparison({"models": {}}, tmp_path / "b.png") is None
        err = capsys.readouterr().err
        assert err.count("matplotlib is not installed") == 1
    finally:
        plots._figure_class.cache_clear()
