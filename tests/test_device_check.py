"""benchmarks/device_check.sh --cpu-smoke: the accelerator check runs end to end on CPU and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_device_check_cpu_smoke_writes_every_part(tmp_path):
    out = tmp_path / "dc"
    env = dict(os.environ, PYTHON=sys.executable)
    cp = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), str(out), "--cpu-smoke"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert cp.returncode == 0, cp.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == {p: "ok" for p in ("env", "peaks", "fp8_matmul", "train", "tests")}
    assert summary["env"]["backend"] == "cpu" and summary["env"]["mode"] == "cpu-smoke"
    assert summary["peaks"]["tflops"]["fp32_highest"] > 0
    fp8 = summary["fp8_matmul"]
    assert [c["k"] for c in fp8["cases"] if c["dist"] == "positive"] == fp8["ks"]
    for case in fp8["cases"]:
        for stats in case["hardware"].values():
            assert 0 <= stats["rms"] < 1e-3 and 0 <= stats["frac_correctly_rounded"] <= 1
    # Either the accumulator model ran (estimate given) or the fallback says why it did not.
    model = fp8["accumulator_model"]
    assert (fp8["estimate"] is not None) if model["available"] else model["reason_unavailable"]
    rows = summary["train"]["configs"]["micro"]
    # On a crowded machine the time budget may leave a policy out: then it is listed as skipped.
    skipped = summary["train"]["skipped"]
    assert "fp32" in rows and ("bf16,mode=native" in rows or "micro bf16,mode=native: time budget" in skipped)
    for row in rows.values():
        assert row["ms_per_step_median"] > 0 and row["matmul_gflop_per_step"] > 0 and row["ratio_to_fp32_median"] > 0
    if "tests/test_formats.py: time budget" not in summary["tests"]["skipped"]:  # a crowded machine's way out
        tests = summary["tests"]["files"]["tests/test_formats.py"]
        assert tests["returncode"] == 0 and tests["tests"] > 0 and tests["failures"] == 0
        assert (out / "junit-test_formats.xml").exists()
