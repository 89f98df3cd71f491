"""The CPU training attention (quant/attention.py) against its float64 spec, SDPA and the model.

Outputs and all three gradients over a grid of shapes (odd lengths, a tail shorter than a
block, grouped and plain heads) and masks (causal, packed documents, preference pairs, a fully
masked row, a bidirectional mask, an additive float mask); fp32 tight, bf16 at most twice
SDPA's bf16 error. Then the choice of backend, and a tiny model whose loss and adapter
gradients are the same with either backend.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leantune.base import UsageError
from leantune.peft_core.adapters import AdapterConfig, inject_adapter
from leantune.peft_core.model import make_attn_mask
from leantune.quant import attention as A
from leantune.quant import dispatch
from tests.helpers import tiny_model

# (B, H, Hkv, T, D): a tail of 5 (< one block), odd lengths past one and two blocks, GQA and not
SHAPES = [(2, 6, 2, 5, 16), (2, 6, 2, 67, 16), (1, 4, 4, 130, 32), (2, 9, 3, 256, 64)]
MASKS = ["causal", "docs", "pairs", "dead_row", "bidirectional", "float", "square_2d"]


@pytest.fixture(autouse=True)
def _gemm_on(monkeypatch):
    """The op under test in every dtype (by default only bf16 runs it; see test_backend_choice)."""
    monkeypatch.setenv(dispatch.ATTENTION_ENV, "1")


def _mask(kind: str, B: int, T: int, gen):
    """(attn_mask, is_causal) of one kind; every mask but "dead_row" keeps a key in each row."""
    if kind == "causal":
        return None, True
    if kind == "docs":  # packed rows: block-diagonal causal
        doc = torch.randint(0, 3, (B, T), generator=gen).sort(dim=1).values
        return make_attn_mask(T, doc_ids=doc), False
    if kind == "pairs":  # a prompt, then two continuations that see the prompt and themselves
        seg = torch.zeros(B, T, dtype=torch.long)
        seg[:, T // 3:] = 1
        seg[:, 2 * T // 3:] = 2
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        q, k = seg[:, :, None], seg[:, None, :]
        return (causal & ((k == 0) | (k == q)))[:, None], False
    if kind == "dead_row":  # a query that may see no key at all
        mask = make_attn_mask(T).expand(B, 1, T, T).clone()
        mask[0, 0, T // 2] = False
        return mask, False
    if kind == "bidirectional":  # keys past the query too (padding-like holes, no causal skip)
        mask = torch.rand(B, 1, T, T, generator=gen) > 0.3
        return mask | torch.eye(T, dtype=torch.bool), False
    if kind == "float":  # additive: causal -inf plus a bias
        bias = torch.randn(1, 1, T, T, generator=gen)
        return bias.masked_fill(~make_attn_mask(T), float("-inf")), False
    if kind == "square_2d":  # a (T, S) mask for every row and head: a sliding window
        return make_attn_mask(T, sliding_window=4)[0, 0], False
    raise ValueError(kind)


def _case(shape, kind):
    B, H, Hkv, T, D = shape
    gen = torch.Generator().manual_seed(T + 7 * H + len(kind))
    q = 2 * torch.randn(B, H, T, D, generator=gen)  # logits of std ~4: peaked rows
    k = 2 * torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    do = torch.randn(B, H, T, D, generator=gen)
    mask, causal = _mask(kind, B, T, gen)
    return (q, k, v, do), mask, causal


def _run(fn, tensors, dtype, mask, causal):
    """Output and (dq, dk, dv) of fn on the tensors cast to dtype."""
    q, k, v, do = (t.to(dtype) for t in tensors)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask, causal)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]


def _ours(q, k, v, mask, causal):
    if dispatch.attention_backend(q, k, v, mask, causal, enable_gqa=True) != "gemm":
        raise AssertionError("the dispatcher did not pick the GEMM attention")
    return A.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _sdpa(q, k, v, mask, causal):
    mask = mask if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_float64_reference(shape, kind):
    tensors, mask, causal = _case(shape, kind)
    want = _run(A.attention_reference, tensors, torch.float64, mask, causal)
    got = _run(_ours, tensors, torch.float32, mask, causal)
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_error_at_most_twice_sdpa(shape, kind):
    tensors, mask, causal = _case(shape, kind)
    want = _run(A.attention_reference, tensors, torch.float64, mask, causal)
    got = _run(_ours, tensors, torch.bfloat16, mask, causal)
    eager = _run(_sdpa, tensors, torch.bfloat16, mask, causal)
    for name, g, e, w in zip(NAMES, got, eager, want):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) <= 2 * _rel(e, w) + 1e-6, (name, _rel(g, w), _rel(e, w))


@pytest.mark.parametrize("additive", [False, True])
def test_fully_masked_row_gives_zeros_like_sdpa(additive):
    """No NaN: a query with no key has output 0 and gradient 0, as SDPA's CPU kernels give."""
    tensors, mask, causal = _case((2, 6, 2, 67, 16), "dead_row")
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    got = _run(_ours, tensors, torch.float32, mask, causal)
    sdpa = _run(_sdpa, tensors, torch.float32, mask, causal)
    row = 67 // 2
    assert got[0][0, :, row].abs().max() == 0 and got[1][0, :, row].abs().max() == 0
    assert sdpa[0][0, :, row].abs().max() == 0 and sdpa[1][0, :, row].abs().max() == 0
    for name, g, s in zip(NAMES, got, sdpa):
        torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("grad", [True, False])
