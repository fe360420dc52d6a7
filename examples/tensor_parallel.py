"""PSFT with tensor parallelism: the tiny Llama of plain_loop.py with its LM head split over the
vocabulary (and its MLPs split too) by torch's ``parallelize_module``; the loss is psft_ext's
vocabulary-parallel fused linear loss, which CausalLMPSFT picks from the head's sharded weight.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py          # TP = 2, CPU (gloo)
    torchrun --nproc_per_node 4 examples/tensor_parallel.py --dp 2   # TP = 2 x FSDP2 over 2
    python examples/tensor_parallel.py                               # the same run on one process

The ranks of a tensor-parallel group see the same batches (tensor parallelism splits the model,
not the data); with ``--dp N`` the ranks form an N x (world / N) mesh, FSDP2 shards the
tensor-parallel model over the data-parallel dimension (the decoder layers and the LM head units
of their own) and each data-parallel rank takes its share of every batch. The run makes the same
steps as the one-process run, up to rounding. ``--save PATH`` writes the final weights (whole
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


def parallelize(model, world, dp):
    """The LM head split over the vocabulary (ColwiseParallel: each rank computes its slice of
    the logits), each MLP split over its intermediate size (gate / up columnwise, down rowwise);
    with dp > 1, FSDP2 over the data-parallel dimension. Returns the data-parallel group (None
    without data parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    if world % dp:
        raise SystemExit(f"--dp {dp} does not divide the {world} processes")
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    plan = {"lm_head": ColwiseParallel()}
    for i in range(len(model.model.layers)):
        plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    if dp == 1:
        return None
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model.lm_head, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return mesh["dp"].get_group()


def data_parallel_share(batch, dp_group):
    """This data-parallel rank's rows of a batch (the whole batch without data parallelism)."""
    if dp_group is None:
        return batch
    dp, rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    rows = next(iter(batch.values())).shape[0]
    if rows % dp:
        raise SystemExit(f"a batch of {rows} rows does not split over {dp} data-parallel ranks")
    share = rows // dp
    return {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}


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
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel (FSDP2) size; tensor-parallel size: processes / dp")
    parser.add_argument("--save", default=None)
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    torch.set_num_threads(1)

    model = tiny_llama(args.seed)  # the same initial weights on every rank
    dp_group = parallelize(model, world, args.dp) if world > 1 else None
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
    shares = (data_parallel_share(batch, dp_group) for batch in loader)
    for index, step in enumerate(groups.steps(shares, micro_batches_per_step=args.grad_accum,
                                              max_steps=args.max_steps)):
        num_items = count_targets(step.batches)
        if dp_group is not None:
            dist.all_reduce(num_items, group=dp_group)  # the step's tokens on every dp rank
        sums = torch.zeros(4)
        for mb in step:
            loss, metrics = head.loss(model, mb.batch, mb.old_logprobs, num_items=num_items)
            # FSDP averages the gradients over the dp ranks; the loss is a global token mean.
            (loss * args.dp).backward()
            n = metrics.num_tokens
            sums += torch.stack([loss.detach(), metrics.nll * n, metrics.clip_fraction * n, n])
        if dp_group is not None:
            dist.all_reduce(sums, group=dp_group)
        optimizer.step()
        optimizer.zero_grad()
        loss_sum, nll, clip = sums[0].item(), (sums[1] / sums[3]).item(), (sums[2] / sums[3]).item()
        history.append(dict(step=index + 1, loss=loss_sum, nll=nll, clip_fraction=clip))
        if rank == 0 and ((index + 1) % 5 == 0 or index + 1 == args.max_steps):
            print(f"step {index + 1:3d} loss {loss_sum:.4f} nll {nll:.4f} clip_fraction {clip:.3f}"
                  f" (TP = {world // args.dp}, DP = {args.dp}, fused path: "
                  f"{head.uses_fused(model)})")
    state = full_state(model) if world > 1 else {k: v.detach().clone()
                                                  for k, v in model.state_dict().items()}
    if args.save and rank == 0:
        torch.save(dict(history=history, state=state, fused=head.uses_fused(model)), args.save)
    if distributed:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
