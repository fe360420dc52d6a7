"""Bad arguments raise the documented exceptions (TypeError / ValueError) naming the problem."""

import math
import re

import pytest
import torch

import psft_ext

from conftest import raw_params, token_inputs
from psft_ext._ops import TOKEN_INPUTS, TOKEN_STATS

ops = torch.ops.psft_ext
NAN, INF = float("nan"), float("inf")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(n=6, vocab=11, device="cpu", dtype=torch.float32):
    logits = torch.randn(n, vocab, device=device, dtype=dtype)
    targets = torch.arange(n, device=device) % vocab
    return logits, targets


def _fwd(logits, targets, old=None, adv=None, advantage=1.0, ignore_index=-100, **options):
    """psft_fwd, per-token (unless ``options`` give a reduction), without a gradient, with the
    packed options unchecked: its stats."""
    params = raw_params(advantage, **{"reduction": "none", **options})
    return ops.psft_fwd(logits, targets, token_inputs(old, adv), params, ignore_index, 0, None,
                        0.0, False, False, None)[4]


# --------------------------------------------------------------------------------------------
# psft_loss / token_logprobs: tensors
# --------------------------------------------------------------------------------------------

FUNCTIONS = {
    "psft_loss": psft_ext.psft_loss,
    "token_logprobs": psft_ext.token_logprobs,
}


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int32, torch.bool],
                         ids=["float64", "int64", "int32", "bool"])
def test_logits_dtype(fn, dtype):
    logits, targets = _inputs()
    with pytest.raises(TypeError, match=r"logits must be float32, bfloat16 or float16.*" +
                       str(dtype).replace("torch.", "")):
        fn(logits.to(dtype), targets)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8],
                         ids=["float32", "float64", "int16", "uint8"])
def test_targets_dtype(fn, dtype):
    logits, targets = _inputs()
    with pytest.raises(TypeError, match=r"targets must be int64 or int32"):
        fn(logits, targets.to(dtype))


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_not_tensors(fn):
    logits, targets = _inputs()
    with pytest.raises(TypeError, match="must be tensors"):
        fn(logits.tolist(), targets)
    with pytest.raises(TypeError, match="must be tensors"):
        fn(logits, targets.tolist())


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize(
    "logits_shape,targets_shape",
    [((6, 11), (5,)), ((6, 11), (6, 1)), ((2, 3, 11), (6,)), ((2, 3, 11), (3, 2)), ((11,), (1,))])
