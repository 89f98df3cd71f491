"""Training building blocks against straightforward references: chunked cross-entropy,
schedules, the 8-bit AdamW, and the config parser's errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from leantune.base import UsageError
from leantune.quant.chunked_ce import causal_lm_targets, chunked_cross_entropy, cross_entropy_reference
from leantune.train.config import Config, apply_dict, load_config, parse_override
from leantune.train.schedule import lr_factor


@pytest.mark.parametrize("n,chunk", [(1, 4), (37, 8), (64, 64), (100, 1024)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_chunked_ce_equals_full_loss_and_grads(n, chunk, dtype, tol):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 24, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(53, 24, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 53, (n,), generator=g)
    got = chunked_cross_entropy(h, w, y, chunk)
    (gh, gw) = torch.autograd.grad(got * 0.7, (h, w))
    want = F.cross_entropy(h.double() @ w.double().T, y, reduction="sum")
    (wh, ww) = torch.autograd.grad(want * 0.7, (h, w))
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want)))
    torch.testing.assert_close(gh.double(), wh.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(gw.double(), ww.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(cross_entropy_reference(h, w, y).double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunked_ce_half_precision_matches_upcast_logits(dtype):
    """Half inputs: head products in that dtype, logits upcast to fp32 (what transformers does)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(45, 32, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(70, 32, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, 70, (45,), generator=g)
    got = chunked_cross_entropy(h, w, y, 16)
    gh, gw = torch.autograd.grad(got, (h, w))
    want = F.cross_entropy((h @ w.T).float(), y, reduction="sum")
    wh, ww = torch.autograd.grad(want, (h, w))
    assert got.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gh.float(), wh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), ww.float(), rtol=2e-2, atol=2e-2)


def test_chunked_ce_frozen_head_and_empty():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8)
    loss = chunked_cross_entropy(h, w, torch.randint(0, 11, (5,)), 2)
    loss.backward()
    assert h.grad is not None
    empty = chunked_cross_entropy(torch.zeros(0, 8, requires_grad=True), w, torch.zeros(0, dtype=torch.long))
    assert float(empty) == 0.0


