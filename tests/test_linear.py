"""psft_ext.linear_psft_loss / linear_token_logprobs: the fused linear loss (logits never formed).

Every result is checked two ways: against the unfused path in the same dtype,
``psft_loss(F.linear(hidden, weight, bias))`` (what a model with an ``nn.Linear`` LM head computes),
and against the float64 reference, ``reference.psft_loss`` on ``hidden @ weight.T + bias`` in
float64. For bfloat16 / float16 the float64 reference is given the dtype-rounded logits (with the
rounding's gradient taken as the identity), since rounding the logits is part of the computation
being tested, not an error of it. ``make_case`` draws the old log-probs from those logits, so
every ratio sits clearly below, inside or above the trust region.
"""

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import psft_ext
from psft_ext import reference
from psft_ext.linear import accumulate, chunks
from psft_ext.linear import ops as linear_ops

from conftest import (DTYPES, LOW_PRECISION, assert_close_scaled, dtype_id, generator, make_case,
                      raw_params, token_inputs)

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device"))])
def device(request):
    return request.param


# --------------------------------------------------------------------------------------------
# Inputs and the three ways of computing the loss
# --------------------------------------------------------------------------------------------


@dataclass
class LinearCase:
    hidden: torch.Tensor          # (..., H) in the tested dtype, on the device
    weight: torch.Tensor          # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    logits: torch.Tensor          # F.linear(hidden, weight, bias) in the tested dtype, on CPU
    targets: torch.Tensor
    old_logprobs: Optional[torch.Tensor]
    advantages: object
    kwargs: dict

    @property
    def dtype(self):
        return self.hidden.dtype


def make_linear_case(shape=(4, 6), vocab=37, hidden_size=16, dtype=torch.float32, device="cpu",
                     *, bias=True, seed=0, **case_kwargs):
    """Random hidden states, LM head and bias; targets, old log-probs and advantages from
    ``make_case`` on the logits they give (logits of standard deviation about 2.5)."""
    g = generator(seed + 1009)
    shape = tuple(shape)
    hidden = torch.randn(shape + (hidden_size,), generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) * (2.5 / math.sqrt(max(hidden_size, 1))))
    weight = weight.to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    # The logits as the device's unfused path rounds them (the float64 reference of bfloat16 /
    # float16 runs on these; CPU and cuBLAS round a few elements differently).
    logits = F.linear(hidden.to(device), weight.to(device),
                      None if b is None else b.to(device)).cpu()
    case = make_case(dtype=dtype, device=device, seed=seed, logits=logits, **case_kwargs)
    return LinearCase(hidden=hidden.to(device), weight=weight.to(device),
                      bias=None if b is None else b.to(device), logits=logits,
                      targets=case.targets, old_logprobs=case.old_logprobs,
                      advantages=case.advantages, kwargs=case.kwargs)


def _leaves(case, dtype=None, requires=(True, True, True)):
    def leaf(t, req):
        if t is None:
            return None
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        return t.requires_grad_(req)
    return (leaf(case.hidden, requires[0]), leaf(case.weight, requires[1]),
            leaf(case.bias, requires[2]))


def _backward(out, reduction, weights):
    if not out.requires_grad:
        return
    if reduction == "none":
        (out * weights.to(device=out.device, dtype=out.dtype)).sum().backward()
    else:
        out.backward()


def _result(out, metrics, leaves):
    return dict(loss=out.detach(), metrics=metrics,
                grads=tuple(None if t is None else t.grad for t in leaves))


def run_fused(case, *, chunk_size=None, reduction="mean", weights=None, num_items=None,
              requires=(True, True, True), return_metrics=True, **overrides):
    leaves = _leaves(case, requires=requires)
    kwargs = dict(case.kwargs, advantages=case.advantages, reduction=reduction,
                  num_items=num_items, return_metrics=return_metrics)
    kwargs.update(overrides)
    res = psft_ext.linear_psft_loss(leaves[0], leaves[1], case.targets, case.old_logprobs,
                                    bias=leaves[2], chunk_size=chunk_size, **kwargs)
    out, metrics = res if return_metrics else (res, None)
    _backward(out, reduction, weights)
    return _result(out, metrics, leaves)


def run_unfused(case, *, reduction="mean", weights=None, num_items=None, **overrides):
    leaves = _leaves(case)
    kwargs = dict(case.kwargs, advantages=case.advantages, reduction=reduction,
                  num_items=num_items, return_metrics=True)
    kwargs.update(overrides)
    out, metrics = psft_ext.psft_loss(F.linear(*leaves), case.targets, case.old_logprobs,
                                      **kwargs)
    _backward(out, reduction, weights)
    return _result(out, metrics, leaves)


def run_reference(case, *, reduction="mean", weights=None, num_items=None, **overrides):
    leaves = _leaves(case, dtype=torch.float64)
    leaves = tuple(None if t is None else t.cpu().detach().requires_grad_(True) for t in leaves)
    z = F.linear(*leaves)
    if case.dtype in LOW_PRECISION:
        # The dtype-rounded logits, with the rounding's gradient taken as the identity.
        z = z + (case.logits.to(torch.float64) - z).detach()
    kwargs = dict(case.kwargs, reduction=reduction, num_items=num_items, return_metrics=True)
    kwargs.update(overrides)
    adv = case.advantages.cpu() if isinstance(case.advantages, torch.Tensor) else case.advantages
    old = None if case.old_logprobs is None else case.old_logprobs.cpu()
    if isinstance(num_items, torch.Tensor):
        kwargs["num_items"] = num_items.cpu()
    out, metrics = reference.psft_loss(z, case.targets.cpu(), old, advantages=adv, **kwargs)
    _backward(out, reduction, weights)
    return _result(out, metrics, leaves)