def test_shape_mismatch(fn, logits_shape, targets_shape):
    logits = torch.randn(logits_shape)
    targets = torch.zeros(targets_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(str(tuple(logits_shape[:-1]))) + ".*" +
                       re.escape(str(tuple(targets_shape)))):
        fn(logits, targets)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_zero_dim_logits_and_empty_vocab(fn):
    with pytest.raises(ValueError, match="vocabulary dimension"):
        fn(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="empty vocabulary"):
        fn(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


def _bad_target_cases():
    vocab = 11
    return [
        # (targets, bad id, flat position)
        (torch.tensor([0, 3, vocab, 2, 1]), vocab, 2),
        (torch.tensor([0, 3, 4, 2, -5]), -5, 4),
        (torch.tensor([2**40, 1, 2, 3, 4]), 2**40, 0),
        (torch.tensor([1, 2, 3, 2**31 - 1], dtype=torch.int32), 2**31 - 1, 3),
        (torch.tensor([[1, 2, 3, 4], [5, 6, -100, 7], [8, 12, 0, -2]]), 12, 9),  # first bad one
        (torch.tensor([[1, -1, 3], [4, 5, 6]]), -1, 1),  # -1 is not ignore_index by default
    ]


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("targets,bad,pos", _bad_target_cases(),
                         ids=["V", "minus5", "huge", "int32_max", "2d_first", "minus1"])
def test_target_out_of_range(fn, targets, bad, pos):
    logits = torch.randn(tuple(targets.shape) + (11,))
    with pytest.raises(ValueError, match=rf"target id {bad} at position {pos}\b.*vocabulary of 11"):
        fn(logits, targets)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_custom_ignore_index_is_not_out_of_range(fn):
    logits, targets = _inputs()
    targets[2] = -1
    fn(logits, targets, ignore_index=-1)  # fine
    with pytest.raises(ValueError, match="target id -1 at position 2"):
        fn(logits, targets)  # ignore_index=-100: -1 is a bad id


def _int32_wrap_case():
    # ignore_index values outside the int32 range that wrap to -100 (or 0) in int32. The bad id
    # sits at row 20 of (30, 11) logits, so a missed check reads inside the tensor (row 20's
    # "column -100" is element 120), never outside its memory.
    logits = torch.randn(30, 11)
    targets = (torch.arange(30) % 11).to(torch.int32)
    targets[20] = -100
    return logits, targets


INT32_WRAPPING = [2**32 - 100, -(2**32) - 100, 2**40]


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("ignore_index", INT32_WRAPPING, ids=["2e32-100", "-2e32-100", "2e40"])
def test_int32_targets_with_ignore_index_outside_int32(fn, ignore_index):
    """No int32 id equals such an ignore_index: -100 is an out-of-range id, as with int64."""
    logits, targets = _int32_wrap_case()
    with pytest.raises(ValueError, match="target id -100 at position 20"):
        fn(logits, targets, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="target id -100 at position 20"):
        fn(logits, targets.long(), ignore_index=ignore_index)


@pytest.mark.parametrize("ignore_index", INT32_WRAPPING, ids=["2e32-100", "-2e32-100", "2e40"])
def test_ops_int32_targets_with_ignore_index_outside_int32(ignore_index):
    """The C++ range check must compare int32 ids with the int64 ignore_index without wrapping
    it: the kernels compare in int64, so a target the check took for ignored is read."""
    logits, targets = _int32_wrap_case()
    with pytest.raises(ValueError, match="target id -100 at position 20"):
        _fwd(logits, targets, ignore_index=ignore_index)


def test_old_logprobs_bad():
    logits, targets = _inputs()
    with pytest.raises(ValueError,
                       match=r"old_logprobs must have the targets' shape \(6,\).*\(5,\)"):
        psft_ext.psft_loss(logits, targets, torch.zeros(5))
    with pytest.raises(ValueError, match=r"old_logprobs must have the targets' shape.*\(1,\)"):
        psft_ext.psft_loss(logits, targets, torch.zeros(1))  # no broadcasting for old log-probs
    with pytest.raises(ValueError, match="old_logprobs"):
        psft_ext.psft_loss(logits, targets, torch.zeros(6, 1))
    with pytest.raises(TypeError, match="old_logprobs must be a floating-point tensor"):
        psft_ext.psft_loss(logits, targets, torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="old_logprobs must be a tensor or None"):
        psft_ext.psft_loss(logits, targets, [0.0] * 6)


@pytest.mark.parametrize("shape", [(5,), (2, 6), (6, 2), (3, 1)])
def test_advantages_not_broadcastable(shape):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=r"advantages of shape .* does not broadcast.*\(6,\)"):
        psft_ext.psft_loss(logits, targets, advantages=torch.ones(shape))


def test_advantages_broadcastable_2d():
    logits = torch.randn(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.long)
    psft_ext.psft_loss(logits, targets, advantages=torch.ones(2, 1))  # fine
    psft_ext.psft_loss(logits, targets, advantages=torch.ones(3))  # fine
    with pytest.raises(ValueError, match="advantages of shape"):
        psft_ext.psft_loss(logits, targets, advantages=torch.ones(2))


def test_advantages_bad_type_or_value():
    logits, targets = _inputs()
    with pytest.raises(TypeError, match="advantages must be a floating-point tensor"):
        psft_ext.psft_loss(logits, targets, advantages=torch.ones(6, dtype=torch.long))
    for bad in (NAN, INF, -INF):
        with pytest.raises(ValueError, match="advantages must be a finite number"):
            psft_ext.psft_loss(logits, targets, advantages=bad)


# --------------------------------------------------------------------------------------------
# psft_loss / token_logprobs: hyper-parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip_low", "clip_high"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, -0.1, True, "0.2", None])
def test_bad_clip(name, value):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=name):
        psft_ext.psft_loss(logits, targets, **{name: value})


