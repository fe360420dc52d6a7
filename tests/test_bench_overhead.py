"""benchmarks/bench_overhead.py runs end to end on a tiny shape and writes its JSON (the GPU
session runs it unattended, so it must not rot)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_overhead.py")


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="not a source checkout")
def test_bench_overhead_tiny(tmp_path):
    out = tmp_path / "overhead.json"
    r = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--shapes", "3x10,1x7",
                        "--calls", "3", "--trials", "2", "--warmup", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out))
    rows = res["rows"]
    names = {"fused", "fused_metrics", "fused_two_pass", "reference"}
    assert [(row["n"], row["vocab"]) for row in rows[:4]] == [(3, 10)] * 4
    assert {row["name"] for row in rows} == names and len(rows) == 2 * len(names)
    assert res["complete"]
    for row in rows:
        assert row["eval_s"] > 0 and row["step_s"] > 0
    fused = [row for row in rows if row["name"] == "fused"]
    assert all(row["step_vs_fused"] == 1.0 for row in fused)
    assert "| 1 x 7 | reference |" in r.stdout
