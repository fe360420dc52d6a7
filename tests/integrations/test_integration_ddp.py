"""Data parallelism on 2 CPU processes (torchrun, gloo) against one process on the same global
batches.

DDP: PSFTTrainer makes the same steps: same gradients at every optimizer step, same logged loss
and metrics, same final weights. The token mean counts the tokens of both ranks, and each rank's
old-policy cache (and checkpoint file) covers its own micro-batches.

FSDP2: the Trainer only enables FSDP on GPUs, so the CPU check is a plain loop (OldPolicyGroups +
CausalLMPSFT) on a model sharded with ``fully_shard``, the LM head in the root unit or a unit of its
own: its weight is whole only inside the model's forward, where the fused loss is computed.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch.distributed as dist  # noqa: E402

from conftest import torchrun  # noqa: E402
from integration_helpers import one_thread  # noqa: E402,F401  (autouse fixture)
from psft_ext.integrations.transformers import METRIC_NAMES, old_policy_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))



pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of distributed_worker.py on 2 CPU processes (both checks run in it)."""
    tmp = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    cmd = torchrun(2) + [os.path.join(HERE, "distributed_worker.py"),
                         "--output-dir", str(tmp / "ddp"), "--result", str(tmp / "result.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return tmp, torch.load(tmp / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def worker():
    sys.path.insert(0, HERE)
    try:
        import distributed_worker
    finally:
        sys.path.remove(HERE)
    return distributed_worker


@pytest.fixture(scope="module")
def single(worker, tmp_path_factory):
    result = worker.run_trainer(tmp_path_factory.mktemp("single"), per_device_batch=4)
    assert result["world_size"] == 1
    return result


def _assert_same_grads(ddp, single, steps):
    assert len(ddp["grads"]) == len(single["grads"]) == steps
    for step, (gd, gs) in enumerate(zip(ddp["grads"], single["grads"])):
        for name in gs:
            torch.testing.assert_close(gd[name], gs[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step + 1}, {name}: {m}")


def test_ddp_static_graph_all_reduces(launched, worker, single):
    """ddp_static_graph=True: the fused loss reads the hidden states and the head's weight, not
    the model's output, yet every rank gets the all-reduced gradient (before the loss was joined
    to the output, each rank silently kept its own)."""
    static = launched[1]["trainer_static"]
    assert static["world_size"] == 2
    _assert_same_grads(static, single, worker.TRAINER_STEPS)


def test_ddp_two_processes_match_one(launched, worker, single):
    tmp, result = launched
    ddp = result["trainer"]
    assert ddp["world_size"] == 2

    _assert_same_grads(ddp, single, worker.TRAINER_STEPS)
    for ld, ls in zip(ddp["logs"], single["logs"]):
        for key in ("loss", *METRIC_NAMES):
            assert ld[key] == pytest.approx(ls[key], rel=1e-4, abs=1e-6), key
    assert any(entry["clip_fraction"] > 0 for entry in single["logs"])
    for name, w in single["weights"].items():
        torch.testing.assert_close(ddp["weights"][name], w, rtol=1e-4, atol=1e-5)

    # Each rank saved its own old-policy cache (step 3 of 4: one step of the group left).
    for rank in (0, 1):
        cache = torch.load(tmp / "ddp" / "checkpoint-3" / old_policy_file(rank),
                           weights_only=True)
        assert cache["world_size"] == 2 and len(cache["old_logprobs"]) == 1


@pytest.mark.parametrize("unit", ["root", "head"])
def test_fsdp2_plain_loop_matches_one_process(launched, worker, unit):
    """The fused path under FSDP2, the LM head in the root unit or a unit of its own: no
    fallback, the same weights as one process (the clip fractions are each rank's own tokens')."""
    sharded = launched[1][f"fsdp2_{unit}"]
    single = worker.run_fsdp2_loop()
    assert single["fused"] and sharded["fused"]
    assert sharded["warnings"] == [] and single["warnings"] == []
    assert any(c > 0 for c in single["clip"])
    for name, w in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], w, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
