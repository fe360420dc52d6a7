"""psft_ext.token_logprobs (fused log-probs of the targets, optionally the entropy)."""

import pytest
import torch

import psft_ext
from psft_ext import reference

from conftest import DTYPES, assert_close_scaled, dtype_id, generator, make_case


def _check_against_reference(case, temperature, with_entropy):
    """The values, and the logits' gradient of a random weighting of them, against the float64
    reference (autograd through it)."""
    x = case.fused_logits()
    kw = dict(ignore_index=case.ignore_index, temperature=temperature)
    got = psft_ext.token_logprobs(x, case.targets, with_entropy=with_entropy, **kw)
    x64 = case.reference_logits()
    exp = reference.token_logprobs(x64, case.targets, with_entropy=with_entropy, **kw)
    got = got if with_entropy else (got,)
    exp = exp if with_entropy else (exp,)
    assert len(got) == len(exp)
    for name, a, e in zip(("logprobs", "entropy"), got, exp):
        assert a.dtype == torch.float32 and a.shape == case.targets.shape, name
        assert a.requires_grad, name
        assert_close_scaled(a, e.detach(), rtol=1e-5, atol_scale=1e-5, floor=1e-6, msg=name)
        # ignored -> exactly 0
        assert torch.count_nonzero(a[~case.valid]) == 0, name
    g = generator(36)
    weights = [torch.randn(case.targets.shape, generator=g, dtype=torch.float64).to(x.device)
               for _ in got]
    sum(a * w.float() for a, w in zip(got, weights)).sum().backward()
    sum(e * w for e, w in zip(exp, weights)).sum().backward()
    assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[~case.valid]) == 0
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2  # the gradient is rounded to the dtype
    assert_close_scaled(x.grad, x64.grad, rtol=tol, atol_scale=tol, floor=1e-9, msg="grad")
    return tuple(a.detach() for a in got)


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp_entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(device, dtype, temperature, with_entropy):
    case = make_case((4, 6), 53, dtype, device, temperature=temperature, with_old=False,
                     ignore_frac=0.25, seed=30)
    assert bool((~case.valid).any()) and bool(case.valid.any())
    _check_against_reference(case, temperature, with_entropy)


@pytest.mark.parametrize("vocab", [1, 3, 17, 2049])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_vocab_sizes_and_ignore_index(device, vocab, ignore_index):
    case = make_case((3, 5), vocab, torch.float32, device, ignore_index=ignore_index,
                     with_old=False, seed=31 + vocab)
    logp, entropy = _check_against_reference(case, 1.0, True)
    if vocab == 1:
        assert torch.count_nonzero(logp) == 0 and torch.count_nonzero(entropy) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_large_vocab(device, dtype):
    case = make_case((3,), 151936, dtype, device, with_old=False, ignore_frac=0.0, seed=32)
    _check_against_reference(case, 1.0, True)


def test_all_ignored_and_empty(device):
    case = make_case((2, 3), 11, torch.float32, device, with_old=False, ignore_frac=1.0)
    logp, entropy = psft_ext.token_logprobs(case.logits, case.targets, with_entropy=True)
    assert torch.count_nonzero(logp) == 0 and torch.count_nonzero(entropy) == 0
    for shape in [(0,), (2, 0)]:
        x = torch.randn(shape + (5,), device=device, requires_grad=True)
        t = torch.zeros(shape, dtype=torch.long, device=device)
        logp, entropy = psft_ext.token_logprobs(x, t, with_entropy=True)
        assert logp.shape == shape and entropy.shape == shape


