"""Loads the compiled ops and registers their fake kernels.

The C++ library (csrc/psft_ops.cpp) defines three ops in the ``psft_ext`` namespace: ``psft_fwd``
(the loss, its metrics and per-token stats, and optionally the gradient written in the same
pass), ``psft_bwd`` (the gradient from the forward's stats) and ``scale_rows_``. They have no
autograd of their own: psft_ext/loss.py and psft_ext/linear/ wrap them in
``torch.autograd.Function``. The fake kernels registered here let ``torch.compile`` trace the
callers without graph breaks and ``torch.library.opcheck`` verify the ops.

The layouts both sides rely on are defined once, in csrc/psft_math.h, and read from the library
here: the names of the stats rows, of the metrics and of the packed hyper-parameters.
"""

import json

import torch

try:
    from . import _C  # noqa: F401  (loading the shared library registers the ops)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "psft_ext._C is not built. Install the package with "
        "`pip install --no-build-isolation -e .` against the torch you use."
    ) from exc

ops = torch.ops.psft_ext

_LAYOUT = json.loads(ops.build_info())
# Row of each per-token output in psft_fwd's (len(TOKEN_STATS), N) stats.
TOKEN_STATS = {name: row for row, name in enumerate(_LAYOUT["token_stats"])}
# psft_fwd's metrics, in order.
METRIC_NAMES = tuple(_LAYOUT["metrics"])
# The packed hyper-parameters the ops take, in order.
PACKED_PARAMS = tuple(_LAYOUT["packed_params"])


@torch.library.register_fake("psft_ext::psft_fwd")
def _psft_fwd_fake(logits, targets, old_logprobs, advantages, params, ignore_index, reduction,
                   num_items, num_items_value, with_metrics, grad):
    # A meta num_items beside real logits dispatches here (Meta ranks above CPU): refuse it, as
    # the real kernel does, rather than hand back uninitialized memory as the loss.
    if num_items is not None and num_items.device not in (logits.device, torch.device("cpu")):
        raise ValueError(f"psft_fwd: num_items is on {num_items.device} but logits are on "
                         f"{logits.device}")
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    metrics = logits.new_empty((len(METRIC_NAMES) if with_metrics else 0,), dtype=torch.float32)
    return loss, metrics, logits.new_empty((len(TOKEN_STATS), n), dtype=torch.float32)


@torch.library.register_fake("psft_ext::psft_bwd")
def _psft_bwd_fake(grad_loss, logits, targets, stats, params, ignore_index, grad):
    return None


@torch.library.register_fake("psft_ext::scale_rows_")
def _scale_rows_fake(grad, factor):
    return None
