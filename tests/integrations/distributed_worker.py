"""What the distributed tests compare, run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by
test_integration_ddp.py, and in the test's own process on one process with the same global batches.

``run_trainer``: PSFTTrainer under DDP (per-device batch 2; and with ``static_graph=True``,
per-device batch 4 without gradient accumulation, which DDP's static graph does not take), under
DeepSpeed ZeRO-3 (per-device batch 2) or alone (batch 4); the same 8 samples per optimizer step in
each. Records the gradients of every optimizer step (after DDP's all-reduce; DeepSpeed keeps its
own), the training logs and the final weights.

``run_trl``: TRL's PSFTTrainer (an SFTTrainer) under DeepSpeed ZeRO-3 or alone, the same way.

``run_sharded_loop``: a plain PSFT loop (OldPolicyGroups + CausalLMPSFT) on a tiny Llama sharded
with FSDP2 (``fully_shard``) or FSDP1, the LM head in the root unit or a unit of its own, or with
DeepSpeed ZeRO-3, or unsharded. The LM head's weight is whole only inside the model's forward, so
CausalLMPSFT computes the fused linear loss and the old log-probs there (from a forward pre-hook on
the head). The Trainer enables FSDP only on GPUs, hence the plain loop for the CPU check.

Both run in the same two processes (one launch: starting the processes is most of the cost).
"""

import argparse
import functools
import importlib.util
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from integration_helpers import (TokenDataset, pad_collate, prompt_completion_dataset,  # noqa: E402
                                 psft_args, tiny_model, word_tokenizer)
from psft_ext.integrations.causal_lm import CausalLMPSFT, count_targets  # noqa: E402
from psft_ext.integrations.old_policy import OldPolicyGroups, compute_old_logprobs  # noqa: E402
from psft_ext.integrations.transformers import PSFTTrainer  # noqa: E402

TRAINER_STEPS = 4


class GradRecorder(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # DeepSpeed keeps its (partitioned) gradients to itself: nothing to record.
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()
                 if p.grad is not None}
        if grads:
            self.grads.append(grads)


def run_trainer(output_dir, per_device_batch, ddp_backend=None, static_graph=False,
                grad_accum=2, deepspeed=None):
    args = psft_args(
        output_dir, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        max_steps=TRAINER_STEPS, steps_per_old_policy=2, learning_rate=3.0, optim="sgd",
        max_grad_norm=0.0, train_sampling_strategy="sequential", save_strategy="steps",
        save_steps=3, ddp_backend=ddp_backend, ddp_static_graph=static_graph,
        deepspeed=deepspeed)
    # Equal lengths (no padding, so per-rank and global batches run the same kernels) but
    # different label masks per sequence: the token mean must count every rank's tokens.
    trainer = PSFTTrainer(model=tiny_model(), args=args, data_collator=pad_collate,
                          train_dataset=TokenDataset(n=32, equal_lengths=True))
    recorder = GradRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = (_full_weights(trainer.model_wrapped, "zero3") if deepspeed
               else _full_weights(trainer.model, None))
    return {"grads": recorder.grads, "logs": logs, "weights": weights,
            "world_size": trainer.args.world_size,
            "fused": trainer.psft_head.uses_fused(trainer.model_wrapped),
            "zero3": all(hasattr(p, "ds_id") for p in trainer.model.parameters())}


