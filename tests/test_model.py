"""The decoder against an independent float64 reference, transformers, and itself
(KV cache, packing masks, batched generation)."""
import math

import pytest
import torch

from leantune.peft_core.generate import generate
from leantune.peft_core.model import KVCache, make_attn_mask
from tests.helpers import VARIANTS, tiny_config, tiny_model


# -- an independent float64 reference of the same math ------------------------------------
def reference_logits(model, ids):
    """Plain loops over layers and heads in float64: the spec of the decoder."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    inv = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        lo_w = s["original_max_position_embeddings"] / s["low_freq_factor"]
        hi_w = s["original_max_position_embeddings"] / s["high_freq_factor"]
        out = []
        for f in inv.tolist():
            w = 2 * math.pi / f
            if w < hi_w:
                out.append(f)
            elif w > lo_w:
                out.append(f / s["factor"])
            else:
                a = (s["original_max_position_embeddings"] / w - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                out.append((1 - a) * f / s["factor"] + a * f)
        inv = torch.tensor(out, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (T, hd): rotate pairs (i, i + hd/2)
        a, b = x[:, : hd // 2], x[:, hd // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    x = sd["model.embed_tokens.weight"][ids]  # (B, T, C)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
        att = torch.zeros(B, T, nh * hd, dtype=torch.float64)
        for b in range(B):
            for head in range(nh):
                g = head // (nh // nkv)
                qh = rope(q[b, :, head * hd:(head + 1) * hd])
                kh = rope(k[b, :, g * hd:(g + 1) * hd])
                vh = v[b, :, g * hd:(g + 1) * hd]
                scores = qh @ kh.T / math.sqrt(hd)
                for t in range(T):
                    for s_ in range(T):
                        too_old = cfg.sliding_window is not None and t - s_ >= cfg.sliding_window
                        if s_ > t or too_old:
                            scores[t, s_] = -math.inf
                att[b, :, head * hd:(head + 1) * hd] = torch.softmax(scores, -1) @ vh
        x = x + lin(att, p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
        x = x + lin(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    x = rms(x, sd["model.norm.weight"])
    head_w = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return x @ head_w.T


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_float64_reference(variant):
    model = tiny_model(variant, seed=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(ids).double()
    want = reference_logits(model, ids)
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 1e-5, f"{variant}: max relative error {rel:.2e}"


HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.parametrize("variant", ["llama", "llama-tied-gqa", "llama3-rope-scaling",
                                     "llama-bias", "mistral-sliding", "qwen2"])
def test_logits_match_transformers(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    from leantune.peft_core.checkpoint import load_model, save_model

    model = tiny_model(variant, seed=3).eval()
    save_model(model, tmp_path)
    hf_cls = getattr(transformers, HF_CLASSES[model.config.model_type])
    hf = hf_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "mistral-sliding", "qwen2"])
def test_kv_cache_decoding_equals_full_forward(variant):
    model = tiny_model(variant, seed=5).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        steps = [model(ids[:, :4], cache=cache)]
        for t in range(4, 9):
            S = t + 1
            mask = None
            if model.config.sliding_window and S > model.config.sliding_window:
                mask = make_attn_mask(1, S, sliding_window=model.config.sliding_window)
            steps.append(model(ids[:, t:t + 1], attn_mask=mask, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_attend_across_boundaries():
    model = tiny_model("llama", seed=7).eval()
    g = torch.Generator().manual_seed(8)
    a, b = torch.randint(0, 97, (1, 5), generator=g), torch.randint(0, 97, (1, 7), generator=g)
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        got = model(packed, position_ids=pos, attn_mask=make_attn_mask(12, doc_ids=doc_ids))
        want = torch.cat([model(a), model(b)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_one_at_a_time():
    model = tiny_model("llama", seed=9).eval()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    batched = generate(model, prompts, 12)
    for p, row in zip(prompts, batched):
        assert generate(model, [p], 12)[0] == row
    assert len(set(map(tuple, batched))) > 1  # the rows are not trivially the same


def test_rows_that_finish_leave_the_batch_and_the_rest_is_unchanged(monkeypatch):
    """Rows stop at their own EOS at different steps; the finished ones are dropped from the
    batch (and its KV cache) while the others go on exactly as they would alone."""
    from leantune.peft_core.model import KVCache

    model = tiny_model("llama", seed=9).eval()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12], [13], [14, 15, 16], [17, 18, 19, 20, 21]]
    alone = [generate(model, [p], 14)[0] for p in prompts]
    eos = sorted({row[k] for row, k in zip(alone, (1, 2, 3, 5, 8, 13))})  # rows end at different steps
    kept = []
    monkeypatch.setattr(KVCache, "keep", lambda self, rows, orig=KVCache.keep: kept.append(len(rows)) or orig(self, rows))
    batched = generate(model, prompts, 14, eos_token_ids=eos)
    want = [generate(model, [p], 14, eos_token_ids=eos)[0] for p in prompts]
    assert batched == want
    assert len({len(r) for r in want}) > 2 and kept  # rows did end apart, and some left early


def test_generation_matches_manual_greedy_and_stops_at_eos():
    model = tiny_model("qwen2", seed=10).eval()
    ids = [3, 1, 4, 1, 5]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert generate(model, [ids], 8)[0] == seq[5:]
    eos = seq[7]
    out = generate(model, [ids], 8, eos_token_ids=[eos])[0]
    assert out == seq[5:seq.index(eos, 5) + 1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = tiny_model("llama", seed=11).eval()
    a = generate(model, [[1, 2, 3]], 10, temperature=1.0, seed=3)
    b = generate(model, [[1, 2, 3]], 10, temperature=1.0, seed=3)
    assert a == b
    nucleus = generate(model, [[1, 2, 3]], 10, temperature=1.0, top_p=1e-6, seed=4)
    assert nucleus == generate(model, [[1, 2, 3]], 10)


def test_config_rejects_bad_gqa():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config("llama", num_attention_heads=4, num_key_value_heads=3)


def test_swiglu_function_matches_autograd():
    """The memory-saving SwiGLU Function: same value and gradients as silu(g) * u (float64)."""
    from leantune.peft_core.model import SwiGLU

    g = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (g, u))
    dy = torch.randn(3, 5, 7, dtype=torch.float64)
    want = torch.autograd.grad(torch.nn.functional.silu(g) * u, (g, u), dy)
    got = torch.autograd.grad(SwiGLU.apply(g, u), (g, u), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_repeat_kv_is_repeat_interleave_on_the_head_axis():
    # the GPU attention path expands kv heads with it (no host sync inside a CUDA graph)
    from leantune.peft_core.model import _repeat_kv

    t = torch.randn(2, 3, 5, 4)
    for rep in (1, 2, 4):
        assert torch.equal(_repeat_kv(t, rep), t.repeat_interleave(rep, dim=1))


def test_a_shared_prefix_is_prefilled_once_with_the_same_outputs(monkeypatch):
    """Few-shot prompts share their examples: the prefix runs once (batch 1) and its keys and
    values are copied to every row; outputs equal each prompt generated alone."""
    from leantune.peft_core import generate as gen

    model = tiny_model("llama", seed=12).eval()
    shots = list(range(1, 40))
    prompts = [shots + [50, 51, 52], shots + [60], shots + [70, 71, 72, 73, 74], shots + [80, 81]]
    assert gen.shared_prefix(prompts) == 39 and gen.shared_prefix(prompts[:1]) == 0
    assert gen.shared_prefix([[1] * 20, [1] * 20]) == 19  # a row keeps a token of its own
    alone = [generate(model, [p], 10)[0] for p in prompts]
    seen = []
    orig = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda ids, *a: seen.append(tuple(ids.shape)) or orig(ids, *a))
    assert generate(model, prompts, 10) == alone
    assert seen[0] == (1, 39) and seen[1] == (4, 5)  # the prefix once, then the padded suffixes
