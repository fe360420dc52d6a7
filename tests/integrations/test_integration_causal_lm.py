"""CausalLMPSFT (the PSFT loss of a Hugging Face causal LM: fused linear path, fallbacks, packed
sequences) and the plain-loop helper on tiny Llama / Qwen2 models."""

import pytest
import torch

pytest.importorskip("transformers")

import psft_ext  # noqa: E402
from integration_helpers import (  # noqa: E402
    TokenDataset,
    pad_collate,
    spy_accumulate_float32,
    tiny_model,
)
from integration_helpers import one_thread  # noqa: E402,F401  (autouse fixture)
from psft_ext import reference  # noqa: E402
from psft_ext.integrations.causal_lm import CausalLMPSFT, batch_targets, count_targets  # noqa: E402
from psft_ext.integrations.old_policy import OldPolicyGroups, compute_old_logprobs  # noqa: E402


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(head, model, batch, old=None, num_items=None):
    model.zero_grad()
    loss, metrics = head.loss(model, batch, old, num_items=num_items)
    loss.backward()
    return loss.detach(), metrics, _grads(model)


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_fused_path_equals_logits_path(kind, tied):
    model = tiny_model(kind, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = pad_collate([TokenDataset()[i] for i in range(4)])
    fused, plain = CausalLMPSFT(), CausalLMPSFT(use_fused_linear=False)
    # Old log-probs off by up to +-0.5: ratios from 0.6 to 1.65, clipped on both sides.
    g = torch.Generator().manual_seed(3)
    noise = torch.rand(batch["labels"].shape, generator=g) - 0.5
    old = compute_old_logprobs(model, batch, head=plain) + noise
    lf, mf, gf = _loss_and_grads(fused, model, batch, old)
    lp, mp, gp = _loss_and_grads(plain, model, batch, old)
    assert fused.uses_fused(model) and not plain.uses_fused(model)
    assert 0 < mf.clip_fraction < 1
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-7)
    for name in psft_ext.PSFTMetrics._fields:
        torch.testing.assert_close(getattr(mf, name), getattr(mp, name), rtol=1e-6, atol=1e-7)
    for name in gp:
        torch.testing.assert_close(gf[name], gp[name], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(compute_old_logprobs(model, batch, head=fused),
                               compute_old_logprobs(model, batch, head=plain),
                               rtol=1e-6, atol=1e-6)


def test_accumulate_float32_reaches_linear_psft_loss(monkeypatch):
    seen = spy_accumulate_float32(monkeypatch)
    model = tiny_model()
    batch = pad_collate([TokenDataset()[i] for i in range(2)])
    for head in (CausalLMPSFT(), CausalLMPSFT(accumulate_float32=False),
                 CausalLMPSFT(accumulate_float32=True)):
        head.loss(model, batch)[0].backward()
        assert head.uses_fused(model)
    assert seen == [True, False, True]
    # The token log-probs (no gradient, so nothing to accumulate) do not go through it.
    CausalLMPSFT(accumulate_float32=False).token_logprobs(model, batch)
    assert len(seen) == 3


def test_bf16_lm_head_gradient_with_and_without_float32_accumulation():
    """bfloat16 model, several row chunks: both accumulations give the LM head's gradient of a
    float64 reference (on the model's own final hidden states) within bfloat16 tolerance, the
    float32 one more closely; accumulate_float32=False also matches the logits path. The option
    changes the LM head's gradient and nothing else."""
    model = tiny_model().to(torch.bfloat16)
    batch = pad_collate([TokenDataset()[i] for i in range(4)])
    targets = batch_targets(batch)
    # Log-ratios of +-0.1 and +-0.5: both clipped and unclipped tokens, all far enough from the
    # clip bounds that bfloat16 rounding of the logits does not move a token across one.
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([-0.5, -0.1, 0.1, 0.5])[torch.randint(0, 4, targets.shape, generator=g)]
    old = compute_old_logprobs(model, batch, head=CausalLMPSFT()) + offsets
    grads = {}
    for accumulate in (True, False):
        head = CausalLMPSFT(chunk_size=4, accumulate_float32=accumulate)  # > 10 row chunks
        _, metrics, grads[accumulate] = _loss_and_grads(head, model, batch, old)
        assert head.uses_fused(model) and 0 < metrics.clip_fraction < 1
    _, _, plain = _loss_and_grads(CausalLMPSFT(use_fused_linear=False), model, batch, old)

    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state
    weight = model.lm_head.weight.detach().double().requires_grad_()
    reference.psft_loss(hidden.double() @ weight.T, targets, old.double()).backward()
    want = weight.grad
    tol = dict(rtol=2e-2, atol=2e-2 * want.abs().max().item())
    errors = {}
    for accumulate, got in grads.items():
        got = got["lm_head.weight"]
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, **tol)
        errors[accumulate] = ((got.double() - want).norm() / want.norm()).item()
    assert errors[True] < errors[False]
    torch.testing.assert_close(grads[False]["lm_head.weight"].double(),
                               plain["lm_head.weight"].double(), **tol)
    torch.testing.assert_close(grads[True]["lm_head.weight"], plain["lm_head.weight"],
                               rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert not torch.equal(grads[True]["lm_head.weight"], grads[False]["lm_head.weight"])
    for name in grads[True]:
        if name != "lm_head.weight":
            assert torch.equal(grads[True][name], grads[False][name]), name


def test_fused_loss_is_not_joined_to_the_output_outside_static_ddp():
    """The exact-zero join to the model's output (which DDP's static graph needs) would send a
    zero gradient back through the LM head: a pass over its V x H weight gradient per
    micro-batch. Outside a static-graph DDP there is none: the head's weight gradient comes from
    the fused loss alone, and the output is not kept for the loss."""
    model = tiny_model()
    batch = pad_collate([TokenDataset()[i] for i in range(2)])
    head = CausalLMPSFT()
    inputs = head.forward(model, batch)
    assert inputs.hidden is not None and inputs.output is None
    calls = []
    handle = model.lm_head.register_full_backward_hook(lambda *a: calls.append(1))
    try:
        loss, _ = head.loss(model, batch)
        loss.backward()
    finally:
        handle.remove()
    assert calls == []  # no gradient reached the head's own forward


@pytest.mark.parametrize("bad", ["false", 0, 1, None])
def test_accumulate_float32_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="accumulate_float32 must be a bool"):
        CausalLMPSFT(accumulate_float32=bad)