def test_queries_after_a_cache(grad):
    """T new queries against S > T keys (a prompt after a cached prefix, left padding): the
    explicit-mask path without the causal skip, with and without autograd."""
    B, H, Hkv, T, S, D = 2, 6, 2, 7, 19, 16
    gen = torch.Generator().manual_seed(11)
    q, do = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :5] = False
    mask = make_attn_mask(T, S, pad_mask=pad)
    want = _run(A.attention_reference, (q, k, v, do), torch.float64, mask, False)
    if grad:
        got = _run(_ours, (q, k, v, do), torch.float32, mask, False)
    else:
        with torch.no_grad():
            got = [A.attention(q, k, v, attn_mask=mask, enable_gqa=True)]
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("block", [1, 4, 64, 1000])
def test_block_size_does_not_change_the_result(block):
    """The causal loop's block only changes which keys are skipped, not the math."""
    tensors, _, _ = _case((2, 6, 2, 67, 16), "causal")
    q, k, v, do = tensors
    scale = 16 ** -0.5

    def fn(q, k, v, mask, causal):
        return A.AttentionFunction.apply(q, k, v, None, None, True, scale, block)

    got = _run(fn, tensors, torch.float64, None, True)
    want = _run(A.attention_reference, tensors, torch.float64, None, True)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


def test_saves_p_and_no_repeated_keys():
    """What the backward keeps: Q, K, V once each (no per-query-head copies) and P (the causal
    blocks' part of it), in the compute dtype."""
    B, H, Hkv, T, D = 2, 6, 2, 130, 16
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        A.attention(q, k, v, is_causal=True, enable_gqa=True)
    assert all(t.dtype == torch.bfloat16 for t in saved)
    blocks = range(0, T, A.BLOCK)
    p_elems = sum(B * H * (min(t0 + A.BLOCK, T) - t0) * min(t0 + A.BLOCK, T) for t0 in blocks)
    assert sum(t.numel() for t in saved) == q.numel() + k.numel() + v.numel() + p_elems


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(dispatch.ATTENTION_ENV)
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    pick = dispatch.attention_backend
    assert pick(q, k, v, is_causal=True, enable_gqa=True) == "gemm"
    assert pick(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True) == "sdpa"  # fp32: opt-in
    monkeypatch.setenv(dispatch.ATTENTION_ENV, "auto")
    assert pick(q, k, v, is_causal=True, enable_gqa=True) == "gemm"
    assert pick(q, k, v, is_causal=True) == "sdpa"  # GQA not enabled: SDPA raises as it should
    assert pick(q[:, :, :1], k, v, enable_gqa=True) == "sdpa"  # one query: decoding
    with torch.no_grad():  # the same choice without autograd: the same bits (DPO's reference)
        assert pick(q, k, v, is_causal=True, enable_gqa=True) == "gemm"
    assert pick(q.half(), k.half(), v.half(), is_causal=True, enable_gqa=True) == "sdpa"
    assert pick(q, k, v, torch.ones(1, 4, 8, 8, dtype=torch.bool), enable_gqa=True) == "sdpa"  # per head
    assert pick(q, k, v, torch.ones(8, 8, dtype=torch.bool), enable_gqa=True) == "gemm"
    long_k = torch.randn(1, 2, dispatch.ATTENTION_MAX_KEYS + 1, 16, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(8, long_k.shape[2], dtype=torch.bool)
    assert pick(q, long_k, long_k, mask, enable_gqa=True) == "sdpa"
    monkeypatch.setenv(dispatch.ATTENTION_ENV, "1")
    assert pick(q, long_k, long_k, mask, enable_gqa=True) == "gemm"
    assert pick(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True) == "gemm"
    monkeypatch.setenv(dispatch.ATTENTION_ENV, "0")
    assert pick(q, k, v, is_causal=True, enable_gqa=True) == "sdpa"
    monkeypatch.setenv(dispatch.ATTENTION_ENV, "fast")
    with pytest.raises(UsageError, match=dispatch.ATTENTION_ENV):
        pick(q, k, v, is_causal=True, enable_gqa=True)


def test_mask_and_is_causal_together_is_an_error():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="not both"):
        A.attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)


