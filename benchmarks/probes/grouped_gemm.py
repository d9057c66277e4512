#!/usr/bin/env python
"""Probe (round 10, issue 12): the experts' grouped GEMM in isolation, 2560 x 128 rows by 8 experts'
128 x 512 matrices (the matched configuration's encoder MoE layer), forward and gradient:

    .venv/bin/python benchmarks/probes/grouped_gemm.py

  take+einsum       the lab's form (ops.grouped_dot): each block of B rows times its expert's matrix,
                    gathered per block
  scan              a lax.scan over the blocks, indexing the expert's matrix in place (no gathered copy)
  ragged_dot        jax.lax.ragged_dot, 8 equal groups
  ideal per-expert  one batched product of equal 320-row segments per expert (what a ragged GEMM would
                    run; not expressible for real routing, whose segments are uneven)

Median of 5 timings of 10 calls each; max |difference| of the two block forms (bit-identical expected).
"""
import jax, jax.numpy as jnp, time, numpy as np
from jax import lax
m, k, n, g = 2560, 128, 512, 8
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32); w = jnp.asarray(rng.standard_normal((g, k, n)), jnp.float32)
def bench(name, f, *args):
    c = jax.jit(f).lower(*args).compile()
    for _ in range(3): jax.block_until_ready(c(*args))
    ts = []
    for _ in range(5):
        t = time.perf_counter(); [jax.block_until_ready(c(*args)) for _ in range(10)]; ts.append((time.perf_counter() - t) / 10)
    dt = sorted(ts)[2]
    print(f"{name:40s} {dt*1e3:7.2f} ms")
    return c(*args)
for B in (64, 128, 256):
    nb = m // B
    xb = x.reshape(nb, B, k); idx = jnp.asarray(np.repeat(np.arange(8), nb // 8 + 1)[:nb], jnp.int32)
    r1 = bench(f"B={B} take+einsum", lambda xb, w, idx: jnp.einsum("bmk,bkn->bmn", xb, jnp.take(w, idx, axis=0), precision="highest"), xb, w, idx)
    def scan_f(xb, w, idx):
        def body(c, xi):
            xblk, e = xi
            return c, jnp.dot(xblk, lax.dynamic_index_in_dim(w, e, keepdims=False), precision="highest")
        return lax.scan(body, None, (xb, idx))[1]
    r2 = bench(f"B={B} scan dynamic_index", scan_f, xb, w, idx)
    print("   max diff", float(jnp.max(jnp.abs(r1 - r2))))
    # grad wrt w and x
    def loss_take(xb, w, idx): return jnp.sum(jnp.einsum("bmk,bkn->bmn", xb, jnp.take(w, idx, axis=0), precision="highest") ** 2)
    def loss_scan(xb, w, idx): return jnp.sum(scan_f(xb, w, idx) ** 2)
    bench(f"B={B} take grad", jax.grad(loss_take, argnums=(0, 1)), xb, w, idx)
    bench(f"B={B} scan grad", jax.grad(loss_scan, argnums=(0, 1)), xb, w, idx)
xe = x.reshape(8, 320, k)
bench("ideal per-expert", lambda xe, w: jnp.einsum("emk,ekn->emn", xe, w, precision="highest"), xe, w)
bench("ideal per-expert grad", jax.grad(lambda xe, w: jnp.sum(jnp.einsum("emk,ekn->emn", xe, w, precision="highest") ** 2), argnums=(0, 1)), xe, w)
# jax.lax.ragged_dot: the grouped GEMM as one primitive (uneven groups allowed); XLA:CPU compiles it to one
# dot and a few fusions (jax 0.10.2), with no per-group loop.
gs = jnp.asarray([m // g] * g, jnp.int32)
bench("ragged_dot (equal groups)", lambda x, w, gs: jax.lax.ragged_dot(x, w, gs), x, w, gs)
