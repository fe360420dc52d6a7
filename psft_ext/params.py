"""``LossParams``: the hyper-parameters of the loss, validated once, passed along as one object."""

import dataclasses
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional

from ._ops import PACKED_PARAMS

REDUCTIONS = ("mean", "sum", "none")
FLOAT32_MAX = 3.4028234663852886e38
# The options the kernels read, in the order of the ops' packed `float[] params` (the call's
# scalar advantage follows). A None (no dual clip) travels as 0.
PACKED_OPTIONS = ("clip_low", "clip_high", "dual_clip", "temperature")


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


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of the PSFT / PPO clipped token loss (defaults: the PSFT authors' recipe).

    clip_low, clip_high: the trust region ``[1 - clip_low, 1 + clip_high]`` of the ratio.
    dual_clip: verl's ``clip_ratio_c`` (> 1) for negative advantages, or None.
    ignore_index: target id of tokens without a loss.
    temperature: the logits are divided by it before the softmax.
    reduction: "mean" (sum / num_items), "sum" or "none" (per-token losses).

    The kernels read the numbers in the order of ``packed`` (plus the call's scalar advantage),
    which mirrors ``psft::LossParams`` in csrc/psft_math.h.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    ignore_index: int = -100
    temperature: float = 1.0
    reduction: str = "mean"
    packed: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("clip_low", "clip_high"):
            value = getattr(self, name)
            check_finite(f"LossParams: {name}", value)
            if value < 0:
                raise ValueError(f"LossParams: {name} must be >= 0, got {value!r}")
        if not self.clip_low < 1:
            raise ValueError(f"LossParams: clip_low must be < 1 (the trust region's lower bound "
                             f"1 - clip_low must stay above 0), got {self.clip_low!r}")
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
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"LossParams: reduction must be one of {REDUCTIONS}, got "
                             f"{self.reduction!r}")
        values = (getattr(self, name) for name in PACKED_OPTIONS)
        object.__setattr__(self, "packed", tuple(0.0 if v is None else float(v) for v in values))

    def op_args(self, advantage=1.0):
        """The ops' ``float[] params``: ``packed``, then the call's scalar advantage."""
        return self.packed + (float(advantage),)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossParams) if f.init)
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
        if name not in OPTION_NAMES:
            raise TypeError(f"{fn}: unknown option {name!r} (the loss's options are "
                            f"{', '.join(OPTION_NAMES)})")
    return LossParams(**options)
