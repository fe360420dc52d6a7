"""The PPO-family options of the fused loss (entropy bonus, k3 KL penalty, rollout weights, GSPO,
verl's loss_agg_mode, the delta alias), its new metrics, and the in-place gradient: against the
float64 reference (psft_ext.reference, which follows verl 0.9's formulas), in both the logits and
the fused linear forms. The peer packages themselves are compared in tests/test_peers.py."""

import pytest
import torch
import torch.nn.functional as F

import psft_ext
from psft_ext import reference

from conftest import (DTYPES, assert_close_scaled, check_metrics, dtype_id,
                      generator, make_case)
from test_linear import make_linear_case

# Each option alone, then the combinations a GRPO / DAPO / GSPO recipe uses.
OPTION_SETS = {
    "entropy": dict(entropy_coef=0.05),
    "kl": dict(kl_coef=0.3),
    "rollout_is": dict(),
    "dual_clip": dict(dual_clip=3.0),
    "gspo": dict(importance_sampling="sequence"),
    "seq-mean-token-mean": dict(loss_agg_mode="seq-mean-token-mean"),
    "seq-mean-token-sum": dict(loss_agg_mode="seq-mean-token-sum"),
    "seq-mean-token-sum-norm": dict(loss_agg_mode="seq-mean-token-sum-norm"),
    "grpo": dict(entropy_coef=0.01, kl_coef=0.04, dual_clip=3.0, temperature=0.7),
    "gspo_all": dict(importance_sampling="sequence", loss_agg_mode="seq-mean-token-mean",
                     entropy_coef=0.02, kl_coef=0.1),
    "dapo_token_sum": dict(loss_agg_mode="seq-mean-token-sum", entropy_coef=0.02),
}
# The per-token tensors each set takes besides the case's.
USES_REF = {"kl", "grpo", "gspo_all"}
USES_IS = {"rollout_is", "grpo", "gspo_all"}


def extras(name, case, seed=0):
    """The set's ref_logprobs / rollout_is_weights for a case, on the case's device."""
    g = generator(seed + 31)
    shape, device = case.targets.shape, case.targets.device
    out = {}
    if name in USES_REF:
        base = case.old_logprobs.cpu() if case.old_logprobs is not None else torch.zeros(shape)
        out["ref_logprobs"] = (base + 0.3 * torch.randn(shape, generator=g)).to(device)
    if name in USES_IS:
        out["rollout_is_weights"] = (0.5 + torch.rand(shape, generator=g)).to(device)
    return out


def _options(name, case):
    options = dict(case.kwargs, **OPTION_SETS[name])
    if options.get("importance_sampling") == "sequence":
        options.pop("dual_clip", None)
    return options


def _reference_run(logits64, case, options, extra, **call):
    loss, metrics = reference.psft_loss(logits64, case.targets, case.old_logprobs,
                                        advantages=case.advantages, return_metrics=True,
                                        **options, **extra, **call)
    return loss, metrics


def _upstream(loss, seed=5):
    """A random upstream gradient for a per-token loss, 1 for a scalar one."""
    if loss.dim() == 0:
        return loss
    g = torch.randn(loss.shape, generator=generator(seed)).to(loss.device, loss.dtype)
    return (loss * g).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_match_reference(device, dtype, name):
    case = make_case((3, 9), 41, dtype, device, seed=hash(name) % 1000, advantages="token",
                     temperature=OPTION_SETS[name].get("temperature", 1.0))
    case.targets[2, :] = case.ignore_index  # a sequence with no tokens
    options, extra = _options(name, case), extras(name, case)
    x = case.fused_logits()
    loss, metrics = psft_ext.psft_loss(x, case.targets, case.old_logprobs,
                                       advantages=case.advantages, return_metrics=True,
                                       **options, **extra)
    loss.backward()
    x64 = case.reference_logits()
    ref_loss, ref_metrics = _reference_run(x64, case, options, extra)
    ref_loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss.detach().to(loss.device), rtol=2e-5,
                               atol=2e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert x.grad.dtype == dtype
    assert_close_scaled(x.grad, x64.grad, rtol=tol, atol_scale=tol, floor=1e-8, msg="grad")
    check_metrics(metrics, ref_metrics)


