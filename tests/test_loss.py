"""psft_ext.psft_loss against the float64 reference: loss, metrics and the logits' gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import psft_ext
from psft_ext import reference

from conftest import (
    DTYPES,
    LOW_PRECISION,
    assert_close_scaled,
    check_all,
    check_grad,
    check_loss,
    dtype_id,
    fused_and_reference,
    generator,
    make_case,
    raw_params,
    token_inputs,
)
from psft_ext._ops import TOKEN_STATS

ADVANTAGE_KINDS = ["scalar", "negative_scalar", "zero_d", "token", "row", "negative"]


# --------------------------------------------------------------------------------------------
# The test inputs themselves: every branch of the clipped surrogate is exercised.
# --------------------------------------------------------------------------------------------


def test_make_case_exercises_every_branch():
    case = make_case((4, 6), 37, advantages="token", dual_clip=3.0, ignore_frac=0.0, seed=3)
    logp = reference.token_logprobs(case.logits.detach().double(), case.targets)
    ratio = torch.exp(logp - case.old_logprobs.double())
    adv = case.advantages.double()
    assert bool(((adv > 0) & (ratio > 1.28)).any()), "upper clip (A > 0) never active"
    assert bool(((adv < 0) & (ratio < 0.8)).any()), "lower clip (A < 0) never active"
    assert bool(((ratio > 0.8) & (ratio < 1.28)).any()), "no ratio inside the trust region"
    assert bool(((adv < 0) & (ratio > 3.0)).any()), "dual clip never active"
    assert bool(((adv > 0) & (ratio < 0.8)).any()), "no unclipped token below the region"


# --------------------------------------------------------------------------------------------
# dtypes x advantages x dual clip
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["no_dual", "dual3"])
@pytest.mark.parametrize("adv_kind", ADVANTAGE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(device, dtype, adv_kind, dual_clip):
    case = make_case((4, 6), 37, dtype, device, advantages=adv_kind, dual_clip=dual_clip, seed=1)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)
    if adv_kind in ("token", "row"):
        assert fused["metrics"].clip_fraction.item() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dual_clip_active_caps_the_loss_and_zeroes_the_gradient(device, dtype):
    # All advantages negative and ratios far above the dual clip: every valid token is capped.
    shape, vocab = (3, 5), 23
    case = make_case(shape, vocab, dtype, device, advantages="negative", dual_clip=3.0,
                     ignore_frac=0.0, with_old=False, seed=2)
    logp = reference.token_logprobs(case.logits.detach().double().cpu(), case.targets.cpu())
    old = (logp - math.log(4.0)).float().to(device)  # ratio 4 > 3
    res = psft_ext.psft_loss(case.fused_logits(), case.targets, old, advantages=case.advantages,
                             dual_clip=3.0, reduction="none", return_metrics=True)
    loss, metrics = res
    torch.testing.assert_close(loss, (-case.advantages * 3.0).float())
    assert metrics.clip_fraction.item() == 1.0
    x = case.fused_logits()
    psft_ext.psft_loss(x, case.targets, old, advantages=case.advantages, dual_clip=3.0).backward()
    assert torch.count_nonzero(x.grad) == 0
    # Without the dual clip the same tokens get the unclipped loss -A * r and a gradient.
    case.old_logprobs = old
    case.kwargs["dual_clip"] = None
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)
    assert torch.count_nonzero(fused["grad"]) > 0


@pytest.mark.parametrize("clip_low,clip_high", [(0.1, 0.1), (0.5, 1.0), (0.2, 0.28)])
def test_other_clip_ranges(device, clip_low, clip_high):
    case = make_case((5, 7), 19, torch.float32, device, advantages="token", clip_low=clip_low,
                     clip_high=clip_high, seed=4)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, torch.float32)


def test_zero_advantage_gives_zero_loss_and_gradient(device):
    case = make_case((3, 4), 11, torch.float32, device, advantages=0.0, seed=5)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, torch.float32)
    assert fused["loss"].item() == 0.0
    assert torch.count_nonzero(fused["grad"]) == 0


# --------------------------------------------------------------------------------------------
# temperature, ignore_index, sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_temperature(device, dtype, temperature):
    case = make_case((4, 5), 29, dtype, device, temperature=temperature, dual_clip=3.0, seed=6)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_ignore_index_mixed(device, ignore_index):
    case = make_case((4, 8), 13, torch.float32, device, ignore_index=ignore_index,
                     ignore_frac=0.4, seed=7)
    n_ignored = int((~case.valid).sum())
    assert 0 < n_ignored < case.targets.numel()
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, torch.float32)
    # Ignored rows get exactly no gradient and no loss, and are not counted.
    assert torch.count_nonzero(fused["grad"][~case.valid]) == 0
    assert fused["metrics"].num_tokens.item() == case.targets.numel() - n_ignored
    none = psft_ext.psft_loss(case.fused_logits(), case.targets, case.old_logprobs,
                              advantages=case.advantages, reduction="none", **case.kwargs)
    assert torch.count_nonzero(none[~case.valid]) == 0


def test_ignored_old_logprobs_are_not_read(device):
    # Padding positions often carry garbage (NaN, inf) old log-probs: they must not leak.
    case = make_case((3, 6), 17, torch.float32, device, ignore_frac=0.3, seed=8)
    assert bool((~case.valid).any())
    poisoned = case.old_logprobs.clone()
    poisoned[~case.valid] = float("nan")
    poisoned[~case.valid & (torch.arange(18, device=device).view(3, 6) % 2 == 0)] = float("inf")
    x = case.fused_logits()
    loss, metrics = psft_ext.psft_loss(x, case.targets, poisoned, advantages=case.advantages,
                                       return_metrics=True, **case.kwargs)
    loss.backward()
    fused, ref = fused_and_reference(case)  # the same call with finite values there
    assert torch.equal(loss.detach(), fused["loss"])
    assert torch.equal(x.grad, fused["grad"])
    for a, b in zip(metrics, fused["metrics"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_ignored(device, dtype, reduction):
    case = make_case((3, 4), 9, dtype, device, ignore_frac=1.0, seed=9)
    assert not bool(case.valid.any())
    weights = torch.rand(case.targets.shape, generator=generator(1)).to(device)
    fused, ref = fused_and_reference(case, reduction=reduction, weights=weights)
    assert torch.count_nonzero(fused["loss"]) == 0
    assert torch.isfinite(fused["loss"]).all()
    assert torch.count_nonzero(fused["grad"]) == 0
    for name, value in fused["metrics"]._asdict().items():
        assert torch.isfinite(value), name
    assert fused["metrics"].num_tokens.item() == 0
    check_all(fused, ref, dtype)


@pytest.mark.parametrize("shape", [(0,), (2, 0)], ids=["N0", "B2_T0"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty_targets(device, dtype, shape, reduction):
    x = torch.randn(shape + (7,), device=device).to(dtype).requires_grad_(True)
    targets = torch.empty(shape, dtype=torch.long, device=device)
    old = torch.empty(shape, device=device)
    loss, metrics = psft_ext.psft_loss(x, targets, old, reduction=reduction, return_metrics=True)
    assert loss.dtype == torch.float32
    if reduction == "none":
        assert loss.shape == shape
        loss.sum().backward()
    else:
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    for name, value in metrics._asdict().items():
        assert value.item() == 0.0, name
    # token_logprobs of nothing is nothing
    assert psft_ext.token_logprobs(x, targets).shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_old", [True, False])
def test_single_token(device, dtype, with_old):
    case = make_case((1,), 50, dtype, device, ignore_frac=0.0, advantages=-0.5,
                     with_old=with_old, seed=10)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)


@pytest.mark.parametrize("vocab", [1, 3, 7, 17, 1001, 2049])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_vocab_sizes(device, dtype, vocab):
    case = make_case((3, 5), vocab, dtype, device, dual_clip=3.0, seed=11 + vocab)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)
    if vocab == 1:
        # One class: logp = 0, the gradient (p - 1) is exactly zero.
        assert torch.count_nonzero(fused["grad"]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_large_vocab(device, dtype):
    case = make_case((4,), 151936, dtype, device, ignore_frac=0.0, dual_clip=3.0, seed=12)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)


@pytest.mark.parametrize("shape", [(24,), (4, 6), (2, 3, 4)], ids=["2d", "3d", "4d"])
def test_leading_dims(device, shape):
    case = make_case(shape, 31, torch.float32, device, seed=13)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, torch.float32)
    weights = torch.rand(shape, generator=generator(2)).to(device)
    fused, ref = fused_and_reference(case, reduction="none", weights=weights)
    assert fused["loss"].shape == shape
    check_all(fused, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int32_targets(device, dtype):
    case = make_case((4, 6), 41, dtype, device, target_dtype=torch.int32, seed=14)
    assert case.targets.dtype == torch.int32
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)
    # And it equals the int64 run exactly.
    x = case.fused_logits()
    loss64 = psft_ext.psft_loss(x, case.targets.long(), case.old_logprobs,
                                advantages=case.advantages, **case.kwargs)
    loss64.backward()
    assert torch.equal(loss64.detach(), fused["loss"])
    assert torch.equal(x.grad, fused["grad"])


@pytest.mark.parametrize("ignore_index", [2**32, -(2**32) + 1, 2**40 + 3])
def test_int32_targets_ignore_index_outside_int32(device, ignore_index):
    """Such an ignore_index equals no int32 id (it wraps to 0, 1 or 3 in int32): nothing is
    ignored, exactly as with int64 targets."""
    case = make_case((4, 6), 7, torch.float32, device, ignore_frac=0.0, seed=26)
    assert bool((case.targets == 0).any() and (case.targets == 1).any())
    results = []
    for target_dtype in (torch.int32, torch.int64):
        x = case.fused_logits()
        loss, metrics = psft_ext.psft_loss(
            x, case.targets.to(target_dtype), case.old_logprobs, advantages=case.advantages,
            ignore_index=ignore_index, return_metrics=True)
        loss.backward()
        logp = psft_ext.token_logprobs(x, case.targets.to(target_dtype), ignore_index=ignore_index)
        results.append((loss.detach(), x.grad, metrics, logp))
    (l32, g32, m32, p32), (l64, g64, m64, p64) = results
    assert m32.num_tokens.item() == case.targets.numel()
    assert torch.equal(l32, l64) and torch.equal(g32, g64) and torch.equal(p32, p64)
    for a, b in zip(m32, m64):
        assert torch.equal(a, b)
    assert torch.count_nonzero(p32) == case.targets.numel()


# --------------------------------------------------------------------------------------------
# reductions, num_items
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reductions(device, dtype, reduction):
    case = make_case((4, 6), 25, dtype, device, dual_clip=3.0, seed=15)
    weights = (torch.rand(case.targets.shape, generator=generator(3)) * 2 - 0.5).to(device)
    fused, ref = fused_and_reference(case, reduction=reduction, weights=weights)
    check_all(fused, ref, dtype)
    expected_shape = case.targets.shape if reduction == "none" else ()
    assert fused["loss"].shape == expected_shape
    assert fused["raw"].requires_grad


def test_reductions_agree(device):
    case = make_case((4, 6), 25, torch.float32, device, seed=16)
    args = (case.logits.detach(), case.targets, case.old_logprobs)
    kw = dict(advantages=case.advantages, **case.kwargs)
    none = psft_ext.psft_loss(*args, reduction="none", **kw)
    total = psft_ext.psft_loss(*args, reduction="sum", **kw)
    mean = psft_ext.psft_loss(*args, reduction="mean", **kw)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / case.valid.sum())


@pytest.mark.parametrize(
    "num_items", [7, 123.5, "tensor_int", "tensor_float"],
    ids=["int", "float", "tensor_int", "tensor_float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_num_items(device, dtype, num_items):
    case = make_case((4, 6), 21, dtype, device, seed=17)
    if num_items == "tensor_int":
        num_items = torch.tensor(55, device=device)
    elif num_items == "tensor_float":
        num_items = torch.tensor(40.0, device=device)
    fused, ref = fused_and_reference(case, num_items=num_items)
    check_all(fused, ref, dtype)
    # mean with num_items is the sum divided by it
    s = psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs,
                           advantages=case.advantages, reduction="sum", **case.kwargs)
    torch.testing.assert_close(fused["loss"], s / float(num_items))


@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("mean", 500000),
                                                 ("sum", None)])
def test_float16_gradient_survives_until_the_loss_scale(device, reduction, num_items):
    """float16 logits under a GradScaler: the loss is scaled by 2^16 after the forward, and the
    gradient must be rounded to float16 only with that scale in it, as autograd through the
    reference rounds it. (Written in the forward for the mean's 1 / num_items, most of it used
    to flush to zero: 38 % of the non-zero elements at num_items = 57, 99.5 % at 500000.)"""
    g = generator(301)
    n, vocab = 64, 3000
    x = (torch.randn(n, vocab, generator=g) * 3.0).half().to(device)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    targets[::9] = -100
    old = (psft_ext.token_logprobs(x, targets)
           + 0.3 * (torch.rand(n, generator=g).to(device) - 0.5))
    scale = 65536.0
    fused = x.clone().requires_grad_(True)
    loss = psft_ext.psft_loss(fused, targets, old, reduction=reduction, num_items=num_items)
    (loss * scale).backward()
    ref = x.double().requires_grad_(True)
    ref_loss = reference.psft_loss(ref, targets, old.double(), reduction=reduction,
                                   num_items=num_items)
    (ref_loss * scale).backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-9)
    best = ref.grad.half().double()  # the float64 gradient rounded once to float16
    got = fused.grad.double()
    assert int(((got == 0) & (best != 0)).sum()) == 0
    torch.testing.assert_close(got, best, rtol=2e-3, atol=1e-4 * float(best.abs().max()))


# --------------------------------------------------------------------------------------------
# layouts: non-contiguous logits, targets and old log-probs
# --------------------------------------------------------------------------------------------


def _layout(kind, logits, junk_gen):
    """(base, view) with view(base) equal to ``logits`` (values), in the given layout."""
    n, v = logits.shape[0], logits.shape[-1]
    dtype = logits.dtype

    def junk(*shape):
        return (torch.randn(shape, generator=junk_gen) * 3).to(dtype)

    if kind == "slice":  # big[:, :V]: rows strided by more than V
        return torch.cat([logits, junk(n, 13)], dim=1), (lambda b: b[:, :v])
    if kind == "strided_rows":  # every other row of a wider buffer
        base = junk(2 * n, v + 3)
        base[::2, :v] = logits
        return base, (lambda b: b[::2, :v])
    if kind == "transpose":  # a (V, N) buffer transposed: column stride N
        return logits.t().contiguous(), (lambda b: b.t())
    if kind == "strided_columns":  # column stride 2
        base = junk(n, 2 * v)
        base[:, ::2] = logits
        return base, (lambda b: b[:, ::2])
    if kind == "expand":  # one row broadcast to N rows (row stride 0)
        return logits[:1].clone(), (lambda b: b.expand(n, v))
    if kind == "transpose_3d":  # (T, B, V) buffer seen as (B, T, V)
        return logits.transpose(0, 1).contiguous(), (lambda b: b.transpose(0, 1))
    raise ValueError(kind)


def _strided_copy(t):
    """A non-contiguous tensor equal to ``t`` (every other element of a wider buffer)."""
    big = torch.zeros(t.shape + (2,), dtype=t.dtype, device=t.device)
    big[..., 0] = t
    out = big[..., 0]
    assert t.numel() <= 1 or not out.is_contiguous()
    return out


@pytest.mark.parametrize(
    "kind", ["slice", "strided_rows", "transpose", "strided_columns", "expand", "transpose_3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_non_contiguous_inputs(device, dtype, kind):
    g = generator(18)
    if kind == "expand":
        row = (torch.randn(1, 33, generator=g) * 2.5).to(dtype)
        logits = row.expand(8, 33).clone()
    elif kind == "transpose_3d":
        logits = (torch.randn(3, 4, 33, generator=g) * 2.5).to(dtype)
    else:
        logits = (torch.randn(8, 33, generator=g) * 2.5).to(dtype)
    case = make_case(logits=logits, dtype=dtype, device=device, dual_clip=3.0, seed=18)
    base, view = _layout(kind, case.logits.detach().cpu(), g)
    base = base.to(device)
    assert not view(base).is_contiguous()
    assert torch.equal(view(base), case.logits.detach())
    targets = _strided_copy(case.targets)
    old = _strided_copy(case.old_logprobs)
    adv = _strided_copy(case.advantages)
    fused, ref = fused_and_reference(case, base=base, view=view, targets=targets,
                                     old_logprobs=old, advantages=adv)
    check_all(fused, ref, dtype)
    # Same values as the contiguous call.
    contiguous, _ = fused_and_reference(case)
    torch.testing.assert_close(fused["loss"], contiguous["loss"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# special cases of the formula
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sft_equivalence_float32(device, ignore_index, temperature):
    """old_logprobs=None, advantages=1: the gradient is the cross-entropy gradient."""
    case = make_case((5, 6), 97, torch.float32, device, ignore_index=ignore_index,
                     temperature=temperature, with_old=False, advantages=1.0, seed=19)
    x = case.fused_logits()
    loss, metrics = psft_ext.psft_loss(x, case.targets, ignore_index=ignore_index,
                                       temperature=temperature, return_metrics=True)
    loss.backward()
    xc = case.fused_logits()
    ce = F.cross_entropy(xc.float().view(-1, 97) / temperature, case.targets.view(-1),
                         ignore_index=ignore_index, reduction="mean")
    ce.backward()
    # The surrogate's value is -A * r = -1 per token; its gradient is the SFT one.
    assert loss.item() == -1.0
    torch.testing.assert_close(x.grad, xc.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics.nll, ce.detach(), rtol=1e-6, atol=1e-6)
    assert metrics.clip_fraction.item() == 0.0
    assert metrics.ratio_mean.item() == 1.0
    assert metrics.approx_kl.item() == 0.0


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_sft_equivalence_low_precision(device, dtype):
    case = make_case((4, 6), 97, dtype, device, with_old=False, advantages=1.0, seed=20)
    x = case.fused_logits()
    psft_ext.psft_loss(x, case.targets).backward()
    xc = case.fused_logits()
    F.cross_entropy(xc.float().view(-1, 97), case.targets.view(-1)).backward()
    assert x.grad.dtype == dtype
    # One rounding of the float32 gradient to the dtype.
    assert_close_scaled(x.grad, xc.grad.to(torch.float64), rtol=1e-2, atol_scale=1e-2,
                        floor=1e-6)


@pytest.mark.parametrize("adv", [1.0, -1.0])
@pytest.mark.parametrize("dual_clip", [None, 3.0], ids=["no_dual", "dual3"])
def test_log_ratio_clamp(device, adv, dual_clip):
    """|logp - old| > 20: ratio exp(+-20) and no gradient for those tokens (verl's clamp)."""
    n, vocab = 6, 19
    case = make_case((n,), vocab, torch.float32, device, with_old=False, ignore_frac=0.0,
                     advantages=adv, dual_clip=dual_clip, seed=21)
    logp = reference.token_logprobs(case.logits.detach().double(), case.targets)
    shift = torch.tensor([25.0, -25.0, 40.0, -30.0, 0.1, -0.1], dtype=torch.float64,
                         device=device)  # logp - old
    case.old_logprobs = (logp - shift).float()
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, torch.float32)
    far = shift.abs() > 20
    assert torch.count_nonzero(fused["grad"][far]) == 0
    assert torch.count_nonzero(ref["grad"][far]) == 0
    assert torch.count_nonzero(fused["grad"][~far]) > 0
    ratio_ref = torch.exp(torch.clamp(logp - case.old_logprobs.double(), -20, 20))
    torch.testing.assert_close(ratio_ref[far], torch.exp(torch.sign(shift[far]) * 20.0))
    stats = torch.ops.psft_ext.psft_fwd(
        case.logits.detach(), case.targets, token_inputs(case.old_logprobs),
        raw_params(adv, dual_clip=0.0 if dual_clip is None else dual_clip, reduction="none"),
        -100, 0, None, 0.0, False, False, None)[4]
    ratio, log_ratio = stats[TOKEN_STATS["ratio"]], stats[TOKEN_STATS["log_ratio"]]
    torch.testing.assert_close(ratio.double(), ratio_ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(log_ratio[far].double(), torch.sign(shift[far]) * 20.0)


@pytest.mark.parametrize(
    "dtype,scale,temperature",
    [(torch.float32, 100.0, 1.0), (torch.bfloat16, 1000.0, 1.0), (torch.float16, 200.0, 1.0),
     (torch.float32, 2.5, 0.05), (torch.bfloat16, 2.5, 0.05), (torch.float32, 2.5, 20.0),
     (torch.float32, 0.0, 1.0)],
    ids=["f32_x100", "bf16_x1000", "f16_x200", "f32_t0.05", "bf16_t0.05", "f32_t20", "uniform"])
def test_extreme_logit_scales(device, dtype, scale, temperature):
    """Peaked (large logits, small temperature) and flat (large temperature, all equal)
    distributions: the online softmax must stay exact-ish and finite."""
    case = make_case((4, 6), 37, dtype, device, scale=scale, temperature=temperature,
                     dual_clip=3.0, seed=27)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, dtype)


