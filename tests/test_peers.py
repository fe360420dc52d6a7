"""The fused loss against verl 0.9's own policy losses (core_algos: compute_policy_loss_vanilla and
compute_policy_loss_gspo, agg_loss, kl_penalty "low_var_kl", the actor's entropy bonus), run on
float64 log-probs from the same logits: the loss, the logits' gradient (autograd through verl's
computation) and verl's metrics. Skipped where verl is not installed (CI installs it)."""

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
ActorConfig = pytest.importorskip("verl.workers.config").ActorConfig

import psft_ext  # noqa: E402
from psft_ext import reference  # noqa: E402

from conftest import assert_close_scaled, generator, make_case  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _config(dual_clip):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=dual_clip)


def verl_actor_loss(logits64, case, *, policy, agg, dual_clip=3.0, rollout_is_weights=None,
                    entropy_coef=0.0, kl_coef=0.0, ref_logprobs=None):
    """verl's actor loss for one micro-batch (dp_size 1), as dp_actor composes it: the policy
    loss, minus entropy_coef times the aggregated entropy, plus kl_coef times the aggregated
    low_var_kl."""
    mask = case.valid.to(torch.float64)
    log_prob = reference.token_logprobs(logits64, case.targets)
    adv = case.advantages.to(torch.float64)
    loss_fn = core_algos.get_policy_loss_fn(policy)
    pg_loss, metrics = loss_fn(case.old_logprobs.double(), log_prob, adv, mask,
                               loss_agg_mode=agg, config=_config(dual_clip),
                               rollout_is_weights=rollout_is_weights)
    loss = pg_loss
    if entropy_coef:
        entropy = verl_F.entropy_from_logits(logits64)
        loss = loss - entropy_coef * core_algos.agg_loss(entropy, mask, agg)
    if kl_coef:
        kld = core_algos.kl_penalty(log_prob, ref_logprobs.double(), "low_var_kl")
        loss = loss + kl_coef * core_algos.agg_loss(kld, mask, agg)
    return loss, metrics


def _case(seed, policy):
    case = make_case((4, 9), 37, torch.float32, "cpu", seed=seed, advantages="row",
                     dual_clip=None if policy == "gspo" else 3.0)
    case.targets[3, :] = -100  # a sequence without tokens
    return case


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("policy", ["vanilla", "gspo"])
@pytest.mark.parametrize("terms", ["pg", "is", "entropy_kl"])
def test_matches_verl_policy_losses(policy, agg, terms):
    case = _case(AGG_MODES.index(agg) + 7 * len(terms), policy)
    g = generator(99)
    kwargs, extra = {}, {}
    if terms == "is":
        extra["rollout_is_weights"] = 0.5 + torch.rand(case.targets.shape, generator=g)
    if terms == "entropy_kl":
        kwargs = dict(entropy_coef=0.03, kl_coef=0.2)
        extra["ref_logprobs"] = case.old_logprobs + 0.2 * torch.randn(case.targets.shape,
                                                                      generator=g)
    x64 = case.reference_logits()
    theirs, metrics = verl_actor_loss(
        x64, case, policy=policy, agg=agg,
        rollout_is_weights=None if "rollout_is_weights" not in extra
        else extra["rollout_is_weights"].double(),
        ref_logprobs=extra.get("ref_logprobs"), **kwargs)
    theirs.backward()

    options = dict(loss_agg_mode=agg, **kwargs)
    if policy == "gspo":
        options["importance_sampling"] = "sequence"
    else:
        options["dual_clip"] = 3.0  # verl's vanilla loss always dual-clips (clip_ratio_c)
    x = case.fused_logits()
    ours, m = psft_ext.psft_loss(x, case.targets, case.old_logprobs, advantages=case.advantages,
                                 return_metrics=True, **options, **extra)
    ours.backward()
    torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert_close_scaled(x.grad, x64.grad, rtol=1e-5, atol_scale=1e-5, floor=1e-9)
    assert (m.clip_fraction_high + m.clip_fraction_low).item() == pytest.approx(
        metrics["actor/pg_clipfrac"], abs=1e-6)
    if policy == "vanilla":
        assert m.dual_clip_fraction.item() == pytest.approx(metrics["actor/pg_clipfrac_lower"],
                                                            abs=1e-6)
        assert m.approx_kl.item() == pytest.approx(metrics["actor/ppo_kl"], rel=1e-5, abs=1e-6)


def test_linear_form_matches_verl():
    """The fused linear form with GSPO, sequence aggregation and the entropy / KL terms, against
    verl's actor loss on the float64 logits of the same hidden states and head."""
    g = generator(5)
    h = torch.randn(3, 8, 16, generator=g)
    w = torch.randn(29, 16, generator=g) * 0.5
    logits = h @ w.T
    case = make_case(logits=logits, seed=5, advantages="row")
    ref_lp = case.old_logprobs + 0.1
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    case64 = case
    theirs, _ = verl_actor_loss(h64 @ w64.T, case64, policy="gspo", agg="seq-mean-token-mean",
                                entropy_coef=0.01, kl_coef=0.1, ref_logprobs=ref_lp)
    theirs.backward()
    hf, wf = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ours = psft_ext.linear_psft_loss(hf, wf, case.targets, case.old_logprobs,
                                     advantages=case.advantages, importance_sampling="sequence",
                                     loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01,
                                     kl_coef=0.1, ref_logprobs=ref_lp, chunk_size=5)
    ours.backward()
    torch.testing.assert_close(ours.double(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert_close_scaled(hf.grad, h64.grad, rtol=1e-4, atol_scale=1e-5, floor=1e-8)
    assert_close_scaled(wf.grad, w64.grad, rtol=1e-4, atol_scale=1e-5, floor=1e-8)