@pytest.mark.parametrize("name", ["entropy", "kl", "rollout_is", "grpo"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_options_per_token_and_sum(device, name, reduction):
    """The token-level options under reduction "none" (per-token losses, an arbitrary upstream
    gradient: the two-pass backward) and "sum"."""
    case = make_case((4, 7), 29, torch.float32, device, seed=3)
    options, extra = _options(name, case), extras(name, case)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                              reduction=reduction, **options, **extra)
    _upstream(loss).backward()
    x64 = case.reference_logits()
    ref = reference.psft_loss(x64, case.targets, case.old_logprobs, advantages=case.advantages,
                              reduction=reduction, **options, **extra)
    _upstream(ref).backward()
    assert loss.shape == case.targets.shape if reduction == "none" else loss.shape == ()
    assert_close_scaled(loss, ref.detach(), rtol=1e-5, atol_scale=1e-5, msg="loss")
    assert_close_scaled(x.grad, x64.grad, rtol=1e-5, atol_scale=1e-5, floor=1e-9, msg="grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", ["entropy", "gspo", "seq-mean-token-mean", "grpo", "gspo_all"])
@pytest.mark.parametrize("chunk_size", [None, 4, 9, 5])
def test_linear_options_match_unfused(device, dtype, name, chunk_size):
    """The fused linear form equals psft_loss on F.linear's logits in the same dtype (itself
    checked against the reference above), for chunks that hold whole sequences (9, None), split
    them (4: GSPO's first pass for the log-probs) or straddle them (5)."""
    case = make_linear_case((3, 9), 37, 16, dtype, device, seed=11)
    case.targets[1, :] = -100
    options = dict(case.kwargs, **OPTION_SETS[name])
    if options.get("importance_sampling") == "sequence":
        options.pop("dual_clip", None)
    extra = extras(name, case)
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weight,
                                                                   case.bias))
    loss, metrics = psft_ext.linear_psft_loss(h, w, case.targets, case.old_logprobs, bias=b,
                                              chunk_size=chunk_size, advantages=case.advantages,
                                              return_metrics=True, **options, **extra)
    loss.backward()
    h2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weight,
                                                                      case.bias))
    ref_loss, ref_metrics = psft_ext.psft_loss(F.linear(h2, w2, b2), case.targets,
                                               case.old_logprobs, advantages=case.advantages,
                                               return_metrics=True, **options, **extra)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=2e-5, atol=2e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name_, got, want in (("hidden", h.grad, h2.grad), ("weight", w.grad, w2.grad),
                             ("bias", b.grad, b2.grad)):
        assert got.dtype == dtype
        assert_close_scaled(got, want.float(), rtol=tol, atol_scale=tol, floor=1e-7, msg=name_)
    for field in psft_ext.PSFTMetrics._fields:
        torch.testing.assert_close(getattr(metrics, field), getattr(ref_metrics, field),
                                   rtol=1e-5, atol=1e-6, msg=field)