def test_sft_gradient_without_old_logprobs():
    """old_logprobs=None: the gradient is the cross-entropy's (the model's own loss)."""
    model = tiny_model()
    batch = pad_collate([TokenDataset()[i] for i in range(4)])
    _, metrics, grads = _loss_and_grads(CausalLMPSFT(), model, batch)
    model.zero_grad()
    out = model(**batch)  # transformers' ForCausalLMLoss: token mean over the shifted labels
    out.loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(metrics.nll, out.loss.detach(), rtol=1e-6, atol=1e-6)


class ScaledLogits(torch.nn.Module):
    """A causal LM wrapper whose forward scales the logits: a transform the config does not
    declare, which only the first call's check can find."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.base_model = inner.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, use_cache=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         logits_to_keep=logits_to_keep, use_cache=use_cache)
        out.logits = out.logits * 0.5
        return out


def test_unknown_logit_transform_is_detected():
    model = ScaledLogits(tiny_model())
    batch = pad_collate([TokenDataset()[i] for i in range(2)])
    head = CausalLMPSFT()
    with pytest.warns(UserWarning, match="differ from its LM head's output"):
        lf, mf, gf = _loss_and_grads(head, model, batch)
    assert not head.uses_fused(model)
    lp, mp, gp = _loss_and_grads(CausalLMPSFT(use_fused_linear=False), model, batch)
    assert torch.equal(mf.nll, mp.nll)
    assert all(torch.equal(gf[k], gp[k]) for k in gp)


def test_packed_sequences_equal_padded():
    """Two sequences packed in one row (position ids restarting, first label of each masked, no
    attention mask) give the loss and gradients of the same two sequences padded."""
    model = tiny_model()
    items = [TokenDataset()[i] for i in range(2)]
    padded = pad_collate(items)
    ids = torch.cat([f["input_ids"] for f in items])[None]
    labels = torch.cat([f["labels"] for f in items])[None].clone()
    position_ids = torch.cat([torch.arange(len(f["input_ids"])) for f in items])[None]
    labels[position_ids == 0] = -100  # no loss across the boundary
    packed = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    assert int(count_targets([packed])) == int(count_targets([padded]))
    head = CausalLMPSFT()
    old = compute_old_logprobs(model, padded, head=head)
    old_packed = torch.cat([old[i, :len(f["input_ids"])] for i, f in enumerate(items)])[None]
    old_packed = old_packed - 0.3 * (batch_targets(packed) != -100)  # some clipping
    old_padded = old - 0.3 * (batch_targets(padded) != -100)
    lp, mp, gp = _loss_and_grads(head, model, packed, old_packed)
    la, ma, ga = _loss_and_grads(head, model, padded, old_padded)
    torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mp.clip_fraction, ma.clip_fraction)
    assert mp.clip_fraction > 0
    for name in ga:
        torch.testing.assert_close(gp[name], ga[name], rtol=1e-4, atol=1e-6)


def test_plain_loop_one_step_per_group_is_sft():
    """The plain-loop helper with K = 1 makes exactly the updates of an SFT loop (same kernels,
    old_logprobs None), and with K = 2 the second step of each group is clipped."""
    data = [pad_collate([TokenDataset()[2 * i], TokenDataset()[2 * i + 1]]) for i in range(8)]

    def train(k, psft):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=3.0)
        head = CausalLMPSFT()
        groups = OldPolicyGroups(lambda b: compute_old_logprobs(model, b, head=head), k)
        clip = []
        for step in groups.steps(data, micro_batches_per_step=2):
            n = count_targets(step.batches)
            for mb in step:
                if psft:
                    loss, metrics = head.loss(model, mb.batch, mb.old_logprobs, num_items=n)
                    clip.append((step.index_in_group, float(metrics.clip_fraction)))
                else:
                    logits = model(input_ids=mb.batch["input_ids"],
                                   attention_mask=mb.batch["attention_mask"]).logits
                    targets = psft_ext.shift_labels(mb.batch["labels"])
                    loss = torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1), targets.flatten(), reduction="sum") / n
                loss.backward()
            opt.step()
            opt.zero_grad()
        return {k: v.detach() for k, v in model.named_parameters()}, clip

    sft, _ = train(1, psft=False)
    psft1, clip1 = train(1, psft=True)
    for name in sft:
        torch.testing.assert_close(psft1[name], sft[name], rtol=1e-4, atol=1e-5)
    assert all(c == 0.0 for _, c in clip1)
    _, clip2 = train(2, psft=True)
    assert all(c == 0.0 for i, c in clip2 if i == 0)
    assert any(c > 0.0 for i, c in clip2 if i == 1)
