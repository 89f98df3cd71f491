"""GRPO: online RL with verifiable rewards, for ``[train] objective = "grpo"`` (TRL's GRPOTrainer).

Data: the SFT formats, ``messages`` or ``prompt_completion``. The prompt is what the eval runner
gives the model (``train.data.split_for_generation``); the last assistant turn / the completion
is the reference the reward judges against (``train.rewards``).

Each micro-batch of B prompts, G = ``group_size``:

    completions  G samples of each prompt from the current policy: eval mode, no grad, batched
                 generation with the KV cache; the sampling generator is seeded from
                 (seed, epoch, batch), so a resumed run draws the very same completions
    r            the reward of each completion                                   (B, G)
    A            (r - mean_group(r)) / (std_group(r) + 1e-4), std unbiased, as TRL  (B, G)

and with logp / ref the per-token log-probs of the completion tokens under the policy / the
reference (the adapter off, or ``reference_adapter``), of logits / temperature as TRL:

    ratio   = exp(logp - logp_old)
    loss_t  = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + kl_beta kl_t
    kl_t    = exp(ref - logp) - (ref - logp) - 1                   (k3, >= 0, unbiased)
    loss    = mean over completions of (sum_t loss_t / completion length)   (TRL's "grpo")

One update per sampled batch: logp_old is logp detached (ratio = 1 in value, with the clipped
form and its gradient kept), which is what TRL does when num_iterations = 1 instead of a second
forward. The policy and reference forwards run one row a group, the prompt once and its G
completions after it, each seeing only the prompt and itself (``completion_rows``): the
log-probs of G separate sequences at about half the tokens. Log-probs go through
``token_logps``: the head's logits exist for ``chunk`` tokens at a time, in the forward and again
in the backward, never as (B, T, V).

Metrics (TRL's names), per step: ``reward``, ``reward_std`` (mean of the groups' std),
``kl`` and ``clip_ratio`` (means over completion tokens), ``completion_length`` (tokens); and
``tokens_per_s`` counts the sampled sequences' prompt and completion tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from leantune.base import DataError, UsageError
from leantune.peft_core.generate import generate
from leantune.train.data import IGNORE, BatchPlan, read_jsonl, split_for_generation
from leantune.train.dpo import reference_mode
from leantune.train.preference import pair_attn_mask
from leantune.train.rewards import Reward

ADV_EPS = 1e-4
METRICS = ("reward", "reward_std", "kl", "completion_length", "clip_ratio")


# -- the math ------------------------------------------------------------------------------
def group_advantages(rewards, group_size: int):
    """(N,) rewards in groups of ``group_size`` consecutive completions -> (N,) advantages
    (r - group mean) / (group std + 1e-4), the std unbiased (torch.std), as TRL."""
    r = rewards.view(-1, group_size)  # (B, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + ADV_EPS)).view(-1)


def grpo_loss(logp, old, ref, adv, mask, clip_eps: float, kl_beta: float):
    """Per-completion losses (N,) and the per-token kl and clipped flags (N, L).

    ``logp``, ``old``, ``ref``: (N, L) per-token log-probs (``ref`` unused when kl_beta is 0);
    ``adv`` (N,); ``mask`` (N, L) 1 on completion tokens."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]  # (N, 1)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if kl_beta:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_beta * kl
    clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
    mask = mask.to(per_token.dtype)
    losses = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return losses, kl.detach() * mask, clipped & (mask > 0)


def _chunk_logps(h, weight, targets, temperature: float):
    # log softmax(h W^T / temperature)[target], the product in h's dtype, the rest in fp32
    acc = torch.promote_types(h.dtype, torch.float32)
    z = (h @ weight.to(h.dtype).T).to(acc) / temperature  # (n, V)
    return z.gather(1, targets[:, None]).squeeze(1) - z.logsumexp(-1)


