"""``psft train``: fine-tune a local causal LM on a local JSONL file with PSFT (or SFT).

Runs :class:`psft_ext.integrations.transformers.PSFTTrainer`; ``--loss sft`` is the same trainer
with one optimizer step per old policy, where the ratio is exactly 1 and the gradient is SFT's.
The command line is transformers' ``HfArgumentParser`` over :class:`ScriptArguments` (the model,
the data, the loss) and ``PSFTConfig`` (every ``TrainingArguments`` flag plus the PSFT fields),
as ``trl sft`` parses ``SFTConfig``; the defaults are the PSFT authors' recipe where they differ
from the Trainer's (:data:`RECIPE_DEFAULTS`).

Output layout (``--output_dir OUT``):

* ``OUT/checkpoints/checkpoint-N``: the Trainer's checkpoints, each with the tokenizer, the
  old-policy cache and ``psft_train.json``, the settings of the run, which
  ``--resume_from_checkpoint`` restores.
* ``OUT/final``: the fine-tuned model, its tokenizer and ``metrics.json``. It is written to a
  temporary folder next to it and renamed into place only once the run finished, so a folder named
  ``final`` is always a complete run; an interrupted or failed run leaves checkpoints only.

Every value and everything that can be checked before training (the model folder, the LM head,
the JSONL lines and their lengths) is checked before a model is loaded or a file written.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from .common import DEFAULT_SEED, CLIError, write_json_atomic

FINAL = "final"
CHECKPOINTS = "checkpoints"
SETTINGS_FILE = "psft_train.json"
SETTINGS_FORMAT = 1


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
                           f"(--max_length)")
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


# ----------------------------------------------------------------------------- arguments

@dataclass
class ScriptArguments:
    """psft train's own options; every other flag is a TrainingArguments / PSFTConfig field."""

    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Local model folder (config, weights, tokenizer), loaded with "
                "AutoModelForCausalLM.from_pretrained in float32. Required, except when "
                "resuming (restored from the checkpoint)."})
    train_file: Optional[str] = field(default=None, metadata={
        "help": "Local JSONL training file: {\"prompt\": ..., \"completion\": ...} or chat "
                "{\"messages\": [...]} lines; the loss covers the completion (the assistant "
                "turns). Required, except when resuming."})
    eval_file: Optional[str] = field(default=None, metadata={
        "help": "Local JSONL evaluation file (the same format): the token-mean NLL of its "
                "completions is reported as eval_loss at every --eval_strategy point and at the "
                "end (in metrics.json)."})
    loss: Literal["psft", "sft"] = field(default="psft", metadata={
        "help": "psft, or sft: one optimizer step per old policy, where PSFT is exactly SFT."})
    max_length: Optional[int] = field(default=None, metadata={
        "help": "Longest tokenized example allowed (default: the model's "
                "max_position_embeddings, else 2048); a longer one is an error."})


# The authors' recipe where it differs from TrainingArguments' defaults (lr 1e-6, 10 warm-up steps
# then a constant rate, weight decay 0.1; mini-batches of 8 and grad clip 1.0 are the Trainer's
# defaults too), and the command's own choices: one epoch, a checkpoint every 100 steps.
RECIPE_DEFAULTS = dict(learning_rate=1e-6, lr_scheduler_type="constant_with_warmup",
                       warmup_steps=10, weight_decay=0.1, num_train_epochs=1.0, save_steps=100,
                       logging_steps=10, seed=DEFAULT_SEED, report_to="none",
                       remove_unused_columns=False)

# What a resume may not change: the checkpoint's optimizer and scheduler state would silently
# keep the old values (the learning rate, the optimizer's settings) or the run would mix two
# trainings (the loss, the groups, the data).
LOCKED = (
    ("the loss", ("loss", "clip_low", "clip_high")),
    ("the learning-rate schedule", ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
                                    "warmup_steps")),
    ("the old-policy group", ("steps_per_old_policy", "per_device_train_batch_size",
                              "gradient_accumulation_steps")),
    ("the optimizer", ("optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
                       "adam_epsilon", "max_grad_norm")),
    ("the model and data", ("model_name_or_path", "train_file", "max_length", "seed",
                            "data_seed")),
)
# Under these schedules the learning rate does not depend on the length of the run, so a resume
# may extend it (--max_steps, --num_train_epochs).
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")
# Given anew by every command, never restored from a checkpoint.
NOT_RESTORED = ("output_dir", "resume_from_checkpoint")

