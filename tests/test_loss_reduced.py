"""psft_loss's "mean" and "sum": one op (psft_fwd) for the token count, the denominator, the single
pass, the reduction and the metrics, with one backward node that rescales the gradient written in
the forward only where the upstream gradient is not the one expected. The op counts and reduces
with host loops on the CPU and with tensor ops on other devices (the CUDA runs of these tests)."""

import pytest
import torch

import psft_ext
from psft_ext import reference

from conftest import DTYPES, bwd_scale, dtype_id, fwd_args, make_case, raw_params, token_inputs
from psft_ext._ops import METRIC_NAMES, REDUCTIONS, TOKEN_STATS

ops = torch.ops.psft_ext


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
    with pytest.raises(RuntimeError, match="a second backward through the same graph"):
        (2 * loss).backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_double_backward_is_an_error(device, dtype, reduction):
    """The fused gradient is not differentiable: backward(create_graph=True) raises instead of
    silently leaving out the second-order term (reduction "none" gave no gradient at all, only
    a deprecation warning; "mean" a misleading in-place error)."""
    case = make_case((2, 4), 11, dtype, device, seed=213)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, reduction=reduction,
                              **{k: v for k, v in case.kwargs.items() if k != "reduction"})
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss.sum(), x, create_graph=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_no_grad_and_frozen_logits_take_the_forward_only(device, dtype):
    """Without a gradient to compute the loss records nothing for a backward; with one, the
    single pass keeps its gradient (not the logits), and float16 logits take the two passes
    instead, which keep the logits (test_loss.py: the loss scale)."""
    case = make_case((2, 4), 11, dtype, device, seed=208)

    def saved(logits):
        kept = []

        def pack(t):
            kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = psft_ext.psft_loss(logits, case.targets, case.old_logprobs, **case.kwargs)
        return loss, kept

    with torch.no_grad():
        loss, kept = saved(case.fused_logits())
    assert loss.grad_fn is None and not kept
    loss, kept = saved(case.logits.detach())
    assert loss.grad_fn is None and not kept
    x = case.fused_logits()
    loss, kept = saved(x)
    assert loss.requires_grad
    keeps_logits = any(t.data_ptr() == x.data_ptr() for t in kept)
    assert keeps_logits == (dtype == torch.float16)
    # A gradient of the logits' size and dtype (not the logits) is kept by the single pass.
    assert any(t.numel() == x.numel() and t.dtype == x.dtype and t.data_ptr() != x.data_ptr()
               for t in kept) == (dtype != torch.float16)


# ----------------------------------------------------------------------------------------------
# The op itself
# ----------------------------------------------------------------------------------------------


def _reduced(case, num_items=None, num_items_value=0.0, with_grad=True, with_metrics=True,
             reduction="mean", logits=None):
    """psft_fwd with a reduction: (loss, metrics, grad); grad is None without with_grad."""
    args = fwd_args(case, logits, reduction=reduction, num_items=num_items,
                    num_items_value=num_items_value, with_metrics=with_metrics)
    grad = torch.empty_like(args[0]) if with_grad else None
    loss, _, _, metrics, _ = ops.psft_fwd(*args[:-1], grad)
    return loss, metrics, grad


def _per_token(case):
    """psft_fwd's per-token outputs (reduction "none"), by name."""
    stats = ops.psft_fwd(*fwd_args(case))[4]
    return dict(zip(TOKEN_STATS, stats)), stats


