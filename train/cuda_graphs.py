"""CUDA graphs for the decoder trunk: one replay each way instead of thousands of launches.

A QLoRA step of a 1B Llama on a GPU runs about 2000 small kernels (per linear: a dequantize,
a GEMM and the LoRA products, each way; norms, RoPE, SwiGLU, attention). Measured on an H100
(2026-11-23, ``bench/results/logs/*profile*``), the CPU time spent issuing them (Python,
autograd, the dispatcher, Triton's launcher) was larger than the GPU time, for leantune and
for transformers + PEFT + bitsandbytes alike: both steps were launch-bound.

``GraphedTrunk`` replays the trunk (embeddings, blocks, final norm: ``model.model``) as two
CUDA graphs, its forward and its backward, through ``torch.cuda.make_graphed_callables``:

- one capture per input signature (the shapes and dtypes of input_ids, position_ids and the
  attention mask, if any). A capture costs ``warmup`` forward+backward passes plus one more;
  later steps of that shape replay. At most ``max_graphs`` signatures are kept; a step of a
  new shape after that runs eagerly (said once). Packed data (``data.pack``) has one shape.
- what stays eager: the head and the chunked cross-entropy (they take only the supervised
  rows, a data-dependent shape), the optimizer, clipping and the collectives of data-parallel
  runs. Gradients reach the LoRA parameters through autograd as usual (accumulation works).
- the graphs share one memory pool, which holds the trunk's activations between steps
  (about what one eager step peaks at).
- a capture that fails (an op that cannot be captured) is said in one line; the run goes on
  eagerly. Off the GPU, in eval or without grad, the trunk runs eagerly.

``[train] cuda_graphs = true`` turns it on (off by default). It is refused with ``fsdp`` (the
sharded blocks all-gather inside the forward) and ``grad_checkpoint`` (its recompute reads
the RNG state, which a capture cannot). Replays compute what the eager trunk computes, with
the same kernels; ``tests/test_cuda_graphs.py`` checks the bookkeeping on the CPU and, on a
GPU, losses and adapter weights against eager steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class _Trunk(nn.Module):
    """A fresh wrapper a capture patches (``make_graphed_callables`` replaces its forward)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, attn_mask=None):
        return self.decoder(input_ids, position_ids, attn_mask)


def capture_cuda(module: nn.Module, sample_args: tuple, warmup: int, pool):
    """The graphed callable of ``module`` for inputs like ``sample_args`` (CUDA)."""
    torch.cuda.synchronize()
    fn = torch.cuda.make_graphed_callables(module, sample_args, num_warmup_iters=warmup,
                                           allow_unused_input=True, pool=pool)
    torch.cuda.empty_cache()  # the warmup passes' blocks (a side stream's); the graphs keep their pool
    return fn


class GraphedTrunk:
    """Call it as ``decoder(input_ids, position_ids, attn_mask)``; see the module docstring.

    ``capture(module, sample_args, warmup, pool)`` and ``devices`` exist for tests (the
    bookkeeping runs on the CPU with a capture that records its calls).
    """

    def __init__(self, decoder: nn.Module, log=print, *, max_graphs: int = 4, warmup: int = 3,
                 capture=capture_cuda, devices=("cuda",)):
        self.decoder = decoder
        self.log = log
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.capture = capture
        self.devices = devices
        self.graphs: dict = {}  # signature -> graphed callable
        self.failed: str | None = None  # why graphs are off for the rest of the run
        self.replays = 0
        self._pool = None
        self._said_full = False

    @staticmethod
    def signature(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args)

    def __call__(self, input_ids, position_ids, attn_mask=None):
        dec = self.decoder
        if (self.failed is not None or input_ids.device.type not in self.devices
                or not (dec.training and torch.is_grad_enabled()) or dec.grad_checkpoint):
            return dec(input_ids, position_ids, attn_mask)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        args = (input_ids, position_ids) + (() if attn_mask is None else (attn_mask,))
        key = self.signature(args)
        fn = self.graphs.get(key)
        if fn is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._said_full:
                    self._said_full = True
                    self.log(f"cuda graphs: {self.max_graphs} input shapes captured already; "
                             f"batches of other shapes (first: {tuple(input_ids.shape)}) run eagerly")
                return dec(input_ids, position_ids, attn_mask)
            fn = self._capture(key, args)
            if fn is None:
                return dec(input_ids, position_ids, attn_mask)
        self.replays += 1
        return fn(*args)

    def _capture(self, key, args):
        sample = tuple(a.detach().clone() for a in args)
        try:
            if self._pool is None and self.capture is capture_cuda:
                self._pool = torch.cuda.graph_pool_handle()
            fn = self.capture(_Trunk(self.decoder), sample, self.warmup, self._pool)
        except Exception as exc:  # any op the capture rejects: the run goes on eagerly
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.failed = f"{type(exc).__name__}: {first}"[:300]
            self.log(f"cuda graphs: capture failed ({self.failed}); running eagerly from here")
            return None
        self.graphs[key] = fn
        self.log(f"cuda graphs: captured the trunk for input {tuple(args[0].shape)}"
                 f"{' with a mask' if len(args) > 2 else ''} ({len(self.graphs)} of {self.max_graphs})")
        return fn