def test_infinite_old_logprobs_are_clamped(device):
    """old = +-inf: the log-ratio clamps to -+20 (verl), finite loss, no gradient there."""
    case = make_case((4,), 9, torch.float32, device, with_old=False, ignore_frac=0.0,
                     advantages=torch.tensor([1.0, 1.0, -1.0, -1.0]), seed=28)
    inf = float("inf")
    case.old_logprobs = torch.tensor([inf, -inf, inf, -inf], device=device)
    fused, ref = fused_and_reference(case)
    check_all(fused, ref, torch.float32)
    assert torch.count_nonzero(fused["grad"]) == 0
    stats = torch.ops.psft_ext.psft_fwd(case.logits.detach(), case.targets,
                                        token_inputs(case.old_logprobs),
                                        raw_params(reduction="none"), -100, 0, None, 0.0, False,
                                        False, None)[4]
    assert stats[TOKEN_STATS["log_ratio"]].tolist() == [-20.0, 20.0, -20.0, 20.0]


def test_nan_logits_give_a_nan_loss(device):
    """A NaN logit must not be hidden: the loss and that token's metrics are NaN."""
    x = torch.randn(3, 5, device=device)
    x[1, 2] = float("nan")
    targets = torch.tensor([0, 1, 2], device=device)
    loss_none = psft_ext.psft_loss(x, targets, reduction="none")
    assert torch.isnan(loss_none[1]) and torch.isfinite(loss_none[[0, 2]]).all()
    loss, metrics = psft_ext.psft_loss(x, targets, return_metrics=True)
    assert torch.isnan(loss) and torch.isnan(metrics.nll) and torch.isnan(metrics.entropy)
    logp, entropy = psft_ext.token_logprobs(x, targets, with_entropy=True)
    assert torch.isnan(logp[1]) and torch.isnan(entropy[1])
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(entropy[[0, 2]]).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "minus_inf"])
@pytest.mark.parametrize("where", ["target", "other"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_finite_logits_reach_the_gradient(device, dtype, reduction, where, value):
    """A token whose loss is NaN has a NaN gradient row (GradScaler's inf check and
    clip_grad_norm_(error_if_nonfinite=True) look for it there), and a finite loss a finite one.
    A NaN or +inf logit makes its row's loss NaN; a -inf logit elsewhere than the target is a
    masked entry (everything finite, as the reference); a -inf target logit has log-prob -inf:
    against old log-probs the log-ratio clamp gives a finite loss and no gradient, as the
    reference, and without them (ratio -inf - -inf) the loss is NaN, and so is the gradient
    (the reference's is 0 there). Single-pass and two-pass paths (float16, "none") alike."""
    for with_old in (True, False):
        case = make_case((4,), 11, dtype, device, ignore_frac=0.0, with_old=with_old,
                         advantages=1.0, seed=29)
        x = case.logits.detach().clone()
        target = int(case.targets[1])
        col = target if where == "target" else (target + 1) % 11
        x[1, col] = value
        leaf = x.clone().requires_grad_(True)
        loss = psft_ext.psft_loss(leaf, case.targets, case.old_logprobs, reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
        per_token = psft_ext.psft_loss(x, case.targets, case.old_logprobs, reduction="none")
        assert torch.isfinite(per_token[[0, 2, 3]]).all()
        assert torch.isfinite(leaf.grad[[0, 2, 3]]).all()
        if torch.isnan(per_token[1]):
            assert torch.isnan(leaf.grad[1]).all(), "a NaN loss must have a NaN gradient"
        else:
            assert torch.isfinite(leaf.grad[1]).all()
        expect_nan = value != -float("inf") or (where == "target" and not with_old)
        assert bool(torch.isnan(per_token[1])) == expect_nan
        if not expect_nan:
            ref_leaf = x.double().requires_grad_(True)
            ref = reference.psft_loss(ref_leaf, case.targets, case.old_logprobs,
                                      reduction=reduction)
            (ref.sum() if reduction == "none" else ref).backward()
            torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-2, atol=1e-3)


def test_nan_old_logprobs_reach_the_gradient(device):
    """A NaN old log-prob (a broken rollout) makes its token's loss and gradient NaN."""
    case = make_case((4,), 11, torch.float32, device, ignore_frac=0.0, advantages=1.0, seed=30)
    old = case.old_logprobs.clone()
    old[2] = float("nan")
    leaf = case.fused_logits()
    psft_ext.psft_loss(leaf, case.targets, old).backward()
    assert torch.isnan(leaf.grad[2]).all() and torch.isfinite(leaf.grad[[0, 1, 3]]).all()


def test_masked_vocabulary_entries(device):
    """-inf logits (a masked vocabulary) are fine: they get probability 0 and zero gradient."""
    case = make_case((4, 5), 23, torch.float32, device, dual_clip=3.0, seed=22)
    logits = case.logits.detach().clone()
    mask = torch.rand(logits.shape, generator=generator(4)).to(device) < 0.3
    safe_targets = torch.where(case.valid, case.targets, 0)
    mask.scatter_(-1, safe_targets.unsqueeze(-1), False)  # never mask a target
    logits[mask] = float("-inf")
    case = make_case(logits=logits.cpu(), targets=case.targets, device=device, dual_clip=3.0,
                     seed=22)
    fused, ref = fused_and_reference(case, return_metrics=False)
    check_loss(fused, ref, torch.float32)
    check_grad(fused, ref, torch.float32)
    assert torch.count_nonzero(fused["grad"][mask.to(fused["grad"].device)]) == 0
    _, metrics = psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs,
                                    advantages=case.advantages, return_metrics=True,
                                    **case.kwargs)
    p = torch.softmax(case.logits.detach().double(), -1)
    entropy = torch.special.entr(p).sum(-1)[case.valid].mean()
    torch.testing.assert_close(metrics.entropy.double(), entropy, rtol=2e-5, atol=2e-5)
    assert all(torch.isfinite(v) for v in metrics)


def test_old_logprobs_and_advantages_get_no_gradient(device):
    case = make_case((3, 4), 15, torch.float32, device, seed=23)
    old = case.old_logprobs.clone().requires_grad_(True)
    adv = case.advantages.clone().requires_grad_(True)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, old, advantages=adv, **case.kwargs)
    loss.backward()
    assert x.grad is not None
    assert old.grad is None and adv.grad is None


