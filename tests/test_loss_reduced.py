"""psft_loss's "mean" and "sum" through psft_loss_reduced (csrc/psft_reduced.cpp): one op for the
token count, the denominator, the single pass, the reduction and the metrics, with one backward
node that rescales the gradient written in the forward only where the upstream gradient is not
the one expected. Both branches of the op run on the CPU: host loops, and (with
PSFT_EXT_REDUCED_TENSOR_OPS=1) the tensor ops every other device takes."""

import pytest
import torch

import psft_ext
from psft_ext import reference

from conftest import DTYPES, dtype_id, loss_op_args as _args, make_case

ops = torch.ops.psft_ext


@pytest.fixture(params=["host_loops", "tensor_ops"])
def reduced_branch(request, device, monkeypatch):
    """psft_loss_reduced's two branches: host loops for CPU tensors, tensor ops on every other
    device (and on the CPU with PSFT_EXT_REDUCED_TENSOR_OPS=1, so CI runs that branch too)."""
    if request.param == "tensor_ops":
        monkeypatch.setenv("PSFT_EXT_REDUCED_TENSOR_OPS", "1")
    elif device != "cpu":
        pytest.skip("host loops are for CPU tensors")
    return request.param


def _reference_grad(case, upstream, reduction="mean", num_items=None):
    x = case.reference_logits()
    loss = reference.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                               reduction=reduction, num_items=num_items, **case.kwargs)
    loss.backward(torch.as_tensor(upstream, dtype=torch.float64, device=x.device))
    return x.grad


@pytest.mark.parametrize("upstream", [1.0, 0.37, -2.0, 0.0])
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("mean", 7.0),
                                                 ("mean", "tensor")])
def test_upstream_gradient_other_than_one(device, reduced_branch, upstream, reduction, num_items):
    case = make_case((3, 5), 29, torch.float32, device, ignore_frac=0.3, seed=204)
    if num_items == "tensor":
        num_items = torch.tensor(6.0, device=device)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                              reduction=reduction, num_items=num_items, **case.kwargs)
    (loss * upstream).backward()
    expected = _reference_grad(case, upstream, reduction, num_items)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_loss_used_twice(device, reduced_branch):
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
    """psft_loss asks psft_loss_reduced for the gradient only when the logits need one, and
    float16 logits that need one take the two passes instead (test_loss.py: the loss scale)."""
    case = make_case((2, 4), 11, dtype, device, seed=208)
    with_grad = []
    real = ops.psft_loss_reduced
    monkeypatch.setattr(ops, "psft_loss_reduced",
                        lambda *a: with_grad.append(a[-2]) or real(*a), raising=False)
    with torch.no_grad():
        psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs, **case.kwargs)
    psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs, **case.kwargs)
    loss = psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs, **case.kwargs)
    assert with_grad == ([False, False] if dtype == torch.float16 else [False, False, True])
    assert loss.requires_grad


# ----------------------------------------------------------------------------------------------
# The op itself
# ----------------------------------------------------------------------------------------------


def _reduced(case, denominator=None, denominator_value=0.0, with_grad=True, with_metrics=True,
             logits=None):
    return ops.psft_loss_reduced(*_args(case, logits), denominator, denominator_value, with_grad,
                                 with_metrics)


@pytest.mark.parametrize("denominator", ["count", "value", "tensor", "tensor_1", "tensor_1x1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reduced_matches_the_per_token_ops(device, reduced_branch, dtype, denominator):
    """Loss = sum of psft_forward's per-token losses / den; the metrics, token means of its
    per-token outputs; the gradient = psft_forward_backward's for the upstream gradient 1 / den;
    nothing logits-sized without with_grad. A denominator tensor of one element may have any
    shape ((), (1,), (1, 1)): the loss is 0-d all the same."""
    case = make_case((3, 5), 37, dtype, device, ignore_frac=0.3, seed=210)
    count = int(case.valid.sum())
    den_tensor, den_value, den = None, 0.0, float(count)
    if denominator == "value":
        den_value = den = 11.5
    elif denominator.startswith("tensor"):
        shape = {"tensor": (), "tensor_1": (1,), "tensor_1x1": (1, 1)}[denominator]
        den_tensor, den = torch.full(shape, 9, device=device), 9.0
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


def test_reduced_count_compares_int32_targets_in_int64(device, reduced_branch):
    """An ignore_index outside int32's range matches no int32 target (the kernels compare in
    int64); in int32 arithmetic 2**32 would wrap to 0 and drop the token of id 0 from the
    count."""
    logits = torch.randn(4, 9, device=device)
    targets = torch.tensor([0, 2, 3, 8], dtype=torch.int32, device=device)
    loss, metrics, _ = ops.psft_loss_reduced(logits, targets, None, None, 1.0, 0.2, 0.28, 0.0,
                                             2**32, 1.0, None, 0.0, False, True)
    assert float(metrics[5]) == 4
    expected = ops.psft_forward(logits, targets.long(), None, None, 1.0, 0.2, 0.28, 0.0, -100,
                                1.0)[0].sum() / 4
    torch.testing.assert_close(loss, expected)


def test_reduced_empty_and_all_ignored(device, reduced_branch):
    for n in (0, 3):
        logits = torch.randn(n, 7, device=device)
        targets = torch.full((n,), -100, dtype=torch.long, device=device)
        loss, metrics, grad = ops.psft_loss_reduced(logits, targets, None, None, 1.0, 0.2, 0.28,
                                                    0.0, -100, 1.0, None, 0.0, True, True)
        assert float(loss) == 0.0 and grad.shape == (n, 7)
        assert torch.count_nonzero(metrics) == 0


def test_reduced_opcheck(device, reduced_branch):
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


def test_reduced_argument_errors(device, reduced_branch):
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
def test_reduced_metrics_match_reduction_none(device, reduced_branch, dtype):
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
