"""The registered ops: torch.library.opcheck (schema, fake kernels, autograd registration) and
torch.compile of code that calls psft_loss."""

import pytest
import torch

import psft_ext

from conftest import (DTYPES, bwd_scale, dtype_id, fwd_args, generator, make_case, raw_params,
                      token_inputs)
from psft_ext._ops import PACKED_PARAMS, TOKEN_STATS

ops = torch.ops.psft_ext


def _fwd_args(case, with_old, with_adv, requires_grad=True, dual_clip=0.0, **kwargs):
    """psft_fwd's arguments for the case: a fresh leaf of the logits (requiring grad or not), an
    advantage of -0.7 where no per-token one is given."""
    x = case.logits.detach().reshape(-1, case.logits.shape[-1]).clone()
    x.requires_grad_(requires_grad)
    args = fwd_args(case, x, with_old=with_old, with_adv=with_adv, **kwargs)
    params = list(args[3])
    params[PACKED_PARAMS.index("advantage")] = 1.0 if with_adv else -0.7
    params[PACKED_PARAMS.index("dual_clip")] = dual_clip
    return args[:3] + (params,) + args[4:]


@pytest.mark.parametrize("with_logprobs", [False, True], ids=["loss", "logprobs"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("with_old,with_adv", [(False, False), (True, False), (True, True)],
                         ids=["plain", "old", "old_adv"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck_psft_fwd(device, dtype, with_old, with_adv, reduction, with_logprobs):
    """With logits that require a gradient: the schema, the fake kernel, the autograd
    registration and (for reduction "none", whose backward reads the logits) the AOT dispatch.
    The single pass's AOT limits: test_loss_reduced.py's opcheck."""
    case = make_case((3, 4), 13, dtype, device, ignore_frac=0.3, temperature=0.7,
                     advantages="token", seed=40)
    assert bool((~case.valid).any())
    args = _fwd_args(case, with_old, with_adv, dual_clip=3.0 if with_adv else 0.0,
                     reduction=reduction, with_metrics=True, with_logprobs=with_logprobs)
    utils = None if reduction == "none" else ("test_schema", "test_autograd_registration",
                                              "test_faketensor")
    torch.library.opcheck(ops.psft_fwd, args, **({} if utils is None else dict(test_utils=utils)))


def test_opcheck_psft_fwd_without_grad_and_int32(device):
    case = make_case((2, 5), 9, torch.float32, device, target_dtype=torch.int32, seed=41)
    for reduction in ("none", "mean"):
        torch.library.opcheck(ops.psft_fwd, _fwd_args(case, True, True, requires_grad=False,
                                                      reduction=reduction))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck_psft_bwd(device, dtype):
    case = make_case((3, 4), 13, dtype, device, ignore_frac=0.3, advantages="token", seed=42)
    args = _fwd_args(case, True, True, requires_grad=False)
    stats = ops.psft_fwd(*args)[4]
    grad_loss = torch.rand(12, generator=generator(1)).to(device)
    for ent_scale in (None, torch.rand(12, generator=generator(2)).to(device)):
        torch.library.opcheck(ops.psft_bwd, (bwd_scale(stats, grad_loss), ent_scale, args[0],
                                             args[1], stats, args[3], case.ignore_index,
                                             torch.empty_like(args[0])))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_opcheck_token_logprobs(device, dtype):
    """token_logprobs is psft_fwd without per-token inputs, with the log-probs and entropies, for
    reduction "none": differentiable when the logits require a gradient."""
    case = make_case((3, 4), 13, dtype, device, ignore_frac=0.3, with_old=False, seed=43)
    x = case.logits.detach().reshape(-1, 13)
    args = (x, case.targets.reshape(-1), token_inputs(),
            raw_params(temperature=1.5, reduction="none"), -100, 0, None, 0.0, False, True, None)
    torch.library.opcheck(ops.psft_fwd, args)
    torch.library.opcheck(ops.psft_fwd, (x.clone().requires_grad_(True),) + args[1:])


def test_op_outputs_for_ignored_rows(device):
    """Ignored rows: 0 in every output, and zero gradient rows from psft_bwd whatever the row
    scales."""
    case = make_case((3, 4), 13, torch.float32, device, ignore_frac=0.4, seed=44)
    args = _fwd_args(case, True, True, requires_grad=False, with_logprobs=True)
    loss, logp, entropy, _, stats = ops.psft_fwd(*args)
    ignored = ~case.valid.reshape(-1)
    assert bool(ignored.any())
    assert stats.shape == (len(TOKEN_STATS), 12) and stats.dtype == torch.float32
    for i, t in enumerate([loss, logp, entropy] + list(stats)):
        assert t.shape == (12,) and t.dtype == torch.float32
        assert torch.count_nonzero(t[ignored]) == 0, i
    grad = torch.empty_like(args[0])
    ones = torch.ones(12, device=device)
    ops.psft_bwd(ones, ones, args[0], args[1], stats, args[3], case.ignore_index, grad)
    assert torch.count_nonzero(grad[ignored]) == 0
    assert bool((grad[~ignored] != 0).any(dim=1).all())
    # clipped is 0/1 and coef is 0 wherever the clip is active
    clipped, coef = stats[TOKEN_STATS["clipped"]], stats[TOKEN_STATS["coef"]]
    assert set(clipped.unique().tolist()) <= {0.0, 1.0}
    assert torch.count_nonzero(coef[clipped == 1.0]) == 0


def test_backward_of_rows_without_elements(device):
    """The backward op takes rows of no elements (V = 0; the forward refuses them, a direct call
    need not): nothing to write on every device, no kernel launched."""
    logits = torch.randn(3, 0, device=device)
    grad = torch.empty(3, 0, device=device)
    targets = torch.zeros(3, dtype=torch.long, device=device)
    stats = torch.zeros(len(TOKEN_STATS), 3, device=device)
    ones = torch.ones(3, device=device)
    ops.psft_bwd(ones, None, logits, targets, stats, raw_params(), -100, grad)
    ops.psft_bwd(ones, ones, logits, targets, stats, raw_params(), -100, logits)
    assert grad.shape == (3, 0) and grad.device == logits.device


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _train_step(logits, targets, old, adv):
    """Backward-able math around the fused loss, with the metrics used in the graph."""
    loss, metrics = psft_ext.psft_loss(logits, targets, old, advantages=adv, dual_clip=3.0,
                                       temperature=0.9, return_metrics=True)
    total = loss * 2.0 + 0.1 * (logits.float() ** 2).mean() + 0.0 * metrics.entropy
    return total, metrics


def _compare_compiled(compiled, case):
    results = []
    for fn in (_train_step, compiled):
        x = case.fused_logits()
        total, metrics = fn(x, case.targets, case.old_logprobs, case.advantages)
        total.backward()
        results.append((total.detach(), x.grad, metrics))
    (t_e, g_e, m_e), (t_c, g_c, m_c) = results
    torch.testing.assert_close(t_c, t_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-6, atol=1e-6)
    assert isinstance(m_c, psft_ext.PSFTMetrics)
    for name in psft_ext.PSFTMetrics._fields:
        torch.testing.assert_close(getattr(m_c, name), getattr(m_e, name), rtol=1e-6, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_compile_fullgraph(device, dtype, backend):
    torch._dynamo.reset()
    case = make_case((3, 5), 17, dtype, device, advantages="token", seed=45)
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)
    _compare_compiled(compiled, case)


def test_compile_dynamic_shapes(device):
    """aot_eager with dynamic shapes: the fake kernels must handle a symbolic N."""
    torch._dynamo.reset()
    compiled = torch.compile(_train_step, fullgraph=True, backend="aot_eager", dynamic=True)
    for i, shape in enumerate([(3, 5), (4, 7), (2, 2)]):
        case = make_case(shape, 17, torch.float32, device, advantages="token", seed=46 + i)
        _compare_compiled(compiled, case)


def test_compile_changing_hyper_parameters(device):
    """Float arguments that change between calls become SymFloats after a recompile; the
    argument checks must trace them (math.isfinite on a SymFloat was a hard error)."""
    torch._dynamo.reset()

    def fn(logits, targets, old, temperature, clip_high):
        return psft_ext.psft_loss(logits, targets, old, temperature=temperature,
                                  clip_high=clip_high, dual_clip=3.0)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    case = make_case((3, 5), 17, torch.float32, device, advantages=1.0, seed=51)
    for temperature, clip_high in [(0.9, 0.28), (0.8, 0.28), (0.7, 0.3), (1.3, 0.5)]:
        x_c, x_e = case.fused_logits(), case.fused_logits()
        got = compiled(x_c, case.targets, case.old_logprobs, temperature, clip_high)
        exp = fn(x_e, case.targets, case.old_logprobs, temperature, clip_high)
        got.backward()
        exp.backward()
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-6, atol=1e-6)
    # The check still fires (fullgraph turns the ValueError into a torch._dynamo RuntimeError).
    with pytest.raises((ValueError, RuntimeError), match="temperature must be"):
        compiled(case.fused_logits(), case.targets, case.old_logprobs, float("nan"), 0.28)


def test_compile_inductor(device):
    """The default (inductor) backend, once: 13-25 s of compilation on a 2-core CPU (cold
    cache), a few seconds with a warm one."""
    torch._dynamo.reset()
    case = make_case((3, 5), 17, torch.float32, device, advantages="token", seed=49)
    compiled = torch.compile(_train_step, fullgraph=True)
    _compare_compiled(compiled, case)


def test_compile_token_logprobs(device):
    torch._dynamo.reset()

    def fn(logits, targets):
        logp, entropy = psft_ext.token_logprobs(logits, targets, with_entropy=True)
        return logp.sum() + entropy.sum()

    case = make_case((3, 5), 17, torch.float32, device, with_old=False, seed=50)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(case.logits, case.targets),
                               fn(case.logits, case.targets), rtol=1e-6, atol=1e-6)
