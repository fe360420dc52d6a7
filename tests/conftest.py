"""Shared helpers of the psft_ext test suite.

Every numerical test compares the fused op against a float64 run of ``psft_ext.reference`` on the
same inputs (the logits rounded to the tested dtype first, so the only difference left is the
arithmetic). ``make_case`` builds inputs whose probability ratios sit clearly below, inside and
above the trust region (and on both sides of a dual clip), never within 1e-3 (relative) of a bound,
so float32 and float64 always take the same branch and the comparison can be tight.
"""

import math
import socket
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

import pytest
import torch

import psft_ext
from psft_ext import reference
from psft_ext._ops import PACKED_PARAMS, REDUCTIONS, TOKEN_INPUTS, TOKEN_STATS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Distance (relative, on the ratio) kept from every branch boundary by make_case; the checks
# demand at least BOUNDARY_MARGIN after rounding the old log-probs to float32.
BOUNDARY_MARGIN = 1e-3
_LOG_MARGIN = 0.02  # distance in log-ratio space used when drawing (about 2 % on the ratio)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_addoption(parser):
    parser.addoption("--fuzz", choices=("ci", "long"), default="ci",
                     help="tests/test_fuzz.py: 'ci', a fast derandomized slice (default), or "
                          "'long', a long randomized search")


def pytest_configure(config):
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.filter_too_much])
    settings.register_profile("ci", max_examples=2000, derandomize=True, print_blob=True, **common)
    settings.register_profile("long", max_examples=50000, print_blob=True, **common)
    settings.load_profile(config.getoption("--fuzz"))


