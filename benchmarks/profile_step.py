#!/usr/bin/env python
"""Where a train step's time goes: XLA:CPU per-op profile of the lab's train step, grouped.

    .venv/bin/python benchmarks/profile_step.py [--config matched|tiny|small] [--policy bf16] [--top 15]

Runs the Trainer's compiled chunk (k steps) under jax.profiler, reads the trace back with
jax.profiler.ProfileData and sums the executed thunks' durations over the XLA worker threads (busy thread
time, so ~2x wall time on 2 cores). Groups: `dot` (YNNPACK matmul fusions, named by their HLO output shape
and contraction), rounding/elementwise loop fusions, copies/transposes, reductions. Also prints the HLO op
counts and the number of `bitcast-convert` (rounding sites: each emulated rounding is one f32->u32->f32
round trip) of the compiled step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import BATCH, MATCHED, Program, run_for  # noqa: E402

NOT_OPS = ("ThunkExecutor", "while", "SlinkyThreadPool", "ThreadpoolListener", "end: ")
CONFIGS = {"matched": (MATCHED, 128, 32), "quickstart": ({"preset": "tiny"}, 64, 14), "tiny": ({"preset": "tiny"}, 128, 32), "small": ({"preset": "small"}, 128, 32)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="matched", choices=list(CONFIGS))
    p.add_argument("--policy", default="fp32")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--seeds", type=int, default=1, help="vmapped members (as the Trainer runs them)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)

    import jax
    from jax.profiler import ProfileData

    model, src, tgt = CONFIGS[args.config]
    prog = Program(f"{args.config} {args.policy}", run_for(model, args.policy, batch=BATCH), k=args.k, src=src, tgt=tgt,
                   seeds=args.seeds)
    prog.block()
    # Page faults of one call (a block of k steps) and the temporaries XLA allocates for it: without huge
    # pages every call first-touches its temporaries page by page (see RESULTS.md, "huge-page malloc").
    import resource

    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    prog.block()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    temp_mb = prog.compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"minor page faults per call: {faults} (temporaries {temp_mb:.0f} MB per call, "
          f"GLIBC_TUNABLES='{os.environ.get('GLIBC_TUNABLES', '')}')")
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        traced_ms = prog.block()  # ms/step of the profiled block itself (profiling makes it slower)
        jax.profiler.stop_trace()
        pd = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    per_op = collections.Counter()
    durations_us = []  # every executed op (thunk) of the timed block
    per_thread = collections.Counter()  # busy ms/step of each XLA thread
    for plane in pd.planes:
        for line in plane.lines:
            if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRt")):
                continue
            for ev in line.events:
                # containers of the ops (the executor, the loop) and the thread pool's own markers
                # (ThreadpoolListener regions, "end: ..." events), which rounds 1-10 counted as ops (~4x
                # too many executed ops; busy times were unaffected: the markers last ~0 us)
                if ev.name.startswith(NOT_OPS):
                    continue
                per_op[ev.name] += ev.duration_ns / 1e6 / args.k
                per_thread[line.name] += ev.duration_ns / 1e6 / args.k
                durations_us.append(ev.duration_ns / 1e3)
    txt = prog.compiled.as_text()
    # what each fusion computes: the dot inside a ynn fusion (shape, contraction), else the fusion kind
    fused = {m.group(1): m.group(2) for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = [^\n]*calls=%([\w.\-]+)", txt)}
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", txt, re.S)}

    def describe(name: str) -> str:
        body = bodies.get(fused.get(name, ""), "")
        m = re.search(r"= (f32\[[\d,]*\])\S* dot\([^\n]*?(lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{([\d,]*)\}", body)
        if m:
            return f"dot -> {m.group(1)}"
        if "reduce(" in body:
            return "reduce"
        return ""

    groups = collections.Counter()
    for name, ms in per_op.items():
        base = re.sub(r"[.\d]+$", "", name)
        if base.startswith("ynn_fusion"):
            g = "matmul (YNNPACK dot fusions)" if describe(name).startswith("dot") else "YNNPACK reductions"
        elif "copy" in base or "transpose" in base:
            g = "copies / transposes (rounding fused in, if any)"
        elif "bitcast-convert" in base:
            g = "rounding (bitcast-convert loop fusions)"
        else:
            g = "other elementwise / reduce / select fusions"
        groups[g] += ms
    total = sum(groups.values())
    print(f"{prog.name}: busy XLA thread time {total:.1f} ms/step (2 threads), wall {prog.block():.1f} ms/step")
    for g, ms in groups.most_common():
        print(f"  {ms:8.1f} ms/step {100 * ms / total:5.1f}%  {g}")
    # How much of the step is many small ops (where per-op dispatch, not arithmetic, is the cost):
    small = [d for d in durations_us if d < 20]
    print(f"  {len(durations_us) / args.k:.0f} executed ops/step, median {sorted(durations_us)[len(durations_us) // 2]:.1f} us;"
          f" {len(small) / args.k:.0f} of them under 20 us, {sum(small) / 1e3 / args.k:.1f} ms/step together")
    print(f"  busy ms/step per XLA thread: " + ", ".join(f"{v:.1f}" for _, v in per_thread.most_common())
          + f" of the profiled block's {traced_ms:.1f} ms/step wall ("
          + ", ".join(f"{v / traced_ms:.0%}" for _, v in per_thread.most_common() if v > 0.05 * traced_ms) + " busy)")
    print(f"top {args.top} ops:")
    for name, ms in per_op.most_common(args.top):
        print(f"  {ms:8.2f} ms/step  {name:32s} {describe(name)}")
    ops = collections.Counter(m.group(1) for m in re.finditer(r"\n\s*(?:ROOT )?%[\w.\-]+ = \S+ ([\w\-]+)\(", txt))
    print("HLO:", {k: ops[k] for k in ("dot", "fusion", "bitcast-convert", "copy", "transpose", "reduce")},
          f"matmul GFLOP/step {prog.flops['matmul_gflop_per_step']}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
