"""``model.path = "org/name"``: the snapshot in the local Hugging Face cache, never a download
(issue 21)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from leantune.base import ModelError
from leantune.cli import main
from leantune.peft_core.build import hub_cache_dir, resolve_model_dir
from leantune.train.config import load_config


def fake_cache(root, repo_id="org/tiny", revs=("aaa", "bbb"), main_rev="aaa"):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for rev in revs:
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text("{}")
    if main_rev:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(main_rev + "\n")
    return repo


@pytest.fixture
def no_hf_env(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_cache_dir_order(no_hf_env, monkeypatch, tmp_path):
    assert hub_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert hub_cache_dir() == tmp_path / "hc"


def test_refs_main_names_the_snapshot(no_hf_env, monkeypatch, tmp_path):
    repo = fake_cache(tmp_path / "hc", revs=("aaa", "bbb"), main_rev="aaa")
    os.utime(repo / "snapshots" / "aaa", (1, 1))  # older, yet refs/main names it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert resolve_model_dir("org/tiny") == repo / "snapshots" / "aaa"


def test_without_refs_the_newest_snapshot(no_hf_env, tmp_path):
    repo = fake_cache(tmp_path / "home" / ".cache" / "huggingface" / "hub", main_rev=None)
    os.utime(repo / "snapshots" / "aaa", (1, 1))
    assert resolve_model_dir("org/tiny") == repo / "snapshots" / "bbb"


def test_an_existing_folder_wins(no_hf_env, monkeypatch, tmp_path):
    fake_cache(tmp_path / "hc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert resolve_model_dir("org/tiny") == Path("org/tiny")


def test_config_keeps_a_repo_id(no_hf_env, tmp_path):
    (tmp_path / "c.toml").write_text('[model]\npath = "org/tiny"\n[train]\nout = "o"\n')
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.model.path == "org/tiny"
    assert cfg.train.out == str(tmp_path / "o")


def test_absent_is_one_line_exit_4(no_hf_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="never downloads") as e:
        resolve_model_dir("org/missing")
    assert str(tmp_path / "hf" / "hub" / "models--org--missing") in str(e.value)
    (tmp_path / "c.toml").write_text('[model]\npath = "org/missing"\n[data]\ntrain = "t.jsonl"\n'
                                     '[train]\nout = "o"\n')
    (tmp_path / "t.jsonl").write_text('{"text": "hi"}\n')
    assert main(["train", str(tmp_path / "c.toml")]) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "never downloads" in err and "models--org--missing" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["generate", "org/tiny", "--prompt", "hi", "--max-new-tokens", "2"],
                                  ["export-gguf", "org/tiny", "OUT.gguf"]])
def test_model_dir_arguments_of_the_cli_resolve_from_the_cache(no_hf_env, monkeypatch, tmp_path, capsys, argv):
    from tests.helpers import tiny_model_dir

    repo = tmp_path / "hc" / "models--org--tiny"
    tiny_model_dir(repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert main(argv) == 0
    if argv[0] == "export-gguf":
        assert (tmp_path / "OUT.gguf").stat().st_size > 0


def test_a_missing_cli_model_says_where_it_looked(no_hf_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hc"))
    assert main(["generate", "org/none", "--prompt", "hi"]) == 4
    err = capsys.readouterr().err
    assert "never downloads" in err and str(tmp_path / "hc") in err
