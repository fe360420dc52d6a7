"""What the distributed tests compare, run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by
test_integration_ddp.py, and in the test's own process on one process with the same global batches.

``run_trainer``: PSFTTrainer under DDP (per-device batch 2; and with ``static_graph=True``,
per-device batch 4 without gradient accumulation, which DDP's static graph does not take) or
alone (batch 4); the same 8 samples per optimizer step in each. Records the gradients of every
optimizer step (after DDP's all-reduce), the training logs and the final weights.

``run_fsdp2_loop``: a plain PSFT loop (OldPolicyGroups + CausalLMPSFT) on a tiny Llama sharded with
FSDP2 (``fully_shard``, the LM head in the root unit or a unit of its own), or unsharded. The LM
head's weight is whole only inside the model's forward, so CausalLMPSFT computes the fused linear
loss and the old log-probs there (from a forward pre-hook on the head). The Trainer enables FSDP
only on GPUs, hence the plain loop for the CPU check.

Both run in the same two processes (one launch: starting the processes is most of the cost).
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from integration_helpers import TokenDataset, pad_collate, psft_args, tiny_model  # noqa: E402
from psft_ext.integrations.causal_lm import CausalLMPSFT, count_targets  # noqa: E402
from psft_ext.integrations.old_policy import OldPolicyGroups, compute_old_logprobs  # noqa: E402
from psft_ext.integrations.transformers import PSFTTrainer  # noqa: E402

TRAINER_STEPS = 4


class GradRecorder(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})


def run_trainer(output_dir, per_device_batch, ddp_backend=None, static_graph=False,
                grad_accum=2):
    args = psft_args(
        output_dir, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        max_steps=TRAINER_STEPS, steps_per_old_policy=2, learning_rate=3.0, optim="sgd",
        max_grad_norm=0.0, train_sampling_strategy="sequential", save_strategy="steps",
        save_steps=3, ddp_backend=ddp_backend, ddp_static_graph=static_graph)
    # Equal lengths (no padding, so per-rank and global batches run the same kernels) but
    # different label masks per sequence: the token mean must count every rank's tokens.
    trainer = PSFTTrainer(model=tiny_model(), args=args, data_collator=pad_collate,
                          train_dataset=TokenDataset(n=32, equal_lengths=True))
    recorder = GradRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return {"grads": recorder.grads, "logs": logs, "weights": weights,
            "world_size": trainer.args.world_size}


LOOP_STEPS, GRAD_ACCUM, K, PER_RANK = 4, 2, 2, 2


def run_fsdp2_loop(rank=0, world=1, shard=None):
    """shard: None (one process), "root" (the LM head in the root unit) or "head" (the LM head a
    unit of its own). Records the weights, the clip fractions, whether the fused path ran, and
    the fallback warnings."""
    model = tiny_model()
    head = CausalLMPSFT()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        if shard == "head":
            fully_shard(model.lm_head)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
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
                # FSDP averages the gradients over ranks; the loss is already a global token mean.
                (loss * world).backward()
                clip.append(float(metrics.clip_fraction))
            optimizer.step()
            optimizer.zero_grad()
    weights = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[name] = full.detach().clone()
    return {"weights": weights, "clip": clip, "fused": head.uses_fused(model),
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
    for shard in ("root", "head"):
        result[f"fsdp2_{shard}"] = run_fsdp2_loop(dist.get_rank(), dist.get_world_size(), shard)
    if dist.get_rank() == 0:
        torch.save(result, opts.result)


if __name__ == "__main__":
    main()
