"""FSDP2 for the training loop (``[train] fsdp = true`` under torchrun): the frozen 4-bit base
and the adapters sharded over the ranks, so that each rank holds 1/world of them between uses.

Per decoder block, one ``fully_shard`` (one all-gather / reduce-scatter group); the decoder is
the root. What a rank holds between uses:

    tensor                                  held as                          between uses
    Linear4bit.weight   uint8 packed codes  buffer -> frozen nn.Parameter    its dim-0 shard
    Linear4bit.absmax   uint8 (double q.)   buffer -> frozen nn.Parameter    its dim-0 shard
                        or fp32
    LoRA A and B, DoRA magnitude, norms,    nn.Parameter                     its dim-0 shard
    biases of the blocks
    quant_map, nested_absmax,               buffers                          replicated (16 + 256
    nested_quant_map, nested_offset                                          floats, n_blocks / 256)
    embeddings, final norm, lm_head         nn.Parameter (ignored_params)    replicated

``fully_shard`` shards only parameters, so :func:`shard_model` re-registers the codes and the
absmax as frozen parameters (``requires_grad=False``) under the same names: state_dict keys
do not change. They stay uint8: FSDP2 shards each parameter on its own (no flat parameter of
one dtype, which is why bitsandbytes gives FSDP1 a float ``quant_storage`` view), and a group
that mixes dtypes is all-gathered through one uint8 buffer (torch 2.13, gloo and NCCL alike).
Before a block's forward its shards are all-gathered and the module attributes become the full
plain tensors, which is all ``quant`` reads; after the forward they are freed
(``reshard_after_forward``) and gathered again in the backward. The 4-bit autograd Functions
save the packed codes by reference, and FSDP refills that same storage before the backward.

Linear4bit caches its decoded absmax (``scales``, fp32 [n_blocks], CPU only) across calls.
Kept, it would hold an unsharded numel / 16 bytes per layer across the reshard (1/8 of the
full codes: with 8 ranks, as much as a rank's shard of them), so a forward hook on each block
drops it; the reference the backward saved lives until the backward, like an activation.

The embeddings, the final norm and lm_head stay replicated: the chunked loss reads
``lm_head.weight`` (the embedding when tied) outside any module's forward, where FSDP would
not gather it. In a QLoRA run they are frozen; in a full fine-tune the loop sums their
gradients as plain data-parallel does.

Gradients: every rank makes the same number of forwards and backwards (``Ranks.part`` and
``eval_loss`` keep them in step), the last backward of a step reduce-scatters
(``set_requires_gradient_sync``), with SUM and no division: a divide factor of 1 and sum-only
collectives (gloo has neither AVG nor PREMUL_SUM), so each rank holds its shard of the sum
plain data-parallel makes. :func:`clip_grad_norm_` clips by the norm over all shards.

Checkpoints hold full tensors: :func:`full_state` all-gathers the trainable parameters and
the optimizer state on every rank for rank 0 to write, and :func:`local_like` takes a full
tensor back to a rank's shard, so a checkpoint written under FSDP resumes in one process and
the other way round.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from leantune.quant.modules import Linear4bit

SHARDED_BUFFERS = ("weight", "absmax")  # of each Linear4bit: the packed codes and their scales


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or optimizer state FSDP shards)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _codes_to_params(layer: Linear4bit):
    """The packed codes and absmax of ``layer`` as frozen parameters of the same names."""
    for name in SHARDED_BUFFERS:
        t = layer._buffers.pop(name)
        layer.register_parameter(name, nn.Parameter(t, requires_grad=False))


def shard_model(model, ranks) -> dict[str, nn.Parameter]:
    """Shard ``model`` (a ``LlamaForCausalLM``, adapters injected, on ``ranks.device``) over
    the ranks of the process group, in place; the trainable parameters, by name, as the
    optimizer must now see them (DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    decoder = model.model
    for block in decoder.layers:
        layers = [m for m in block.modules() if isinstance(m, Linear4bit)]
        for layer in layers:
            _codes_to_params(layer)
        block.register_forward_hook(lambda mod, args, out, layers=layers: _drop_scales(layers))
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # the root: runs the hooks of the whole forward and backward; holds no shard itself
    replicated = {p for n, p in decoder.named_parameters() if not n.startswith("layers.")}
    fully_shard(decoder, mesh=mesh, ignored_params=replicated)
    # its output (the final norm's, a reshaped view) is only ever read, never written in place,
    # which is what FSDP warns about
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({type(decoder).__name__}\) "
                                              "returned a view tensor")
    for m in decoder.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # the sum of the ranks' gradients ...
            m.set_force_sum_reduction_for_comms(True)  # ... by ReduceOp.SUM, which gloo has
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _drop_scales(layers):
    for layer in layers:
        layer.scales = None


