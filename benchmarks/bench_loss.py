"""Benchmark: the fused PSFT loss against the plain PyTorch reference (and peers), in one run.

For each shape (N tokens x V vocabulary) it times the forward and the forward+backward of
  - fused:      psft_ext.psft_loss (this project's kernels; with a gradient to compute, the single
                pass: psft_fwd writes the gradient with the forward)
  - fused_two_pass: the same loss through the two passes (psft_fwd, then psft_bwd in the
                backward), via reduction="none" and a token mean
  - reference:  psft_ext.reference.psft_loss, eager PyTorch
  - compiled:   torch.compile of the reference              (CUDA; --peers compile; one
                dynamic-shape compile for all shapes, so tuned on the first)
  - liger:      Liger-Kernel's Triton GRPO loss, advantages 1, beta 0 (CUDA, when installed)
  - copy:       a device-to-device copy of a logits-sized tensor, the bandwidth yardstick (CUDA)
and reports the median time, the peak extra memory over the inputs, the effective bandwidth
(the fewest bytes the step must move: the logits read once, plus the gradient written once for
forward+backward, over the time) and ratios against the fused loss. It prints a markdown table
and writes every number to JSON.

  python benchmarks/bench_loss.py                       # CPU: float32, shapes up to 2048 x 151936
  python benchmarks/bench_loss.py --device cuda         # GPU: bfloat16, N in {4096, 16384}
  python benchmarks/bench_loss.py --shapes 512x32000 --reps 3 --json out.json

"fwd" is one loss call, timed as a training step makes it (the logits require a gradient): for
fused, that is the single pass, which writes the gradient too.

A contender that fails (other than by running out of memory) gets an error row and is left out of
the shapes after it; the other contenders' rows and the JSON are kept. On CUDA the inputs are
drawn on the device, the largest shapes run first (the issue's bars are judged there, and a run
cut short by a time limit keeps them), and each shape starts with a warm-up of a fixed time, so
the first contender timed does not meet clocks still ramping up.

Peak memory: CUDA from the caching allocator's peak statistics; CPU from the process' peak
resident set (VmHWM, reset through /proc/self/clear_refs before each measurement; Linux only).
"""

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

import psft_ext
from psft_ext import reference

CPU_SHAPES = "256x32000,1024x32000,512x151936,2048x151936"
CUDA_SHAPES = "16384x151936,16384x128256,16384x32000,4096x151936,4096x128256,4096x32000"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SHARE = 0.1  # prompt / padding tokens mixed in, as in real SFT batches


# ----------------------------------------------------------------------------- measuring

class CpuPeakMemory:
    """Peak resident memory of this process above its level at start, in bytes (Linux)."""

    @staticmethod
    def available():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))

    def __enter__(self):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        self.start = self._status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = (self._status_kib("VmHWM") - self.start) * 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_clocks(fn, device, seconds=0.3):
    """Runs fn() for about ``seconds`` (CUDA only): after seconds of input set-up the GPU idles at
    a low clock, and the first contender timed would pay for its ramp-up."""
    if device.type != "cuda":
        return
    _sync(device)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(5):
            fn()
        _sync(device)


def guarded(name, label, measure, contenders, device):
    """measure() for one contender at one shape: (its result, None), or (None, the error). Out of
    memory is that shape's verdict; any other failure (a peer's kernel build, an API it does not
    take) drops the contender from ``contenders`` for the shapes after this one, so it costs
    neither the other contenders' rows nor the JSON. A failure that leaves the CUDA context
    broken raises from the synchronisation here and ends the run."""
    try:
        return measure(), None
    except torch.OutOfMemoryError:
        error = "out of memory"
    except Exception as exc:  # noqa: BLE001: reported, never hidden
        _sync(device)
        contenders.pop(name, None)
        first_line = (str(exc).splitlines() or [""])[0][:160].replace("|", "/")
        error = f"failed ({type(exc).__name__}: {first_line}); left out of later shapes"
    print(f"# {name} {label}: {error}", file=sys.stderr, flush=True)
    return None, error