def test_gspo_ratio_is_per_sequence(device):
    """Every token of a sequence has its sequence's ratio (the geometric mean of its tokens'),
    so a sequence is clipped, or not, as a whole."""
    case = make_case((4, 6), 23, torch.float32, device, seed=2, ignore_frac=0.0)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, reduction="none",
                              importance_sampling="sequence", advantages=1.0)
    logp = psft_ext.token_logprobs(x.detach(), case.targets)
    s = torch.exp((logp - case.old_logprobs).mean(-1, keepdim=True))
    expected = -torch.minimum(s, s.clamp(0.8, 1.28)).expand_as(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_delta_is_the_dual_clip_alias():
    """``delta`` sets dual_clip; giving both, or a delta not above 1 + clip_high, is refused."""
    assert psft_ext.LossParams(delta=4.0) == psft_ext.LossParams(dual_clip=4.0)
    with pytest.raises(ValueError, match="delta and dual_clip"):
        psft_ext.LossParams(delta=4.0, dual_clip=4.0)
    with pytest.raises(ValueError, match=r"delta must be > 1\.28"):
        psft_ext.LossParams(delta=1.2)


def test_trl_delta_formula_equals_dual_clip(device):
    """TRL's GRPO loss with ``delta`` (INTELLECT-2's two-sided clip, also Liger's), written as in
    TRL: ``-min(min(r, delta) A, clip(r) A)``, gives the dual clip's loss and gradient whenever
    delta > 1 + clip_high, for advantages of both signs and ratios up to far above delta."""
    for delta in (1.5, 3.0, 10.0):
        case = make_case((5, 8), 31, torch.float32, device, seed=int(delta * 10), dual_clip=delta,
                         advantages="token")
        x = case.fused_logits()
        loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                                  delta=delta, reduction="sum")
        loss.backward()
        x64 = case.reference_logits()
        logp = reference.token_logprobs(x64, case.targets)
        ratio = torch.exp(logp - case.old_logprobs.double())
        adv = case.advantages.double()
        trl = -torch.min(torch.clamp(ratio, max=delta) * adv,
                         torch.clamp(ratio, 1 - 0.2, 1 + 0.28) * adv)
        trl = torch.where(case.valid, trl, torch.zeros_like(trl)).sum()
        trl.backward()
        torch.testing.assert_close(loss.double(), trl.detach(), rtol=1e-5, atol=1e-6)
        assert_close_scaled(x.grad, x64.grad, rtol=1e-5, atol_scale=1e-5, floor=1e-9)


def test_num_items_with_sequence_modes(device):
    """For a sequence loss_agg_mode, num_items counts sequences (verl's global_batch_size)."""
    case = make_case((3, 5), 17, torch.float32, device, seed=4)
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        for num_items in (7, torch.tensor(7.0, device=device), torch.tensor([7], device="cpu")):
            got = psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs,
                                     loss_agg_mode=mode, num_items=num_items)
            want = reference.psft_loss(case.reference_logits().detach(), case.targets,
                                       case.old_logprobs, loss_agg_mode=mode, num_items=7)
            torch.testing.assert_close(got.double(), want.to(got.device), rtol=1e-5, atol=1e-7)


def test_all_ignored_sequence_modes(device):
    """Every token ignored: loss 0, gradient 0, for every mode (no 0 / 0)."""
    x = torch.randn(2, 4, 9, device=device, requires_grad=True)
    t = torch.full((2, 4), -100, device=device)
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        x.grad = None
        loss = psft_ext.psft_loss(x, t, loss_agg_mode=mode, entropy_coef=0.1,
                                  importance_sampling="sequence")
        loss.backward()
        assert loss.item() == 0.0 and bool((x.grad == 0).all())


def test_token_accuracy_and_clip_sides(device):
    """token_accuracy is the share of argmax hits; the clip fractions split by side and add up."""
    case = make_case((6, 8), 19, torch.float32, device, seed=9, dual_clip=3.0,
                     advantages="token")
    _, m = psft_ext.psft_loss(case.logits.detach(), case.targets, case.old_logprobs,
                              advantages=case.advantages, dual_clip=3.0, return_metrics=True)
    valid = case.valid
    hits = (case.logits.detach().argmax(-1) == case.targets) & valid
    assert m.token_accuracy.item() == pytest.approx(hits.sum().item() / valid.sum().item())
    total = m.clip_fraction_high + m.clip_fraction_low + m.dual_clip_fraction
    torch.testing.assert_close(total, m.clip_fraction)
    assert m.clip_fraction_high > 0 and m.clip_fraction_low > 0 and m.dual_clip_fraction > 0


