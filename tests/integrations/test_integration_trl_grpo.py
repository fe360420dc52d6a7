"""psft_ext.integrations.trl_grpo: TRL's GRPO trainer with its per-token log-probs and entropies
from psft_ext's fused linear kernels (tiny Llama, CPU), against the trainer's own computation."""

import pytest

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import torch  # noqa: E402

from integration_helpers import (  # noqa: E402
    max_param_diff,
    one_thread,  # noqa: F401  (autouse fixture)
    params_of,
    prompt_completion_dataset,
    tiny_model,
    train_logs,
    word_tokenizer,
)
from psft_ext.integrations import trl_grpo  # noqa: E402
from psft_ext.integrations.trl_grpo import FusedGRPOTrainer, fused_lm_head  # noqa: E402

from conftest import assert_close_scaled, generator  # noqa: E402


def reward_length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def grpo_args(output_dir, **overrides):
    kwargs = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True,
                  save_strategy="no", logging_steps=1, seed=0, bf16=False,
                  gradient_checkpointing=False, per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, max_steps=3, learning_rate=1e-3,
                  lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0,
                  entropy_coef=0.01, beta=0.04, temperature=0.8)
    kwargs.update(overrides)
    return trl.GRPOConfig(**kwargs)


def make_trainer(cls, tmp_path, **overrides):
    """A trainer of a tiny Llama saved to disk (with beta > 0, TRL loads the reference model from
    the policy's path)."""
    path = tmp_path / "model"
    if not path.exists():
        tiny_model(seed=2).save_pretrained(path)
    data = prompt_completion_dataset(16).remove_columns("completion")
    return cls(model=str(path), reward_funcs=reward_length,
               args=grpo_args(tmp_path, **overrides), train_dataset=data,
               processing_class=word_tokenizer())


def test_per_token_logps_and_entropies_match(tmp_path, monkeypatch):
    """The trainer's method on the same batch: values and gradients of the log-probs and the
    entropies equal TRL's own; psft_ext ran (spied)."""
    trainer = make_trainer(FusedGRPOTrainer, tmp_path)
    model = trainer.model
    g = generator(4)
    ids = torch.randint(7, 100, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    g_logp, g_ent = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    calls = []
    fused = trl_grpo.linear_token_logprobs
    monkeypatch.setattr(trl_grpo, "linear_token_logprobs",
                        lambda *a, **k: calls.append(k["temperature"]) or fused(*a, **k))
    results = []
    for use_psft in (False, True):
        model.zero_grad()
        call = (FusedGRPOTrainer._get_per_token_logps_and_entropies if use_psft
                else trl.GRPOTrainer._get_per_token_logps_and_entropies)
        logps, ents, _ = call(trainer, model, ids, mask, 5, compute_entropy=True)
        ((logps * g_logp).sum() + (ents * g_ent).sum()).backward()
        results.append((logps.detach(), ents.detach(),
                        *(p.grad.clone() for p in model.parameters())))
    assert calls == [pytest.approx(0.8)]
    for i, (a, b) in enumerate(zip(*results)):
        assert_close_scaled(a, b, rtol=1e-5, atol_scale=2e-5, floor=1e-7, msg=str(i))


def test_training_matches_grpo_trainer(tmp_path):
    """A few GRPO steps (entropy bonus and KL to the reference model on): the same losses,
    metrics and weights as TRL's own trainer."""
    runs = []
    for cls in (trl.GRPOTrainer, FusedGRPOTrainer):
        torch.manual_seed(0)
        trainer = make_trainer(cls, tmp_path / cls.__name__)
        trainer.train()
        runs.append((train_logs(trainer), params_of(trainer.model)))
    (logs_a, params_a), (logs_b, params_b) = runs
    assert len(logs_a) == len(logs_b) == 3
    for a, b in zip(logs_a, logs_b):
        for key in ("loss", "entropy", "kl", "reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert max_param_diff(params_a, params_b) < 1e-5


def test_unserved_calls_go_to_trl():
    """Softcapped logits are TRL's function's to compute."""
    h = torch.randn(5, 8)
    w = torch.randn(13, 8)
    t = torch.randint(0, 13, (5,))
    with fused_lm_head():
        ours = trl.trainer.utils._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096, None,
                                                                1.0, ("log_probs",))
        capped = trl.trainer.utils._ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 4096, 30.0,
                                                                  1.0, ("log_probs",))
    assert trl.trainer.utils._ChunkedLogProbFunction is not trl_grpo.FusedLogProbFunction
    expected = torch.log_softmax(h @ w.T, -1).gather(-1, t[:, None])[:, 0]
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-5)
    capped_ref = torch.log_softmax(30.0 * torch.tanh(h @ w.T / 30.0), -1).gather(-1, t[:, None])
    torch.testing.assert_close(capped[0], capped_ref[:, 0], rtol=1e-4, atol=1e-4)
