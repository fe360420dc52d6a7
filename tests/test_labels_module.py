"""shift_labels, the PSFTLoss module, build_info and the public API."""

import dataclasses

import pytest
import torch
from torch import nn

import psft_ext
from psft_ext import _ops

from conftest import check_all, fused_and_reference, generator, make_case


# --------------------------------------------------------------------------------------------
# shift_labels
# --------------------------------------------------------------------------------------------


def test_shift_labels_2d():
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, 7]])
    before = labels.clone()
    targets = psft_ext.shift_labels(labels)
    assert torch.equal(targets, torch.tensor([[2, 3, 4, -100], [6, -100, 7, -100]]))
    assert targets.dtype == labels.dtype and targets.device == labels.device
    assert torch.equal(labels, before)  # the input is not modified


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_shift_labels_1d_custom_ignore_index(dtype):
    labels = torch.tensor([9, 8, 7], dtype=dtype)
    targets = psft_ext.shift_labels(labels, ignore_index=-1)
    assert torch.equal(targets, torch.tensor([8, 7, -1], dtype=dtype))
    assert targets.dtype == dtype


def test_shift_labels_edge_cases():
    assert torch.equal(psft_ext.shift_labels(torch.tensor([5])), torch.tensor([-100]))
    assert psft_ext.shift_labels(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    labels = torch.arange(24).view(2, 3, 4)
    assert torch.equal(psft_ext.shift_labels(labels)[..., :-1], labels[..., 1:])
    with pytest.raises(ValueError, match="sequence dimension"):
        psft_ext.shift_labels(torch.tensor(3))


def test_shift_labels_matches_sliced_logits(device):
    """Loss on (logits, shift_labels(labels)) == loss on (logits[:, :-1], labels[:, 1:])."""
    g = generator(60)
    logits = torch.randn(2, 6, 11, generator=g).to(device)
    labels = torch.randint(0, 11, (2, 6), generator=g).to(device)
    labels[0, 2] = -100
    a = psft_ext.psft_loss(logits, psft_ext.shift_labels(labels))
    b = psft_ext.psft_loss(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# PSFTLoss
# --------------------------------------------------------------------------------------------


def test_module_defaults_are_the_authors_recipe():
    m = psft_ext.PSFTLoss()
    assert isinstance(m, nn.Module)
    assert (m.clip_low, m.clip_high, m.dual_clip, m.ignore_index, m.temperature, m.reduction,
            m.return_metrics) == (0.2, 0.28, None, -100, 1.0, "mean", False)
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    r = repr(m)
    for text in ("clip_low=0.2", "clip_high=0.28", "dual_clip=None", "ignore_index=-100",
                 "temperature=1.0", "reduction='mean'"):
        assert text in r


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(device, reduction):
    kw = dict(clip_low=0.15, clip_high=0.3, dual_clip=3.0, ignore_index=-1, temperature=0.8)
    case = make_case((3, 5), 19, torch.float32, device, seed=61, **kw)
    module = psft_ext.PSFTLoss(reduction=reduction, return_metrics=True, **kw)
    x_m, x_f = case.fused_logits(), case.fused_logits()
    num_items = 11 if reduction == "mean" else None
    loss_m, metrics_m = module(x_m, case.targets, case.old_logprobs, case.advantages,
                               num_items=num_items)
    loss_f, metrics_f = psft_ext.psft_loss(x_f, case.targets, case.old_logprobs,
                                           advantages=case.advantages, reduction=reduction,
                                           num_items=num_items, return_metrics=True, **kw)
    loss_m.sum().backward()
    loss_f.sum().backward()
    assert torch.equal(loss_m, loss_f)
    assert torch.equal(x_m.grad, x_f.grad)
    for a, b in zip(metrics_m, metrics_f):
        assert torch.equal(a, b)


def test_module_against_reference(device):
    case = make_case((4, 6), 23, torch.bfloat16, device, seed=62)
    module = psft_ext.PSFTLoss()
    x = case.fused_logits()
    loss = module(x, case.targets, case.old_logprobs, advantages=case.advantages)
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    fused, ref = fused_and_reference(case)
    assert torch.equal(loss.detach(), fused["loss"])
    assert torch.equal(x.grad, fused["grad"])
    check_all(fused, ref, torch.bfloat16)


def test_module_without_old_is_sft(device):
    case = make_case((2, 7), 13, torch.float32, device, with_old=False, advantages=1.0, seed=63)
    x = case.fused_logits()
    psft_ext.PSFTLoss()(x, case.targets).backward()
    xc = case.fused_logits()
    torch.nn.functional.cross_entropy(xc.view(-1, 13), case.targets.view(-1)).backward()
    torch.testing.assert_close(x.grad, xc.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# build_info, public API
# --------------------------------------------------------------------------------------------


def test_build_info():
    info = psft_ext.build_info()
    for key in ("cpu", "cpu_kernels", "cuda", "cuda_archs", "compiler", "torch", "torch_cuda",
                "cuda_available", "gpus", "packed_params", "token_stats", "metrics",
                "token_inputs", "reductions", "importance_sampling"):
        assert key in info, key
    assert info["cpu"] is True
    assert info["cpu_kernels"] in ("avx2", "baseline")
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], str) and isinstance(info["compiler"], str)
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cuda_available"] == torch.cuda.is_available()
    assert isinstance(info["gpus"], list) and len(info["gpus"]) == torch.cuda.device_count()
    if not info["cuda"]:
        assert info["cuda_archs"] == ""


def test_public_api():
    for name in psft_ext.__all__:
        assert hasattr(psft_ext, name), name
    assert isinstance(psft_ext.__version__, str)
    assert psft_ext.PSFTMetrics._fields == (
        "nll", "entropy", "clip_fraction", "approx_kl", "ratio_mean", "clip_fraction_high",
        "clip_fraction_low", "dual_clip_fraction", "token_accuracy", "num_tokens")
    assert _ops.METRIC_NAMES == psft_ext.PSFTMetrics._fields
    options = tuple(f.name for f in dataclasses.fields(psft_ext.LossParams) if f.init)
    assert options == ("clip_low", "clip_high", "dual_clip", "ignore_index", "temperature",
                       "reduction", "entropy_coef", "kl_coef", "loss_agg_mode",
                       "importance_sampling")
    # delta: an init-only alias of dual_clip (not a field, above), not stored apart.
    assert psft_ext.LossParams(delta=3.0) == psft_ext.LossParams(dual_clip=3.0)
    # The layouts the ops and the package share (csrc/psft_math.h).
    assert _ops.PACKED_PARAMS == ("clip_low", "clip_high", "dual_clip", "temperature",
                                  "entropy_coef", "kl_coef", "reduction", "importance_sampling",
                                  "advantage")
    assert tuple(_ops.TOKEN_STATS) == ("loss", "logp", "entropy", "ratio", "log_ratio",
                                       "clipped", "lse", "coef", "correct", "max", "ent_coef")
    assert _ops.TOKEN_INPUTS == ("old_logprobs", "advantages", "rollout_is_weights",
                                 "ref_logprobs", "token_weights", "seq_log_ratio")
    assert _ops.REDUCTIONS == ("none", "sum", "mean")
    assert _ops.IMPORTANCE_SAMPLING == ("token", "sequence")
    for name in ("psft_fwd", "psft_bwd", "psft_tokens", "scale_rows_", "linear_fwd",
                 "linear_bwd", "build_info"):
        assert hasattr(torch.ops.psft_ext, name), name
