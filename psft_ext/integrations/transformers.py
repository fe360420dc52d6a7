"""PSFT for ``transformers.Trainer``: ``PSFTConfig`` and ``PSFTTrainer``.

Switching an SFT run to PSFT is a change of class names::

    from psft_ext.integrations.transformers import PSFTConfig, PSFTTrainer
    args = PSFTConfig(output_dir="out", steps_per_old_policy=8, clip_low=0.2, clip_high=0.28, ...)
    trainer = PSFTTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()

How the Trainer's loop is used (transformers 5.x):

* Old-policy groups. The training loop fetches each optimizer step's micro-batches with
  ``get_batch_samples`` (which exists to count ``num_items_in_batch`` over the step). PSFTTrainer
  overrides it: at the start of a group of ``steps_per_old_policy`` steps it pulls the whole
  group's micro-batches ahead from the epoch iterator, computes their old log-probs with the
  current (group-start) weights in one no-grad pass (:class:`~.old_policy.OldPolicyGroups`), and
  then hands the loop one step at a time, each micro-batch carrying its old log-probs. The first
  step of a group carries none (ratio exactly 1, no extra pass). Prefetching is the only exact way
  that costs no memory: computing the old log-probs lazily would see later weights, and a frozen
  copy of the weights would double the model's memory. A group ends at the end of an epoch (the
  epoch iterator is where the batches come from) and at ``max_steps``.
* The loss (``compute_loss``) is the fused PSFT loss on the final hidden states and the LM head
  (:class:`~.causal_lm.CausalLMPSFT`), token-mean over the whole optimizer step: the denominator
  counts the non-ignored targets of all the step's micro-batches, summed over the data-parallel
  ranks when ``average_tokens_across_devices`` (the default), and the loss is multiplied by the
  number of processes to undo DDP's gradient averaging, as the Trainer does for its own loss.
  The logged ``loss`` is therefore the PSFT objective (minus the mean clipped ratio, about -1),
  not the cross-entropy: that one is logged as ``nll``.
* Metrics: the :class:`~psft_ext.PSFTMetrics` (``nll``, ``entropy``, ``clip_fraction`` and its
  sides, ``approx_kl``, ``ratio_mean``, ``token_accuracy``; token means over the logging
  interval, all ranks) are added to the Trainer's training logs, so they
  reach every reporting integration (TensorBoard, W&B, ...).
* Checkpoints: the rest of the current group (old log-probs of the steps not trained yet, with a
  fingerprint of each micro-batch) is saved in every checkpoint (one small file per rank,
  ``psft_old_policy_rank{N}.pt``) and restored on ``train(resume_from_checkpoint=...)``, so a run
  resumed in the middle of a group trains exactly as the uninterrupted one. The old log-probs
  cannot be recomputed after a resume: the weights have moved since the group start.
* Evaluation reports the token-mean negative log-likelihood as ``eval_loss`` (comparable with
  an SFT run's).

Parallelism: DDP (``torchrun`` / ``accelerate launch``) and DeepSpeed ZeRO-3 are tested (on CPU
processes). Under FSDP2, FSDP1 and ZeRO-3 the fused linear loss is computed inside the LM head's
forward, where its weight is gathered (see CausalLMPSFT; FSDP through the Trainer is not tested:
accelerate enables it only on GPUs, the mechanism is tested in plain loops); the old log-probs are
computed through the wrapped model. Tensor, context and sequence parallelism and
``torch.nn.DataParallel`` are refused (for tensor parallelism, the plain-loop helpers:
docs/scaling.md).
"""

import inspect
import itertools
import os
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import transformers
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..loss import token_logprobs
from ..metrics import PSFTMetrics
from ..params import LossParams, loss_params
from .causal_lm import (OLD_LOGPROBS_KEY, CausalLMPSFT, batch_targets, count_targets,
                        model_inputs, unwrap_model)
from .old_policy import OldPolicyGroups, compute_old_logprobs


