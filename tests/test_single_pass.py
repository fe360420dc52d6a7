"""The single pass: psft_fwd with ``grad`` writes, in the same pass over the logits, the gradient
of the loss it returns; it equals the two passes (psft_fwd, then psft_bwd from its stats).
scale_rows_ rescales such a gradient in place. psft_loss's use of them is tested in
test_loss_reduced.py."""

import pytest
import torch

import psft_ext

from conftest import (DTYPES, LOW_PRECISION, bwd_scale, dtype_id, fwd_args, generator, make_case,
                      raw_params, token_inputs)
from psft_ext._ops import METRIC_NAMES, TOKEN_STATS

ops = torch.ops.psft_ext
STATS = tuple(TOKEN_STATS)


def _close(device, dtype):
    """Bitwise on CPU (the same row functions); on CUDA the single-pass kernel may reduce in a
    different order than the two-kernel pair."""
    if device == "cpu":
        return dict(rtol=0, atol=0)
    return dict(rtol=2e-2, atol=1e-5) if dtype in LOW_PRECISION else dict(rtol=1e-5, atol=1e-6)


def _single_pass(case, logits=None, reduction="mean", num_items_value=2.5, grad=None):
    """psft_fwd with a gradient: (loss, metrics, stats, grad)."""
    args = fwd_args(case, logits, reduction=reduction, num_items_value=num_items_value)
    x = args[0]
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if grad is None else grad
    loss, _, _, metrics, stats = ops.psft_fwd(*args[:-1], grad)
    return loss, metrics, stats, grad


def _two_pass(case, logits=None, reduction="mean", num_items_value=2.5, upstream=None):
    """psft_fwd without a gradient, then psft_bwd from its stats (upstream gradient 1 per
    token unless given): (loss, metrics, stats, grad)."""
    args = fwd_args(case, logits, reduction=reduction, num_items_value=num_items_value)
    x, targets = args[0], args[1]
    loss, _, _, metrics, stats = ops.psft_fwd(*args)
    g = torch.ones(targets.shape, device=x.device) if upstream is None else upstream
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ops.psft_bwd(bwd_scale(stats, g), None, x, targets, stats, args[3], args[4], grad)
    return loss, metrics, stats, grad