def test_targets_mask_document_boundaries():
    labels = torch.tensor([[1, 2, 3, 4, 5, -100]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert causal_lm_targets(labels, doc_ids).tolist() == [[2, 3, -100, 5, -100]]


def test_schedules():
    assert lr_factor(0, 10, 2, "cosine") == 0.5 and lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert math.isclose(lr_factor(6, 10, 2, "cosine"), 0.5)
    assert math.isclose(lr_factor(6, 10, 2, "linear"), 0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_adamw8bit_tracks_fp32_adamw():
    from leantune.quant.adamw8bit import AdamW8bit

    torch.manual_seed(0)
    target = torch.randn(64, 128)
    p32 = torch.zeros(64, 128, requires_grad=True)
    p8 = torch.zeros(64, 128, requires_grad=True)
    o32 = torch.optim.AdamW([p32], lr=1e-2, weight_decay=0.01)
    o8 = AdamW8bit([p8], lr=1e-2, weight_decay=0.01)
    for _ in range(50):
        for p, o in ((p32, o32), (p8, o8)):
            loss = ((p - target) ** 2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
    assert "exp_avg_q" in o8.state[p8] and o8.state[p8]["exp_avg_q"].dtype == torch.uint8
    rel = (p8 - p32).norm() / p32.norm()
    # bitsandbytes' AdamW8bit drifts 3.95% from fp32 AdamW on this very problem
    assert rel < 0.05, rel
    # small tensors keep fp32 states: then the update is exactly AdamW's
    a, b = torch.zeros(10, requires_grad=True), torch.zeros(10, requires_grad=True)
    oa, ob = torch.optim.AdamW([a], lr=0.1, weight_decay=0.1), AdamW8bit([b], lr=0.1, weight_decay=0.1)
    for _ in range(5):
        for p, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((p - 1) ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- config --------------------------------------------------------------------------------
def test_config_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nlr = 1e-3\nbatch_size = 2\n[adapter]\ntargets = ["q_proj", "v_proj"]\n')
    cfg = load_config(p, ["train.max_steps=7", "model.quant=none", "data.pack=false"])
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 2 and cfg.train.max_steps == 7
    assert cfg.model.quant == "none" and cfg.data.pack is False
    assert cfg.adapter.targets == ["q_proj", "v_proj"] and cfg.adapter.r == 16


@pytest.mark.parametrize("data,match", [
    ({"trian": {}}, r"\[trian\]: unknown section \(did you mean 'train'\?\)"),
    ({"train": {"learning_rate": 1}}, r"train.learning_rate: unknown key"),
    ({"train": {"lrr": 1}}, r"did you mean 'lr'"),
    ({"train": {"batch_size": "4"}}, r"train.batch_size: expected an integer"),
    ({"train": {"batch_size": 0}}, r"train.batch_size: must be positive"),
    ({"model": {"quant": "nf5"}}, r"model.quant: must be one of nf4, fp4, none.*did you mean 'nf4'"),
    ({"data": {"pack": "yes"}}, r"data.pack: expected true or false"),
    ({"adapter": {"dropout": 1.5}}, r"adapter.dropout: must be in"),
])
def test_config_errors_name_the_key(data, match):
    with pytest.raises(UsageError, match=match):
        apply_dict(Config(), data, "")


def test_config_file_errors(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UsageError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(UsageError, match="expected section.key=value"):
        parse_override("lr=3")


def test_adamw8bit_matches_bitsandbytes_trajectory():
    bnb = pytest.importorskip("bitsandbytes")
    from leantune.quant.adamw8bit import AdamW8bit

    torch.manual_seed(0)
    target = torch.randn(64, 128)
    out = []
    for cls in (AdamW8bit, bnb.optim.AdamW8bit):
        p = torch.zeros(64, 128, requires_grad=True)
        o = cls([p], lr=1e-2, weight_decay=0.01)
        for _ in range(50):
            o.zero_grad()
            ((p - target) ** 2).mean().backward()
            o.step()
        out.append(p.detach())
    assert (out[0] - out[1]).norm() / out[1].norm() < 0.01


def test_batch_loss_sum_with_and_without_a_host_plan_match_a_direct_loss():
    """``train.loop.batch_loss_sum``: its host-planned rows (``prepare_batch``) and the plan
    made from the batch itself give the loss of a plain float64 next-token cross-entropy over
    the supervised positions (masked labels and packed-document boundaries skipped)."""
    from types import SimpleNamespace

    from leantune.train.loop import batch_loss_sum, loss_plan, prepare_batch

    g = torch.Generator().manual_seed(7)
    B, T, C, V = 3, 9, 16, 29
    emb = torch.randn(V, C, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(C, V, bias=False).double()
    trunk = lambda ids, pos, mask: emb[ids] * (1 + pos[..., None]) / T  # noqa: E731  (depends on pos)
    model = SimpleNamespace(model=trunk, lm_head=head)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 6:] = -100  # padding
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[1, 5:] = 1  # two packed documents: position 4 predicts nothing
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, 5:] -= 5
    batch = {"input_ids": ids, "labels": labels, "doc_ids": doc_ids, "position_ids": pos}
    logits = head(trunk(ids, pos, None))[:, :-1]
    keep = [(b, t) for b in range(B) for t in range(T - 1)
            if labels[b, t + 1] != -100 and doc_ids[b, t + 1] == doc_ids[b, t]]
    want = sum(F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum") for b, t in keep)
    plan = loss_plan(batch)
    assert plan.multi_doc and plan.n_tok == len(keep) == B * (T - 1) - 3 - 3 - 1  # prompt, padding, boundary
    for b in (batch, prepare_batch(batch, "cpu")):
        got, n = batch_loss_sum(model, b, chunk=5)
        assert n == len(keep)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