# --------------------------------------------------------------------------------------------
# In-place gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", [None, "grpo"])
def test_inplace_gradient_overwrites_the_logits(device, dtype, name):
    """inplace=True: the gradient reaching the LM head is the same, and it lives in the logits'
    own memory (no new N x V buffer)."""
    case = make_case((3, 7), 33, dtype, device, seed=6)
    options = dict(case.kwargs, **(OPTION_SETS[name] if name else {}))
    extra = extras(name, case) if name else {}
    grads = []
    for inplace in (False, True):
        w = torch.eye(33, dtype=dtype, device=device).requires_grad_(True)
        base = case.logits.detach().clone()
        logits = base @ w  # a non-leaf, as an LM head's output
        pointer = logits.data_ptr()
        loss = psft_ext.psft_loss(logits, case.targets, case.old_logprobs, inplace=inplace,
                                  advantages=case.advantages, **options, **extra)
        if inplace:
            assert logits.data_ptr() == pointer
        loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_inplace_errors(device):
    x = torch.randn(4, 11, device=device, requires_grad=True)
    t = torch.randint(0, 11, (4,), device=device)
    with pytest.raises(ValueError, match="leaf"):
        psft_ext.psft_loss(x, t, inplace=True)
    with pytest.raises(ValueError, match="inplace=True"):
        psft_ext.psft_loss(x * 1, t, inplace=True, reduction="none")
    with pytest.raises(ValueError, match="inplace=True"):
        psft_ext.psft_loss(x.half() * 1, t, inplace=True)
    # Another operation saved the logits for its own backward: autograd refuses at the backward.
    y = x * 1
    other = (y * y).sum()
    loss = psft_ext.psft_loss(y, t, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()
    # Without autograd there is no gradient to write: the logits stay.
    z = torch.randn(4, 11, device=device)
    before = z.clone()
    psft_ext.psft_loss(z, t, inplace=True)
    assert torch.equal(z, before)


# --------------------------------------------------------------------------------------------
# Bad option values
# --------------------------------------------------------------------------------------------


def test_bad_options():
    x = torch.randn(2, 3, 7)
    t = torch.randint(0, 7, (2, 3))
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        psft_ext.psft_loss(x, t, loss_agg_mode="seq-sum")
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        psft_ext.psft_loss(x, t, kl_coef=-0.1, ref_logprobs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ref_logprobs and kl_coef > 0 go together"):
        psft_ext.psft_loss(x, t, ref_logprobs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ref_logprobs and kl_coef > 0 go together"):
        psft_ext.psft_loss(x, t, kl_coef=0.1)
    with pytest.raises(ValueError, match="targets must be \\(..., T\\)"):
        psft_ext.psft_loss(x[0], t[0], loss_agg_mode="seq-mean-token-mean")
    with pytest.raises(ValueError, match="targets must be \\(..., T\\)"):
        psft_ext.linear_psft_loss(torch.randn(3, 4), torch.randn(7, 4), t[0],
                                  importance_sampling="sequence")
    with pytest.raises(ValueError, match="importance_sampling must be one of"):
        psft_ext.psft_loss(x, t, importance_sampling="seq")
    with pytest.raises(ValueError, match="has no dual clip"):
        psft_ext.psft_loss(x, t, importance_sampling="sequence", dual_clip=3.0)
    with pytest.raises(ValueError, match="aggregates a reduction 'mean'"):
        psft_ext.psft_loss(x, t, loss_agg_mode="seq-mean-token-sum", reduction="none")
    with pytest.raises(ValueError, match="entropy_coef must be a finite number"):
        psft_ext.psft_loss(x, t, entropy_coef=float("nan"))
    with pytest.raises(ValueError, match="rollout_is_weights of shape"):
        psft_ext.psft_loss(x, t, rollout_is_weights=torch.ones(5))
    with pytest.raises(TypeError, match="inplace must be a bool"):
        psft_ext.psft_loss(x, t, inplace=1)


# --------------------------------------------------------------------------------------------
# Differentiable log-probs and entropy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_gradient(device, dtype, temperature):
    """dz = (g_logp (onehot - p) - g_H p (log p + H)) / tau for random upstream gradients, ignored
    rows zero; float64 autograd through the reference."""
    case = make_case((5, 7), 43, dtype, device, seed=8, temperature=temperature)
    g = generator(12)
    g_logp = torch.randn(case.targets.shape, generator=g).to(device)
    g_ent = torch.randn(case.targets.shape, generator=g).to(device)
    x = case.fused_logits()
    logp, ent = psft_ext.token_logprobs(x, case.targets, temperature=temperature,
                                        with_entropy=True)
    assert logp.requires_grad and ent.requires_grad
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    x64 = case.reference_logits()
    rl, re = reference.token_logprobs(x64, case.targets, temperature=temperature,
                                      with_entropy=True)
    ((rl * g_logp.double()).sum() + (re * g_ent.double()).sum()).backward()
    torch.testing.assert_close(logp.detach().double(), rl.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.detach().double(), re.detach(), rtol=1e-5, atol=2e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert x.grad.dtype == dtype
    assert_close_scaled(x.grad, x64.grad, rtol=tol, atol_scale=tol, floor=1e-8)
    assert bool((x.grad[~case.valid] == 0).all())
    # Only one of the two used: the other's term is absent.
    x.grad = None
    psft_ext.token_logprobs(x, case.targets, temperature=temperature).sum().backward()
    x64.grad = None
    reference.token_logprobs(x64, case.targets, temperature=temperature).sum().backward()
    assert_close_scaled(x.grad, x64.grad, rtol=tol, atol_scale=tol, floor=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_token_logprobs_gradient(device, dtype, chunk_size):
    """The fused linear log-probs and entropy against autograd through F.linear's logits."""
    case = make_linear_case((4, 5), 37, 16, dtype, device, seed=13)
    g = generator(14)
    g_logp = torch.randn(case.targets.shape, generator=g).to(device)
    g_ent = torch.randn(case.targets.shape, generator=g).to(device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weight,
                                                                  case.bias)]
    logp, ent = psft_ext.linear_token_logprobs(leaves[0], leaves[1], case.targets,
                                               bias=leaves[2], chunk_size=chunk_size,
                                               temperature=0.8, with_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    refs = [t.detach().clone().requires_grad_(True) for t in (case.hidden, case.weight,
                                                                case.bias)]
    rl, re = psft_ext.token_logprobs(F.linear(*refs), case.targets, temperature=0.8,
                                     with_entropy=True)
    ((rl * g_logp).sum() + (re * g_ent).sum()).backward()
    torch.testing.assert_close(logp, rl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, re.detach(), rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(leaves, refs):
        assert got.grad.dtype == dtype
        assert_close_scaled(got.grad, want.grad.float(), rtol=tol, atol_scale=tol, floor=1e-7)


def test_token_logprobs_without_grad_keeps_nothing():
    x = torch.randn(3, 9, requires_grad=True)
    t = torch.randint(0, 9, (3,))
    with torch.no_grad():
        logp, ent = psft_ext.token_logprobs(x, t, with_entropy=True)
    assert not logp.requires_grad and not ent.requires_grad and logp.grad_fn is None


# --------------------------------------------------------------------------------------------
# opcheck and torch.compile of the new paths
# --------------------------------------------------------------------------------------------


def test_opcheck_option_paths(device):
    from conftest import raw_params
    from psft_ext._ops import REDUCTIONS, TOKEN_INPUTS
    ops = torch.ops.psft_ext
    g = generator(21)
    n, v = 12, 19
    x = torch.randn(n, v, generator=g).to(device)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[3] = -100
    per_token = {name: torch.randn(n, generator=g).to(device) * 0.1 - 3.0
                 for name in ("old_logprobs", "ref_logprobs")}
    per_token["advantages"] = torch.randn(n, generator=g).to(device)
    per_token["rollout_is_weights"] = torch.rand(n, generator=g).to(device) + 0.5
    inputs = [per_token.get(name) for name in TOKEN_INPUTS]
    mean = REDUCTIONS.index("mean")
    for params, seq_len in ((raw_params(entropy_coef=0.1, kl_coef=0.2, reduction=mean), 0),
                            (raw_params(importance_sampling=1, reduction=mean), 4),
                            (raw_params(entropy_coef=0.1, reduction=REDUCTIONS.index("none")),
                             0)):
        args = (x, t, inputs, params, -100, seq_len, None, 0.0, True, True, None)
        torch.library.opcheck(ops.psft_fwd, args)
        torch.library.opcheck(ops.psft_fwd, (x.clone().requires_grad_(True),) + args[1:])
        torch.library.opcheck(ops.psft_fwd, args[:-1] + (torch.empty_like(x),))
        stats = ops.psft_fwd(*args)[4]
        torch.library.opcheck(ops.psft_bwd, (torch.randn(n, device=device),
                                             torch.randn(n, device=device), x, t, stats, params,
                                             -100, torch.empty_like(x)))


def test_compile_fullgraph_option_paths():
    torch._dynamo.reset()
    x = torch.randn(2, 6, 23, requires_grad=True)
    t = torch.randint(0, 23, (2, 6))
    old = torch.randn(2, 6) * 0.1 - 3
    ref = old + 0.1
    isw = torch.rand(2, 6) + 0.5

    def step(logits):
        loss = psft_ext.psft_loss(logits, t, old, rollout_is_weights=isw, ref_logprobs=ref,
                                  kl_coef=0.1, entropy_coef=0.01,
                                  importance_sampling="sequence",
                                  loss_agg_mode="seq-mean-token-mean")
        logp, ent = psft_ext.token_logprobs(logits, t, with_entropy=True)
        return loss + 0.1 * (logp.sum() + ent.mean())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    got = x.grad.clone()
    x.grad = None
    want = step(x)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, x.grad)


def test_compile_fullgraph_linear_option_paths():
    torch._dynamo.reset()
    h = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(23, 8, requires_grad=True)
    t = torch.randint(0, 23, (2, 6))
    old = torch.randn(2, 6) * 0.1 - 3

    def step(hidden, weight):
        loss = psft_ext.linear_psft_loss(hidden, weight, t, old, entropy_coef=0.01,
                                         importance_sampling="sequence", chunk_size=4,
                                         loss_agg_mode="seq-mean-token-sum")
        logp, ent = psft_ext.linear_token_logprobs(hidden, weight, t, with_entropy=True)
        return loss + 0.1 * (logp.sum() + ent.mean())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h, w)
    out.backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    want = step(h, w)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got, (h.grad, w.grad))


@pytest.mark.parametrize("num_items", [50, "tensor"])
def test_options_with_num_items(device, num_items):
    """Token-mean over a step-wide count with every token-level option on."""
    case = make_case((3, 8), 29, torch.float32, device, seed=17)
    value = torch.tensor(50.0, device=device) if num_items == "tensor" else num_items
    options, extra = _options("grpo", case), extras("grpo", case)
    x = case.fused_logits()
    loss = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                              num_items=value, **options, **extra)
    loss.backward()
    x64 = case.reference_logits()
    ref = reference.psft_loss(x64, case.targets, case.old_logprobs, advantages=case.advantages,
                              num_items=50, **options, **extra)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach().to(loss.device), rtol=1e-5,
                               atol=1e-7)
    assert_close_scaled(x.grad, x64.grad, rtol=1e-5, atol_scale=1e-5, floor=1e-9)