def _version(text):
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# Trainer.loss_is_scaled_for_ga (which tells the Trainer not to divide the step-wide token-mean loss
# by the accumulation steps) appeared in transformers 5.19; get_batch_samples and _save_checkpoint
# are overridden with the signatures of 5.x.
MIN_TRANSFORMERS = (5, 19)
if _version(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(f"psft_ext.integrations.transformers needs transformers >= 5.19, found "
                      f"{transformers.__version__}")

__all__ = ["PSFTArguments", "PSFTConfig", "PSFTTrainer", "PSFTTrainerMixin", "METRIC_NAMES",
           "old_policy_file"]

# Logged as token means over the logging interval: every PSFTMetrics field but the count.
METRIC_NAMES = tuple(name for name in PSFTMetrics._fields if name != "num_tokens")


def old_policy_file(process_index: int) -> str:
    """Name of the file holding one rank's old-policy cache in a checkpoint folder."""
    return f"psft_old_policy_rank{process_index}.pt"


@dataclass
class PSFTArguments:
    """The PSFT hyper-parameters, shared by the Trainer's and TRL's configs (defaults: the
    authors' recipe)."""

    clip_low: float = field(default=0.2, metadata={
        "help": "Lower clip of the probability ratio: the trust region starts at 1 - clip_low."})
    clip_high: float = field(default=0.28, metadata={
        "help": "Upper clip of the probability ratio: the trust region ends at 1 + clip_high."})
    steps_per_old_policy: int = field(default=8, metadata={
        "help": "Optimizer steps per old policy (the weights at the start of each group of this "
                "many steps). 1 makes PSFT exactly SFT."})
    use_fused_linear: bool = field(default=True, metadata={
        "help": "Compute the loss from the final hidden states and the LM head without forming "
                "the logits (falls back to the logits, with a warning, where that is not exact)."})
    fused_linear_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Rows of logits formed at a time by the fused linear loss (None: automatic)."})
    fused_linear_accumulate_float32: bool = field(default=True, metadata={
        "help": "With a bfloat16 / float16 LM head, accumulate its gradient across the fused "
                "linear loss's chunks in float32 (one rounding at the end, a float32 copy of the "
                "LM head's size); False accumulates in the weight's dtype (one rounding per "
                "chunk, less memory)."})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        validate_psft_arguments(self)


def validate_psft_arguments(args) -> None:
    values = psft_values(args)
    loss_params_of(args)
    k = values["steps_per_old_policy"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"steps_per_old_policy must be an int >= 1, got {k!r}")
    chunk = values["fused_linear_chunk_size"]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"fused_linear_chunk_size must be a positive int or None, got {chunk!r}")
    accumulate = values["fused_linear_accumulate_float32"]
    if not isinstance(accumulate, bool):
        raise TypeError(f"fused_linear_accumulate_float32 must be a bool, got {accumulate!r} "
                        f"({type(accumulate).__name__})")


def loss_params_of(args) -> LossParams:
    """The loss's options of a config (its ``clip_low`` and ``clip_high``), validated."""
    values = psft_values(args)
    return loss_params("PSFTConfig", dict(clip_low=values["clip_low"],
                                          clip_high=values["clip_high"]))


def psft_values(args) -> dict:
    """The PSFT fields of ``args``; defaults for those a plain TrainingArguments lacks."""
    return {f.name: getattr(args, f.name, f.default) for f in fields(PSFTArguments)}


@dataclass
class PSFTConfig(PSFTArguments, TrainingArguments):
    """``TrainingArguments`` plus the PSFT hyper-parameters: ``clip_low``, ``clip_high``,
    ``steps_per_old_policy``, ``use_fused_linear``, ``fused_linear_chunk_size``,
    ``fused_linear_accumulate_float32``."""


