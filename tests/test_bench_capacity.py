"""benchmarks/lab_bench.py capacity (ST-MoE Table 9: step time at train capacity factor 2.0 over 1.25, both
expert dispatches) runs in its smallest mode and writes a JSON line results_table.py turns into a table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # four compiled train steps: ~2 min of CPU (9 min wall on the shared, loaded 2 cores)
def test_capacity_benchmark_smallest_mode_runs_and_tabulates(tmp_path):
    cp = subprocess.run([sys.executable, "benchmarks/lab_bench.py", "capacity", "--presets", "micro", "--reps", "1",
                         "--k", "1", "--json"], capture_output=True, text=True, cwd=REPO, timeout=600,
                        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert cp.returncode == 0, cp.stderr[-3000:]
    line = cp.stdout.strip().splitlines()[-1]
    d = json.loads(line)
    assert d["benchmark"] == "capacity_step_time" and d["cpu_model"] and d["capacity_factors"] == [1.25, 2.0]
    for dispatch in ("sorted", "dense"):
        r = d["configs"]["micro"][dispatch]
        assert r["ratio_median"] > 0 and len(r["ratio_per_rep"]) == 1
        assert r["CF 1.25"]["ms_per_step_median"] > 0 and r["CF 2.0"]["matmul_gflop_per_step"] > 0
    # the dense dispatch computes every expert's C slots: more capacity, more executed matmul FLOPs
    assert d["configs"]["micro"]["dense"]["matmul_gflop_ratio"] > 1.0
    (tmp_path / "r.jsonl").write_text(line + "\n")
    table = subprocess.run([sys.executable, "benchmarks/results_table.py", str(tmp_path / "r.jsonl")],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "capacity factor 2.0 over 1.25" in table.stdout and "| micro | dense |" in table.stdout
