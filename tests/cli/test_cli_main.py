"""The ``psft`` entry point (``python -m psft_ext``), ``psft demo --quick`` end to end and
``psft bench`` on a tiny CPU shape, each in a subprocess; their argument errors in this process."""

import argparse
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
PNG = b"\x89PNG\r\n\x1a\n"


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
    if command == "train":
        pytest.importorskip("transformers")
    from psft_ext.cli.main import main
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"psft {command}" in text
    assert "--output-dir" in text or "--output_dir" in text
    if command == "bench":
        assert "source checkout" in text


def test_main_in_process():
    from psft_ext.cli.main import main
    assert main([]) == 0
    assert main(["--version"]) == 0


@pytest.mark.parametrize("command", ["demo", "bench"])
@pytest.mark.parametrize("spelling", ["--output-dir", "--output_dir"])
def test_output_dir_spellings(command, spelling):
    from psft_ext.cli.main import build_parser
    assert build_parser().parse_args([command, spelling, "x"]).output_dir == "x"


def test_one_seed_default():
    from psft_ext.cli.common import DEFAULT_SEED
    from psft_ext.cli.main import build_parser
    assert build_parser().parse_args(["demo"]).seed == DEFAULT_SEED == 42
    transformers = pytest.importorskip("transformers")
    assert transformers.TrainingArguments.__dataclass_fields__["seed"].default == DEFAULT_SEED


def _fails(capsys, argv, *needles):
    """A one-line error naming what is wrong, exit status 2 (argparse's own errors exit)."""
    from psft_ext.cli.main import main
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"psft {argv[0]}: error:"), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.parametrize("extra, flag", [
    (["--seeds", "1"], "--seeds"), (["--seeds", "0"], "--seeds"), (["--seeds", "x"], "--seeds"),
    (["--threads", "0"], "--threads"), (["--seed", "-1"], "--seed"),
])
def test_demo_bad_values(tmp_path, capsys, extra, flag):
    out = tmp_path / "demo"
    _fails(capsys, ["demo", "--output-dir", str(out), *extra], flag)
    assert not out.exists()