def token_logps(hidden, weight, targets, chunk: int = 256, temperature: float = 1.0):
    """(N,) log-probs of ``targets`` under ``hidden @ weight.T / temperature``: at most
    ``chunk`` rows of logits at once; with grad each chunk's logits are recomputed in the
    backward (checkpointed) instead of kept."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s:s + chunk], weight, targets[s:s + chunk], temperature)
        out.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


# -- prompt + completion rows --------------------------------------------------------------
def completion_rows(prompts, completions, group_size: int, pad_id: int, device):
    """One row a group: its prompt once, then its G completions (segments 1..G). Under
    ``preference.pair_attn_mask`` a completion sees the prompt and itself only, and its
    positions restart where the prompt ends, so its log-probs are those of prompt + completion
    as a sequence of its own, while the prompt is encoded once instead of G times (as DPO's
    shared-prompt rows). ``prompts``: each group's prompt G times in a row, as sampled.

    Returns ``ids``, ``pos``, ``seg`` (B, T); the completion tokens, 1-D in row order: ``row``,
    ``tgt`` (its column), ``src`` (the column whose state predicts it: the last prompt token for
    a completion's first token), ``seq`` (its completion) and ``col`` (its index there); and
    ``mask`` (N, L), 1 on completion tokens, L the longest completion."""
    G = group_size
    B = len(prompts) // G
    if any(prompts[b * G + j] != prompts[b * G] for b in range(B) for j in range(G)):
        raise ValueError("the completions of a group must share their prompt")
    T = max(len(prompts[b * G]) + sum(len(c) for c in completions[b * G:(b + 1) * G]) for b in range(B))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.zeros(len(completions), max(len(c) for c in completions), dtype=torch.bool)
    idx = {k: [] for k in ("row", "tgt", "src", "seq", "col")}
    for b in range(B):
        p = list(prompts[b * G])
        P = at = len(p)
        ids[b, :P], pos[b, :P], seg[b, :P] = torch.tensor(p), torch.arange(P), 0
        for j in range(G):
            n, c = b * G + j, list(completions[b * G + j])
            ids[b, at:at + len(c)], pos[b, at:at + len(c)] = torch.tensor(c, dtype=torch.long), torch.arange(P, P + len(c))
            seg[b, at:at + len(c)] = j + 1
            mask[n, :len(c)] = True
            idx["row"] += [b] * len(c)
            idx["tgt"] += range(at, at + len(c))
            idx["src"] += [P - 1] + list(range(at, at + len(c) - 1))
            idx["seq"] += [n] * len(c)
            idx["col"] += range(len(c))
            at += len(c)
    out = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in idx.items()}
    return {**out, "ids": ids.to(device), "pos": pos.to(device), "seg": seg.to(device), "mask": mask.to(device)}


def completion_logps(model, rows, chunk: int, temperature: float, trunk=None):
    """(N, L) per-token log-probs of the completion tokens (0 where ``mask`` is 0)."""
    ids, row = rows["ids"], rows["row"]
    hidden = (trunk or model.model)(ids, rows["pos"], pair_attn_mask(rows["seg"]))  # (B, T, C)
    lp = token_logps(hidden[row, rows["src"]], model.lm_head.weight, ids[row, rows["tgt"]], chunk, temperature)
    out = torch.zeros(rows["mask"].shape, dtype=lp.dtype, device=ids.device)
    return out.index_put((rows["seq"], rows["col"]), lp)


# -- data ----------------------------------------------------------------------------------
@dataclass
class PromptItem:
    ids: list
    reference: str
    where: str  # FILE:LINE
    text: str = ""  # the prompt as the model sees it, for a user reward function
    regex: str | None = None


class PromptRow:
    """A prompt as a ``BatchPlan`` row (nothing supervised: the completions are sampled)."""

    __slots__ = ("item",)

    def __init__(self, item: PromptItem):
        self.item = item

    def __len__(self) -> int:
        return len(self.item.ids)

    @property
    def input_ids(self) -> list:
        return self.item.ids

    @property
    def labels(self) -> list:
        return [IGNORE] * len(self.item.ids)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1000003 + epoch) * 1000003 + index) % 2**63


class PromptPlan(BatchPlan):
    """BatchPlan over prompts; a batch also carries ``prompt_index`` (B,) and ``sample_seed``
    (1,), the seed of its completions' sampling generator."""

    def __init__(self, items, batch_size: int, seed: int = 0, pad_token_id=0, shuffle: bool = True):
        super().__init__([PromptRow(it) for it in items], batch_size, seed, pad_token_id,
                         shuffle=shuffle, group_by_length=shuffle)

    def batch(self, epoch: int, index: int) -> dict:
        out = super().batch(epoch, index)
        out["prompt_index"] = torch.tensor(self.batch_rows(epoch, index), dtype=torch.long)
        out["sample_seed"] = torch.tensor([sample_seed(self.seed, epoch, index)], dtype=torch.long)
        return out


@dataclass
class PromptSummary:
    path: str = ""
    records: int = 0
    examples: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0  # none: the completions are sampled
    dropped: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{self.path}: {self.records:,} records -> {self.examples:,} prompts, "
               f"{self.total_tokens:,} prompt tokens"]
        if self.dropped:
            out.append("dropped " + ", ".join(f"{r}: {c:,}" for r, c in sorted(self.dropped.items())))
        return out


