"""``psft train``: fine-tune a local causal LM on a local JSONL file with PSFT (or SFT).

Runs :class:`psft_ext.integrations.transformers.PSFTTrainer`; ``--loss sft`` is the same trainer
with one optimizer step per old policy, where the ratio is exactly 1 and the gradient is SFT's.

Output layout (``--output-dir OUT``):

* ``OUT/checkpoints/checkpoint-N``: the Trainer's checkpoints (``--resume`` continues from the
  last one, old-policy cache included).
* ``OUT/final``: the fine-tuned model, its tokenizer and ``metrics.json``. It is written to a
  temporary folder next to it and renamed into place only once the run finished, so a folder named
  ``final`` is always a complete run; an interrupted or failed run leaves checkpoints only.

Everything that can be checked before training (the model folder, the LM head, the JSONL lines and
their lengths) is checked before anything is written.
"""

import json
import os
import shutil
import sys

from .common import CLIError, write_json_atomic

FINAL = "final"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------- data

def _read_jsonl(path):
    """(line number, object) for every non-blank line; a malformed line is an error naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})")
            if not isinstance(obj, dict):
                raise CLIError(f"{path}:{lineno}: expected a JSON object with \"prompt\" and "
                               f"\"completion\" or \"messages\", got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise CLIError(f"{path}: no examples (the file is empty)")
    return rows


def _encode_prompt_completion(tok, obj, where):
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise CLIError(f"{where}: \"prompt\" and \"completion\" must both be strings")
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        c = c + [tok.eos_token_id]
    if not c:
        raise CLIError(f"{where}: the completion is empty after tokenization")
    return p + c, [-100] * len(p) + c


def _encode_messages(tok, obj, where):
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise CLIError(f"{where}: \"messages\" must be a non-empty list of "
                       f"{{\"role\": str, \"content\": str}}")
    if not getattr(tok, "chat_template", None):
        raise CLIError(f"{where}: a chat example, but the tokenizer has no chat template; use "
                       f"\"prompt\" / \"completion\" lines or a tokenizer with a chat template")
    if not any(m["role"] == "assistant" for m in messages):
        raise CLIError(f"{where}: the chat has no assistant message to train on")

    def render(msgs, gen):
        out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                      return_dict=False)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    ids = render(messages, False)
    labels = [-100] * len(ids)
    # Each assistant turn is trained on: its tokens are what the template adds after the prompt
    # that precedes it (the conversation so far plus the generation prompt).
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else []
        upto = render(messages[:i + 1], False)
        if ids[:len(upto)] != upto or upto[:len(before)] != before:
            raise CLIError(f"{where}: the tokenizer's chat template does not render the "
                           f"conversation as a sequence of prefixes; the assistant tokens cannot "
                           f"be located")
        labels[len(before):len(upto)] = ids[len(before):len(upto)]
    return ids, labels


def load_examples(path, tok, max_length):
    examples = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in obj:
            ids, labels = _encode_messages(tok, obj, where)
        elif "prompt" in obj or "completion" in obj:
            ids, labels = _encode_prompt_completion(tok, obj, where)
        else:
            raise CLIError(f"{where}: expected keys \"prompt\" and \"completion\", or "
                           f"\"messages\"; got {sorted(obj)}")
        if len(ids) > max_length:
            raise CLIError(f"{where}: {len(ids)} tokens, longer than the limit of {max_length} "
                           f"(--max-length)")
        if all(label == -100 for label in labels[1:]):
            raise CLIError(f"{where}: nothing to train on (no completion tokens after the first "
                           f"position)")
        examples.append({"input_ids": ids, "labels": labels})
    return examples


class Collator:
    """Right padding: pad id, attention mask 0, labels -100."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, features):
        import torch
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- model

def load_model(path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError / ValueError / KeyError here
        raise CLIError(f"{path}: cannot read the model's config ({err})")
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                         for a in archs):
        raise CLIError(f"{path}: the saved model is {', '.join(archs)}, which has no language-"
                       f"modelling head; psft train needs a causal LM (e.g. LlamaForCausalLM)")
    try:
        # float32 whatever the checkpoint holds (transformers would keep a bf16 checkpoint in
        # bf16): AdamW's updates at fine-tuning learning rates are mostly below bf16's
        # resolution, and --bf16 is mixed precision (autocast over float32 master weights).
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                           dtype=torch.float32)
    except ValueError as err:
        raise CLIError(f"{path}: not loadable as a causal LM ({err})")
    except OSError as err:
        raise CLIError(f"{path}: cannot load the model ({err})")
    head = model.get_output_embeddings()
    if head is None:
        raise CLIError(f"{path}: {type(model).__name__} has no LM head")
    missing = set(info.get("missing_keys", ()))
    head_names = {n for n, p in model.named_parameters() if p is head.weight}
    if head_names and head_names <= missing:
        raise CLIError(f"{path}: the checkpoint holds no weights for the LM head "
                       f"({', '.join(sorted(head_names))}); it is a base model, not a causal LM")
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # missing or unreadable tokenizer files
        raise CLIError(f"{path}: cannot load a tokenizer from the model folder ({err})")
    return tok


