"""A Llama-family decoder in plain PyTorch, readable in one sitting.

    tokens -> embed_tokens -> N x Block -> norm -> lm_head -> logits
    Block:  h = x + Attention(RMSNorm(x));  out = h + MLP(RMSNorm(h))
    Attention: q, k, v projections, RoPE on q and k, grouped-query attention through
               ``quant.attention`` (SDPA; batched GEMMs on CPU in bf16), o projection.
    MLP (SwiGLU): down(silu(gate(x)) * up(x)), with an autograd Function that saves less

Memory for the backward: the norms' outputs and the SwiGLU output, which the projections
after them would keep, are recomputed in the backward instead (``recompute_saved``): a few
cheap elementwise passes for about a third of a block's saved activations.

Module names follow Hugging Face (``model.layers.0.self_attn.q_proj``) so checkpoints and
PEFT adapters map one to one. Covers Llama 2/3/3.1 (llama3 RoPE scaling), Mistral (sliding
window), Qwen2 (q/k/v bias) and SmolLM2 (tied embeddings); see ``config.py``.

Attention masks: ``attn_mask`` is boolean, True = may attend, shape (B, 1, T, S) where S is
the number of keys (cache included). ``make_attn_mask`` builds it from padding, document
ids (packed sequences never attend across documents) and the sliding window; with none of
those the causal fast path of SDPA is used.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from leantune.peft_core.config import ModelConfig, llama3_inv_freq
from leantune.quant.attention import attention
from leantune.quant.rowops import SwiGLU, apply_rope, rms_norm, swiglu_forward


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32, cast back before the scale
    (``rowops.rms_norm``: a Function that saves x and one float a row; a C kernel on CPU)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, computed in fp32 from position ids."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device="cpu"):
        d = self.cfg.head_dim
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
        inv_freq = 1.0 / (self.cfg.rope_theta ** exponent)
        if self.cfg.rope_scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, self.cfg.rope_scaling)
        return inv_freq

    def forward(self, position_ids, dtype):
        # position_ids: (B, T) -> cos, sin: (B, 1, T, head_dim)
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # positions filled so far (same for every row; rows are left-padded)
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Write this step's k, v (B, n_kv, T, hd) and return all keys/values so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise ValueError(f"KV cache overflow: {t1} positions > max_len {self.max_len}")
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def fill_prefix(self, prefix: "KVCache") -> None:
        """Copy a one-row cache of a prefix every row shares into every row (length = its)."""
        P = prefix.length
        for k, v, k1, v1 in zip(self.k, self.v, prefix.k, prefix.v):
            k[:, :, :P], v[:, :, :P] = k1[:, :, :P], v1[:, :, :P]
        self.length = P

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished sequences leave a generation batch)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        # grouped-query attention: each kv head serves n_head // n_kv query heads. On CPU the
        # attention op shares them itself (enable_gqa; the expanded copies would be saved for
        # backward); elsewhere they are expanded so the fused GPU kernels accept them.
        # ``quant.attention.attention``: SDPA, or batched GEMMs on CPU (bf16, T > 1, <= 512 keys).
        gqa = self.n_kv != self.n_head
        if gqa and q.device.type != "cpu":
            k, v = _repeat_kv(k, self.n_head // self.n_kv), _repeat_kv(v, self.n_head // self.n_kv)
            gqa = False
        if attn_mask is None:
            # causal; with a cache the T new queries see every cached key before them
            causal = T > 1
            if cache is not None and cache.length > 0 and T > 1:
                raise ValueError("multi-token step with a filled cache needs an explicit attn_mask")
            y = attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            y = attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, C)
        return self.o_proj(y)


def _repeat_kv(t, rep: int):
    """(B, nkv, S, hd) -> (B, nkv * rep, S, hd), each head ``rep`` times in a row (what
    ``repeat_interleave(rep, dim=1)`` gives), as expand + reshape: no host sync, so it can sit
    inside a CUDA graph capture."""
    B, nkv, S, hd = t.shape
    return t[:, :, None].expand(B, nkv, rep, S, hd).reshape(B, nkv * rep, S, hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, save_less: bool = False):
        g, u = self.gate_proj(x), self.up_proj(x)
        h = SwiGLU.apply(g, u)
        if not save_less:
            return self.down_proj(h)
        # down_proj's adapter saves its input h for its gradient; keep a note instead and
        # make h again from g and u (which SwiGLU keeps anyway) when the backward needs it
        with recompute_saved(h, lambda: swiglu_forward(g, u)):
            return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, save_less: bool = True):
        """``save_less``: for the backward, keep each norm's input but not its output (the
        projections after it would save it): it is recomputed, exactly, when needed. Off under
        gradient checkpointing, which recomputes the whole block anyway."""
        save_less = save_less and torch.is_grad_enabled()
        xn = self.input_layernorm(x)
        with recompute_saved(xn, lambda x0=x: self.input_layernorm(x0), save_less):
            x = x + self.self_attn(xn, cos, sin, attn_mask, cache)
        hn = self.post_attention_layernorm(x)
        with recompute_saved(hn, lambda x1=x: self.post_attention_layernorm(x1), save_less):
            return x + self.mlp(hn, save_less)


class _Note:
    """What autograd keeps in place of a recomputable tensor: the view's geometry."""

    __slots__ = ("shape", "stride", "offset")

    def __init__(self, t):
        self.shape, self.stride, self.offset = t.shape, t.stride(), t.storage_offset()


