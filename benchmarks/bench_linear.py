"""Benchmark: the fused linear PSFT loss (logits never materialized) against its alternatives.

For each shape (N tokens, H hidden size, V vocabulary) it times forward+backward (gradients of the
hidden states and the LM head) and measures the peak memory of
  - fused_linear:  psft_ext.linear_psft_loss(hidden, weight, targets, old)   (this project;
                   grad_weight of a bf16 / fp16 head accumulated in float32 across chunks)
  - fused_linear_lowacc: the same with accumulate_float32=False (grad_weight accumulated in
                   the head's dtype: no float32 buffer)                   (--dtype bf16 / fp16)
  - mat+fused:     psft_ext.psft_loss(hidden @ weight.T, ...)                (logits materialized)
  - mat+reference: psft_ext.reference.psft_loss(hidden @ weight.T, ...)      (eager PyTorch)
  - liger:         Liger-Kernel's LigerFusedLinearGRPOLoss, set up as PSFT (advantage 1, beta 0,
                   token mean), on sequences of --liger-seq tokens, one per chunk (CUDA, when
                   installed)
and times the floor: the three bare matmuls of the step (logits = hidden @ weight.T, then
grad_hidden = g @ weight and grad_weight = g.T @ hidden), 6 N H V flops.

  python benchmarks/bench_linear.py                        # CPU: float32, N=2048 H=1024 V=32000
  python benchmarks/bench_linear.py --device cuda          # GPU: bfloat16, H=4096, the issue's grid
  python benchmarks/bench_linear.py --shapes 1024x512x32000 --reps 3 --json out.json

Peak memory is the peak above what is alive before the step (the inputs), so it includes the
gradients the step leaves behind; "target" is those gradients plus one chunk of logits (the
issue's bar for the fused loss). CUDA: the caching allocator's peak; CPU: the process' peak
resident set (see bench_loss.py).
"""

import argparse
import ctypes
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import (  # noqa: E402
    IGNORED_SHARE, _mib, add_common_arguments, add_timing_arguments,
    device_and_dtype, environment, fill_normal_,
    guarded, parse_shapes, peak_extra_memory, print_header, time_median, timing,
    warm_up_clocks, write_json)

import psft_ext  # noqa: E402
from psft_ext import linear as psft_linear  # noqa: E402
from psft_ext import reference  # noqa: E402

CPU_SHAPES = "2048x1024x32000"
# Largest first on CUDA, as in bench_loss.py: a run cut short keeps the shapes the bars are judged on.
CUDA_SHAPES = "16384x4096x151936,16384x4096x128256,4096x4096x151936,4096x4096x128256"


