"""Checkpoint I/O: round trips, shards, memory, and one-line errors for bad folders."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leantune.peft_core.checkpoint import load_model, save_model
from leantune.base import ModelError
from leantune.peft_core.safetensors_io import SafetensorsFile, write_safetensors
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "leantune", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip(tmp_path, dtype):
    model = tiny_model("qwen2", seed=1, dtype=dtype)
    save_model(model, tmp_path)
    back = load_model(tmp_path, dtype=dtype)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_model("llama-tied-gqa")
    save_model(model, tmp_path)
    keys = SafetensorsFile(tmp_path / "model.safetensors").keys()
    assert "lm_head.weight" not in keys
    back = load_model(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_sharded_checkpoint(tmp_path):
    model = tiny_model("llama", seed=2)
    sd = model.state_dict()
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        write_safetensors({k: sd[k] for k in keys}, tmp_path / fname)
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    back = load_model(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_load_converts_dtype(tmp_path):
    model = tiny_model("llama", seed=3)
    save_model(model, tmp_path, dtype=torch.bfloat16)
    back = load_model(tmp_path, dtype=torch.float32)
    w = back.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.model.layers[0].mlp.up_proj.weight.bfloat16().float())


def test_bf16_load_peak_memory(tmp_path):
    """Loading a bf16 checkpoint into bf16 peaks at <= 1.2x its size above the baseline."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=8192,
               hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
               num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": (8192, 1024), "lm_head.weight": (8192, 1024),
               "model.norm.weight": (1024,)}
    for i in range(6):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": (1024, 1024), p + "self_attn.k_proj.weight": (256, 1024),
                        p + "self_attn.v_proj.weight": (256, 1024), p + "self_attn.o_proj.weight": (1024, 1024),
                        p + "mlp.gate_proj.weight": (2816, 1024), p + "mlp.up_proj.weight": (2816, 1024),
                        p + "mlp.down_proj.weight": (1024, 2816), p + "input_layernorm.weight": (1024,),
                        p + "post_attention_layernorm.weight": (1024,)})
    data = {k: torch.randn(s, generator=g).bfloat16() for k, s in tensors.items()}
    write_safetensors(data, tmp_path / "model.safetensors")
    del data
    size = (tmp_path / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import torch, resource
        from leantune.peft_core.checkpoint import load_model
        def rss(field):
            for line in open('/proc/self/status'):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        base = rss('VmRSS:')
        m = load_model({str(tmp_path)!r}, dtype=torch.bfloat16)
        print(base, rss('VmHWM:'))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.split()
    base, peak = int(out[0]), int(out[1])
    assert peak - base <= 1.2 * size, f"peak {peak - base} bytes above baseline for a {size}-byte checkpoint"


# -- errors: one line, exit status 4 -------------------------------------------------------
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)
    model = tiny_model("llama")
    save_model(model, tmp_path)
    os.unlink(tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor(tmp_path):
    model = tiny_model("llama")
    save_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"mlp.gate_proj.weight' has shape \[112, 64\]"):
        load_model(tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    model = tiny_model("llama")
    save_model(model, tmp_path)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelError, match="truncated"):
        load_model(tmp_path)
    path.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    with pytest.raises(ModelError, match="header claims"):
        load_model(tmp_path)
    path.write_bytes(raw[:8] + b"{" * (len(raw) - 8))
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        load_model(tmp_path)


def test_cli_reports_model_errors_in_one_line(tmp_path):
    model = tiny_model("llama")
    save_model(model, tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-10])
    (tmp_path / "tokenizer.json").write_text("{}")
    res = run_cli("generate", tmp_path, "--prompt", "hi")
    assert res.returncode == 4, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leantune: error: "), res.stderr
    assert "Traceback" not in res.stderr


def test_cli_usage_errors_exit_2():
    res = run_cli("generate")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    res = run_cli("no-such-command")
    assert res.returncode == 2 and res.stderr.startswith("leantune: error:")
