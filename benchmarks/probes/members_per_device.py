#!/usr/bin/env python
"""Probe (round 10, issue 12 item 1): data parallelism over host devices at equal tokens per step.

    .venv/bin/python benchmarks/probes/members_per_device.py 1 16                   # 1 member, batch 16
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        .venv/bin/python benchmarks/probes/members_per_device.py 2 8                # 2 members of batch 8,
                                                                                      # one per device
    taskset -c 0 .venv/bin/python benchmarks/probes/members_per_device.py 1 16      # one core

Members are spread over the devices as precision_lab.train spreads them (member_sharding). Prints the
median ms/step of NB (env, default 10) blocks of 5 steps, matched configuration, fp32.
"""
import os, sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "0"
import jax
jax.config.update("jax_enable_compilation_cache", False)
from lab_bench import MATCHED, Program, run_for
seeds, batch = int(sys.argv[1]), int(sys.argv[2])
p = Program("x", run_for(MATCHED, "fp32", batch=batch), seeds=seeds, k=5, src=128, tgt=32)
ts = [p.block() for _ in range(int(os.environ.get("NB", 10)))]
print(f"devices {jax.device_count()} member_devices {p.member_devices} seeds {seeds} batch {batch}: {statistics.median(ts):.1f} ms/step", [round(t) for t in ts], flush=True)
