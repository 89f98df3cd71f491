"""The Triton 8-bit AdamW step against its PyTorch spec, ``train.adamw8bit.adamw8bit_step``.

The kernel is bit-exact by construction (see ``train/triton_adamw8bit.py``), so every check is
``torch.equal`` on the parameter, both code tensors and both absmax tensors, after every step.
Without CUDA the kernel runs under Triton's interpreter on CPU tensors (fp32 and fp16; the
interpreter truncates bf16 stores), on small odd shapes; bf16 on real LoRA shapes is a GPU
test (marked ``gpu``, skipped without CUDA).
"""
import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of the kernel module (triton.jit reads it when decorating)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from leantune.quant import triton_adamw8bit  # noqa: E402
from leantune.quant.adamw8bit import _SIGNED, _UNSIGNED, BLOCK, AdamW8bit, adamw8bit_step, midpoints, quantize_state
from leantune.quant.triton_adamw8bit import adamw8bit_step_triton  # noqa: E402

from tests.helpers import skip_unless_triton_runs  # noqa: E402

skip_unless_triton_runs(triton_adamw8bit._adamw8bit_kernel, "train.triton_adamw8bit")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def zero_states(p):
    """The optimizer's initial states: the codes of 0.0, absmax 0."""
    zeros = torch.zeros_like(p, dtype=torch.float32)
    return [*quantize_state(zeros, _SIGNED.to(p.device)), *quantize_state(zeros, _UNSIGNED.to(p.device))]


def make_grad(shape, gen, dtype=torch.float32):
    """Gradients over many orders of magnitude (finite in ``dtype``); with more than one block,
    a block of zeros (absmax 0), and with more than two a block so small that the second
    moments are subnormal or zero in fp32."""
    g = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 4)
    flat = g.view(-1)
    if flat.numel() > BLOCK:
        flat[:BLOCK] = 0
    if flat.numel() > 2 * BLOCK:
        flat[BLOCK:2 * BLOCK] *= 1e-21
    big = torch.finfo(dtype).max
    return g.clamp(-big, big).to(device=DEVICE, dtype=dtype)


def run_both(shape, dtype, steps, seed=0, **hyper):
    """Run ``steps`` steps of the spec and of the kernel from the same start; assert that p
    and the four state tensors are equal after each."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    ref, tri = [p.clone(), *zero_states(p)], [p.clone(), *zero_states(p)]
    for t in range(1, steps + 1):
        g = make_grad(shape, gen, dtype)
        adamw8bit_step(ref[0], g, *ref[1:], step=float(t), **hyper)
        adamw8bit_step_triton(tri[0], g, *tri[1:], step=float(t), **hyper)
        for name, a, b in zip(("p", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"),
                              ref, tri):
            assert torch.equal(a, b), f"{name} differs at step {t}: {(a.float() - b.float()).abs().max()}"
    return ref


HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
# one element, a block minus/plus one, odd 2-D shapes, several programs with a short tail
SHAPES = [(1,), (255,), (257,), (3, 341), (5, 1031)]
RANDOM_SIZES = torch.randint(2, 3 * BLOCK, (3,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("shape", SHAPES + [(n,) for n in RANDOM_SIZES], ids=str)
def test_step_bit_exact(shape):
    run_both(shape, torch.float32, steps=4, weight_decay=0.1, **HYPER)


def test_step_bit_exact_no_weight_decay_fp16():
    run_both((2, 700), torch.float16, steps=3, weight_decay=0.0, lr=1e-3, betas=(0.8, 0.99), eps=1e-6)


def test_ties_take_the_lower_code():
    """With b1 = 0 the new exp_avg is g itself: put g exactly on the signed map's 255
    midpoints (and 1.0, so absmax is 1); each tie must get the lower of its two codes."""
    mid = midpoints(_SIGNED)
    g = torch.cat([torch.ones(1), mid]).to(DEVICE)
    hyper = dict(lr=1e-3, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0, step=1.0)
    ref, tri = [torch.zeros_like(g), *zero_states(g)], [torch.zeros_like(g), *zero_states(g)]
    adamw8bit_step(ref[0], g, *ref[1:], **hyper)
    adamw8bit_step_triton(tri[0], g, *tri[1:], **hyper)
    lower = torch.cat([torch.tensor([255]), torch.arange(255)]).to(torch.uint8)
    assert torch.equal(tri[1].cpu(), lower) and torch.equal(ref[1].cpu(), lower)
    for a, b in zip(ref, tri):
        assert torch.equal(a, b)


def test_non_contiguous_param():
    """A transposed parameter is stepped in its logical (row-major) order, as the spec does."""
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(300, 5, generator=gen).to(DEVICE).t()
    g = make_grad((5, 300), gen)
    ref, tri = [p.clone(), *zero_states(p)], [p.clone(), *zero_states(p)]
    adamw8bit_step(ref[0], g, *ref[1:], step=1.0, weight_decay=0.1, **HYPER)
    adamw8bit_step_triton(tri[0], g, *tri[1:], step=1.0, weight_decay=0.1, **HYPER)
    assert not tri[0].is_contiguous()
    for a, b in zip(ref, tri):
        assert torch.equal(a, b)


def test_rejects_a_bad_state_layout():
    p = torch.zeros(300, device=DEVICE)
    q, absmax, q2, absmax2 = zero_states(p)
    with pytest.raises(ValueError, match="float32 tensor of 2 values"):
        adamw8bit_step_triton(p, p, q, absmax[:1], q2, absmax2, step=1.0, weight_decay=0.0, **HYPER)


def test_optimizer_backends_agree(monkeypatch):
    """AdamW8bit through the kernel (forced) and through the spec: the same parameters and
    states, a small tensor (fp32 states) beside an 8-bit one."""
    monkeypatch.delenv("LEANTUNE_BACKEND", raising=False)
    assert AdamW8bit([torch.zeros(1)])._step_fn(torch.zeros(1, device=DEVICE)) is (
        adamw8bit_step_triton if CUDA else adamw8bit_step)
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(40, 130, generator=gen), torch.randn(10, generator=gen)]
    grads = [[make_grad(t.shape, gen) for t in init] for _ in range(3)]
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LEANTUNE_BACKEND", backend)
        params = [t.to(DEVICE).requires_grad_(True) for t in init]
        opt = AdamW8bit(params, lr=1e-2, weight_decay=0.01, min_8bit_size=4096)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results.append([*params, *opt.state[params[0]].values(), *opt.state[params[1]].values()])
    assert "exp_avg_q" in opt.state[params[0]] and "exp_avg" in opt.state[params[1]]
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(16, 4096), (14336, 16), (4096, 4096 + 37), (1,)], ids=str)
def test_bf16_real_shapes_bit_exact(shape):
    """LoRA A/B of an 8B model, a full-size odd matrix and one element, bf16 on the GPU."""
    run_both(shape, torch.bfloat16, steps=5, weight_decay=0.1, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
