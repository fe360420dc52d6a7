"""The single pass (psft_forward_backward, its in-place variant, psft_backward_, scale_rows_) and
psft_loss's use of it: the gradient formed with the forward, rescaled in the backward only where
the upstream gradient differs from the one expected."""

import pytest
import torch

import psft_ext
from psft_ext import reference

from conftest import DTYPES, LOW_PRECISION, dtype_id, generator, make_case

ops = torch.ops.psft_ext


def _args(case, logits=None):
    x = case.logits.detach().reshape(-1, case.logits.shape[-1]) if logits is None else logits
    dual = case.kwargs["dual_clip"]
    return (x, case.targets.reshape(-1), case.old_logprobs.reshape(-1),
            case.advantages.reshape(-1).float(), 1.0, case.kwargs["clip_low"],
            case.kwargs["clip_high"], 0.0 if dual is None else dual, case.ignore_index,
            case.kwargs["temperature"])


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
        factor = torch.arange(12, dtype=torch.float32, device=device)[::2] * 0.1
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
# psft_loss through the single pass
# ----------------------------------------------------------------------------------------------


def _reference_grad(case, upstream, reduction="mean", num_items=None):
    x = case.reference_logits()
    loss = reference.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                               reduction=reduction, num_items=num_items, **case.kwargs)
    loss.backward(torch.as_tensor(upstream, dtype=torch.float64, device=x.device))
    return x.grad


@pytest.mark.parametrize("upstream", [1.0, 0.37, -2.0, 0.0])
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("mean", 7.0),
                                                 ("mean", "tensor")])
def test_upstream_gradient_other_than_one(device, upstream, reduction, num_items):
    case = make_case((3, 5), 29, torch.float32, device, ignore_frac=0.3, seed=204)
    if num_items == "tensor":
        num_items = torch.tensor(6.0, device=device)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                              reduction=reduction, num_items=num_items, **case.kwargs)
    (loss * upstream).backward()
    expected = _reference_grad(case, upstream, reduction, num_items)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_loss_used_twice(device):
    case = make_case((2, 6), 23, torch.float32, device, seed=205)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                              **case.kwargs)
    (loss + 0.5 * loss).backward()
    torch.testing.assert_close(x.grad.double(), _reference_grad(case, 1.5), rtol=1e-5,
                               atol=1e-7)


def test_the_logits_are_not_kept_for_the_backward(device):
    """The single pass saves its gradient, not the logits (the logits' memory can go once the
    caller drops them); reduction "none" (two passes) does save them."""
    case = make_case((3, 4), 17, torch.float32, device, seed=206)

    def saved_pointers(reduction):
        x = case.fused_logits()
        pointers = []

        def pack(t):
            pointers.append(t.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            psft_ext.psft_loss(x, case.targets, case.old_logprobs, reduction=reduction,
                               **case.kwargs)
        return x.data_ptr(), pointers

    logits_ptr, pointers = saved_pointers("mean")
    assert pointers and logits_ptr not in pointers
    logits_ptr, pointers = saved_pointers("none")
    assert logits_ptr in pointers


def test_second_backward_is_an_error(device):
    """The backward rescales the saved gradient in place: a second backward through the same
    graph must fail rather than return a twice-scaled gradient."""
    case = make_case((2, 4), 11, torch.float32, device, seed=207)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, **case.kwargs)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (2 * loss).backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_no_grad_and_frozen_logits_take_the_forward_only(device, dtype, monkeypatch):
    """psft_loss asks psft_loss_reduced for the gradient only when the logits need one."""
    case = make_case((2, 4), 11, dtype, device, seed=208)
    with_grad = []
    real = ops.psft_loss_reduced
    monkeypatch.setattr(ops, "psft_loss_reduced",
                        lambda *a: with_grad.append(a[-2]) or real(*a), raising=False)
    with torch.no_grad():
        psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs, **case.kwargs)
    psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs, **case.kwargs)
    loss = psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs, **case.kwargs)
    assert with_grad == [False, False, True]
    assert loss.requires_grad


# ----------------------------------------------------------------------------------------------
# psft_loss_reduced, the op behind psft_loss's "mean" and "sum"
# ----------------------------------------------------------------------------------------------


def _reduced(case, denominator=None, denominator_value=0.0, with_grad=True, with_metrics=True,
             logits=None):
    return ops.psft_loss_reduced(*_args(case, logits), denominator, denominator_value, with_grad,
                                 with_metrics)


