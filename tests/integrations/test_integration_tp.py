"""Tensor parallelism on CPU processes (torchrun, gloo): examples/tensor_parallel.py trains a tiny
Llama whose LM head (and MLPs) torch's parallelize_module splits over 2 ranks, alone or sharded by
FSDP2 over 2 data-parallel ranks (4 processes), through CausalLMPSFT on the fused path (the
vocabulary-parallel fused linear loss, picked from the LM head's sharded weight), and makes the
same steps as the one-process run: the same per-step losses and metrics, the same final weights up
to rounding."""

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



@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tp1"), 1, 1)


def _run(tmp_path, world, dp):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    path = tmp_path / f"w{world}_dp{dp}.pt"
    launcher = [sys.executable] if world == 1 else torchrun(world)
    proc = subprocess.run(launcher + [EXAMPLE, "--max-steps", "6", "--dp", str(dp),
                                      "--save", str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("world,dp", [(2, 1), (4, 2)], ids=["tp2", "tp2_x_fsdp2"])
def test_tensor_parallel_equals_one_process(tmp_path, one_process, world, dp):
    """TP = 2 alone, and TP = 2 x FSDP2 over 2 data-parallel ranks (a 2-D mesh; the LM head an
    FSDP unit of its own, released after its forward: the vocabulary-parallel loss computes its
    gradients in the forward)."""
    one, two = one_process, _run(tmp_path, world, dp)
    assert one["fused"] and two["fused"]
    for a, b in zip(one["history"], two["history"]):
        for key in ("loss", "nll", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert one["state"].keys() == two["state"].keys()
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Some optimizer steps fell inside old-policy groups (ratio != 1): the clip was exercised.
    assert len(one["history"]) == 6 and any(h["clip_fraction"] > 0 for h in one["history"])
