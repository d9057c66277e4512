"""benchmarks/lab_bench.py sections in their smallest modes: each writes a JSON line that results_table.py
turns into a table (the commands RESULTS.md quotes keep working)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def lab_bench(*args: str, timeout: int) -> tuple[dict, str]:
    """Run `lab_bench.py ARGS --json` in a fresh process; its result and its JSON line."""
    cp = subprocess.run([sys.executable, "benchmarks/lab_bench.py", *args, "--json"], capture_output=True, text=True,
                        cwd=REPO, timeout=timeout, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert cp.returncode == 0, cp.stderr[-3000:]
    line = cp.stdout.strip().splitlines()[-1]
    return json.loads(line), line


def results_table(tmp_path: Path, line: str) -> str:
    (tmp_path / "r.jsonl").write_text(line + "\n")
    table = subprocess.run([sys.executable, "benchmarks/results_table.py", str(tmp_path / "r.jsonl")],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert table.returncode == 0, table.stderr
    return table.stdout


@pytest.mark.slow  # four compiled train steps: ~2 min of CPU (9 min wall on the shared, loaded 2 cores)
def test_capacity_benchmark_smallest_mode_runs_and_tabulates(tmp_path):
    """ST-MoE Table 9: step time at train capacity factor 2.0 over 1.25, both expert dispatches."""
    d, line = lab_bench("capacity", "--presets", "micro", "--reps", "1", "--k", "1", timeout=600)
    assert d["benchmark"] == "capacity_step_time" and d["cpu_model"] and d["capacity_factors"] == [1.25, 2.0]
    for dispatch in ("sorted", "dense"):
        r = d["configs"]["micro"][dispatch]
        assert r["ratio_median"] > 0 and len(r["ratio_per_rep"]) == 1
        assert r["CF 1.25"]["ms_per_step_median"] > 0 and r["CF 2.0"]["matmul_gflop_per_step"] > 0
    # the dense dispatch computes every expert's C slots: more capacity, more executed matmul FLOPs
    assert d["configs"]["micro"]["dense"]["matmul_gflop_ratio"] > 1.0
    table = results_table(tmp_path, line)
    assert "capacity factor 2.0 over 1.25" in table and "| micro | dense |" in table


@pytest.mark.slow  # four `precision-lab train` processes of the quick-start model: ~1 min on 2 cores
def test_cli_benchmark_rounds_are_paired_and_tabulated(tmp_path):
    """Issue 12 items 1-2 through `precision-lab train` itself: fresh processes, interleaved rounds."""
    d, line = lab_bench("cli", "--cli-config", "quickstart", "--reps", "2", "--cli-steps", "20", timeout=900)
    assert d["benchmark"] == "cli_train" and d["config"] == "quickstart" and d["reps"] == 2 and d["cpu_model"]
    one, eight = d["runs"]["1 seed"], d["runs"]["8 seeds"]
    assert len(one["reps"]) == len(eight["reps"]) == 2 and "--seeds 8" in eight["command"]
    assert eight["member_devices"] >= 1 and one["ms_per_step_median"] > 0
    # the ratio is taken round by round (paired), not from the two medians
    per_round = sorted(e / o for e, o in zip(eight["reps"], one["reps"]))
    assert d["cost_8_over_1_min_max"] == [round(per_round[0], 3), round(per_round[-1], 3)]
    assert "hf" not in d  # the quick-start model has no HF counterpart
    table = results_table(tmp_path, line)
    assert "the quick-start model" in table and "2 interleaved rounds" in table
    assert f"median **{d['cost_8_over_1_median']:.2f}**" in table and "95% CI" in table
