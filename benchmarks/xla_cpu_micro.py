#!/usr/bin/env python
"""Micro-benchmarks behind two layout choices of the model on XLA:CPU (both in precision_lab/model/layers.py).

    .venv/bin/python benchmarks/xla_cpu_micro.py [--reps 50] [--json]

1. Summing a batch of attention-logit cotangents [16, 4, 128, 128] (x4 layers) over the batch axis, as the
   relative position bias gradient does: a reduce over the leading axis vs the pairwise halving
   `layers.sum_leading_pairwise` vs a matmul with a ones vector.
2. The per-head attention matmuls with token-major [B, L, H, K] operands vs heads-major [B, H, L, K] ones
   (what the Q/K/V projections now produce), and a 2048x128x512 matmul for scale.

Each program is jitted and timed alone (median of --reps calls after a warm-up), on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(f, *args, reps: int) -> float:
    import jax

    jf = jax.jit(f)
    jax.block_until_ready(jf(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(jf(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from precision_lab.model.layers import sum_leading_pairwise

    rng = np.random.default_rng(0)
    hi = jax.lax.Precision.HIGHEST
    cots = [jnp.asarray(rng.random((16, 4, 128, 128), np.float32)) for _ in range(4)]
    ones = jnp.ones((16,), jnp.float32)
    results = {
        "bias_grad_reduce_ms": timed(lambda gs: sum(g.sum(axis=0) for g in gs), cots, reps=args.reps),
        "bias_grad_pairwise_ms": timed(lambda gs: sum(sum_leading_pairwise(g)[0] for g in gs), cots, reps=args.reps),
        "bias_grad_ones_matmul_ms": timed(lambda gs: sum(jnp.einsum("bhqk,b->hqk", g, ones, precision=hi)
                                                         for g in gs), cots, reps=args.reps),
    }
    q_tok = jnp.asarray(rng.random((16, 128, 4, 32), np.float32))
    k_tok = jnp.asarray(rng.random((16, 128, 4, 32), np.float32))
    q_head, k_head = jnp.transpose(q_tok, (0, 2, 1, 3)), jnp.transpose(k_tok, (0, 2, 1, 3))
    probs = jnp.asarray(rng.random((16, 4, 128, 128), np.float32))
    attn_flop = 2 * 16 * 4 * 128 * 128 * 32
    for name, eq, a, b in (("logits_token_major", "bqhk,bthk->bhqt", q_tok, k_tok),
                           ("logits_heads_major", "bhqk,bhtk->bhqt", q_head, k_head),
                           ("values_token_major", "bhqt,bthk->bqhk", probs, k_tok),
                           ("values_heads_major", "bhqt,bhtk->bhqk", probs, k_head)):
        ms = timed(lambda x, y, eq=eq: jnp.einsum(eq, x, y, precision=hi), a, b, reps=args.reps)
        results[f"{name}_ms"] = ms
        results[f"{name}_gflops"] = attn_flop / ms / 1e6
    a, b = jnp.ones((2048, 128), jnp.float32), jnp.ones((128, 512), jnp.float32)
    ms = timed(lambda x, y: jnp.dot(x, y, precision=hi), a, b, reps=args.reps)
    results["matmul_2048x128x512_gflops"] = 2 * 2048 * 128 * 512 / ms / 1e6
    results = {k: round(v, 3) for k, v in results.items()}
    if args.json:
        print(json.dumps({"benchmark": "xla_cpu_micro", **results, "jax": jax.__version__}))
    else:
        for k, v in results.items():
            print(f"{k:34s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