# Tolerances (relative, and absolute as a share of the largest expected value).
def _tol(dtype):
    if dtype == torch.float32:
        return dict(loss=(1e-5, 1e-5), grad=(1e-4, 1e-5), metric=(2e-5, 2e-5))
    # bfloat16 / float16: the logits' gradient is rounded to the dtype before the matmuls, and
    # the products are rounded again (seen: 5e-3 of the largest gradient in bfloat16, 5e-4 in
    # float16); the unfused path also sums grad_weight in the dtype.
    # The loss and metrics allow for a logit of the fused path's chunk rounded one step apart
    # from the unfused path's (a different matmul kernel for a different row count).
    grad = 1e-2 if dtype == torch.bfloat16 else 2e-3
    return dict(loss=(1e-3, 1e-3), grad=(grad, grad), metric=(1e-3, 1e-3))


def check_close(got, exp, case, against):
    tol = _tol(case.dtype)
    rtol, atol = tol["loss"]
    assert got["loss"].dtype == torch.float32
    assert got["loss"].shape == exp["loss"].shape
    e_loss = exp["loss"].to(torch.float64).cpu()
    scale = e_loss.abs().max().item() if e_loss.numel() else 0.0
    torch.testing.assert_close(got["loss"].to(torch.float64).cpu(), e_loss, rtol=rtol,
                               atol=atol * max(scale, 1.0) + 1e-7,
                               msg=lambda m: f"loss vs {against}: {m}")
    inputs = (case.hidden, case.weight, case.bias)
    for name, g, e, x in zip(("hidden", "weight", "bias"), got["grads"], exp["grads"], inputs):
        if x is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == x.dtype and g.shape == x.shape and g.device == x.device, name
        assert torch.isfinite(g).all(), name
        rtol, atol = tol["grad"]
        assert_close_scaled(g.cpu(), e.cpu(), rtol=rtol, atol_scale=atol, floor=1e-7,
                            msg=f"grad {name} vs {against}")
    if got["metrics"] is not None:
        for name in psft_ext.PSFTMetrics._fields:
            a, e = getattr(got["metrics"], name), getattr(exp["metrics"], name)
            assert a.dtype == torch.float32 and a.dim() == 0 and not a.requires_grad, name
            rtol, atol = tol["metric"]
            torch.testing.assert_close(a.double().cpu(), e.double().cpu(), rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name} vs {against}: {m}")


def check_both(case, **kw):
    fused_kw = {k: v for k, v in kw.items() if k in ("chunk_size",)}
    common = {k: v for k, v in kw.items() if k not in ("chunk_size",)}
    got = run_fused(case, **fused_kw, **common)
    check_close(got, run_unfused(case, **common), case, "unfused")
    check_close(got, run_reference(case, **common), case, "float64 reference")
    return got


# --------------------------------------------------------------------------------------------
# dtypes x bias x chunk sizes, reductions, advantages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [5, 8, None], ids=["chunk5", "chunk8", "auto"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_unfused_and_reference(device, dtype, bias, chunk_size):
    # N = 24 tokens: chunks of 5 leave a partial last chunk, chunks of 8 divide N.
    case = make_linear_case((4, 6), 37, 16, dtype, device, bias=bias, advantages="token",
                            seed=3)
    got = check_both(case, chunk_size=chunk_size)
    # Clipping on both sides: upper for A > 0 and lower for A < 0 (make_case's bands).
    assert 0 < got["metrics"].clip_fraction.item() < 1