@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])
def test_differentiable_unless_no_grad(device, outputs):
    """With logits that require a gradient (in grad mode) the log-probs and the entropies are
    differentiable: the gradient of either or both is autograd's through the float64 reference.
    Under no_grad (the old policy) nothing is recorded, and the values are the same."""
    case = make_case((3, 4), 9, torch.float32, device, with_old=False, seed=37)
    assert case.logits.requires_grad and bool((~case.valid).any())
    x, x64 = case.fused_logits(), case.reference_logits()
    logp, entropy = psft_ext.token_logprobs(x, case.targets, with_entropy=True, temperature=0.7)
    assert logp.requires_grad and entropy.requires_grad
    ref_logp, ref_entropy = reference.token_logprobs(x64, case.targets, with_entropy=True,
                                                     temperature=0.7)
    g = generator(38)
    w_logp, w_entropy = (torch.randn(case.targets.shape, generator=g).to(device)
                         for _ in range(2))
    use_logp, use_entropy = outputs in ("logp", "both"), outputs in ("entropy", "both")
    fused = (logp * w_logp if use_logp else 0) + (entropy * w_entropy if use_entropy else 0)
    ref = ((ref_logp * w_logp.double() if use_logp else 0)
           + (ref_entropy * w_entropy.double() if use_entropy else 0))
    fused.sum().backward()
    ref.sum().backward()
    assert torch.count_nonzero(x.grad[~case.valid]) == 0
    assert_close_scaled(x.grad, x64.grad, rtol=1e-5, atol_scale=1e-5, floor=1e-9, msg="grad")

    with torch.no_grad():
        frozen = psft_ext.token_logprobs(case.logits, case.targets, with_entropy=True,
                                         temperature=0.7)
    for got, want in zip(frozen, (logp, entropy)):
        assert not got.requires_grad and got.grad_fn is None
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    detached = psft_ext.token_logprobs(case.logits.detach(), case.targets, temperature=0.7)
    assert not detached.requires_grad and detached.grad_fn is None


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_non_contiguous_and_int32(device, target_dtype):
    g = generator(33)
    big = (torch.randn(16, 40, generator=g) * 3).to(device)
    logits = big[::2, 3:32]  # strided rows, offset columns
    targets_big = torch.randint(0, 29, (8, 2), generator=g).to(device=device, dtype=target_dtype)
    targets = targets_big[:, 1]
    assert not logits.is_contiguous() and not targets.is_contiguous()
    logp, entropy = psft_ext.token_logprobs(logits, targets, with_entropy=True)
    exp_logp, exp_entropy = reference.token_logprobs(logits.double(), targets, with_entropy=True)
    assert_close_scaled(logp, exp_logp, rtol=1e-5, atol_scale=1e-5)
    assert_close_scaled(entropy, exp_entropy, rtol=1e-5, atol_scale=1e-5)
    # transposed buffer
    logp_t = psft_ext.token_logprobs(logits.contiguous().t().contiguous().t(), targets)
    torch.testing.assert_close(logp_t, logp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_same_logprobs_as_the_loss(device, dtype):
    """Old log-probs from token_logprobs on the same logits: ratio 1, PSFT == SFT (the first
    mini-batch of each PSFT batch)."""
    case = make_case((4, 6), 61, dtype, device, with_old=False, seed=34)
    old = psft_ext.token_logprobs(case.logits, case.targets)
    x = case.fused_logits()
    loss, metrics = psft_ext.psft_loss(x, case.targets, old, return_metrics=True)
    loss.backward()
    x_sft = case.fused_logits()
    loss_sft, metrics_sft = psft_ext.psft_loss(x_sft, case.targets, return_metrics=True)
    loss_sft.backward()
    torch.testing.assert_close(metrics.nll, -old[case.valid].mean(), rtol=1e-6, atol=1e-6)
    assert metrics.clip_fraction.item() == 0.0
    if device == "cpu":
        # On CPU both ops share one row kernel: the log-probs, hence ratio and gradient, are
        # bitwise equal.
        assert metrics.ratio_mean.item() == 1.0 and metrics.approx_kl.item() == 0.0
        assert torch.equal(loss, loss_sft)
        assert torch.equal(x.grad, x_sft.grad)
    else:
        torch.testing.assert_close(metrics.ratio_mean.item(), 1.0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, x_sft.grad)


def test_reference_with_masked_vocabulary_and_wide_ignore_index():
    """The reference itself: its entropy is finite with -inf logits (0 * -inf was NaN), and int32
    targets compared with an ignore_index outside int32 do not wrap (2**32 matched id 0)."""
    x = torch.randn(3, 7, dtype=torch.float64)
    x[:, 2] = float("-inf")
    t = torch.tensor([0, 1, 3], dtype=torch.int32)
    logp, entropy = reference.token_logprobs(x, t, with_entropy=True)
    assert torch.isfinite(entropy).all() and torch.isfinite(logp).all()
    expected = torch.special.entr(torch.softmax(x, -1)).sum(-1)
    torch.testing.assert_close(entropy, expected)
    logp_wide = reference.token_logprobs(x, t, ignore_index=2**32)
    assert (logp_wide != 0).all(), "id 0 was taken for ignored"
    loss = reference.psft_loss(x, t, ignore_index=2**32, reduction="none")
    assert (loss != 0).all()
    fused = psft_ext.token_logprobs(x.float(), t, ignore_index=2**32, with_entropy=True)
    torch.testing.assert_close(fused[0].double(), logp_wide, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1].double(), entropy, rtol=1e-5, atol=1e-6)
