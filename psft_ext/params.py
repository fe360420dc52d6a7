"""``LossParams``: the hyper-parameters of the loss, validated once, passed along as one object."""

import dataclasses
from dataclasses import InitVar, dataclass, field
from numbers import Real
from typing import Optional

from ._ops import IMPORTANCE_SAMPLING, PACKED_PARAMS, REDUCTIONS

FLOAT32_MAX = 3.4028234663852886e38
# verl's loss_agg_mode values; the sequence modes weigh each token by its sequence (a sequence is
# one row of the targets' last dimension).
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm")
# The options the kernels read, in the order of the ops' packed `float[] params` (the call's
# scalar advantage follows). A None (no dual clip) travels as 0, a name as its index.
PACKED_OPTIONS = ("clip_low", "clip_high", "dual_clip", "temperature", "entropy_coef", "kl_coef",
                  "reduction", "importance_sampling")


def check_finite(name, value, low=None):
    """A finite real number (not a bool), above ``low`` when given; ``name`` leads the message."""
    # `value - value == 0` is False exactly for nan and +-inf. Unlike math.isfinite it also
    # traces under torch.compile, where a float argument that changes between calls becomes a
    # SymFloat (math.isfinite on it is a hard error with fullgraph=True).
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, Real)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not value - value == 0:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and not value > low:
        raise ValueError(f"{name} must be > {low}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"LossParams: {name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of the PSFT / PPO clipped token loss (defaults: the PSFT authors' recipe).

    clip_low, clip_high: the trust region ``[1 - clip_low, 1 + clip_high]`` of the ratio.
    dual_clip: verl's ``clip_ratio_c`` (> 1) for negative advantages, or None.
    ignore_index: target id of tokens without a loss.
    temperature: the logits are divided by it before the softmax.
    reduction: "mean" (sum / num_items), "sum" or "none" (per-token losses).
    entropy_coef: the entropy bonus: each token's loss is ``pg - entropy_coef * entropy``.
    kl_coef: the k3 ("low_var_kl") penalty to a reference policy, ``+ kl_coef * k3`` per token;
        > 0 needs the call's ``ref_logprobs``.
    loss_agg_mode: verl's aggregation for reduction "mean": "token-mean", or a sequence mode
        ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm") over the rows
        of the targets' last dimension.
    importance_sampling: "token" (PPO, PSFT) or "sequence" (GSPO: one ratio per sequence, the
        geometric mean of its tokens' ratios).
    delta: TRL's / Liger's two-sided clip (INTELLECT-2), > 1 + clip_high: the same loss and
        gradient as ``dual_clip=delta``, which it sets (not stored apart).

    The kernels read the numbers in the order of ``packed`` (plus the call's scalar advantage),
    which mirrors ``psft::LossParams`` in csrc/psft_math.h.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    ignore_index: int = -100
    temperature: float = 1.0
    reduction: str = "mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    importance_sampling: str = "token"
    delta: InitVar[Optional[float]] = None
    packed: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self, delta):
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            check_finite(f"LossParams: {name}", value)
            if value < 0:
                raise ValueError(f"LossParams: {name} must be >= 0, got {value!r}")
        if not self.clip_low < 1:
            raise ValueError(f"LossParams: clip_low must be < 1 (the trust region's lower bound "
                             f"1 - clip_low must stay above 0), got {self.clip_low!r}")
        if delta is not None:
            if self.dual_clip is not None:
                raise ValueError("LossParams: delta and dual_clip are the same cap; give one")
            check_finite("LossParams: delta", delta, low=1.0 + self.clip_high)
            object.__setattr__(self, "dual_clip", delta)
        if self.dual_clip is not None:
            check_finite("LossParams: dual_clip", self.dual_clip, low=1.0)
        check_finite("LossParams: temperature", self.temperature, low=0.0)
        if not 1.0 / self.temperature <= FLOAT32_MAX:
            raise ValueError(f"LossParams: temperature must be >= {1 / FLOAT32_MAX:.3g} (the "
                             f"kernels multiply by 1 / temperature in float32), got "
                             f"{self.temperature!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"LossParams: ignore_index must be an int, got {self.ignore_index!r}")
        if not -(2**63) <= self.ignore_index < 2**63:
            raise ValueError(f"LossParams: ignore_index must fit in int64 (target ids do), got "
                             f"{self.ignore_index!r}")
        _check_choice("reduction", self.reduction, REDUCTIONS)
        check_finite("LossParams: entropy_coef", self.entropy_coef)
        check_finite("LossParams: kl_coef", self.kl_coef)
        if self.kl_coef < 0:
            raise ValueError(f"LossParams: kl_coef must be >= 0, got {self.kl_coef!r}")
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if self.loss_agg_mode != "token-mean" and self.reduction != "mean":
            raise ValueError(f"LossParams: loss_agg_mode={self.loss_agg_mode!r} aggregates a "
                             f"reduction 'mean'; reduction is {self.reduction!r}")
        _check_choice("importance_sampling", self.importance_sampling, IMPORTANCE_SAMPLING)
        if self.importance_sampling == "sequence" and self.dual_clip is not None:
            raise ValueError("LossParams: importance_sampling='sequence' (GSPO) has no dual clip "
                             "(dual_clip / delta)")
        values = [0.0 if getattr(self, name) is None else getattr(self, name)
                  for name in PACKED_OPTIONS[:-2]]
        values += [REDUCTIONS.index(self.reduction),
                   IMPORTANCE_SAMPLING.index(self.importance_sampling)]
        object.__setattr__(self, "packed", tuple(float(v) for v in values))

    @property
    def sequence_level(self):
        """Whether an option reads whole sequences (a sequence loss_agg_mode, or GSPO)."""
        return self.loss_agg_mode != "token-mean" or self.importance_sampling == "sequence"

    def op_args(self, advantage=1.0):
        """The ops' ``float[] params``: ``packed``, then the call's scalar advantage."""
        return self.packed + (float(advantage),)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossParams) if f.init)
# Accepted as a keyword, not stored (it sets dual_clip).
ALIASES = ("delta",)
DEFAULT_PARAMS = LossParams()

if PACKED_PARAMS != PACKED_OPTIONS + ("advantage",):
    raise ImportError(f"psft_ext._C packs the hyper-parameters as {PACKED_PARAMS}, not as this "
                      f"psft_ext expects: the extension was built from other sources; rebuild it")


def loss_params(fn, options):
    """``LossParams`` from keyword ``options`` (the defaults' one shared object when there are
    none). An option that is not a field raises a TypeError naming the calling function ``fn``; a
    bad value, the LossParams check's error."""
    if not options:
        return DEFAULT_PARAMS
    for name in options:
        if name not in OPTION_NAMES and name not in ALIASES:
            raise TypeError(f"{fn}: unknown option {name!r} (the loss's options are "
                            f"{', '.join(OPTION_NAMES + ALIASES)})")
    return LossParams(**options)
