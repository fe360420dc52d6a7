"""psft_ext.integrations.verl: FusedLinearForPPO against verl's own "torch" backend (values and
gradients), and use_psft_ext() through verl's actor forward
(dense_common.forward_with_torch_backend) on a tiny Llama."""

import pytest
import torch

verl_tf = pytest.importorskip("verl.utils.experimental.torch_functional")

from integration_helpers import one_thread, tiny_model  # noqa: E402,F401
from psft_ext.integrations import verl as psft_verl  # noqa: E402

from conftest import assert_close_scaled, generator  # noqa: E402


def _inputs(shape, vocab, hidden, dtype, seed=0):
    g = generator(seed)
    h = torch.randn(shape + (hidden,), generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.4).to(dtype)
    ids = torch.randint(0, vocab, shape, generator=g)
    return h, w, ids


def _run(module, h, w, ids, temperature, g_logp, g_ent):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logp, ent = module(h, w, ids, temperature)
    terms = []
    if g_logp is not None:
        terms.append((logp * g_logp).sum())
    if g_ent is not None:
        terms.append((ent.float() * g_ent).sum())
    sum(terms).backward()
    return logp, ent, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 11), (17,)], ids=["3d", "2d"])
@pytest.mark.parametrize("upstream", ["both", "logp", "entropy"])
def test_matches_verl_torch_backend(dtype, shape, upstream):
    h, w, ids = _inputs(shape, 53, 24, dtype, seed=len(shape))
    g = generator(7)
    g_logp = torch.randn(shape, generator=g) if upstream != "entropy" else None
    g_ent = torch.randn(shape, generator=g) if upstream != "logp" else None
    theirs = _run(verl_tf.FusedLinearForPPO(chunk_size=8), h, w, ids, 0.7, g_logp, g_ent)
    ours = _run(psft_verl.FusedLinearForPPO(chunk_size=8), h, w, ids, 0.7, g_logp, g_ent)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    assert ours[1].dtype == theirs[1].dtype == dtype
    assert ours[0].shape == theirs[0].shape == ids.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("log_probs", "entropy", "grad_hidden", "grad_weight"), ours, theirs):
        assert a.dtype == b.dtype, name
        assert_close_scaled(a.float(), b.float(), rtol=tol, atol_scale=tol, floor=1e-6, msg=name)


def test_constructor_like_verl():
    assert psft_verl.FusedLinearForPPO().chunk_size == 512
    psft_verl.FusedLinearForPPO(impl_backend="liger")
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        psft_verl.FusedLinearForPPO(impl_backend="triton")


def test_use_psft_ext_in_verls_actor_forward(monkeypatch):
    """verl's own actor forward, with the patch, runs psft_ext (spied) and gives verl's values
    and gradients; undo() restores verl's class."""
    from verl.models.transformers import dense_common

    calls = []
    fused = psft_verl.linear_token_logprobs
    monkeypatch.setattr(psft_verl, "linear_token_logprobs",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))

    original = verl_tf.FusedLinearForPPO
    ids = torch.randint(3, 128, (2, 9), generator=generator(3))
    results = []
    for patched in (False, True):
        model = tiny_model(seed=1)
        handle = psft_verl.use_psft_ext() if patched else None
        try:
            assert (verl_tf.FusedLinearForPPO is psft_verl.FusedLinearForPPO) == patched
            out = dense_common.forward_with_torch_backend(model, input_ids=ids, return_dict=True,
                                                          temperature=0.9)
            (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        finally:
            if handle is not None:
                handle.undo()
        assert len(calls) == int(patched)
        results.append((out.log_probs.detach(), out.entropy.detach(),
                        model.lm_head.weight.grad, model.model.embed_tokens.weight.grad))
    assert verl_tf.FusedLinearForPPO is original
    for a, b in zip(*results):
        assert_close_scaled(a, b, rtol=1e-5, atol_scale=1e-5, floor=1e-7)


def test_use_psft_ext_as_context_manager():
    original = verl_tf.FusedLinearForPPO
    with psft_verl.use_psft_ext():
        assert verl_tf.FusedLinearForPPO is psft_verl.FusedLinearForPPO
        with psft_verl.use_psft_ext():  # nested: a no-op handle
            pass
        assert verl_tf.FusedLinearForPPO is psft_verl.FusedLinearForPPO
    assert verl_tf.FusedLinearForPPO is original
