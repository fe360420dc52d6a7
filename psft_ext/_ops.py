"""Loads the compiled ops and registers the fake kernels of the logits ops.

The C++ library (csrc/psft_ops.cpp) defines the ops in the ``psft_ext`` namespace: ``psft_fwd``
(the loss, the per-token log-probs and entropies, the metrics and per-token stats, and optionally
the gradient written in the same pass), ``psft_bwd`` (the gradient from the forward's stats),
``scale_rows_``, the fused linear pair ``linear_fwd`` / ``linear_bwd`` (implemented in
psft_ext/linear/ops.py), and ``psft_tokens`` (psft_fwd's token stage on stats the caller formed:
the vocabulary-parallel loss). The fake kernels registered here let ``torch.compile`` trace the
callers without graph breaks and ``torch.library.opcheck`` verify the ops.

The layouts both sides rely on are defined once, in csrc/psft_math.h, and read from the library
here: the names of the stats rows, of the metrics, of the packed hyper-parameters, of the
per-token inputs, and of the reductions and importance-sampling levels the packed numbers index.
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
# The ops' optional per-token tensors (`Tensor?[] token_inputs`), in order.
TOKEN_INPUTS = tuple(_LAYOUT["token_inputs"])
# The names whose index the packed "reduction" and "importance_sampling" hold.
REDUCTIONS = tuple(_LAYOUT["reductions"])
IMPORTANCE_SAMPLING = tuple(_LAYOUT["importance_sampling"])
_NONE = REDUCTIONS.index("none")


def loss_shape(n, params):
    """The loss's shape for N rows: (N,) for reduction "none", else ()."""
    return (n,) if int(params[PACKED_PARAMS.index("reduction")]) == _NONE else ()


def forward_fakes(like, n, params, with_metrics, with_logprobs):
    """Empty (loss, logp, entropy, metrics, stats) of psft_fwd's shapes, on ``like``'s device."""
    f32 = dict(dtype=torch.float32)
    per_token = (n,) if with_logprobs else (0,)
    return (like.new_empty(loss_shape(n, params), **f32), like.new_empty(per_token, **f32),
            like.new_empty(per_token, **f32),
            like.new_empty((len(METRIC_NAMES) if with_metrics else 0,), **f32),
            like.new_empty((len(TOKEN_STATS), n), **f32))


@torch.library.register_fake("psft_ext::psft_fwd")
def _psft_fwd_fake(logits, targets, token_inputs, params, ignore_index, seq_len, num_items,
                   num_items_value, with_metrics, with_logprobs, grad):
    # A meta num_items beside real logits dispatches here (Meta ranks above CPU): refuse it, as
    # the real kernel does, rather than hand back uninitialized memory as the loss.
    if num_items is not None and num_items.device not in (logits.device, torch.device("cpu")):
        raise ValueError(f"psft_fwd: num_items is on {num_items.device} but logits are on "
                         f"{logits.device}")
    return forward_fakes(logits, logits.shape[0], params, with_metrics, with_logprobs)


@torch.library.register_fake("psft_ext::psft_bwd")
def _psft_bwd_fake(scale, ent_scale, logits, targets, stats, params, ignore_index, grad):
    return None


@torch.library.register_fake("psft_ext::psft_tokens")
def _psft_tokens_fake(stats, targets, token_inputs, params, ignore_index, seq_len, num_items,
                      num_items_value, with_metrics):
    loss, _, _, metrics, out = forward_fakes(stats, targets.shape[0], params, with_metrics, False)
    return loss, metrics, out


@torch.library.register_fake("psft_ext::scale_rows_")
def _scale_rows_fake(grad, factor):
    return None
