"""The CUDA kernels against a float64 reference: every launch shape, dtype, row layout and edge case.

The kernels pick one of three launch shapes from the row length (a warp per row up to 4 KB, a
128-thread block up to 32 KB, a 512-thread block above). The forward reads short rows element-wise
(lane-strided) and longer ones as a scalar head, 16-byte vectors and a scalar tail that depend on
where the row starts; the backward writes vectors aligned to the dense gradient row and reads the
logits with vector or element loads depending on whether the input row sits at the same offset
from a 16-byte boundary. The shapes and layouts below reach all of those paths. The reference is
closed-form float64 on the CPU, on the same dtype-rounded logits.
"""

import re

import pytest
import torch

import psft_ext

from conftest import (DTYPES, assert_close_scaled, bwd_scale, dtype_id, generator, make_case,
                      raw_params, token_inputs)
from psft_ext._ops import TOKEN_STATS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.psft_ext

FORWARD_NAMES = tuple(TOKEN_STATS)

VOCABS = [1, 3, 7, 8, 9, 127, 1000, 4099, 32000, 151936]
ROW_COUNTS = [1, 5, 300, 4096]
# Rows up to this size get a warp each, and the forward reads them element-wise.
SHORT_ROW_BYTES = 4096
# Keeps the float64 CPU reference (several passes over N x V doubles) within the file's budget.
MAX_REFERENCE_ELEMENTS = 10_000_000


def _shapes():
    shapes = [(n, v) for v in VOCABS for n in ROW_COUNTS if n * v <= MAX_REFERENCE_ELEMENTS]
    return shapes + [(64, 151936)]


# --------------------------------------------------------------------------------------------
# Reference and op wrappers
# --------------------------------------------------------------------------------------------


def reference_rows(logits, targets, old_logprobs=None, advantages=1.0, *, clip_low=0.2,
                   clip_high=0.28, dual_clip=None, ignore_index=-100, temperature=1.0):
    """Float64 per-token outputs of psft_fwd (FORWARD_NAMES), plus the softmax ``p`` and its
    log, without the options (ent_coef is 0)."""
    x = logits.detach().cpu().double() / temperature
    t = targets.cpu().long()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(x, dim=-1)
    logp_all = x - lse[:, None]
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    logp = logp_all.gather(1, safe[:, None]).squeeze(1)
    old = logp if old_logprobs is None else old_logprobs.detach().cpu().double()
    if isinstance(advantages, torch.Tensor):
        adv = advantages.detach().cpu().double().expand(logp.shape)
    else:
        adv = torch.full_like(logp, float(advantages))
    d = logp - old
    inside = (d >= -20) & (d <= 20)
    log_ratio = d.clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clip_active = clipped_loss > unclipped
    loss = torch.where(clip_active, clipped_loss, unclipped)
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
    coef = torch.where(~clip_active & ~dual_active & inside, adv * ratio, torch.zeros_like(ratio))
    # The target attains the row's maximum of x = z * (1 / tau), as the kernels round it.
    x32 = logits.detach().cpu().float() * torch.tensor(1.0 / temperature, dtype=torch.float32)
    row_max = x32.max(-1).values
    correct = x32.gather(1, safe[:, None]).squeeze(1) >= row_max
    out = dict(loss=loss, logp=logp, entropy=entropy, ratio=ratio, log_ratio=log_ratio,
               clipped=(clip_active | dual_active).double(), lse=lse, coef=coef,
               correct=correct.double(), max=row_max.double(),
               ent_coef=torch.zeros_like(coef))
    assert tuple(out) == FORWARD_NAMES
    out = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}
    out["p"] = p
    out["logp_all"] = logp_all
    out["valid"] = valid
    out["safe_targets"] = safe
    return out


