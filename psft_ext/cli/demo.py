"""``psft demo``: the PSFT paper's fine-tuning regime at toy scale, several seeds, no downloads.

The regime follows Zhu et al. ("Proximal Supervised Fine-Tuning", ICLR 2026): a model with prior
capabilities is fine-tuned on a small fixed training set of a new task, revisited for several
epochs, at a small constant learning rate after a 10-step warm-up (AdamW, weight decay 0.1, grad
clip 1.0); old log-probs are computed once per batch of 64 sequences, which then gives 8
optimizer steps on mini-batches of 8 (PSFT: clip 0.2 / 0.28, token-mean). SFT is the same loop
with one optimizer step per old policy (ratio exactly 1, SFT's gradient).

Per seed:

1. A tiny Llama (built from a config) with a character tokenizer made in code is pre-trained on
   copy, reverse, sort (words of 3 to 7 letters) and 2-digit addition: its prior capabilities.
2. A fixed training set of the new task (reverse the letters, then shift each to the next one
   of the alphabet) on words of 5 letters is drawn, and three copies of the pre-trained model
   are fine-tuned on it with the same mini-batches in the same order: SFT at the learning rate
   ``LR``, SFT at ``LR / 2`` (a slower learner, to tell "PSFT learns more slowly" apart from
   "PSFT keeps more at the same in-domain accuracy"), and PSFT at ``LR``.
3. Measured along each run: greedy exact-match accuracy on held-out prompts of the new task
   (in-domain), on the new task with words of 4 and 6 letters, never trained on (out-of-domain),
   and on the pre-training tasks (retention); the mean token entropy and negative
   log-likelihood of the held-out in-domain completions; PSFT's clip fraction.

The report gives every number as the mean and the standard deviation across seeds, and calls a
difference between two runs a difference only when the gap between their means exceeds the
larger of their two standard deviations.
"""

import math
import os
import platform
import random
import statistics
import sys
import time

import torch

from .common import DEFAULT_SEED, CLIError, progress, write_json_atomic

# ----------------------------------------------------------------------------- tokenizer

PAD, EOS = 0, 1
LETTERS = "abcdefgh"
CHARS = "0123456789" + LETTERS + "CRSAM+="
STOI = {c: i + 2 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
VOCAB_SIZE = len(CHARS) + 2


def encode(text):
    return [STOI[c] for c in text]


def decode(ids):
    return "".join(ITOS.get(int(i), "?") for i in ids)


# ----------------------------------------------------------------------------- tasks
# A task maps (rng, word length) to (prompt, completion).

PRIOR_LENGTHS = (3, 4, 5, 6, 7)
TARGET_LENGTH = 5            # the new task's training set and in-domain held-out set
OOD_LENGTHS = (4, 6)         # the new task on other word lengths: never trained on


def _word(rng, length):
    return "".join(rng.choice(LETTERS) for _ in range(length))


def _shift(s):
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def task_copy(rng, length):
    s = _word(rng, length)
    return "C" + s + "=", s


def task_reverse(rng, length):
    s = _word(rng, length)
    return "R" + s + "=", s[::-1]


def task_sort(rng, length):
    s = _word(rng, length)
    return "S" + s + "=", "".join(sorted(s))


def task_add(rng, length):
    a, b = rng.randrange(100), rng.randrange(100)
    return f"A{a:02d}+{b:02d}=", f"{a + b:03d}"


def task_target(rng, length):
    """The new task: reverse, then shift each letter by one (h wraps to a)."""
    s = _word(rng, length)
    return "M" + s + "=", _shift(s[::-1])


PRIOR_TASKS = {"copy": task_copy, "reverse": task_reverse, "sort": task_sort, "add": task_add}


def distinct(task, n, rng, lengths, exclude=()):
    """n instances with distinct prompts, none in ``exclude``, lengths taken in turn."""
    seen, out = set(exclude), []
    i = 0
    while len(out) < n:
        p, c = task(rng, lengths[i % len(lengths)])
        if p not in seen:
            seen.add(p)
            out.append((p, c))
            i += 1
    return out


def prior_examples(n, rng, exclude):
    """n pre-training examples: a task and a word length drawn uniformly, never a held-out
    prompt."""
    out = []
    names = list(PRIOR_TASKS)
    while len(out) < n:
        p, c = PRIOR_TASKS[rng.choice(names)](rng, rng.choice(PRIOR_LENGTHS))
        if p not in exclude:
            out.append((p, c))
    return out


def collate(pairs):
    """Right-padded batch; the loss covers the completion and the end token only."""
    seqs = [(encode(p), encode(c) + [EOS]) for p, c in pairs]
    longest = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), longest), PAD)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    labels = torch.full((len(seqs), longest), -100)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- model