def read_prompts(path, tok, fmt: str, room: int, reward: Reward) -> tuple[list, PromptSummary]:
    """The prompts and references of a messages / prompt_completion file; a prompt longer than
    ``room`` tokens is dropped (counted); each record checked for the reward."""
    summary, items = PromptSummary(path=str(path)), []
    for line_no, record, rec_fmt in read_jsonl(path, fmt, with_format=True):
        where = f"{path}:{line_no}"
        if rec_fmt not in ("messages", "prompt_completion"):
            raise DataError(where, f"GRPO needs messages or prompt_completion records (the prompt and "
                                   f"the reference), got {rec_fmt!r}")
        summary.records += 1
        ids, ref = split_for_generation(record, tok, rec_fmt, where)
        if len(ids) > room:
            key = f"prompt over {room} tokens (data.max_len - train.max_new_tokens)"
            summary.dropped[key] = summary.dropped.get(key, 0) + 1
            continue
        regex = record.get("regex") if isinstance(record.get("regex"), str) else None
        item = PromptItem(ids, ref, where, tok.decode(ids), regex)
        reward.check(item)
        items.append(item)
        summary.total_tokens += len(ids)
    summary.examples = len(items)
    if not items:
        raise DataError(str(path), f"no usable prompts: all {summary.records} records were dropped "
                                   f"({', '.join(summary.dropped)})")
    return items, summary


def make_reward(t) -> Reward:
    return Reward(t.reward, t.reward_weights, t.reward_fn)


def build_prompt_data(cfg, tok, log):
    """For ``objective = "grpo"``: (plan, eval plan or None, summary, total optimizer steps)."""
    t, reward = cfg.train, make_reward(cfg.train)
    room = cfg.data.max_len - t.max_new_tokens
    if room < 1:
        raise UsageError("train.max_new_tokens", f"{t.max_new_tokens} leaves no room for a prompt in "
                                                 f"data.max_len = {cfg.data.max_len}")
    items, summary = read_prompts(cfg.data.train, tok, cfg.data.format, room, reward)
    for line in summary.lines():
        log(f"data: {line}")
    plan = PromptPlan(items, t.batch_size, t.seed, tok.pad_token_id)
    plan.reward = reward  # loaded once (a user function's module is imported once)
    eval_plan = None
    if cfg.data.eval:
        ev, _ = read_prompts(cfg.data.eval, tok, cfg.data.format, room, reward)
        eval_plan = PromptPlan(ev, t.batch_size, t.seed, tok.pad_token_id, shuffle=False)
    total = t.max_steps or math.ceil(t.epochs * len(plan) / t.grad_accum)
    return plan, eval_plan, summary, total