def torchrun(nproc):
    """The command line that starts ``nproc`` local processes with torch.distributed.run on a
    free port (the script and its arguments follow)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@dataclass
class Case:
    """Inputs of one loss call. ``logits`` is a leaf in the tested dtype (requires grad)."""

    logits: torch.Tensor
    targets: torch.Tensor
    old_logprobs: Optional[torch.Tensor]
    advantages: Union[float, torch.Tensor]
    # clip_low, clip_high, dual_clip, ignore_index, temperature
    kwargs: dict = field(default_factory=dict)

    @property
    def ignore_index(self):
        return self.kwargs.get("ignore_index", -100)

    @property
    def valid(self):
        return self.targets != self.ignore_index

    def fused_logits(self):
        """A fresh leaf copy of the logits (the tested dtype, same device) that requires grad."""
        return self.logits.detach().clone().requires_grad_(True)

    def reference_logits(self):
        """A float64 leaf copy of the (already dtype-rounded) logits that requires grad."""
        return self.logits.detach().to(torch.float64).requires_grad_(True)


def make_advantages(kind, shape, device, seed=0):
    """Advantages of a given kind for targets of ``shape``.

    "scalar" -> 1.0; "negative_scalar" -> -1.3; "token" -> per-token tensor of mixed signs (|A| in
    [0.5, 1.5]); "negative" -> per-token, all negative; "row" -> shape (..., 1) broadcast over the
    last dimension, mixed signs; "zero_d" -> a 0-d tensor.
    """
    g = generator(seed + 7919)
    if kind == "scalar":
        return 1.0
    if kind == "negative_scalar":
        return -1.3
    if kind == "zero_d":
        return torch.tensor(-0.75, device=device)
    if kind == "row":
        row_shape = tuple(shape[:-1]) + (1,) if len(shape) > 0 else ()
        mag = 0.5 + torch.rand(row_shape, generator=g)
        sign = torch.where(torch.arange(mag.numel()).view(row_shape) % 2 == 0, 1.0, -1.0)
        return (mag * sign).to(device)
    mag = 0.5 + torch.rand(shape, generator=g)
    if kind == "token":
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        # Guarantee both signs whenever there are at least two tokens.
        flat = sign.view(-1)
        if flat.numel() >= 2:
            flat[0], flat[1] = 1.0, -1.0
        return (mag * sign).to(device)
    if kind == "negative":
        return (-mag).to(device)
    raise ValueError(kind)


def _log_ratio_bands(clip_low, clip_high):
    lo, hi = math.log(1.0 - clip_low), math.log(1.0 + clip_high)
    assert hi - lo > 4 * _LOG_MARGIN, "make_case needs a trust region wider than its margins"
    return [
        (lo - 0.7, lo - _LOG_MARGIN),            # ratio below 1 - clip_low
        (lo + _LOG_MARGIN, hi - _LOG_MARGIN),    # inside the trust region
        (hi + _LOG_MARGIN, hi + 0.5),            # a bit above 1 + clip_high
        (hi + 0.6, hi + 1.4),                    # far above: ratio 2.3 .. 5.2 (dual clip 3 active)
    ]


def make_case(
    shape=(4, 6),
    vocab=37,
    dtype=torch.float32,
    device="cpu",
    *,
    seed=0,
    scale=2.5,
    temperature=1.0,
    ignore_index=-100,
    ignore_frac=0.2,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=None,
    advantages="token",
    with_old=True,
    target_dtype=torch.int64,
    logits=None,
    targets=None,
):
    """Random inputs for one loss call, see the module docstring.

    ``shape`` is the targets' shape (the logits are ``shape + (vocab,)``); ``advantages`` is a
    float, a tensor, or a kind for :func:`make_advantages`. Tokens cycle through the log-ratio
    bands of :func:`_log_ratio_bands` (in a random order), so every band appears once there are
    at least four valid tokens. ``logits`` (CPU, optional) replaces the random logits; ``shape``
    and ``vocab`` are then taken from it. ``targets`` (CPU, optional) replaces the random targets
    and their random ignoring.
    """
    g = generator(seed)
    if logits is None:
        shape = tuple(shape)
        logits = (torch.randn(shape + (vocab,), generator=g) * scale).to(dtype)
    else:
        shape, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
        logits = logits.detach().cpu().to(dtype)
    if targets is not None:
        targets = targets.detach().cpu().to(target_dtype)
        assert tuple(targets.shape) == shape
        ignore_frac = 0.0
    else:
        targets = torch.randint(0, vocab, shape, generator=g)
    if ignore_frac > 0:
        ignored = torch.rand(shape, generator=g) < ignore_frac
        if ignore_frac >= 1.0:
            ignored[...] = True
        targets = torch.where(ignored, torch.full_like(targets, ignore_index), targets)
    targets = targets.to(target_dtype)

    if isinstance(advantages, str):
        advantages = make_advantages(advantages, shape, "cpu", seed)
    elif isinstance(advantages, torch.Tensor):
        advantages = advantages.cpu()

    old = None
    if with_old:
        logp64 = reference.token_logprobs(logits.to(torch.float64), targets,
                                          ignore_index=ignore_index, temperature=temperature)
        n = targets.numel()
        bands = _log_ratio_bands(clip_low, clip_high)
        band_of = torch.randperm(n, generator=g) % len(bands)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        lows = torch.tensor([b[0] for b in bands], dtype=torch.float64)[band_of]
        highs = torch.tensor([b[1] for b in bands], dtype=torch.float64)[band_of]
        d = lows + u * (highs - lows)
        if dual_clip is not None:
            c = math.log(dual_clip)
            near = (d - c).abs() < _LOG_MARGIN
            d = torch.where(near, c + _LOG_MARGIN * torch.where(d >= c, 1.0, -1.0).double(), d)
        old = (logp64 - d.view(shape)).to(torch.float32)
        # Ignored tokens' old log-probs are arbitrary: make them so (the op must not read them).
        old = torch.where(targets != ignore_index, old, torch.full_like(old, -3.0))
        _check_margins(logp64, old, targets != ignore_index, clip_low, clip_high, dual_clip)

    kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                  ignore_index=ignore_index, temperature=temperature)
    if isinstance(advantages, torch.Tensor):
        advantages = advantages.to(device)
    return Case(
        logits=logits.to(device).requires_grad_(True),
        targets=targets.to(device),
        old_logprobs=None if old is None else old.to(device),
        advantages=advantages,
        kwargs=kwargs,
    )


def raw_params(advantage=1.0, **values):
    """The ops' packed ``params``: LossParams' defaults, then ``values`` by name, unchecked (so
    that tests can pass bad ones too). A reduction given by name is packed as its index in
    ``REDUCTIONS``."""
    packed = list(psft_ext.LossParams().op_args(advantage))
    for name, value in values.items():
        if name == "reduction" and isinstance(value, str):
            value = float(REDUCTIONS.index(value))
        packed[PACKED_PARAMS.index(name)] = value
    return packed


def op_params(case, advantage=1.0, reduction="mean"):
    """The case's options and ``reduction`` packed as the ops take them, with the scalar
    advantage."""
    kw = dict(case.kwargs)
    kw.pop("ignore_index")
    return list(psft_ext.LossParams(reduction=reduction, **kw).op_args(advantage))


def token_inputs(old=None, adv=None):
    """The ops' ``token_inputs`` with the old log-probs and the per-token advantages (each
    optional), no other per-token tensor."""
    inputs = [None] * len(TOKEN_INPUTS)
    inputs[TOKEN_INPUTS.index("old_logprobs")] = old
    inputs[TOKEN_INPUTS.index("advantages")] = adv
    return inputs


def fwd_args(case, logits=None, *, reduction="none", with_old=True, with_adv=True,
             num_items=None, num_items_value=0.0, with_metrics=False, with_logprobs=False,
             grad=None):
    """A case's arguments of ``psft_fwd`` with flat rows: logits (the case's, detached, unless
    given), targets, token_inputs (the old log-probs and per-token advantages), the packed
    parameters (``reduction`` among them), ignore_index, seq_len 0, then the reduction's, the
    outputs' and the gradient's arguments. params is args[3], ignore_index args[4]."""
    x = case.logits.detach().reshape(-1, case.logits.shape[-1]) if logits is None else logits
    old = case.old_logprobs.reshape(-1) if with_old else None
    adv = case.advantages.reshape(-1).float() if with_adv else None
    return (x, case.targets.reshape(-1), token_inputs(old, adv),
            op_params(case, reduction=reduction), case.ignore_index, 0, num_items,
            num_items_value, with_metrics, with_logprobs, grad)


def bwd_scale(stats, upstream=1.0):
    """psft_bwd's ``scale`` for an upstream gradient of each token's loss (a number or (N,)):
    ``upstream * coef``, the stats' coef row already carrying the reduction's weight."""
    return upstream * stats[TOKEN_STATS["coef"]]


def _check_margins(logp64, old, valid, clip_low, clip_high, dual_clip):
    ratio = torch.exp(logp64 - old.to(torch.float64))[valid]
    bounds = [1.0 - clip_low, 1.0 + clip_high] + ([dual_clip] if dual_clip is not None else [])
    for b in bounds:
        rel = ((ratio - b) / b).abs()
        assert bool((rel > BOUNDARY_MARGIN).all()), f"make_case: a ratio within 1e-3 of {b}"


def fused_and_reference(case, *, reduction="mean", num_items=None, weights=None,
                        return_metrics=True, advantages=None, base=None, view=None,
                        targets=None, old_logprobs=None):
    """Runs the fused loss and the float64 reference on ``case``, backward included.

    Returns ``(fused, ref)`` dicts with keys loss (detached), metrics, grad (of the logits). The
    backward is of the loss itself, or of ``(loss * weights).sum()`` for reduction "none".
    With ``base`` and ``view`` the logits are ``view(leaf)`` for a leaf copy of ``base`` (in the
    tested dtype, and in float64 for the reference), and grad is the leaf's gradient: this is how
    non-contiguous views are tested. ``targets`` / ``old_logprobs`` override the case's (equal
    values in another layout).
    """
    adv = case.advantages if advantages is None else advantages
    targets = case.targets if targets is None else targets
    old = case.old_logprobs if old_logprobs is None else old_logprobs
    if base is None:
        leaves = (case.fused_logits(), case.reference_logits())
        view = (lambda t: t)
    else:
        leaves = (base.detach().clone().requires_grad_(True),
                  base.detach().to(torch.float64).requires_grad_(True))
    out = {}
    for name, fn, leaf in (("fused", psft_ext.psft_loss, leaves[0]),
                           ("ref", reference.psft_loss, leaves[1])):
        res = fn(view(leaf), targets, old, advantages=adv, reduction=reduction,
                 num_items=num_items, return_metrics=return_metrics, **case.kwargs)
        loss, metrics = res if return_metrics else (res, None)
        if reduction == "none":
            assert weights is not None
            (loss * weights.to(loss.dtype)).sum().backward()
        else:
            loss.backward()
        out[name] = dict(loss=loss.detach(), metrics=metrics, grad=leaf.grad, raw=loss)
    # Magnitude of the loss before any cancellation between tokens: the reduction of |l_t|.
    with torch.no_grad():
        per_token = reference.psft_loss(case.reference_logits().detach(), case.targets,
                                        case.old_logprobs, advantages=adv, reduction="none",
                                        **case.kwargs).abs()
    if reduction == "none":
        scale = per_token.max().item() if per_token.numel() else 0.0
    elif reduction == "sum":
        scale = per_token.sum().item()
    else:
        den = max(int(case.valid.sum()), 1) if num_items is None else float(num_items)
        scale = per_token.sum().item() / den
    out["ref"]["scale"] = scale
    return out["fused"], out["ref"]


def assert_close_scaled(actual, expected, *, rtol, atol_scale, floor=1e-7, msg=""):
    """assert_close(actual, expected) in float64 with atol = atol_scale * max|expected| + floor."""
    expected = expected.to(torch.float64)
    actual = actual.detach().to(device=expected.device, dtype=torch.float64)
    mag = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_scale * mag + floor,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def check_loss(fused, ref, dtype):
    """Loss within ~1e-5 relative to the reduction of |l_t| (terms of both signs may cancel)."""
    scale = ref["scale"]
    assert fused["loss"].dtype == torch.float32
    assert fused["loss"].shape == ref["loss"].shape
    expected = ref["loss"].to(fused["loss"].device)
    torch.testing.assert_close(fused["loss"].to(torch.float64), expected, rtol=1e-5,
                               atol=1e-5 * scale + 1e-7)


def check_grad(fused, ref, dtype):
    gf, gr = fused["grad"], ref["grad"]
    assert gf is not None and gf.dtype == dtype and gf.shape == gr.shape
    assert torch.isfinite(gf).all()
    if dtype == torch.float32:
        assert_close_scaled(gf, gr, rtol=1e-5, atol_scale=1e-5, floor=1e-9, msg="grad")
    else:
        # The fused gradient is rounded to the logits' dtype.
        assert_close_scaled(gf, gr, rtol=1e-2, atol_scale=1e-2, floor=1e-6, msg="grad")


def check_metrics(mf, mr):
    assert isinstance(mf, psft_ext.PSFTMetrics)
    for name in psft_ext.PSFTMetrics._fields:
        a, e = getattr(mf, name), getattr(mr, name)
        assert a.dtype == torch.float32 and a.dim() == 0 and not a.requires_grad, name
        assert torch.isfinite(a), name
        e = e.to(a.device)
        if name == "num_tokens":
            assert a.item() == e.item(), name
        elif name == "clip_fraction":
            # No ratio is near a bound, so the same tokens are clipped: equal up to the division.
            torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-7, msg=name)
        else:
            torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5, msg=name)


def check_all(fused, ref, dtype):
    check_loss(fused, ref, dtype)
    check_grad(fused, ref, dtype)
    if fused["metrics"] is not None:
        check_metrics(fused["metrics"], ref["metrics"])
