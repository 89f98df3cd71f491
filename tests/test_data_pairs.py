"""``leantune data pairs``: preference pairs from a tiny model's own samples. The output passes
``data check`` as preference data in the input's shape, ties are skipped and counted, the same
seed gives the same file, and the CLI's errors follow the contract (exit 2 / 3 / 4)."""
from __future__ import annotations

import json

import pytest
import torch

from leantune.cli import main
from leantune.train.self_pairs import Sampling, make_pairs, pick_pair
from leantune.train.config import load_config
from tests.helpers import tiny_model_dir
from tests.test_preference_eval import random_adapter_dir, write_jsonl

# the regex metric: the sample's first non-space character is ASCII. The byte-level tiny
# model samples bytes about uniformly, so about half the samples match: both ties and pairs
FIRST_ASCII = r"^[\x00-\x7f]"
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread (two spin against each other on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    model_dir = tiny_model_dir(tmp / "model", seed=5)
    adapter = random_adapter_dir(model_dir, tmp / "adapter")
    pc = write_jsonl(tmp / "pc.jsonl", [{"prompt": f"say {w}: ", "completion": w, "regex": FIRST_ASCII}
                                        for w in WORDS])
    msgs = write_jsonl(tmp / "msgs.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"say {w}"},
                      {"role": "assistant", "content": w}], "regex": FIRST_ASCII} for w in WORDS])
    return tmp, adapter, pc, msgs


def config(tmp, train_file, name="c", **train):
    keys = {"out": str(tmp / name), "max_new_tokens": 6, "seed": 3, **train}
    text = (f'[model]\npath = "{tmp / "model"}"\nquant = "none"\ncompute_dtype = "float32"\n'
            f'[data]\ntrain = "{train_file}"\nmax_len = 64\n[train]\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def test_pick_pair_best_vs_worst_and_ties():
    assert pick_pair([0.5, 1.0, 0.0, 1.0], [True] * 4) == (1, 2)  # the first of equal bests
    assert pick_pair([0.5, 0.5, 0.5], [True] * 3) is None  # a tie
    assert pick_pair([1.0, 0.0, 0.5], [True, False, True]) == (0, 2)  # an empty sample is not used
    assert pick_pair([1.0, 0.0], [True, False]) is None


def test_pairs_pass_data_check_with_ties_skipped(setup, capsys):
    tmp, adapter, pc, _ = setup
    cfg = config(tmp, pc, "pc")
    out = tmp / "pc-pairs.jsonl"
    assert main(["data", "pairs", str(cfg), "--adapter", str(adapter), "--samples", "2", "--metric", "regex",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    ties = int(line.split(" ties skipped")[0].rsplit(" ", 1)[1])
    assert line.startswith(f"data pairs: {len(WORDS)} records x 2 samples -> {len(recs)} pairs written")
    assert recs and ties and len(recs) + ties == len(WORDS), line  # nothing else skipped here
    assert f"wrote {out}" in line and "regex of chosen 1.000, rejected 0.000 on average" in line
    prompts = {f"say {w}: " for w in WORDS}
    for r in recs:
        assert set(r) == {"prompt", "chosen", "rejected"} and r["prompt"] in prompts
        assert isinstance(r["chosen"], str) and r["chosen"].strip()[0] < "\x80" <= r["rejected"].strip()[0]
    assert main(["data", "check", str(out)]) == 0
    assert f"{len(recs)} records (preference, strings), 0 problem(s)" in capsys.readouterr().out


def test_message_records_give_message_pairs(setup, capsys):
    tmp, adapter, _, msgs = setup
    cfg = config(tmp, msgs, "msgs")
    assert main(["data", "pairs", str(cfg), "--adapter", str(adapter), "--samples", "3",
                 "--metric", "regex", "--max-records", "5", "--temperature", "1.5", "--top-p", "0.95"]) == 0
    assert "data pairs: 5 records x 3 samples" in capsys.readouterr().out
    out = tmp / "msgs" / "pairs.jsonl"  # the default: <train.out>/pairs.jsonl
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs
    for r in recs:
        assert r["prompt"][0] == {"role": "system", "content": "be brief"} and r["prompt"][1]["role"] == "user"
        assert [m["role"] for m in r["chosen"] + r["rejected"]] == ["assistant", "assistant"]
    assert main(["data", "check", str(out)]) == 0


def test_same_seed_same_file(setup):
    tmp, adapter, pc, _ = setup
    cfg = load_config(config(tmp, pc, "seed"))
    texts = []
    for seed in (7, 7, 8):
        out = tmp / f"seed-{len(texts)}.jsonl"
        s = make_pairs(cfg, adapter, Sampling(samples=3, metric="regex", seed=seed, max_records=4), out,
                       say=lambda m: None)
        assert s.records == 4 and s.pairs + s.ties + sum(s.skipped.values()) == 4
        texts.append(out.read_text())
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_errors_follow_the_contract(setup, tmp_path, capsys):
    tmp, adapter, pc, _ = setup
    cfg = config(tmp, pc, "err")
    base = ["data", "pairs", str(cfg), "--metric", "exact"]

    def one_line(code, args):
        assert main(args) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("leantune: error: "), err
        return err[0]

    assert "adapter folder not found" in one_line(4, base + ["--adapter", str(tmp_path / "none")])
    assert "--samples" in one_line(2, base + ["--adapter", str(adapter), "--samples", "1"])
    assert "--temperature" in one_line(2, base + ["--adapter", str(adapter), "--temperature", "0"])
    assert one_line(2, ["data", "pairs", str(cfg), "--adapter", str(adapter), "--metric", "bleu"])
    assert "--out" in one_line(2, base + ["--adapter", str(adapter), "--out", str(pc)])
    assert "config file not found" in one_line(2, ["data", "pairs", str(tmp_path / "x.toml"), "--adapter",
                                                   str(adapter), "--metric", "exact"])
    # a JSON metric needs a JSON reference: the record is named (exit 3)
    assert f"{pc}:1" in one_line(3, ["data", "pairs", str(cfg), "--adapter", str(adapter),
                                     "--metric", "json_exact"])
    # preference data is not what pairs are sampled from
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert "holds preference pairs already" in one_line(3, ["data", "pairs", str(config(tmp, pairs, "pref")),
                                                            "--adapter", str(adapter), "--metric", "exact"])