def mmap_large_allocations():
    """Makes glibc serve allocations of 1 MiB and more from mmap (and unmap them when freed).

    By default glibc's threshold grows with freed blocks (up to 32 MiB) and keeps smaller freed
    blocks in the heap, so a later step can reuse memory already resident and its resident-set
    peak under-counts what it allocates. CPU only; a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # from malloc.h
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- inputs

def make_inputs(n, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen).to(device=device, dtype=dtype)
    weight = fill_normal_(torch.empty(vocab, hidden_size, dtype=dtype, device=device),
                          2.0 / hidden_size ** 0.5, gen)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    targets[torch.rand(n, generator=gen).to(device) < IGNORED_SHARE] = -100
    # Old log-probs: the current ones, perturbed so some ratios leave the trust region.
    old = psft_ext.linear_token_logprobs(hidden, weight, targets)
    old = old + (torch.rand(n, generator=gen).to(device) - 0.5) * 0.8
    return hidden, weight, targets, old


# ----------------------------------------------------------------------------- contenders

def make_fused_linear(chunk_size, accumulate_float32=True):
    def fused_linear(hidden, weight, targets, old):
        return psft_ext.linear_psft_loss(hidden, weight, targets, old, chunk_size=chunk_size,
                                         accumulate_float32=accumulate_float32)
    fused_linear.accumulate_float32 = accumulate_float32  # for the chunk rows it will choose
    return fused_linear


def materialized_fused(hidden, weight, targets, old):
    return psft_ext.psft_loss(hidden @ weight.t(), targets, old)


def materialized_reference(hidden, weight, targets, old):
    return reference.psft_loss(hidden @ weight.t(), targets, old)


def make_liger_loss(seq_len):
    """LigerFusedLinearGRPOLoss as PSFT: advantages 1, beta 0 (no reference model), clip
    [0.8, 1.28], token mean ("bnpo"), one sequence of seq_len tokens per chunk."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2,
                                          epsilon_high=0.28, loss_type="bnpo", chunk_size=1)
    except Exception as exc:  # not installed, no Triton, or an API this script does not know
        print(f"# liger: not available ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None

    def liger_loss(hidden, weight, targets, old):
        n = targets.shape[0]
        b = max(1, n // seq_len)
        t = n // b
        mask = (targets != -100).view(b, t)
        ids = torch.where(mask, targets.view(b, t), 0)
        advantages = torch.ones(b, device=hidden.device, dtype=torch.float32)
        out = module(hidden.view(b, t, -1), weight, ids, mask, advantages,
                     old_per_token_logps=old.view(b, t))
        return out[0] if isinstance(out, tuple) else out

    return liger_loss


# ----------------------------------------------------------------------------- one shape

def matmul_floor(hidden, weight, device, reps, warmup):
    """Seconds of the three bare matmuls of forward+backward (each timed on its own)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    try:
        g = torch.empty(n, vocab, dtype=hidden.dtype, device=device).normal_()
        logits = torch.empty_like(g)
        gh = torch.empty_like(hidden)
        gw = torch.empty_like(weight)
        warm_up_clocks(lambda: torch.mm(hidden, weight.t(), out=logits), device)
        t_fwd = time_median(lambda: torch.mm(hidden, weight.t(), out=logits), device, reps, warmup)
        t_gh = time_median(lambda: torch.mm(g, weight, out=gh), device, reps, warmup)
        t_gw = time_median(lambda: torch.mm(g.t(), hidden, out=gw), device, reps, warmup)
    except torch.OutOfMemoryError:
        return None
    finally:
        g = logits = gh = gw = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(fwd_s=t_fwd, grad_hidden_s=t_gh, grad_weight_s=t_gw, total_s=t_fwd + t_gh + t_gw)


def bench_shape(n, hidden_size, vocab, dtype, device, contenders, reps, warmup, with_memory,
                chunk_size):
    hidden, weight, targets, old = make_inputs(n, hidden_size, vocab, dtype, device)
    elt = hidden.element_size()
    grads_bytes = (hidden.numel() + weight.numel()) * elt
    common = dict(n=n, hidden=hidden_size, vocab=vocab, logits_bytes=n * vocab * elt,
                  grads_bytes=grads_bytes)

    def chunk_of(loss_fn):
        """The chunk rows (and bytes) the fused linear loss will choose: with a float32
        accumulator of a 2-byte head's gradient, larger chunks (linear.chunks.chunk_rows)."""
        if not hasattr(loss_fn, "accumulate_float32"):
            return {}
        low = dtype != torch.float32 and loss_fn.accumulate_float32
        rows = chunk_size or psft_linear.auto_chunk_rows(n, vocab, hidden_size, device, low)
        return dict(chunk_rows=rows, chunk_bytes=rows * vocab * elt)

    rows = []
    floor = matmul_floor(hidden, weight, device, reps, warmup)
    rows.append(dict(common, name="matmuls (floor)", fwdbwd_s=floor and floor["total_s"],
                     floor=floor, peak_bytes=None))
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)

    def clear():
        h.grad = None
        w.grad = None

    for name, loss_fn in list(contenders.items()):
        def step(loss_fn=loss_fn):
            clear()
            loss_fn(h, w, targets, old).backward()

        def measure(step=step):
            t = time_median(step, device, reps, warmup, setup=clear)
            peak = None
            if with_memory:
                clear()
                peak = peak_extra_memory(step, device, setup=clear)
            return t, peak

        chunk = chunk_of(loss_fn)
        result, error = guarded(name, f"{n}x{hidden_size}x{vocab}", measure, contenders, device)
        clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if error:
            rows.append(dict(common, name=name, error=error))
        else:
            rows.append(dict(common, **chunk, name=name, fwdbwd_s=result[0], peak_bytes=result[1]))
    floor_s = floor and floor["total_s"]
    mat = next((r for r in rows if r["name"] == "mat+fused" and r.get("peak_bytes")), None)
    for r in rows:
        if "error" in r or r["fwdbwd_s"] is None:
            continue
        if floor_s:
            r["vs_floor"] = r["fwdbwd_s"] / floor_s
        if mat and r.get("peak_bytes") is not None:
            r["peak_vs_mat_fused"] = r["peak_bytes"] / mat["peak_bytes"]
    return rows


# ----------------------------------------------------------------------------- report

def _ms(s):
    return "-" if s is None else f"{s * 1e3:.1f}"


def markdown_table(rows):
    lines = [
        "| N x H x V | contender | fwd+bwd ms | vs matmuls | peak extra MiB | vs mat+fused "
        "| target MiB (grads + 1 chunk) | logits MiB | chunk rows |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = f"{r['n']} x {r['hidden']} x {r['vocab']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['name']} | {r['error']} | | | | | | |")
            continue
        vs = f"{r['vs_floor']:.2f}x" if "vs_floor" in r else "-"
        pm = f"{r['peak_vs_mat_fused']:.2f}" if "peak_vs_mat_fused" in r else "-"
        fused = r["name"].startswith("fused_linear")
        target = _mib(r["grads_bytes"] + r["chunk_bytes"]) if fused else "-"
        lines.append(
            f"| {shape} | {r['name']} | {_ms(r['fwdbwd_s'])} | {vs} | {_mib(r['peak_bytes'])} | "
            f"{pm} | {target} | {_mib(r['logits_bytes'])} | "
            f"{r['chunk_rows'] if fused else '-'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, "hidden and weight", shapes_form="NxHxV")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per chunk of the fused linear loss (default: its automatic choice)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated subset (liger only where installed); default: all, "
                        "fused_linear_lowacc only for bfloat16 / float16")
    p.add_argument("--liger-seq", type=int, default=1024, help="tokens per sequence for Liger")
    add_timing_arguments(p)
    args = p.parse_args(argv)

    device, dtype = device_and_dtype(args)
    cuda = device.type == "cuda"
    if not cuda:
        mmap_large_allocations()
    shapes = parse_shapes(args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES))
    reps, warmup = timing(args, cuda, reps=(10, 3), warmup=(2, 1))

    default = "fused_linear,mat+fused,mat+reference,liger"
    if dtype != torch.float32:
        default = "fused_linear,fused_linear_lowacc,mat+fused,mat+reference,liger"
    wanted = [s for s in (args.contenders or default).split(",") if s]
    available = {
        "fused_linear": lambda: make_fused_linear(args.chunk_size),
        "fused_linear_lowacc": lambda: make_fused_linear(args.chunk_size, False),
        "mat+fused": lambda: materialized_fused,
        "mat+reference": lambda: materialized_reference,
        "liger": lambda: make_liger_loss(args.liger_seq),
    }
    contenders = {}
    for name in wanted:
        if name not in available:
            p.error(f"unknown contender {name!r}; choose from {sorted(available)}")
        fn = available[name]()
        if fn is not None:
            contenders[name] = fn

    env = environment(device)
    print_header(env, dtype)
    print(markdown_table([]), flush=True)  # the header once; each shape's rows follow it
    rows = []
    for i, (n, hidden_size, vocab) in enumerate(shapes):
        t0 = time.perf_counter()
        shape_rows = bench_shape(n, hidden_size, vocab, dtype, device, contenders, reps, warmup,
                                 not args.no_memory, args.chunk_size)
        rows += shape_rows
        print(markdown_table(shape_rows).split("\n", 2)[2],
              f"  <!-- {time.perf_counter() - t0:.0f}s -->", flush=True)
        write_json(args.json, i + 1 == len(shapes), environment=env, dtype=str(dtype), reps=reps,
                   rows=rows)
    return rows


if __name__ == "__main__":
    main()
