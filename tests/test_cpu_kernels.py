"""The CPU kernels' two implementations of the row loops (csrc/cpu): AVX2 intrinsics
(avx2_rows.h) where the CPU has AVX2 + FMA + F16C, the portable loops elsewhere (or with
PSFT_EXT_CPU_BASELINE=1). The other tests run whichever this machine picks; these check the
dtype conversions of the one in use bit for bit, and that the two agree."""

import json
import os
import subprocess
import sys

import pytest
import torch

import psft_ext  # noqa: F401  (loads the ops)

from conftest import bwd_scale, dtype_id, generator, raw_params, token_inputs

ops = torch.ops.psft_ext

# Below, at and above the 8- and 16-lane widths and the 2048-element block.
VOCABS = [1, 7, 8, 9, 15, 16, 17, 31, 2047, 2048, 2049, 4113]


def _inputs(vocab, dtype, seed):
    """Logits with large and -inf values (and one NaN row), targets with an ignored row."""
    g = generator(seed)
    n = 4
    z = torch.randn(n, vocab, generator=g) * 4
    if vocab > 2:
        z[0, 1] = float("-inf")
        z[1, -1] = 60.0  # a row maximum far above the rest: most exp terms underflow
    z[2, 0] = float("nan")
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[3] = -100
    old = torch.randn(n, generator=g) - 3
    return z.to(dtype), targets, old


PARAMS = raw_params(temperature=0.8, reduction="none")


def _forward(x, targets, old):
    """The per-token outputs (psft_fwd's stats rows)."""
    return ops.psft_fwd(x, targets, token_inputs(old), PARAMS, -100, 0, None, 0.0, False, False,
                        None)[4]


def _backward(x, targets, old, grad):
    """psft_bwd for an upstream gradient of 0.5 per token."""
    stats = _forward(x, targets, old)
    ops.psft_bwd(bwd_scale(stats, 0.5), None, x, targets, stats, PARAMS, -100, grad)


def _grad(x, targets, old):
    grad = torch.empty_like(x)
    _backward(x, targets, old, grad)
    return grad


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_low_precision_reads_and_rounds_like_float32(dtype, vocab):
    """bf16 / fp16 logits are read exactly and computed on in float32: the forward's outputs equal
    those of the float32 copy bit for bit, and the gradient is the float32 copy's gradient
    rounded to nearest even (as torch's .to(dtype) rounds)."""
    x, targets, old = _inputs(vocab, dtype, seed=vocab)
    for got, want in zip(_forward(x, targets, old), _forward(x.float(), targets, old)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    grad = _grad(x, targets, old)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, _grad(x.float(), targets, old).to(dtype), rtol=0, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("vocab", [9, 2049])
def test_in_place_gradient_matches(vocab):
    """psft_bwd writes over the row it reads when grad is the logits (the target's logit is
    read first)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, targets, old = _inputs(vocab, dtype, seed=100 + vocab)
        expected = _grad(x, targets, old)
        work = x.clone()
        stats = _forward(x, targets, old)
        ops.psft_bwd(bwd_scale(stats, 0.5), None, work, targets, stats, PARAMS, -100, work)
        torch.testing.assert_close(work, expected, rtol=0, atol=0, equal_nan=True)


def _has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


_CHILD = r"""
import json, sys
import torch
import psft_ext
sys.path.insert(0, sys.argv[1])
import test_cpu_kernels as t
results = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for vocab in t.VOCABS:
        x, targets, old = t._inputs(vocab, dtype, seed=vocab)
        outs = [o.tolist() for o in t._forward(x, targets, old)]
        grad = t._grad(x, targets, old).float().tolist()
        results[f"{dtype}-{vocab}"] = dict(outs=outs, grad=grad)
print(json.dumps(dict(isa=psft_ext.build_info()["cpu_kernels"], results=results)))
"""


def _run_child(baseline):
    env = dict(os.environ)
    env.pop("PSFT_EXT_CPU_BASELINE", None)
    if baseline:
        env["PSFT_EXT_CPU_BASELINE"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _CHILD, here], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _has_avx2(), reason="needs a CPU with AVX2, FMA and F16C")
def test_avx2_and_baseline_loops_agree():
    """The same inputs through both implementations (two processes: the choice is made once per
    process): equal to float32 rounding, and the gradients to one unit in the last place of
    their dtype (they may round a value that differs in its last float32 bit differently)."""
    baseline, avx2 = _run_child(True), _run_child(False)
    assert baseline["isa"] == "baseline" and avx2["isa"] == "avx2"
    ulp = {"torch.float32": 1e-6, "torch.bfloat16": 2.0 ** -8, "torch.float16": 2.0 ** -11}
    for key, want in baseline["results"].items():
        got = avx2["results"][key]
        for i, (a, b) in enumerate(zip(got["outs"], want["outs"])):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-6, atol=2e-6,
                                       equal_nan=True, msg=f"{key} output {i}")
        rtol = ulp[key.split("-")[0]]
        torch.testing.assert_close(torch.tensor(got["grad"]), torch.tensor(want["grad"]),
                                   rtol=rtol, atol=1e-7, equal_nan=True, msg=f"{key} grad")
