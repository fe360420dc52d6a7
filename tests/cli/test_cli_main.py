"""The ``psft`` entry point (``python -m psft_ext``), ``psft demo --quick`` end to end and
``psft bench`` on a tiny CPU shape, each in a subprocess."""

import json
import math
import os
import subprocess
import sys

import pytest

try:
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:  # the plots are skipped (with a note); everything else still runs
    HAVE_MATPLOTLIB = False

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def psft(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "psft_ext", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_help_mentions_demo():
    r = psft()  # no command: the help, which points at the demo
    assert r.returncode == 0, r.stderr
    assert "psft demo" in r.stdout and "train" in r.stdout and "bench" in r.stdout


@pytest.mark.parametrize("command", ["demo", "train", "bench"])
def test_subcommand_help(command, capsys):
    from psft_ext.cli.main import main
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"psft {command}" in text
    if command == "bench":
        assert "source checkout" in text


def test_main_in_process():
    from psft_ext.cli.main import main
    assert main([]) == 0
    assert main(["--version"]) == 0


def _all_finite(obj, path="results"):
    if isinstance(obj, float):
        assert math.isfinite(obj), path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _all_finite(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _all_finite(v, f"{path}[{i}]")


def test_demo_quick(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "demo"
    r = psft("demo", "--quick", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("report.md", "results.json"):
        assert (out / name).is_file(), name
    if HAVE_MATPLOTLIB:
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.load(open(out / "results.json"))
    for key in ("config", "pretrained", "runs", "summary", "reading", "pretrain_loss"):
        assert key in res
    _all_finite({k: v for k, v in res.items() if k != "summary"})
    sft, ps = res["runs"]["sft"], res["runs"]["psft"]
    assert sft["steps_per_old_policy"] == 1 and ps["steps_per_old_policy"] == 8
    assert len(sft["train"]) == len(ps["train"]) == res["config"]["finetune_steps"]
    assert [e["step"] for e in sft["evals"]] == [e["step"] for e in ps["evals"]]
    for run in (sft, ps):
        for e in run["evals"]:
            assert 0 <= e["target_acc"] <= 1 and 0 <= e["prior_acc_mean"] <= 1
            assert e["entropy"] >= 0
            assert set(e["prior_acc"]) == {"copy", "reverse", "sort", "add"}
    # SFT (one step per old policy) never clips; PSFT's later steps of each group may.
    assert all(row["clip_fraction"] == 0 for row in sft["train"])
    # Both runs start from the same pre-trained model.
    assert sft["evals"][0] == ps["evals"][0]
    report = (out / "report.md").read_text()
    assert ("curves.png" in report) == HAVE_MATPLOTLIB
    assert "| SFT |" in report and res["reading"] in report
    assert "| SFT |" in r.stdout


def test_demo_is_reproducible_in_process(tmp_path, monkeypatch):
    """Same seed, same numbers: the pre-training and both fine-tunings are deterministic (a
    shortened setting, run twice in this process)."""
    pytest.importorskip("transformers")
    import argparse
    from psft_ext.cli import demo
    small = dict(demo.SETTINGS["quick"], pretrain_steps=20, finetune_steps=16, eval_every=8,
                 eval_size=16)
    monkeypatch.setitem(demo.SETTINGS, "quick", small)
    outs = []
    for i in range(2):
        args = argparse.Namespace(quick=True, out=str(tmp_path / f"r{i}"), seed=3, threads=1,
                                  no_progress=True)
        assert demo.run(args) == 0
        res = json.load(open(tmp_path / f"r{i}" / "results.json"))
        outs.append((res["pretrain_loss"], res["runs"]["sft"]["evals"],
                     res["runs"]["psft"]["evals"], res["runs"]["psft"]["train"]))
    assert outs[0] == outs[1]


def test_bench_tiny_cpu(tmp_path):
    if not os.path.isdir(os.path.join(REPO, "benchmarks")):
        pytest.skip("not a source checkout")
    out = tmp_path / "bench"
    r = psft("bench", "--device", "cpu", "--shapes", "32x500", "--linear-shapes", "32x16x500",
             "--reps", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "bench.json"))
    names = {row["name"] for row in res["loss"]}
    assert {"fused", "reference"} <= names
    assert any(row["name"] == "fused_linear" for row in res["linear"])
    fused = next(row for row in res["loss"] if row["name"] == "reference")
    assert fused["fwdbwd_vs_fused"] > 0
    if HAVE_MATPLOTLIB:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fused |" in r.stdout or "fused" in r.stdout