def test_demo_output_dir_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    _fails(capsys, ["demo", "--output-dir", str(path)], "--output-dir", "not a folder")


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
    from psft_ext.cli import demo
    out = tmp_path / "demo"
    r = psft("demo", "--quick", "--output_dir", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("report.md", "results.json"):
        assert (out / name).is_file(), name
    if HAVE_MATPLOTLIB:
        for name in ("trajectories.png", "curves.png"):
            assert (out / name).read_bytes()[:8] == PNG, name
    res = json.load(open(out / "results.json"))
    for key in ("config", "recipe", "environment", "seeds", "summary", "reading", "command"):
        assert key in res
    _all_finite(res["seeds"])
    assert [s["seed"] for s in res["seeds"]] == [42, 43]  # at least 2 seeds, from the default
    lr = demo.LR
    for s in res["seeds"]:
        assert s["settings"]["seed"] == s["seed"] and s["pretrain_loss"]
        runs = s["runs"]
        assert set(runs) == {"sft", "sft_low_lr", "psft"}
        assert runs["sft"]["lr"] == runs["psft"]["lr"] == lr and runs["sft_low_lr"]["lr"] < lr
        assert runs["psft"]["steps_per_old_policy"] == 8
        assert runs["sft"]["steps_per_old_policy"] == 1
        assert runs["sft_low_lr"]["steps_per_old_policy"] == 1
        steps = res["config"]["epochs"] * res["config"]["train_examples"] // 8
        for run in runs.values():
            assert len(run["train"]) == steps
            # Every run starts from the same pre-trained model, evaluated on the same sets.
            assert run["evals"][0] == dict(step=0, **s["pretrained"])
            assert [e["step"] for e in run["evals"]] == [e["step"] for e in runs["psft"]["evals"]]
            for e in run["evals"]:
                for key in ("in_domain_acc", "ood_acc", "prior_acc"):
                    assert 0 <= e[key] <= 1
                assert e["entropy"] >= 0 and set(e["prior_acc_by_task"]) == set(demo.PRIOR_TASKS)
        # SFT (one step per old policy) never clips; PSFT's later steps of each group may.
        for name in ("sft", "sft_low_lr"):
            assert all(row["clip_fraction"] == 0 for row in runs[name]["train"])
    summary = res["summary"]
    assert set(summary["runs"]) == {"sft", "sft_low_lr", "psft"}
    assert summary["runs"]["psft"]["in_domain_acc"]["n"] == 2
    report = (out / "report.md").read_text()
    assert ("trajectories.png" in report) == HAVE_MATPLOTLIB
    assert "| PSFT (lr" in report and res["reading"] in report
    assert "| PSFT (lr" in r.stdout


def _fake_summary(a, b):
    """A summary whose PSFT and SFT final in-domain accuracies have the given (mean, std)."""
    def stat(mean, std):
        return dict(mean=mean, std=std, min=mean - std, max=mean + std, n=3)
    run = {k: stat(0.5, 0.01) for k in ("in_domain_acc", "ood_acc", "prior_acc", "entropy",
                                        "nll", "train_nll", "in_domain_best", "ood_best",
                                        "clip_fraction", "seconds")}
    runs = {name: dict(run) for name in ("sft", "sft_low_lr", "psft")}
    runs["psft"]["in_domain_acc"] = stat(*a)
    runs["sft"]["in_domain_acc"] = stat(*b)
    return dict(runs=runs, matched={"sft": {"level": None}, "sft_low_lr": {"level": None}},
                pretrained={})


def test_demo_spread_rule():
    """A difference is called one only when the gap between the means exceeds the larger of the
    two standard deviations."""
    from psft_ext.cli import demo
    assert demo.differs(dict(mean=0.5, std=0.1), dict(mean=0.35, std=0.05)) == 1
    assert demo.differs(dict(mean=0.35, std=0.05), dict(mean=0.5, std=0.1)) == -1
    assert demo.differs(dict(mean=0.5, std=0.2), dict(mean=0.35, std=0.05)) == 0
    text = demo.reading(_fake_summary((0.9, 0.02), (0.6, 0.05)), 3)
    assert "in-domain accuracy 90.0 ± 2.0% for PSFT vs 60.0 ± 5.0% (higher for PSFT)" in text
    assert "PSFT differed in higher in-domain accuracy than SFT (lr 3e-4);" in text
    text = demo.reading(_fake_summary((0.62, 0.2), (0.6, 0.05)), 3)
    assert "62.0 ± 20.0% for PSFT vs 60.0 ± 5.0% (no difference beyond the spread)" in text
    assert "no comparison shows a difference" in text


def test_demo_match_level_interpolates():
    from psft_ext.cli import demo
    evals = [dict(in_domain_acc=0.0, prior_acc=1.0), dict(in_domain_acc=0.4, prior_acc=0.6),
             dict(in_domain_acc=0.8, prior_acc=0.2)]
    assert demo._at_level(evals, 0.6, "prior_acc") == pytest.approx(0.4)
    assert demo._at_level(evals, 0.9, "prior_acc") is None


def test_demo_is_reproducible_in_process(tmp_path, monkeypatch):
    """Same seeds, same numbers: the pre-training and every fine-tuning are deterministic (a
    shortened setting, run twice in this process)."""
    pytest.importorskip("transformers")
    from psft_ext.cli import demo
    small = dict(demo.SETTINGS["quick"], pretrain_steps=10, train_examples=64, epochs=1,
                 eval_every=4, eval_size=8)
    monkeypatch.setitem(demo.SETTINGS, "quick", small)
    outs = []
    for i in range(2):
        args = argparse.Namespace(quick=True, output_dir=str(tmp_path / f"r{i}"), seed=3,
                                  seeds=2, threads=1, no_progress=True)
        assert demo.run(args) == 0
        res = json.load(open(tmp_path / f"r{i}" / "results.json"))
        outs.append([(s["pretrain_loss"], {n: (r["train"], r["evals"]) for n, r in
                                           s["runs"].items()}) for s in res["seeds"]])
    assert outs[0] == outs[1]
    assert [s["seed"] for s in res["seeds"]] == [3, 4]


def test_bench_tiny_cpu(tmp_path):
    if not os.path.isdir(os.path.join(REPO, "benchmarks")):
        pytest.skip("not a source checkout")
    out = tmp_path / "bench"
    r = psft("bench", "--device", "cpu", "--shapes", "32x500,16x300", "--linear-shapes",
             "32x16x500", "--reps", "1", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "bench.json"))
    names = {row["name"] for row in res["loss"]}
    assert {"fused", "reference"} <= names and res["dtype"] == "float32"
    assert any(row["name"] == "fused_linear" for row in res["linear"])
    ref = next(row for row in res["loss"] if row["name"] == "reference")
    assert ref["fwdbwd_vs_fused"] > 0
    if HAVE_MATPLOTLIB:
        assert (out / "bench.png").read_bytes()[:8] == PNG
    # Each table printed once, its header first, every row after it.
    lines = r.stdout.splitlines()
    for header, rows in (("| N x V | contender", "| 32 x 500 | fused |"),
                         ("| N x H x V | contender", "| 32 x 16 x 500 | fused_linear |")):
        heads = [i for i, line in enumerate(lines) if line.startswith(header)]
        hits = [i for i, line in enumerate(lines) if line.startswith(rows)]
        assert len(heads) == 1 and len(hits) == 1 and heads[0] < hits[0], r.stdout
    assert sum(line.startswith("| 16 x 300 | fused |") for line in lines) == 1


