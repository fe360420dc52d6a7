"""psft_ext: fused Proximal SFT (PPO-style clipped token) loss for PyTorch, with C++ and CUDA kernels.

    import psft_ext
    loss = psft_ext.psft_loss(logits, targets, old_logprobs)          # PSFT, authors' defaults
    old = psft_ext.token_logprobs(logits, targets)                    # old-policy log-probs
    loss = psft_ext.linear_psft_loss(hidden, lm_head.weight, targets, old)  # logits never formed
"""

from .build_info import build_info
from .labels import shift_labels
from .linear import linear_psft_loss, linear_token_logprobs
from .loss import psft_loss, token_logprobs
from .metrics import PSFTMetrics
from .module import PSFTLoss
from .params import LossParams
from . import reference

__version__ = "0.1.0"

__all__ = [
    "LossParams",
    "PSFTLoss",
    "PSFTMetrics",
    "build_info",
    "linear_psft_loss",
    "linear_token_logprobs",
    "psft_loss",
    "reference",
    "shift_labels",
    "token_logprobs",
]
