"""psft_ext.integrations.trl: PSFTTrainer as a drop-in for trl.SFTTrainer (tiny Llama, CPU)."""

import pytest

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from integration_helpers import (  # noqa: E402
    conversation_dataset,
    max_param_diff,
    one_thread,  # noqa: F401  (autouse fixture)
    params_of,
    prompt_completion_dataset,
    tiny_model,
    train_logs,
    word_tokenizer,
)
from psft_ext.integrations.old_policy import OLD_LOGPROBS_KEY  # noqa: E402
from psft_ext.integrations.transformers import METRIC_NAMES  # noqa: E402
from psft_ext.integrations.trl import PSFTConfig, PSFTTrainer  # noqa: E402

# Full precision and no recomputation on a tiny CPU model (TRL's defaults are bf16 and gradient
# checkpointing); sequential data so two runs see the same batches.
COMMON = dict(use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=1,
              seed=0, bf16=False, gradient_checkpointing=False, max_length=32,
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
              lr_scheduler_type="constant", warmup_steps=0, train_sampling_strategy="sequential",
              dataloader_num_workers=0)


class RecordingTrainer(PSFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.batches.append(batches)
        return batches, num_items


def test_config_is_an_sft_config(tmp_path):
    args = PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                      steps_per_old_policy=4, clip_high=0.3)
    assert isinstance(args, trl.SFTConfig)
    assert (args.steps_per_old_policy, args.clip_low, args.clip_high) == (4, 0.2, 0.3)
    assert args.fused_linear_accumulate_float32 is True
    off = PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                     fused_linear_accumulate_float32=False)
    assert off.fused_linear_accumulate_float32 is False
    with pytest.raises(TypeError, match="fused_linear_accumulate_float32"):
        PSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                   fused_linear_accumulate_float32="no")
    with pytest.raises(ValueError, match="loss_type"):
        PSFTTrainer(model=tiny_model(), processing_class=word_tokenizer(),
                    args=PSFTConfig(output_dir=str(tmp_path), loss_type="dft", **{
                        k: v for k, v in COMMON.items() if k != "max_steps"}),
                    train_dataset=prompt_completion_dataset(8))


def test_one_step_per_old_policy_equals_sft_trainer(tmp_path):
    """K = 1 with TRL's data pipeline (prompt-completion, completion-only loss): the same updates
    as trl.SFTTrainer, and the logged nll is its loss."""
    psft = PSFTTrainer(model=tiny_model(), processing_class=word_tokenizer(),
                       args=PSFTConfig(output_dir=str(tmp_path / "psft"), steps_per_old_policy=1,
                                       learning_rate=0.5, optim="sgd", **COMMON),
                       train_dataset=prompt_completion_dataset())
    psft.train()
    sft = trl.SFTTrainer(model=tiny_model(), processing_class=word_tokenizer(),
                         args=trl.SFTConfig(output_dir=str(tmp_path / "sft"), learning_rate=0.5,
                                            optim="sgd", **COMMON),
                         train_dataset=prompt_completion_dataset())
    sft.train()
    assert max_param_diff(params_of(psft.model), params_of(sft.model)) < 1e-5
    for p_log, s_log in zip(train_logs(psft), train_logs(sft)):
        assert p_log["nll"] == pytest.approx(s_log["loss"], rel=1e-5)
        assert p_log["entropy"] == pytest.approx(s_log["entropy"], rel=1e-4)
        assert p_log["ratio_mean"] == 1.0


@pytest.mark.parametrize("packing", [False, True])
def test_chat_template_assistant_only_loss_trains(tmp_path, packing):
    """Conversations through a chat template with assistant_only_loss: only the assistant's
    tokens are targets, old-policy groups apply, the PSFT metrics are logged (also with packing,
    where TRL packs conversations into rows and flattens each batch padding-free, with position
    ids restarting at every conversation)."""
    tok = word_tokenizer()
    trainer = RecordingTrainer(
        model=tiny_model(), processing_class=tok, train_dataset=conversation_dataset(),
        args=PSFTConfig(output_dir=str(tmp_path), steps_per_old_policy=2, learning_rate=5e-2,
                        assistant_only_loss=True, packing=packing, **COMMON))
    trainer.train()
    first = trainer.batches[0][0]
    ids, labels = first["input_ids"][0], first["labels"][0]
    kept = tok.convert_ids_to_tokens(ids[labels != -100].tolist())
    assert "user" not in kept and "assistant" not in kept and ":" not in kept and "<eos>" in kept
    if packing:
        assert "position_ids" in first and first["input_ids"].shape[0] == 1
        assert int((first["position_ids"][0] == 0).sum()) > 2  # several conversations
    # Steps 2 and 4 (second of their group) carry old log-probs, steps 1 and 3 do not.
    assert [OLD_LOGPROBS_KEY in b[0] for b in trainer.batches] == [False, True, False, True]
    logs = train_logs(trainer)
    assert len(logs) == 4
    for entry in logs:
        assert all(name in entry for name in METRIC_NAMES)
    assert logs[0]["ratio_mean"] == 1.0 and logs[2]["ratio_mean"] == 1.0
    assert logs[1]["ratio_mean"] != 1.0 and logs[3]["ratio_mean"] != 1.0
    assert logs[0]["clip_fraction"] == 0.0 and logs[3]["clip_fraction"] > 0