# ----------------------------------------------------------------------------- progress bar

def _postfix_callback():
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class PostfixCallback(TrainerCallback):
        """Shows the latest loss / entropy / clip fraction on the Trainer's progress bar."""

        def __init__(self):
            self.handler = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            bar = None
            for cb in (self.handler.callbacks if self.handler else ()):
                if isinstance(cb, ProgressCallback):
                    bar = cb.training_bar
            if bar is None or not logs or "loss" not in logs:
                return
            post = {k: f"{logs[k]:.4g}" for k in ("nll", "entropy", "clip_fraction")
                    if k in logs}
            bar.set_postfix(post, refresh=False)

    return PostfixCallback()


# ----------------------------------------------------------------------------- entry point

def run(args):
    model_dir, data, out = args.model, args.data, args.output_dir
    if not os.path.isdir(model_dir):
        raise CLIError(f"{model_dir}: model folder not found")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CLIError(f"{model_dir}: no config.json (not a saved Hugging Face model folder)")
    if not os.path.isfile(data):
        raise CLIError(f"{data}: data file not found")
    for name in ("batch_size", "grad_accum", "save_steps", "logging_steps",
                 "steps_per_old_policy"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    final = os.path.join(out, FINAL)
    ckpt_dir = os.path.join(out, CHECKPOINTS)
    if os.path.exists(final):
        raise CLIError(f"{final} already holds a finished run; choose another --output-dir")
    last = None
    if args.resume:
        last = _last_checkpoint(ckpt_dir)
        if last is None:
            raise CLIError(f"--resume: no checkpoint in {ckpt_dir}")
    elif os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise CLIError(f"{ckpt_dir} holds checkpoints of an unfinished run: pass --resume to "
                       f"continue it, or choose another --output-dir")

    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CLIError(f"psft train needs transformers ({err}); pip install 'psft_ext[demo]'")
    show = not args.no_progress and sys.stderr.isatty()
    if not show:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the weight-loading bar too
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    max_length = args.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    examples = load_examples(data, tok, max_length)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (
        tok.eos_token_id if tok.eos_token_id is not None else 0)

    import torch

    from ..integrations.transformers import PSFTConfig, PSFTTrainer
    config = PSFTConfig(
        output_dir=ckpt_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",  # the authors' recipe: warm-up, then constant
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        bf16=args.bf16,
        report_to="none",
        disable_tqdm=not show,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        clip_low=args.clip_low,
        clip_high=args.clip_high,
        steps_per_old_policy=1 if args.loss == "sft" else args.steps_per_old_policy,
    )
    callback = _postfix_callback()
    trainer = PSFTTrainer(model=model, args=config, train_dataset=examples,
                          data_collator=Collator(pad_id), callbacks=[callback])
    callback.handler = trainer.callback_handler
    result = trainer.train(resume_from_checkpoint=last)

    tmp = f"{final}.partial-{os.getpid()}"
    try:
        trainer.save_model(tmp)
        tok.save_pretrained(tmp)
        metrics = dict(
            loss=args.loss,
            model=os.path.abspath(model_dir),
            data=os.path.abspath(data),
            examples=len(examples),
            hyperparameters=dict(
                clip_low=args.clip_low, clip_high=args.clip_high,
                steps_per_old_policy=config.steps_per_old_policy, lr=args.lr,
                batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
                max_steps=args.max_steps, warmup_steps=args.warmup_steps,
                weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed),
            global_step=trainer.state.global_step,
            resumed_from=None if last is None else os.path.abspath(last),
            train=result.metrics,
            log_history=trainer.state.log_history,
        )
        write_json_atomic(os.path.join(tmp, "metrics.json"), metrics)
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    last_log = next((r for r in reversed(trainer.state.log_history) if "entropy" in r), {})
    print(f"trained {trainer.state.global_step} steps ({args.loss}); "
          + ", ".join(f"{k} {last_log[k]:.4g}" for k in ("nll", "entropy", "clip_fraction")
                      if k in last_log))
    print(f"wrote {final} (model, tokenizer, metrics.json)")
    return 0


def _last_checkpoint(folder):
    if not os.path.isdir(folder):
        return None
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(folder)