def test_no_grad_and_non_leaf(device):
    case = make_case((3, 4), 15, torch.float32, device, seed=24)
    with torch.no_grad():
        loss = psft_ext.psft_loss(case.logits, case.targets, case.old_logprobs,
                                  advantages=case.advantages, **case.kwargs)
    assert not loss.requires_grad
    plain = psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs,
                               advantages=case.advantages, **case.kwargs)
    assert not plain.requires_grad
    assert torch.equal(loss, plain)
    # Gradient through an upstream op (logits = h @ W) reaches the leaves.
    h = torch.randn(12, 8, generator=generator(5)).to(device).requires_grad_(True)
    w = torch.randn(15, 8, generator=generator(6)).to(device).requires_grad_(True)
    targets = case.targets.view(-1)
    psft_ext.psft_loss(h @ w.t(), targets).backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    reference.psft_loss(h64 @ w64.t(), targets).backward()
    assert_close_scaled(h.grad, h64.grad, rtol=1e-5, atol_scale=1e-5)
    assert_close_scaled(w.grad, w64.grad, rtol=1e-5, atol_scale=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_deterministic(dtype):
    case = make_case((8, 16), 3001, dtype, "cpu", dual_clip=3.0, seed=25)
    threads = torch.get_num_threads()
    results = []
    try:
        # Twice with the default threads, then single-threaded: rows are independent, so the
        # split of rows over threads must not change a bit.
        for num_threads in (threads, threads, 1):
            torch.set_num_threads(num_threads)
            x = case.fused_logits()
            loss, metrics = psft_ext.psft_loss(x, case.targets, case.old_logprobs,
                                               advantages=case.advantages, return_metrics=True,
                                               **case.kwargs)
            loss.backward()
            results.append((loss.detach(), x.grad, metrics))
    finally:
        torch.set_num_threads(threads)
    l1, g1, m1 = results[0]
    for l2, g2, m2 in results[1:]:
        assert torch.equal(l1, l2)
        assert torch.equal(g1, g2)
        for a, b in zip(m1, m2):
            assert torch.equal(a, b)
