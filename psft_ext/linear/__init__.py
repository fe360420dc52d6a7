"""The fused linear PSFT loss: the LM head's matmul and the loss, without ever materializing the
logits. ``api.py``: the public functions; ``ops.py``: the two custom ops and their autograd;
``chunks.py``: how rows are split into chunks; ``accumulate.py``: the matmuls and the gradient
accumulators."""

from .api import linear_loss, linear_psft_loss, linear_token_logprobs
from .chunks import auto_chunk_rows

__all__ = ["auto_chunk_rows", "linear_loss", "linear_psft_loss", "linear_token_logprobs"]
