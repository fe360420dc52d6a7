"""psft_ext under verl: a drop-in ``FusedLinearForPPO`` and the one call that makes verl's actor
use it.

verl's actor, with ``actor_rollout_ref.model.use_fused_kernels=True`` and the "torch" or "liger"
``fused_kernels_backend``, computes each micro-batch's ``(log_probs, entropy)`` from the last hidden
states through ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (looked up when the
forward runs), then its policy loss in PyTorch. ``use_psft_ext()`` puts this module's class in its
place, in the process that builds the actor (a Ray worker: call it at the top of the worker's
module, or in a ``verl`` entry point you launch)::

    from psft_ext.integrations.verl import use_psft_ext
    use_psft_ext()            # returns a handle; handle.undo() puts verl's class back

The log-probs and entropies then come from psft_ext's fused linear kernels (no logits buffer in the
forward, none in the backward but one chunk), differentiable for any of verl's policy losses.
"""

import importlib
from typing import Optional

import torch

from ..linear import linear_token_logprobs

VERL_MODULE = "verl.utils.experimental.torch_functional"
BACKENDS = ("torch", "liger")


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` (same constructor and forward) on psft_ext's kernels.

    ``forward(hidden_states, vocab_weights, input_ids, temperature=1.0)`` ->
    ``(log_probs, entropy)``: the targets' float32 log-probs of the logits
    ``hidden_states @ vocab_weights.T / temperature`` and the entropies in ``hidden_states``'
    dtype (as verl's "torch" backend returns them), both of ``input_ids``' shape and
    differentiable with respect to ``hidden_states`` and ``vocab_weights``. ``chunk_size``: rows
    of logits formed at a time (None: chosen from the shapes and the free memory).
    ``impl_backend`` is accepted for verl's configs; both backends run psft_ext.
    """

    def __init__(self, chunk_size: Optional[int] = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in BACKENDS:
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. "
                             f"Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor,
                input_ids: torch.Tensor, temperature: float = 1.0):
        if hidden_states.dim() not in (2, 3):
            raise ValueError(f"FusedLinearForPPO: hidden_states must be 2-D or 3-D, got shape "
                             f"{tuple(hidden_states.shape)}")
        log_probs, entropy = linear_token_logprobs(
            hidden_states, vocab_weights, input_ids.to(torch.int64), chunk_size=self.chunk_size,
            temperature=float(temperature), with_entropy=True)
        return log_probs, entropy.to(hidden_states.dtype)


class Patch:
    """The handle ``use_psft_ext`` returns: ``undo()`` puts verl's own class back."""

    def __init__(self, module, original):
        self.module, self.original = module, original

    def undo(self):
        if self.original is not None:
            self.module.FusedLinearForPPO = self.original
            self.original = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()


def use_psft_ext() -> Patch:
    """Makes verl's actor (``use_fused_kernels=True``, backend "torch" or "liger") compute its
    log-probs and entropies with :class:`FusedLinearForPPO` in this process. Also a context
    manager (``with use_psft_ext(): ...``)."""
    try:
        module = importlib.import_module(VERL_MODULE)
    except ImportError as exc:
        raise ImportError(f"psft_ext.integrations.verl: verl is not importable ({exc})") from exc
    original = module.FusedLinearForPPO
    if original is FusedLinearForPPO:
        return Patch(module, None)
    module.FusedLinearForPPO = FusedLinearForPPO
    return Patch(module, original)