def _model_step(variant, monkeypatch, backend, mask_kind):
    monkeypatch.setenv(dispatch.ATTENTION_ENV, "1" if backend == "gemm" else "0")
    model = tiny_model(variant, seed=3)
    torch.manual_seed(1)
    inject_adapter(model, AdapterConfig(kind="lora", r=4, alpha=8, targets="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    gen = torch.Generator().manual_seed(5)
    B, T = 3, 37
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=gen)
    mask = None
    if mask_kind == "docs":
        doc = torch.randint(0, 3, (B, T), generator=gen).sort(dim=1).values
        mask = make_attn_mask(T, doc_ids=doc)
    calls = []
    real = A.AttentionFunction.apply
    monkeypatch.setattr(A.AttentionFunction, "apply", lambda *a: calls.append(1) or real(*a))
    logits = model(ids, attn_mask=mask)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    assert len(calls) == (model.config.num_hidden_layers if backend == "gemm" else 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return loss.detach(), grads


@pytest.mark.parametrize("mask_kind", ["causal", "docs"])
@pytest.mark.parametrize("variant", ["llama", "llama-tied-gqa", "head-dim"])
def test_model_loss_and_adapter_grads_equal_sdpa(variant, mask_kind, monkeypatch):
    loss0, grads0 = _model_step(variant, monkeypatch, "sdpa", mask_kind)
    loss1, grads1 = _model_step(variant, monkeypatch, "gemm", mask_kind)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys() and grads0
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_no_grad_pass_gives_the_training_bits(monkeypatch):
    """A DPO reference pass (no grad) must equal the policy pass (grad) bit for bit at step 0:
    both run the same forward; decoding (one query) keeps SDPA. bf16: the default choice."""
    monkeypatch.delenv(dispatch.ATTENTION_ENV)
    model = tiny_model("llama-tied-gqa", seed=3, dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (2, 9))
    calls = []
    real = A.AttentionFunction.apply
    monkeypatch.setattr(A.AttentionFunction, "apply", lambda *a: calls.append(1) or real(*a))
    with_grad = model(ids)
    assert len(calls) == model.config.num_hidden_layers
    with torch.no_grad():
        no_grad = model(ids)
        monkeypatch.setattr(A, "attention_forward", None)  # decoding must not reach it
        model(ids[:, :1])
    assert len(calls) == model.config.num_hidden_layers
    assert torch.equal(with_grad.detach(), no_grad)


def test_mask_parts_computed_once_per_mask(monkeypatch):
    """Every layer passes the same mask: its bias is built once, and again only for another
    mask or after the mask changed in place."""
    from leantune.quant import attention as A

    calls = []
    real = A._mask_parts
    monkeypatch.setattr(A, "_mask_parts", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(A, "_LAST_MASK", [])
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    first = A._mask_parts_cached(mask, 6, 6, torch.float32)
    assert A._mask_parts_cached(mask, 6, 6, torch.float32) is first and len(calls) == 1
    mask[1, 0, 5, 0] = False  # in place: the version counter moves
    again = A._mask_parts_cached(mask, 6, 6, torch.float32)
    assert len(calls) == 2 and again[0][1, 0, 5, 0] == float("-inf")
    A._mask_parts_cached(mask.clone(), 6, 6, torch.float32)  # another tensor, equal values
    assert len(calls) == 3
