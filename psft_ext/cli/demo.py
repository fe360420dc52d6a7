"""``psft demo``: a small, CPU-sized replication of PSFT's central claims, with no downloads.

1. A tiny Llama (built from a config) and a character tokenizer made in code are pre-trained on a
   mix of synthetic tasks: copy, reverse, sort (strings of letters) and 2-digit addition. These
   are the model's "prior capabilities".
2. Two copies of that model are fine-tuned on a new task (the target domain: reverse the letters
   and shift each one to the next letter of the alphabet) with SFT and with PSFT: the same batches
   in the same order, the same optimizer, learning rate and number of steps. Both runs go through
   ``OldPolicyGroups`` and ``CausalLMPSFT``: SFT is ``steps_per_old_policy=1`` (ratio exactly 1,
   SFT's gradient), PSFT the authors' 8 steps per old policy and clips 0.2 / 0.28.
3. Measured during fine-tuning: greedy exact-match accuracy on held-out target prompts (in-domain)
   and on each pre-training task (retention), the mean token entropy of the model's predictive
   distribution on the held-out target completions, and PSFT's clip fraction.
4. A table on stdout; ``report.md``, ``curves.png`` and ``results.json`` (every number) in the
   output folder.

The learning rate of the fine-tuning is deliberately high so that SFT visibly overfits the new
task within the run; the report states what the runs show, whichever way it goes.
"""

import math
import os
import random
import sys
import time

import torch

from .common import CLIError, progress, write_json_atomic

# ----------------------------------------------------------------------------- tokenizer

PAD, EOS = 0, 1
LETTERS = "abcdefgh"
CHARS = "0123456789" + LETTERS + "CRSAM+="
STOI = {c: i + 2 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
VOCAB_SIZE = len(CHARS) + 2
WORD = 5  # letters per string of the letter tasks


def encode(text):
    return [STOI[c] for c in text]


def decode(ids):
    return "".join(ITOS.get(int(i), "?") for i in ids)


# ----------------------------------------------------------------------------- tasks
# Every task maps a random instance to (prompt, completion); prompts of one task all have the same
# length, so held-out prompts decode as one batch without padding.

def _word(rng):
    return "".join(rng.choice(LETTERS) for _ in range(WORD))


def _shift(s):
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def task_copy(rng):
    s = _word(rng)
    return "C" + s + "=", s


def task_reverse(rng):
    s = _word(rng)
    return "R" + s + "=", s[::-1]


def task_sort(rng):
    s = _word(rng)
    return "S" + s + "=", "".join(sorted(s))


def task_add(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    return f"A{a:02d}+{b:02d}=", f"{a + b:03d}"


def task_target(rng):
    """The new task: reverse, then shift each letter by one (h wraps to a)."""
    s = _word(rng)
    return "M" + s + "=", _shift(s[::-1])


PRIOR_TASKS = {"copy": task_copy, "reverse": task_reverse, "sort": task_sort, "add": task_add}
TARGET_TASK = "reverse_shift"


def held_out(task, n, seed):
    """n distinct instances of a task, drawn with their own seed."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p, c = task(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, c))
    return out


def sample_examples(tasks, n, rng, exclude):
    """n training examples, each from a task drawn uniformly, never a held-out prompt."""
    out = []
    names = list(tasks)
    while len(out) < n:
        p, c = tasks[rng.choice(names)](rng)
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
def accuracy(model, examples, batch_size=256):
    """Greedy exact-match accuracy: the completion and the end token must be generated."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids = torch.tensor([encode(p) for p, _ in chunk])
        want = torch.tensor([encode(c) + [EOS] for _, c in chunk])
        for _ in range(want.shape[1]):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        got = ids[:, -want.shape[1]:]
        correct += int((got == want).all(dim=1).sum())
    model.train(was_training)
    return correct / len(examples)


@torch.no_grad()
def completion_entropy(model, examples):
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


def evaluate(model, evalsets):
    out = {"target_acc": accuracy(model, evalsets[TARGET_TASK])}
    prior = {name: accuracy(model, evalsets[name]) for name in PRIOR_TASKS}
    out["prior_acc"] = prior
    out["prior_acc_mean"] = sum(prior.values()) / len(prior)
    out["entropy"], out["target_nll"] = completion_entropy(model, evalsets[TARGET_TASK])
    return out


# ----------------------------------------------------------------------------- settings

SETTINGS = {
    # quick: about a minute on 2 busy CPU cores (CI); default: a few minutes.
    "quick": dict(pretrain_steps=500, pretrain_batch=64, pretrain_lr=3e-3, hidden=64, layers=2,
                  finetune_steps=96, finetune_batch=32, finetune_lr=3e-4, eval_every=12,
                  eval_size=64),
    "default": dict(pretrain_steps=1500, pretrain_batch=64, pretrain_lr=3e-3, hidden=64, layers=2,
                    finetune_steps=256, finetune_batch=32, finetune_lr=3e-4, eval_every=16,
                    eval_size=200),
}
STEPS_PER_OLD_POLICY = 8
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def pretrain(model, cfg, seed, exclude, show):
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], weight_decay=0.1)
    steps = cfg["pretrain_steps"]
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    bar = progress(range(steps), show, desc="pre-train", unit="step")
    for _ in bar:
        batch = collate(sample_examples(PRIOR_TASKS, cfg["pretrain_batch"], rng, exclude))
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


