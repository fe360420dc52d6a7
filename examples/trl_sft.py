"""PSFT with TRL: ``PSFTTrainer`` / ``PSFTConfig`` from ``psft_ext.integrations.trl`` in place of
``trl.SFTTrainer`` / ``trl.SFTConfig``. TRL's data handling is unchanged: here a conversational
dataset rendered by a chat template, trained on the assistant turns only (``assistant_only_loss``).

A tiny Llama (built from a config) and a word-level tokenizer built in code (no download) learn
2-digit additions: the user says "1 2 + 3 4", the assistant answers "4 6".

    python examples/trl_sft.py                  # ~60 optimizer steps, well under a minute on CPU
    python examples/trl_sft.py --max-steps 4    # a smoke run
"""

import argparse
import os
import random

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from psft_ext.integrations.trl import PSFTConfig, PSFTTrainer  # noqa: E402

SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = ["user", "assistant", ":", "+"] + [str(d) for d in range(10)]

# {% generation %} marks the assistant's tokens: TRL turns everything else into -100 labels.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <eos>{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tokenizer():
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def spaced(number):
    return " ".join(str(number))


def conversations(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        rows.append({"messages": [
            {"role": "user", "content": f"{spaced(a)} + {spaced(b)}"},
            {"role": "assistant", "content": spaced(a + b)},
        ]})
    return Dataset.from_list(rows)


def tiny_llama(tok, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--steps-per-old-policy", type=int, default=8)
    parser.add_argument("--output-dir", default="psft-trl-example")
    parser.add_argument("--report-to", default="none")
    args = parser.parse_args(argv)

    tok = tokenizer()
    config = PSFTConfig(
        output_dir=args.output_dir,
        steps_per_old_policy=args.steps_per_old_policy,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=3e-3, weight_decay=0.1, warmup_steps=5, max_grad_norm=1.0,
        assistant_only_loss=True, max_length=64,
        bf16=False, gradient_checkpointing=False,  # full precision: a tiny model on CPU
        logging_steps=10, save_strategy="no", report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
    )
    trainer = PSFTTrainer(model=tiny_llama(tok, 0), args=config, processing_class=tok,
                          train_dataset=conversations(args.max_steps * 32, seed=0))
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
