#!/usr/bin/env python
"""Probe (round 11, issue 12 items 1-2): how much of the step would a better grouped GEMM buy?

    .venv/bin/python benchmarks/probes/whatif_grouped.py [matched|quickstart] [seeds] [reps]

The experts' grouped GEMM (`ops.grouped_dot`: every block of 64 rows times its expert's gathered matrix)
is replaced, in the whole train step, by two products that a grouped GEMM can at best approach:

  per_expert  the P buffer rows cut into E equal segments, segment e times expert e's matrix: one batched
              product over the experts with no gathered weights (what a grouped GEMM whose experts hold
              P / E rows each would cost, e.g. a block-sparse kernel);
  windows     each expert's first NB / E blocks gathered into a window, one batched product over the
              experts, the blocks gathered back (overflow blocks left out: a lower bound of a two-tier
              grouped GEMM whose second tier, the overflow, would loop over the few remaining blocks);
  one_weight  every row times expert 0's matrix: one 2-D product (no gather, no per-expert weight gradient).

Both compute a different function (the losses printed differ): they bound the speed of the real thing, they
are not a lab mode. Programs are built in one process and timed interleaved (lab_bench.interleave: an
untimed block before each timed block of k steps); prints ms/step per rep, the median, and each variant's
median of per-rep ratios to `lab`.
"""
import contextlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)
from lab_bench import MATCHED, SRC_LEN, TGT_LEN, Program, env, interleave, run_for  # noqa: E402

from precision_lab import ops  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST


def _per_expert(a, b, index):  # a <f32>[NB, M, K] (NB*M divisible by E here), b <f32>[E, K, N]
    nb, m, k = a.shape
    e = b.shape[0]
    y = jnp.einsum("esk,ekn->esn", a.reshape(e, nb * m // e, k), b, precision=HIGHEST,
                   preferred_element_type=jnp.float32)
    return y.reshape(nb, m, -1)


def _windows(a, b, index):
    """The realistic half of a two-tier grouped GEMM: each expert's first NB // E blocks gathered into a
    window, one batched product over the experts, the blocks gathered back; blocks past an expert's window
    (overflow, which a real kernel would still have to compute) come back as zeros."""
    nb, m, k = a.shape
    e = b.shape[0]
    s1 = nb // e
    first = jnp.sum(index[None, :] < jnp.arange(e)[:, None], axis=1)  # (E,) first block of each expert
    win = jnp.minimum(first[:, None] + jnp.arange(s1)[None, :], nb - 1)  # (E, s1) block ids
    y = jnp.einsum("esk,ekn->esn", jnp.take(a, win, axis=0).reshape(e, s1 * m, k), b, precision=HIGHEST,
                   preferred_element_type=jnp.float32).reshape(e * s1, m, -1)
    j = jnp.arange(nb) - jnp.take(first, index, mode="clip")
    back = jnp.where(j < s1, jnp.minimum(index, e - 1) * s1 + j, e * s1)  # e * s1: out of range, zeros
    return jnp.take(y, back, axis=0, mode="fill", fill_value=0)


def _one_weight(a, b, index):
    return jnp.einsum("bmk,kn->bmn", a, b[0], precision=HIGHEST, preferred_element_type=jnp.float32)


@contextlib.contextmanager
def grouped_as(product):
    """Trace the step with ops._contract's grouped branch replaced by `product` (None: the lab's own)."""
    original = ops._contract

    def contract(cfg, a, b, index):
        if product is not None and cfg.kind == "grouped":
            return product(a, b, index)
        return original(cfg, a, b, index)

    ops._contract = contract
    try:
        yield
    finally:
        ops._contract = original


def main() -> None:
    cfg = sys.argv[1] if len(sys.argv) > 1 else "matched"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    model, src, tgt, k = (MATCHED, SRC_LEN, TGT_LEN, 10) if cfg == "matched" else ({"preset": "tiny"}, 64, 14, 20)
    progs = []
    variants = (("lab", None), ("per_expert", _per_expert), ("windows", _windows), ("one_weight", _one_weight))
    for name, product in variants:
        with grouped_as(product):
            progs.append(Program(name, run_for(model, "fp32"), k=k, src=src, tgt=tgt, seeds=seeds))
    interleave(progs, reps)
    print(f"{cfg}, {seeds} seed(s), CPU {env()['cpu']}, ms/step per rep (interleaved):")
    for p in progs:
        ratio = statistics.median(t / b for t, b in zip(p.times, progs[0].times))
        print(f"  {p.name:11s} median {statistics.median(p.times):7.1f}  ratio to lab {ratio:.2f}  "
              f"reps {[round(t, 1) for t in p.times]}  loss {p.last_loss:.4f}")


if __name__ == "__main__":
    main()
