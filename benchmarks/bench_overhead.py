"""Benchmark: the fixed cost of one loss call, on shapes too small for the kernels to matter.

What a call costs besides moving the logits: argument checks, the op dispatch and autograd, the
range check of the target ids (a read-back, i.e. a sync, on a GPU) and the reduction. On a GPU
this host time is only hidden while the device is still busy with earlier work; it is why small
batches fall short of the bandwidth a large one reaches. Contenders as in bench_loss.py:

  - fused:          psft_ext.psft_loss (single pass when a gradient is needed)
  - fused_metrics:  the same with return_metrics=True, as the trainer integrations call it
  - fused_two_pass: the same loss through the two-kernel pair
  - reference:      psft_ext.reference.psft_loss, eager PyTorch
  - liger:          Liger-Kernel's GRPO loss (CUDA, when installed)

For each it reports microseconds per call of an evaluation forward (under torch.no_grad()) and
of a training step (forward + backward): the mean over --calls back-to-back calls (CUDA:
synchronised once per trial, so the device queue runs as in a loop), the best of --trials such
trials (the host's noise only ever adds time; on a shared machine the median swings by tens of
percent from run to run).

  python benchmarks/bench_overhead.py                  # CPU, float32, 4 x 16 and 256 x 1024
  python benchmarks/bench_overhead.py --device cuda --json out.json
"""

import argparse
import time

import torch

import psft_ext

from bench_loss import (add_common_arguments, device_and_dtype, environment, fused_loss,
                        fused_two_pass_loss, guarded, make_inputs, make_liger_loss, parse_shapes,
                        print_header, reference_loss, write_json)

SHAPES = "4x16,256x1024"


def fused_metrics_loss(logits, targets, old):
    loss, _ = psft_ext.psft_loss(logits, targets, old, return_metrics=True)
    return loss


def per_call_seconds(fn, device, calls, trials, warmup):
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        means.append((time.perf_counter() - t0) / calls)
    return min(means)


def bench_shape(n, vocab, dtype, device, contenders, calls, trials, warmup):
    # One row more than needed: Liger reads one position past the last token.
    logits_all, targets, old = make_inputs(n + 1, vocab, dtype, device)
    targets, old = targets[:n].contiguous(), old[:n].contiguous()
    rows = []
    for name, loss_fn in list(contenders.items()):
        x = (logits_all if name == "liger" else logits_all[:n]).detach().requires_grad_(True)

        def evaluate(x=x, loss_fn=loss_fn):
            with torch.no_grad():
                loss_fn(x, targets, old)

        def train_step(x=x, loss_fn=loss_fn):
            x.grad = None
            loss_fn(x, targets, old).backward()

        def measure(evaluate=evaluate, train_step=train_step):
            return (per_call_seconds(evaluate, device, calls, trials, warmup),
                    per_call_seconds(train_step, device, calls, trials, warmup))

        result, error = guarded(name, f"{n}x{vocab}", measure, contenders, device)
        rows.append(dict(name=name, n=n, vocab=vocab, error=error) if error else
                    dict(name=name, n=n, vocab=vocab, eval_s=result[0], step_s=result[1]))
    fused = next((r for r in rows if r["name"] == "fused" and "error" not in r), None)
    for r in rows:
        if fused and "error" not in r:
            r["step_vs_fused"] = r["step_s"] / fused["step_s"]
    return rows


def markdown_table(rows):
    lines = ["| N x V | contender | eval forward us | forward+backward us | fwd+bwd vs fused |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} x {r['vocab']} | {r['name']} | {r['error']} | | |")
            continue
        ratio = f"{r['step_vs_fused']:.2f}x" if "step_vs_fused" in r else "-"
        lines.append(f"| {r['n']} x {r['vocab']} | {r['name']} | {r['eval_s'] * 1e6:.0f} | "
                     f"{r['step_s'] * 1e6:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, "logits", shapes_default=SHAPES)
    p.add_argument("--calls", type=int, default=200, help="back-to-back calls per trial")
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)

    device, dtype = device_and_dtype(args)
    contenders = {"fused": fused_loss, "fused_metrics": fused_metrics_loss,
                  "fused_two_pass": fused_two_pass_loss, "reference": reference_loss}
    if device.type == "cuda":
        liger = make_liger_loss()
        if liger is not None:
            contenders["liger"] = liger
    env = environment(device)
    print_header(env, dtype)
    rows = []
    shapes = parse_shapes(args.shapes)
    for i, (n, vocab) in enumerate(shapes):
        rows += bench_shape(n, vocab, dtype, device, contenders, args.calls, args.trials,
                            args.warmup)
        write_json(args.json, i + 1 == len(shapes), environment=env, dtype=str(dtype),
                   calls=args.calls, trials=args.trials, rows=rows)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
