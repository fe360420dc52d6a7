"""Benchmark: differentiable per-token log-probs + entropy (what an RL actor computes before its
policy loss), fused against the alternatives, in one run.

For each shape (N tokens, H hidden size, V vocabulary) it times the forward+backward of
``(logp * g_logp + entropy * g_entropy).sum()`` for random upstream gradients, and measures the
peak memory, of
  linear form (from the hidden states and the LM head; gradients of both):
  - psft_linear:  psft_ext.linear_token_logprobs(..., with_entropy=True)     (this project)
  - verl_torch:   verl's FusedLinearForPPO, "torch" backend, 512-row chunks  (where installed)
  - verl_liger:   verl's FusedLinearForPPO, "liger" backend                  (CUDA, Liger installed)
  - liger_linear: Liger-Kernel's fused linear cross entropy with entropy, called as verl calls
                  it, without verl                                          (Liger installed)
  - plain_linear: hidden @ weight.T, then log_softmax / gather / entropy in eager PyTorch
  logits form (from logits that already exist; their gradient):
  - psft_logits:  psft_ext.token_logprobs(..., with_entropy=True)
  - plain_logits: log_softmax / gather / entropy in eager PyTorch
and reports the ratios against the psft_ext row of the same form.

  python benchmarks/bench_logprobs.py                       # CPU: float32, 2048 x 1024 x 32000
  python benchmarks/bench_logprobs.py --device cuda         # GPU: bfloat16, H = 4096
  python benchmarks/bench_logprobs.py --shapes 1024x512x32000 --reps 3 --json out.json

Peak memory: above what is alive before the step (the inputs), so it includes the gradients the
step leaves (see bench_loss.py for how it is read on each device).
"""

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import (  # noqa: E402
    IGNORED_SHARE, _mib, _ms, add_common_arguments, add_timing_arguments,
    device_and_dtype, environment, fill_normal_,
    guarded, parse_shapes, peak_extra_memory, print_header, time_median, timing,
    warm_up_clocks, write_json)

import psft_ext  # noqa: E402

CPU_SHAPES = "2048x1024x32000,1024x1024x151936"
CUDA_SHAPES = "16384x4096x151936,4096x4096x151936,16384x4096x32000"
TEMPERATURE = 0.9


def plain_logprobs(logits, targets):
    """Log-probs and entropies of (N, V) logits the straightforward way (autograd keeps the
    float32 log-softmax and softmax)."""
    logp_all = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    valid = targets != -100
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def psft_linear(hidden, weight, targets):
    return psft_ext.linear_token_logprobs(hidden, weight, targets, temperature=TEMPERATURE,
                                         with_entropy=True)


def plain_linear(hidden, weight, targets):
    return plain_logprobs(hidden @ weight.t(), targets)


def psft_logits(logits, targets):
    return psft_ext.token_logprobs(logits, targets, temperature=TEMPERATURE, with_entropy=True)