@pytest.mark.parametrize("denominator", ["count", "value", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reduced_matches_the_per_token_ops(device, dtype, denominator):
    """Loss = sum of psft_forward's per-token losses / den; the metrics, token means of its
    per-token outputs; the gradient = psft_forward_backward's for the upstream gradient 1 / den;
    nothing logits-sized without with_grad."""
    case = make_case((3, 5), 37, dtype, device, ignore_frac=0.3, seed=210)
    count = int(case.valid.sum())
    den_tensor, den_value, den = None, 0.0, float(count)
    if denominator == "value":
        den_value = den = 11.5
    elif denominator == "tensor":
        den_tensor, den = torch.tensor(9, device=device), 9.0
    loss, metrics, grad = _reduced(case, den_tensor, den_value)
    loss_t, logp, entropy, ratio, log_ratio, clipped, _, _ = ops.psft_forward(*_args(case))
    n = loss_t.shape[0]
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_t.sum() / den)
    expected = torch.stack([-logp.sum(), entropy.sum(), clipped.sum(), -log_ratio.sum(),
                            ratio.sum()]) / count
    assert metrics.shape == (6,) and metrics.dtype == torch.float32
    torch.testing.assert_close(metrics[:5], expected)
    assert float(metrics[5]) == count
    g = torch.full((n,), 1.0 / den, dtype=torch.float32, device=device)
    torch.testing.assert_close(grad, ops.psft_forward_backward(*_args(case), g)[8], rtol=0,
                               atol=0)
    loss2, metrics2, grad2 = _reduced(case, den_tensor, den_value, with_grad=False,
                                      with_metrics=False)
    assert grad2.numel() == 0 and metrics2.numel() == 0
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_reduced_empty_and_all_ignored(device):
    for n in (0, 3):
        logits = torch.randn(n, 7, device=device)
        targets = torch.full((n,), -100, dtype=torch.long, device=device)
        loss, metrics, grad = ops.psft_loss_reduced(logits, targets, None, None, 1.0, 0.2, 0.28,
                                                    0.0, -100, 1.0, None, 0.0, True, True)
        assert float(loss) == 0.0 and grad.shape == (n, 7)
        assert torch.count_nonzero(metrics) == 0


def test_reduced_opcheck(device):
    """Every opcheck test on logits without a gradient; with one, all but the AOT dispatch
    tests. Those return every output of the op from the traced function, the gradient output
    too, which the backward then rescales in place; AOT autograd's partitioner cannot split a
    graph that returns a tensor its backward mutates (psft_forward_backward's opcheck has the
    same limit). psft_loss never returns that output: test_ops.py compiles psft_loss's forward
    and backward, with static and dynamic shapes."""
    case = make_case((3, 4), 13, torch.bfloat16, device, ignore_frac=0.3, seed=211)
    x = case.logits.detach().reshape(-1, 13).clone()
    for den, value, with_grad, with_metrics in (
            (None, 0.0, True, True), (None, 1.0, True, False),
            (torch.tensor(5.0, device=device), 0.0, True, True), (None, 0.0, False, True)):
        flags = (den, value, with_grad, with_metrics)
        torch.library.opcheck(ops.psft_loss_reduced, _args(case, x) + flags)
        if with_grad:
            torch.library.opcheck(
                ops.psft_loss_reduced, _args(case, x.clone().requires_grad_(True)) + flags,
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_reduced_argument_errors(device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 8], device=device)
    rest = (None, None, 1.0, 0.2, 0.28, 0.0, -100, 1.0)
    flags = (True, False)
    with pytest.raises(ValueError, match="denominator must hold one value"):
        ops.psft_loss_reduced(logits, targets, *rest, torch.ones(2, device=device), 0.0, *flags)
    with pytest.raises(ValueError, match="denominator_value must be finite and >= 0"):
        ops.psft_loss_reduced(logits, targets, *rest, None, -1.0, *flags)
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        ops.psft_loss_reduced(logits, targets.float(), *rest, None, 0.0, *flags)
    with pytest.raises(ValueError, match="targets must be 1-D"):
        ops.psft_loss_reduced(logits, targets.view(2, 2), *rest, None, 0.0, *flags)
    with pytest.raises(ValueError, match="out of range"):
        ops.psft_loss_reduced(logits, torch.tensor([1, 9, 0, 0], device=device), *rest, None,
                              0.0, *flags)
    loss = ops.psft_loss_reduced(logits, targets, *rest, None, 0.0, False, False)[0]
    with pytest.raises(RuntimeError, match="with_grad=False"):
        loss.backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reduced_metrics_match_reduction_none(device, dtype):
    """psft_loss's metrics from the op ("mean") equal those computed from the per-token outputs
    (reduction "none", in Python)."""
    case = make_case((2, 6), 17, dtype, device, ignore_frac=0.4, seed=212)
    _, got = psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs,
                                advantages=case.advantages, return_metrics=True, **case.kwargs)
    _, want = psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs,
                                 advantages=case.advantages, reduction="none",
                                 return_metrics=True, **case.kwargs)
    for name in psft_ext.PSFTMetrics._fields:
        value = getattr(got, name)
        assert value.shape == () and value.dtype == torch.float32 and not value.requires_grad
        torch.testing.assert_close(value, getattr(want, name), rtol=1e-6, atol=1e-7, msg=name)


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
    # In place over a contiguous copy: the same values.
    work = logits.contiguous()
    outs3 = ops.psft_forward_backward_(work, *args[1:], expected)
    torch.testing.assert_close(work, grad, **tol)
    for got, exp in zip(outs3, outs):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)


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