def set_grad_sync(model, sync: bool):
    """Reduce-scatter the gradients in the next backward (the last of a step), or keep
    accumulating them unsharded on this rank."""
    model.model.set_requires_gradient_sync(sync)


def packed_bytes(model) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole tensors) of the 4-bit bases' codes and absmax."""
    mine = full = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for name in SHARDED_BUFFERS:
                t = getattr(m, name)
                local = t.to_local() if is_sharded(t) else t
                mine += local.numel() * local.element_size()
                full += t.numel() * t.element_size()
    return mine, full


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients of which some are sharded (DTensors,
    summed over their shards) and some replicated (the same on every rank): the 2-norm of the
    whole gradient, the same on every rank; every gradient is scaled by
    min(1, max_norm / (norm + 1e-6)) as torch does."""
    grads = [p.grad for p in params if p.grad is not None]
    shards = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)  # fp64: the same norm for any split
    for g in shards:  # |g|^2 = sum over the ranks of |shard|^2
        sq += torch.linalg.vector_norm(g, dtype=torch.float64).square()
    if dist.is_initialized():
        dist.all_reduce(sq)
    for g in whole:
        sq += torch.linalg.vector_norm(g, dtype=torch.float64).square()
    total = sq.sqrt().float()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in shards + whole:
        g.mul_(coef.to(g.dtype))
    return total


def _full(t):
    """A sharded tensor's full value (an all-gather: every rank calls it); others as they are.

    FSDP's dim-0 shards are ``torch.chunk`` pieces (the last ones may be short or empty):
    padded to the chunk size, gathered with c10d, trimmed. Not ``DTensor.full_tensor()``:
    with gloo (torch 2.13) its functional all-gather leaves a worker thread holding the
    gathered tensor after the wait; when it lets go during interpreter shutdown it needs
    the GIL and the process aborts ("terminate called without an active exception"), in
    about a third of the runs of a script that exits right after such gathers. See also
    the last barrier of ``train.loop.process_group``."""
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        return t.full_tensor()
    world = t.device_mesh.size()
    rows = -(-t.shape[0] // world)  # torch.chunk's piece
    local = t.to_local()
    piece = local.new_zeros((rows, *local.shape[1:]))
    piece[:local.shape[0]] = local
    out = local.new_empty((rows * world, *local.shape[1:]))
    dist.all_gather_into_tensor(out, piece, group=t.device_mesh.get_group())
    return out[:t.shape[0]]


@contextmanager
def full_state(model, params: dict, opt):
    """Every rank: the trainable parameters and the optimizer state as full tensors (the
    all-gathers are collectives), and, while inside, those parameters registered on their
    modules in place of the shards, so that ``save_adapter`` / ``save_model`` read them.
    Yields (full parameters by name, an object whose ``state`` maps them to full states),
    what ``save_checkpoint`` takes for ``params`` and ``opt``. No forward may run inside."""
    full, state = {}, {}
    with torch.no_grad():  # the same order of all-gathers on every rank: params, then states
        for name, p in params.items():
            t = _full(p)
            full[name] = p if t is p else nn.Parameter(t, requires_grad=p.requires_grad)
        for name, p in params.items():
            if p in opt.state:
                state[full[name]] = {k: _full(v) for k, v in opt.state[p].items()}
    swapped = []
    for name, p in params.items():
        if full[name] is not p:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            swapped.append((module, attr, module._parameters[attr]))
            module._parameters[attr] = full[name]
    try:
        yield full, SimpleNamespace(state=state)
    finally:
        for module, attr, p in swapped:
            module._parameters[attr] = p


def local_like(p, t: torch.Tensor) -> torch.Tensor:
    """``t``, a full tensor as checkpoints hold it, in the layout of parameter ``p``: this
    rank's shard when ``p`` is sharded and ``t`` has its shape (the AdamW moments; not the
    scalar ``step``), else ``t`` on ``p``'s device."""
    if is_sharded(p) and t.shape == p.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return t.to(p.device)