@pytest.mark.parametrize("reduction", ["sum", "none", "mean_float", "mean_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_reductions(device, dtype, reduction):
    case = make_linear_case((3, 7), 29, 12, dtype, device, advantages="token", seed=5)
    weights = None
    num_items = None
    if reduction == "none":
        weights = torch.randn(case.targets.shape, generator=generator(9))
    elif reduction == "mean_float":
        num_items = 50.0
    elif reduction == "mean_tensor":
        num_items = torch.tensor(64, device=device)
    red = "mean" if reduction.startswith("mean") else reduction
    got = check_both(case, chunk_size=4, reduction=red, weights=weights, num_items=num_items)
    if red == "none":
        assert got["loss"].shape == case.targets.shape


@pytest.mark.parametrize("num_items", [None, 500000])
def test_float16_gradients_survive_until_the_loss_scale(device, num_items):
    """float16 compute under a GradScaler (loss scaled by 2^16 after the forward): the chunk
    gradients are formed with that scale in them, so the gradients match the float64 reference
    rounded to float16 (formed in the forward for 1 / num_items, 67 % of grad_weight's non-zero
    elements used to flush to zero at num_items = 500000)."""
    g = generator(302)
    n, hidden_size, vocab = 48, 16, 700
    h = torch.randn(n, hidden_size, generator=g).half().to(device)
    w = (torch.randn(vocab, hidden_size, generator=g) * 0.7).half().to(device)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    targets[::7] = -100
    old = (psft_ext.linear_token_logprobs(h, w, targets)
           + 0.3 * (torch.rand(n, generator=g).to(device) - 0.5))
    scale = 65536.0
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    loss = psft_ext.linear_psft_loss(*leaves, targets, old, num_items=num_items, chunk_size=16)
    (loss * scale).backward()
    ref = [h.double().requires_grad_(True), w.double().requires_grad_(True)]
    ref_loss = reference.psft_loss(F.linear(*ref), targets, old.double(), num_items=num_items)
    (ref_loss * scale).backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=2e-3, atol=1e-9)
    for got, want in zip(leaves, ref):
        best = want.grad.half().double()
        nonzero = best != 0
        assert int(((got.grad.double() == 0) & nonzero).sum()) == 0
        torch.testing.assert_close(got.grad.double(), best, rtol=2e-2,
                                   atol=2e-2 * float(best.abs().max()))


def test_num_items_tensor_of_one_element_any_shape(device):
    """A one-element num_items of shape (1,) or (1, 1) (as a count gathered across ranks may
    come back) acts as the 0-d one; several values are an error naming num_items."""
    case = make_linear_case((3, 5), 19, 8, torch.float32, device, seed=13)
    results = []
    for shape in ((), (1,), (1, 1)):
        got = run_fused(case, chunk_size=4, num_items=torch.full(shape, 9.0, device=device))
        assert got["loss"].shape == ()
        results.append(got)
    for got in results[1:]:
        torch.testing.assert_close(got["loss"], results[0]["loss"], rtol=0, atol=0)
        torch.testing.assert_close(got["grads"], results[0]["grads"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_items must hold one value"):
        run_fused(case, chunk_size=4, num_items=torch.ones(2, device=device))


@pytest.mark.parametrize("adv_kind", ["scalar", "negative_scalar", "zero_d", "row", "negative"])
def test_advantages_dual_clip_temperature(device, adv_kind):
    case = make_linear_case((4, 5), 31, 8, torch.float32, device, advantages=adv_kind,
                            dual_clip=3.0, temperature=0.7, seed=11)
    check_both(case, chunk_size=3)


def test_without_old_logprobs_is_sft(device):
    case = make_linear_case((2, 9), 23, 8, torch.float32, device, with_old=False,
                            advantages=1.0, seed=12)
    got = check_both(case, chunk_size=4)
    leaves = _leaves(case)
    F.cross_entropy(F.linear(*leaves).flatten(0, -2), case.targets.flatten()).backward()
    # PSFT with ratio 1 and A = 1: the loss is -1 per token, the gradient cross-entropy's.
    assert got["loss"].item() == pytest.approx(-1.0)
    for g, e in zip(got["grads"], leaves):
        assert_close_scaled(g.cpu(), e.grad.cpu(), rtol=1e-5, atol_scale=1e-5)


def test_three_d_hidden_and_int32_targets(device):
    case = make_linear_case((2, 3, 4), 19, 8, torch.float32, device, target_dtype=torch.int32,
                            seed=13)
    got = check_both(case, chunk_size=5, reduction="none",
                     weights=torch.randn(2, 3, 4, generator=generator(2)))
    assert got["loss"].shape == (2, 3, 4)


def test_non_contiguous_inputs(device):
    case = make_linear_case((5, 4), 21, 12, torch.float32, device, seed=14)
    # hidden as a transposed view, weight as the transpose of an (H, V) tensor.
    h = case.hidden.transpose(0, 1).contiguous().transpose(0, 1)
    w = case.weight.t().contiguous().t()
    assert not h.is_contiguous() and not w.is_contiguous()
    out = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=case.bias,
                                    chunk_size=3, **case.kwargs)
    exp = psft_ext.psft_loss(F.linear(case.hidden, case.weight, case.bias), case.targets,
                             case.old_logprobs, **case.kwargs)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Chunking: sizes, skipped chunks, empty inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 24, 100], ids=["1", "3", "N", "above_N"])
def test_chunk_sizes(device, chunk_size):
    case = make_linear_case((4, 6), 37, 16, torch.float32, device, seed=15)
    got = check_both(case, chunk_size=chunk_size)
    whole = run_fused(case, chunk_size=24)
    torch.testing.assert_close(got["loss"], whole["loss"], rtol=1e-6, atol=1e-7)


def _count_matmul_chunks(monkeypatch):
    calls = []
    original = linear_ops.chunk_logits

    def counting(h, weight, bias):
        calls.append(h.shape[0])
        return original(h, weight, bias)

    monkeypatch.setattr(linear_ops, "chunk_logits", counting)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored_chunks_are_skipped(device, monkeypatch, reduction):
    case = make_linear_case((24,), 37, 16, torch.float32, device, ignore_frac=0.0, seed=16)
    case.targets[:10] = -100  # chunks [0, 5) and [5, 10) hold no loss
    case.targets[13] = -100
    if case.old_logprobs is not None:
        case.old_logprobs[:10] = 0.0
    calls = _count_matmul_chunks(monkeypatch)
    weights = torch.randn(24, generator=generator(3)) if reduction == "none" else None
    got = check_both(case, chunk_size=5, reduction=reduction, weights=weights)
    # check_both runs the fused loss first: 3 chunks forward (+ 3 recomputed for "none").
    assert calls == [5, 5, 4] * (2 if reduction == "none" else 1)
    assert torch.isfinite(got["loss"]).all()
    gh = got["grads"][0]
    assert (gh[:10] == 0).all() and (gh[13] == 0).all() and (gh[10:13] != 0).any()