class PSFTTrainerMixin:
    """PSFT on top of a ``transformers.Trainer`` subclass (``Trainer`` itself, TRL's
    ``SFTTrainer``): see the module docstring. Place it first among the bases."""

    # compute_loss returns the loss of the whole optimizer step's token mean (num_items_in_batch
    # counts every micro-batch): the Trainer must not divide it by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._psft_setup()

    # ---------------------------------------------------------------------------------------
    # Setup
    # ---------------------------------------------------------------------------------------

    def _psft_setup(self):
        args = self.args
        validate_psft_arguments(args)
        values = psft_values(args)
        if args.n_gpu > 1:
            raise ValueError("PSFTTrainer does not support torch.nn.DataParallel (n_gpu > 1): "
                             "launch one process per GPU with torchrun or accelerate launch")
        for name, what in (("get_tp_size", "tensor"), ("get_cp_size", "context"),
                           ("get_sp_size", "sequence")):
            size_fn = getattr(self, name, None)
            if size_fn is not None and size_fn() > 1:
                raise ValueError(
                    f"PSFTTrainer does not support {what} parallelism: the old log-probs are "
                    f"computed per micro-batch before the training step shards it")
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError("label_smoothing_factor has no meaning for PSFT: leave it at 0")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("PSFTTrainer computes its own loss: do not pass compute_loss_func")
        if getattr(args, "use_liger_kernel", False):
            raise ValueError("use_liger_kernel replaces the model's loss and LM head; PSFTTrainer "
                             "computes the PSFT loss itself: leave use_liger_kernel off")
        self._psft_head = CausalLMPSFT(
            loss_params_of(args), use_fused_linear=values["use_fused_linear"],
            chunk_size=values["fused_linear_chunk_size"],
            accumulate_float32=values["fused_linear_accumulate_float32"])
        blocker = self._psft_fused_blocker()
        if values["use_fused_linear"] and blocker is not None:
            self._psft_head.block_fused(blocker)
        self._psft_groups = OldPolicyGroups(self._psft_old_logprobs,
                                            values["steps_per_old_policy"])
        self._psft_source = None
        self._psft_sums = None

    def _psft_fused_blocker(self) -> Optional[str]:
        """Why the fused linear path must not be used with this setup, or None."""
        if getattr(self, "is_fsdp_xla_enabled", False):
            return "under XLA's FSDP the LM head's weight is sharded outside the model's forward"
        if getattr(self, "is_distributed_loading_by_transformers", False):
            return "the model's parameters are distributed tensors (sharded at load time)"
        return None

    @property
    def psft_groups(self) -> OldPolicyGroups:
        """The old-policy group scheduler (its state is what checkpoints save)."""
        return self._psft_groups

    @property
    def psft_head(self) -> CausalLMPSFT:
        """The PSFT loss of the causal LM (fused linear path or logits)."""
        return self._psft_head

    # ---------------------------------------------------------------------------------------
    # Old-policy groups: batch fetching
    # ---------------------------------------------------------------------------------------

    def _prepare_inputs(self, inputs):
        """The Trainer's device move, with the old log-probs kept in float32: under DeepSpeed it
        casts every floating input to the engine's dtype, and bf16 old log-probs would put the
        ratio off 1 by up to 2^-8 relative per unit of |logp| (clipping noise, a false floor
        under approx_kl)."""
        if not isinstance(inputs, Mapping) or OLD_LOGPROBS_KEY not in inputs:
            return super()._prepare_inputs(inputs)
        rest = {k: v for k, v in inputs.items() if k != OLD_LOGPROBS_KEY}
        prepared = super()._prepare_inputs(rest)
        prepared[OLD_LOGPROBS_KEY] = inputs[OLD_LOGPROBS_KEY].to(self.args.device)
        return prepared

    def _psft_lm(self, model):
        """The causal LM inside ``model``: accelerate's unwrap keeps a ``torch.compile`` wrapper
        (its forward has none of the model's arguments, so the fused path would fall back)."""
        return unwrap_model(self.accelerator.unwrap_model(model))

    def _psft_policy_model(self):
        # Under FSDP / DeepSpeed only the wrapper's forward gathers the parameters. Under DDP the
        # inner module is enough (a no-grad pass needs no gradient hooks) and skips the wrapper's
        # buffer broadcast; accelerate's autocast is on the inner module's forward either way.
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            return self.model_wrapped
        return self.model

    def _psft_old_logprobs(self, batch):
        model = self._psft_policy_model()
        inputs = self._prepare_inputs(batch)
        with self.compute_loss_context_manager():
            return compute_old_logprobs(model, inputs, head=self._psft_head,
                                        lm=self._psft_lm(model))

    def _psft_same_source(self, epoch_iterator) -> bool:
        source = self._psft_source
        if source is None:
            return False
        target = source() if isinstance(source, weakref.ref) else source
        return target is epoch_iterator

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        groups = self._psft_groups
        if not self._psft_same_source(epoch_iterator):
            # A new epoch: the rest of a group prefetched from the previous epoch's iterator (the
            # epoch was stopped early) is dropped; a group restored from a checkpoint is kept.
            groups.drop_prefetched()
            try:
                self._psft_source = weakref.ref(epoch_iterator)
            except TypeError:
                self._psft_source = epoch_iterator
        sizes = [num_batches]  # the loop asks for this step; later steps of the group: grad_accum

        def fetch_step():
            n = sizes.pop() if sizes else self.args.gradient_accumulation_steps
            batches = []
            for _ in range(n):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
            return batches

        steps_left = None
        if self.state.max_steps is not None and self.state.max_steps > 0:
            steps_left = self.state.max_steps - self.state.global_step
        step = groups.next_step(fetch_step, max_steps=steps_left)
        batch_samples = step.with_old_logprobs()
        if not batch_samples:
            return batch_samples, None
        return batch_samples, self._psft_num_items(batch_samples, device)

    def _psft_num_items(self, batch_samples, device):
        """Non-ignored targets of the optimizer step (summed over the ranks when the Trainer
        averages tokens across devices): the denominator of the token mean."""
        count = count_targets(batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    # ---------------------------------------------------------------------------------------
    # Loss and metrics
    # ---------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:
            return self._psft_eval_loss(model, inputs, return_outputs)
        loss, metrics = self._psft_head.loss(model, inputs, num_items=num_items_in_batch,
                                             lm=self._psft_lm(model))
        if num_items_in_batch is None:
            # No step-wide count (compute_loss called outside the training loop): a per-batch
            # mean, averaged over the accumulation steps like the Trainer's own loss.
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        elif self.args.average_tokens_across_devices and self.args.world_size > 1:
            # num_items counts every rank's tokens and DDP averages the gradients over ranks.
            loss = loss * self.accelerator.num_processes
        self._psft_record(metrics)
        return loss

    def _psft_eval_loss(self, model, inputs, return_outputs):
        """Token-mean negative log-likelihood (SFT's loss), with the model's outputs (logits)
        when asked for."""
        targets = batch_targets(inputs)
        with torch.no_grad():
            if return_outputs:
                lm = self._psft_lm(model)
                params = inspect.signature(type(lm).forward).parameters
                extra = {"use_cache": False} if "use_cache" in params else {}
                outputs = model(**model_inputs(inputs), **extra)
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
                logp = token_logprobs(logits, targets.to(logits.device))
            else:
                outputs = None
                logp = self._psft_head.token_logprobs(model, inputs,
                                                      self._psft_lm(model))
            count = (targets != self._psft_head.ignore_index).sum().to(logp.device)
            loss = -logp.sum() / count.clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def _psft_record(self, metrics):
        n = metrics.num_tokens
        row = torch.stack([getattr(metrics, name) * n for name in METRIC_NAMES] + [n])
        self._psft_sums = row if self._psft_sums is None else self._psft_sums + row.to(
            self._psft_sums.device)

    def log(self, logs, *args, **kwargs):
        # The training logs (those with the running loss) are emitted by every rank at the same
        # step, so the metrics can be summed over the ranks here.
        if "loss" in logs and "learning_rate" in logs and hasattr(self, "_psft_groups"):
            sums = self._psft_sums
            if sums is None:
                sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float32)
            sums = sums.to(self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            self._psft_sums = None
            total = sums[-1].item()
            if total > 0:
                for i, name in enumerate(METRIC_NAMES):
                    logs[name] = (sums[i] / total).item() + 0.0  # no -0.0 in the logs
        return super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------------------------
    # Checkpoints
    # ---------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's own files (same folder), so the checkpoint is complete
        # when the Trainer pushes it to the Hub.
        output_dir = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(output_dir, exist_ok=True)
        state = self._psft_groups.state_dict()
        state["world_size"] = self.args.world_size
        torch.save(state, os.path.join(output_dir, old_policy_file(self.args.process_index)))
        return super()._save_checkpoint(model, trial)

    def _psft_load(self, checkpoint):
        path = os.path.join(checkpoint, old_policy_file(self.args.process_index))
        if not os.path.isfile(path):
            warnings.warn(f"psft_ext: {checkpoint} holds no old-policy cache "
                          f"({os.path.basename(path)}): the resumed run starts a new old-policy "
                          f"group", stacklevel=3)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("world_size") != self.args.world_size:
            warnings.warn(f"psft_ext: the checkpoint's old-policy cache was saved by "
                          f"{state.get('world_size')} processes, this run has "
                          f"{self.args.world_size}: the resumed run starts a new old-policy group",
                          stacklevel=3)
            return
        self._psft_groups.load_state_dict(state)

    def _inner_training_loop(self, *args, **kwargs):
        # train() resolves resume_from_checkpoint (True -> the last checkpoint) before calling
        # this, so the folder is known here.
        bound = inspect.signature(super()._inner_training_loop).bind(*args, **kwargs)
        checkpoint = bound.arguments.get("resume_from_checkpoint")
        self._psft_groups.reset()
        self._psft_source = None
        self._psft_sums = None
        if checkpoint is not None:
            self._psft_load(checkpoint)
        try:
            return super()._inner_training_loop(*args, **kwargs)
        finally:
            # The prefetched rest of a group belongs to this train() call; holding it (and the
            # epoch iterator, with its loader workers) past it would only keep memory alive.
            self._psft_groups.reset()
            self._psft_source = None


class PSFTTrainer(PSFTTrainerMixin, Trainer):
    """``transformers.Trainer`` training with the PSFT loss and old-policy groups.

    Takes the Trainer's arguments; ``args`` should be a :class:`PSFTConfig` (a plain
    ``TrainingArguments`` gets the PSFT defaults). The model must be a causal LM taking
    ``input_ids`` (and ``attention_mask`` / ``position_ids``); the batches must hold ``labels``
    aligned with the input ids (-100 where there is no loss) or pre-shifted ``shift_labels``.
    """
