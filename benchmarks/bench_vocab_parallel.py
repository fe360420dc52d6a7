"""Benchmark: the vocabulary-parallel loss against the unsharded one, on W processes.

For each shape (N tokens x V vocabulary) every rank holds V / W columns of the logits (its slice,
in rank order) and times the forward + backward of
  - vocab_parallel: psft_ext.psft_loss(logits_slice, ..., process_group=WORLD)
  - unsharded:      psft_ext.psft_loss(full_logits, ...) on each rank alone (what one rank would
                    do without tensor parallelism)
with the bytes every rank sends per call (counted at the collectives), the peak extra memory, and
the time ratio. With ``--sharded fsdp2,fsdp1,zero3`` (or ``all``) it also trains one step of a tiny
Llama (vocabulary 32000) under FSDP2, FSDP1 and DeepSpeed ZeRO-3 with CausalLMPSFT on the fused
path and on the logits path, and reports each one's peak memory (ZeRO-3 on CPU: DS_ACCELERATOR=cpu).

  python benchmarks/bench_vocab_parallel.py                    # 2 CPU processes (gloo)
  python benchmarks/bench_vocab_parallel.py --world 4 --sharded all
  python benchmarks/bench_vocab_parallel.py --device cuda --world 8   # NCCL, one GPU per rank

Launched without torchrun, the script starts itself under ``torch.distributed.run``. CPU peak
memory is the process' peak resident set (bench_loss.py), CUDA's the allocator's peak.
"""

import argparse
import functools
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import mmap_large_allocations  # noqa: E402
from bench_loss import (_mib, _ms, environment, fill_normal_, peak_extra_memory,  # noqa: E402
                        time_median, write_json)

import psft_ext  # noqa: E402
from psft_ext import vocab_parallel  # noqa: E402

CPU_SHAPES = "2048x32000,1024x151936"
CUDA_SHAPES = "16384x151936,16384x32000"


class CountingDist:
    """torch.distributed as psft_ext.vocab_parallel calls it, counting the bytes each rank sends."""

    def __init__(self):
        self.bytes = 0

    def __getattr__(self, name):
        return getattr(dist, name)

    def all_gather(self, parts, tensor, group=None):
        self.bytes += tensor.numel() * tensor.element_size()
        return dist.all_gather(parts, tensor, group=group)

    def all_reduce(self, tensor, group=None):
        self.bytes += tensor.numel() * tensor.element_size()
        return dist.all_reduce(tensor, group=group)


