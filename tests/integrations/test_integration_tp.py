"""Tensor parallelism on 2 CPU processes (torchrun, gloo): examples/tensor_parallel.py trains a tiny
Llama whose LM head (and MLPs) torch's parallelize_module splits over the ranks, through
CausalLMPSFT on the fused path (the vocabulary-parallel fused linear loss, picked from the LM head's
sharded weight), and makes the same steps as the one-process run: the same per-step losses and
metrics, the same final weights up to rounding."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402

from conftest import torchrun  # noqa: E402
from integration_helpers import one_thread  # noqa: E402,F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "tensor_parallel.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")



def test_tp2_equals_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    out = {}
    for world in (1, 2):
        path = tmp_path / f"tp{world}.pt"
        launcher = [sys.executable] if world == 1 else torchrun(2)
        proc = subprocess.run(launcher + [EXAMPLE, "--max-steps", "6", "--save", str(path)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        out[world] = torch.load(path, weights_only=False)
    one, two = out[1], out[2]
    assert one["fused"] and two["fused"]
    for a, b in zip(one["history"], two["history"]):
        for key in ("loss", "nll", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert one["state"].keys() == two["state"].keys()
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Some optimizer steps fell inside old-policy groups (ratio != 1): the clip was exercised.
    assert len(one["history"]) == 6
