#!/usr/bin/env python
"""Probe (round 10, issue 12 item 1): does one seed's step get faster when its gradient is computed as R
independent chains, so that XLA:CPU's two threads have independent work?

    .venv/bin/python benchmarks/probes/split_batch.py vmap 1        # the default step
    .venv/bin/python benchmarks/probes/split_batch.py unrolled 2    # 2 half-batch chains, unrolled
    .venv/bin/python benchmarks/probes/split_batch.py vmap 2        # train.replicas = 2 as the lab runs it

`unrolled` runs Trainer._replica_grads with its vmap over the R shards written out as a Python loop (each
shard's loss and gradient traced separately, then stacked), so the program holds R data-independent chains. Results are NOT
those of R = 1 (each shard routes its own groups and draws its own keys): a probe of speed only. Prints the
compile time, the median ms/step of NB (env, default 6) blocks of the matched configuration, and the loss.
"""
import os, sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
os.environ["PRECISION_LAB_PROGRAM_CACHE"] = "0"
import jax, jax.numpy as jnp
jax.config.update("jax_enable_compilation_cache", False)
from lab_bench import BATCH, MATCHED, Program, run_for
from precision_lab import train as T

from unittest import mock

orig = T.Trainer._replica_grads


def unrolled_vmap(f):
    """vmap over axis 0 written out as a Python loop: one traced chain per slice, outputs stacked."""
    def g(*args):
        n = jax.tree.leaves(args)[0].shape[0]
        outs = [f(*jax.tree.map(lambda x: x[i], args)) for i in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return g


def unrolled(self, *args):  # the lab's own replica split, its vmap unrolled (the model itself has no vmap)
    with mock.patch.object(T.jax, "vmap", unrolled_vmap):
        return orig(self, *args)

mode = sys.argv[1]; R = int(sys.argv[2]) if len(sys.argv) > 2 else 1
cfgname = sys.argv[3] if len(sys.argv) > 3 else "matched"
if mode == "unrolled":
    T.Trainer._replica_grads = unrolled
model, src, tgt = (MATCHED, 128, 32) if cfgname == "matched" else ({"preset": "tiny"}, 64, 14)
run = run_for(model, "fp32", batch=BATCH)
import dataclasses
run = dataclasses.replace(run, train=dataclasses.replace(run.train, replicas=R))
p = Program(mode, run, k=5, src=src, tgt=tgt)
ts = [p.block() for _ in range(int(os.environ.get("NB", 6)))]
print(mode, R, cfgname, "compile", round(p.compile_s, 1), "ms/step", round(statistics.median(ts), 1), [round(t) for t in ts], "loss", p.last_loss, flush=True)
