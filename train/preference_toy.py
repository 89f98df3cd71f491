"""A seeded toy preference task for DPO: answer an addition with the right equation.

String pairs (TRL's ``{"prompt", "chosen", "rejected"}``): the prompt asks for a sum in one of
several phrasings; the chosen reply is the equation with the right sum (" 17 + 25 = 42."); the
rejected one is, half of the time, the same equation with a wrong sum (" 17 + 25 = 44."), else
another style: a hedge, a bare wrong number, a refusal. Train and held-out pairs use disjoint
phrasings and disjoint (a, b) pairs, so held-out accuracy measures a learned preference, not
memorised pairs. ``write_toy(folder)`` writes ``train.jsonl`` and
``heldout.jsonl``.

``python -m leantune.train.preference_toy OUT [--steps N]`` runs DPO on it (LoRA r16 on the
4-bit embedded SmolLM2) and prints held-out preference accuracy, time and peak RSS.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

ASK = [["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "How much is {a} + {b}?"],
       ["Please sum {a} and {b}.", "{a} + {b} = ?", "What do {a} and {b} make together?",
        "Tell me the total of {a} and {b}."]]
REJECT = [["I think it is {w}.", "{w}", "Why do you want to know?", "Hmm, maybe {w}? Not sure."],
          ["Probably {w}, I guess.", "I cannot help with that.", "{w}!!", "Something like {w} or so."]]


def toy_pairs(n: int, split: int, seed: int = 0) -> list[dict]:
    """``n`` records of split 0 (train) or 1 (held-out): addends in 10-69, the (a, b) pairs of
    the two splits disjoint (a quarter of all pairs, by a fixed rule, are held-out ones)."""
    rng = random.Random(seed * 2 + split)
    out = []
    while len(out) < n:
        a, b = rng.randint(10, 69), rng.randint(10, 69)
        if ((a * 7 + b * 3) % 4 == 0) != (split == 1):
            continue
        w = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        fill = {"a": a, "b": b, "w": w}
        wrong = f"{a} + {b} = {w}." if rng.random() < 0.5 else rng.choice(REJECT[split]).format(**fill)
        out.append({"prompt": f"Q: {rng.choice(ASK[split]).format(**fill)}\nA:",
                    "chosen": f" {a} + {b} = {a + b}.", "rejected": " " + wrong})
    return out


def write_toy(folder, n_train: int = 1024, n_heldout: int = 64, seed: int = 0) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, n, split in zip(paths, (n_train, n_heldout), (0, 1)):
        path.write_text("".join(json.dumps(r) + "\n" for r in toy_pairs(n, split, seed)))
    return paths


def toy_config(folder, steps: int = 40, **train):
    """The toy run's config: LoRA r16 on the 4-bit embedded SmolLM2, sigmoid DPO, beta 0.3
    (0.1 moved the policy further from the base's arithmetic: 0.89 held-out, twice)."""
    from leantune.train.config import Config

    cfg = Config()
    train_path, heldout = write_toy(folder)
    cfg.data.train, cfg.data.eval, cfg.data.max_len = str(train_path), str(heldout), 64
    cfg.adapter.r, cfg.adapter.alpha = 16, 32
    t = cfg.train
    t.out, t.objective, t.max_steps, t.batch_size, t.lr = str(Path(folder) / "run"), "dpo", steps, 16, 5e-4
    t.beta = 0.3
    t.warmup_steps, t.schedule, t.save_every = 2, "linear", 0
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def heldout_accuracy(model, plan) -> dict:
    """On held-out pairs, with the tuned adapter on ``model``: ``reward_accuracy``, TRL's
    rewards/accuracies (the policy's margin beats the reference's, the base's; before training
    every pair is a tie, which TRL counts as a miss and chance is 0.5), and the raw preference
    (log-prob of chosen above rejected) of the base and of the tuned model."""
    import torch

    from leantune.train.dpo import reference_mode
    from leantune.train.preference import sequence_logps

    wins = base = tuned = n = 0
    model.eval()
    with torch.no_grad():
        for i in range(len(plan)):
            batch = plan.batch(0, i)
            with reference_mode(model, None):
                ref, _ = sequence_logps(model, batch)  # (B, 2)
            pol, _ = sequence_logps(model, batch)
            wins += int(((pol[:, 0] - pol[:, 1]) > (ref[:, 0] - ref[:, 1])).sum())
            base += int((ref[:, 0] > ref[:, 1]).sum())
            tuned += int((pol[:, 0] > pol[:, 1]).sum())
            n += pol.shape[0]
    return {"pairs": n, "reward_accuracy": wins / n, "base_preference": base / n, "tuned_preference": tuned / n}


def run_toy(folder, steps: int = 40, log=print) -> dict:
    """Train DPO on the toy task; held-out accuracies before and after, seconds, peak RSS."""
    import resource

    from leantune.peft_core.adapters import load_adapter
    from leantune.peft_core.build import load_base, resolve_model_dir
    from leantune.peft_core.tokenizer import Tokenizer
    from leantune.train.loop import run_dtype, train
    from leantune.train.preference import PairPlan, build_pairs

    cfg = toy_config(folder, steps)
    model_dir = resolve_model_dir(cfg.model.path)
    tok = Tokenizer.from_dir(model_dir)
    t0 = time.time()
    result = train(cfg, log=log, overwrite=True)
    seconds = time.time() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    dtype = run_dtype(cfg, torch.device("cpu"))
    model = load_base(model_dir, quant=cfg.model.quant, blocksize=cfg.model.blocksize,
                      double_quant=cfg.model.double_quant, dtype=dtype, device=torch.device("cpu"))
    load_adapter(model, Path(result.out_dir) / "adapter")
    pairs, _ = build_pairs(cfg.data.eval, tok, cfg.data.max_len)
    plan = PairPlan(pairs, 16, pad_token_id=tok.pad_token_id, shuffle=False)
    return {**heldout_accuracy(model, plan), "train_seconds": round(seconds, 1), "steps": result.steps,
            "peak_rss_mb": round(rss_mb)}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    print(json.dumps(run_toy(args.out, args.steps), indent=2))
