"""Vocabulary-parallel losses on 2 and 4 CPU processes (torchrun, gloo): psft_loss, token_logprobs,
linear_psft_loss and linear_token_logprobs with ``process_group``, and DTensor logits sharded on the
vocabulary, against the same calls on the whole vocabulary in one process and against the float64
reference: the loss and every metric (identical on every rank), each rank's gradient of its slice,
the hidden states' gradient (summed over the ranks). Uneven slices, an empty slice, targets in
every slice and ignored, advantages, dual clip, temperature, num_items and the PPO-family options.
Bad input (ranks disagreeing on the rows or the targets, a target outside the whole vocabulary):
the same error on every rank, and the group still works after it."""

import os
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import psft_ext
from psft_ext import reference

from conftest import assert_close_scaled, torchrun
from vocab_parallel_cases import CASES, LOGPROB_CASES, case_inputs, slice_bounds

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")



@pytest.fixture(scope="module", params=[2, 4], ids=["2_ranks", "4_ranks"])
def launched(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"vocab_parallel_{world}")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"),
                                                      os.path.dirname(HERE)) if p))
    cmd = torchrun(world) + [os.path.join(HERE, "vocab_parallel_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return world, ranks


def _unsharded(case, inp):
    """The same call on the whole vocabulary in this process, and the float64 reference (logits
    form; for the linear form on float64 logits of the same inputs)."""
    kwargs = dict(case["options"], advantages=inp["advantages"], num_items=case.get("num_items"))
    kwargs.update({k: inp[k] for k in ("ref_logprobs", "rollout_is_weights") if k in inp})
    results = {}
    if case["form"] == "logits":
        for name, leaf in (("fused", inp["logits"].clone()),
                           ("ref", inp["logits"].double())):
            leaf.requires_grad_(True)
            fn = psft_ext.psft_loss if name == "fused" else reference.psft_loss
            loss, metrics = fn(leaf, inp["targets"], inp["old_logprobs"], return_metrics=True,
                               **kwargs)
            _backward(loss, inp)
            results[name] = dict(loss=loss.detach(), metrics=metrics, grad=leaf.grad)
        return results
    for name in ("fused", "ref"):
        dtype = None if name == "fused" else torch.float64
        h, w, b = (inp[k].to(dtype or inp[k].dtype).clone().requires_grad_(True)
                   for k in ("hidden", "weight", "bias"))
        if name == "fused":
            loss, metrics = psft_ext.linear_psft_loss(h, w, inp["targets"], inp["old_logprobs"],
                                                      bias=b, return_metrics=True, **kwargs)
        else:
            loss, metrics = reference.psft_loss(F.linear(h, w, b), inp["targets"],
                                                inp["old_logprobs"], return_metrics=True,
                                                **kwargs)
        _backward(loss, inp)
        results[name] = dict(loss=loss.detach(), metrics=metrics, grad=w.grad, grad_bias=b.grad,
                             grad_hidden=h.grad)
    return results


def _backward(loss, inp):
    if loss.dim() == 0:
        loss.backward()
    else:
        (loss * inp["upstream"].to(loss.dtype)).sum().backward()


def _tolerance(case, against):
    low = case["dtype"] != torch.float32
    if against == "fused":
        return 2e-2 if low else 2e-5
    return 2e-2 if low else 1e-5


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c["name"] for c in CASES])
def test_loss_equals_unsharded(launched, index):
    world, ranks = launched
    case = CASES[index]
    inp = case_inputs(case)
    got = [r["loss"][index] for r in ranks]
    # The same loss and metrics on every rank, bit for bit.
    for other in got[1:]:
        assert torch.equal(other["loss"], got[0]["loss"])
        assert torch.equal(other["metrics"], got[0]["metrics"])
    bounds = slice_bounds(case, world)
    grad = torch.cat([r["grad_slice"] for r in got], dim=-1 if case["form"] == "logits" else 0)
    expected = _unsharded(case, inp)
    for against in ("fused", "ref"):
        if against == "ref" and case["dtype"] != torch.float32:
            continue  # the bf16 chunk logits are rounded: the fused unsharded call is the bar
        exp = expected[against]
        tol = _tolerance(case, against)
        torch.testing.assert_close(got[0]["loss"].double(), exp["loss"].double(),
                                   rtol=tol, atol=tol * 1e-2)
        for name, value in zip(psft_ext.PSFTMetrics._fields, got[0]["metrics"]):
            torch.testing.assert_close(value.double(), getattr(exp["metrics"], name).double(),
                                       rtol=2e-5, atol=2e-5, msg=f"{against} {name}")
        assert_close_scaled(grad.float(), exp["grad"].float(), rtol=tol, atol_scale=tol,
                            floor=1e-7, msg=f"{against} grad")
        if case["form"] == "linear":
            bias = torch.cat([r["grad_bias"] for r in got])
            assert_close_scaled(bias.float(), exp["grad_bias"].float(), rtol=tol, atol_scale=tol,
                                floor=1e-7, msg=f"{against} bias")
            for r in got:  # summed over the ranks: the same whole gradient on each
                assert_close_scaled(r["grad_hidden"].float(), exp["grad_hidden"].float(),
                                    rtol=tol, atol_scale=tol, floor=1e-7,
                                    msg=f"{against} hidden")
    assert [hi - lo for lo, hi in bounds] == [g["grad_slice"].shape[-1 if case["form"] ==
                                                                   "logits" else 0] for g in got]