# -- the objective -------------------------------------------------------------------------
class GRPOObjective:
    """The loop's objective interface (see ``train.dpo.DPOObjective``): ``count`` (completions
    of the step: the normaliser), ``loss_sum``, ``stats``, ``metrics``, ``evaluate``, ``progress``."""

    # step sums: reward, groups' std, groups, kl (token sum), clipped tokens, completion tokens
    SUMS = 6

    def __init__(self, train_cfg, tok, items, reward: Reward, reference_adapter: str | None = None):
        self.t, self.tok, self.items, self.reward = train_cfg, tok, items, reward
        self.adapter = reference_adapter
        self.sums = torch.zeros(self.SUMS, dtype=torch.float64)
        self.completions = self.prompt_tokens = 0
        self.t0 = time.perf_counter()

    def count(self, micro) -> int:
        """Completions sampled in the step's micro-batches; resets the step's metrics."""
        self.sums = torch.zeros(self.SUMS, dtype=torch.float64)
        self.completions = sum(int(b["input_ids"].shape[0]) for b in micro) * self.t.group_size
        # every sampled sequence's prompt and completion tokens, for tokens_per_s
        self.prompt_tokens = sum(int(b["attention_mask"].sum()) for b in micro) * self.t.group_size
        self.t0 = time.perf_counter()
        return self.completions

    def sample(self, model, prompts, seed: int, greedy: bool = False) -> list[list[int]]:
        t = self.t
        return generate(model, prompts, t.max_new_tokens, temperature=0.0 if greedy else t.temperature,
                        top_p=t.top_p, seed=seed, eos_token_ids=self.tok.eos_token_ids,
                        pad_token_id=self.tok.pad_token_id)

    def score(self, items, completions) -> list[float]:
        return [self.reward(it.text, self.tok.decode(c, skip_special_tokens=True), it)
                for it, c in zip(items, completions)]

    def loss_sum(self, model, batch, chunk: int, trunk=None):
        """Sample, score, and the summed loss over the micro-batch's completions."""
        return self.update_loss(model, self.rollout(model, batch), chunk, trunk)

    def rollout(self, model, batch) -> tuple[list, list, torch.Tensor]:
        """The micro-batch's G completions of each prompt, sampled and scored: (items, each
        prompt's G times in a row: the groups; completions; rewards (B * G,))."""
        G = self.t.group_size
        items = [self.items[i] for i in batch["prompt_index"].tolist() for _ in range(G)]
        completions = self.sample(model, [it.ids for it in items], int(batch["sample_seed"][0]))
        rewards = torch.tensor(self.score(items, completions), dtype=torch.float32,
                               device=batch["input_ids"].device)
        return items, completions, rewards

    def update_loss(self, model, rollout, chunk: int, trunk=None):
        """The summed loss over a rollout's completions (reference and policy forwards); the
        step's metric sums accumulated."""
        t, G = self.t, self.t.group_size
        items, completions, rewards = rollout
        device = rewards.device
        prompts = [it.ids for it in items]
        adv = group_advantages(rewards, G)
        rows = completion_rows(prompts, completions, G, self.tok.pad_token_id, device)
        ref = None
        if t.kl_beta:
            with torch.no_grad(), reference_mode(model, self.adapter):
                ref = completion_logps(model, rows, chunk, t.temperature)
        logp = completion_logps(model, rows, chunk, t.temperature, trunk)
        losses, kl, clipped = grpo_loss(logp, logp.detach(), ref, adv, rows["mask"], t.clip_eps, t.kl_beta)
        r = rewards.double().view(-1, G)
        step = torch.stack([r.sum(), r.std(1).sum(), torch.tensor(r.shape[0], dtype=torch.float64, device=device),
                            kl.sum().double(), clipped.sum().double(), rows["mask"].sum().double()])
        self.sums = self.sums.to(device) + step
        return losses.sum()

    def stats(self) -> torch.Tensor:
        return self.sums

    def metrics(self) -> dict:
        reward, std, groups, kl, clipped, tokens = self.sums.tolist()
        n = max(self.completions, 1)
        return {"reward": reward / n, "reward_std": std / max(groups, 1), "kl": kl / max(tokens, 1),
                "completion_length": tokens / n, "clip_ratio": clipped / max(tokens, 1),
                "completions": self.completions, "supervised_tokens": int(tokens),
                "tokens_per_s": (self.prompt_tokens + tokens) / max(time.perf_counter() - self.t0, 1e-9)}

    def progress(self) -> dict:
        m = self.metrics()
        return {k: m[k] for k in ("reward", "kl", "completion_length")}

    @torch.no_grad()
    def evaluate(self, model, plan, chunk: int, device) -> dict:
        """``eval_reward``: the mean reward of greedy completions of the held-out prompts."""
        total, n = 0.0, 0
        for i in range(len(plan)):
            idx = plan.batch_rows(0, i)
            items = [plan.rows[j].item for j in idx]
            outs = self.sample(model, [it.ids for it in items], 0, greedy=True)
            total += sum(self.score(items, outs))
            n += len(items)
        return {"eval_reward": total / max(n, 1)}


def make_objective(cfg, tok, plan, log) -> GRPOObjective:
    """The run's GRPOObjective (the reward loaded, the reference named)."""
    from leantune.train.dpo import REFERENCE_NAME

    t = cfg.train
    reward = getattr(plan, "reward", None) or make_reward(t)
    adapter = REFERENCE_NAME if t.reference_adapter else None
    ref = f"the adapter {t.reference_adapter}" if adapter else "the base, adapter off"
    log(f"grpo: {t.group_size} completions a prompt (temperature {t.temperature}, top_p {t.top_p}, "
        f"max_new_tokens {t.max_new_tokens}); reward {reward.describe()}; clip_eps {t.clip_eps}, "
        f"kl_beta {t.kl_beta}" + (f" to {ref}" if t.kl_beta else ""))
    return GRPOObjective(t, tok, [row.item for row in plan.rows], reward, adapter)