# (rows, V): V below and above the CPU's 2048-element block and the vector widths, N = 1.
SHAPES = [((4, 6), 37), ((1,), 13), ((3, 2), 5001)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,vocab", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_the_two_pass_pair(device, dtype, shape, vocab, reduction):
    case = make_case(shape, vocab, dtype, device, ignore_frac=0.3, temperature=0.8,
                     dual_clip=3.0, seed=200)
    loss, _, stats, grad = _single_pass(case, reduction=reduction)
    exp_loss, _, exp_stats, exp_grad = _two_pass(case, reduction=reduction)
    torch.testing.assert_close(loss, exp_loss, **_close(device, torch.float32))
    for row, name in enumerate(STATS):
        torch.testing.assert_close(stats[row], exp_stats[row], **_close(device, torch.float32),
                                   msg=name)
    x = case.logits.detach().reshape(-1, vocab)
    assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
    torch.testing.assert_close(grad, exp_grad, **_close(device, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_in_place_variants(device, dtype):
    """The gradient written over the logits themselves (psft_fwd and psft_bwd with grad = the
    logits) is what the out-of-place calls return."""
    case = make_case((5, 3), 301, dtype, device, ignore_frac=0.3, seed=201)
    _, _, stats, grad = _single_pass(case)

    logits = case.logits.detach().reshape(-1, 301).clone()
    _, _, stats_in_place, _ = _single_pass(case, logits=logits, grad=logits)
    torch.testing.assert_close(stats_in_place, stats, rtol=0, atol=0)
    torch.testing.assert_close(logits, grad, rtol=0, atol=0)

    args = fwd_args(case)
    g = (0.25 + torch.rand(15, generator=generator(5))).to(device)
    exp_grad = torch.empty_like(args[0])
    ops.psft_bwd(bwd_scale(stats, g), None, args[0], args[1], stats, args[3], args[4], exp_grad)
    logits = args[0].clone()
    assert ops.psft_bwd(bwd_scale(stats, g), None, logits, args[1], stats, args[3], args[4],
                        logits) is None
    torch.testing.assert_close(logits, exp_grad, rtol=0, atol=0)


def test_strided_rows(device):
    """Rows of a wider buffer (row stride > V): same results as a contiguous copy."""
    case = make_case((6,), 41, torch.float32, device, ignore_frac=0.2, seed=202)
    wide = torch.randn(6, 50, generator=generator(3)).to(device)
    wide[:, 4:45] = case.logits.detach()
    *outs, grad = _single_pass(case, logits=wide[:, 4:45])
    *exp_outs, exp_grad = _single_pass(case)
    for got, exp in zip(outs + [grad], exp_outs + [exp_grad]):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scale_rows(device, dtype):
    grad = torch.randn(5, 19, generator=generator(4)).to(dtype).to(device)
    before = grad.clone()
    factor = torch.tensor([1.0, 0.5, 1.0, -3.0, 0.0], device=device)
    assert ops.scale_rows_(grad, factor) is None
    expected = (before.float() * factor[:, None]).to(dtype)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    # Rows with factor 1 are not rewritten at all (not even a NaN is touched).
    grad[0, 3] = float("nan")
    ops.scale_rows_(grad, torch.ones(5, device=device))
    assert torch.isnan(grad[0, 3])


@pytest.mark.parametrize("layout", ["expanded_scalar", "strided"])
def test_scale_rows_factor_strides(device, layout):
    """The factor is read with its stride: an expanded scalar (stride 0, what the backward of
    psft_fwd passes) and a strided view give the same rows as a contiguous copy."""
    grad = torch.randn(6, 37, generator=generator(6)).to(device)
    if layout == "expanded_scalar":
        factor = torch.tensor(-0.75, device=device).expand(6)
    else:
        factor = (torch.arange(12, dtype=torch.float32, device=device) * 0.1)[::2]
        assert factor.stride() == (2,)
    expected = grad.clone()
    ops.scale_rows_(expected, factor.contiguous())
    ops.scale_rows_(grad, factor)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_empty_and_all_ignored(device):
    for n in (0, 4):
        logits = torch.randn(n, 7, device=device)
        targets = torch.full((n,), -100, dtype=torch.long, device=device)
        grad = torch.full((n, 7), 5.0, device=device)
        loss, _, _, metrics, stats = ops.psft_fwd(logits, targets, token_inputs(), raw_params(),
                                                  -100, 0, None, 0.0, True, False, grad)
        assert stats.shape == (len(TOKEN_STATS), n) and grad.shape == (n, 7)
        assert metrics.shape == (len(METRIC_NAMES),)
        assert all(int(torch.count_nonzero(o)) == 0 for o in (loss, metrics, stats, grad))


def test_opcheck(device):
    case = make_case((3, 4), 13, torch.bfloat16, device, ignore_frac=0.3, seed=203)
    args = fwd_args(case, reduction="mean", with_metrics=True)
    x = args[0]
    torch.library.opcheck(ops.psft_fwd, args[:-1] + (torch.empty_like(x),))
    stats = ops.psft_fwd(*args)[4]
    g = (0.25 + torch.rand(12, generator=generator(5))).to(device)
    torch.library.opcheck(ops.psft_bwd, (bwd_scale(stats, g), None, x, args[1], stats, args[3],
                                         -100, x.clone()))
    torch.library.opcheck(ops.scale_rows_, (x.clone(), g))


def test_argument_errors(device):
    logits = torch.randn(4, 9, device=device)
    targets = torch.tensor([1, 2, -100, 8], device=device)
    params = raw_params(reduction="sum")

    def fwd(t=targets, grad=None):
        return ops.psft_fwd(logits, t, token_inputs(), params, -100, 0, None, 0.0, False, False,
                            grad)

    stats = fwd()[4]
    ones = torch.ones(4, device=device)
    for name, scales in (("scale", (torch.ones(3, device=device), None)),
                         ("ent_scale", (ones, torch.ones(3, device=device)))):
        with pytest.raises(ValueError, match=f"psft_bwd: {name} must have shape"):
            ops.psft_bwd(*scales, logits, targets, stats, params, -100, torch.empty_like(logits))
    for name, scales in (("scale", (ones.double(), None)), ("ent_scale", (ones, ones.double()))):
        with pytest.raises(TypeError, match=f"psft_bwd: {name} must be float32"):
            ops.psft_bwd(*scales, logits, targets, stats, params, -100, torch.empty_like(logits))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        fwd(grad=logits.t().contiguous().t())
    with pytest.raises(ValueError, match="grad must have the logits' shape"):
        fwd(grad=torch.empty(4, 8, device=device))
    with pytest.raises(TypeError, match="grad must have the logits' dtype"):
        fwd(grad=torch.empty(4, 9, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="target id 9 is out of range|out of range"):
        fwd(t=torch.tensor([1, 9, 0, 0], device=device), grad=torch.empty_like(logits))
    with pytest.raises(ValueError, match="factor must have shape"):
        ops.scale_rows_(logits, torch.ones(5, device=device))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        ops.scale_rows_(logits.t(), torch.ones(9, device=device))


# ----------------------------------------------------------------------------------------------
# CUDA: the single-pass kernel's launch shapes (clusters of 1 to 8 CTAs on Hopper; elsewhere the
# same op runs the two kernels back to back)
# ----------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _raw_single_and_two(logits, targets, old, adv, params, num_items_value, grad=None):
    """psft_fwd with a gradient (into ``grad``, or a new buffer) and without, then psft_bwd from
    the second's stats: ((stats, grad), (stats, grad)), reduction "mean" over num_items_value.
    With ``grad`` the logits themselves, only the first pair (the logits are overwritten)."""
    args = (logits, targets, token_inputs(old, adv), params, -100, 0, None, num_items_value,
            False, False)
    in_place = grad is logits
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if grad is None \
        else grad
    stats = ops.psft_fwd(*args, grad)[4]
    if in_place:
        return (stats, grad), None
    ref = ops.psft_fwd(*args, None)[4]
    exp_grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    ops.psft_bwd(bwd_scale(ref), None, logits, targets, ref, params, -100, exp_grad)
    return (stats, grad), (ref, exp_grad)


@cuda_only
@pytest.mark.parametrize("dtype,vocab", [
    (torch.bfloat16, 32000),    # one CTA per row
    (torch.float32, 32000),     # clusters of 2
    (torch.bfloat16, 151936),   # clusters of 4
    (torch.float32, 151936),    # clusters of 8
    (torch.float16, 50257),
    (torch.bfloat16, 7),        # rows of <= 32 KB: the two kernels, also with the opt-in
    (torch.float32, 100003),
], ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "offset3"])
@pytest.mark.parametrize("sm90", ["0", "1"], ids=["two_kernels", "sm90_single_pass"])
def test_cuda_single_pass_shapes(dtype, vocab, offset, sm90, monkeypatch):
    # The Hopper kernel is opt-in (PSFT_EXT_SM90_SINGLE_PASS=1); elsewhere both runs take the
    # two kernels.
    monkeypatch.setenv("PSFT_EXT_SM90_SINGLE_PASS", sm90)
    n = 37
    g = generator(vocab + offset)
    buf = (torch.randn(n, vocab + 8, generator=g) * 2.5).to(dtype).cuda()
    logits = buf[:, offset:offset + vocab]  # row stride > V; row starts off 16 bytes for offset 3
    targets = torch.randint(0, vocab, (n,), generator=g).cuda()
    targets[::5] = -100
    old = (psft_ext.token_logprobs(logits, targets)
           + 0.6 * (torch.rand(n, generator=g).cuda() - 0.5))
    params = raw_params(temperature=0.9)
    (stats, grad), (ref, exp_grad) = _raw_single_and_two(logits, targets, old, None, params, 7.0)
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=2e-2, atol=1e-6) if dtype in LOW_PRECISION else dict(rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(grad, exp_grad, **tol)
    # Run to run: bitwise the same.
    (stats2, grad2), _ = _raw_single_and_two(logits, targets, old, None, params, 7.0)
    assert torch.equal(grad, grad2) and torch.equal(stats, stats2)
    # In place over a contiguous copy: the same values. Not bitwise, nor to float32's last bit:
    # at offset 3 the copy's rows start at another 16-byte phase than the view's, which changes
    # which thread reads which element of rows over 4 KB, so lse (and with it log_ratio) may
    # differ in the last place; hence the tolerance of the comparison above.
    work = logits.contiguous()
    (stats3, _), _ = _raw_single_and_two(work, targets, old, None, params, 7.0, grad=work)
    torch.testing.assert_close(work, grad, **tol)
    torch.testing.assert_close(stats3, stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sm90", ["0", "1"], ids=["two_kernels", "sm90_single_pass"])
def test_single_pass_overlapping_rows(device, sm90, monkeypatch):
    """Rows that share memory (an expanded row, row stride 0) are valid input to read from."""
    monkeypatch.setenv("PSFT_EXT_SM90_SINGLE_PASS", sm90)
    n, vocab = 6, 40000
    g = generator(vocab)
    row = (torch.randn(vocab, generator=g) * 2.0).to(torch.bfloat16).to(device)
    logits = row.expand(n, vocab)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    params = raw_params()
    (stats, grad), _ = _raw_single_and_two(logits, targets, None, None, params, 4.0)
    (ref_stats, ref_grad), _ = _raw_single_and_two(logits.contiguous(), targets, None, None,
                                                   params, 4.0)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-2, atol=1e-6)


@cuda_only
def test_cuda_scale_rows_misaligned_rows():
    """V = 13 bf16: rows start off 16-byte boundaries; only rows with factor != 1 change."""
    grad = torch.randn(9, 13, generator=generator(9)).to(torch.bfloat16).cuda()
    factor = torch.tensor([1.0, 2.0, 1.0, 0.5, -1.0, 1.0, 3.0, 1.0, 0.0]).cuda()
    expected = (grad.float() * factor[:, None]).to(torch.bfloat16)
    ops.scale_rows_(grad, factor)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize("sm90", ["0", "1"], ids=["two_kernels", "sm90_single_pass"])
def test_cuda_single_pass_many_rows_per_cluster(vocab, sm90, monkeypatch):
    """N = 2000, far more rows than clusters are resident: each cluster of the persistent grid
    walks many rows, so the double-buffered partials, the barrier between rows and ignored rows
    (which skip the cluster barrier) between synchronising rows are all exercised. Ignored,
    clipped and dual-clipped rows are interleaved."""
    monkeypatch.setenv("PSFT_EXT_SM90_SINGLE_PASS", sm90)
    n = 2000
    g = generator(vocab + 2000)
    logits = (torch.randn(n, vocab, generator=g) * 2.0).to(torch.bfloat16).cuda()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::7] = -100
    targets[3::11] = -100  # runs of ignored rows of different lengths
    targets = targets.cuda()
    old = (psft_ext.token_logprobs(logits, targets)
           + 0.8 * (torch.rand(n, generator=g).cuda() - 0.5))
    adv = torch.where(torch.rand(n, generator=g) < 0.3, -1.5, 1.0).cuda()
    params = raw_params(dual_clip=3.0)
    (stats, grad), (ref, exp_grad) = _raw_single_and_two(logits, targets, old, adv, params,
                                                         1500.0)
    clipped = ref[STATS.index("clipped")]
    assert 0.05 < float(clipped[targets != -100].mean()) < 0.95  # both branches occur
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, exp_grad, rtol=2e-2, atol=1e-6)
    silent = (targets == -100) | (ref[STATS.index("coef")] == 0)
    assert int(torch.count_nonzero(grad[silent])) == 0
    # In place over the same (contiguous, aligned) rows: the same kernel path, bit for bit.
    work = logits.clone()
    (stats2, _), _ = _raw_single_and_two(work, targets, old, adv, params, 1500.0, grad=work)
    assert torch.equal(work, grad) and torch.equal(stats2, stats)
