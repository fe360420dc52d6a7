"""The single pass (psft_forward_backward, its in-place variant, psft_backward_, scale_rows_): the
gradient formed with the forward, for the upstream gradient the caller expects. psft_loss's use of
it (through psft_loss_reduced) is tested in test_loss_reduced.py."""

import pytest
import torch

from conftest import (DTYPES, LOW_PRECISION, dtype_id, generator, loss_op_args as _args,
                      make_case)

ops = torch.ops.psft_ext


def _expected_grad_loss(n, device, seed=5):
    # Distinct per-row values, none of them 0.
    return (0.25 + torch.rand(n, generator=generator(seed))).to(device)


def _close(device, dtype):
    """Bitwise on CPU (the same row functions); on CUDA the single-pass kernel may reduce in a
    different order than the two-kernel pair."""
    if device == "cpu":
        return dict(rtol=0, atol=0)
    return dict(rtol=2e-2, atol=1e-5) if dtype in LOW_PRECISION else dict(rtol=1e-5, atol=1e-6)


# (rows, V): V below and above the CPU's 2048-element block and the vector widths, N = 1.
SHAPES = [((4, 6), 37), ((1,), 13), ((3, 2), 5001)]


@pytest.mark.parametrize("shape,vocab", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_the_two_pass_pair(device, dtype, shape, vocab):
    case = make_case(shape, vocab, dtype, device, ignore_frac=0.3, temperature=0.8,
                     dual_clip=3.0, seed=200)
    args = _args(case)
    g = _expected_grad_loss(args[1].numel(), device)
    *outs, grad = ops.psft_forward_backward(*args, g)
    ref = ops.psft_forward(*args)
    for got, exp in zip(outs, ref):
        torch.testing.assert_close(got, exp, **_close(device, torch.float32))
    exp_grad = ops.psft_backward(g, args[0], args[1], ref[6], ref[7], case.ignore_index,
                                 case.kwargs["temperature"])
    assert grad.dtype == dtype and grad.shape == args[0].shape and grad.is_contiguous()
    torch.testing.assert_close(grad, exp_grad, **_close(device, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_in_place_variants(device, dtype):
    """psft_forward_backward_ and psft_backward_ leave in the logits what the out-of-place ops
    return."""
    case = make_case((5, 3), 301, dtype, device, ignore_frac=0.3, seed=201)
    args = _args(case)
    g = _expected_grad_loss(args[1].numel(), device)
    *outs, grad = ops.psft_forward_backward(*args, g)

    logits = args[0].clone()
    outs_in_place = ops.psft_forward_backward_(logits, *args[1:], g)
    for got, exp in zip(outs_in_place, outs):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    torch.testing.assert_close(logits, grad, rtol=0, atol=0)

    lse, coef = outs[6], outs[7]
    exp_grad = ops.psft_backward(g, args[0], args[1], lse, coef, case.ignore_index, 1.0)
    logits = args[0].clone()
    assert ops.psft_backward_(g, logits, args[1], lse, coef, case.ignore_index, 1.0) is None
    torch.testing.assert_close(logits, exp_grad, rtol=0, atol=0)


def test_strided_rows(device):
    """Rows of a wider buffer (row stride > V): same results as a contiguous copy."""
    case = make_case((6,), 41, torch.float32, device, ignore_frac=0.2, seed=202)
    wide = torch.randn(6, 50, generator=generator(3)).to(device)
    wide[:, 4:45] = case.logits.detach()
    args = _args(case, logits=wide[:, 4:45])
    g = _expected_grad_loss(6, device)
    *outs, grad = ops.psft_forward_backward(*args, g)
    *exp_outs, exp_grad = ops.psft_forward_backward(*_args(case), g)
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
    psft_loss_reduced passes) and a strided view give the same rows as a contiguous copy."""
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
    for n, ignore_frac in ((0, 0.0), (4, 1.0)):
        logits = torch.randn(n, 7, device=device)
        targets = torch.full((n,), -100, dtype=torch.long, device=device)
        outs = ops.psft_forward_backward(logits, targets, None, None, 1.0, 0.2, 0.28, 0.0, -100,
                                         1.0, torch.ones(n, device=device))
        assert outs[8].shape == (n, 7)
        assert all(int(torch.count_nonzero(o)) == 0 for o in outs)


def test_opcheck(device):
    case = make_case((3, 4), 13, torch.bfloat16, device, ignore_frac=0.3, seed=203)
    args = _args(case)
    g = _expected_grad_loss(12, device)
    torch.library.opcheck(ops.psft_forward_backward, args + (g,))
    torch.library.opcheck(ops.psft_forward_backward_, (args[0].clone(),) + args[1:] + (g,))
    out = ops.psft_forward(*args)
    torch.library.opcheck(ops.psft_backward_, (g, args[0].clone(), args[1], out[6], out[7],
                                               -100, 1.0))
    torch.library.opcheck(ops.scale_rows_, (args[0].clone(), g))


def test_argument_errors(device):
    logits = torch.randn(4, 9, device=device)
    targets = torch.tensor([1, 2, -100, 8], device=device)
    rest = (None, None, 1.0, 0.2, 0.28, 0.0, -100, 1.0)
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        ops.psft_forward_backward(logits, targets, *rest, torch.ones(3, device=device))
    with pytest.raises(TypeError, match="grad_loss must be float32"):
        ops.psft_forward_backward(logits, targets, *rest,
                                  torch.ones(4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="contiguous to receive the gradient in place"):
        ops.psft_forward_backward_(logits.t().contiguous().t(), targets, *rest,
                                   torch.ones(4, device=device))
    with pytest.raises(ValueError, match="target id 9 is out of range|out of range"):
        ops.psft_forward_backward(logits, torch.tensor([1, 9, 0, 0], device=device), *rest,
                                  torch.ones(4, device=device))
    with pytest.raises(ValueError, match="factor must have shape"):
        ops.scale_rows_(logits, torch.ones(5, device=device))
    with pytest.raises(ValueError, match="grad must be contiguous"):
        ops.scale_rows_(logits.t(), torch.ones(9, device=device))


# ----------------------------------------------------------------------------------------------
# CUDA: the single-pass kernel's launch shapes (clusters of 1 to 8 CTAs on Hopper; elsewhere the
# same op runs the two kernels back to back)
# ----------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
    old = (ops.token_logprobs(logits, targets, -100, 1.0)[0]
           + 0.6 * (torch.rand(n, generator=g).cuda() - 0.5))
    args = (logits, targets, old, None, 1.0, 0.2, 0.28, 0.0, -100, 0.9)
    expected = (0.5 + torch.rand(n, generator=g)).cuda()
    *outs, grad = ops.psft_forward_backward(*args, expected)
    ref = ops.psft_forward(*args)
    for got, exp in zip(outs, ref):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    exp_grad = ops.psft_backward(expected, logits, targets, ref[6], ref[7], -100, 0.9)
    tol = dict(rtol=2e-2, atol=1e-6) if dtype in LOW_PRECISION else dict(rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(grad, exp_grad, **tol)
    # Run to run: bitwise the same.
    *outs2, grad2 = ops.psft_forward_backward(*args, expected)
    assert torch.equal(grad, grad2) and all(torch.equal(a, b) for a, b in zip(outs, outs2))
    # In place over a contiguous copy: the same values. Not bitwise, nor to float32's last bit:
    # at offset 3 the copy's rows start at another 16-byte phase than the view's, which changes
    # which thread reads which element of rows over 4 KB, so lse (and with it log_ratio) may
    # differ in the last place; hence the tolerance of the comparison above.
    work = logits.contiguous()
    outs3 = ops.psft_forward_backward_(work, *args[1:], expected)
    torch.testing.assert_close(work, grad, **tol)
    for got, exp in zip(outs3, outs):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sm90", ["0", "1"], ids=["two_kernels", "sm90_single_pass"])
def test_single_pass_overlapping_rows(device, sm90, monkeypatch):
    """Rows that share memory (an expanded row, row stride 0) are valid input to read from."""
    monkeypatch.setenv("PSFT_EXT_SM90_SINGLE_PASS", sm90)
    n, vocab = 6, 40000
    g = generator(vocab)
    row = (torch.randn(vocab, generator=g) * 2.0).to(torch.bfloat16).to(device)
    logits = row.expand(n, vocab)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    args = (logits, targets, None, None, 1.0, 0.2, 0.28, 0.0, -100, 1.0)
    expected = torch.full((n,), 0.25, device=device)
    *outs, grad = ops.psft_forward_backward(*args, expected)
    dense = logits.contiguous()
    *ref_outs, ref_grad = ops.psft_forward_backward(dense, *args[1:], expected)
    for got, exp in zip(outs, ref_outs):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
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
    clipped, dual-clipped and zero-upstream rows are interleaved."""
    monkeypatch.setenv("PSFT_EXT_SM90_SINGLE_PASS", sm90)
    n = 2000
    g = generator(vocab + 2000)
    logits = (torch.randn(n, vocab, generator=g) * 2.0).to(torch.bfloat16).cuda()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::7] = -100
    targets[3::11] = -100  # runs of ignored rows of different lengths
    targets = targets.cuda()
    old = (ops.token_logprobs(logits, targets, -100, 1.0)[0]
           + 0.8 * (torch.rand(n, generator=g).cuda() - 0.5))
    adv = torch.where(torch.rand(n, generator=g) < 0.3, -1.5, 1.0).cuda()
    args = (logits, targets, old, adv, 1.0, 0.2, 0.28, 3.0, -100, 1.0)
    expected = (0.5 + torch.rand(n, generator=g)).cuda()
    expected[5::13] = 0.0
    *outs, grad = ops.psft_forward_backward(*args, expected)
    ref = ops.psft_forward(*args)
    clipped = ref[5]
    assert 0.05 < float(clipped[targets != -100].mean()) < 0.95  # both branches occur
    for got, exp in zip(outs, ref):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    exp_grad = ops.psft_backward(expected, logits, targets, ref[6], ref[7], -100, 1.0)
    torch.testing.assert_close(grad, exp_grad, rtol=2e-2, atol=1e-6)
    silent = (targets == -100) | (ref[7] == 0) | (expected == 0)
    assert int(torch.count_nonzero(grad[silent])) == 0
    # In place over the same (contiguous, aligned) rows: the same kernel path, bit for bit.
    work = logits.clone()
    outs2 = ops.psft_forward_backward_(work, *args[1:], expected)
    assert torch.equal(work, grad) and all(torch.equal(a, b) for a, b in zip(outs2, outs))