@pytest.mark.parametrize("denominator", ["count", "value", "tensor", "tensor_1", "tensor_1x1",
                                         "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reduced_matches_the_per_token_ops(device, dtype, denominator):
    """Loss = sum of the per-token losses / den; the metrics, token means of the per-token
    outputs; the gradient = psft_bwd's from the per-token stats for the upstream gradient
    1 / den; no gradient without one. A num_items tensor of one element may have any shape
    ((), (1,), (1, 1)): the loss is 0-d all the same."""
    case = make_case((3, 5), 37, dtype, device, ignore_frac=0.3, seed=210)
    count = int(case.valid.sum())
    den_tensor, den_value, den, reduction = None, 0.0, float(count), "mean"
    if denominator == "value":
        den_value = den = 11.5
    elif denominator == "sum":
        den, reduction = 1.0, "sum"
    elif denominator.startswith("tensor"):
        shape = {"tensor": (), "tensor_1": (1,), "tensor_1x1": (1, 1)}[denominator]
        den_tensor, den = torch.full(shape, 9, device=device), 9.0
    loss, metrics, grad = _reduced(case, den_tensor, den_value, reduction=reduction)
    rows, stats = _per_token(case)
    n = rows["loss"].shape[0]
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, rows["loss"].sum() / den)
    clipped, ratio, adv = rows["clipped"], rows["ratio"], case.advantages.reshape(-1)
    assert bool((clipped * (adv > 0)).any()) and bool((clipped * (ratio < 1)).any())
    expected = torch.stack([-rows["logp"].sum(), rows["entropy"].sum(), clipped.sum(),
                            -rows["log_ratio"].sum(), ratio.sum(), (clipped * (adv > 0)).sum(),
                            (clipped * (ratio < 1)).sum(),
                            (clipped * ((adv < 0) & (ratio > 1))).sum(),
                            rows["correct"].sum()]) / count
    assert metrics.shape == (len(METRIC_NAMES),) and metrics.dtype == torch.float32
    torch.testing.assert_close(metrics[:-1], expected)
    assert float(metrics[METRIC_NAMES.index("num_tokens")]) == count
    g = torch.full((n,), 1.0 / den, dtype=torch.float32, device=device)
    x = case.logits.detach().reshape(n, -1)
    exp_grad = torch.empty_like(x)
    ops.psft_bwd(bwd_scale(stats, g), None, x, case.targets.reshape(-1), stats,
                 fwd_args(case)[3], case.ignore_index, exp_grad)
    torch.testing.assert_close(grad, exp_grad, rtol=0, atol=0)
    loss2, metrics2, _ = _reduced(case, den_tensor, den_value, with_grad=False,
                                  with_metrics=False, reduction=reduction)
    assert metrics2.numel() == 0
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


def test_reduced_count_compares_int32_targets_in_int64(device):
    """An ignore_index outside int32's range matches no int32 target (the kernels compare in
    int64); in int32 arithmetic 2**32 would wrap to 0 and drop the token of id 0 from the
    count."""
    logits = torch.randn(4, 9, device=device)
    targets = torch.tensor([0, 2, 3, 8], dtype=torch.int32, device=device)
    loss, _, _, metrics, _ = ops.psft_fwd(logits, targets, token_inputs(),
                                          raw_params(reduction="mean"), 2**32, 0, None, 0.0,
                                          True, False, None)
    assert float(metrics[METRIC_NAMES.index("num_tokens")]) == 4
    per_token = ops.psft_fwd(logits, targets.long(), token_inputs(),
                             raw_params(reduction="none"), -100, 0, None, 0.0, False, False,
                             None)[0]
    torch.testing.assert_close(loss, per_token.sum() / 4)


def test_reduced_empty_and_all_ignored(device):
    for n in (0, 3):
        logits = torch.randn(n, 7, device=device)
        targets = torch.full((n,), -100, dtype=torch.long, device=device)
        grad = torch.empty(n, 7, device=device)
        loss, _, _, metrics, _ = ops.psft_fwd(logits, targets, token_inputs(),
                                              raw_params(reduction="mean"), -100, 0, None, 0.0,
                                              True, False, grad)
        assert metrics.shape == (len(METRIC_NAMES),)
        assert float(loss) == 0.0 and grad.shape == (n, 7)
        assert torch.count_nonzero(metrics) == 0 and torch.count_nonzero(grad) == 0


def test_reduced_opcheck(device):
    """Every opcheck test on logits without a gradient; with one, all but the AOT dispatch
    tests. Those return every output of the op from the traced function, and the single pass's
    backward rescales in place a gradient saved in the forward; AOT autograd's partitioner cannot
    split such a graph when the traced function returns everything. psft_loss returns only the
    loss and the metrics: test_ops.py compiles its forward and backward, with static and dynamic
    shapes."""
    case = make_case((3, 4), 13, torch.bfloat16, device, ignore_frac=0.3, seed=211)
    x = case.logits.detach().reshape(-1, 13).clone()
    for reduction, num_items, value, with_metrics in (
            ("mean", None, 0.0, True), ("sum", None, 0.0, False),
            ("mean", torch.tensor(5.0, device=device), 0.0, True), ("mean", None, 3.0, True),
            ("none", None, 0.0, True)):
        args = fwd_args(case, x, reduction=reduction, num_items=num_items, num_items_value=value,
                        with_metrics=with_metrics)
        torch.library.opcheck(ops.psft_fwd, args)
        torch.library.opcheck(ops.psft_fwd, args[:-1] + (torch.empty_like(x),))
        torch.library.opcheck(
            ops.psft_fwd, (x.clone().requires_grad_(True),) + args[1:],
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_reduced_argument_errors(device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 8], device=device)

    def fwd(t=targets, num_items=None, value=0.0, reduction="mean", grad=None):
        return ops.psft_fwd(logits, t, token_inputs(), raw_params(reduction=reduction), -100, 0,
                            num_items, value, False, False, grad)

    with pytest.raises(ValueError, match="num_items must hold one value"):
        fwd(num_items=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="num_items_value must be finite and >= 0"):
        fwd(value=-1.0)
    for code in (-1, len(REDUCTIONS), 1.5, float("nan")):
        with pytest.raises(ValueError, match="reduction must be"):
            fwd(reduction=code)
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        fwd(t=targets.float())
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\)"):
        fwd(t=targets.view(2, 2))
    with pytest.raises(ValueError, match="out of range"):
        fwd(t=torch.tensor([1, 9, 0, 0], device=device))
    with pytest.raises(ValueError, match="`grad` is for logits that need no autograd"):
        fwd(grad=torch.empty(4, 9, device=device))


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