def reference_grad(ref, grad_loss, temperature=1.0, ent_scale=None):
    """d(sum_t grad_loss[t] * loss[t]) / d logits in float64 (coef is 0 on ignored rows), plus
    with ``ent_scale`` psft_bwd's entropy term ent_scale * p * (log p + H) / tau on the
    non-ignored rows."""
    scale = grad_loss.detach().cpu().double() * ref["coef"] / temperature
    grad = ref["p"] * scale[:, None]
    grad.scatter_add_(1, ref["safe_targets"][:, None], -scale[:, None])
    if ent_scale is not None:
        ent = torch.where(ref["valid"], ent_scale.detach().cpu().double(), 0.0) / temperature
        p, logp_all = ref["p"], ref["logp_all"]
        term = torch.where(p > 0, p * (logp_all + ref["entropy"][:, None]), 0.0)
        grad = grad + ent[:, None] * term
    return grad


def forward(logits, targets, old=None, advantages=1.0, *, clip_low=0.2, clip_high=0.28,
            dual_clip=None, ignore_index=-100, temperature=1.0):
    """psft_fwd's per-token stats (len(FORWARD_NAMES), N) for reduction "none"."""
    if isinstance(advantages, torch.Tensor):
        adv_tensor, adv_scalar = advantages.float().contiguous(), 1.0
    else:
        adv_tensor, adv_scalar = None, float(advantages)
    params = raw_params(adv_scalar, clip_low=clip_low, clip_high=clip_high,
                        dual_clip=0.0 if dual_clip is None else dual_clip,
                        temperature=temperature, reduction="none")
    return ops.psft_fwd(logits, targets, token_inputs(old, adv_tensor), params, ignore_index, 0,
                        None, 0.0, False, False, None)[4]