def tiny_llama(seed, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=EOS)
    return LlamaForCausalLM(config)


@torch.no_grad()
def accuracy(model, examples):
    """Greedy exact-match accuracy: the completion and the end token must be generated. Prompts
    are decoded in batches of one prompt and completion length (no padding)."""
    was_training = model.training
    model.eval()
    groups = {}
    for p, c in examples:
        groups.setdefault((len(p), len(c)), []).append((p, c))
    correct = 0
    for chunk in groups.values():
        ids = torch.tensor([encode(p) for p, _ in chunk])
        want = torch.tensor([encode(c) + [EOS] for _, c in chunk])
        for _ in range(want.shape[1]):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        correct += int((ids[:, -want.shape[1]:] == want).all(dim=1).sum())
    model.train(was_training)
    return correct / len(examples)


@torch.no_grad()
def completion_stats(model, examples):
    """Mean token entropy (nats) of the model's predictive distribution at the completion
    positions of the examples (teacher-forced), and their mean negative log-likelihood."""
    from ..labels import shift_labels
    from ..loss import token_logprobs
    was_training = model.training
    model.eval()
    batch = collate(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    targets = shift_labels(batch["labels"])
    logp, ent = token_logprobs(logits, targets, with_entropy=True)
    keep = targets != -100
    model.train(was_training)
    n = keep.sum().clamp(min=1)
    return float(ent[keep].sum() / n), float(-logp[keep].sum() / n)


def evaluate(model, sets):
    out = {"in_domain_acc": accuracy(model, sets["in_domain"])}
    ood = {str(n): accuracy(model, sets[f"ood_{n}"]) for n in OOD_LENGTHS}
    out["ood_acc_by_length"] = ood
    out["ood_acc"] = sum(ood.values()) / len(ood)
    prior = {name: accuracy(model, sets[name]) for name in PRIOR_TASKS}
    out["prior_acc_by_task"] = prior
    out["prior_acc"] = sum(prior.values()) / len(prior)
    out["entropy"], out["nll"] = completion_stats(model, sets["in_domain"])
    return out


# ----------------------------------------------------------------------------- settings

# The paper's recipe at toy scale (module docstring). LR is the smallest of 3e-3, 1e-3 and 3e-4 at
# which SFT, in pilot runs on seed 42 without PSFT, fitted the training set within the first half
# of the default run and then kept revisiting it: the over-fitting regime the paper studies, at a
# small learning rate. PSFT runs at the same LR; it was not run while LR was chosen.
RECIPE = dict(mini_batch=8, steps_per_old_policy=8, clip_low=0.2, clip_high=0.28,
              warmup_steps=10, weight_decay=0.1, max_grad_norm=1.0)
LR = 3e-4


def _lr(x):
    """3e-4, 1.5e-4: a learning rate as people write it."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


RUNS = (  # name, label, learning rate, optimizer steps per old policy
    ("sft", f"SFT (lr {_lr(LR)})", LR, 1),
    ("sft_low_lr", f"SFT (lr {_lr(LR / 2)})", LR / 2, 1),
    ("psft", f"PSFT (lr {_lr(LR)})", LR, RECIPE["steps_per_old_policy"]),
)
SETTINGS = {
    # default: at most about 5 minutes on 2 CPU cores; quick: about a minute (what CI runs).
    "default": dict(seeds=3, hidden=64, layers=2, pretrain_steps=1500, pretrain_batch=64,
                    pretrain_lr=3e-3, train_examples=256, epochs=10, eval_every=16,
                    eval_size=128),
    "quick": dict(seeds=2, hidden=64, layers=2, pretrain_steps=500, pretrain_batch=64,
                  pretrain_lr=3e-3, train_examples=256, epochs=4, eval_every=32, eval_size=48),
}
# In-domain accuracy levels at which PSFT and an SFT run are compared: the highest one that both
# reached in every seed.
MATCH_LEVELS = (0.9, 0.75, 0.5, 0.25)


def pretrain(model, cfg, seed, exclude, show):
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], weight_decay=0.1)
    steps = cfg["pretrain_steps"]
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    bar = progress(range(steps), show, desc=f"seed {seed}: pre-train", unit="step", leave=False)
    for _ in bar:
        batch = collate(prior_examples(cfg["pretrain_batch"], rng, exclude))
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def epoch_batches(train_set, epochs, seed):
    """The mini-batches of every epoch (a fresh shuffle each), shared by all runs of a seed."""
    batches = []
    for epoch in range(epochs):
        order = list(range(len(train_set)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        mb = RECIPE["mini_batch"]
        for i in range(0, len(order), mb):
            batches.append(collate([train_set[j] for j in order[i:i + mb]]))
    return batches


def finetune(model, batches, lr, steps_per_old_policy, cfg, sets, bar):
    """One fine-tuning run: one optimizer step per mini-batch, old log-probs once per group."""
    from ..integrations.causal_lm import CausalLMPSFT
    from ..integrations.old_policy import (
        OldPolicyGroups,
        compute_old_logprobs,
        count_targets,
    )
    head = CausalLMPSFT(clip_low=RECIPE["clip_low"], clip_high=RECIPE["clip_high"])
    groups = OldPolicyGroups(lambda b: compute_old_logprobs(model, b, head=head),
                             steps_per_old_policy=steps_per_old_policy)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=RECIPE["weight_decay"])
    warmup = RECIPE["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    train_log, evals = [], [dict(step=0, **evaluate(model, sets))]
    every = cfg["eval_every"]
    for i, step in enumerate(groups.steps(batches)):
        num_items = count_targets(step.batches)
        sums = torch.zeros(4)
        for mb in step:
            loss, m = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
            loss.backward()
            n = m.num_tokens
            sums += torch.stack([m.nll * n, m.entropy * n, m.clip_fraction * n, n]).float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        nll, ent, clip = (sums[:3] / sums[3]).tolist()
        train_log.append(dict(step=i + 1, train_nll=nll, train_entropy=ent, clip_fraction=clip))
        if (i + 1) % every == 0 or i + 1 == len(batches):
            window = train_log[-every:]
            evals.append(dict(step=i + 1, **evaluate(model, sets),
                              train_nll=sum(r["train_nll"] for r in window) / len(window),
                              clip_fraction=sum(r["clip_fraction"] for r in window) / len(window)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{nll:.3f}", clip=f"{clip:.2f}", refresh=False)
    return train_log, evals


def run_seed(seed, cfg, show):
    """Pre-training and the fine-tuning runs of one seed: its curves and settings."""
    t_start = time.perf_counter()
    rng = random.Random(seed)
    sets = {}
    for name, task in PRIOR_TASKS.items():
        lengths = PRIOR_LENGTHS if name != "add" else (0,)
        sets[name] = distinct(task, cfg["eval_size"], rng, lengths)
    train_set = distinct(task_target, cfg["train_examples"], rng, (TARGET_LENGTH,))
    train_prompts = {p for p, _ in train_set}
    sets["in_domain"] = distinct(task_target, cfg["eval_size"], rng, (TARGET_LENGTH,),
                                 exclude=train_prompts)
    for n in OOD_LENGTHS:
        sets[f"ood_{n}"] = distinct(task_target, cfg["eval_size"] // len(OOD_LENGTHS), rng, (n,))
    exclude = {p for name in PRIOR_TASKS for p, _ in sets[name]}

    torch.manual_seed(seed)
    model = tiny_llama(seed, cfg["hidden"], cfg["layers"])
    t0 = time.perf_counter()
    pretrain_loss = pretrain(model, cfg, seed, exclude, show)
    pretrained = evaluate(model, sets)
    pretrain_seconds = time.perf_counter() - t0
    print(f"seed {seed}: pre-trained in {pretrain_seconds:.0f}s, prior-task accuracy "
          f"{_pct(pretrained['prior_acc'])}, new task {_pct(pretrained['in_domain_acc'])}",
          flush=True)

    batches = epoch_batches(train_set, cfg["epochs"], seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    for name, label, lr, k in RUNS:
        model.load_state_dict(state)
        torch.manual_seed(seed + 3)
        t0 = time.perf_counter()
        bar = progress(total=len(batches), show=show, desc=f"seed {seed}: {label}", unit="step",
                       leave=False)
        train_log, evals = finetune(model, batches, lr, k, cfg, sets, bar)
        if bar is not None:
            bar.close()
        runs[name] = dict(label=label, lr=lr, steps_per_old_policy=k, train=train_log,
                          evals=evals, seconds=time.perf_counter() - t0)
        last = evals[-1]
        print(f"seed {seed}: {label}: in-domain {_pct(last['in_domain_acc'])}, out-of-domain "
              f"{_pct(last['ood_acc'])}, prior {_pct(last['prior_acc'])}, entropy "
              f"{last['entropy']:.3f}", flush=True)
    return dict(seed=seed, settings=dict(cfg, **RECIPE, seed=seed, lr=LR),
                parameters=sum(p.numel() for p in model.parameters()),
                train_examples=train_set[:4], pretrain_loss=pretrain_loss,
                pretrain_seconds=pretrain_seconds, pretrained=pretrained, runs=runs,
                seconds=time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- summary

def _at_level(evals, level, key):
    """``key`` where in-domain accuracy first reached ``level``, interpolated linearly between
    the two evaluations around the crossing; None when it never did."""
    prev = None
    for e in evals:
        if e["in_domain_acc"] >= level:
            if prev is None or e["in_domain_acc"] == prev["in_domain_acc"]:
                return e[key]
            w = (level - prev["in_domain_acc"]) / (e["in_domain_acc"] - prev["in_domain_acc"])
            return prev[key] + w * (e[key] - prev[key])
        prev = e
    return None


def stats(values):
    """mean, sample standard deviation, min, max of the values (None without values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(mean=statistics.fmean(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))


FINAL_KEYS = ("in_domain_acc", "ood_acc", "prior_acc", "entropy", "nll", "train_nll")


def summarize(seeds):
    """Across seeds: the final measurements of every run, the best in-domain and out-of-domain
    accuracy, the mean clip fraction, and PSFT against each SFT run at equal in-domain accuracy
    (the highest of MATCH_LEVELS that both runs reached in every seed)."""
    out = {"pretrained": {k: stats([s["pretrained"][k] for s in seeds])
                          for k in FINAL_KEYS if k != "train_nll"}, "runs": {}, "matched": {}}
    for name, _, _, _ in RUNS:
        runs = [s["runs"][name] for s in seeds]
        row = {k: stats([r["evals"][-1][k] for r in runs]) for k in FINAL_KEYS}
        row["in_domain_best"] = stats([max(e["in_domain_acc"] for e in r["evals"]) for r in runs])
        row["ood_best"] = stats([max(e["ood_acc"] for e in r["evals"]) for r in runs])
        row["clip_fraction"] = stats([statistics.fmean(t["clip_fraction"] for t in r["train"])
                                      for r in runs])
        row["seconds"] = stats([r["seconds"] for r in runs])
        out["runs"][name] = row
    for name, _, _, k in RUNS:
        if k != 1:
            continue
        reached = min(max(e["in_domain_acc"] for e in s["runs"][n]["evals"])
                      for s in seeds for n in (name, "psft"))
        level = next((lv for lv in MATCH_LEVELS if reached >= lv), None)
        pair = {"level": level}
        if level is not None:
            for n in (name, "psft"):
                pair[n] = {key: stats([_at_level(s["runs"][n]["evals"], level, key)
                                       for s in seeds])
                           for key in ("prior_acc", "ood_acc", "entropy")}
        out["matched"][name] = pair
    return out


def differs(a, b):
    """+1 / -1 when mean a is above / below mean b by more than the larger of the two
    standard deviations across seeds, else 0."""
    gap = a["mean"] - b["mean"]
    if abs(gap) > max(a["std"], b["std"]):
        return 1 if gap > 0 else -1
    return 0


# ----------------------------------------------------------------------------- report

LABELS = {name: label for name, label, _, _ in RUNS}


def _pct(x):
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def _ms(s, pct=True):
    """mean ± standard deviation"""
    if s is None:
        return "n/a"
    if pct:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}%"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def reading(summary, n_seeds):
    """The finding in one paragraph, generated from the numbers whichever way they fall."""
    r, matched = summary["runs"], summary["matched"]
    ps, sft = r["psft"], r["sft"]
    called = []  # the differences that pass the spread rule

    def compare(what, a, b, name_b, pct=True, where=""):
        d = differs(a, b)
        if d:
            called.append(f"{'higher' if d > 0 else 'lower'} {what}{where} than {name_b}")
        verdict = ("no difference beyond the spread" if d == 0 else
                   f"{'higher' if d > 0 else 'lower'} for PSFT")
        return f"{what} {_ms(a, pct)} for PSFT vs {_ms(b, pct)} ({verdict})"

    ref = LABELS["sft"]
    entropy = summary["pretrained"].get("entropy")
    parts = [f"Over {n_seeds} seeds (mean ± standard deviation; a difference is called one only "
             f"when the gap between two means exceeds the larger of their standard "
             f"deviations), at the end of fine-tuning PSFT against {ref}: " + "; ".join([
                 compare("in-domain accuracy", ps["in_domain_acc"], sft["in_domain_acc"], ref),
                 compare("out-of-domain accuracy", ps["ood_acc"], sft["ood_acc"], ref),
                 compare("prior-task accuracy", ps["prior_acc"], sft["prior_acc"], ref),
                 compare("held-out token entropy", ps["entropy"], sft["entropy"], ref,
                         pct=False)])
             + (f"; the pre-trained model's entropy was {_ms(entropy, False)} nats." if entropy
                else ".")]
    for name in matched:
        if name != "sft":
            low = r[name]
            parts.append(f"{LABELS[name]} ended at in-domain {_ms(low['in_domain_acc'])}, "
                         f"out-of-domain {_ms(low['ood_acc'])}, prior tasks "
                         f"{_ms(low['prior_acc'])}, entropy {_ms(low['entropy'], False)}.")
    for name, pair in matched.items():
        if pair["level"] is None:
            parts.append(f"PSFT and {LABELS[name]} did not both reach {_pct(MATCH_LEVELS[-1])} "
                         f"in-domain accuracy in every seed, so they are not compared at equal "
                         f"in-domain accuracy.")
            continue
        a, b = pair["psft"], pair[name]
        at = f" at {_pct(pair['level'])} in-domain accuracy"
        parts.append(f"Where in-domain accuracy first reached {_pct(pair['level'])} (the "
                     f"highest level both reached in every seed), PSFT against {LABELS[name]}: "
                     + compare("prior-task accuracy", a["prior_acc"], b["prior_acc"],
                               LABELS[name], where=at) + "; "
                     + compare("out-of-domain accuracy", a["ood_acc"], b["ood_acc"],
                               LABELS[name], where=at) + ".")
    parts.append(f"PSFT clipped {_ms(ps['clip_fraction'])} of the training tokens on average "
                 f"(those tokens got no gradient; SFT clips none by construction).")
    if called:
        parts.append("By that rule PSFT differed in " + _either_and(called) + "; every other "
                     "comparison is within the spread across seeds.")
    else:
        parts.append("By that rule no comparison shows a difference: every gap is within the "
                     "spread across seeds.")
    parts.append("This is a 2-layer model on synthetic tasks: it tests the mechanism in the "
                 "paper's regime, not the paper's numbers.")
    return " ".join(parts)


def _either_and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def results_table(summary):
    pre = summary["pretrained"]
    lines = ["| run | in-domain acc | out-of-domain acc | prior-task acc | held-out entropy "
             "(nats) | held-out NLL | train NLL | clip fraction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| pre-trained | {_ms(pre['in_domain_acc'])} | {_ms(pre['ood_acc'])} | "
             f"{_ms(pre['prior_acc'])} | {_ms(pre['entropy'], False)} | "
             f"{_ms(pre['nll'], False)} | - | - |"]
    for name, label, _, _ in RUNS:
        s = summary["runs"][name]
        lines.append(f"| {label} | {_ms(s['in_domain_acc'])} | {_ms(s['ood_acc'])} | "
                     f"{_ms(s['prior_acc'])} | {_ms(s['entropy'], False)} | "
                     f"{_ms(s['nll'], False)} | {_ms(s['train_nll'], False)} | "
                     f"{_ms(s['clip_fraction'])} |")
    return "\n".join(lines)


def match_table(summary):
    lines = ["| pair | in-domain level | prior-task acc, PSFT / SFT | out-of-domain acc, "
             "PSFT / SFT | entropy, PSFT / SFT |", "|---|---:|---:|---:|---:|"]
    for name, pair in summary["matched"].items():
        if pair["level"] is None:
            lines.append(f"| PSFT vs {LABELS[name]} | not reached by both | | | |")
            continue
        a, b = pair["psft"], pair[name]
        lines.append(f"| PSFT vs {LABELS[name]} | {_pct(pair['level'])} | "
                     f"{_ms(a['prior_acc'])} / {_ms(b['prior_acc'])} | "
                     f"{_ms(a['ood_acc'])} / {_ms(b['ood_acc'])} | "
                     f"{_ms(a['entropy'], False)} / {_ms(b['entropy'], False)} |")
    return "\n".join(lines)


COLORS = {"sft": "tab:red", "sft_low_lr": "tab:orange", "psft": "tab:blue"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_trajectories(seeds, path, title):
    """Prior-task and out-of-domain accuracy against in-domain accuracy along every run."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, ylabel in ((axes[0], "prior_acc", "prior-task accuracy (retention)"),
                            (axes[1], "ood_acc", "out-of-domain accuracy (4 and 6 letters)")):
        for name, label, _, _ in RUNS:
            for i, s in enumerate(seeds):
                evals = s["runs"][name]["evals"]
                xs = [e["in_domain_acc"] for e in evals]
                ys = [e[key] for e in evals]
                ax.plot(xs, ys, color=COLORS[name], alpha=0.75, lw=1.2, marker=".", ms=4,
                        label=label if i == 0 else None)
                ax.plot(xs[-1:], ys[-1:], color=COLORS[name], marker="o", ms=6, ls="")
        starts = [(s["pretrained"]["in_domain_acc"], s["pretrained"][key]) for s in seeds]
        ax.plot(*zip(*starts), "k^", ms=7, label="pre-trained (start)")
        ax.set_xlabel("in-domain accuracy (held-out, 5 letters)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: each line one run of one seed, from the start (triangle) to the "
                 f"end (circle)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_curves(seeds, path, title):
    """The measurements over fine-tuning steps: mean across seeds, min-max band."""
    plt = _pyplot()
    if plt is None:
        return False
    panels = [("in_domain_acc", "in-domain accuracy"), ("ood_acc", "out-of-domain accuracy"),
              ("prior_acc", "prior-task accuracy (retention)"),
              ("entropy", "token entropy, held-out completions (nats)"),
              ("nll", "NLL: held-out (solid), train (dashed)"),
              ("clip_fraction", "clip fraction (train)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, panel_title) in zip(axes.flat, panels):
        for name, label, _, _ in RUNS:
            keys = [(key, "-")] + ([("train_nll", "--")] if key == "nll" else [])
            for k, style in keys:
                steps = [e["step"] for e in seeds[0]["runs"][name]["evals"]]
                if k in ("clip_fraction", "train_nll"):
                    steps = steps[1:]
                table = [[e[k] for e in s["runs"][name]["evals"] if k in e] for s in seeds]
                mean = [statistics.fmean(col) for col in zip(*table)]
                ax.plot(steps, mean, style, color=COLORS[name],
                        label=label if style == "-" else None)
                ax.fill_between(steps, [min(c) for c in zip(*table)],
                                [max(c) for c in zip(*table)], color=COLORS[name], alpha=0.15,
                                lw=0)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: mean across seeds, band from min to max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def per_task_table(seeds):
    lines = ["| task | pre-trained | " + " | ".join(label for _, label, _, _ in RUNS) + " |",
             "|---|---:|" + "---:|" * len(RUNS)]
    for task in PRIOR_TASKS:
        row = [_ms(stats([s["pretrained"]["prior_acc_by_task"][task] for s in seeds]))]
        for name, _, _, _ in RUNS:
            row.append(_ms(stats([s["runs"][name]["evals"][-1]["prior_acc_by_task"][task]
                                  for s in seeds])))
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_seed_table(seeds):
    lines = ["| seed | pre-trained prior-task acc | "
             + " | ".join(label for _, label, _, _ in RUNS) + " |",
             "|---|---:|" + "---:|" * len(RUNS)]
    for s in seeds:
        row = [_pct(s["pretrained"]["prior_acc"])]
        for name, _, _, _ in RUNS:
            e = s["runs"][name]["evals"][-1]
            row.append(" / ".join(_pct(e[k]) for k in ("in_domain_acc", "ood_acc", "prior_acc")))
        lines.append(f"| {s['seed']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment(threads):
    import psft_ext
    info = psft_ext.build_info()
    return dict(torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), cpu=platform.processor() or platform.machine(),
                threads=threads, psft_ext=psft_ext.__version__,
                kernels={k: v for k, v in info.items() if not isinstance(v, (list, dict))})


def write_report(out_dir, results, plotted):
    cfg, summary, seeds = results["config"], results["summary"], results["seeds"]
    first = seeds[0]
    steps = len(first["runs"]["psft"]["train"])
    env = results["environment"]
    group = RECIPE["mini_batch"] * RECIPE["steps_per_old_policy"]
    runs = ", ".join(label for _, label, _, _ in RUNS)
    figures = ("![trajectories](trajectories.png)\n\n![curves](curves.png)" if plotted else
               "(No plots: matplotlib is not installed; pip install 'psft_ext[demo]'.)")
    text = f"""# PSFT demo: SFT vs PSFT in the paper's regime, at toy scale

Command: `{results['command']}` (mode `{cfg['mode']}`, seeds
{', '.join(str(s['seed']) for s in seeds)}, {env['threads']} CPU thread(s),
{results['seconds']:.0f} s, {results['date']}).

**Setup.** Per seed, a {cfg['layers']}-layer Llama (hidden size {cfg['hidden']},
{first['parameters']:,} parameters, a character tokenizer of {VOCAB_SIZE} ids) is pre-trained for
{cfg['pretrain_steps']} steps on copy, reverse and sort (words of 3 to 7 letters) and 2-digit
addition. Three copies are then fine-tuned on one fixed set of {cfg['train_examples']} examples of
a new task (reverse a 5-letter word and shift each letter to the next one) for {cfg['epochs']}
epochs, {steps} optimizer steps on the same mini-batches of {RECIPE['mini_batch']}: {runs}. The
recipe is the paper's: AdamW, {RECIPE['warmup_steps']} warm-up steps then a constant learning
rate, weight decay {RECIPE['weight_decay']}, grad clip {RECIPE['max_grad_norm']}, token-mean;
PSFT computes old log-probs once per {group} sequences, then takes
{RECIPE['steps_per_old_policy']} optimizer steps on them, clip {RECIPE['clip_low']} /
{RECIPE['clip_high']}; SFT is the same loop with one step per old policy. The learning rate
{_lr(LR)} is the smallest of 3e-3, 1e-3 and 3e-4 at which SFT alone, in pilot runs on seed 42,
fitted the training set within the first half of the run (then kept revisiting it); PSFT runs at
the same rate and was not run while it was chosen. Every {cfg['eval_every']} steps: greedy
exact-match accuracy on {cfg['eval_size']} held-out prompts of the new task (in-domain), on
{cfg['eval_size']} prompts of the new task on 4- and 6-letter words, never trained on
(out-of-domain), and on {cfg['eval_size']} held-out prompts of each pre-training task (prior
tasks); the token entropy and NLL of the held-out in-domain completions (teacher-forced).

**Results** at the end of fine-tuning, mean ± standard deviation over {len(seeds)} seeds:

{results_table(summary)}

At equal in-domain accuracy (the highest of {', '.join(_pct(lv) for lv in MATCH_LEVELS)} that
both runs reached in every seed; values interpolated at the first crossing):

{match_table(summary)}

Prior-task accuracy per task at the end:

{per_task_table(seeds)}

Per seed at the end, in-domain / out-of-domain / prior-task accuracy:

{per_seed_table(seeds)}

{figures}

## Finding

{results['reading']}

## Reproducing

Every run is seeded: `{results['command']}` with the same build of psft_ext (CPU kernels
`{env['kernels'].get('cpu_kernels')}`), torch {env['torch']} and {env['threads']} CPU thread(s)
gives the same numbers; another torch, thread count or kernel set rounds differently and gives
other numbers. The times depend on the machine ({env['cpu']}). Every number, per seed and per
evaluation, is in `results.json`.
"""
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- entry point

def _check(args):
    if args.seeds is not None and args.seeds < 2:
        raise CLIError(f"--seeds must be at least 2 (the report compares differences with the "
                       f"spread across seeds), got {args.seeds}")
    if not 0 <= args.seed < 2**32 - 1000:
        raise CLIError(f"--seed must be in [0, {2**32 - 1000}), got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir} exists and is not a folder")


def run(args):
    _check(args)
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CLIError(f"psft demo needs transformers ({err}); install the demo's dependencies "
                       f"with pip install 'psft_ext[demo]'")
    mode = "quick" if args.quick else "default"
    cfg = dict(SETTINGS[mode])
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    # One thread by default: the model is so small that more threads only add synchronization,
    # and on a busy machine (a shared CI runner) extra threads stall each other badly.
    torch.set_num_threads(args.threads or 1)
    cfg.update(mode=mode, base_seed=args.seed)
    show = not args.no_progress and sys.stderr.isatty()
    out_dir = args.output_dir
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()

    seeds = [run_seed(args.seed + i, cfg, show) for i in range(cfg["seeds"])]
    summary = summarize(seeds)
    cmd = "psft demo" + (" --quick" if args.quick else "")
    if args.seeds is not None:
        cmd += f" --seeds {args.seeds}"
    if args.seed != DEFAULT_SEED:
        cmd += f" --seed {args.seed}"
    if args.threads not in (None, 1):
        cmd += f" --threads {args.threads}"
    results = dict(command=cmd, date=time.strftime("%Y-%m-%d"), config=cfg,
                   recipe=dict(RECIPE, lr=LR,
                               runs=[dict(name=n, label=lb, lr=lr, steps_per_old_policy=k)
                                     for n, lb, lr, k in RUNS]),
                   environment=environment(torch.get_num_threads()),
                   seeds=seeds, summary=summary)
    results["reading"] = reading(summary, len(seeds))
    results["seconds"] = time.perf_counter() - t_start
    title = f"psft demo ({mode}, {len(seeds)} seeds)"
    plotted = plot_trajectories(seeds, os.path.join(out_dir, "trajectories.png"), title)
    plotted = plot_curves(seeds, os.path.join(out_dir, "curves.png"), title) and plotted
    write_report(out_dir, results, plotted)
    # results.json last: its presence means the folder is complete.
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    print()
    print(results_table(summary))
    print()
    print(results["reading"])
    print(f"\nwrote {out_dir}/report.md, " + ("trajectories.png, curves.png, " if plotted else "")
          + f"results.json ({results['seconds']:.0f}s)")
    return 0