def make_verl(backend):
    """verl's FusedLinearForPPO (ignored targets as id 0: verl has no ignore index)."""
    try:
        from verl.utils.experimental import torch_functional as verl_tf
    except Exception as exc:  # noqa: BLE001
        print(f"# verl_{backend}: not available ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    if backend == "liger" and verl_tf._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY is None:
        print("# verl_liger: Liger-Kernel not installed", file=sys.stderr)
        return None
    module = verl_tf.FusedLinearForPPO(chunk_size=512, impl_backend=backend)

    def verl_linear(hidden, weight, targets):
        return module(hidden, weight, targets.clamp(min=0), TEMPERATURE)
    return verl_linear


def make_liger():
    """Liger-Kernel's fused linear cross entropy with entropy, called as verl's "liger" backend
    calls it (ignore_index -100, its log-probs the negated losses)."""
    try:
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as liger_fn
    except Exception as exc:  # noqa: BLE001
        print(f"# liger_linear: not available ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None

    def liger_linear(hidden, weight, targets):
        nll, entropy = liger_fn.apply(hidden, weight, targets, TEMPERATURE, -100, 1, True)
        return -nll, entropy
    return liger_linear


def make_inputs(n, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = fill_normal_(torch.empty(n, hidden_size, dtype=dtype, device=device), 1.0, gen)
    weight = fill_normal_(torch.empty(vocab, hidden_size, dtype=dtype, device=device),
                          2.0 / hidden_size ** 0.5, gen)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    targets[torch.rand(n, generator=gen).to(device) < IGNORED_SHARE] = -100
    upstream = torch.randn(2, n, generator=gen).to(device)
    return hidden, weight, targets, upstream


def bench_shape(n, hidden_size, vocab, dtype, device, contenders, reps, warmup, with_memory):
    hidden, weight, targets, upstream = make_inputs(n, hidden_size, vocab, dtype, device)
    with torch.no_grad():
        logits = hidden @ weight.t()
    leaves = {"linear": (hidden.detach().requires_grad_(True),
                         weight.detach().requires_grad_(True)),
              "logits": (logits.requires_grad_(True),)}
    common = dict(n=n, hidden=hidden_size, vocab=vocab, logits_bytes=n * vocab * dtype.itemsize)

    def clear():
        for group in leaves.values():
            for t in group:
                t.grad = None

    rows = []
    for name, (form, fn) in list(contenders.items()):
        inputs = leaves[form]

        def step(fn=fn, inputs=inputs):
            logp, entropy = fn(*inputs, targets)
            ((logp * upstream[0]).sum() + (entropy.float() * upstream[1]).sum()).backward()

        def measure(step=step):
            warm_up_clocks(step, device)
            t = time_median(step, device, reps, warmup, setup=clear)
            peak = peak_extra_memory(step, device, setup=clear) if with_memory else None
            return t, peak

        result, error = guarded(name, f"{n}x{hidden_size}x{vocab}", measure, contenders, device)
        clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = dict(common, name=name, form=form)
        row.update(dict(error=error) if error else dict(fwdbwd_s=result[0], peak_bytes=result[1]))
        rows.append(row)
    for form, ours in (("linear", "psft_linear"), ("logits", "psft_logits")):
        base = next((r for r in rows if r["name"] == ours and "error" not in r), None)
        for r in rows:
            if base is None or r["form"] != form or "error" in r:
                continue
            r["time_vs_psft"] = r["fwdbwd_s"] / base["fwdbwd_s"]
            if r["peak_bytes"] and base["peak_bytes"]:
                r["peak_vs_psft"] = r["peak_bytes"] / base["peak_bytes"]
    return rows


def markdown_table(rows):
    lines = ["| N x H x V | form | contender | fwd+bwd ms | vs psft_ext | peak extra MiB "
             "| vs psft_ext | logits MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = f"{r['n']} x {r['hidden']} x {r['vocab']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['form']} | {r['name']} | {r['error']} | | | | |")
            continue
        tv = f"{r['time_vs_psft']:.2f}x" if "time_vs_psft" in r else "-"
        pv = f"{r['peak_vs_psft']:.2f}x" if "peak_vs_psft" in r else "-"
        lines.append(f"| {shape} | {r['form']} | {r['name']} | {_ms(r['fwdbwd_s'])} | {tv} | "
                     f"{_mib(r['peak_bytes'])} | {pv} | {_mib(r['logits_bytes'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, "hidden, weight and logits", shapes_form="NxHxV")
    p.add_argument("--contenders", default=None, help="comma-separated subset; default: all")
    add_timing_arguments(p)
    args = p.parse_args(argv)

    device, dtype = device_and_dtype(args)
    cuda = device.type == "cuda"
    shapes = parse_shapes(args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES))
    reps, warmup = timing(args, cuda, reps=(10, 3), warmup=(2, 1))
    available = {
        "psft_linear": lambda: ("linear", psft_linear),
        "verl_torch": lambda: ("linear", make_verl("torch")),
        "verl_liger": lambda: ("linear", make_verl("liger")),
        "liger_linear": lambda: ("linear", make_liger()),
        "plain_linear": lambda: ("linear", plain_linear),
        "psft_logits": lambda: ("logits", psft_logits),
        "plain_logits": lambda: ("logits", plain_logprobs),
    }
    wanted = [s for s in (args.contenders or ",".join(available)).split(",") if s]
    contenders = {}
    for name in wanted:
        if name not in available:
            p.error(f"unknown contender {name!r}; choose from {sorted(available)}")
        form, fn = available[name]()
        if fn is not None:
            contenders[name] = (form, fn)

    env = environment(device)
    print_header(env, dtype)
    print(markdown_table([]), flush=True)  # the header once; each shape's rows follow it
    rows = []
    for i, (n, hidden_size, vocab) in enumerate(shapes):
        t0 = time.perf_counter()
        shape_rows = bench_shape(n, hidden_size, vocab, dtype, device, contenders, reps, warmup,
                                 not args.no_memory)
        rows += shape_rows
        print(markdown_table(shape_rows).split("\n", 2)[2],
              f"  <!-- {time.perf_counter() - t0:.0f}s -->", flush=True)
        write_json(args.json, i + 1 == len(shapes), environment=env, dtype=str(dtype), reps=reps,
                   temperature=TEMPERATURE, rows=rows)
    return rows


if __name__ == "__main__":
    main()