def finetune(name, model, batches, steps_per_old_policy, cfg, evalsets, show):
    """One fine-tuning run over ``batches`` (one optimizer step each)."""
    from ..integrations.causal_lm import CausalLMPSFT
    from ..integrations.old_policy import OldPolicyGroups, compute_old_logprobs, count_targets
    head = CausalLMPSFT(clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    groups = OldPolicyGroups(lambda b: compute_old_logprobs(model, b, head=head),
                             steps_per_old_policy=steps_per_old_policy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["finetune_lr"], weight_decay=0.1)
    model.train()
    train_log, evals = [], [dict(step=0, **evaluate(model, evalsets))]
    bar = progress(total=len(batches), show=show, desc=f"fine-tune {name}", unit="step")
    for i, step in enumerate(groups.steps(batches)):
        num_items = count_targets(step.batches)
        sums = torch.zeros(4)
        for mb in step:
            loss, m = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
            loss.backward()
            n = m.num_tokens
            sums += torch.stack([m.nll * n, m.entropy * n, m.clip_fraction * n, n]).float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        nll, ent, clip = (sums[:3] / sums[3]).tolist()
        train_log.append(dict(step=i + 1, nll=nll, train_entropy=ent, clip_fraction=clip))
        if (i + 1) % cfg["eval_every"] == 0 or i + 1 == len(batches):
            evals.append(dict(step=i + 1, **evaluate(model, evalsets)))
            evals[-1]["clip_fraction"] = sum(r["clip_fraction"] for r in train_log[-cfg[
                "eval_every"]:]) / len(train_log[-cfg["eval_every"]:])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{nll:.3f}", ent=f"{ent:.3f}", clip=f"{clip:.2f}", refresh=False)
    if bar is not None:
        bar.close()
    return train_log, evals


# ----------------------------------------------------------------------------- report

def summarize(pre, runs):
    base_prior = pre["prior_acc_mean"]
    out = {}
    for name, run in runs.items():
        last = run["evals"][-1]
        clips = [r["clip_fraction"] for r in run["train"]]
        out[name] = {
            "target_acc_final": last["target_acc"],
            "target_acc_best": max(e["target_acc"] for e in run["evals"]),
            "prior_acc_final": last["prior_acc_mean"],
            "retention": last["prior_acc_mean"] / base_prior if base_prior > 0 else float("nan"),
            "prior_acc_min": min(e["prior_acc_mean"] for e in run["evals"]),
            "entropy_start": run["evals"][0]["entropy"],
            "entropy_final": last["entropy"],
            "entropy_min": min(e["entropy"] for e in run["evals"]),
            "clip_fraction_mean": sum(clips) / len(clips),
            # Forgetting compared at equal in-domain progress: a method that learns the new task
            # more slowly also forgets more slowly, which the final numbers alone would hide.
            "step_target_90": next((e["step"] for e in run["evals"] if e["target_acc"] >= 0.9),
                                   None),
            "prior_acc_at_target_90": next((e["prior_acc_mean"] for e in run["evals"]
                                            if e["target_acc"] >= 0.9), None),
            "entropy_at_target_90": next((e["entropy"] for e in run["evals"]
                                          if e["target_acc"] >= 0.9), None),
            "steps": len(run["train"]),
            "seconds": run["seconds"],
        }
    return out


def _pct(x):
    return "n/a" if x != x else f"{100 * x:.1f}%"


def reading(pre, summary):
    """One honest paragraph generated from the numbers."""
    s, p = summary["sft"], summary["psft"]
    parts = [f"Before fine-tuning the model solved {_pct(pre['prior_acc_mean'])} of the held-out "
             f"pre-training prompts and {_pct(pre['target_acc'])} of the target prompts."]
    parts.append(f"After {s['steps']} steps, SFT reached {_pct(s['target_acc_final'])} on the "
                 f"target task and PSFT {_pct(p['target_acc_final'])} (best during the run: "
                 f"{_pct(s['target_acc_best'])} vs {_pct(p['target_acc_best'])}).")
    parts.append(f"PSFT kept {_pct(p['retention'])} of the prior accuracy, SFT "
                 f"{_pct(s['retention'])}" + (
                     "; PSFT retained more." if p["retention"] > s["retention"] + 0.02 else
                     "; PSFT did not retain more than SFT here." if p["retention"] < s["retention"]
                     - 0.02 else "; the difference is within 2 points, i.e. no clear difference."))
    if s["prior_acc_at_target_90"] is not None and p["prior_acc_at_target_90"] is not None:
        a, b = s["prior_acc_at_target_90"], p["prior_acc_at_target_90"]
        parts.append(f"At the first evaluation with at least 90% target accuracy (step "
                     f"{s['step_target_90']} for SFT, {p['step_target_90']} for PSFT) the prior "
                     f"accuracy was {_pct(a)} for SFT and {_pct(b)} for PSFT" + (
                         ": at equal in-domain progress PSFT forgot less." if b > a + 0.02 else
                         ": at equal in-domain progress PSFT did not forget less." if b <= a + 0.02
                         else "."))
        ea, eb = s["entropy_at_target_90"], p["entropy_at_target_90"]
        parts.append(f"The held-out entropy at that point was {ea:.3f} nats for SFT and {eb:.3f} "
                     f"for PSFT.")
    ent = (f"The mean token entropy on held-out target completions went from "
           f"{s['entropy_start']:.3f} to {s['entropy_final']:.3f} nats under SFT and to "
           f"{p['entropy_final']:.3f} under PSFT")
    # A difference counts when it is both relative (10%) and absolute (0.01 nats): near zero
    # entropy, 0.008 vs 0.007 is noise, not a kept entropy.
    diff = p["entropy_final"] - s["entropy_final"]
    if diff > max(0.1 * s["entropy_final"], 0.01):
        ent += ": PSFT kept a higher entropy."
    elif -diff > max(0.1 * s["entropy_final"], 0.01):
        ent += ": PSFT did not keep a higher entropy than SFT here."
    else:
        ent += ": no clear difference."
    parts.append(ent)
    parts.append(f"PSFT's clip fraction averaged {_pct(p['clip_fraction_mean'])} of the target "
                 f"tokens (those tokens got no gradient); SFT's is 0 by construction.")
    if p["target_acc_final"] < s["target_acc_final"] - 0.02:
        parts.append("PSFT's trust region also slowed in-domain learning within this budget.")
    parts.append("This is one seed of a tiny model on synthetic tasks: it shows the mechanism, "
                 "not the paper's numbers.")
    return " ".join(parts)


def table(pre, summary):
    lines = ["| run | target acc | prior acc (retention) | entropy start -> final | "
             "mean clip fraction | steps | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| pre-trained | {_pct(pre['target_acc'])} | {_pct(pre['prior_acc_mean'])} | "
             f"{pre['entropy']:.3f} | - | - | - |"]
    for name, label in (("sft", "SFT"), ("psft", f"PSFT (K={STEPS_PER_OLD_POLICY})")):
        r = summary[name]
        lines.append(f"| {label} | {_pct(r['target_acc_final'])} | {_pct(r['prior_acc_final'])} "
                     f"({_pct(r['retention'])}) | {r['entropy_start']:.3f} -> "
                     f"{r['entropy_final']:.3f} | {_pct(r['clip_fraction_mean'])} | "
                     f"{r['steps']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def per_task_table(pre, runs):
    lines = ["| task | pre-trained | SFT final | PSFT final |", "|---|---:|---:|---:|"]
    for task in PRIOR_TASKS:
        lines.append(f"| {task} | {_pct(pre['prior_acc'][task])} | "
                     f"{_pct(runs['sft']['evals'][-1]['prior_acc'][task])} | "
                     f"{_pct(runs['psft']['evals'][-1]['prior_acc'][task])} |")
    return "\n".join(lines)


def plot(runs, path):
    """The curves as a PNG; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("target_acc", "target-task accuracy (in-domain)"),
              ("prior_acc_mean", "pre-training tasks accuracy (retention)"),
              ("entropy", "token entropy, held-out target (nats)"),
              ("clip_fraction", "clip fraction (train)")]
    for ax, (key, title) in zip(axes.flat, panels):
        for name, label, color in (("sft", "SFT", "tab:red"), ("psft", "PSFT", "tab:blue")):
            if key == "clip_fraction":
                xs = [r["step"] for r in runs[name]["train"]]
                ys = [r["clip_fraction"] for r in runs[name]["train"]]
            else:
                xs = [e["step"] for e in runs[name]["evals"]]
                ys = [e[key] for e in runs[name]["evals"]]
            ax.plot(xs, ys, label=label, color=color, marker="" if key == "clip_fraction" else ".")
        ax.set_title(title)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir, results, show_cmd, plotted):
    pre, summary, runs = results["pretrained"], results["summary"], results["runs"]
    cfg = results["config"]
    figure = ("![curves](curves.png)" if plotted else
              "(No plot: matplotlib is not installed; pip install 'psft_ext[demo]'.)")
    text = f"""# PSFT demo: SFT vs PSFT on a tiny model

Command: `{show_cmd}` (mode `{cfg['mode']}`, seed {cfg['seed']}, {cfg['threads']} CPU threads,
total {results['seconds']:.0f} s).

A {cfg['layers']}-layer Llama (hidden size {cfg['hidden']}, {results['parameters']:,} parameters,
character tokenizer of {VOCAB_SIZE} ids) was pre-trained for {cfg['pretrain_steps']} steps on
copy / reverse / sort / 2-digit addition, then fine-tuned for {cfg['finetune_steps']} steps (batch
{cfg['finetune_batch']}, AdamW lr {cfg['finetune_lr']}, weight decay 0.1, grad clip 1.0) on a new
task (reverse the letters and shift each to the next one) with SFT and with PSFT
(K = {STEPS_PER_OLD_POLICY} optimizer steps per old policy, clip {CLIP_LOW} / {CLIP_HIGH}), on
the same batches in the same order. Accuracy is greedy exact match on {cfg['eval_size']} held-out
prompts per task; entropy is the mean token entropy on the held-out target completions.

{table(pre, summary)}

Prior-task accuracy per task:

{per_task_table(pre, runs)}

{figure}

## Reading

{results['reading']}

Every number is in `results.json`.
"""
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- entry point

def run(args):
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CLIError(f"psft demo needs transformers ({err}); install the demo's dependencies "
                       f"with pip install 'psft_ext[demo]'")
    mode = "quick" if args.quick else "default"
    cfg = dict(SETTINGS[mode])
    # One thread by default: the model is so small that more threads only add synchronization,
    # and on a busy machine (a shared CI runner) extra threads stall each other badly.
    torch.set_num_threads(args.threads or 1)
    cfg.update(mode=mode, seed=args.seed, threads=torch.get_num_threads())
    show = not args.no_progress and sys.stderr.isatty()
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()

    evalsets = {name: held_out(task, cfg["eval_size"], args.seed + 100 + i)
                for i, (name, task) in enumerate(list(PRIOR_TASKS.items())
                                                 + [(TARGET_TASK, task_target)])}
    exclude = {p for ex in evalsets.values() for p, _ in ex}

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = tiny_llama(args.seed, cfg["hidden"], cfg["layers"])
    t0 = time.perf_counter()
    pre_losses = pretrain(model, cfg, args.seed, exclude, show)
    pre = evaluate(model, evalsets)
    pre_seconds = time.perf_counter() - t0
    print(f"pre-trained in {pre_seconds:.0f}s: prior-task accuracy "
          f"{', '.join(f'{k} {_pct(v)}' for k, v in pre['prior_acc'].items())}; target "
          f"{_pct(pre['target_acc'])}", flush=True)

    # The fine-tuning data: the same batches, in the same order, for both runs.
    rng = random.Random(args.seed + 2)
    target = {TARGET_TASK: task_target}
    batches = [collate(sample_examples(target, cfg["finetune_batch"], rng, exclude))
               for _ in range(cfg["finetune_steps"])]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    for name, k in (("sft", 1), ("psft", STEPS_PER_OLD_POLICY)):
        model.load_state_dict(state)
        torch.manual_seed(args.seed + 3)
        t0 = time.perf_counter()
        train_log, evals = finetune(name, model, batches, k, cfg, evalsets, show)
        runs[name] = dict(steps_per_old_policy=k, train=train_log, evals=evals,
                          seconds=time.perf_counter() - t0)
        last = evals[-1]
        print(f"{name}: target {_pct(last['target_acc'])}, prior {_pct(last['prior_acc_mean'])}, "
              f"entropy {last['entropy']:.3f}", flush=True)

    summary = summarize(pre, runs)
    results = dict(config=cfg, parameters=sum(p.numel() for p in model.parameters()),
                   tasks=dict(prior=list(PRIOR_TASKS), target=TARGET_TASK,
                              examples={n: held_out(t, 2, 0) for n, t in
                                        list(PRIOR_TASKS.items()) + [(TARGET_TASK, task_target)]}),
                   pretrain_loss=pre_losses, pretrain_seconds=pre_seconds,
                   pretrained=pre, runs=runs, summary=summary,
                   clip=dict(low=CLIP_LOW, high=CLIP_HIGH,
                             steps_per_old_policy=STEPS_PER_OLD_POLICY))
    results["reading"] = reading(pre, summary)
    results["seconds"] = time.perf_counter() - t_start
    plotted = plot(runs, os.path.join(out_dir, "curves.png"))
    cmd = "psft demo" + (" --quick" if args.quick else "") + (
        f" --seed {args.seed}" if args.seed != 0 else "")
    write_report(out_dir, results, cmd, plotted)
    # results.json last: its presence means the folder is complete.
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    print()
    print(table(pre, summary))
    print()
    print(results["reading"])
    print(f"\nwrote {out_dir}/report.md, " + ("curves.png, " if plotted else "") + "results.json "
          f"({results['seconds']:.0f}s)")
    return 0