@pytest.mark.parametrize("value", [1.0, 1.5])
def test_clip_low_reaching_ratio_zero(value):
    """clip_low >= 1 puts the trust region's lower bound at or below a ratio of 0."""
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="clip_low must be < 1"):
        psft_ext.psft_loss(logits, targets, clip_low=value)
    with pytest.raises(ValueError, match="clip_low must be in"):
        _fwd(logits, targets, clip_low=value)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_temperature_without_a_float32_inverse(fn):
    """temperature=1e-40 passed and gave a NaN loss: 1 / temperature is not a float32."""
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="temperature must be >="):
        fn(logits, targets, temperature=1e-40)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        _fwd(logits, targets, temperature=1e-40)
    fn(logits, targets, temperature=1e-30)  # fine


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64(fn, value):
    """ignore_index=2**63 raised a RuntimeError about types from deep inside."""
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fn(logits, targets, ignore_index=value)


@pytest.mark.parametrize("value", [NAN, INF, 1.0, 0.5, 0.0, -3.0])
def test_bad_dual_clip(value):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="dual_clip"):
        psft_ext.psft_loss(logits, targets, dual_clip=value)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("value", [NAN, INF, -INF, 0.0, -1.0, 0])
def test_bad_temperature(fn, value):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        fn(logits, targets, temperature=value)


@pytest.mark.parametrize("value", ["avg", "MEAN", None, ""])
def test_bad_reduction(value):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        psft_ext.psft_loss(logits, targets, reduction=value)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("value", [-1.0, True, "x"])
def test_bad_ignore_index(fn, value):
    logits, targets = _inputs()
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fn(logits, targets, ignore_index=value)


@pytest.mark.parametrize("value", [0, 0.0, -2, NAN, INF])
def test_bad_num_items(value):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="num_items"):
        psft_ext.psft_loss(logits, targets, num_items=value)


@pytest.mark.parametrize("value", [0, 0.0, -2, NAN, INF, -0.5])
@pytest.mark.parametrize("fn", ["psft_loss", "linear_psft_loss"])
def test_bad_num_items_tensor(fn, value):
    """A tensor num_items is checked as a number is: a negative one flipped the step's sign, a
    zero gave -inf, a NaN gave NaN, all without a word."""
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="num_items must be"):
        if fn == "psft_loss":
            psft_ext.psft_loss(logits, targets, num_items=torch.tensor(value))
        else:
            psft_ext.linear_psft_loss(logits, torch.randn(11, 11), targets,
                                      num_items=torch.tensor(value))


def test_num_items_tensor_bool_or_complex():
    logits, targets = _inputs()
    for value in (torch.tensor(True), torch.tensor(3 + 0j)):
        with pytest.raises(TypeError, match="num_items must be a real number"):
            psft_ext.psft_loss(logits, targets, num_items=value)


def test_num_items_tensor_on_another_device():
    """A meta num_items returned uninitialized memory as the loss (gradients around 1e27)."""
    logits, targets = _inputs()
    with pytest.raises(ValueError, match="num_items is on meta"):
        psft_ext.psft_loss(logits.requires_grad_(True), targets,
                           num_items=torch.tensor(5.0, device="meta"))
    with pytest.raises(ValueError, match="num_items is on meta"):
        _ = torch.ops.psft_ext.psft_fwd(logits.detach(), targets, token_inputs(), raw_params(),
                                        -100, 0, torch.tensor(5.0, device="meta"), 0.0, False,
                                        False, None)


def test_num_items_tensor_checked_by_the_op():
    """The op's own checks, for callers below the Python API: on the CPU a bad value raises; a
    bool tensor is refused."""
    logits, targets = _inputs()
    for value, error in ((torch.tensor(-3.0), ValueError), (torch.tensor(True), TypeError)):
        with pytest.raises(error, match="num_items must be"):
            torch.ops.psft_ext.psft_fwd(logits, targets, token_inputs(), raw_params(), -100, 0,
                                        value, 0.0, False, False, None)


