"""benchmarks/lab_bench.py cli (issue 12 items 1-2 through `precision-lab train` itself, fresh processes,
interleaved rounds) runs in its smallest mode and writes a JSON line results_table.py turns into a table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # four `precision-lab train` processes of the quick-start model: ~1 min on 2 cores
def test_cli_benchmark_rounds_are_paired_and_tabulated(tmp_path):
    cp = subprocess.run([sys.executable, "benchmarks/lab_bench.py", "cli", "--cli-config", "quickstart", "--reps", "2",
                         "--cli-steps", "20", "--json"], capture_output=True, text=True, cwd=REPO, timeout=900,
                        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert cp.returncode == 0, cp.stderr[-3000:]
    line = cp.stdout.strip().splitlines()[-1]
    d = json.loads(line)
    assert d["benchmark"] == "cli_train" and d["config"] == "quickstart" and d["reps"] == 2 and d["cpu_model"]
    one, eight = d["runs"]["1 seed"], d["runs"]["8 seeds"]
    assert len(one["reps"]) == len(eight["reps"]) == 2 and "--seeds 8" in eight["command"]
    assert eight["member_devices"] >= 1 and one["ms_per_step_median"] > 0
    # the ratio is taken round by round (paired), not from the two medians
    per_round = sorted(e / o for e, o in zip(eight["reps"], one["reps"]))
    assert d["cost_8_over_1_min_max"] == [round(per_round[0], 3), round(per_round[-1], 3)]
    assert "hf" not in d  # the quick-start model has no HF counterpart
    (tmp_path / "r.jsonl").write_text(line + "\n")
    table = subprocess.run([sys.executable, "benchmarks/results_table.py", str(tmp_path / "r.jsonl")],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "the quick-start model" in table.stdout and "2 interleaved rounds" in table.stdout
    assert f"median **{d['cost_8_over_1_median']:.2f}**" in table.stdout
