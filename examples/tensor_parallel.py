"""PSFT with tensor parallelism: the tiny Llama of plain_loop.py with its LM head split over the
vocabulary (and its MLPs split too) by torch's ``parallelize_module``; the loss is psft_ext's
vocabulary-parallel fused linear loss, which CausalLMPSFT picks from the head's sharded weight.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py          # TP = 2, CPU (gloo)
    python examples/tensor_parallel.py                               # the same run on one process

Every rank sees the same batches (tensor parallelism splits the model, not the data); the loss,
the metrics and the replicated parameters come out the same on every rank, and the run makes the
same steps as the one-process run, up to rounding. ``--save PATH`` writes the final weights (whole
tensors, from rank 0) and the per-step metrics.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_loop import addition_examples, collate, tiny_llama  # noqa: E402

from psft_ext.integrations.causal_lm import CausalLMPSFT  # noqa: E402
from psft_ext.integrations.old_policy import (OldPolicyGroups, compute_old_logprobs,  # noqa: E402
                                              count_targets)


def parallelize(model, world):
    """The LM head split over the vocabulary (ColwiseParallel: each rank computes its slice of
    the logits), each MLP split over its intermediate size (gate / up columnwise, down rowwise)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    mesh = init_device_mesh("cpu", (world,))
    plan = {"lm_head": ColwiseParallel()}
    for i in range(len(model.model.layers)):
        plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def full_state(model):
    """The whole weights (DTensor shards gathered), on every rank."""
    from torch.distributed.tensor import DTensor
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--steps-per-old-policy", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None)
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    torch.set_num_threads(1)

    model = tiny_llama(args.seed)  # the same initial weights on every rank
    if world > 1:
        model = parallelize(model, world)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    head = CausalLMPSFT(clip_low=0.2, clip_high=0.28)
    groups = OldPolicyGroups(lambda batch: compute_old_logprobs(model, batch, head=head),
                             steps_per_old_policy=args.steps_per_old_policy)
    examples = addition_examples(args.max_steps * args.grad_accum * args.batch_size, args.seed)
    loader = torch.utils.data.DataLoader(examples, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    history = []
    for index, step in enumerate(groups.steps(loader, micro_batches_per_step=args.grad_accum,
                                              max_steps=args.max_steps)):
        num_items = count_targets(step.batches)
        sums = torch.zeros(4)
        for mb in step:
            loss, metrics = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
            loss.backward()
            n = metrics.num_tokens
            sums += torch.stack([loss.detach(), metrics.nll * n, metrics.clip_fraction * n, n])
        optimizer.step()
        optimizer.zero_grad()
        loss_sum, nll, clip = sums[0].item(), (sums[1] / sums[3]).item(), (sums[2] / sums[3]).item()
        history.append(dict(step=index + 1, loss=loss_sum, nll=nll, clip_fraction=clip))
        if rank == 0 and ((index + 1) % 5 == 0 or index + 1 == args.max_steps):
            print(f"step {index + 1:3d} loss {loss_sum:.4f} nll {nll:.4f} clip_fraction {clip:.3f}"
                  f" (TP = {world}, fused path: {head.uses_fused(model)})")
    state = full_state(model) if world > 1 else {k: v.detach().clone()
                                                  for k, v in model.state_dict().items()}
    if args.save and rank == 0:
        torch.save(dict(history=history, state=state, fused=head.uses_fused(model)), args.save)
    if distributed:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
