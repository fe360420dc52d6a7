"""PSFT with the Hugging Face Trainer: ``PSFTTrainer`` / ``PSFTConfig`` in place of ``Trainer`` /
``TrainingArguments``. A tiny Llama (built from a config, no download) learns 2-digit additions
written as characters; the prompt "a+b=" is masked (-100), the answer is trained.

    python examples/hf_trainer.py                  # ~80 optimizer steps, well under a minute on CPU
    python examples/hf_trainer.py --max-steps 4    # a smoke run
    torchrun --nproc_per_node 2 examples/hf_trainer.py --ddp-backend gloo   # DDP on CPU

The Trainer logs nll, entropy, clip_fraction, approx_kl and ratio_mean next to its loss (the PSFT
objective, about -1), so they reach TensorBoard / W&B with ``--report-to``. Checkpoints hold the
old-policy cache: ``--resume`` continues a run exactly, even in the middle of a group.
"""

import argparse
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from psft_ext.integrations.transformers import PSFTConfig, PSFTTrainer

CHARS = "0123456789+="
PAD, EOS = 0, 1
STOI = {c: i + 2 for i, c in enumerate(CHARS)}


class Additions(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        rng = random.Random(seed)
        self.items = []
        for _ in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            prompt = [STOI[c] for c in f"{a}+{b}="]
            ids = torch.tensor(prompt + [STOI[c] for c in str(a + b)] + [EOS])
            labels = ids.clone()
            labels[:len(prompt)] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(features):
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
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(CHARS) + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--steps-per-old-policy", type=int, default=8)
    parser.add_argument("--output-dir", default="psft-trainer-example")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--ddp-backend", default=None)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    args = parser.parse_args(argv)

    config = PSFTConfig(
        output_dir=args.output_dir,
        steps_per_old_policy=args.steps_per_old_policy,  # the authors' recipe: 8
        clip_low=0.2, clip_high=0.28,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=3e-3, weight_decay=0.1, warmup_steps=5, max_grad_norm=1.0,
        logging_steps=10, save_strategy="steps", save_steps=40, save_total_limit=1,
        eval_strategy="steps", eval_steps=40, per_device_eval_batch_size=32,
        report_to=args.report_to, use_cpu=not torch.cuda.is_available(),
        ddp_backend=args.ddp_backend, disable_tqdm=True, seed=0,
    )
    trainer = PSFTTrainer(
        model=tiny_llama(0), args=config, data_collator=collate,
        train_dataset=Additions(args.max_steps * 32, seed=0), eval_dataset=Additions(64, seed=1),
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return trainer


if __name__ == "__main__":
    main()
