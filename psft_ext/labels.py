"""Label helpers for causal language models."""

import torch


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face style labels (aligned with input ids) -> targets aligned with the logits.

    The logits at position t predict the token at t + 1, so ``targets[..., t] = labels[..., t + 1]``
    and the last position gets ``ignore_index``. Shifting the (small) labels instead of slicing the
    logits keeps the logits contiguous: no copy of the N x V tensor.
    """
    if labels.dim() < 1:
        raise ValueError("shift_labels: labels must have a sequence dimension")
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets
