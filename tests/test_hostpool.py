"""The host memory pool (quant/hostpool.py, csrc/hostpool.c): tensors it hands out behave
like torch.empty's, a freed block is handed out again for its size class, live blocks are
never shared, and the limit and release bound what it keeps."""
from __future__ import annotations

import gc
import os
import platform
import random

import pytest
import torch

from leantune.quant import hostpool

pytestmark = pytest.mark.skipif(not hostpool.enabled(), reason="the host pool does not build here")


def test_empty_is_a_normal_contiguous_tensor():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.float64):
        t = hostpool.empty((300, 517), dtype)
        assert t.shape == (300, 517) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
        t.fill_(3)
        assert bool((t == 3).all())
        x = torch.randn(300, 300)
        if dtype == torch.float32:
            torch.mm(x, torch.randn(300, 517), out=t)  # out= into a pooled tensor
            assert torch.isfinite(t).all()


def test_freed_block_is_reused_and_small_tensors_bypass():
    before = hostpool.stats()
    a = hostpool.empty((1024, 576))
    ptr = a.data_ptr()
    del a
    gc.collect()
    b = hostpool.empty((1024, 576))
    assert b.data_ptr() == ptr
    after = hostpool.stats()
    assert after["hits"] >= before["hits"] + 1
    small = hostpool.empty((10, 10))
    assert hostpool.stats()["misses"] == after["misses"] and hostpool.stats()["hits"] == after["hits"]
    del small, b


def test_size_classes_let_nearby_sizes_share_blocks():
    a = hostpool.empty((1000, 1000))  # 4.0 MB -> the 4 MiB class
    ptr = a.data_ptr()
    del a
    b = hostpool.empty((1040, 1000))  # 4.16 MB, same class
    assert b.data_ptr() == ptr
    c = hostpool.empty((1200, 1000))  # 4.8 MB, the next class: a new block
    assert c.data_ptr() != ptr


def test_live_blocks_are_never_shared():
    """Many live tensors of random sizes, freed in random order while new ones come: each
    keeps its own values."""
    rng = random.Random(0)
    live = {}
    for step in range(400):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            t, v = live.pop(key)
            assert bool((t == v).all()), f"block of tensor {key} was overwritten"
        else:
            n = rng.choice([70_000, 65_536, 100_000, 262_144, 300_000, 1_000_000])
            t = hostpool.empty((n,))
            t.fill_(float(step))
            live[step] = (t, float(step))
    for key, (t, v) in live.items():
        assert bool((t == v).all()), key


def test_autograd_saves_and_frees_pooled_tensors():
    w = torch.randn(576, 300, requires_grad=True)
    x = hostpool.empty((1024, 576))
    x.normal_()
    y = (x @ w).tanh()  # tanh saves its output (not pooled); mm saves the pooled x
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.t() @ (1 - y.detach() ** 2))


def test_limit_and_release_bound_the_cache():
    hostpool.release()
    assert hostpool.stats()["cached_bytes"] == 0
    old = hostpool.stats()["limit_bytes"]
    try:
        hostpool.set_limit(0)
        t = hostpool.empty((512, 1024))
        del t
        assert hostpool.stats()["cached_bytes"] == 0  # over the limit: unmapped at once
        hostpool.set_limit(1 << 30)
        t = hostpool.empty((512, 1024))
        del t
        assert hostpool.stats()["cached_bytes"] >= 512 * 1024 * 4
        assert hostpool.release() >= 512 * 1024 * 4
        assert hostpool.stats()["cached_bytes"] == 0
    finally:
        hostpool.set_limit(old)


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LEANTUNE_HOSTPOOL", "0")
    before = hostpool.stats()
    t = hostpool.empty((1024, 1024))
    after = hostpool.stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert t.shape == (1024, 1024)


def test_varying_shapes_keep_the_pool_under_the_live_high_water_mark():
    """Steps whose shapes change every time (packed batches of varying length) must not grow
    the pool: it maps at most the most bytes ever live at once, however many shapes pass."""
    hostpool.release()
    rng = random.Random(0)
    marks = []
    for step in range(60):
        seq = rng.choice(range(64, 1025, 8))  # a new length nearly every step
        held = [hostpool.empty((4 * seq, 576)) for _ in range(6)]  # a step's activations
        held += [hostpool.empty((seq, 1536 + 64 * rng.randrange(8)))]
        s = hostpool.stats()
        assert s["live_bytes"] + s["cached_bytes"] <= s["peak_live_bytes"]
        del held
        gc.collect()
        marks.append(hostpool.stats()["live_bytes"] + hostpool.stats()["cached_bytes"])
    s = hostpool.stats()
    # after the first steps the footprint stays bounded by the largest step, not the shapes seen
    assert max(marks) <= s["peak_live_bytes"]
    assert s["peak_live_bytes"] <= 7 * 4 * 1024 * 576 * 4 * 1.3 + 1024 * 2048 * 4 * 1.3
    assert s["hits"] > 0


def test_best_fit_reuses_a_slightly_larger_free_block():
    hostpool.release()
    a = hostpool.empty((1200, 1000))  # 4.8 MB class
    ptr = a.data_ptr()
    del a
    gc.collect()
    b = hostpool.empty((1000, 1000))  # 4 MiB class: the free 4.8 MB block is within a quarter
    assert b.data_ptr() == ptr
    del b
    gc.collect()
    c = hostpool.empty((700, 1000))  # far smaller: not handed a block 70% too large
    assert c.data_ptr() != ptr


def _rss_bytes():
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux")
def test_trim_heap_returns_the_holes_left_by_varying_shapes():
    """Freed heap blocks between live ones stay resident until malloc_trim: the trainer's
    per-step trim gives them back (the demo's packed batches change shape every step)."""
    blocks = [torch.ones(15_000 + 7 * i) for i in range(2000)]  # ~60 KB each, from glibc's heap
    keep = blocks[::50]  # live blocks scattered through the heap pin its top
    del blocks
    before = _rss_bytes()
    hostpool.trim_heap()
    after = _rss_bytes()
    assert before - after > 50 * 2**20, (before, after)
    assert all(float(t.sum()) == t.numel() for t in keep)  # the live ones are untouched
