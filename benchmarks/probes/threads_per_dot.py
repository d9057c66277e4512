#!/usr/bin/env python
"""Probe (round 11, issue 12 item 1): does XLA:CPU split one matmul over both cores, and do two
independent chains of matmuls run side by side?

    .venv/bin/python benchmarks/probes/threads_per_dot.py              # both cores
    taskset -c 0 .venv/bin/python benchmarks/probes/threads_per_dot.py # one core: the ratio is the answer

A chain of 8 (x @ [128, 512] -> tanh -> @ [512, 128]) blocks, the shape of the matched configuration's
FFN, on 4096 rows; the same rows as two independent 2048-row chains in one program; and one 2048-row chain.
Prints the median ms of 20 calls each and whether the two forms agree bit for bit.
"""
import statistics
import time

import jax
import jax.numpy as jnp


def median_ms(f, x, n: int = 20) -> float:
    jax.block_until_ready(f(x))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (4096, 128), jnp.float32)
    w1 = jax.random.normal(k[1], (128, 512), jnp.float32) / 11.3
    w2 = jax.random.normal(k[2], (512, 128), jnp.float32) / 22.6

    def chain(h):
        for _ in range(8):
            h = jnp.tanh(h @ w1) @ w2
        return h

    one = jax.jit(chain)
    two = jax.jit(lambda h: jnp.concatenate([chain(h[:2048]), chain(h[2048:])]))
    half = jax.jit(lambda h: chain(h[:2048]))
    print(f"one chain, 4096 rows:        {median_ms(one, x):7.2f} ms")
    print(f"two chains of 2048 rows:     {median_ms(two, x):7.2f} ms  "
          f"(bit-identical: {bool(jnp.array_equal(one(x), two(x)))})")
    print(f"one chain, 2048 rows:        {median_ms(half, x):7.2f} ms")


if __name__ == "__main__":
    main()
