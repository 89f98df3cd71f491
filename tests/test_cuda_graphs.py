"""CUDA graphs of the decoder trunk (train/cuda_graphs.py).

On the CPU the bookkeeping runs with a capture that records its calls and returns the module
itself (so a "replay" is the eager trunk): one capture per input signature, the cap, eval and
no-grad bypasses, a failed capture falling back to eager. On a GPU (``-m gpu``) real captures
are checked against eager training steps: losses and adapter weights after three steps.
"""
from __future__ import annotations

import pytest
import torch

from leantune.bench import e2e
from leantune.peft_core.adapters import AdapterConfig, inject_adapter
from leantune.peft_core.checkpoint import load_model
from leantune.base import UsageError
from leantune.peft_core.model import make_attn_mask
from leantune.train.config import load_config
from leantune.train.cuda_graphs import GraphedTrunk
from leantune.train.loop import batch_loss_sum


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return e2e.write_random_model(tmp_path_factory.mktemp("graphs") / "tiny", "tiny", seed=0)


def _qlora(tiny_dir, device="cpu", seed=0):
    torch.manual_seed(seed)
    model = load_model(tiny_dir, dtype=torch.float32, device=device, quant="nf4")
    inject_adapter(model, AdapterConfig(r=4, alpha=8, targets="all-linear", init="gaussian"))
    model.train()
    return model


def _batch(B, T, device="cpu", docs=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (B, T), generator=g).to(device)
    doc = torch.zeros_like(ids)
    if docs:
        doc[:, T // 2:] = 1
    return {"input_ids": ids, "labels": ids, "doc_ids": doc,
            "position_ids": torch.arange(T, device=device).expand(B, T)}


class Recorder:
    """A capture that records its calls; the 'graph' it returns is the module itself."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def __call__(self, module, sample_args, warmup, pool):
        self.calls.append([tuple(a.shape) for a in sample_args])
        self.samples = sample_args
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        return module


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_capture_per_signature_and_replays_compute_the_eager_trunk(tiny_dir):
    model = _qlora(tiny_dir)
    rec, said = Recorder(), []
    trunk = GraphedTrunk(model.model, said.append, capture=rec, devices=("cpu",), max_graphs=2)
    b1, b2 = _batch(2, 16), _batch(2, 16, seed=2)
    for b in (b1, b2, b1):
        loss_g, n_g = batch_loss_sum(model, b, 8, trunk)
        loss_g.backward()
        grads_g = _grads(model)
        model.zero_grad(set_to_none=True)
        loss_e, n_e = batch_loss_sum(model, b, 8)
        loss_e.backward()
        assert n_g == n_e and torch.equal(loss_g, loss_e)
        grads_e = _grads(model)
        assert grads_g.keys() == grads_e.keys() and len(grads_g) > 0
        assert all(torch.equal(grads_g[k], grads_e[k]) for k in grads_e)
        model.zero_grad(set_to_none=True)
    assert rec.calls == [[(2, 16), (2, 16)]] and trunk.replays == 3  # one shape: one capture
    assert rec.samples[0].data_ptr() != b1["input_ids"].data_ptr()  # static copies, not aliases
    # a packed batch (a document mask) is another signature
    batch_loss_sum(model, _batch(2, 16, docs=True), 8, trunk)
    assert rec.calls[-1] == [(2, 16), (2, 16), (2, 1, 16, 16)] and len(trunk.graphs) == 2
    # the cap: a third shape runs eagerly, said once
    for _ in range(2):
        batch_loss_sum(model, _batch(1, 12), 8, trunk)
    assert len(rec.calls) == 2 and sum("run eagerly" in s for s in said) == 1
    # eval and no-grad run eagerly, with no capture
    with torch.no_grad():
        trunk(b1["input_ids"], b1["position_ids"])
    model.eval()
    trunk(b1["input_ids"], b1["position_ids"])
    assert len(rec.calls) == 2 and trunk.replays == 4


def test_a_failed_capture_is_said_once_and_the_run_goes_on_eagerly(tiny_dir):
    model = _qlora(tiny_dir)
    rec, said = Recorder(fail=True), []
    trunk = GraphedTrunk(model.model, said.append, capture=rec, devices=("cpu",))
    b = _batch(2, 16)
    for _ in range(2):
        loss, _ = batch_loss_sum(model, b, 8, trunk)
    expected, _ = batch_loss_sum(model, b, 8)
    assert torch.equal(loss, expected)
    assert len(rec.calls) == 1 and trunk.failed.startswith("RuntimeError: operation not permitted")
    assert "more detail" not in trunk.failed
    assert len(said) == 1 and "capture failed" in said[0] and trunk.replays == 0


def test_off_the_listed_devices_nothing_is_captured(tiny_dir):
    model = _qlora(tiny_dir)
    rec = Recorder()
    trunk = GraphedTrunk(model.model, capture=rec)  # devices: cuda only
    batch_loss_sum(model, _batch(2, 16), 8, trunk)
    assert rec.calls == [] and trunk.replays == 0


@pytest.mark.parametrize("other", ["fsdp", "grad_checkpoint"])
def test_config_refuses_graphs_with(other, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nout = \"run\"\n")
    with pytest.raises(UsageError) as e:
        load_config(path, ["train.cuda_graphs=true", f"train.{other}=true"])
    assert e.value.where.endswith("train.cuda_graphs") and other in e.value.what
    assert load_config(path, ["train.cuda_graphs=true"]).train.cuda_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_training_steps_match_eager_steps_on_gpu(tiny_dir):
    runs = {}
    for graphs in (False, True):
        model = _qlora(tiny_dir, "cuda")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
        said = []
        trunk = GraphedTrunk(model.model, said.append) if graphs else None
        losses = []
        for step in range(4):
            b = _batch(2, 32, "cuda", docs=step % 2 == 1, seed=step % 2)
            loss, n = batch_loss_sum(model, b, 16, trunk)
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        if graphs:
            assert trunk.failed is None, said
            assert len(trunk.graphs) == 2 and trunk.replays == 4
        runs[graphs] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()
                                 if p.requires_grad})
    (le, we), (lg, wg) = runs[False], runs[True]
    assert lg == pytest.approx(le, rel=1e-5)
    for n in we:
        torch.testing.assert_close(wg[n], we[n], rtol=1e-4, atol=1e-6, msg=n)


def test_mask_helper_is_what_the_loss_builds():
    # the signature test above relies on a packed batch carrying a (B, 1, T, T) mask
    m = make_attn_mask(16, doc_ids=_batch(2, 16, docs=True)["doc_ids"])
    assert m.shape == (2, 1, 16, 16) and not bool(m[0, 0, 12, 3])
