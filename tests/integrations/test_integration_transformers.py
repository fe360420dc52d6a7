"""PSFTTrainer (psft_ext.integrations.transformers) on tiny Llama / Qwen2 models, CPU."""

import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from integration_helpers import (  # noqa: E402
    TokenDataset,
    max_param_diff,
    one_thread,  # noqa: F401  (autouse fixture)
    pad_collate,
    params_of,
    psft_args,
    spy_accumulate_float32,
    tiny_model,
    train_logs,
)
from psft_ext.integrations.causal_lm import CausalLMPSFT  # noqa: E402
from psft_ext.integrations.old_policy import OLD_LOGPROBS_KEY, compute_old_logprobs  # noqa: E402
from psft_ext.integrations.transformers import (  # noqa: E402
    METRIC_NAMES,
    PSFTConfig,
    PSFTTrainer,
    old_policy_file,
)


class RecordingTrainer(PSFTTrainer):
    """Records what each optimizer step was given and the weights at each step's start."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []
        self.old_passes = 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self.steps.append({"batches": batches, "num_items": num_items,
                               "weights": params_of(self.model)})
        return batches, num_items

    def _psft_old_logprobs(self, batch):
        self.old_passes += 1
        return super()._psft_old_logprobs(batch)


def make_trainer(tmp_path, cls=PSFTTrainer, model=None, dataset=None, eval_dataset=None,
                 **overrides):
    return cls(model=tiny_model() if model is None else model,
               args=psft_args(tmp_path, **overrides),
               train_dataset=TokenDataset() if dataset is None else dataset,
               eval_dataset=eval_dataset, data_collator=pad_collate)


# --------------------------------------------------------------------------------------------
# K = 1 is SFT
# --------------------------------------------------------------------------------------------


def test_one_step_per_old_policy_is_sft(tmp_path):
    """steps_per_old_policy=1 trains step for step like the plain Trainer with the model's own
    cross-entropy: same weights after every step, the logged nll is SFT's loss, no no-grad pass."""
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                  learning_rate=3e-2, optim="sgd")

    psft = make_trainer(tmp_path / "psft", cls=RecordingTrainer, steps_per_old_policy=1, **common)
    psft_weights = []
    psft.add_callback(_WeightsAtStepEnd(psft_weights))
    psft.train()

    sft_args = TrainingArguments(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to=[],
                                 disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
                                 data_seed=0, lr_scheduler_type="constant", warmup_steps=0,
                                 dataloader_num_workers=0, **common)
    sft = Trainer(model=tiny_model(), args=sft_args, train_dataset=TokenDataset(),
                  data_collator=pad_collate)
    sft_weights = []
    sft.add_callback(_WeightsAtStepEnd(sft_weights))
    sft.train()

    assert psft.old_passes == 0
    assert all(OLD_LOGPROBS_KEY not in b for step in psft.steps for b in step["batches"])
    assert len(psft_weights) == len(sft_weights) == 4
    for step, (a, b) in enumerate(zip(psft_weights, sft_weights)):
        assert max_param_diff(a, b) < 1e-6, f"step {step + 1}"
    for p_log, s_log in zip(train_logs(psft), train_logs(sft)):
        assert p_log["nll"] == pytest.approx(s_log["loss"], rel=1e-5)
        assert p_log["ratio_mean"] == 1.0 and p_log["clip_fraction"] == 0.0
        assert p_log["approx_kl"] == 0.0
        assert p_log["loss"] == pytest.approx(-1.0)


class _WeightsAtStepEnd(TrainerCallback):
    def __init__(self, out):
        self.out = out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.out.append(params_of(model))


# --------------------------------------------------------------------------------------------
# Group semantics
# --------------------------------------------------------------------------------------------


