"""The bundled demo task: support tickets in free text -> a fixed JSON schema.

A seeded generator, no download. Each ticket is assembled from phrasing pools (greetings,
how the customer names themself, how the order is referenced, how the problem is told,
urgency cues, sign-offs) plus distractors (tracking numbers, phone numbers, dates, counts)
and optional fields (order id, email). Every pool is split in two disjoint halves: the
training split draws only from the first, the held-out split only from the second, so the
held-out tickets share no template wording, names or products with the training tickets.

Schema (keys always present, in this order; null when the ticket does not say):
    {"name": str, "order": str|null, "product": str, "issue": one of ISSUES,
     "urgent": bool, "email": str|null}
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ISSUES = ("refund", "damaged", "late", "wrong_item", "billing", "cancel")
SYSTEM = ("Extract the support ticket as JSON with keys name, order, product, issue "
          "(refund|damaged|late|wrong_item|billing|cancel), urgent (true/false), email. "
          "Use null when a value is missing.")

FIRST = ["Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Priya", "Noah", "Elena", "Omar",
         "Chloe", "Mateo", "Hannah", "Ravi", "Ingrid", "Diego", "Yuki", "Fatima", "Lucas", "Zoe",
         "Tomasz", "Amara", "Felix", "Leila", "Oscar", "Mei", "Samuel", "Nadia", "Hugo", "Asha"]
LAST = ["Garcia", "Smith", "Khan", "Tanaka", "Rossi", "Murphy", "Patel", "Johnson", "Petrova",
        "Haddad", "Martin", "Lopez", "Schmidt", "Iyer", "Larsen", "Fernandez", "Sato", "Ali",
        "Silva", "Brown", "Nowak", "Okafor", "Weber", "Rahimi", "Berg", "Chen", "Cohen", "Novak",
        "Dubois", "Mensah"]
PRODUCTS = ["wireless headphones", "standing desk", "espresso machine", "running shoes",
            "laptop sleeve", "smart thermostat", "air fryer", "yoga mat", "office chair",
            "bluetooth speaker", "electric kettle", "winter jacket", "phone case", "desk lamp",
            "robot vacuum", "hiking backpack", "gaming mouse", "blender", "monitor arm",
            "water bottle", "mechanical keyboard", "baby stroller", "rice cooker", "tent",
            "fitness tracker", "coffee grinder", "duvet cover", "webcam", "camping stove",
            "soundbar"]
GREET = ["Hi,", "Hello there,", "Dear support team,", "Hey,", "Good morning,", "To whom it may concern,",
         "Hi team,", "Greetings,", "Hello,", "Good afternoon,"]
SELF = ["My name is {name}.", "This is {name} writing.", "{name} here.", "I'm {name}.",
        "It's {name} again.", "You're speaking with {name}.", "This is {name}.",
        "I am {name}, a long-time customer.", "My name's {name}.", "Writing on behalf of myself, {name}."]
SIGN = ["Thanks, {name}", "Regards,\n{name}", "Best, {name}", "Cheers,\n{name}", "- {name}",
        "Sincerely, {name}", "Many thanks,\n{name}", "Kind regards, {name}", "Thank you! {name}",
        "Yours, {name}"]
ORDER = ["My order number is {order}.", "This is about order {order}.", "Order #{order}.",
         "(order ref {order})", "I placed order {order} last week.", "The order ID is {order}.",
         "Regarding my order {order}:", "Ref: {order}.", "It was order {order}.",
         "Order {order} is the one I mean."]
ISSUE_TEXT = {
    "refund": ["I would like my money back for the {product}.", "Please refund the {product}, I no longer want it.",
               "Can I get a refund on the {product}?", "I returned the {product} and want my refund.",
               "I want to return the {product} for a full refund.", "How do I get reimbursed for the {product}?",
               "Requesting a refund for the {product}.", "The {product} isn't for me, please give me my money back."],
    "damaged": ["The {product} arrived broken.", "My {product} came with a cracked part.",
                "The box was crushed and the {product} inside is damaged.", "The {product} stopped working on day one, it looks damaged.",
                "The {product} was smashed when I opened the package.", "There's a big dent in the {product}.",
                "The {product} is scratched and one piece snapped off.", "When it came, the {product} was in pieces."],
    "late": ["The {product} still hasn't arrived.", "My {product} is two weeks late.",
             "Where is my {product}? It was due days ago.", "The delivery of the {product} is very overdue.",
             "I'm still waiting on the {product}, the delivery date passed.", "The {product} never showed up on the promised date.",
             "Tracking hasn't moved and the {product} is late.", "It's been ages and no sign of the {product}."],
    "wrong_item": ["I ordered a {product} but received something else.", "You sent me the wrong item instead of the {product}.",
                   "The package had a different product, not the {product}.", "Instead of the {product} I got someone else's order.",
                   "This isn't the {product} I ordered.", "I got the wrong model, I wanted the {product}.",
                   "The parcel contained the wrong thing; where is my {product}?", "Wrong product delivered, I paid for a {product}."],
    "billing": ["I was charged twice for the {product}.", "My card was billed the wrong amount for the {product}.",
                "There's an extra charge on my statement for the {product}.", "The invoice for the {product} is incorrect.",
                "You billed me for the {product} but I had a coupon.", "I see a duplicate payment for the {product}.",
                "The price charged for the {product} is higher than listed.", "Why was I charged a fee on the {product}?"],
    "cancel": ["Please cancel my order for the {product}.", "I need to cancel the {product} before it ships.",
               "Cancel the {product}, I changed my mind.", "I'd like to cancel the {product} purchase.",
               "Stop the order for the {product}, I don't need it anymore.", "Can you cancel the {product}? Ordered by mistake.",
               "Please don't ship the {product}, cancel it.", "I want to call off the order for the {product}."],
}
URGENT = ["This is urgent, please respond ASAP.", "I need this fixed today!", "URGENT: please help right away.",
          "Please treat this as high priority.", "I need an answer immediately.", "This is time-sensitive.",
          "Please hurry, it's an emergency.", "I need a resolution within the hour."]
CALM = ["No rush, whenever you get a chance.", "Thanks for your help.", "Take your time.",
        "Looking forward to hearing from you.", "Appreciate it.", "Let me know when you can.",
        "Have a nice day.", "Thanks in advance."]
EMAIL = ["You can reach me at {email}.", "My email is {email}.", "Contact: {email}", "Reply to {email} please.",
         "Email me at {email}.", "Best address to reach me: {email}", "Please write to {email}.", "({email})"]
DISTRACT = ["The tracking number was {track}.", "I called on {date} but nobody answered.",
            "My phone is {phone} if needed.", "I have ordered {n} times from you before.",
            "I already emailed on {date}.", "Courier said parcel {track} was out for delivery.",
            "The receipt shows {n} items.", "Ticket opened {date}."]
DOMAINS = ["example.com", "mail.test", "inbox.example", "corp.example", "home.test", "post.example"]


def _half(pool, split: str):
    """Disjoint halves of a pool: train takes even positions, held-out the odd ones."""
    return pool[0::2] if split == "train" else pool[1::2]


def make_ticket(rng: random.Random, split: str) -> tuple[str, dict]:
    H = lambda pool: _half(pool, split)  # noqa: E731
    name = f"{rng.choice(H(FIRST))} {rng.choice(H(LAST))}"
    product = rng.choice(H(PRODUCTS))
    issue = rng.choice(ISSUES)
    urgent = rng.random() < 0.35
    order = None
    if rng.random() < 0.75:
        order = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(10000, 99999)}"
    email = None
    if rng.random() < 0.5:
        first, last = name.lower().split()
        email = f"{rng.choice([first, first[0] + last, first + '.' + last])}@{rng.choice(H(DOMAINS))}"
    parts = [rng.choice(H(ISSUE_TEXT[issue])).format(product=product)]
    if order:
        parts.insert(rng.randint(0, 1), rng.choice(H(ORDER)).format(order=order))
    for _ in range(rng.choice([0, 1, 1, 2])):
        track = f"TRK{rng.randint(10 ** 8, 10 ** 9 - 1)}"
        date = f"{rng.choice(['March', 'May', 'June', 'Sept.', 'Oct', 'December'])} {rng.randint(1, 28)}"
        phone = f"+1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
        parts.insert(rng.randint(0, len(parts)), rng.choice(H(DISTRACT)).format(
            track=track, date=date, phone=phone, n=rng.randint(2, 40)))
    parts.append(rng.choice(H(URGENT) if urgent else H(CALM)))
    if email:
        parts.append(rng.choice(H(EMAIL)).format(email=email))
    sign_style = rng.random()
    body = " ".join(parts)
    if sign_style < 0.5:
        text = f"{rng.choice(H(GREET))} {rng.choice(H(SELF)).format(name=name)} {body}"
    else:
        text = f"{rng.choice(H(GREET))} {body}\n{rng.choice(H(SIGN)).format(name=name)}"
    target = {"name": name, "order": order, "product": product, "issue": issue,
              "urgent": urgent, "email": email}
    return text, target


def make_split(n: int, split: str, seed: int) -> list[dict]:
    """n chat records for ``split`` ("train" | "heldout"), deterministic in ``seed``."""
    rng = random.Random(f"{seed}-{split}")
    records = []
    for _ in range(n):
        text, target = make_ticket(rng, split)
        records.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": json.dumps(target)},
        ]})
    return records


def write_task(out_dir, n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> dict:
    """Write train.jsonl and heldout.jsonl; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, fname in (("train", n_train, "train.jsonl"), ("heldout", n_eval, "heldout.jsonl")):
        path = out / fname
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in make_split(n, split, seed):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths


# -- the demo's run: its config (demo.py and the benches use it) ------------------------------
DEMO_CONFIG = {
    "model": {"quant": "nf4", "compute_dtype": "auto"},  # bf16 on a CPU with native bf16
    "adapter": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
    "data": {"max_len": 256, "format": "messages", "pack": True, "mask_prompt": True},
    "train": {"seed": 0, "lr": 1e-3, "max_steps": 50, "batch_size": 6, "grad_accum": 1,
              "warmup_steps": 5, "schedule": "cosine", "clip": 1.0, "log_every": 1,
              "save_every": 20},
    "eval": {"metrics": ["loss", "json", "exact"], "baselines": ["base", "prompted"], "shots": 3,
             "max_new_tokens": 72, "require_lift": 0.2, "batch_size": 20},
}
QUICK = {"train": {"max_steps": 4, "save_every": 0},
         "eval": {"max_items": 4, "max_new_tokens": 24, "require_lift": -1.0}}
N_TRAIN, N_EVAL = 2000, 60

# -- the --rl stage (``leantune demo --rl``): GRPO from the SFT adapter ------------------------
# The adapter starts as a copy of the SFT one, which is also the KL reference. The reward is
# the two metrics the stage is judged on: json_exact (0 or 1) alone gives no signal in a group
# that is all right or all wrong; json_field_acc adds the share of fields right. Sampled from the
# demo's SFT adapter at temperature 0.8, most groups of 8 on training prompts are mixed (all
# fields right: 2.0, one field wrong: 0.83), about 1 in 4 uniform. max_new_tokens: the answers
# take 48.5 tokens on average, 61 at most with the EOS (SmolLM2's tokenizer, 400 tickets of each
# split); a sample still going at 64 is no valid answer anyway.
#
# Measured on an idle 2-core AMD EPYC (avx512_bf16, bf16, 2026-12-03, `leantune demo --rl`): the
# 24 steps took 7.4 min, the sft / sft+rl eval 1.5 min; the demo before it 5.9 min. Held-out
# (60 items), sft -> sft+rl: with lr 1e-4 and temperature 0.8, json_exact 36.7% -> 28.3%
# (-8.3 points [-18.3, +0.0]), json_field_acc -1.1 [-3.6, +1.4]: it fixed some issue / name /
# product fields and learnt to answer email = null where the ticket has one; with lr 3e-5 and
# temperature 1.0 (the values below), json_exact +1.7 points [-3.3, +8.3], json_field_acc
# +0.0 [-1.4, +1.4]. The issue's +5 points is not reached: the held-out errors are unseen
# urgency / issue wording and unseen names and products copied wrong (the pool halves are
# disjoint), which 384 samples on training prompts do not teach (README, "leantune demo --rl").
DEMO_RL_CONFIG = {
    "train": {"objective": "grpo", "seed": 0, "lr": 3e-5, "schedule": "constant", "warmup_steps": 0,
              "max_steps": 24, "batch_size": 2, "grad_accum": 1, "group_size": 8,
              "max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "kl_beta": 0.04,
              "clip_eps": 0.2, "reward": ["json_exact", "json_field_acc"], "reward_weights": [1.0, 1.0],
              "clip": 1.0, "log_every": 1, "save_every": 0},
    # sft against sft+rl only: the baselines were evaluated by the SFT stage
    "eval": {"baselines": [], "require_lift": 0.0},
}
QUICK_RL = {"train": {"max_steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 16},
            "eval": {"max_items": 4, "max_new_tokens": 24}}
RL_TARGET = 0.05  # the issue's lift of held-out json_exact, sft+rl against sft


def rl_config(conf: dict, sft_adapter, out, quick: bool = False) -> dict:
    """The --rl stage's config: the demo's ``conf`` (its model and data paths set) with
    DEMO_RL_CONFIG over it (and QUICK_RL for ``quick``); GRPO writes to ``out`` and starts from
    ``sft_adapter``, its KL reference."""
    rl = {section: dict(values) for section, values in conf.items()}
    for over in (DEMO_RL_CONFIG, QUICK_RL if quick else {}):
        for section, values in over.items():
            rl.setdefault(section, {}).update(values)
    rl["train"].update(out=str(out), reference_adapter=str(sft_adapter))
    return rl


def rl_target_met(rl: dict) -> bool:
    """The issue's acceptance, from the summary's "rl" part: held-out json_exact up by at least
    RL_TARGET with the paired interval above 0, and json_field_acc not lower beyond its
    interval (its upper end at least 0)."""
    exact, field = rl["diff"].get("json_exact") or {}, rl["diff"].get("json_field_acc") or {}
    if None in (exact.get("diff"), exact.get("lo"), field.get("hi")):
        return False
    return exact["diff"] >= RL_TARGET - 1e-9 and exact["lo"] > 0 and field["hi"] >= 0


def demo_toml(conf: dict) -> str:
    """The demo's config dict as TOML (one key a line)."""
    lines = []
    for section, values in conf.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(write_task(sys.argv[1] if len(sys.argv) > 1 else "data/tickets"))
