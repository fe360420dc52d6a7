"""psft_ext under TRL's RL trainers: their fused LM head's log-probs and entropies from psft_ext's
fused linear kernels.

TRL's ``GRPOTrainer`` (and RLOO, KTO, SFT) patch the model with a fused LM head
(``trl.trainer.utils.add_fused_lm_head``): ``model(..., fused_lm_head=True)`` runs the backbone,
then one ``ChunkedLogProbFunction.apply`` over the hidden states for the per-token log-probs and,
for GRPO, the entropies (its ``entropy`` metric, the high-entropy token mask, the entropy bonus).
Here that function is psft_ext's :func:`~psft_ext.linear_token_logprobs`:

    from psft_ext.integrations.trl_grpo import FusedGRPOTrainer   # was: trl's GRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)

or, around any TRL code, ``with fused_lm_head(): ...``. Calls it cannot serve (a model with
``final_logit_softcapping``, a non-positive logit scale, outputs other than the log-probs and
the entropy) go to TRL's own function.
"""

import contextlib
import importlib

import torch
from trl import GRPOTrainer

from ..linear import linear_token_logprobs

TRL_MODULE = "trl.trainer.utils"
SERVED_OUTPUTS = frozenset(("entropy",))


class FusedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` arguments and
    outputs): ``(log_probs, entropy, None, None, None)``, the entropy None unless asked for."""

    trl_function = None  # TRL's own, for the calls this one does not serve

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=("log_probs",)):
        extra = set(outputs) - {"log_probs"}
        if (final_logit_softcapping is not None or not extra <= SERVED_OUTPUTS
                or not logit_scale > 0):
            return cls.trl_function.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                          final_logit_softcapping, logit_scale, outputs)
        device = hidden.device.type
        if not torch.is_autocast_enabled(device) and weight.dtype != hidden.dtype:
            # cast_lm_head_to_fp32: float32 hidden states outside autocast.
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        # The logits are z * logit_scale / temperature.
        log_probs, entropy = linear_token_logprobs(
            hidden, weight, targets, bias=bias, temperature=float(temperature / logit_scale),
            with_entropy=True)
        return log_probs, (entropy if "entropy" in extra else None), None, None, None


@contextlib.contextmanager
def fused_lm_head():
    """Within the block, TRL's fused LM head computes with psft_ext (the backward may run after
    the block: the autograd graph holds psft_ext's own functions)."""
    module = importlib.import_module(TRL_MODULE)
    original = module._ChunkedLogProbFunction
    if original is FusedLogProbFunction:
        yield
        return
    FusedLogProbFunction.trl_function = original
    module._ChunkedLogProbFunction = FusedLogProbFunction
    try:
        yield
    finally:
        module._ChunkedLogProbFunction = original


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy, old policy and
    reference model) come from psft_ext's fused linear kernels. Same arguments."""

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        with fused_lm_head():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
