"""The vocabulary-parallel cases of tests/test_vocab_parallel.py, run under
``torchrun --nproc_per_node W`` (gloo, CPU): every rank builds the same full inputs from the case's
seed, keeps its slice of the vocabulary, runs the loss and a backward, and saves what it got (loss,
metrics, log-probs, the gradient of its slice and of the hidden states) to ``<out>/rank<r>.pt``;
the test compares them with the float64 reference on the whole vocabulary. Bad inputs are run too,
each rank recording the error it raised (a hang would time the launch out).
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import psft_ext  # noqa: E402
from vocab_parallel_cases import CASES, LOGPROB_CASES, case_inputs, slice_bounds  # noqa: E402


def run_loss_case(case, rank, world):
    inp = case_inputs(case)
    lo, hi = slice_bounds(case, world)[rank]
    kwargs = dict(case["options"], advantages=inp["advantages"], return_metrics=True,
                  num_items=case.get("num_items"), process_group=dist.group.WORLD)
    kwargs.update({k: inp[k] for k in ("ref_logprobs", "rollout_is_weights") if k in inp})
    out = {}
    if case["form"] == "logits":
        x = inp["logits"][..., lo:hi].clone().requires_grad_(True)
        loss, metrics = psft_ext.psft_loss(x, inp["targets"], inp["old_logprobs"], **kwargs)
        _backward(loss, inp)
        out["grad_slice"] = x.grad
    else:
        h = inp["hidden"].clone().requires_grad_(True)
        w = inp["weight"][lo:hi].clone().requires_grad_(True)
        b = inp["bias"][lo:hi].clone().requires_grad_(True)
        loss, metrics = psft_ext.linear_psft_loss(h, w, inp["targets"], inp["old_logprobs"],
                                                  bias=b, chunk_size=case.get("chunk_size"),
                                                  **kwargs)
        _backward(loss, inp)
        out.update(grad_slice=w.grad, grad_bias=b.grad, grad_hidden=h.grad)
    out.update(loss=loss.detach(), metrics=torch.stack(list(metrics)))
    return out


def _backward(loss, inp):
    if loss.dim() == 0:
        loss.backward()
    else:
        (loss * inp["upstream"]).sum().backward()


def run_logprob_case(case, rank, world):
    inp = case_inputs(case)
    lo, hi = slice_bounds(case, world)[rank]
    group = dist.group.WORLD
    if case["form"] == "logits":
        x = inp["logits"][..., lo:hi].clone().requires_grad_(True)
        logp, ent = psft_ext.token_logprobs(x, inp["targets"], temperature=case["temperature"],
                                            with_entropy=True, process_group=group)
        leaves = {"grad_slice": x}
    else:
        h = inp["hidden"].clone().requires_grad_(True)
        w = inp["weight"][lo:hi].clone().requires_grad_(True)
        logp, ent = psft_ext.linear_token_logprobs(h, w, inp["targets"],
                                                   temperature=case["temperature"],
                                                   with_entropy=True, process_group=group,
                                                   chunk_size=case.get("chunk_size"))
        leaves = {"grad_slice": w, "grad_hidden": h}
    ((logp * inp["g_logp"]).sum() + (ent.float() * inp["g_entropy"]).sum()).backward()
    out = {name: t.grad for name, t in leaves.items()}
    out.update(logp=logp.detach(), entropy=ent.detach())
    return out


def run_dtensor_case(rank, world):
    """Logits as a DTensor sharded on the vocabulary (torch's own uneven chunks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    case = dict(CASES[0])
    inp = case_inputs(case)
    mesh = init_device_mesh("cpu", (world,))
    logits = inp["logits"]
    sharded = distribute_tensor(logits, mesh, [Shard(logits.dim() - 1)]).requires_grad_(True)
    loss, metrics = psft_ext.psft_loss(sharded, inp["targets"], inp["old_logprobs"],
                                       advantages=inp["advantages"], return_metrics=True)
    loss.backward()
    return dict(loss=loss.detach(), metrics=torch.stack(list(metrics)),
                grad=sharded.grad.full_tensor())


def run_error_cases(rank, world):
    """Each bad call's error message on this rank (None: no error)."""
    group = dist.group.WORLD
    errors = {}

    def attempt(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, RuntimeError) as exc:
            errors[name] = str(exc)

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, generator=g)
    targets = torch.randint(0, 4 * world, (6,), generator=g)
    attempt("rows", lambda: psft_ext.psft_loss(logits[: 5 + rank], targets[: 5 + rank],
                                               process_group=group))
    other = targets.clone()
    other[2] = (other[2] + rank) % (4 * world)
    attempt("targets", lambda: psft_ext.psft_loss(logits, other, process_group=group))
    bad = targets.clone()
    bad[3] = 4 * world + 1
    attempt("range", lambda: psft_ext.psft_loss(logits, bad, process_group=group))
    attempt("linear_range", lambda: psft_ext.linear_psft_loss(
        torch.randn(6, 3), torch.randn(4, 3), bad, process_group=group))
    # A call after the errors still works: no collective was left half done.
    attempt("after", lambda: psft_ext.psft_loss(logits, targets, process_group=group))
    return errors


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {"loss": [run_loss_case(c, rank, world) for c in CASES],
               "logprobs": [run_logprob_case(c, rank, world) for c in LOGPROB_CASES],
               "dtensor": run_dtensor_case(rank, world),
               "errors": run_error_cases(rank, world)}
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