@pytest.mark.parametrize("extra, flag", [
    (["--device", "tpu"], "--device"),
    (["--shapes", "10x"], "--shapes"),
    (["--shapes", "0x5"], "--shapes"),
    (["--shapes", "4x5x6"], "--shapes"),
    (["--linear-shapes", "4x5"], "--linear-shapes"),
    (["--reps", "0"], "--reps"),
    (["--dtype", "int8"], "--dtype"),
])
def test_bench_bad_values(tmp_path, capsys, extra, flag):
    out = tmp_path / "bench"
    _fails(capsys, ["bench", "--output-dir", str(out), *extra], flag)
    assert not out.exists()


def test_bench_cuda_without_cuda(tmp_path, capsys):
    import torch

    import psft_ext
    if torch.cuda.is_available() and psft_ext.build_info().get("cuda"):
        pytest.skip("CUDA is usable here")
    out = tmp_path / "bench"
    _fails(capsys, ["bench", "--device", "cuda", "--output-dir", str(out)], "--device cuda")
    assert not out.exists()


def _row(name, n, vocab, ms, mib, **extra):
    return dict(name=name, n=n, vocab=vocab, fwdbwd_s=ms / 1e3, fwdbwd_peak_bytes=mib * 2**20,
                peak_bytes=mib * 2**20, **extra)


def test_bench_figure():
    """Linear axes from zero, one colour per contender in every panel, device, dtype and date in
    the title."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from psft_ext.cli import bench
    loss = [_row("fused", 8, 100, 5, 15), _row("reference", 8, 100, 40, 23),
            _row("fused", 16, 100, 9, 30), dict(name="reference", n=16, vocab=100, error="OOM")]
    linear = [_row("matmuls (floor)", 8, 100, 2, 0, hidden=4),
              _row("fused_linear", 8, 100, 3, 10, hidden=4),
              _row("reference", 8, 100, 30, 50, hidden=4)]
    title = "psft bench: CPU (x86_64, 1 threads), float32, torch 2.13.0, 2026-12-02"
    fig = bench.figure(loss, linear, title)
    assert "float32" in fig._suptitle.get_text() and "2026-12-02" in fig._suptitle.get_text()
    colors = {}
    drawn = 0
    for ax in fig.axes:
        if not ax.patches:
            continue
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
        names = [t.get_text() for t in ax.get_xticklabels()]
        for name, bar in zip(names, ax.patches):
            assert colors.setdefault(name, bar.get_facecolor()) == bar.get_facecolor(), name
            drawn += 1
    assert drawn == 3 + 3 + 3 + 3 and len(set(colors.values())) == len(colors) == 4
    assert colors["fused"] == to_rgba(bench.PALETTE[0])