@contextmanager
def recompute_saved(tensor, recompute, enabled: bool = True):
    """Within the block, every tensor autograd saves that is ``tensor`` or a view of it is
    replaced by a note; in the backward ``recompute()`` makes it again (once, shared by every
    user in the block, freed with the last) and the note becomes the same view of it.

    ``recompute`` must give ``tensor``'s values bit for bit (the same ops on the same inputs)
    and ``tensor`` must be contiguous. Only the address of its storage is remembered here, so
    nothing holds the original alive after the forward."""
    if not enabled or not tensor.is_contiguous() or tensor.storage_offset() != 0:
        yield
        return
    ptr, device = tensor.untyped_storage().data_ptr(), tensor.device
    made = []

    def pack(t):
        if t.device == device and t.untyped_storage().data_ptr() == ptr:
            return _Note(t)
        return t

    def unpack(p):
        if not isinstance(p, _Note):
            return p
        if not made:
            with torch.no_grad():
                made.append(recompute())
        return made[0].as_strided(p.shape, p.stride, p.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm: tokens (B, T) -> hidden states (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Built from an explicit tensor so no init runs on the meta device (normal_ on meta
        # imports sympy, ~150 MB); a real-device model still gets N(0, 1) like nn.Embedding.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.grad_checkpoint = False
        self.save_less = True  # recompute norm / SwiGLU outputs in the backward (Block.forward)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        B, T = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary(position_ids, x.dtype)
        window = self.rotary.cfg.sliding_window
        if attn_mask is None and window is not None:
            S = T + (cache.length if cache is not None else 0)
            if S > window:
                attn_mask = make_attn_mask(T, S, sliding_window=window, device=x.device)
        for block in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    block, x, cos, sin, attn_mask, cache, save_less=False, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, cache, save_less=self.save_less)
        if cache is not None:
            cache.length += T
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The decoder plus the language-model head (tied to the embeddings when configured)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        """Logits (B, T, vocab). Training code calls ``self.model`` and a chunked loss instead."""
        return self.lm_head(self.model(input_ids, position_ids, attn_mask, cache))

    def init_non_persistent(self):
        """Recompute buffers that checkpoints do not hold (after loading onto a meta model)."""
        device = self.model.embed_tokens.weight.device
        self.model.rotary.inv_freq = self.model.rotary.compute_inv_freq(device)


def make_attn_mask(T: int, S: int | None = None, *, doc_ids=None, pad_mask=None,
                   sliding_window: int | None = None, device=None):
    """Boolean attention mask (B or 1, 1, T, S): True = query t may attend to key s.

    - causal: key s is at most the query's position (queries are the last T of S keys);
    - ``doc_ids`` (B, T): packed documents never attend across boundaries;
    - ``pad_mask`` (B, S): False for padding keys (left padding in batched generation);
    - ``sliding_window``: keys more than window-1 positions back are dropped (Mistral).
    Every query keeps at least itself so no row is all False (SDPA would give NaN).
    """
    S = T if S is None else S
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)[None, None]
    if doc_ids is not None:
        if S != T:
            raise ValueError("doc_ids masks are for full sequences without a cache")
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if pad_mask is not None:
        mask = mask & pad_mask[:, None, None, :].bool()
    diag = (k_pos == q_pos)[None, None]
    return mask | diag
