#!/usr/bin/env python
"""Probe (round 12, issue 12 item 1): why `precision-lab train`'s step is slower than lab_bench's user path.

    .venv/bin/python benchmarks/probes/cli_gap.py [ROUNDS]
    VARIANTS=userpath,cli .venv/bin/python benchmarks/probes/cli_gap.py [ROUNDS]     # only these

Rounds 10-12 measured `precision-lab train` (timing.step_s) ~20% slower than `lab_bench.py userpath`, both at
the matched configuration, fp32, one seed. This interleaves, in one process, ROUNDS rounds (default 3) of:
  userpath   lab_bench's UserPath blocks (k = 10, the CLI's chunk_steps) on a program lowered and compiled here;
  train      precision_lab.train.train(run) itself (60 steps, no out_dir), its timing.step_s;
  train-nc   the same with the program cache off (PRECISION_LAB_PROGRAM_CACHE=0: jax's own jit dispatch);
  cli        `precision-lab train` in a fresh process (lab_bench.cli_run, as the `cli` section runs it);
  cli-noreexec  the same without its re-execution under glibc.malloc.hugetlb=1 (PRECISION_LAB_NO_REEXEC=1);
  cli-nc     the same with the program cache off;
  cli-heap   the same without the re-execution, under GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:
             glibc.malloc.trim_threshold=2^40 (every allocation from the heap, freed memory kept: XLA's per-call
             temporaries are then reused instead of mapped, faulted in and zeroed by the kernel on every call);
and prints each variant's median ms/step and its ratio to the first variant run within each round.
"""
import os
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lab_bench import MATCHED, UserPath, cli_run, matched_sets, run_for  # noqa: E402


NAMES = ("userpath", "train", "train-nc", "cli", "cli-noreexec", "cli-nc", "cli-heap")
HEAP_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def main() -> None:
    unknown = [n for n in os.environ.get("VARIANTS", "").split(",") if n and n not in NAMES]
    if unknown:  # before anything compiles
        print(f"cli_gap.py: VARIANTS: unknown variant {unknown[0]!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
        sys.exit(2)
    os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "1"
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    from precision_lab.cli import use_one_device_per_core

    use_one_device_per_core()
    import dataclasses

    from precision_lab.train import enable_compilation_cache, train

    enable_compilation_cache()
    run = run_for(MATCHED, "fp32")
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=60, eval_every=0, checkpoint_every=0))
    user = UserPath("userpath", run, prefetch=True, k=run.train.chunk_steps)

    def userpath() -> float:
        user.block()
        return statistics.median(user.block() for _ in range(5))

    def via_train(cache: bool) -> float:
        os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "1" if cache else "0"
        return train(run, progress=False).summary["timing"]["step_s"] * 1e3

    sets = matched_sets()

    def via_cli(**env) -> float:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return cli_run(types.SimpleNamespace(cli_steps=run.train.steps), 1, sets)["step_ms"]
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    variants = {"userpath": userpath, "train": lambda: via_train(True), "train-nc": lambda: via_train(False),
                "cli": via_cli, "cli-noreexec": lambda: via_cli(PRECISION_LAB_NO_REEXEC="1"),
                "cli-nc": lambda: via_cli(PRECISION_LAB_PROGRAM_CACHE="0"),
                "cli-heap": lambda: via_cli(PRECISION_LAB_NO_REEXEC="1", GLIBC_TUNABLES=HEAP_TUNABLES)}
    assert tuple(variants) == NAMES, "NAMES lists the variants, in order"
    only = os.environ.get("VARIANTS")  # e.g. VARIANTS=userpath,cli
    if only:
        variants = {k: v for k, v in variants.items() if k in only.split(",")}
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            times[name].append(fn())
            print(f"round {r} {name}: {times[name][-1]:.1f} ms/step ({time.perf_counter() - t0:.0f} s)", flush=True)
    first = next(iter(times))
    for name, ts in times.items():
        ratio = statistics.median(t / u for t, u in zip(ts, times[first]))
        print(f"{name}: median {statistics.median(ts):.1f} ms/step, ratio to {first} (median per round) {ratio:.3f}")


if __name__ == "__main__":
    main()
