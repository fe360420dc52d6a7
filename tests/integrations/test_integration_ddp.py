"""Data parallelism on 2 CPU processes (torchrun, gloo) against one process on the same global
batches.

DDP: PSFTTrainer makes the same steps: same gradients at every optimizer step, same logged loss
and metrics, same final weights. The token mean counts the tokens of both ranks, and each rank's
old-policy cache (and checkpoint file) covers its own micro-batches.

Sharded: the Trainer enables FSDP only on GPUs, so the CPU check of FSDP2 and FSDP1 is a plain
loop (OldPolicyGroups + CausalLMPSFT), the LM head in the root unit or a unit of its own: its
weight is whole only inside the model's forward, where the fused loss is computed. DeepSpeed
ZeRO-3 (its CPU accelerator) runs in the same plain loop and through PSFTTrainer.
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
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
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


def _assert_same_run(run, single):
    """The same logged loss and metrics at every step, some clipping, the same final weights."""
    assert len(run["logs"]) == len(single["logs"]) > 0
    for lr, ls in zip(run["logs"], single["logs"]):
        for key in ("loss", *METRIC_NAMES):
            assert lr[key] == pytest.approx(ls[key], rel=1e-4, abs=1e-6), key
    assert any(entry["clip_fraction"] > 0 for entry in single["logs"])
    for name, w in single["weights"].items():
        torch.testing.assert_close(run["weights"][name], w, rtol=1e-4, atol=1e-5, msg=name)


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
    _assert_same_run(ddp, single)

    # Each rank saved its own old-policy cache (step 3 of 4: one step of the group left).
    for rank in (0, 1):
        cache = torch.load(tmp / "ddp" / "checkpoint-3" / old_policy_file(rank),
                           weights_only=True)
        assert cache["world_size"] == 2 and len(cache["old_logprobs"]) == 1


@pytest.fixture(scope="module")
def single_loop(worker):
    return worker.run_sharded_loop()


@pytest.mark.parametrize("shard", ["fsdp2_root", "fsdp2_head", "fsdp1_root", "fsdp1_head",
                                   "zero3"])
def test_sharded_plain_loop_matches_one_process(launched, single_loop, shard):
    """The fused path under FSDP2, FSDP1 (the LM head in the root unit or a unit of its own) and
    ZeRO-3: no fallback, the same weights as one process (the clip fractions are each rank's own
    tokens'). Without the loss's join to the model's output, FSDP1 stops in its backward
    ("expected to be in states FORWARD_BACKWARD") and ZeRO-3 meets its released LM head."""
    if shard == "zero3":
        pytest.importorskip("deepspeed")
    sharded = launched[1][shard]
    single = single_loop
    assert single["fused"] and sharded["fused"]
    assert sharded["warnings"] == [] and single["warnings"] == []
    assert any(c > 0 for c in single["clip"])
    for name, w in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], w, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_trainer_zero3_matches_one_process(launched, single):
    """PSFTTrainer under DeepSpeed ZeRO-3 (2 processes, partitioned parameters) keeps the fused
    path and trains as one process does: the same logged loss and metrics, the same weights."""
    pytest.importorskip("deepspeed")
    zero3 = launched[1]["trainer_zero3"]
    assert zero3["world_size"] == 2 and zero3["zero3"] and zero3["fused"]
    _assert_same_run(zero3, single)


def test_trl_trainer_zero3_matches_one_process(launched, worker, tmp_path):
    """TRL's PSFTTrainer (an SFTTrainer, prompt-completion data) under ZeRO-3 keeps the fused path
    and trains as one process does."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    zero3 = launched[1]["trl_zero3"]
    single = worker.run_trl(tmp_path, per_device_batch=4)
    assert zero3["world_size"] == 2 and zero3["fused"] and single["fused"]
    _assert_same_run(zero3, single)