@cuda_only
def test_cuda_num_items_tensor_bad_value_is_nan():
    """On a GPU a tensor num_items is not read back (a sync): a non-positive or NaN one makes the
    loss and the gradient NaN, so GradScaler / clip_grad_norm_ see it."""
    logits, targets = _inputs(device="cuda")
    for value in (0.0, -2.0, NAN):
        x = logits.clone().requires_grad_(True)
        loss = psft_ext.psft_loss(x, targets, num_items=torch.tensor(value, device="cuda"))
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(x.grad).all()


@pytest.mark.parametrize("shape", [(2,), (1, 2), (0,)])
def test_num_items_tensor_of_several_values(shape):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=r"num_items must hold one value, got a tensor of shape"):
        psft_ext.psft_loss(logits, targets, num_items=torch.ones(shape))


# --------------------------------------------------------------------------------------------
# the ops called directly (C++ checks)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets,bad,pos", _bad_target_cases()[:4],
                         ids=["V", "minus5", "huge", "int32_max"])
def test_ops_target_out_of_range(targets, bad, pos):
    logits = torch.randn(targets.shape[0], 11)
    pattern = rf"target id {bad} at position {pos}\b.*vocabulary of 11"
    with pytest.raises(ValueError, match=pattern):
        _fwd(logits, targets)


def test_ops_dtypes():
    logits, targets = _inputs()
    for op_call in (_fwd,):
        with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
            op_call(logits.double(), targets)
        with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
            op_call(logits.long(), targets)
        with pytest.raises(TypeError, match="targets must be int64 or int32"):
            op_call(logits, targets.float())
        with pytest.raises(TypeError, match="targets must be int64 or int32"):
            op_call(logits, targets.short())


def test_ops_shapes():
    logits, targets = _inputs()
    for op_call in (_fwd,):
        with pytest.raises(ValueError, match="logits must be 2-D"):
            op_call(logits.view(2, 3, 11), targets)
        with pytest.raises(ValueError, match="logits must be 2-D"):
            op_call(logits[0], targets)
        with pytest.raises(ValueError, match=r"targets must have shape \(N,\) = \(6,\)"):
            op_call(logits, targets[:5])
        with pytest.raises(ValueError, match=r"targets must have shape \(N,\)"):
            op_call(logits, targets.view(2, 3))
        with pytest.raises(ValueError, match="empty vocabulary"):
            op_call(logits[:, :0], targets)


def test_ops_per_token_tensors():
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(N,\) = \(6,\)"):
        _fwd(logits, targets, old=torch.zeros(5))
    with pytest.raises(TypeError, match="old_logprobs must be float32"):
        _fwd(logits, targets, old=torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"advantages must have shape \(N,\)"):
        _fwd(logits, targets, adv=torch.zeros(6, 1))
    with pytest.raises(TypeError, match="advantages must be float32"):
        _fwd(logits, targets, adv=torch.zeros(6, dtype=torch.half))
    params = raw_params(reduction="mean")
    for k, name in enumerate(TOKEN_INPUTS):
        for bad, error, message in (
                (torch.zeros(5), ValueError, r"must have shape \(N,\) = \(6,\)"),
                (torch.zeros(6, dtype=torch.float64), TypeError, "must be float32")):
            inputs = token_inputs()
            inputs[k] = bad
            with pytest.raises(error, match=f"psft_fwd: {name} {message}"):
                ops.psft_fwd(logits, targets, inputs, params, -100, 0, None, 0.0, False, False,
                             None)
    for count in (len(TOKEN_INPUTS) - 1, len(TOKEN_INPUTS) + 1):
        with pytest.raises(ValueError, match=f"token_inputs must list {len(TOKEN_INPUTS)}"):
            ops.psft_fwd(logits, targets, [None] * count, params, -100, 0, None, 0.0, False,
                         False, None)


