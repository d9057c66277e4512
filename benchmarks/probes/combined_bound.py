#!/usr/bin/env python
"""Probe (round 12, issue 12 item 1): the lab's matched step with every measured lever at once, against HF.

    .venv/bin/python benchmarks/probes/combined_bound.py [reps]
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= .venv/bin/python benchmarks/probes/combined_bound.py [reps]

Rounds 10-11 measured each lever alone (an ideal per-expert grouped GEMM 11-17%, Eigen's dots with YNNPACK off
0-11%, no router telemetry ~5%) and RESULTS.md could only say what they would give "if they multiplied". This
builds, in one process, the lab's matched fp32 step and the same step with the experts' product replaced by
whatif_grouped's ideal per-expert product and the router telemetry (shadow router and statistics) replaced by
constants, and times both interleaved with HF's train step (lab_bench.HFWorker at 16 x (128 + 32) tokens, the
bare chunk's lengths), `reps` rounds (default 5). Run it once as is and once with YNNPACK off (second line): the
third lever is a process-wide XLA flag. The levered step computes a different function (a bound, not a mode).
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_bench import MATCHED, SRC_LEN, TGT_LEN, HFWorker, Program, env, interleave, router_telemetry, run_for  # noqa: E402
from results_table import ratio_ci  # noqa: E402
from whatif_grouped import _per_expert, grouped_as  # noqa: E402


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    k = 10
    lab = Program("lab", run_for(MATCHED, "fp32"), k=k, src=SRC_LEN, tgt=TGT_LEN)
    with grouped_as(_per_expert), router_telemetry(shadow=False, statistics_=False):
        levered = Program("levered", run_for(MATCHED, "fp32"), k=k, src=SRC_LEN, tgt=TGT_LEN)
    hf = HFWorker(steps=k, extra_args=("--src-len", str(SRC_LEN), "--tgt-len", str(TGT_LEN)))
    try:
        interleave([lab, levered, hf], reps)
    finally:
        hf.close()
    e = env()
    print(f"CPU {e['cpu']}, XLA_FLAGS={e['XLA_FLAGS']!r}, {reps} interleaved rounds, ms/step:")
    for p in (lab, levered):
        r = [h / t for h, t in zip(hf.times, p.times)]
        print(f"  {p.name:8s} median {statistics.median(p.times):6.1f}  HF/this median {statistics.median(r):.2f} "
              f"({min(r):.2f}-{max(r):.2f})  reps {[round(t, 1) for t in p.times]}  loss {p.last_loss:.4f}")
        print(f"           HF/this: {ratio_ci(r, 1.5, 'greater')}")
    print(f"  HF       median {statistics.median(hf.times):6.1f}  reps {[round(t, 1) for t in hf.times]}")


if __name__ == "__main__":
    main()