def time_median(fn, device, reps, warmup, setup=None):
    """Median seconds of fn() over reps runs; setup() runs before each, outside the timing."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(reps):
        if setup:
            setup()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_memory(fn, device, setup=None):
    """Peak memory fn() allocates above what is alive before it, in bytes (None if unknown)."""
    if setup:
        setup()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not CpuPeakMemory.available():
        return None
    with CpuPeakMemory() as mem:
        fn()
    return mem.peak


# ----------------------------------------------------------------------------- inputs

def fill_normal_(t, std, gen):
    """``t`` (rows x width) filled with N(0, std^2) values in place, drawn from the CPU generator
    ``gen``'s stream: on the CPU in row blocks of float32 draws (no transient float32 copy of the
    whole tensor); on a GPU by the device's generator, seeded from gen, in t's own dtype (a
    16384 x 151936 tensor in a fraction of a second instead of a minute of CPU draws)."""
    if t.is_cuda:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        return t.normal_(0.0, std, generator=torch.Generator(device=t.device).manual_seed(seed))
    width = max(t.shape[-1], 1)
    block = max(1, (1 << 24) // width)
    for start in range(0, t.shape[0], block):
        rows = torch.randn(min(block, t.shape[0] - start), width, generator=gen) * std
        t[start:start + rows.shape[0]] = rows.to(dtype=t.dtype)
    return t


def make_inputs(n, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = fill_normal_(torch.empty(n, vocab, dtype=dtype, device=device), 2.0, gen)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    targets[torch.rand(n, generator=gen).to(device) < IGNORED_SHARE] = -100
    # Old log-probs: the current ones, perturbed so some ratios leave the trust region.
    old = psft_ext.token_logprobs(logits, targets)
    old = old + (torch.rand(n, generator=gen).to(device) - 0.5) * 0.8
    return logits, targets, old


# ----------------------------------------------------------------------------- contenders

def fused_loss(logits, targets, old):
    return psft_ext.psft_loss(logits, targets, old)


def fused_two_pass_loss(logits, targets, old):
    per_token = psft_ext.psft_loss(logits, targets, old, reduction="none")
    return per_token.sum() / (targets != -100).sum().clamp(min=1)


def reference_loss(logits, targets, old):
    return reference.psft_loss(logits, targets, old)


def make_compiled_loss():
    # One symbolic-shape compile for all shapes: a static compile per shape costs minutes.
    return torch.compile(reference.psft_loss, dynamic=True)


def make_liger_loss():
    """Liger-Kernel's Triton GRPO loss set up as PSFT (advantage 1, beta 0, dapo token-mean)."""
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as exc:  # not installed, or no Triton
        print(f"# liger: not available ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None

    def liger_loss(logits, targets, old):
        # Liger takes (B, L+1, V) logits and ignores the last position; one sequence of N + 1.
        n = targets.shape[0]
        mask = (targets != -100).unsqueeze(0)
        ids = torch.where(mask[0], targets, 0).unsqueeze(0)
        advantages = torch.ones(1, device=logits.device, dtype=torch.float32)
        loss, _ = triton_grpo_loss(
            logits.view(1, n + 1, -1), old.unsqueeze(0), None, ids, advantages, mask,
            temperature=1.0, beta=0.0, eps_low=0.2, eps_high=0.28, inplace=True,
            loss_type="dapo", reduce=True)
        return loss

    return liger_loss


# ----------------------------------------------------------------------------- one shape

def bench_shape(n, vocab, dtype, device, contenders, reps, warmup, with_memory):
    rows = []
    extra_row = 1 if "liger" in contenders else 0  # Liger reads one position past the last token
    logits_all, targets, old = make_inputs(n + extra_row, vocab, dtype, device)
    logits = logits_all[:n] if extra_row else logits_all
    targets, old = targets[:n].contiguous(), old[:n].contiguous()
    logits_bytes = logits.numel() * logits.element_size()
    pristine = logits_all.clone() if "liger" in contenders else None
    label = f"{n}x{vocab}"
    if "fused" in contenders:  # a fresh leaf per call: no gradient outlives the warm-up
        try:
            warm_up_clocks(lambda: contenders["fused"](logits.detach().requires_grad_(True),
                                                       targets, old).backward(), device)
        except Exception:  # noqa: BLE001: fused's own measurement below reports the failure
            pass

    for name, loss_fn in list(contenders.items()):
        if name == "copy":
            dst = torch.empty_like(logits)
            fwd_t, error = guarded(
                name, label, lambda: time_median(lambda: dst.copy_(logits), device, reps, warmup),
                contenders, device)
            del dst
            if error:
                rows.append(dict(name=name, n=n, vocab=vocab, error=error))
                continue
            rows.append(dict(name=name, n=n, vocab=vocab, fwd_s=fwd_t, fwdbwd_s=None,
                             fwd_peak_bytes=None, fwdbwd_peak_bytes=None,
                             gbps=2 * logits_bytes / fwd_t / 1e9))
            continue
        x = (logits_all if name == "liger" else logits).detach().requires_grad_(True)
        restore = None
        if name == "liger":  # it writes its gradient into the logits: start each run afresh
            def restore(x=x):
                with torch.no_grad():
                    x.copy_(pristine)

        def forward(x=x, loss_fn=loss_fn):
            return loss_fn(x, targets, old)

        def forward_backward(x=x, loss_fn=loss_fn):
            x.grad = None
            loss_fn(x, targets, old).backward()

        def measure(x=x, forward=forward, forward_backward=forward_backward, restore=restore):
            fwd_t = time_median(forward, device, reps, warmup, setup=restore)
            fb_t = time_median(forward_backward, device, reps, warmup, setup=restore)
            fwd_mem = fb_mem = None
            if with_memory:
                fwd_mem = peak_extra_memory(forward, device, setup=restore)
                x.grad = None
                fb_mem = peak_extra_memory(forward_backward, device, setup=restore)
            return fwd_t, fb_t, fwd_mem, fb_mem

        result, error = guarded(name, label, measure, contenders, device)
        x.grad = None
        if error:
            rows.append(dict(name=name, n=n, vocab=vocab, error=error))
        else:
            fwd_t, fb_t, fwd_mem, fb_mem = result
            rows.append(dict(name=name, n=n, vocab=vocab, fwd_s=fwd_t, fwdbwd_s=fb_t,
                             fwd_peak_bytes=fwd_mem, fwdbwd_peak_bytes=fb_mem,
                             gbps=2 * logits_bytes / fb_t / 1e9,
                             fwd_gbps=logits_bytes / fwd_t / 1e9))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fused = next((r for r in rows if r["name"] == "fused" and "error" not in r), None)
    for r in rows:
        r["logits_bytes"] = logits_bytes
        if fused and r is not fused and "error" not in r:
            r["fwd_vs_fused"] = r["fwd_s"] / fused["fwd_s"]
            if r["fwdbwd_s"] is not None:
                r["fwdbwd_vs_fused"] = r["fwdbwd_s"] / fused["fwdbwd_s"]
            elif r["name"] == "copy":
                r["fused_fwdbwd_vs_copy"] = fused["fwdbwd_s"] / r["fwd_s"]
    return rows


# ----------------------------------------------------------------------------- report

def _ms(s):
    return "-" if s is None else f"{s * 1e3:.2f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def markdown_table(rows):
    lines = [
        "| N x V | contender | fwd ms | fwd+bwd ms | fwd+bwd vs fused | peak extra MiB (fwd / fwd+bwd) "
        "| logits MiB | GB/s (min bytes) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = f"{r['n']} x {r['vocab']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['name']} | {r['error']} | | | | | |")
            continue
        if r["name"] == "copy":
            ratio = f"fused = {r['fused_fwdbwd_vs_copy']:.2f}x copy" if "fused_fwdbwd_vs_copy" in r else "-"
        else:
            ratio = (f"{r['fwdbwd_vs_fused']:.2f}x" if "fwdbwd_vs_fused" in r
                     else "1.00x" if r["name"] == "fused" else "-")
        lines.append(
            f"| {shape} | {r['name']} | {_ms(r['fwd_s'])} | {_ms(r['fwdbwd_s'])} | {ratio} | "
            f"{_mib(r['fwd_peak_bytes'])} / {_mib(r['fwdbwd_peak_bytes'])} | "
            f"{_mib(r['logits_bytes'])} | {r['gbps']:.0f} |")
    return "\n".join(lines)


def environment(device):
    env = dict(
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(),
        build=psft_ext.build_info(),
    )
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        pass
    return env


# ----------------------------------------------------------------------------- command line and output
# Shared by the three benchmark scripts (bench_loss, bench_linear, bench_overhead).

def add_common_arguments(p, item, shapes_default=None, shapes_form="NxV"):
    """--device, --dtype, --shapes and --json, the options every benchmark script takes."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help=f"{item} dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--shapes", default=shapes_default, help=f"comma-separated {shapes_form} list")
    p.add_argument("--json", default=None,
                   help="write results here, after every shape (default: print only)")


def add_timing_arguments(p):
    """--reps, --warmup and --no-memory, for the scripts that time and measure memory."""
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")


def timing(args, cuda, reps, warmup):
    """(timed runs, warm-up runs): the options given, else the defaults ``reps`` and ``warmup``,
    each a (CUDA, CPU) pair."""
    pick = 0 if cuda else 1
    return (args.reps or reps[pick],
            args.warmup if args.warmup is not None else warmup[pick])


def device_and_dtype(args):
    device = torch.device(args.device)
    return device, DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]


def parse_shapes(text):
    """"4096x32000,16384x151936" -> [(4096, 32000), (16384, 151936)] (any number of factors)."""
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def print_header(env, dtype):
    print(f"# {env.get('gpu', env['cpu'])}, torch {env['torch']}, {dtype}, "
          f"{env['cpu_threads']} CPU threads, {env['date']}", flush=True)


def write_json(path, complete, **payload):
    """Writes the results so far (``complete`` False until the last shape is in): a run cut short
    by a time limit still leaves every shape it finished. Replaced atomically."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(payload, complete=complete), f, indent=1)
    os.replace(tmp, path)
    if complete:
        print(f"\nwrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, "logits")
    p.add_argument("--peers", default="compile,liger,copy",
                   help="CUDA extras among compile,liger,copy (comma-separated; '' for none)")
    add_timing_arguments(p)
    p.add_argument("--no-reference", action="store_true", help="time the fused loss only")
    args = p.parse_args(argv)

    device, dtype = device_and_dtype(args)
    cuda = device.type == "cuda"
    shapes = parse_shapes(args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES))
    reps, warmup = timing(args, cuda, reps=(20, 5), warmup=(3, 1))

    contenders = {"fused": fused_loss, "fused_two_pass": fused_two_pass_loss}
    if not args.no_reference:
        contenders["reference"] = reference_loss
    peers = [s for s in args.peers.split(",") if s] if cuda else []
    if "compile" in peers and not args.no_reference:
        contenders["compiled"] = make_compiled_loss()
    if "liger" in peers:
        liger = make_liger_loss()
        if liger is not None:
            contenders["liger"] = liger
    if "copy" in peers:
        contenders["copy"] = None

    env = environment(device)
    print_header(env, dtype)
    print(markdown_table([]), flush=True)  # the header once; each shape's rows follow it
    rows = []
    for i, (n, vocab) in enumerate(shapes):
        t0 = time.perf_counter()
        shape_rows = bench_shape(n, vocab, dtype, device, contenders, reps, warmup,
                                 with_memory=not args.no_memory)
        rows += shape_rows
        print(markdown_table(shape_rows).split("\n", 2)[2], f"  <!-- {time.perf_counter() - t0:.0f}s -->",
              flush=True)
        write_json(args.json, i + 1 == len(shapes), environment=env, dtype=str(dtype), reps=reps,
                   rows=rows)
    return rows


if __name__ == "__main__":
    main()
