"""Batched autoregressive generation with a KV cache.

Prompts of different lengths are left-padded; padding keys are masked and position ids
count only real tokens, so a row's output does not depend on what else is in the batch.
Greedy by default; ``temperature > 0`` samples, optionally from the top-p nucleus, with a
seeded generator (same seed, same text).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from leantune.base import ModelError, UsageError
from leantune.peft_core.model import KVCache, make_attn_mask

MIN_POSITIONS = 4096  # the cap below is the model's context, or this for short-context (test) models
MIN_SHARED = 16  # a shared prefix shorter than this is prefilled with the rest


def sample_next(logits, temperature: float = 0.0, top_p: float = 1.0, generator=None):
    """logits (B, V) -> next token ids (B,). Greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p (keeps at least one)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def shared_prefix(prompts: Sequence[Sequence[int]], minimum: int = MIN_SHARED) -> int:
    """How many leading tokens every prompt shares (at most the shortest one's length - 1,
    so each row keeps a token of its own); 0 below ``minimum`` or for a single prompt."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n if n >= minimum else 0


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             on_tokens: Callable[[list], None] | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (an EOS token included,
    nothing after it). ``on_tokens`` gets each step's tokens (None for finished rows).

    A prefix that every prompt shares (few-shot examples, a system prompt) is computed once
    and its keys and values copied to every row; the rest of each prompt is left-padded after it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    B, P = len(prompts), shared_prefix(prompts)
    L = max(len(p) for p in prompts) - P  # the suffixes' padded length
    total = P + L + max_new_tokens
    # the KV cache is allocated for ``total`` positions up front: bound it by the context
    limit = max(int(cfg.max_position_embeddings), MIN_POSITIONS)
    if total > limit:
        raise UsageError("--max-new-tokens", f"{max_new_tokens} new tokens after a prompt of {P + L} exceed the "
                                             f"model's context of {limit} positions (max_position_embeddings "
                                             f"{cfg.max_position_embeddings})")
    top = max(max(p) for p in prompts)
    if top >= cfg.vocab_size or min(min(p) for p in prompts) < 0:
        raise ModelError("config.json", f"the prompt holds token id {top} but the model's vocabulary has "
                                        f"{cfg.vocab_size} entries (a tokenizer for another model?)")
    ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    pad_mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    pad_mask[:, :P] = True
    for i, p in enumerate(prompts):
        ids[i, L - (len(p) - P):] = torch.tensor(list(p[P:]), dtype=torch.long)
        pad_mask[i, P + L - (len(p) - P):P + L] = True
    padded = bool((~pad_mask[:, :P + L]).any())
    positions = (pad_mask[:, :P + L].long().cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, L)
    window = cfg.sliding_window

    def mask_for(T, S):
        if not padded and (T == 1 or T == S) and (window is None or S <= window):  # plain causal
            return None
        return make_attn_mask(T, S, pad_mask=pad_mask[:, :S], sliding_window=window, device=device)

    cache = KVCache(cfg, B, total, device, dtype)
    # finished rows leave the batch, except when the model's rows are tied to adapters (serve)
    can_drop = not any(getattr(m, "row_adapters", None) is not None for m in model.modules())
    was_training = model.training
    model.eval()
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    eos = torch.tensor(sorted(set(eos_token_ids)) or [-1], device=device)
    if P:  # the shared prefix once, its keys and values copied into every row
        one = KVCache(cfg, 1, P, device, dtype)
        model.model(torch.tensor([list(prompts[0][:P])], device=device), None, None, one)
        cache.fill_prefix(one)
    # prefill: the head only on the last position (the rest of the logits are never used)
    logits = model.lm_head(model.model(ids, positions, mask_for(L, P + L), cache)[:, -1])  # (B, V)
    pos = positions[:, -1:]  # (B, 1)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # the prompts still in the batch
    try:
        for step in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_p, generator)  # (b,)
            nxt = torch.where(done[rows], torch.full_like(nxt, pad_token_id), nxt)
            full = torch.full((B,), pad_token_id, dtype=nxt.dtype, device=device).index_copy(0, rows, nxt)
            toks, live = full.tolist(), (~done).tolist()
            for i in range(B):
                if live[i]:
                    out[i].append(toks[i])
            if on_tokens is not None:
                on_tokens([t if a else None for t, a in zip(toks, live)])
            done = done | torch.isin(full, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if can_drop and 4 * int(done[rows].sum()) >= len(rows):  # a quarter finished: drop them
                keep = (~done[rows]).nonzero().flatten()
                rows, nxt, pos = rows[keep], nxt[keep], pos[keep]
                pad_mask = pad_mask[keep]
                cache.keep(keep)
            pad_mask[:, P + L + step] = True
            pos = pos + 1
            logits = model(nxt[:, None], pos, mask_for(1, P + L + step + 1), cache)[:, -1]
    finally:
        model.train(was_training)
    return out
