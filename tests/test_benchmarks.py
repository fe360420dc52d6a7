"""The benchmark scripts' bookkeeping, on the CPU with tiny shapes: a GPU session runs them
unattended in one call, so a contender that fails must cost only its own rows, and the rows must
say what each contender ran with."""

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
pytestmark = pytest.mark.skipif(not os.path.isdir(BENCH), reason="not a source checkout")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        import bench_linear
        import bench_loss
        import bench_overhead
        yield bench_loss, bench_linear, bench_overhead
    finally:
        sys.path.remove(BENCH)


def _broken(*args):
    raise RuntimeError("boom\nsecond line | with a pipe")


def test_failing_contender_is_reported_and_dropped(bench):
    bench_loss, _, _ = bench
    cpu = torch.device("cpu")
    contenders = {"fused": bench_loss.fused_loss, "broken": _broken,
                  "reference": bench_loss.reference_loss}
    rows = bench_loss.bench_shape(6, 33, torch.float32, cpu, contenders, reps=1, warmup=0,
                                  with_memory=False)
    by_name = {r["name"]: r for r in rows}
    assert by_name["broken"]["error"] == ("failed (RuntimeError: boom); left out of later shapes")
    assert by_name["reference"]["fwdbwd_s"] > 0 and by_name["reference"]["fwdbwd_vs_fused"] > 0
    assert list(contenders) == ["fused", "reference"]
    table = bench_loss.markdown_table(rows)
    assert "| 6 x 33 | broken | failed (RuntimeError: boom)" in table
    rows = bench_loss.bench_shape(4, 17, torch.float32, cpu, contenders, reps=1, warmup=0,
                                  with_memory=False)
    assert [r["name"] for r in rows] == ["fused", "reference"]


def test_failing_contender_in_the_linear_and_overhead_benchmarks(bench):
    _, bench_linear, bench_overhead = bench
    cpu = torch.device("cpu")
    contenders = {"broken": _broken, "fused_linear": bench_linear.make_fused_linear(None)}
    rows = bench_linear.bench_shape(8, 4, 21, torch.float32, cpu, contenders, reps=1, warmup=0,
                                    with_memory=False, chunk_size=None)
    names = [(r["name"], "error" in r) for r in rows]
    assert names == [("matmuls (floor)", False), ("broken", True), ("fused_linear", False)]
    assert list(contenders) == ["fused_linear"]
    assert "| broken | failed (RuntimeError: boom)" in bench_linear.markdown_table(rows)
    contenders = {"broken": _broken, "fused": bench_overhead.fused_metrics_loss}
    rows = bench_overhead.bench_shape(3, 10, torch.float32, cpu, contenders, calls=1, trials=1,
                                      warmup=0)
    assert "error" in rows[0] and rows[1]["eval_s"] > 0 and rows[1]["step_vs_fused"] == 1.0
    assert "| 3 x 10 | broken | failed" in bench_overhead.markdown_table(rows)


def test_linear_chunk_rows_per_contender(bench, monkeypatch):
    """Each fused linear row reports the chunk rows that contender's loss chooses: larger ones
    only with a float32 accumulator (on CUDA; simulated here through the choice's flag)."""
    _, bench_linear, _ = bench
    monkeypatch.setattr(bench_linear.psft_linear, "auto_chunk_rows",
                        lambda n, vocab, hidden, device, low=False: 6 if low else 3)
    contenders = {"fused_linear": bench_linear.make_fused_linear(None),
                  "fused_linear_lowacc": bench_linear.make_fused_linear(None, False),
                  "mat+fused": bench_linear.materialized_fused}
    rows = bench_linear.bench_shape(12, 8, 19, torch.bfloat16, torch.device("cpu"), contenders,
                                    reps=1, warmup=0, with_memory=False, chunk_size=None)
    chunks = {r["name"]: r.get("chunk_rows") for r in rows}
    assert chunks == {"matmuls (floor)": None, "fused_linear": 6, "fused_linear_lowacc": 3,
                      "mat+fused": None}
    assert rows[1]["chunk_bytes"] == 6 * 19 * 2


def test_logprobs_benchmark_runs_and_compares(tmp_path):
    """bench_logprobs end to end at a tiny shape: every installed contender has a row with a
    time, the ratios are against psft_ext's row of the same form, and the JSON is complete."""
    import json
    sys.path.insert(0, BENCH)
    try:
        import bench_logprobs
    finally:
        sys.path.remove(BENCH)
    out = tmp_path / "r.json"
    rows = bench_logprobs.main(["--device", "cpu", "--shapes", "16x8x50", "--reps", "1",
                                "--warmup", "0", "--no-memory", "--json", str(out)])
    names = {r["name"] for r in rows}
    assert {"psft_linear", "plain_linear", "psft_logits", "plain_logits"} <= names
    base = {r["form"]: r["fwdbwd_s"] for r in rows if r["name"].startswith("psft")}
    for r in rows:
        assert "error" not in r and r["fwdbwd_s"] > 0
        assert r["time_vs_psft"] == pytest.approx(r["fwdbwd_s"] / base[r["form"]])
    data = json.loads(out.read_text())
    assert data["complete"] and len(data["rows"]) == len(rows)


def test_vocab_parallel_benchmark_runs_with_every_sharding(tmp_path):
    """bench_vocab_parallel end to end on 2 processes at a tiny shape, with the training-step
    memory of every sharding: each one's fused row took the fused path, its logits row did not."""
    import json
    import subprocess
    pytest.importorskip("transformers")
    shardings = "fsdp2,fsdp1" + (",zero3" if _installed("deepspeed") else "")
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_vocab_parallel.py"),
                           "--shapes", "64x1000", "--reps", "1", "--sharded", shardings,
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads(out.read_text())
    assert data["complete"] and {r["name"] for r in data["rows"]} == {"vocab_parallel",
                                                                      "unsharded"}
    sharded = {r["name"]: r for r in data["sharded"]}
    for name in shardings.split(","):
        assert sharded[f"{name}_fused"]["fused"] and not sharded[f"{name}_logits"]["fused"]
        assert sharded[f"{name}_fused"]["peak_bytes"] < sharded[f"{name}_logits"]["peak_bytes"]


def _installed(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None