def bench_shape(n, vocab, dtype, device, reps, warmup, rank, world):
    gen = torch.Generator().manual_seed(0)
    full = fill_normal_(torch.empty(n, vocab, dtype=dtype, device=device), 2.0, gen)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    old = psft_ext.token_logprobs(full, targets) + 0.1
    bounds = [vocab * r // world for r in range(world + 1)]
    piece = full[:, bounds[rank]:bounds[rank + 1]].clone()
    leaves = {"vocab_parallel": piece.requires_grad_(True), "unsharded": full.requires_grad_(True)}
    counter = CountingDist()
    vocab_parallel.dist = counter
    rows = []
    try:
        for name, leaf in leaves.items():
            group = dist.group.WORLD if name == "vocab_parallel" else None

            def step(leaf=leaf, group=group):
                leaf.grad = None
                psft_ext.psft_loss(leaf, targets, old, process_group=group).backward()

            counter.bytes = 0
            step()
            sent = counter.bytes
            dist.barrier()
            seconds = time_median(step, device, reps, warmup)
            leaf.grad = None
            peak = peak_extra_memory(step, device)
            rows.append(dict(n=n, vocab=vocab, world=world, name=name, fwdbwd_s=seconds,
                             peak_bytes=peak, sent_bytes=sent,
                             logits_bytes=leaf.numel() * leaf.element_size()))
    finally:
        vocab_parallel.dist = dist
    base = rows[1]["fwdbwd_s"]
    for r in rows:
        r["time_vs_unsharded"] = r["fwdbwd_s"] / base
    return rows


SHARDINGS = ("fsdp2", "fsdp1", "zero3")


def _sharded(model, sharding, device):
    """(model to call, backward + optimizer step of a loss) of the layout; the LM head is a unit
    of its own under FSDP2 and FSDP1 (the decoder layers too)."""
    if sharding == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
        return model, lambda loss: (loss.backward(), model.zero_grad(set_to_none=True))
    if sharding == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        units = set(model.model.layers) | {model.lm_head}
        wrapped = FullyShardedDataParallel(
            model, device_id=device, use_orig_params=True,
            auto_wrap_policy=functools.partial(lambda_auto_wrap_policy,
                                               lambda_fn=lambda m: m in units))
        return wrapped, lambda loss: (loss.backward(), wrapped.zero_grad(set_to_none=True))
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    return engine, lambda loss: (engine.backward(loss), engine.step())


def bench_sharded(rank, world, device, shardings):
    """One training step's peak memory of a tiny Llama with a large vocabulary under each
    sharding, on CausalLMPSFT's fused path and on its logits path."""
    import transformers

    from psft_ext.integrations.causal_lm import CausalLMPSFT

    rows = []
    for sharding in shardings:
        for fused in (True, False):
            torch.manual_seed(0)
            config = transformers.LlamaConfig(
                vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                tie_word_embeddings=False)
            model, backward = _sharded(transformers.LlamaForCausalLM(config).to(device),
                                       sharding, device)
            head = CausalLMPSFT(use_fused_linear=fused)
            gen = torch.Generator().manual_seed(rank)
            ids = torch.randint(0, 32000, (4, 512), generator=gen).to(device)
            batch = {"input_ids": ids, "labels": ids.clone()}

            def step():
                loss, _ = head.loss(model, batch)
                backward(loss)

            step()
            rows.append(dict(name=f"{sharding}_{'fused' if fused else 'logits'}",
                             peak_bytes=peak_extra_memory(step, device),
                             fused=head.uses_fused(model)))
    return rows


def markdown(rows):
    lines = ["| N x V | W | contender | fwd+bwd ms | vs unsharded | sent per call | peak extra MiB "
             "| logits MiB (this rank) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} x {r['vocab']} | {r['world']} | {r['name']} | "
                     f"{_ms(r['fwdbwd_s'])} | {r['time_vs_unsharded']:.2f}x | "
                     f"{r['sent_bytes']} B | {_mib(r['peak_bytes'])} | "
                     f"{_mib(r['logits_bytes'])} |")
    return "\n".join(lines)


def _shardings(text):
    names = list(SHARDINGS) if text == "all" else [t for t in text.split(",") if t]
    unknown = [t for t in names if t not in SHARDINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sharding {unknown[0]!r}; choose from "
                                         f"{', '.join(SHARDINGS)} or all")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--shapes", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sharded", default="", type=_shardings,
                   help="also the training-step memory under these shardings: a comma list of "
                        f"{', '.join(SHARDINGS)}, or all")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(args.world), os.path.abspath(__file__)] + (argv or sys.argv[1:])
        sys.exit(subprocess.call(cmd))

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
        mmap_large_allocations()
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shapes = [tuple(int(v) for v in s.split("x"))
              for s in (args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)).split(",")]
    reps = args.reps or (10 if cuda else 3)
    env = environment(device)
    rows = []
    if rank == 0:
        print(f"# {env.get('gpu', env['cpu'])}, torch {env['torch']}, {dtype}, {world} ranks "
              f"({'nccl' if cuda else 'gloo'}), {env['date']}", flush=True)
    for n, vocab in shapes:
        t0 = time.perf_counter()
        shape_rows = bench_shape(n, vocab, dtype, device, reps, args.warmup, rank, world)
        rows += shape_rows
        if rank == 0:
            print(markdown(shape_rows), f"\n<!-- {time.perf_counter() - t0:.0f}s -->", flush=True)
    sharded_rows = bench_sharded(rank, world, device, args.sharded)
    if rank == 0:
        for r in sharded_rows:
            print(f"{r['name']}: peak extra {_mib(r['peak_bytes'])} MiB (fused path: "
                  f"{r['fused']})")
        write_json(args.json, True, environment=env, dtype=str(dtype), world=world, reps=reps,
                   rows=rows, sharded=sharded_rows)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
