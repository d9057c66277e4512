#!/usr/bin/env python
"""XLA:CPU runtime options against the matched fp32 train step: does any flag buy speed, and at what numerics?

    .venv/bin/python benchmarks/xla_flag_scan.py [--reps 2] [--config matched|quickstart] [--json]

Each flag set runs in a fresh process (XLA_FLAGS is read once per process), the sets interleaved rep by rep
so that a load change hits all of them; per process: compile the Trainer's chunk (3 steps), one untimed
block, then the median of 6 timed blocks (ms/step). The loss after those blocks says whether the flag
changed the numbers (the default set's loss is the reference: equal means bit-identical on this input).
No persistent compilation or program cache (each process compiles under its own flags).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAG_SETS = [
    "",  # the default
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_ynn_fusion_type=",  # YNNPACK off: Eigen dots (multi-threaded), other sums
]

CHILD = r"""
import os, statistics, sys, json
sys.path.insert(0, {here!r})
os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "0"
import jax
jax.config.update("jax_enable_compilation_cache", False)
from lab_bench import BATCH, MATCHED, Program, run_for
model, src, tgt = (MATCHED, 128, 32) if {config!r} == "matched" else ({{"preset": "tiny"}}, 64, 14)
p = Program({config!r}, run_for(model, "fp32", batch=BATCH), k=3, src=src, tgt=tgt)
ts = [p.block() for _ in range(6)]
print(json.dumps({{"median_ms": statistics.median(ts), "min_ms": min(ts), "loss": p.last_loss, "compile_s": p.compile_s}}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--config", choices=("matched", "quickstart"), default="matched")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from lab_bench import env

    results = {f: [] for f in FLAG_SETS}
    for _ in range(args.reps):
        for flags in FLAG_SETS:
            cp = subprocess.run([sys.executable, "-c", CHILD.format(here=str(HERE), config=args.config)],
                                capture_output=True, text=True, env=dict(os.environ, XLA_FLAGS=flags))
            if cp.returncode:
                raise SystemExit(cp.stderr[-2000:])
            results[flags].append(json.loads(cp.stdout.strip().splitlines()[-1]))
    ref = results[""]
    rows = []
    for flags, rs in results.items():
        med = statistics.median(r["median_ms"] for r in rs)
        ratio = statistics.median(r["median_ms"] / b["median_ms"] for r, b in zip(rs, ref))
        rows.append({"xla_flags": flags or "(default)", "median_ms_per_step": round(med, 1),
                     "ratio_to_default": round(ratio, 3), "loss": rs[-1]["loss"],
                     "bit_identical": rs[-1]["loss"] == ref[-1]["loss"]})
    out = {"benchmark": "xla_flag_scan", "config": args.config, "reps": args.reps, "rows": rows, "env": env()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.config} fp32, {args.reps} interleaved reps, {out['env']['cpu']}")
        for r in rows:
            print(f"  {r['xla_flags']:58s} {r['median_ms_per_step']:7.1f} ms/step  x{r['ratio_to_default']:.3f}"
                  f"  {'bit-identical' if r['bit_identical'] else 'numbers change'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