def test_all_ignored_batch(device, monkeypatch):
    case = make_linear_case((3, 4), 17, 8, torch.float32, device, ignore_frac=1.0, seed=17)
    calls = _count_matmul_chunks(monkeypatch)
    got = run_fused(case, chunk_size=5)
    assert calls == []
    assert got["loss"].item() == 0.0
    assert got["metrics"].num_tokens.item() == 0
    for name in psft_ext.PSFTMetrics._fields:
        assert torch.isfinite(getattr(got["metrics"], name))
    for g in got["grads"]:
        assert g is not None and (g == 0).all()
    check_close(got, run_unfused(case), case, "unfused")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_hidden_state_reaches_every_gradient(device, dtype, reduction):
    """A NaN in one token's hidden state makes that token's loss NaN; its gradient row of hidden
    and the LM head's gradient (which every token's row feeds) hold NaN, never a finite value
    that would let the step go ahead; the other tokens' hidden gradients stay finite."""
    case = make_linear_case((6,), 13, 8, dtype, device, ignore_frac=0.0, seed=34)
    h, w, b = _leaves(case)
    with torch.no_grad():
        h[2, 3] = float("nan")
    loss = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=b,
                                     chunk_size=4, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    assert torch.isnan(h.grad[2]).all()
    assert torch.isfinite(h.grad[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(w.grad).any() and torch.isnan(b.grad).any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hidden_size_zero(reduction):
    """H = 0 (logits all 0) failed in a reshape; it gives psft_loss(hidden @ weight.T)'s value
    and gradients (hidden's is empty, weight's 0)."""
    h = torch.randn(3, 0, requires_grad=True)
    w = torch.randn(5, 0, requires_grad=True)
    t = torch.tensor([1, -100, 4])
    out = psft_ext.linear_psft_loss(h, w, t, reduction=reduction)
    exp = psft_ext.psft_loss(h @ w.t(), t, reduction=reduction)
    torch.testing.assert_close(out, exp)
    out.sum().backward()
    assert h.grad.shape == (3, 0) and torch.count_nonzero(w.grad) == 0
    assert psft_ext.linear_token_logprobs(h, w, t).shape == (3,)


def test_chunk_size_beyond_the_rows_allocates_by_the_rows():
    """chunk_size larger than N (4e9 on 6 rows grew the peak by 7.6 GB; 2**62 failed to
    allocate) takes one chunk of the N rows."""
    case = make_linear_case((6,), 13, 8, torch.float32, "cpu", seed=35)
    expected = run_fused(case, chunk_size=6)
    for chunk_size in (4_000_000_000, 2**62):
        got = run_fused(case, chunk_size=chunk_size)
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=0)
        for a, e in zip(got["grads"], expected["grads"]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    logp = psft_ext.linear_token_logprobs(case.hidden, case.weight, case.targets,
                                          chunk_size=2**62)
    torch.testing.assert_close(logp, psft_ext.linear_token_logprobs(
        case.hidden, case.weight, case.targets, chunk_size=6), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_tokens(device, reduction):
    hidden = torch.randn(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long, device=device)
    out, metrics = psft_ext.linear_psft_loss(hidden, weight, targets, reduction=reduction,
                                             return_metrics=True)
    assert out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert hidden.grad.shape == (0, 8) and (weight.grad == 0).all()
    assert metrics.num_tokens.item() == 0
    logp = psft_ext.linear_token_logprobs(hidden, weight, targets)
    assert logp.shape == (0,)


def test_auto_chunk_rows():
    cpu = torch.device("cpu")
    budget_rows = chunks.CPU_CHUNK_BYTES // (4 * 32000)
    rows = chunks.auto_chunk_rows(10**6, 32000, 1024, cpu)
    assert rows % 8 == 0 and budget_rows - 8 <= rows <= budget_rows + 8
    assert chunks.auto_chunk_rows(3, 32000, 1024, cpu) == 3
    assert chunks.auto_chunk_rows(0, 32000, 1024, cpu) == 1
    assert chunks.auto_chunk_rows(100, 10**9, 1024, cpu) == 1  # a row bigger than the budget
    # Equal chunks: 1.1 budgets of rows make two chunks of 0.55, not a full one and a remainder.
    n = budget_rows * 11 // 10
    assert chunks.auto_chunk_rows(n, 32000, 1024, cpu) == -(-n // 16) * 8


def test_auto_chunk_rows_cuda_counts_the_allocator_cache(monkeypatch):
    """On CUDA the cap is 1/8 of the driver's free memory plus what torch's caching allocator
    holds unused (simulated here: the chunk choice is host code): in a training loop the cache
    holds most of the device, and chunks sized from free memory alone would shrink to a few rows.
    The cap never goes below 128 rows."""
    gib = 1 << 30
    memory = {"free": gib, "reserved": 40 * gib, "allocated": 10 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["allocated"])
    dev = torch.device("cuda")
    # 31 GiB available: the budget decides (bf16 weight: H / 2 rows), not 1 GiB free.
    assert chunks.auto_chunk_rows(16384, 151936, 4096, dev, True) == 2048
    budget = chunks.CUDA_CHUNK_BYTES // (4 * 151936)
    assert chunks.auto_chunk_rows(10**6, 151936, 4096, dev) == -(-budget // 128) * 128
    # Nothing cached, little free: 1/8 of it, but at least 128 rows.
    memory.update(free=2 * gib, reserved=0, allocated=0)
    cap = 2 * gib // chunks.CUDA_FREE_SHARE // (4 * 151936)
    rows = chunks.auto_chunk_rows(16384, 151936, 4096, dev, True)
    assert rows % 128 == 0 and cap <= rows < cap + 128
    memory.update(free=1 << 20)
    assert chunks.auto_chunk_rows(16384, 151936, 4096, dev, True) == 128


def test_larger_chunks_only_for_a_float32_accumulator(monkeypatch):
    """H / 2-row chunks pay for a float32 grad_weight accumulator's pass per chunk: with
    accumulate_float32=False (no accumulator, least memory) the chunks stay at the budget."""
    seen = []
    monkeypatch.setattr(chunks, "auto_chunk_rows", lambda *a: seen.append(a[-1]) or 4)
    h, w = torch.randn(6, 4, dtype=torch.bfloat16), torch.randn(9, 4, dtype=torch.bfloat16)
    for in_float32 in (True, False):
        chunks.chunk_rows(h, w, 0, torch.bfloat16, True, in_float32)
    chunks.chunk_rows(h, w, 0, torch.bfloat16, False, True)  # no grad_weight at all
    assert seen == [True, False, False]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_auto_chunk_rows_cuda():
    dev = torch.device("cuda")
    free = torch.cuda.mem_get_info(dev)[0]
    cap = free // chunks.CUDA_FREE_SHARE // (4 * 151936)
    rows = chunks.auto_chunk_rows(10**6, 151936, 4096, dev)
    assert rows % 128 == 0 and rows * 151936 * 4 <= chunks.CUDA_CHUNK_BYTES + 128 * 151936 * 4
    if cap >= 4096:
        # bfloat16 / float16 weights: H / 2 rows (free under the float32 accumulator's peak), and a
        # single chunk for N <= H.
        assert chunks.auto_chunk_rows(16384, 151936, 4096, dev, True) == 2048
        assert chunks.auto_chunk_rows(4096, 151936, 4096, dev, True) == 4096
        assert chunks.auto_chunk_rows(4096, 151936, 4096, dev, False) < 4096


# --------------------------------------------------------------------------------------------
# Which inputs get a gradient; tied weights; autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False),
                                      (False, False, True), (False, True, True),
                                      (False, False, False)],
                         ids=["hidden", "weight", "bias", "weight_bias", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_requires_grad_subsets(device, monkeypatch, requires, reduction):
    case = make_linear_case((3, 5), 19, 8, torch.float32, device, seed=18)
    adds = []
    original = accumulate.GradAccumulator.add
    monkeypatch.setattr(accumulate.GradAccumulator, "add",
                        lambda self, *a: (adds.append(1), original(self, *a))[1])
    weights = torch.randn(3, 5, generator=generator(4)) if reduction == "none" else None
    got = run_fused(case, chunk_size=4, requires=requires, reduction=reduction, weights=weights)
    exp = run_reference(case, reduction=reduction, weights=weights)
    for req, g, e in zip(requires, got["grads"], exp["grads"]):
        if req:
            assert_close_scaled(g.cpu(), e, rtol=1e-4, atol_scale=1e-5)
        else:
            assert g is None
    assert (len(adds) > 0) == any(requires)


def test_no_grad_skips_the_gradient(device, monkeypatch):
    case = make_linear_case((3, 5), 19, 8, torch.float32, device, seed=19)
    adds = []
    monkeypatch.setattr(accumulate.GradAccumulator, "add", lambda self, *a: adds.append(1))
    h, w, b = _leaves(case)
    with torch.no_grad():
        out = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=b)
    assert not out.requires_grad and adds == []
    exp = psft_ext.psft_loss(F.linear(h, w, b), case.targets, case.old_logprobs)
    torch.testing.assert_close(out, exp.detach(), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        out = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=b)
    assert adds == []
    torch.testing.assert_close(out, exp.detach(), rtol=1e-5, atol=1e-6)


def test_tied_embedding_weight(device):
    """The LM head shares its weight with the input embeddings: autograd adds both gradients."""
    torch.manual_seed(0)
    vocab, hidden_size = 23, 8
    emb = torch.nn.Embedding(vocab, hidden_size).to(device)
    proj = torch.nn.Linear(hidden_size, hidden_size).to(device)
    ids = torch.randint(0, vocab, (3, 6), device=device)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    grads = []
    for fused in (True, False):
        emb.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        hidden = torch.tanh(proj(emb(ids)))
        if fused:
            loss = psft_ext.linear_psft_loss(hidden, emb.weight, targets, chunk_size=4)
        else:
            loss = psft_ext.psft_loss(F.linear(hidden, emb.weight), targets)
        loss.backward()
        grads.append((loss.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()))
    (l_f, ge_f, gp_f), (l_u, ge_u, gp_u) = grads
    torch.testing.assert_close(l_f, l_u, rtol=1e-5, atol=1e-6)
    assert_close_scaled(ge_f, ge_u, rtol=1e-4, atol_scale=1e-5)
    assert_close_scaled(gp_f, gp_u, rtol=1e-4, atol_scale=1e-5)
    # Rows of tokens that appear only as inputs get the embedding's gradient alone: both
    # contributions are there.
    assert (ge_f != 0).any()


def _autocast_dtypes():
    out = [("cpu", torch.bfloat16)]
    if HAS_CUDA:
        out += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return out


@pytest.mark.parametrize("device_type,autocast_dtype", _autocast_dtypes(),
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast(device_type, autocast_dtype, reduction):
    """float32 inputs under autocast: the logits and matmuls in the autocast dtype, as
    F.linear would; the gradients in float32."""
    case = make_linear_case((4, 6), 37, 16, torch.float32, device_type, seed=20)
    weights = torch.randn(4, 6, generator=generator(5)) if reduction == "none" else None
    results = []
    for fused in (True, False):
        h, w, b = _leaves(case)
        with torch.autocast(device_type, dtype=autocast_dtype):
            if fused:
                out = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=b,
                                                chunk_size=5, reduction=reduction, **case.kwargs)
            else:
                logits = F.linear(h, w, b)
                assert logits.dtype == autocast_dtype
                out = psft_ext.psft_loss(logits, case.targets, case.old_logprobs,
                                         reduction=reduction, **case.kwargs)
        _backward(out, reduction, weights)
        results.append((out.detach(), h.grad, w.grad, b.grad))
    for got, exp in zip(*results):
        assert got.dtype == exp.dtype
        # Unfused autocast sums grad_weight in the low dtype; here it is summed in float32.
        assert_close_scaled(got.cpu(), exp.cpu(), rtol=2e-2, atol_scale=2e-2)


# --------------------------------------------------------------------------------------------
# torch.compile and the op registrations
# --------------------------------------------------------------------------------------------


def _train_step(hidden, weight, bias, targets, old):
    loss, metrics = psft_ext.linear_psft_loss(hidden, weight, targets, old, bias=bias,
                                              chunk_size=4, dual_clip=3.0, temperature=0.9,
                                              return_metrics=True)
    per_token = psft_ext.linear_psft_loss(hidden, weight, targets, old, bias=bias,
                                          chunk_size=5, reduction="none")
    total = loss * 2.0 + 0.5 * per_token.sum() + 0.1 * (hidden ** 2).mean() + 0.0 * metrics.entropy
    return total, metrics


def test_compile_fullgraph_aot_eager(device):
    torch._dynamo.reset()
    case = make_linear_case((3, 5), 17, 8, torch.float32, device, advantages="token", seed=21)
    compiled = torch.compile(_train_step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_train_step, compiled):
        leaves = _leaves(case)
        total, metrics = fn(leaves[0], leaves[1], leaves[2], case.targets, case.old_logprobs)
        total.backward()
        results.append((total.detach(), [t.grad for t in leaves], metrics))
    (t_e, g_e, m_e), (t_c, g_c, m_c) = results
    torch.testing.assert_close(t_c, t_e, rtol=1e-6, atol=1e-6)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for name in psft_ext.PSFTMetrics._fields:
        torch.testing.assert_close(getattr(m_c, name), getattr(m_e, name), rtol=1e-6, atol=1e-6)


def test_compile_inductor(device):
    """The default backend once (about 6 s of compilation on a 2-core CPU): it must handle the
    in-place scaling of the saved gradients (a mutating op) in the backward."""
    torch._dynamo.reset()
    case = make_linear_case((3, 5), 17, 8, torch.float32, device, advantages="token", seed=25)

    def fn(hidden, weight, bias, targets, old):
        return psft_ext.linear_psft_loss(hidden, weight, targets, old, bias=bias,
                                         chunk_size=4) * 3.0

    compiled = torch.compile(fn, fullgraph=True)
    grads = []
    for f in (fn, compiled):
        leaves = _leaves(case)
        f(*leaves, case.targets, case.old_logprobs).backward()
        grads.append([t.grad for t in leaves])
    for a, e in zip(*grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_backward_twice_is_an_error(device):
    """The backward scales the saved gradients in place: a second backward through the same
    graph must fail rather than return twice-scaled gradients."""
    case = make_linear_case((3, 5), 17, 8, torch.float32, device, seed=26)
    h, w, b = _leaves(case)
    loss = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=b)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same graph"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_an_error(device, reduction):
    case_for_double = make_linear_case((3, 5), 17, 8, torch.float32, device, seed=27)
    h, w, b = _leaves(case_for_double)
    loss = psft_ext.linear_psft_loss(h, w, case_for_double.targets, case_for_double.old_logprobs,
                                     bias=b, reduction=reduction)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss.sum(), (h, w), create_graph=True)


def test_compile_token_logprobs(device):
    torch._dynamo.reset()
    case = make_linear_case((3, 5), 17, 8, torch.float32, device, with_old=False, seed=22)

    def fn(hidden, weight, bias, targets):
        logp, entropy = psft_ext.linear_token_logprobs(hidden, weight, targets, bias=bias,
                                                       with_entropy=True, chunk_size=4)
        return logp.sum() + entropy.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = (case.hidden, case.weight, case.bias, case.targets)
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_scales_the_saved_gradients(device, dtype):
    """The reduced loss's backward scales the gradients computed in the forward in place, by
    the upstream gradient: those of (s * loss) are s times those of loss, bit for bit (one
    product rounded to the dtype, as torch's multiplication rounds), for the 2-D grad_hidden and
    grad_weight and the 1-D grad_bias; an upstream gradient of exactly 1 leaves them as they
    were."""
    case = make_linear_case((3, 5), 17, 8, dtype, device, seed=30)
    grads = {}
    for scale in (1.0, -0.75, 0.0):
        leaves = _leaves(case)
        loss = psft_ext.linear_psft_loss(leaves[0], leaves[1], case.targets, case.old_logprobs,
                                         bias=leaves[2], chunk_size=4)
        (loss * scale if scale != 1.0 else loss).backward()
        grads[scale] = [t.grad for t in leaves]
    for scale in (-0.75, 0.0):
        for got, one in zip(grads[scale], grads[1.0]):
            if dtype == torch.float16:  # the per-token path: rounded after the scaling
                assert_close_scaled(got.float(), (one.float() * scale).double(), rtol=1e-2,
                                    atol_scale=1e-2)
            else:
                torch.testing.assert_close(got, one * scale, rtol=0, atol=0)


def test_opcheck(device):
    case = make_linear_case((13,), 11, 8, torch.float32, device, advantages="token", seed=23)
    h, w, b = _leaves(case)
    t = case.targets
    inputs = token_inputs(case.old_logprobs, case.advantages)
    den = torch.tensor(7.0, device=device)
    ops = torch.ops.psft_ext
    mean, none = (raw_params(dual_clip=3.0, reduction=r) for r in ("mean", "none"))
    # With inputs that require a gradient the single pass's backward scales in place gradients
    # saved in the forward; opcheck's AOT test returns every output of the op, which AOT
    # autograd's partitioner cannot split (test_loss_reduced.py's opcheck says more). Compiled
    # callers are covered by the torch.compile tests instead.
    no_aot = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in [(h, w, b, t, inputs, mean, -100, 0, den, 0.0, True, False, 4, torch.float32,
                  True, False, False, False),
                 (h, w, None, t, token_inputs(),
                  raw_params(-1.0, temperature=0.9, reduction="sum"), -100, 0, None, 0.0, True,
                  False, 0, torch.float32, True, False, False, False)]:
        torch.library.opcheck(ops.linear_fwd, args, test_utils=no_aot)
    detached = (h.detach(), w.detach(), b.detach())
    stats = ops.linear_fwd(*detached, t, inputs, none, -100, 0, None, 0.0, False, False, 4,
                           torch.float32, True, False, False, False)[4]
    scale = torch.randn(13, device=device)
    calls = [
        (ops.linear_fwd, (*detached, t, inputs, mean, -100, 0, den, 0.0, True, False, 4,
                          torch.float32, True, True, True, True)),
        (ops.linear_fwd, (h, w, b, t, inputs, none, -100, 0, None, 0.0, True, True, 4,
                          torch.float32, True, False, False, False)),
        (ops.linear_bwd, (scale, None, *detached, t, stats, none, -100, 4, torch.float32, True,
                          True, True, True)),
        (ops.linear_bwd, (scale, torch.randn(13, device=device), *detached, t, stats, none,
                          -100, 4, torch.float32, True, True, True, True)),
        (ops.linear_fwd, (*detached, t, token_inputs(), raw_params(reduction="none"), -100, 0,
                          None, 0.0, False, True, 4, torch.float32, True, False, False, False)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


def test_opcheck_column_major_hidden(device):
    """A column-major hidden (a transposed view): the real op's grad_hidden has the contiguous
    layout its fake kernel promises (inductor asserts the strides of what it traced)."""
    case = make_linear_case((13,), 11, 8, torch.float32, device, seed=24)
    h, w, b = _leaves(case)
    h_cm = h.detach().t().contiguous().t()
    assert h_cm.stride() == (1, 13)
    args = (h_cm, w.detach(), b.detach(), case.targets, token_inputs(case.old_logprobs),
            raw_params(), -100, 0, None, 0.0, True, False, 4, torch.float32, True, True, True,
            True)
    torch.library.opcheck(torch.ops.psft_ext.linear_fwd, args,
                          test_utils=("test_schema", "test_faketensor"))
    grad_hidden = torch.ops.psft_ext.linear_fwd(*args)[5]
    assert grad_hidden.is_contiguous()


def test_opcheck_without_metrics_or_logprobs(device):
    case = make_linear_case((13,), 11, 8, torch.float32, device, seed=25)
    h, w, b = (t.detach() for t in _leaves(case))
    for reduction in ("mean", "none"):
        args = (h, w, b, case.targets, token_inputs(case.old_logprobs),
                raw_params(reduction=reduction), -100, 0, None, 0.0, False, False, 4,
                torch.float32, True, False, False, False)
        torch.library.opcheck(torch.ops.psft_ext.linear_fwd, args)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_linear_token_logprobs(device, dtype, bias):
    case = make_linear_case((4, 6), 37, 16, dtype, device, bias=bias, with_old=False, seed=24)
    case.targets[0, :5] = -100  # one skipped chunk of 5
    h, w, b = _leaves(case)
    logp, entropy = psft_ext.linear_token_logprobs(h, w, case.targets, bias=b, chunk_size=5,
                                                   temperature=0.8, with_entropy=True)
    assert logp.requires_grad and entropy.requires_grad and logp.shape == case.targets.shape
    exp_logp, exp_entropy = psft_ext.token_logprobs(F.linear(h, w, b), case.targets,
                                                    temperature=0.8, with_entropy=True)
    torch.testing.assert_close(logp, exp_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy, exp_entropy, rtol=1e-4, atol=1e-4)
    ref_logits = case.logits.to(torch.float64)
    if dtype == torch.float32:
        ref_logits = F.linear(*(None if t is None else t.detach().cpu().double()
                                for t in (case.hidden, case.weight, case.bias)))
    ref_logp, ref_entropy = reference.token_logprobs(ref_logits, case.targets.cpu(),
                                                     temperature=0.8, with_entropy=True)
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=1e-4, atol=1e-4)
    assert (logp[0, :5] == 0).all() and (entropy[0, :5] == 0).all()
    only = psft_ext.linear_token_logprobs(h, w, case.targets, bias=b, temperature=0.8,
                                          chunk_size=5)
    torch.testing.assert_close(only, logp, rtol=0, atol=0)
    with torch.no_grad():
        frozen = psft_ext.linear_token_logprobs(h, w, case.targets, bias=b, temperature=0.8,
                                                chunk_size=5, with_entropy=True)
    assert not any(t.requires_grad for t in frozen)
    for got, want in zip(frozen, (logp, entropy)):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)

    # Differentiable: the gradient of a weighted sum of both, against autograd through the
    # float64 reference (given the dtype-rounded logits, as run_reference does).
    g = generator(26)
    w_logp, w_entropy = (torch.randn(case.targets.shape, generator=g, dtype=torch.float64)
                         for _ in range(2))
    (logp * w_logp.to(device, torch.float32)
     + entropy * w_entropy.to(device, torch.float32)).sum().backward()
    ref_leaves = tuple(None if t is None else t.detach().cpu().double().requires_grad_(True)
                       for t in (h, w, b))
    z = F.linear(*ref_leaves)
    if dtype in LOW_PRECISION:
        z = z + (case.logits.to(torch.float64) - z).detach()
    ref_logp, ref_entropy = reference.token_logprobs(z, case.targets.cpu(), temperature=0.8,
                                                     with_entropy=True)
    (ref_logp * w_logp + ref_entropy * w_entropy).sum().backward()
    rtol, atol = _tol(dtype)["grad"]
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), (h, w, b), ref_leaves):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert_close_scaled(leaf.grad.cpu(), ref_leaf.grad, rtol=rtol, atol_scale=atol,
                            floor=1e-7, msg=f"grad {name}")


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def test_argument_errors():
    h = torch.randn(4, 8)
    w = torch.randn(11, 8)
    t = torch.randint(0, 11, (4,))
    loss = psft_ext.linear_psft_loss
    with pytest.raises(ValueError, match="does not match hidden's last dimension"):
        loss(h, torch.randn(11, 7), t)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        loss(h, torch.randn(11), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        loss(h, w, t, bias=torch.randn(10))
    with pytest.raises(ValueError, match="leading shape of hidden"):
        loss(h, w, t[:3])
    with pytest.raises(TypeError, match="outside autocast they must match"):
        loss(h, w.double().float().to(torch.bfloat16), t)
    with pytest.raises(TypeError, match="hidden must be float32"):
        loss(h.double(), w.double(), t)
    with pytest.raises(TypeError, match="targets must be int64"):
        loss(h, w, t.float())
    with pytest.raises(TypeError, match="must be a tensor"):
        loss(h.tolist(), w, t)
    with pytest.raises(ValueError, match="hidden dimension"):
        loss(torch.tensor(1.0), w, t)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            loss(h, w, t, chunk_size=bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="temperature must be"):
        loss(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="num_items must be"):
        loss(h, w, t, num_items=float("inf"))
    with pytest.raises(ValueError, match="old_logprobs must have the targets' shape"):
        loss(h, w, t, torch.zeros(3))
    with pytest.raises(ValueError, match="empty vocabulary"):
        loss(h, torch.randn(0, 8), t)
    with pytest.raises(ValueError, match="target id"):
        loss(h, w, torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match="is on meta but hidden is on cpu"):
        loss(h, w, t, bias=torch.randn(11, device="meta"))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        psft_ext.linear_token_logprobs(h, w, t, chunk_size=0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        psft_ext.linear_token_logprobs(h, w, t, ignore_index=1.5)


@pytest.mark.parametrize("chunk_size", [2, 3, None])
def test_bad_target_reported_at_its_flat_position(chunk_size):
    """The position in the message is the token's in the whole call (it was the position inside
    its chunk, "position 1" for flat position 5), and no internal op is named."""
    h, w = torch.randn(8, 4), torch.randn(11, 4)
    t = torch.tensor([0, 1, 2, 3, 4, 11, 5, -100])
    for fn in (psft_ext.linear_psft_loss, psft_ext.linear_token_logprobs):
        with pytest.raises(ValueError, match=r"^fused linear loss: target id 11 at position 5 "):
            fn(h, w, t, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=r"target id 11 at position 4 "):
        psft_ext.linear_psft_loss(h.view(2, 4, 4), w, t.view(2, 4).roll(-1, 1),
                                  chunk_size=chunk_size)



# --------------------------------------------------------------------------------------------
# grad_weight's accumulation across chunks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_accumulate_in_the_weight_dtype(device, dtype, reduction):
    """accumulate_float32=False (one rounding per chunk): still within the tolerances of the
    unfused path and the float64 reference, and close to the float32 accumulation."""
    case = make_linear_case((4, 6), 37, 16, dtype, device, bias=True, advantages="token",
                            seed=31)
    weights = None if reduction == "mean" else torch.rand(4, 6, generator=generator(2)).to(device)
    got = run_fused(case, chunk_size=5, reduction=reduction, weights=weights,
                    accumulate_float32=False)
    check_close(got, run_unfused(case, reduction=reduction, weights=weights), case, "unfused")
    check_close(got, run_reference(case, reduction=reduction, weights=weights), case,
                "float64 reference")
    f32 = run_fused(case, chunk_size=5, reduction=reduction, weights=weights)
    assert_close_scaled(got["grads"][1].float().cpu(), f32["grads"][1].float().cpu(), rtol=1e-2,
                        atol_scale=1e-2, floor=1e-7, msg="grad weight vs float32 accumulation")


def test_accumulation_option_is_moot_for_float32(device):
    case = make_linear_case((3, 5), 29, 8, torch.float32, device, seed=32)
    a = run_fused(case, chunk_size=4, accumulate_float32=False)
    b = run_fused(case, chunk_size=4)
    for x, y in zip(a["grads"], b["grads"]):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [1, 2, 3, 64, 129, 1001])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_narrow_halves(device, dtype, vocab):
    """The float32 halves narrowed into the first half's memory equal a plain cast, bitwise,
    and the result lives in that memory."""
    hidden_size = 7
    full = torch.randn(vocab, hidden_size, generator=generator(vocab)).to(device)
    top_rows = -(-vocab // 2)
    top, bottom = full[:top_rows].clone(), full[top_rows:].clone()
    storage = top.untyped_storage().data_ptr()
    out = accumulate.narrow_halves(top, bottom, dtype)
    assert out.dtype == dtype and out.shape == (vocab, hidden_size) and out.is_contiguous()
    assert out.untyped_storage().data_ptr() == storage
    torch.testing.assert_close(out, full.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_chunk_of_logits_alive_at_a_time(device, monkeypatch, reduction):
    """Each chunk's logits (whose memory then holds their gradient) are gone before the next
    chunk's are formed: the peak is one chunk, forward and backward."""
    case = make_linear_case((4, 6), 37, 16, torch.float32, device, seed=33)
    alive = []
    real = linear_ops.chunk_logits

    def chunk_logits(*args):
        import weakref
        assert all(ref() is None for ref in alive), "a previous chunk's logits are still alive"
        out = real(*args)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(linear_ops, "chunk_logits", chunk_logits)
    weights = None if reduction == "mean" else torch.rand(4, 6, generator=generator(5)).to(device)
    run_fused(case, chunk_size=5, reduction=reduction, weights=weights)
    assert len(alive) >= 5 * (2 if reduction == "none" else 1)