@pytest.mark.parametrize(
    "kwargs,name",
    [(dict(clip_low=NAN), "clip_low"), (dict(clip_low=-0.1), "clip_low"),
     (dict(clip_high=INF), "clip_high"), (dict(clip_high=-1.0), "clip_high"),
     (dict(dual_clip=1.0), "dual_clip"), (dict(dual_clip=0.5), "dual_clip"),
     (dict(dual_clip=NAN), "dual_clip"), (dict(dual_clip=INF), "dual_clip"),
     (dict(advantage=NAN), "advantage"), (dict(advantage=-INF), "advantage"),
     (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
     (dict(temperature=NAN), "temperature"), (dict(temperature=INF), "temperature")]
    + [({name: value}, name) for name, value in (
        ("entropy_coef", NAN), ("entropy_coef", INF), ("kl_coef", -0.1), ("kl_coef", NAN),
        # the packed codes of the names: an index into REDUCTIONS / IMPORTANCE_SAMPLING
        ("reduction", -1.0), ("reduction", 3.0), ("reduction", 0.5), ("reduction", NAN),
        ("importance_sampling", -1.0), ("importance_sampling", 2.0),
        ("importance_sampling", 0.5))])
def test_ops_scalar_checks(kwargs, name):
    logits, targets = _inputs()
    with pytest.raises(ValueError, match=name):
        _fwd(logits, targets, **kwargs)


def test_ops_backward_checks():
    logits, targets = _inputs()
    stats = _fwd(logits, targets)
    g = torch.ones(6)
    params = raw_params()

    def bwd(g=g, ent=None, logits=logits, targets=targets, stats=stats, params=params):
        ops.psft_bwd(g, ent, logits, targets, stats, params, -100, torch.empty(logits.shape))

    bwd()  # fine
    bwd(ent=g)  # fine
    with pytest.raises(ValueError, match=r"scale must have shape \(N,\) = \(6,\)"):
        bwd(g=g[:5])
    with pytest.raises(TypeError, match="scale must be float32"):
        bwd(g=g.double())
    with pytest.raises(ValueError, match=r"ent_scale must have shape \(N,\) = \(6,\)"):
        bwd(ent=g[:5])
    with pytest.raises(TypeError, match="ent_scale must be float32"):
        bwd(ent=g.double())
    with pytest.raises(ValueError, match="stats must have shape"):
        bwd(stats=stats[:, :3])
    with pytest.raises(ValueError, match="stats must have shape"):
        bwd(stats=stats[:len(TOKEN_STATS) - 1])
    with pytest.raises(ValueError, match="logits must be 2-D"):
        bwd(logits=logits.view(-1))
    with pytest.raises(ValueError, match="targets must have shape"):
        bwd(targets=targets[:4])
    with pytest.raises(ValueError, match="temperature"):
        bwd(params=raw_params(temperature=0.0))
    with pytest.raises(ValueError, match="params must hold .* numbers"):
        bwd(params=raw_params()[:-1])


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------

@cuda_only
def test_cuda_logits_cpu_targets():
    logits, targets = _inputs(device="cuda")
    for fn in FUNCTIONS.values():
        with pytest.raises(ValueError, match="targets are on cpu but logits are on cuda"):
            fn(logits, targets.cpu())
    with pytest.raises(ValueError, match="targets are on cpu but logits are on cuda"):
        _fwd(logits, targets.cpu())


@cuda_only
def test_cuda_per_token_tensors_on_cpu():
    logits, targets = _inputs(device="cuda")
    with pytest.raises(ValueError, match="old_logprobs is on cpu"):
        psft_ext.psft_loss(logits, targets, torch.zeros(6))
    with pytest.raises(ValueError, match="advantages is on cpu"):
        psft_ext.psft_loss(logits, targets, advantages=torch.ones(6))


@cuda_only
@pytest.mark.parametrize("bad,pos", [(11, 2), (-5, 4), (2**40, 0)])
def test_cuda_target_out_of_range(bad, pos):
    logits, targets = _inputs(n=5, device="cuda")
    targets[pos] = bad
    for fn in FUNCTIONS.values():
        with pytest.raises(ValueError, match=rf"target id {bad} at position {pos}\b"):
            fn(logits, targets)


def test_errors_leave_no_partial_state():
    # A failed call must not poison the next one (e.g. a leftover autograd graph).
    logits, targets = _inputs()
    x = logits.clone().requires_grad_(True)
    bad = targets.clone()
    bad[0] = 99
    with pytest.raises(ValueError):
        psft_ext.psft_loss(x, bad)
    psft_ext.psft_loss(x, targets).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert math.isfinite(psft_ext.psft_loss(logits, targets).item())
