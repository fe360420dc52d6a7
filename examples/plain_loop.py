"""PSFT in a plain PyTorch loop: a tiny Llama (built from a config, no download) learns 2-digit
additions written as characters, with PSFT's old-policy groups.

    python examples/plain_loop.py                  # 100 optimizer steps, well under a minute on CPU
    python examples/plain_loop.py --max-steps 4    # a smoke run

The loop differs from an SFT loop in two places: the batches come from ``OldPolicyGroups`` (which
attaches the old policy's log-probs, computed once per group of ``--steps-per-old-policy`` optimizer
steps with the weights of the group's start), and the loss is ``CausalLMPSFT.loss`` (the fused PSFT
loss from the final hidden states and the LM head, token mean over the optimizer step).
"""

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from psft_ext.integrations.causal_lm import CausalLMPSFT
from psft_ext.integrations.old_policy import OldPolicyGroups, compute_old_logprobs, count_targets

# Characters of the task; id 0 pads, id 1 ends a sequence.
CHARS = "0123456789+="
PAD, EOS = 0, 1
STOI = {c: i + 2 for i, c in enumerate(CHARS)}


def encode(text):
    return [STOI[c] for c in text]


def addition_examples(n, seed):
    """"a+b=" is the prompt (no loss), "c" and the end token are the completion."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        prompt, completion = encode(f"{a}+{b}="), encode(str(a + b)) + [EOS]
        ids = torch.tensor(prompt + completion)
        labels = ids.clone()
        labels[:len(prompt)] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(features):
    """Right padding (pad id, attention mask 0, labels -100)."""
    longest = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), longest), PAD),
             "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
             "labels": torch.full((len(features), longest), -100)}
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n] = f["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = f["labels"]
    return batch


def tiny_llama(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(CHARS) + 2, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, pad_token_id=PAD, eos_token_id=EOS,
                         bos_token_id=EOS)
    return LlamaForCausalLM(config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--steps-per-old-policy", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = tiny_llama(args.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    head = CausalLMPSFT(clip_low=0.2, clip_high=0.28)  # the authors' trust region
    groups = OldPolicyGroups(lambda batch: compute_old_logprobs(model, batch, head=head),
                             steps_per_old_policy=args.steps_per_old_policy)

    examples = addition_examples(args.max_steps * args.grad_accum * args.batch_size, args.seed)
    loader = torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    history = []
    for step_index, step in enumerate(groups.steps(loader, micro_batches_per_step=args.grad_accum,
                                                   max_steps=args.max_steps)):
        num_items = count_targets(step.batches)  # token mean over the whole optimizer step
        sums = torch.zeros(5)
        for mb in step:
            loss, metrics = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
            loss.backward()
            n = metrics.num_tokens
            sums += torch.stack([metrics.nll * n, metrics.entropy * n, metrics.clip_fraction * n,
                                 metrics.ratio_mean * n, n])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        nll, entropy, clip, ratio = (sums[:4] / sums[4]).tolist()
        history.append({"step": step_index + 1, "index_in_group": step.index_in_group,
                        "nll": nll, "entropy": entropy, "clip_fraction": clip, "ratio_mean": ratio})
        if (step_index + 1) % args.log_every == 0 or step_index + 1 == args.max_steps:
            print(f"step {step_index + 1:4d} (group step {step.index_in_group}) nll {nll:.3f} "
                  f"entropy {entropy:.3f} clip_fraction {clip:.3f} ratio_mean {ratio:.4f}")
    return history


if __name__ == "__main__":
    main()