def test_group_semantics(tmp_path):
    """Old log-probs come from the weights at the start of their group (fixed within it,
    refreshed at the next start); the first step of a group has none (ratio 1); with a large
    learning rate the clip acts from the second step of a group on."""
    k, steps = 3, 7  # groups: steps 1-3, 4-6, 7
    trainer = make_trainer(tmp_path, cls=RecordingTrainer, steps_per_old_policy=k,
                           max_steps=steps, learning_rate=5e-2, gradient_accumulation_steps=2)
    trainer.train()
    assert len(trainer.steps) == steps
    # One no-grad pass per micro-batch of the steps after the first of each group.
    assert trainer.old_passes == 2 * (2 * (k - 1))

    scratch = tiny_model()
    head = CausalLMPSFT()
    for i, step in enumerate(trainer.steps):
        start = i - i % k
        olds = [b.get(OLD_LOGPROBS_KEY) for b in step["batches"]]
        if i % k == 0:
            assert all(o is None for o in olds), f"step {i + 1} starts a group"
            continue
        scratch.load_state_dict(trainer.steps[start]["weights"])
        for b, old in zip(step["batches"], olds):
            expected = compute_old_logprobs(scratch, b, head=head)
            assert torch.equal(old, expected), f"step {i + 1}: old log-probs of the group start"
        # Not the weights of this step's start: the old policy is not refreshed within a group.
        scratch.load_state_dict(step["weights"])
        current = compute_old_logprobs(scratch, step["batches"][0], head=head)
        assert not torch.equal(olds[0], current)

    logs = train_logs(trainer)
    for i, entry in enumerate(logs):
        if i % k == 0:
            assert entry["ratio_mean"] == 1.0 and entry["clip_fraction"] == 0.0
        else:
            assert entry["clip_fraction"] > 0.0, f"step {i + 1}: the clip acts"
            assert entry["ratio_mean"] != 1.0


def test_zero_learning_rate_keeps_ratio_one(tmp_path):
    """The old pass and the training forward compute the same log-probs: with the weights
    unchanged (lr 0) every ratio is exactly 1 (no spurious clipping from a path mismatch)."""
    trainer = make_trainer(tmp_path, steps_per_old_policy=4, max_steps=4, learning_rate=0.0)
    trainer.train()
    for entry in train_logs(trainer):
        assert entry["ratio_mean"] == 1.0
        assert entry["clip_fraction"] == 0.0
        assert entry["approx_kl"] == 0.0


def test_groups_end_with_the_epoch(tmp_path):
    """A group never spans two epochs (its batches are pulled ahead from the epoch's iterator):
    6 steps per epoch with K = 4 make groups of steps 1-4, 5-6, then 7-8 in the next epoch."""
    trainer = make_trainer(tmp_path, cls=RecordingTrainer, dataset=TokenDataset(n=12),
                           per_device_train_batch_size=2, gradient_accumulation_steps=1,
                           steps_per_old_policy=4, max_steps=8)
    trainer.train()
    starts = [OLD_LOGPROBS_KEY not in step["batches"][0] for step in trainer.steps]
    assert starts == [True, False, False, False, True, False, True, False]
    ratios = [entry["ratio_mean"] for entry in train_logs(trainer)]
    assert ratios[0] == ratios[4] == ratios[6] == 1.0


# --------------------------------------------------------------------------------------------
# Gradient accumulation, fused vs logits, models
# --------------------------------------------------------------------------------------------


def test_gradient_accumulation_equivalence(tmp_path):
    """GA 4 x batch 1 and GA 1 x batch 4 make the same updates (token mean over the step,
    padding and masked labels), old-policy groups included."""
    common = dict(steps_per_old_policy=2, max_steps=4, learning_rate=3.0, optim="sgd",
                  train_sampling_strategy="sequential")
    a = make_trainer(tmp_path / "a", per_device_train_batch_size=1,
                     gradient_accumulation_steps=4, **common)
    a.train()
    b = make_trainer(tmp_path / "b", per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, **common)
    b.train()
    assert max_param_diff(params_of(a.model), params_of(b.model)) < 1e-5
    for la, lb in zip(train_logs(a), train_logs(b)):
        for name in ("loss", *METRIC_NAMES):
            assert la[name] == pytest.approx(lb[name], rel=1e-4, abs=1e-6), name
    assert any(entry["clip_fraction"] > 0 for entry in train_logs(a))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_linear_matches_logits_path(tmp_path, kind):
    common = dict(steps_per_old_policy=2, max_steps=4, learning_rate=5e-2)
    fused = make_trainer(tmp_path / "fused", model=tiny_model(kind), use_fused_linear=True,
                         **common)
    fused.train()
    plain = make_trainer(tmp_path / "plain", model=tiny_model(kind), use_fused_linear=False,
                         **common)
    plain.train()
    assert fused.psft_head.uses_fused(fused.model)
    assert not plain.psft_head.uses_fused(plain.model)
    assert max_param_diff(params_of(fused.model), params_of(plain.model)) < 1e-6
    for lf, lp in zip(train_logs(fused), train_logs(plain)):
        for name in ("loss", *METRIC_NAMES):
            assert lf[name] == pytest.approx(lp[name], rel=1e-5, abs=1e-7), name


