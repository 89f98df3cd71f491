"""Reliability (issue 9): security: no pickle in the engine or its outputs, nothing written
outside the output folder, sandboxed chat templates, adapter config edge values. Rows of
docs/reliability.md."""
from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from leantune.peft_core.safetensors_io import read_safetensors, write_safetensors
from tests.test_train_loop import ROOT
from tests.reliability_helpers import (  # noqa: F401  (fixtures are imported by name)
    assert_contract, base, fuzz_dir, monkeypatch_module, one_thread, run_cli)


# ------------------------------------------------------------------------------------------
# 7. security: no pickle, nothing outside the output folder, sandboxed chat templates
# ------------------------------------------------------------------------------------------
ENGINE = ["peft_core", "quant", "train", "eval", "base.py", "cli.py", "demo.py", "__init__.py"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _engine_sources():
    for pkg in ENGINE:
        for path in [ROOT / pkg] if pkg.endswith(".py") else sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_engine_code_never_unpickles_or_executes_code():
    """AST scan of the engine: no pickle-family import; torch.load only with
    weights_only=True; np.load never with allow_pickle=True; no eval/exec/compile/__import__;
    importlib only for the bundled LoRA variants (and the reward function a GRPO config names
    explicitly); no trust_remote_code."""
    problems = []
    for path, tree in _engine_sources():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func.endswith("torch.load") or func == "load" and "weights_only" in kw:
                if kw.get("weights_only") != "True":
                    problems.append(f"{rel}:{node.lineno}: {func} without weights_only=True")
            if func in ("np.load", "numpy.load") and kw.get("allow_pickle", "False") != "False":
                problems.append(f"{rel}:{node.lineno}: np.load with allow_pickle")
            if func in ("eval", "exec", "compile", "__import__", "execfile"):
                problems.append(f"{rel}:{node.lineno}: calls {func}")
            if func == "importlib.import_module":
                arg = ast.unparse(node.args[0])
                lazy_api = rel == Path("__init__.py") and arg == "module"  # the constant _API table
                # GRPO's train.reward_fn: the user's own function, run only when the config names it
                reward_fn = rel == Path("train/rewards.py") and arg == "module"
                if "peft_core.variants" not in arg and not lazy_api and not reward_fn:
                    problems.append(f"{rel}:{node.lineno}: imports a module named at run time")
            if "trust_remote_code" in kw:
                problems.append(f"{rel}:{node.lineno}: trust_remote_code")
    assert not problems, "\n".join(problems)


def test_outputs_hold_no_pickle(base):
    """Everything a run writes is safetensors, JSON or a plain .npy array (no object arrays)."""
    import numpy as np

    allowed = (".safetensors", ".json", ".jsonl", ".npy", ".jinja")
    for path in sorted(base["ref"].rglob("*")):
        if path.is_file():
            assert path.name.endswith(allowed), path
            if path.suffix == ".npy":
                np.load(path, allow_pickle=False)


class _Bomb:
    """Unpickling this creates the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_never_loaded(fuzz_dir, tmp_path):
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_Bomb(marker))
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    shutil.copy(fuzz_dir / "adapter" / "adapter_config.json", adapter)
    (adapter / "adapter_model.bin").write_bytes(bomb)
    code, _, err = run_cli(["generate", fuzz_dir / "model", "--adapter", adapter, "--prompt", "the",
                            "--max-new-tokens", "1"])
    assert_contract(code, err, {4})
    assert "adapter_model.bin is not supported" in err
    model = tmp_path / "pickled-model"
    shutil.copytree(fuzz_dir / "model", model)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(bomb)
    code, _, err = run_cli(["generate", model, "--prompt", "the", "--max-new-tokens", "1"])
    assert_contract(code, err, {4})
    assert not marker.exists()


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_names_from_files_cannot_write_outside_the_output_folder(fuzz_dir, tmp_path):
    """Adapter tensor names and config fields, GGUF metadata and checkpoint state with
    ``../`` in them: refused or ignored, and nothing is written outside the output folder."""
    outside = _tree(tmp_path)
    adapter = tmp_path / "sneaky-adapter"
    shutil.copytree(fuzz_dir / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../../../escaped"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["merge", fuzz_dir / "model", adapter, tmp_path / "merged"])
    assert code == 0, err
    assert _tree(tmp_path / "merged") == {"config.json", "model.safetensors", "tokenizer.json",
                                          "tokenizer_config.json"}
    tensors = read_safetensors(adapter / "adapter_model.safetensors")
    write_safetensors({"base_model.model.../../../escaped.lora_A.weight": torch.zeros(2, 64), **tensors},
                      adapter / "adapter_model.safetensors")
    code, _, err = run_cli(["merge", fuzz_dir / "model", adapter, tmp_path / "merged-2"])
    assert_contract(code, err, {4})
    assert "unexpected tensor" in err and not (tmp_path / "merged-2").exists()
    assert not list(tmp_path.parent.rglob("escaped*")) and not list(fuzz_dir.rglob("escaped*"))
    assert _tree(tmp_path) - outside == {"sneaky-adapter", "merged"} | {f"sneaky-adapter/{f}" for f in (
        "adapter_config.json", "adapter_model.safetensors")} | {f"merged/{f}" for f in _tree(tmp_path / "merged")}


def test_gguf_tensor_names_cannot_escape(tmp_path):
    """A GGUF tensor named ``../../../escaped``: import-gguf writes the four files of the
    folder and nothing else, anywhere."""
    pytest.importorskip("gguf")
    import numpy as np

    from tests.test_gguf_import import write_tiny_gguf

    path = tmp_path / "sneaky.gguf"
    write_tiny_gguf(path, extra_tensors={"../../../escaped": np.zeros(32, np.float32)})
    before = _tree(tmp_path)
    code, _, err = run_cli(["import-gguf", path, tmp_path / "out" / "sneaky"])
    assert_contract(code, err, {0, 4})
    new = _tree(tmp_path) - before
    assert new <= {"out", "out/sneaky"} | {f"out/sneaky/{f}" for f in (
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}, new
    assert not list(tmp_path.parent.rglob("escaped*"))


ADAPTER_EDGES = {  # adapter_config.json key -> a value that once crashed or could
    "exclude_modules": [5, "(", [1]], "layers_to_transform": [[1.5], "0"], "rank_pattern": [{"q_proj": True}, [1]],
    "lora_alpha": [float("nan"), 0], "r": [10**12, 0, 2.5], "target_modules": [[""], "(?<=x)", {}],
    "alpha_pattern": [{"(": 2}], "init_lora_weights": [["x"], "corda"], "peft_type": [None, "IA3"],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in ADAPTER_EDGES.items() for v in vs])
def test_adapter_config_edge_values(fuzz_dir, tmp_path, key, value):
    d = tmp_path / "adapter"
    shutil.copytree(fuzz_dir / "adapter", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
    code, _, err = run_cli(["generate", fuzz_dir / "model", "--adapter", d, "--prompt", "the",
                            "--max-new-tokens", "1"])
    assert_contract(code, err, {0, 4})


SSTI = {  # template -> what it tries
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "walk to object's subclasses",
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER') }}": "reach os through a global's __globals__",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}": "reach os through lipsum",
    "{% for m in messages %}{{ m.update({'role': 'x'}) }}{% endfor %}": "mutate the caller's messages",
    "{{ messages.__class__.__base__.__subclasses__() }}": "walk from the messages list",
    "{{ raise_exception.__globals__ }}": "read the renderer's globals",
}


@pytest.mark.parametrize("template", list(SSTI))
def test_chat_templates_cannot_reach_python(fuzz_dir, tmp_path, template):
    """A model folder whose chat template tries to escape the Jinja sandbox: generate --chat
    and train on chat data stop with one line (exit 3: the template failed on the data)
    and nothing runs."""
    marker = tmp_path / "MARKER"
    model = tmp_path / "evil-model"
    shutil.copytree(fuzz_dir / "model", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template.replace("MARKER", str(marker))
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(["generate", model, "--chat", "hi", "--max-new-tokens", "1"])
    assert_contract(code, err, {2, 3})
    config = tmp_path / "evil.toml"
    config.write_text(f'[model]\npath = "{model}"\nquant = "none"\n[adapter]\nkind = "none"\n'
                      f'[data]\ntrain = "{fuzz_dir / "good.jsonl"}"\n[train]\nout = "{tmp_path / "run"}"\n'
                      'max_steps = 1\n')
    code, _, err = run_cli(["train", config])
    assert_contract(code, err, {3})
    assert "chat template" in err
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["--prompt", ""], ["--chat", "hi"]], ids=["empty-prompt", "empty-template"])
def test_a_prompt_with_no_tokens_is_a_usage_error(fuzz_dir, tmp_path, argv):
    """An empty --prompt, or a chat template that renders nothing: exit 2, one line."""
    model = tmp_path / "model"
    shutil.copytree(fuzz_dir / "model", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ '' }}"}))
    code, _, err = run_cli(["generate", model, *argv, "--max-new-tokens", "1"])
    assert_contract(code, err, {2})
    assert "the prompt is empty" in err

