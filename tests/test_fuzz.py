"""Randomized differential tests (hypothesis): random shapes, dtypes, layouts, options and special
values, the fused loss against the float64 reference, the fused linear loss against the logits
form, and the properties the numerical contract promises (docs/formula.md#numerical-contract).

CI runs a fast, derandomized slice (the same examples every run); `pytest --fuzz=long
tests/test_fuzz.py` runs a long randomized search (hypothesis prints how to replay a failure).
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import psft_ext  # noqa: E402
from psft_ext import reference  # noqa: E402

from conftest import DEVICES, LOW_PRECISION  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCABS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 2049]
MARGIN = 1e-3  # relative distance of every ratio from every clip bound (float32 vs float64)


@st.composite
def loss_inputs(draw, special_values=False):
    """One loss call: logits (in a random layout), targets, old log-probs, advantages, options."""
    device = draw(st.sampled_from(DEVICES))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    vocab = draw(st.sampled_from(VOCABS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 0.5, 3.0, 30.0]))
    base = (torch.randn(lead + (vocab,), generator=g, dtype=torch.float64) * scale)
    ignore_index = draw(st.sampled_from([-100, -1, vocab + 3, 2**40]))
    targets = torch.randint(0, vocab, lead, generator=g)
    ignored = torch.rand(lead, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets = torch.where(ignored, torch.full_like(targets, ignore_index), targets)
    target_dtype = torch.int32 if draw(st.booleans()) and ignore_index != 2**40 else torch.int64
    if special_values and base.numel():
        n_special = draw(st.integers(1, 3))
        flat = base.view(-1)
        for _ in range(n_special):
            pos = draw(st.integers(0, flat.numel() - 1))
            flat[pos] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    options = dict(
        clip_low=draw(st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9])),
        clip_high=draw(st.sampled_from([0.0, 0.28, 0.5, 2.0])),
        dual_clip=draw(st.sampled_from([None, 1.5, 3.0])),
        temperature=draw(st.sampled_from([0.05, 0.7, 1.0, 3.0])),
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    logits64 = base.to(dtype).to(torch.float64)
    old = None
    if draw(st.booleans()):
        logp = reference.token_logprobs(logits64, targets, ignore_index=ignore_index,
                                        temperature=options["temperature"])
        old = (logp - torch.randn(lead, generator=g, dtype=torch.float64) * 0.5).float()
    kind = draw(st.sampled_from(["one", "scalar", "token", "row"]))
    if kind == "one":
        advantages = 1.0
    elif kind == "scalar":
        advantages = draw(st.sampled_from([-1.3, 0.0, 2.0]))
    elif kind == "token":
        advantages = torch.randn(lead, generator=g)
    else:
        advantages = torch.randn(lead[:-1] + (1,) if lead else (), generator=g)
    num_items = None
    if options["reduction"] == "mean":
        num_items = draw(st.sampled_from([None, 7, 0.5, "tensor"]))
        if num_items == "tensor":
            num_items = torch.tensor(11.0)
    layout = draw(st.sampled_from(["contiguous", "row_strided", "copy_needed"]))
    return dict(device=device, dtype=dtype, base=base, targets=targets.to(target_dtype),
                old=old, advantages=advantages, options=options, num_items=num_items,
                layout=layout, seed=seed)


def _logits_leaf(case):
    """A leaf of the case's logits in its dtype and device, and the (possibly non-contiguous)
    view of it the loss reads."""
    base, dtype, device = case["base"], case["dtype"], case["device"]
    if case["layout"] == "row_strided" and base.dim() >= 1:
        wide = torch.zeros(base.shape[:-1] + (base.shape[-1] + 5,), dtype=dtype, device=device)
        wide[..., 2:2 + base.shape[-1]] = base.to(dtype)
        leaf = wide.requires_grad_(True)
        return leaf, leaf[..., 2:2 + base.shape[-1]]
    if case["layout"] == "copy_needed" and base.dim() >= 1:
        leaf = base.to(dtype).to(device).transpose(-1, 0).contiguous().requires_grad_(True)
        return leaf, leaf.transpose(-1, 0)
    leaf = base.to(dtype).to(device).requires_grad_(True)
    return leaf, leaf


def _on(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _logp_precision(case, logits64):
    """The absolute precision of the fused log-probs, float32 differences x_y - lse: a few ulps
    of the largest |z / tau| of a row (a peaked distribution at a low temperature has scaled
    logits in the thousands)."""
    o = case["options"]
    logp = reference.token_logprobs(logits64, case["targets"], ignore_index=o["ignore_index"],
                                    temperature=o["temperature"])
    valid = case["targets"].long() != o["ignore_index"]
    x = (logits64 / o["temperature"]).abs()
    mag = x[valid].max().item() if bool(valid.any()) and x.numel() else 0.0
    return 5e-7 * max(1.0, mag), logp, valid


def _ratios_clear_of_the_bounds(case, logp, valid, precision):
    """float32 and float64 take the same branch only away from ties: assume every valid token's
    ratio is at least MARGIN (relative, or a few times the log-probs' precision) from every clip
    bound and from the log-ratio clamp."""
    o = case["options"]
    if case["old"] is None:
        return True
    d = (logp - case["old"].double())[valid]
    margin = max(MARGIN, 10 * precision)
    if not bool(((d.abs() - 20).abs() > margin).all()):
        return False
    ratio = d[d.abs() < 20].exp()
    bounds = [1 - o["clip_low"], 1 + o["clip_high"]] + ([o["dual_clip"]] if o["dual_clip"] else [])
    return all(bool(((ratio - b).abs() > margin * max(b, 1e-3)).all()) for b in bounds)


def _upstream(case, shape):
    """|d loss / d loss_t| of each token, as _run backpropagates."""
    o = case["options"]
    n = 1
    for size in shape:
        n *= size
    if o["reduction"] == "none":
        return torch.linspace(-1, 2, n, dtype=torch.float64).view(shape).abs()
    if o["reduction"] == "sum":
        return torch.ones(shape, dtype=torch.float64)
    valid = case["targets"].long() != o["ignore_index"]
    num_items = case["num_items"]
    den = float(num_items) if num_items is not None else max(int(valid.sum()), 1)
    return torch.full(shape, 1.0 / den, dtype=torch.float64)


def _run(fn, leaf, view, case):
    targets = case["targets"].to(leaf.device)
    loss, metrics = fn(view, targets, _on(case["old"], leaf.device),
                       advantages=_on(case["advantages"], leaf.device),
                       num_items=case["num_items"], return_metrics=True, **case["options"])
    weights = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype, device=loss.device)
    (loss * weights.view(loss.shape)).sum().backward() if case["options"]["reduction"] == "none" \
        else loss.backward()
    return loss.detach(), metrics, leaf.grad


@given(loss_inputs())
def test_fused_matches_the_float64_reference(case):
    note(f"seed {case['seed']}, options {case['options']}, layout {case['layout']}")
    logits64 = case["base"].to(case["dtype"]).to(torch.float64)
    precision, logp, valid = _logp_precision(case, logits64)
    assume(_ratios_clear_of_the_bounds(case, logp, valid, precision))
    leaf, view = _logits_leaf(case)
    loss, metrics, grad = _run(psft_ext.psft_loss, leaf, view, case)
    ref_case = dict(case, base=logits64, dtype=torch.float64)
    ref_leaf, ref_view = _logits_leaf(ref_case)
    ref_loss, ref_metrics, ref_grad = _run(reference.psft_loss, ref_leaf, ref_view, ref_case)

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    per_token = reference.psft_loss(logits64, case["targets"], case["old"],
                                    advantages=case["advantages"],
                                    **dict(case["options"], reduction="none")).abs()
    mag = per_token.sum().item() if per_token.numel() else 0.0
    den = case["num_items"] if isinstance(case["num_items"], (int, float)) else 1.0
    # The ratio exp(logp - old) inherits the log-probs' absolute precision as a relative one.
    rtol = 1e-5 + 2 * precision
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=rtol,
                               atol=rtol * mag / min(den, 1.0) + 1e-6)
    low = case["dtype"] in LOW_PRECISION
    gmag = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    tol = 1e-2 if low else rtol
    # A row's gradient is s * (p - onehot), s = upstream * coef / tau (|coef| = |loss| where the
    # token is unclipped); p_y - 1 of a confident row is exp(x_y - lse) - 1, whose absolute error
    # is the log-probs' precision: each element is exact to about that times s, not relative to
    # itself.
    upstream = _upstream(case, per_token.shape)
    row_scale = (per_token * upstream).max().item() / case["options"]["temperature"] \
        if per_token.numel() else 0.0
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=tol,
                               atol=tol * gmag + 2 * precision * row_scale +
                               (1e-6 if low else 1e-9))
    for name in psft_ext.PSFTMetrics._fields:
        a, e = getattr(metrics, name), getattr(ref_metrics, name)
        torch.testing.assert_close(a.double().cpu(), e.cpu(), rtol=2e-5 + 2 * precision,
                                   atol=2e-5 + 2 * precision, msg=name)


@given(loss_inputs(special_values=True))
def test_non_finite_values_reach_the_gradient(case):
    """NaN / +-inf logits: a token whose loss is NaN has a NaN gradient row, every other row is
    finite, and the finite rows equal those of the same call without the bad rows."""
    note(f"seed {case['seed']}, options {case['options']}")
    options = dict(case["options"], reduction="none")
    leaf, view = _logits_leaf(case)
    targets = case["targets"].to(leaf.device)
    per_token = psft_ext.psft_loss(view, targets, _on(case["old"], leaf.device),
                                   advantages=_on(case["advantages"], leaf.device), **options)
    per_token.sum().backward()
    rows = leaf.grad if leaf is view else (leaf.grad[..., 2:2 + view.shape[-1]]
                                           if case["layout"] == "row_strided"
                                           else leaf.grad.transpose(-1, 0))
    nan_rows = torch.isnan(per_token)
    assert bool(torch.isnan(rows[nan_rows]).all()), "a NaN loss with a finite gradient"
    assert bool(torch.isfinite(rows[~nan_rows]).all()), "a finite loss with a non-finite gradient"


@given(st.integers(0, 2**31 - 1), st.sampled_from(DEVICES),
       st.sampled_from(["float32", "bfloat16"]), st.integers(1, 40), st.integers(1, 12),
       st.sampled_from(VOCABS), st.sampled_from(["mean", "sum", "none"]),
       st.sampled_from([None, 1, 3, 7]), st.booleans())
def test_fused_linear_matches_the_logits_form(seed, device, dtype_name, n, hidden_size, vocab,
                                              reduction, chunk_size, with_bias):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, hidden_size, generator=g) * 0.5).to(dtype).to(device)
    weight = torch.randn(vocab, hidden_size, generator=g).to(dtype).to(device)
    bias = torch.randn(vocab, generator=g).to(dtype).to(device) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    targets = targets.to(device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    fused = psft_ext.linear_psft_loss(leaves[0], leaves[1], targets, bias=bias,
                                      chunk_size=chunk_size, reduction=reduction)
    leaves2 = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    logits = torch.nn.functional.linear(leaves2[0], leaves2[1], bias)
    unfused = psft_ext.psft_loss(logits, targets, reduction=reduction)
    weights = torch.linspace(-1, 2, n, device=device) if reduction == "none" else None
    for out, ls in ((fused, leaves), (unfused, leaves2)):
        (out * weights).sum().backward() if weights is not None else out.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, unfused, **tol)
    for a, b in zip(leaves, leaves2):
        mag = b.grad.abs().max().item() if b.grad.numel() else 0.0
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * max(mag, 1.0))


@given(st.integers(0, 2**31 - 1), st.sampled_from(["float32", "bfloat16", "float16"]),
       st.integers(2, 30), st.sampled_from(VOCABS))
def test_bit_identical_run_to_run_and_across_batch_composition(seed, dtype_name, n, vocab):
    """Per-token outputs and gradient rows are bitwise the same run to run, whatever the number
    of threads, and a row's are the same whichever other rows share its call (computed alone,
    or in another order). On the CPU: rows are spread over threads whole."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    old = psft_ext.token_logprobs(logits, targets) + 0.3 * torch.randn(n, generator=g)

    def per_token(x, t, o):
        leaf = x.clone().requires_grad_(True)
        loss = psft_ext.psft_loss(leaf, t, o, reduction="none")
        loss.sum().backward()
        return loss.detach(), leaf.grad

    loss1, grad1 = per_token(logits, targets, old)
    loss2, grad2 = per_token(logits, targets, old)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)
    perm = torch.randperm(n, generator=g)
    loss_p, grad_p = per_token(logits[perm], targets[perm], old[perm])
    assert torch.equal(loss_p, loss1[perm]) and torch.equal(grad_p, grad1[perm])
    k = int(torch.randint(0, n, (1,), generator=g))
    loss_k, grad_k = per_token(logits[k:k + 1], targets[k:k + 1], old[k:k + 1])
    assert torch.equal(loss_k, loss1[k:k + 1]) and torch.equal(grad_k, grad1[k:k + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss_1t, grad_1t = per_token(logits, targets, old)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss_1t, loss1) and torch.equal(grad_1t, grad1)