@pytest.mark.parametrize("index", range(len(LOGPROB_CASES)),
                         ids=[c["name"] for c in LOGPROB_CASES])
def test_logprobs_equal_unsharded(launched, index):
    world, ranks = launched
    case = LOGPROB_CASES[index]
    inp = case_inputs(case)
    got = [r["logprobs"][index] for r in ranks]
    for other in got[1:]:
        assert torch.equal(other["logp"], got[0]["logp"])
        assert torch.equal(other["entropy"], got[0]["entropy"])
    tau = case["temperature"]
    if case["form"] == "logits":
        leaf = inp["logits"].double().requires_grad_(True)
        logp, ent = reference.token_logprobs(leaf, inp["targets"], temperature=tau,
                                             with_entropy=True)
        leaves = {"grad_slice": leaf}
        dim = -1
    else:
        h = inp["hidden"].double().requires_grad_(True)
        w = inp["weight"].double().requires_grad_(True)
        logp, ent = reference.token_logprobs(h @ w.T, inp["targets"], temperature=tau,
                                             with_entropy=True)
        leaves = {"grad_slice": w, "grad_hidden": h}
        dim = 0
    ((logp * inp["g_logp"]).sum() + (ent * inp["g_entropy"]).sum()).backward()
    tol = 1e-5 if case["dtype"] == torch.float32 else 2e-2
    torch.testing.assert_close(got[0]["logp"].double(), logp.detach(), rtol=tol, atol=1e-5)
    torch.testing.assert_close(got[0]["entropy"].double(), ent.detach(), rtol=tol, atol=1e-5)
    grad = torch.cat([r["grad_slice"] for r in got], dim=dim)
    assert_close_scaled(grad.float(), leaves["grad_slice"].grad, rtol=tol, atol_scale=tol,
                        floor=1e-7)
    if "grad_hidden" in leaves:
        for r in got:
            assert_close_scaled(r["grad_hidden"], leaves["grad_hidden"].grad, rtol=tol,
                                atol_scale=tol, floor=1e-7)


def test_dtensor_logits(launched):
    """Logits as a DTensor sharded on the vocabulary: the loss of the whole vocabulary, and the
    gradient of the whole logits once the shards' gradients are put together."""
    world, ranks = launched
    inp = case_inputs(CASES[0])
    leaf = inp["logits"].clone().requires_grad_(True)
    loss, metrics = psft_ext.psft_loss(leaf, inp["targets"], inp["old_logprobs"],
                                       advantages=inp["advantages"], return_metrics=True)
    loss.backward()
    for r in ranks:
        got = r["dtensor"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(got["metrics"], torch.stack(list(metrics)), rtol=2e-6,
                                   atol=1e-6)
        assert_close_scaled(got["grad"], leaf.grad, rtol=1e-5, atol_scale=1e-5, floor=1e-9)


def test_errors_on_every_rank(launched):
    world, ranks = launched
    errors = [r["errors"] for r in ranks]
    for name, pattern in (("rows", "disagree on the number of rows"),
                          ("targets", "hold different targets"),
                          ("range", f"target id {4 * world + 1} at position 3 is out of range"),
                          ("linear_range", f"target id {4 * world + 1} at position 3")):
        messages = [e[name] for e in errors]
        assert all(m is not None and pattern in m for m in messages), (name, messages)
        assert len(set(messages)) == 1, (name, messages)
    assert all(e["after"] is None for e in errors)