def test_torch_compile_keeps_the_fused_path(tmp_path):
    """torch_compile=True: accelerate's unwrap keeps the compile wrapper, whose forward has none
    of the model's arguments; the trainer looks through it and stays on the fused path (it fell
    back to the full logits, with a warning, for every training micro-batch)."""
    common = dict(steps_per_old_policy=2, max_steps=4, learning_rate=5e-2)
    compiled = make_trainer(tmp_path / "compiled", torch_compile=True,
                            torch_compile_backend="eager", **common)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="psft_ext")
        compiled.train()
    assert compiled.psft_head.uses_fused(compiled.model)
    eager = make_trainer(tmp_path / "eager", **common)
    eager.train()
    assert max_param_diff(params_of(compiled.model), params_of(eager.model)) < 1e-4
    for lc, le in zip(train_logs(compiled), train_logs(eager)):
        for name in ("loss", *METRIC_NAMES):
            assert lc[name] == pytest.approx(le[name], rel=1e-4, abs=1e-6), name


def test_old_logprobs_keep_float32_under_deepspeed_input_cast(tmp_path, monkeypatch):
    """Under DeepSpeed the Trainer casts every floating input to the engine's dtype (simulated:
    its dtype lookup); the old log-probs stay float32 and exact."""
    from types import SimpleNamespace
    trainer = make_trainer(tmp_path)
    engine = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    monkeypatch.setattr(trainer, "accelerator",
                        SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=engine)))
    old = -torch.rand(2, 6, dtype=torch.float32) * 9.0
    batch = {"input_ids": torch.ones(2, 6, dtype=torch.long), "weights": torch.rand(2, 6),
             OLD_LOGPROBS_KEY: old}
    prepared = trainer._prepare_inputs(batch)
    assert prepared["weights"].dtype == torch.bfloat16  # the cast does apply to the rest
    assert prepared[OLD_LOGPROBS_KEY].dtype == torch.float32
    assert torch.equal(prepared[OLD_LOGPROBS_KEY], old)
    assert set(batch) == {"input_ids", "weights", OLD_LOGPROBS_KEY}  # the caller's batch intact


def test_known_logit_transform_falls_back_to_logits(tmp_path):
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0  # as Gemma's configs declare it
    trainer = make_trainer(tmp_path, model=model, max_steps=2)
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        trainer.train()
    assert not trainer.psft_head.uses_fused(trainer.model)


