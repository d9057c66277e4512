#!/usr/bin/env python
"""Usage: PYTHONPATH=. python benchmarks/traced_format_compile.py GROUP FMT1,FMT2,... [micro|tiny]

Compile cost of the sensitivity map's programs: N formats of one component group as N static programs
(one member each, as the sweep would run them without traced formats) vs ONE traced program of N members.
CPU seconds (process time) of lowering + compiling the training chunk, eval and init, no persistent cache."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from precision_lab.config import run_config
from precision_lab.train import Trainer, hparams_of, member_sharding

group, fmts = sys.argv[1], sys.argv[2].split(",")
preset = sys.argv[3] if len(sys.argv) > 3 else "micro"
MICRO = {"model": {"d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "num_encoder_layers": 2,
                   "num_decoder_layers": 2, "num_experts": 4},
         "train": {"steps": 20, "chunk_steps": 10, "batch_size": 4, "eval_every": 0, "eval_batches": 1,
                   "checkpoint_every": 0}, "optim": {"warmup_steps": 2}}
TINY = {"model": {"preset": "tiny"}, "train": {"steps": 600, "chunk_steps": 50, "batch_size": 16, "eval_batches": 32,
        "eval_every": 0, "checkpoint_every": 0}, "optim": {"warmup_steps": 20, "lr": 3e-3, "schedule": "cosine"}}
base = MICRO if preset == "micro" else TINY

def compile_all(policies, seeds):
    runs = [run_config({**base, "policy": p}) for p in policies]
    t0p, t0w = time.process_time(), time.perf_counter()
    tr = Trainer(runs[0])
    hps = [hparams_of(r) for r in runs]
    state, keys = tr.init(seeds, hps)
    hp = {k: jnp.asarray([h[k] for h in hps], jnp.float32) for k in hps[0]}
    batches = tr.batches(seeds, 0, runs[0].train.chunk_steps)
    tr._chunk.lower(state, keys, hp, batches, jnp.int32(0)).compile()
    b = tr.dataset.eval_batches(1, runs[0].train.batch_size)[0]
    tr._eval.lower(state, keys, b).compile()
    return time.process_time() - t0p, time.perf_counter() - t0w

static = [f"fp32,{group}={f}" for f in fmts]
traced = [{"preset": "fp32", "traced_group": group, "traced_format": f} for f in fmts]
for rep in range(2):
    cpu = wall = 0.0
    for p in static:  # N programs, one member each
        c, w = compile_all([p], [0]); cpu += c; wall += w
    print(f"rep {rep} static: {len(static)} programs, compile {cpu:.1f} CPU-s, {wall:.1f} s wall", flush=True)
    c, w = compile_all(traced, [0] * len(traced))
    print(f"rep {rep} traced: 1 program of {len(traced)} members, compile {c:.1f} CPU-s, {w:.1f} s wall", flush=True)
