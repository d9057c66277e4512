#!/usr/bin/env python
"""Probe (round 10, issue 12 item 1): does one seed's step get faster when its gradient is computed as R
independent chains, so that XLA:CPU's two threads have independent work?

    .venv/bin/python benchmarks/probes/split_batch.py vmap 1        # the default step
    .venv/bin/python benchmarks/probes/split_batch.py unrolled 2    # 2 half-batch chains, unrolled
    .venv/bin/python benchmarks/probes/split_batch.py vmap 2        # train.replicas = 2 as the lab runs it

`unrolled` replaces Trainer._replica_grads by a Python loop over the R shards (each shard's loss and
gradient traced separately, then stacked), so the program holds R data-independent chains. Results are NOT
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

orig = T.Trainer._replica_grads
def unrolled(self, grad_fn, params, scale_state, probe, batch, key, hp):
    r = self.replicas
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"]), jnp.float32(1.0))
    keys = jax.random.split(key, r)
    res = []
    for i in range(r):
        shard = jax.tree.map(lambda x: x[i * x.shape[0] // r:(i + 1) * x.shape[0] // r], batch)
        w = jnp.maximum(jnp.sum(shard["loss_mask"]), 1.0) / n_total
        res.append(grad_fn(params, scale_state, probe, shard, keys[i], hp, (w, jnp.float32(1.0 / r))))
    st = lambda *xs: jnp.stack(xs)
    (losses, outs), (grads, scale_r, counts) = jax.tree.map(st, *[(l, o) for (l, o), _ in res]), jax.tree.map(st, *[g for _, g in res])
    new_scale_state = jax.tree.map(lambda x: jnp.max(x, axis=0), scale_r)
    mean = lambda x: jnp.mean(x, axis=0)
    out = outs._replace(ce_loss=jnp.sum(outs.ce_loss, 0), output_z_loss=jnp.sum(outs.output_z_loss, 0),
        output_lse_mean=jnp.sum(outs.output_lse_mean, 0), router_z_loss=mean(outs.router_z_loss),
        load_balancing_loss=mean(outs.load_balancing_loss),
        max_attention_logit=jnp.max(outs.max_attention_logit, axis=0),
        router={k: (jnp.max(v, axis=0) if k.startswith("max") else mean(v)) for k, v in outs.router.items()})
    return jnp.sum(losses), out, grads, new_scale_state, None if counts is None else jnp.sum(counts, 0)

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