def backward(grad_loss, logits, targets, stats, ignore_index=-100, temperature=1.0,
             ent_scale=None):
    """psft_bwd from ``forward``'s stats into a new gradient, for the upstream gradient
    ``grad_loss`` of each token's loss (and the entropy term's ``ent_scale``, if given)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    ops.psft_bwd(bwd_scale(stats, grad_loss), ent_scale, logits, targets, stats,
                 raw_params(temperature=temperature), ignore_index, grad)
    return grad


def backward_into_poisoned_memory(grad_loss, logits, targets, stats, ignore_index=-100,
                                  temperature=1.0, ent_scale=None):
    """psft_bwd after a same-size block of NaNs went back to the caching allocator: the
    gradient most likely reuses that block, so any element the kernel fails to write stays NaN."""
    poison = torch.full(logits.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    del poison
    return backward(grad_loss, logits, targets, stats, ignore_index, temperature, ent_scale)


def grad_loss_for(n, seed=0, device="cuda"):
    """Upstream gradient in [0.5, 1.5), zero on every 7th token (those rows must be zeros)."""
    g = torch.rand(n, generator=generator(seed + 101)) + 0.5
    g[::7] = 0.0
    return g.to(device)


def check_forward(outputs, ref, *, rtol=2e-5, atol=2e-5):
    valid = ref["valid"]
    for name, got in zip(FORWARD_NAMES, outputs):
        assert got.dtype == torch.float32 and got.shape == valid.shape, name
        got = got.detach().cpu().double()
        assert torch.all(got[~valid] == 0), f"{name}: ignored rows must be exactly 0"
        if name == "clipped":
            assert torch.equal(got, ref[name]), name
        else:
            torch.testing.assert_close(got, ref[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")


def check_grad(grad, expected, dtype, zero_rows=None):
    assert grad.dtype == dtype and grad.is_contiguous() and grad.shape == expected.shape
    assert bool(torch.isfinite(grad).all()), "gradient has unwritten (NaN) or non-finite elements"
    if zero_rows is not None and bool(zero_rows.any()):
        assert torch.count_nonzero(grad[zero_rows.to(grad.device)]) == 0
    if dtype == torch.float32:
        assert_close_scaled(grad.cpu(), expected, rtol=1e-5, atol_scale=1e-5, floor=1e-9,
                            msg="grad")
    else:
        assert_close_scaled(grad.cpu(), expected, rtol=1e-2, atol_scale=1e-2, floor=1e-6,
                            msg="grad")


def case_kwargs(case):
    return dict(case.kwargs)


def run_and_check(logits, case, *, grad_seed=0):
    """Forward, token_logprobs and backward of ``logits`` (values equal to case.logits), all
    checked against the float64 reference of the case."""
    kw = case_kwargs(case)
    ref = reference_rows(case.logits, case.targets, case.old_logprobs, case.advantages, **kw)
    out = forward(logits, case.targets, case.old_logprobs, case.advantages, **kw)
    check_forward(out, ref)

    logp, entropy = psft_ext.token_logprobs(logits, case.targets, ignore_index=kw["ignore_index"],
                                            temperature=kw["temperature"], with_entropy=True)
    torch.testing.assert_close(logp.cpu().double(), ref["logp"], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(entropy.cpu().double(), ref["entropy"], rtol=2e-5, atol=2e-5)

    n = logits.shape[0]
    grad_loss = grad_loss_for(n, grad_seed)
    grad = backward_into_poisoned_memory(grad_loss, logits, case.targets, out,
                                         kw["ignore_index"], kw["temperature"])
    zero_rows = (~ref["valid"]) | (ref["coef"] == 0) | (grad_loss.cpu() == 0)
    check_grad(grad, reference_grad(ref, grad_loss, kw["temperature"]), logits.dtype, zero_rows)

    # With the entropy's term (its own kernels): zero on ignored rows and rows where neither
    # term has a coefficient (ent_scale in [-0.5, 0.5) or -1, 0 on every 3rd row).
    ent_scale = grad_loss_for(n, grad_seed + 1) - 1.0
    ent_scale[::3] = 0.0
    grad_ent = backward_into_poisoned_memory(grad_loss, logits, case.targets, out,
                                             kw["ignore_index"], kw["temperature"], ent_scale)
    zero_rows_ent = zero_rows & ((ent_scale.cpu() == 0) | ~ref["valid"])
    check_grad(grad_ent, reference_grad(ref, grad_loss, kw["temperature"], ent_scale),
               logits.dtype, zero_rows_ent)
    return out, grad


# --------------------------------------------------------------------------------------------
# Launch shapes x dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,vocab", _shapes(), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_launch_shapes(dtype, n, vocab):
    case = make_case((n,), vocab, dtype, "cuda", seed=n * 31 + vocab, dual_clip=3.0,
                     advantages="token")
    run_and_check(case.logits.detach(), case, grad_seed=vocab)


@pytest.mark.parametrize("vocab", [9, 4099, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_temperature_and_scalar_advantage(dtype, vocab):
    case = make_case((37,), vocab, dtype, "cuda", seed=vocab + 5, temperature=0.7,
                     advantages="negative_scalar", dual_clip=3.0)
    run_and_check(case.logits.detach(), case, grad_seed=3)


@pytest.mark.parametrize("vocab", [7, 4099])
def test_no_old_logprobs_is_sft(vocab):
    case = make_case((50,), vocab, torch.bfloat16, "cuda", seed=2, with_old=False,
                     advantages="scalar")
    out, _ = run_and_check(case.logits.detach(), case)
    valid = case.valid
    ratio, coef = out[TOKEN_STATS["ratio"]], out[TOKEN_STATS["coef"]]
    assert torch.all(ratio[valid] == 1.0) and torch.all(coef[valid] == 1.0)


# --------------------------------------------------------------------------------------------
# Row layouts: strided rows, rows that do not start on a 16-byte boundary
# --------------------------------------------------------------------------------------------


def _view_with_layout(dense, layout):
    n, v = dense.shape
    opts = dict(dtype=dense.dtype, device=dense.device)
    if layout == "row_slice":  # rows of a wider buffer: stride V + 5, each row at its own phase
        wide = torch.full((n, v + 5), 7.0, **opts)
        wide[:, :v] = dense
        return wide[:, :v]
    if layout == "column_offset":  # rows start 3 elements into a wider buffer's rows
        wide = torch.full((n, v + 3), 7.0, **opts)
        wide[:, 3:] = dense
        return wide[:, 3:]
    if layout == "offset_start":  # dense rows, the first one element past a 16-byte boundary
        flat = torch.full((n * v + 1,), 7.0, **opts)
        flat[1:] = dense.reshape(-1)
        return flat[1:].view(n, v)
    if layout == "strided_columns":  # column stride 2: copied to dense rows before the kernel
        wide = torch.full((n, 2 * v), 7.0, **opts)
        wide[:, ::2] = dense
        return wide[:, ::2]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["row_slice", "column_offset", "offset_start",
                                    "strided_columns"])
@pytest.mark.parametrize("vocab", [1, 3, 9, 1000, 4099, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_row_layouts(dtype, vocab, layout):
    case = make_case((37,), vocab, dtype, "cuda", seed=vocab + 11, dual_clip=3.0)
    dense = case.logits.detach()
    view = _view_with_layout(dense, layout)
    assert torch.equal(view, dense)
    if layout != "strided_columns" and vocab > 1:
        assert view.data_ptr() % 16 != 0 or view.stride(0) != vocab
    out_view, grad_view = run_and_check(view, case, grad_seed=1)
    out_dense, grad_dense = run_and_check(dense, case, grad_seed=1)
    if vocab * dense.element_size() <= SHORT_ROW_BYTES:
        # Short rows are read lane-strided by element index: the layout cannot change a bit.
        for a, b in zip(out_view, out_dense):
            assert torch.equal(a, b)
        assert torch.equal(grad_view, grad_dense)
    else:
        assert_close_scaled(grad_view.double(), grad_dense.double(), rtol=1e-5,
                            atol_scale=1e-5, floor=1e-9, msg="grad of the view vs the dense rows")


def test_expanded_rows():
    """Row stride 0: every row aliases the same memory."""
    row = (torch.randn(1, 1000, generator=generator(3)) * 2.5).to(torch.bfloat16)
    logits = row.cuda().expand(40, 1000)
    case = make_case(logits=logits.cpu().contiguous(), dtype=torch.bfloat16, device="cuda",
                     seed=3, dual_clip=3.0)
    run_and_check(logits, case)


# --------------------------------------------------------------------------------------------
# Targets: int32, ignored rows, clipped rows, out of range
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,vocab", [(300, 127), (64, 4099), (5, 32000)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_int32_targets_match_int64_exactly(dtype, n, vocab):
    case = make_case((n,), vocab, dtype, "cuda", seed=vocab, target_dtype=torch.int32)
    assert case.targets.dtype == torch.int32
    out32, grad32 = run_and_check(case.logits.detach(), case)
    kw = case_kwargs(case)
    t64 = case.targets.long()
    out64 = forward(case.logits.detach(), t64, case.old_logprobs, case.advantages, **kw)
    for a, b in zip(out32, out64):
        assert torch.equal(a, b)
    grad64 = backward(grad_loss_for(n), case.logits.detach(), t64, out64, kw["ignore_index"],
                      kw["temperature"])
    assert torch.equal(grad32, grad64)


@pytest.mark.parametrize("vocab", [9, 4099, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ignored_and_clipped_rows_get_exact_zeros(dtype, vocab):
    case = make_case((300,), vocab, dtype, "cuda", seed=vocab + 7, dual_clip=3.0,
                     advantages="token", ignore_index=-1, ignore_frac=0.3)
    out, grad = run_and_check(case.logits.detach(), case, grad_seed=5)
    ref = reference_rows(case.logits, case.targets, case.old_logprobs, case.advantages,
                         **case_kwargs(case))
    valid = ref["valid"]
    clipped = ref["clipped"].bool()
    ratio = ref["ratio"]
    # Both sides of the trust region are clipped somewhere, and those rows have no gradient.
    assert bool((clipped & valid & (ratio < 0.8)).any())
    assert bool((clipped & valid & (ratio > 1.28)).any())
    assert bool((~valid).any())
    no_grad_rows = (~valid | clipped).to(grad.device)
    assert torch.count_nonzero(grad[no_grad_rows]) == 0
    assert torch.count_nonzero(out[TOKEN_STATS["coef"]][no_grad_rows]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_rows_ignored(dtype):
    n, vocab = 40, 4099
    logits = torch.randn(n, vocab, generator=generator(9)).to(dtype).cuda()
    targets = torch.full((n,), -100, device="cuda")
    out = forward(logits, targets, torch.randn(n, device="cuda"), 1.0)
    for name, t in zip(FORWARD_NAMES, out):
        assert torch.all(t == 0), name
    grad = backward_into_poisoned_memory(torch.ones(n, device="cuda"), logits, targets, out)
    assert torch.count_nonzero(grad) == 0 and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("bad", [7, 1000, -5])
def test_out_of_range_target_raises_value_error(bad):
    logits = torch.randn(4, 7, device="cuda")
    targets = torch.tensor([0, 1, bad, -100], device="cuda")
    pattern = re.escape(f"target id {bad} ")
    with pytest.raises(ValueError, match=pattern):
        forward(logits, targets)
    with pytest.raises(ValueError, match=pattern):
        psft_ext.psft_loss(logits, targets)
    with pytest.raises(ValueError, match=pattern):
        psft_ext.token_logprobs(logits, targets)


def test_backward_with_targets_outside_the_row():
    """A target outside [0, V) (not ignore_index) has no one-hot term in psft_bwd: the row's
    gradient is scale * p (the vocabulary-parallel loss's rows whose target is in another
    slice), never an out-of-bounds access; the other rows are unaffected. The CPU kernels
    behave the same (tests/test_vocab_parallel.py)."""
    n, vocab = 6, 1000
    logits = torch.randn(n, vocab, generator=generator(4)).cuda()
    good = torch.tensor([1, 2, 3, 4, 5, -100], device="cuda")
    outside = torch.tensor([1, vocab, -5, 4, 10**12, -100], device="cuda")
    out = forward(logits, good)
    grad = backward(torch.ones(n, device="cuda"), logits, outside, out)
    torch.cuda.synchronize()
    rows = torch.tensor([False, True, True, False, True, False])
    ref = reference_rows(logits, good)
    expected = reference_grad(ref, torch.ones(n))
    # Without the one-hot: scale * p on those rows.
    scale = ref["coef"][rows]
    expected[rows] = ref["p"][rows] * scale[:, None]
    assert_close_scaled(grad.cpu(), expected, rtol=1e-5, atol_scale=1e-5)


# --------------------------------------------------------------------------------------------
# Special values, empty input, determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [9, 4099, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_masked_vocabulary_entries(dtype, vocab):
    """-inf logits: probability 0, zero gradient, no NaN; a row with only its target left has
    logp = 0 and entropy = 0 exactly."""
    n = 24
    case = make_case((n,), vocab, dtype, "cuda", seed=vocab + 3, ignore_frac=0.0,
                     with_old=False)
    logits = case.logits.detach().clone()
    mask = torch.rand(logits.shape, generator=generator(8)).cuda() < 0.3
    mask[0] = True
    mask.scatter_(1, case.targets[:, None], False)
    logits[mask] = float("-inf")
    case = make_case(logits=logits.cpu(), targets=case.targets.cpu(), dtype=dtype,
                     device="cuda", seed=vocab + 3, dual_clip=3.0)
    out, grad = run_and_check(logits, case)
    assert out[TOKEN_STATS["logp"]][0].item() == 0.0
    assert out[TOKEN_STATS["entropy"]][0].item() == 0.0
    assert torch.count_nonzero(grad[mask]) == 0


@pytest.mark.parametrize("vocab", [0, 7, 151936])
def test_zero_rows(vocab):
    logits = torch.empty(0, vocab, dtype=torch.bfloat16, device="cuda")
    targets = torch.empty(0, dtype=torch.long, device="cuda")
    out = forward(logits, targets)
    assert len(out) == len(TOKEN_STATS)
    assert all(t.shape == (0,) and t.device == logits.device for t in out)
    grad = backward(torch.empty(0, device="cuda"), logits, targets, out)
    assert grad.shape == (0, vocab) and grad.dtype == torch.bfloat16 and grad.device == logits.device
    logp, entropy = psft_ext.token_logprobs(logits, targets, with_entropy=True)
    assert logp.shape == (0,) and entropy.shape == (0,)
    if vocab > 0:
        x = logits.clone().requires_grad_(True)
        loss = psft_ext.psft_loss(x, targets)
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == (0, vocab)


@pytest.mark.parametrize("n,vocab", [(300, 127), (64, 4099), (16, 151936)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_run_to_run_bitwise_identical(dtype, n, vocab):
    case = make_case((n,), vocab, dtype, "cuda", seed=n + vocab, dual_clip=3.0)
    runs = []
    for _ in range(3):
        x = case.fused_logits()
        loss, metrics = psft_ext.psft_loss(x, case.targets, case.old_logprobs,
                                           advantages=case.advantages, return_metrics=True,
                                           **case.kwargs)
        loss.backward()
        raw = forward(case.logits.detach(), case.targets, case.old_logprobs, case.advantages,
                      **case_kwargs(case))
        runs.append((loss.detach(), x.grad, tuple(metrics), raw))
    first = runs[0]
    for other in runs[1:]:
        assert torch.equal(first[0], other[0])
        assert torch.equal(first[1], other[1])
        for a, b in zip(first[2] + tuple(first[3]), other[2] + tuple(other[3])):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Public API on large shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,vocab,dtype", [(64, 151936, torch.bfloat16),
                                           (300, 32000, torch.float32),
                                           (300, 4099, torch.float16)], ids=str)
def test_public_api_matches_reference(n, vocab, dtype):
    case = make_case((n,), vocab, dtype, "cuda", seed=n, dual_clip=3.0, advantages="token")
    x = case.fused_logits()
    loss, metrics = psft_ext.psft_loss(x, case.targets, case.old_logprobs,
                                       advantages=case.advantages, return_metrics=True,
                                       **case.kwargs)
    loss.backward()
    x64 = case.logits.detach().cpu().double().requires_grad_(True)
    ref_loss, ref_metrics = psft_ext.reference.psft_loss(
        x64, case.targets.cpu(), case.old_logprobs.cpu(), advantages=case.advantages.cpu(),
        return_metrics=True, **case.kwargs)
    ref_loss.backward()
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach(), rtol=2e-5, atol=1e-5)
    for a, e in zip(metrics, ref_metrics):
        torch.testing.assert_close(a.double().cpu(), e, rtol=2e-5, atol=2e-5)
    check_grad(x.grad, x64.grad, dtype)
    logp, entropy = psft_ext.token_logprobs(case.logits.detach(), case.targets,
                                            with_entropy=True)
    ref_logp, ref_entropy = psft_ext.reference.token_logprobs(
        case.logits.detach().cpu().double(), case.targets.cpu(), with_entropy=True)
    torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double().cpu(), ref_entropy, rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------
# More than 2^31 elements: 64-bit offsets everywhere
# --------------------------------------------------------------------------------------------


def test_more_than_2_pow_31_elements_bf16():
    n, vocab = 14200, 151936
    assert n * vocab > 2**31
    logits_bytes = n * vocab * 2
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * logits_bytes:
        pytest.skip(f"needs {3 * logits_bytes / 2**30:.1f} GiB free, "
                    f"{free / 2**30:.1f} GiB available")
    g = torch.Generator(device="cuda")
    g.manual_seed(0)
    logits = torch.randn(n, vocab, generator=g, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    # First rows, the rows around byte offset 2^31 and element offset 2^31, the last row.
    rows = torch.tensor([0, 1, 7067, 7068, 14134, 14135, n - 1])
    rows_cuda = rows.cuda()
    out = forward(logits, targets)
    grad = backward(torch.ones(n, device="cuda"), logits, targets, out)
    sub_logits = logits[rows_cuda].cpu()
    sub_grad = grad[rows_cuda].cpu()
    sub_out = [t[rows_cuda] for t in out]
    sub_targets = targets[rows_cuda].cpu()
    del logits, grad
    torch.cuda.empty_cache()
    ref = reference_rows(sub_logits, sub_targets)
    check_forward(sub_out, ref)
    check_grad(sub_grad, reference_grad(ref, torch.ones(len(rows))), torch.bfloat16)