# The flags of psft train before it took the Trainer's names.
RENAMED = {"--model": "--model_name_or_path", "--data": "--train_file",
           "--lr": "--learning_rate", "--batch-size": "--per_device_train_batch_size",
           "--grad-accum": "--gradient_accumulation_steps", "--epochs": "--num_train_epochs",
           "--resume": "--resume_from_checkpoint last", "--no-progress": "--disable_tqdm true"}

DESCRIPTION = """\
Fine-tunes a causal LM from a local folder on a local JSONL file with PSFT (--loss psft, the
default) or SFT (--loss sft). Every transformers TrainingArguments flag works, spelled
--flag_name or --flag-name (--output_dir, --learning_rate, --per_device_train_batch_size,
--gradient_accumulation_steps, --num_train_epochs, --max_steps, --save_total_limit,
--report_to, --seed, --bf16, ...), and the PSFT fields --clip_low, --clip_high,
--steps_per_old_policy, --use_fused_linear. Defaults are the PSFT authors' recipe: lr 1e-6,
10 warm-up steps then constant, weight decay 0.1, grad clip 1.0, mini-batches of 8, 8 optimizer
steps per old policy, clip 0.2 / 0.28.

Checkpoints (with the tokenizer) go to OUTPUT_DIR/checkpoints; the finished model, tokenizer and
metrics.json to OUTPUT_DIR/final, which appears (by an atomic rename) only when the run
completed. --resume_from_checkpoint last (or a checkpoint folder) continues a run with the
settings it was started with: flags left out are restored from the checkpoint, and a resume that
would change the loss, the learning-rate schedule, the old-policy group, the optimizer, the model
or the data is refused."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser():
    from transformers import HfArgumentParser

    from ..integrations.transformers import PSFTConfig

    class Parser(HfArgumentParser):
        def error(self, message):
            hints = [f"{old} is now {new}" for old, new in RENAMED.items()
                     if f"{old} " in f"{message} " or f"{old}=" in message]
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise CLIError(f"{message}{hint} ('psft train --help' lists the options)")

    parser = Parser((ScriptArguments, PSFTConfig), prog="psft train", description=DESCRIPTION,
                    formatter_class=_Formatter, allow_abbrev=False)
    import torch
    parser.set_defaults(**RECIPE_DEFAULTS, dataloader_pin_memory=torch.cuda.is_available())
    return parser


def given_flags(parser, argv):
    """The destinations of the flags written on the command line (a value equal to the default
    counts as given)."""
    actions = [(a, a.default) for a in parser._actions]
    defaults = parser._defaults
    try:
        for action, _ in actions:
            action.default = argparse.SUPPRESS
        parser._defaults = {}
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in actions:
            action.default = default
        parser._defaults = defaults
    return set(vars(namespace))


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _flag(name, value):
    return f"--{name} {value}"


def _check_values(v, given):
    """Every value psft train or the Trainer would only reject after loading the model (or never),
    named by its flag."""
    def need(ok, name, rule):
        if not ok:
            raise CLIError(f"--{name} {rule}, got {v[name]!r}")

    def finite(name):
        return isinstance(v[name], (int, float)) and math.isfinite(v[name])

    need(finite("learning_rate") and v["learning_rate"] > 0, "learning_rate",
         "must be a number > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                 "steps_per_old_policy"):
        need(v[name] >= 1, name, "must be at least 1")
    need(finite("num_train_epochs") and v["num_train_epochs"] > 0, "num_train_epochs",
         "must be a number > 0")
    need(v["max_steps"] == -1 or v["max_steps"] >= 1, "max_steps",
         "must be at least 1, or -1 for --num_train_epochs to decide")
    need(finite("warmup_steps") and v["warmup_steps"] >= 0, "warmup_steps",
         "must be >= 0 (steps, or a fraction of the run below 1)")
    need(finite("weight_decay") and v["weight_decay"] >= 0, "weight_decay", "must be >= 0")
    need(finite("max_grad_norm") and v["max_grad_norm"] >= 0, "max_grad_norm",
         "must be >= 0 (0: no clipping)")
    for name in ("save_steps", "logging_steps"):
        need(finite(name) and v[name] > 0 and (v[name] < 1 or float(v[name]).is_integer()),
             name, "must be a whole number of steps >= 1, or a fraction of the run below 1")
    need(v["save_total_limit"] is None or v["save_total_limit"] >= 1, "save_total_limit",
         "must be at least 1 (the checkpoints kept)")
    need(finite("clip_low") and 0 <= v["clip_low"] < 1, "clip_low",
         "must be in [0, 1) (the trust region starts at 1 - clip_low)")
    need(finite("clip_high") and v["clip_high"] >= 0, "clip_high", "must be >= 0")
    need(v["fused_linear_chunk_size"] is None or v["fused_linear_chunk_size"] >= 1,
         "fused_linear_chunk_size", "must be at least 1")
    need(v["max_length"] is None or v["max_length"] >= 1, "max_length", "must be at least 1")
    for name in ("seed", "data_seed"):
        need(v[name] is None or 0 <= v[name] < 2**32, name, "must be in [0, 2**32)")
    if v["loss"] == "sft" and "steps_per_old_policy" in given and v["steps_per_old_policy"] != 1:
        raise CLIError(f"--loss sft is one optimizer step per old policy; --steps_per_old_policy "
                       f"{v['steps_per_old_policy']} contradicts it (leave it out)")
    if v["eval_strategy"] != "no" and v["eval_file"] is None:
        raise CLIError(f"--eval_strategy {v['eval_strategy']} needs --eval_file (the data to "
                       f"evaluate on)")
    if v["remove_unused_columns"]:
        raise CLIError("--remove_unused_columns must stay false: the batches carry the labels and "
                       "old log-probs the loss needs")
    _check_device_flags(v)
    _check_report_to(v["report_to"])


def _check_device_flags(v):
    import torch
    if v["use_cpu"]:
        return
    if v["fp16"] and not torch.cuda.is_available():
        raise CLIError("--fp16 needs a GPU and torch sees none; for mixed precision on the CPU "
                       "use --bf16 with --use_cpu")
    if v["bf16"] and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise CLIError("--bf16 needs a GPU with bfloat16 support, and torch sees none; add "
                       "--use_cpu for bfloat16 autocast on the CPU")


def _check_report_to(value):
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )
    if value in (None, "none", "all"):
        return
    if value not in INTEGRATION_TO_CALLBACK:
        raise CLIError(f"--report_to {value}: unknown; choose none, all or one of "
                       f"{', '.join(INTEGRATION_TO_CALLBACK)}")
    if value not in get_available_reporting_integrations():
        raise CLIError(f"--report_to {value}: its package is not installed")


# ----------------------------------------------------------------------------- resume

def find_checkpoint(value, ckpt_dir):
    """The checkpoint folder of --resume_from_checkpoint: 'last' / 'true' for the newest one in
    OUTPUT_DIR/checkpoints, else a folder."""
    if value.lower() in ("last", "true"):
        last = _last_checkpoint(ckpt_dir)
        if last is None:
            raise CLIError(f"--resume_from_checkpoint {value}: no checkpoint in {ckpt_dir}")
        return last
    if not os.path.isdir(value):
        raise CLIError(f"--resume_from_checkpoint {value}: no such folder")
    return value


def read_settings(checkpoint):
    path = os.path.join(checkpoint, SETTINGS_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise CLIError(f"--resume_from_checkpoint {checkpoint}: no {SETTINGS_FILE}, so not a "
                       f"checkpoint of psft train whose settings can be restored")
    except (OSError, json.JSONDecodeError) as err:
        raise CLIError(f"--resume_from_checkpoint {checkpoint}: cannot read {SETTINGS_FILE} "
                       f"({err})")
    if saved.get("format") != SETTINGS_FORMAT or not isinstance(saved.get("settings"), dict):
        raise CLIError(f"{path}: not a settings file this psft train reads")
    return saved["settings"]


def restore(values, given, saved, checkpoint):
    """The settings of a resumed run: the checkpoint's, with the flags given now where they may
    change; a one-line refusal naming the flags that may not."""
    merged = dict(values)
    for name, value in saved.items():
        if name in merged and name not in given and name not in NOT_RESTORED:
            merged[name] = value
    locked = list(LOCKED)
    warmup = saved.get("warmup_steps", 0)
    if saved.get("lr_scheduler_type") not in LENGTH_FREE_SCHEDULES or 0 < warmup < 1:
        locked.append(("the learning-rate schedule", ("max_steps", "num_train_epochs")))
    changed, what = [], []
    for category, names in locked:
        for name in names:
            if name in given and name in saved and _jsonable(values[name]) != saved[name]:
                changed.append(name)
                if category not in what:
                    what.append(category)
    if changed:
        before = " ".join(_flag(n, saved[n]) for n in changed)
        now = " ".join(_flag(n, values[n]) for n in changed)
        raise CLIError(f"--resume_from_checkpoint {checkpoint}: its run was started with "
                       f"{before}; a resume cannot change {_either(what)} (given: {now}); "
                       f"leave these flags out to continue with the checkpoint's settings, or "
                       f"start a new run in another --output_dir")
    return merged


def _either(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# ----------------------------------------------------------------------------- entry point

def main(argv):
    try:
        parser = build_parser()
    except ImportError as err:
        raise CLIError(f"psft train needs transformers ({err}); pip install 'psft_ext[demo]'")
    namespace = parser.parse_args(argv)
    given = given_flags(parser, argv)
    values = vars(namespace)
    # Absolute, so that a resume from another folder finds them and compares them rightly.
    for name in ("model_name_or_path", "train_file", "eval_file"):
        if values[name] is not None:
            values[name] = os.path.abspath(values[name])
    out = values["output_dir"]
    if not out:
        raise CLIError("--output_dir is required (checkpoints go to OUTPUT_DIR/checkpoints, the "
                       "finished model to OUTPUT_DIR/final)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--output_dir {out} exists and is not a folder")
    final = os.path.join(out, FINAL)
    ckpt_dir = os.path.join(out, CHECKPOINTS)
    if os.path.exists(final):
        raise CLIError(f"{final} already holds a finished run; choose another --output_dir")
    checkpoint = None
    if values["resume_from_checkpoint"]:
        checkpoint = find_checkpoint(values["resume_from_checkpoint"], ckpt_dir)
        values = restore(values, given, read_settings(checkpoint), checkpoint)
    elif os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise CLIError(f"{ckpt_dir} holds checkpoints of an unfinished run: pass "
                       f"--resume_from_checkpoint last to continue it, or choose another "
                       f"--output_dir")
    for name in ("model_name_or_path", "train_file"):
        if values[name] is None:
            raise CLIError(f"--{name} is required")
    _check_values(values, given)
    model_dir, data = values["model_name_or_path"], values["train_file"]
    if not os.path.isdir(model_dir):
        raise CLIError(f"{model_dir}: model folder not found (--model_name_or_path)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CLIError(f"{model_dir}: no config.json (not a saved Hugging Face model folder)")
    if not os.path.isfile(data):
        raise CLIError(f"{data}: data file not found (--train_file)")
    if values["eval_file"] is not None and not os.path.isfile(values["eval_file"]):
        raise CLIError(f"{values['eval_file']}: data file not found (--eval_file)")
    script, config = make_arguments(values, given, ckpt_dir, checkpoint)
    settings = {k: _jsonable(v) for k, v in values.items()
                if k not in NOT_RESTORED and not k.endswith("_token")}
    return train(script, config, settings, out, checkpoint)


def make_arguments(values, given, ckpt_dir, checkpoint):
    """ScriptArguments and PSFTConfig from the settings; what the Trainer's own checks reject is
    a one-line error too."""
    from ..integrations.transformers import PSFTConfig
    names = {f.name for f in dataclasses.fields(ScriptArguments)}
    script = ScriptArguments(**{k: v for k, v in values.items() if k in names})
    kwargs = {k: v for k, v in values.items() if k not in names}
    kwargs.update(output_dir=ckpt_dir, resume_from_checkpoint=checkpoint)
    if script.loss == "sft":
        kwargs["steps_per_old_policy"] = 1
    if "disable_tqdm" not in given:
        kwargs["disable_tqdm"] = not sys.stderr.isatty()
    try:
        config = PSFTConfig(**kwargs)
    except (ValueError, TypeError, NotImplementedError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"invalid training arguments: {first}")
    return script, config


def train(script, config, settings, out, checkpoint):
    model_dir, data = script.model_name_or_path, script.train_file
    if config.disable_tqdm:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the weight-loading bar too
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    max_length = script.max_length or getattr(model.config, "max_position_embeddings",
                                              None) or 2048
    examples = load_examples(data, tok, max_length)
    eval_examples = None
    if script.eval_file is not None:
        eval_examples = load_examples(script.eval_file, tok, max_length)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (
        tok.eos_token_id if tok.eos_token_id is not None else 0)

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from ..integrations.transformers import PSFTTrainer

    class Trainer(PSFTTrainer):
        def _save_checkpoint(self, model, trial):
            # The settings go in before the Trainer's files, so every checkpoint can be resumed
            # with them.
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            write_json_atomic(os.path.join(folder, SETTINGS_FILE),
                              dict(format=SETTINGS_FORMAT, settings=settings))
            return super()._save_checkpoint(model, trial)

    callback = _postfix_callback()
    try:
        trainer = Trainer(model=model, args=config, train_dataset=examples,
                          eval_dataset=eval_examples, data_collator=Collator(pad_id),
                          processing_class=tok, callbacks=[callback])
    except ValueError as err:  # a combination of Trainer flags that the Trainer itself refuses
        raise CLIError(f"invalid training arguments: {str(err).strip().splitlines()[0]}")
    callback.handler = trainer.callback_handler
    result = trainer.train(resume_from_checkpoint=checkpoint)
    evaluation = trainer.evaluate() if eval_examples is not None else None

    final = os.path.join(out, FINAL)
    tmp = f"{final}.partial-{os.getpid()}"
    try:
        trainer.save_model(tmp)  # the model and, as the processing class, the tokenizer
        metrics = dict(
            loss=script.loss,
            model=os.path.abspath(model_dir),
            data=os.path.abspath(data),
            examples=len(examples),
            hyperparameters=dict(
                clip_low=config.clip_low, clip_high=config.clip_high,
                steps_per_old_policy=config.steps_per_old_policy,
                learning_rate=config.learning_rate,
                lr_scheduler_type=str(getattr(config.lr_scheduler_type, "value",
                                              config.lr_scheduler_type)),
                per_device_train_batch_size=config.per_device_train_batch_size,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
                num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
                warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                max_grad_norm=config.max_grad_norm, seed=config.seed),
            settings=settings,
            global_step=trainer.state.global_step,
            resumed_from=None if checkpoint is None else os.path.abspath(checkpoint),
            train=result.metrics,
            eval=evaluation,
            log_history=trainer.state.log_history,
        )
        write_json_atomic(os.path.join(tmp, "metrics.json"), metrics)
        os.replace(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    last_log = next((r for r in reversed(trainer.state.log_history) if "entropy" in r), {})
    logged = ", ".join(f"{k} {last_log[k]:.4g}" for k in ("nll", "entropy", "clip_fraction")
                       if k in last_log)
    print(f"trained {trainer.state.global_step} steps ({script.loss})"
          + (f"; last logged: {logged}" if logged else ""))
    print(f"wrote {final} (model, tokenizer, metrics.json)")
    return 0


def _last_checkpoint(folder):
    if not os.path.isdir(folder):
        return None
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(folder)