def run_trl(output_dir, per_device_batch, deepspeed=None):
    """TRL's side: psft_ext.integrations.trl.PSFTTrainer (an SFTTrainer) on prompt-completion
    data, under DeepSpeed or alone; the same 8 samples per optimizer step."""
    from psft_ext.integrations.trl import PSFTConfig, PSFTTrainer as TRLPSFTTrainer

    args = PSFTConfig(
        output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True,
        save_strategy="no", logging_steps=1, seed=0, bf16=False, gradient_checkpointing=False,
        max_length=32, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=2, max_steps=TRAINER_STEPS, steps_per_old_policy=2,
        learning_rate=1.0, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
        warmup_steps=0, train_sampling_strategy="sequential", dataloader_num_workers=0,
        deepspeed=deepspeed)
    trainer = TRLPSFTTrainer(model=tiny_model(), args=args, processing_class=word_tokenizer(),
                             train_dataset=prompt_completion_dataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = (_full_weights(trainer.model_wrapped, "zero3") if deepspeed
               else _full_weights(trainer.model, None))
    return {"logs": logs, "weights": weights, "world_size": trainer.args.world_size,
            "fused": trainer.psft_head.uses_fused(trainer.model_wrapped)}


LOOP_STEPS, GRAD_ACCUM, K, PER_RANK = 4, 2, 2, 2
# The sharded layouts of the plain loop: FSDP2 and FSDP1 with the LM head in the root unit or a
# unit of its own (FSDP1's root with use_orig_params, its head unit without), DeepSpeed ZeRO-3.
SHARDED_LOOPS = ("fsdp2_root", "fsdp2_head", "fsdp1_root", "fsdp1_head", "zero3")
ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto", "gradient_clipping": "auto",
                "zero_allow_untested_optimizer": True,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _shard(model, shard):
    """(model to call, backward of a micro-batch's loss, optimizer step) of the layout: SGD,
    lr 3."""
    if shard is None or shard.startswith("fsdp2"):
        if shard:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            if shard == "fsdp2_head":
                fully_shard(model.lm_head)
            fully_shard(model)
        return model, _backward, _sgd_step(model)
    if shard.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        def unit(m):
            return isinstance(m, LlamaDecoderLayer) or (shard == "fsdp1_head"
                                                        and m is model.lm_head)

        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=shard == "fsdp1_root",
            auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=unit))
        return wrapped, _backward, _sgd_step(wrapped)
    import deepspeed

    config = dict(ZERO3_CONFIG, train_micro_batch_size_per_gpu=PER_RANK,
                  gradient_accumulation_steps=GRAD_ACCUM,
                  train_batch_size=2 * PER_RANK * GRAD_ACCUM, gradient_clipping=0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=3.0))

    def backward(loss):
        # DeepSpeed divides by its accumulation steps and steps (at their boundary) per micro-batch.
        engine.backward(loss * GRAD_ACCUM)
        engine.step()

    return engine, backward, lambda: None


def has_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _backward(loss):
    loss.backward()


def _sgd_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)

    def step():
        optimizer.step()
        optimizer.zero_grad()

    return step


def _full_weights(model, shard):
    if shard and shard.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model):
            return {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for name, p in model.named_parameters()}
    if shard == "zero3":
        import deepspeed

        params = list(model.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {name: p.detach().clone() for name, p in model.module.named_parameters()}
    weights = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[name] = full.detach().clone()
    return weights


def run_sharded_loop(rank=0, world=1, shard=None):
    """shard: None (one process) or one of SHARDED_LOOPS. Records the weights, the clip
    fractions, whether the fused path ran, and the fallback warnings."""
    model, backward, optimizer_step = _shard(tiny_model(), shard)
    head = CausalLMPSFT()
    data = TokenDataset(n=64, equal_lengths=True)
    per_batch = PER_RANK * (2 // world)  # the single process takes both ranks' samples
    micro_batches = []
    for i in range(LOOP_STEPS * GRAD_ACCUM):
        start = i * 2 * PER_RANK + rank * per_batch
        micro_batches.append(pad_collate([data[j] for j in range(start, start + per_batch)]))
    groups = OldPolicyGroups(lambda b: compute_old_logprobs(model, b, head=head), K)
    clip = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in groups.steps(micro_batches, micro_batches_per_step=GRAD_ACCUM):
            num_items = count_targets(step.batches)
            if world > 1:
                dist.all_reduce(num_items)  # token mean over the global step
            for mb in step:
                loss, metrics = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
                # The wrappers average the gradients over ranks; the loss is already a global
                # token mean.
                backward(loss * world)
                clip.append(float(metrics.clip_fraction))
            optimizer_step()
    return {"weights": _full_weights(model, shard), "clip": clip, "fused": head.uses_fused(model),
            "warnings": [str(w.message) for w in caught if "psft_ext" in str(w.message)]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result", required=True)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    result = {"trainer": run_trainer(opts.output_dir, 2, ddp_backend="gloo")}
    # DDP's static graph all-reduces from the backward of the model's outputs, which the fused
    # loss reaches only through CausalLMPSFT's exact-zero join.
    result["trainer_static"] = run_trainer(opts.output_dir + "_static", 4, ddp_backend="gloo",
                                           static_graph=True, grad_accum=1)
    # The Trainer's accelerate state initialized the process group (gloo).
    for shard in SHARDED_LOOPS:
        if shard == "zero3" and not has_deepspeed():
            continue
        result[shard] = run_sharded_loop(dist.get_rank(), dist.get_world_size(), shard)
    if has_deepspeed():
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)  # the DDP trainers' state
        result["trainer_zero3"] = run_trainer(opts.output_dir + "_zero3", 2, deepspeed=ZERO3_CONFIG)
        if importlib.util.find_spec("trl") is not None:
            result["trl_zero3"] = run_trl(opts.output_dir + "_trl_zero3", 2,
                                          deepspeed=ZERO3_CONFIG)
    if dist.get_rank() == 0:
        torch.save(result, opts.result)


if __name__ == "__main__":
    main()
