"""The scripts in examples/ run (a few optimizer steps each, imported rather than spawned so the
frameworks are imported once)."""

import importlib.util
import math
import os

import pytest

from integration_helpers import one_thread  # noqa: F401  (autouse fixture)

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")


def load(name):
    spec = importlib.util.spec_from_file_location(f"psft_example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_example():
    pytest.importorskip("transformers")
    history = load("plain_loop").main(["--max-steps", "4", "--steps-per-old-policy", "2",
                                       "--log-every", "2"])
    assert [h["index_in_group"] for h in history] == [0, 1, 0, 1]
    assert all(math.isfinite(h["nll"]) for h in history)
    assert history[0]["ratio_mean"] == 1.0


def test_hf_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    trainer = load("hf_trainer").main(["--max-steps", "4", "--steps-per-old-policy", "2",
                                       "--output-dir", str(tmp_path)])
    assert trainer.state.global_step == 4


def test_trl_example(tmp_path):
    pytest.importorskip("trl")
    trainer = load("trl_sft").main(["--max-steps", "4", "--steps-per-old-policy", "2",
                                    "--output-dir", str(tmp_path)])
    assert trainer.state.global_step == 4
