"""Shared by the probes: one profiled block of the Trainer's compiled chunk, read back per op.

The policy is fp32 unless the environment sets POLICY (e.g. POLICY=fp8-hybrid)."""
import collections
import glob
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)
from jax.profiler import ProfileData  # noqa: E402
from lab_bench import BATCH, MATCHED, Program, run_for  # noqa: E402

from profile_step import NOT_OPS as SKIP  # noqa: E402  (containers of ops, thread-pool markers)


def profiled(cfg: str, seeds: int, k: int = 3):
    """(program, wall ms/step of the profiled block, ProfileData) for `cfg` = matched | quickstart."""
    model, src, tgt = (MATCHED, 128, 32) if cfg == "matched" else ({"preset": "tiny"}, 64, 14)
    prog = Program("x", run_for(model, os.environ.get("POLICY", "fp32"), batch=BATCH), k=k, src=src, tgt=tgt, seeds=seeds)
    prog.block()
    prog.block()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        wall = prog.block()
        jax.profiler.stop_trace()
        pd = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    return prog, wall, pd


def op_events(pd):
    """(thread name, op event) for every executed op on the XLA threads."""
    for plane in pd.planes:
        for line in plane.lines:
            if line.name.startswith(("tf_XLAEigen", "tf_XLAPjRt")):
                for ev in line.events:
                    if not ev.name.startswith(SKIP):
                        yield line.name, ev


def busy_per_op(pd, k: int):
    """(busy ms/step per op name, executions per step per op name)."""
    per_op, count = collections.Counter(), collections.Counter()
    for _, ev in op_events(pd):
        per_op[ev.name] += ev.duration_ns / 1e6 / k
        count[ev.name] += 1 / k
    return per_op, count


def from_argv(k: int = 3):
    """profiled() for `script.py [matched|quickstart] [seeds]`: (program, wall, ProfileData, k)."""
    cfg = sys.argv[1] if len(sys.argv) > 1 else "matched"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    return (*profiled(cfg, seeds, k), k)