# --------------------------------------------------------------------------------------------
# Metrics and evaluation
# --------------------------------------------------------------------------------------------


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_reach_the_reporting_callbacks(tmp_path):
    """nll, entropy, clip_fraction, approx_kl and ratio_mean reach on_log (what the TensorBoard
    and W&B integrations consume), as token means over the logging interval."""
    recorder = _Logs()
    trainer = make_trainer(tmp_path, steps_per_old_policy=2, max_steps=4, logging_steps=2,
                           learning_rate=5e-2, eval_strategy="steps", eval_steps=4,
                           per_device_eval_batch_size=4, eval_dataset=TokenDataset(n=8, seed=5))
    trainer.add_callback(recorder)
    trainer.train()
    train = [entry for entry in recorder.logs if "loss" in entry]
    assert len(train) == 2
    for entry in train:
        for name in METRIC_NAMES:
            assert name in entry and isinstance(entry[name], float)
        assert 0.0 <= entry["clip_fraction"] <= 1.0
        assert entry["nll"] > 0 and entry["entropy"] > 0 and entry["ratio_mean"] > 0
    # Evaluation reports SFT's loss (token-mean negative log-likelihood).
    evals = [entry for entry in recorder.logs if "eval_loss" in entry]
    assert len(evals) == 1 and 0 < evals[0]["eval_loss"] < 10


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_mid_group_equals_uninterrupted(tmp_path):
    """2 groups of K=4 steps; stopping after step K + 2 (two steps of the group left) and
    resuming from that checkpoint ends with the same weights as the uninterrupted run."""
    k = 4
    common = dict(steps_per_old_policy=k, max_steps=2 * k, learning_rate=5e-2)

    full = make_trainer(tmp_path / "full", **common)
    full.train()

    first = make_trainer(tmp_path / "run", save_strategy="steps", save_steps=k + 2, **common)
    first.add_callback(_StopAt(k + 2))
    first.train()
    assert first.state.global_step == k + 2
    checkpoint = tmp_path / "run" / f"checkpoint-{k + 2}"
    cache = torch.load(checkpoint / old_policy_file(0), weights_only=True)
    assert len(cache["old_logprobs"]) == 2 and cache["index_in_group"] == 2
    assert all(o is not None for step in cache["old_logprobs"] for o in step)

    resumed = make_trainer(tmp_path / "run", save_strategy="no", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cache does not match" fallback
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 * k
    a, b = params_of(full.model), params_of(resumed.model)
    assert all(torch.equal(a[name], b[name]) for name in a), max_param_diff(a, b)
    # The resumed steps trained against the saved old policy (clipping and all).
    full_logs, resumed_logs = train_logs(full), train_logs(resumed)
    for name in METRIC_NAMES:
        assert resumed_logs[-1][name] == pytest.approx(full_logs[-1][name], rel=1e-6, abs=1e-9)


def test_resume_without_cache_starts_a_new_group(tmp_path):
    common = dict(steps_per_old_policy=4, max_steps=4)
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=2, **common)
    first.add_callback(_StopAt(2))
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    os.remove(checkpoint / old_policy_file(0))
    resumed = make_trainer(tmp_path, **common)
    with pytest.warns(UserWarning, match="holds no old-policy cache"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    # The first resumed step starts a group: ratio 1.
    assert train_logs(resumed)[0]["ratio_mean"] == 1.0


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def test_config_fields_and_validation(tmp_path):
    args = PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (args.clip_low, args.clip_high, args.steps_per_old_policy) == (0.2, 0.28, 8)
    assert args.use_fused_linear is True and args.fused_linear_chunk_size is None
    assert args.fused_linear_accumulate_float32 is True
    assert isinstance(args, transformers.TrainingArguments)
    with pytest.raises(ValueError, match="steps_per_old_policy"):
        PSFTConfig(output_dir=str(tmp_path), use_cpu=True, steps_per_old_policy=0)
    with pytest.raises(ValueError, match="clip_low"):
        PSFTConfig(output_dir=str(tmp_path), use_cpu=True, clip_low=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_trainer(tmp_path, label_smoothing_factor=0.1)


@pytest.mark.parametrize("bad", ["false", 0, None])
def test_fused_linear_accumulate_float32_must_be_a_bool(tmp_path, bad):
    with pytest.raises(TypeError, match="fused_linear_accumulate_float32 must be a bool"):
        PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                   fused_linear_accumulate_float32=bad)


def test_fused_linear_accumulate_float32_round_trips(tmp_path):
    """The field goes through the command line, the JSON of the arguments and back."""
    parser = transformers.HfArgumentParser(PSFTConfig)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    for extra, want in (([], True), (["--no_fused_linear_accumulate_float32"], False),
                        (["--fused_linear_accumulate_float32", "false"], False),
                        (["--fused_linear_accumulate_float32", "true"], True)):
        (args,) = parser.parse_args_into_dataclasses(base + extra)
        assert args.fused_linear_accumulate_float32 is want, extra
    args = PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                      fused_linear_accumulate_float32=False)
    saved = json.loads(args.to_json_string())
    assert saved["fused_linear_accumulate_float32"] is False
    (loaded,) = parser.parse_dict(saved)
    assert loaded.fused_linear_accumulate_float32 is False


@pytest.mark.parametrize("accumulate", [True, False])
def test_fused_linear_accumulate_float32_reaches_the_loss(tmp_path, monkeypatch, accumulate):
    seen = spy_accumulate_float32(monkeypatch)
    trainer = make_trainer(tmp_path, max_steps=1, fused_linear_accumulate_float32=accumulate)
    assert trainer.psft_head.accumulate_float32 is accumulate
    trainer.train()
    assert trainer.psft_head.uses_fused(trainer.model)
    assert seen and all(value is accumulate for value in seen), seen
