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


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             on_tokens: Callable[[list], None] | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (an EOS token included,
    nothing after it). ``on_tokens`` gets each step's tokens (None for finished rows)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    B, L = len(prompts), max(len(p) for p in prompts)
    total = L + max_new_tokens
    # the KV cache is allocated for ``total`` positions up front: bound it by the context
    limit = max(int(cfg.max_position_embeddings), MIN_POSITIONS)
    if total > limit:
        raise UsageError("--max-new-tokens", f"{max_new_tokens} new tokens after a prompt of {L} exceed the "
                                             f"model's context of {limit} positions (max_position_embeddings "
                                             f"{cfg.max_position_embeddings})")
    top = max(max(p) for p in prompts)
    if top >= cfg.vocab_size or min(min(p) for p in prompts) < 0:
        raise ModelError("config.json", f"the prompt holds token id {top} but the model's vocabulary has "
                                        f"{cfg.vocab_size} entries (a tokenizer for another model?)")
    ids = torch.full((B, L), pad_token_id, dtype=torch.long, device=device)
    pad_mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        pad_mask[i, L - len(p):L] = True
    padded = bool((~pad_mask[:, :L]).any())
    positions = (pad_mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    window = cfg.sliding_window

    def mask_for(T, S):
        if not padded and (window is None or S <= window):
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
    # prefill: the head only on the last position (the rest of the logits are never used)
    logits = model.lm_head(model.model(ids, positions, mask_for(L, L), cache)[:, -1])  # (B, V)
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
            pad_mask[:, L + step] = True
            pos = pos + 1
            logits = model(nxt[:, None], pos, mask_for(1, L + step + 1), cache)[:, -1]
    finally:
        model.train(was_training)
    return out
