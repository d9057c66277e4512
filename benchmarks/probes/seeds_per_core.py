#!/usr/bin/env python
"""Probe (round 11, issue 12 item 2): what one and eight vmapped quick-start seeds cost on one core and on two.

    .venv/bin/python benchmarks/probes/seeds_per_core.py SEEDS                  # both cores, one XLA device
    taskset -c 0 .venv/bin/python benchmarks/probes/seeds_per_core.py SEEDS     # one core
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        .venv/bin/python benchmarks/probes/seeds_per_core.py SEEDS              # members over 2 host devices

The Trainer's compiled chunk (20 steps) of the quick-start model (tiny preset, batch 16 x (64 + 14), fp32)
with SEEDS members placed as `precision-lab train` places them (train.member_sharding); prints the median
ms/step of 9 blocks. Wall times only: the profiler's trace does not show YNNPACK's work on a second thread.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab_bench import Program, run_for  # noqa: E402


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    prog = Program("quickstart", run_for({"preset": "tiny"}, "fp32"), k=20, src=64, tgt=14, seeds=seeds)
    ms = statistics.median(prog.block() for _ in range(9))
    print(f"{seeds} seed(s) on {prog.member_devices} device(s): {ms:.1f} ms/step")


if __name__ == "__main__":
    main()
