"""PSFT for TRL's ``SFTTrainer``: ``PSFTConfig`` (an ``SFTConfig``) and ``PSFTTrainer``.

Switching a TRL SFT run to PSFT is a change of class names::

    from psft_ext.integrations.trl import PSFTConfig, PSFTTrainer     # was: from trl import ...
    args = PSFTConfig(output_dir="out", steps_per_old_policy=8, ...)   # an SFTConfig
    trainer = PSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

Everything of ``SFTTrainer`` that prepares the data keeps working: dataset formats and formatting
functions, chat templates, ``completion_only_loss`` / ``assistant_only_loss`` (they become -100
labels, which the PSFT loss ignores), packing and ``padding_free`` (the collator resets the
position ids and masks each sequence's first label, so no loss crosses a sequence boundary).
What changes is the loss, the old-policy groups, the metrics and the checkpoints, exactly as in
:mod:`psft_ext.integrations.transformers` (the same :class:`PSFTTrainerMixin`): see there.

TRL's own training metrics computed from its fused LM head (``mean_token_accuracy``,
``num_tokens``) are not produced: the PSFT loss logs its metrics instead (``token_accuracy`` is
TRL's ``mean_token_accuracy``). ``loss_type="dft"``, label smoothing,
``compute_loss_func`` and the MoE router auxiliary loss are refused, since they are other losses.
"""

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .transformers import PSFTArguments, PSFTTrainerMixin

__all__ = ["PSFTConfig", "PSFTTrainer"]


@dataclass
class PSFTConfig(PSFTArguments, SFTConfig):
    """``trl.SFTConfig`` plus the PSFT hyper-parameters: ``clip_low``, ``clip_high``,
    ``steps_per_old_policy``, ``use_fused_linear``, ``fused_linear_chunk_size``,
    ``fused_linear_accumulate_float32``."""


class PSFTTrainer(PSFTTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training with the PSFT loss and old-policy groups. Takes the
    ``SFTTrainer``'s arguments; ``args`` should be a :class:`PSFTConfig`."""

    def _psft_setup(self):
        loss_type = getattr(self.args, "loss_type", "nll")
        if loss_type != "nll":
            raise ValueError(f"loss_type={loss_type!r} is another loss; PSFTTrainer computes the "
                             f"PSFT loss: leave loss_type at 'nll'")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                "PSFTTrainer does not add the MoE router auxiliary loss: set "
                "router_aux_loss_coef=0.0")
        super()._psft_setup()
