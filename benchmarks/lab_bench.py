#!/usr/bin/env python
"""precision_lab's own train-step benchmarks, each measured as ratios inside ONE run, interleaved.

    .venv/bin/python benchmarks/lab_bench.py all --json > /tmp/lab.jsonl     # ~10 min on 2 cores
    .venv/bin/python benchmarks/lab_bench.py hf|policies|seeds|small|compile|accumulator|capacity [--reps 5] [--json]

Sections (each prints one JSON line with --json):
  hf        the lab's fp32 train step vs HuggingFace SwitchTransformersForConditionalGeneration at the matched
            configuration (see MATCHED below and hf_switch.py). HF runs in a worker process of its own venv
            (`hf_switch.py --serve`); the driver alternates timed blocks: lab, HF, lab, HF, ... so both see the
            same machine load. Also the JAX f32 2048^3 matmul peak, interleaved the same way.
  policies  fp32, bf16 (emulated: every op rounded), fp8-hybrid (delayed scaling) and native bf16 at the
            matched configuration and at the `tiny` preset, interleaved; ratios to fp32 of the same rep.
  seeds     1 vs 8 vmapped seeds (Trainer._chunk), tiny preset and the matched configuration.
  small     the `small` preset's fp32 train step: model FLOP utilisation against the matmul peak.
  accumulator  the matmul accumulator model (`acc=e8m13/128` on every matmul operand) vs fp32 and fp8-hybrid,
            `tiny` preset at the quick-start token lengths, interleaved.
  capacity  ST-MoE Table 9: step time at train capacity factor 2.0 over 1.25, `tiny` and `small`, sorted and
            dense expert dispatch, interleaved (`--presets micro --reps 1 --k 1`: the test's smallest mode).
  data      the training data of one step, 1 and 8 seeds: per-seed loop vs the joint walk of all seeds' chains.
  compile   compile time of a tiny train run (Trainer._chunk) in a fresh process: no persistent cache, cold
            cache, warm cache (jax_compilation_cache_dir, min compile time 0).

Every timed block is a call of the Trainer's jitted `_chunk` (a lax.scan over --k steps of the vmapped train
step), ended by block_until_ready; ms/step = block time / k. FLOPs: the matmul FLOPs of one train step
(forward + backward + optimizer), summed over the `dot` instructions of the compiled HLO (2 * output size *
contracted size; the scan body is one step), plus XLA's `cost_analysis()['flops']` (all ops). The cpu_guard
field is the CPU other processes used meanwhile (cores); compare ratios from the same run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpuguard import CpuGuard  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HF_PY = REPO / "benchmarks" / ".venv-hf" / "bin" / "python"

# The configuration matched to hf_switch.py's SwitchTransformers model (see RESULTS.md for the mapping):
# HF's expert_capacity 64 is per sequence and expert: group_size 128 (= one input sequence) and capacity
# factor 64 * 8 / 128 = 4.0. Tied embeddings with the d_model^-0.5 output scaling, ReLU FFN of width d_ff,
# top-1, every 2nd block sparse, z-loss and load-balance coefficients 1e-3 (HF's), AdamW lr 1e-3, wd 0.01.
MATCHED = {
    "preset": "tiny", "vocab_size": 512, "d_model": 128, "d_ff": 512, "num_heads": 4, "d_kv": 32,
    "num_encoder_layers": 4, "num_decoder_layers": 4, "num_experts": 8, "moe_every": 2, "routing": "top1",
    "ffn_type": "relu", "relu_flop_matched": False, "tie_embeddings": True, "group_size": 128,
    "train_capacity_factor": 4.0, "eval_capacity_factor": 4.0, "load_balance_coef": 1e-3,
    "router_z_loss_coef": 1e-3, "inputs_length": 128, "targets_length": 32,
}
MATCHED_OPTIM = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "schedule": "constant", "warmup_steps": 0,
                 "b2": 0.999}
BATCH, SRC_LEN, TGT_LEN = 16, 128, 32


# -- building and timing programs -----------------------------------------------------------------------------


def run_for(model: dict, policy: str, *, batch: int = BATCH, optim: dict | None = None):
    from precision_lab.config import run_config

    return run_config({"model": model, "optim": optim or MATCHED_OPTIM, "train": {"batch_size": batch},
                       "policy": policy})


def make_batches(k: int, members: int, batch: int, src: int, tgt: int, vocab: int, seed: int = 0) -> dict:
    """Random token batches <int32>[k, members, B, L] (ids 2.., no padding: every token is routed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    inp = rng.integers(2, vocab, (k, members, batch, src), dtype=np.int32)
    tgt_ids = rng.integers(2, vocab, (k, members, batch, tgt), dtype=np.int32)
    dec = np.concatenate([np.zeros((k, members, batch, 1), np.int32), tgt_ids[..., :-1]], -1)
    return {"inputs": inp, "decoder_inputs": dec, "targets": tgt_ids,
            "loss_mask": np.ones((k, members, batch, tgt), np.float32)}


class Program:
    """One compiled Trainer chunk (k steps, `seeds` vmapped members) and its state, ready to time."""

    def __init__(self, name: str, run, *, seeds: int = 1, k: int = 5, src: int = SRC_LEN, tgt: int = TGT_LEN,
                 dataset_batches: bool = False):
        """dataset_batches: the run's own Dataset draws the batches (the shapes `precision-lab train` sees:
        targets_length from the data layout, sentinel masks) instead of uniform random tokens."""
        import jax
        import jax.numpy as jnp

        from precision_lab.train import Trainer, hparams_of, member_sharding

        self.name, self.k, self.seeds = name, k, seeds
        trainer = Trainer(run)
        self.state, self.seed_keys = trainer.init(list(range(seeds)))
        self.hps = {n: jnp.asarray([v] * seeds, jnp.float32) for n, v in hparams_of(run).items()}
        self.trainer, self.seed_list = trainer, list(range(seeds))
        self.batches = (trainer.batches(self.seed_list, 0, k) if dataset_batches else
                        make_batches(k, seeds, run.train.batch_size, src, tgt, trainer.model_cfg.vocab_size))
        # Members spread over the host devices exactly as precision_lab.train.train spreads them.
        self.member_devices, place = member_sharding(seeds)
        self.place = place
        self.state, self.seed_keys, self.hps = place(self.state), place(self.seed_keys), place(self.hps)
        self.batches = place(jax.device_put(self.batches), axis=1)
        t0 = time.perf_counter()
        lowered = trainer._chunk.lower(self.state, self.seed_keys, self.hps, self.batches, jnp.int32(0))
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.flops = hlo_flops(self.compiled)
        if not self.flops["dots"]:  # a GPU program: its dots became library calls; count the lowered ones
            low = hlo_flops(lowered.as_text(dialect="hlo"))
            self.flops.update(matmul_gflop_per_step=low["matmul_gflop_per_step"], dots=low["dots"],
                              dots_counted_in="lowered HLO")
        self.times: list[float] = []
        self.warm_times: list[float] = []  # the untimed block before each timed one (see interleave)
        self.guards: list[dict] = []
        self.block()  # first execution (allocation, thread pools) is not timed

    def block(self) -> float:
        import jax
        import jax.numpy as jnp

        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.seed_keys, self.hps, self.batches, jnp.int32(0))
        jax.block_until_ready(metrics)
        self.last_loss = float(jax.device_get(metrics["loss"]).reshape(-1)[-1])
        return (time.perf_counter() - t0) * 1e3 / self.k

    def warm(self) -> None:
        self.warm_times.append(self.block())

    def timed(self) -> float:
        with CpuGuard() as g:
            ms = self.block()
        self.times.append(ms)
        self.guards.append(g.result())
        return ms

    def summary(self) -> dict:
        return {"name": self.name, "seeds": self.seeds, "member_devices": self.member_devices, "k": self.k,
                **stats(self.times),
                "compile_s": round(self.compile_s, 2), **self.flops,
                "first_block_after_switch_ms_median": round(statistics.median(self.warm_times), 3)
                if self.warm_times else None,
                "other_busy_cores_median": statistics.median(g.get("other_busy_cores", 0) for g in self.guards)
                if self.guards else None, "final_loss": self.last_loss}


def stats(ts: list[float]) -> dict:
    med = statistics.median(ts)
    return {"ms_per_step_median": round(med, 3), "ms_per_step_min": round(min(ts), 3),
            "ms_per_step_max": round(max(ts), 3), "reps": [round(t, 2) for t in ts],
            "spread_pct": round(100 * (max(ts) - min(ts)) / med, 1)}


def hlo_flops(compiled) -> dict:
    """Matmul FLOPs of the compiled program's dot instructions (each counted once: the scan body is one
    step) and XLA's cost-analysis FLOPs (every op, also once per loop body). `compiled` may also be HLO
    text: a GPU's compiled program has cuBLAS custom calls instead of dots, so device_check.py counts the
    dots of the lowered (unoptimised) program."""
    txt = compiled if isinstance(compiled, str) else compiled.as_text()
    shapes = {}
    for m in re.finditer(r"%?([\w.\-]+) = \w+\[([\d,]*)\]", txt):
        shapes[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
    dot_flops = 0
    n_dots = 0
    for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?[\w.\-]+\)[^\n]*?lhs_contracting_dims=\{([\d,]*)\}",
                         txt):
        out = [int(d) for d in m.group(1).split(",") if d]
        lhs = shapes.get(m.group(2))
        if lhs is None:
            continue
        contracted = 1
        for d in m.group(3).split(","):
            if d:
                contracted *= lhs[int(d)]
        size = 1
        for d in out:
            size *= d
        dot_flops += 2 * size * contracted
        n_dots += 1
    try:
        ca = compiled.cost_analysis()  # AttributeError for HLO text: no cost analysis
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops", 0.0))
    except Exception:  # noqa: BLE001 - cost analysis is optional
        xla_flops = None
    return {"matmul_gflop_per_step": round(dot_flops / 1e9, 4), "dots": n_dots,
            "xla_cost_gflop_per_step": None if xla_flops is None else round(xla_flops / 1e9, 4)}


class UserPath(Program):
    """A Program timed as `precision-lab train` runs it (precision_lab.train.train's loop): each block draws
    its chunk's data with the run's Dataset, places it, runs the chunk and fetches the metrics to the host.
    prefetch=True draws the next chunk's data while the chunk runs (what train() does), False after it."""

    def __init__(self, name: str, run, *, prefetch: bool, **kw):
        self.prefetch, self.step0 = prefetch, 0
        super().__init__(name, run, dataset_batches=True, **kw)

    def _data(self):
        self.step0 += self.k
        return self.place(self.trainer.batches(self.seed_list, self.step0, self.k), axis=1)

    def block(self) -> float:
        import jax
        import jax.numpy as jnp

        t0 = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.seed_keys, self.hps, self.batches,
                                            jnp.int32(self.step0))
        if self.prefetch:
            self.batches = self._data()
        metrics = jax.device_get(metrics)
        if not self.prefetch:
            self.batches = self._data()
        self.last_loss = float(metrics["loss"].reshape(-1)[-1])
        return (time.perf_counter() - t0) * 1e3 / self.k


class MatmulPeak:
    """JAX f32 n^3 matmul (the machine's peak for these ratios), timed in blocks like a Program."""

    def __init__(self, n: int = 2048, calls: int = 5):
        import jax
        import jax.numpy as jnp

        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        self.a = jax.random.normal(ka, (n, n), jnp.float32)
        self.b = jax.random.normal(kb, (n, n), jnp.float32)
        self.f = jax.jit(lambda x, y: x @ y)
        self.f(self.a, self.b).block_until_ready()
        self.n, self.calls, self.times = n, calls, []

    def warm(self) -> None:
        self.f(self.a, self.b).block_until_ready()

    def timed(self) -> float:
        t0 = time.perf_counter()
        for _ in range(self.calls):
            self.f(self.a, self.b).block_until_ready()
        ms = (time.perf_counter() - t0) * 1e3 / self.calls
        self.times.append(ms)
        return ms

    def summary(self) -> dict:
        med = statistics.median(self.times)
        return {"n": self.n, "gflops_median": round(2 * self.n**3 / med / 1e6, 1),
                "gflops_best": round(2 * self.n**3 / min(self.times) / 1e6, 1), **stats(self.times)}


class HFWorker:
    """hf_switch.py --serve in the HF venv: a warmed-up HF train step, timed in blocks on request."""

    def __init__(self, steps: int, huge_pages: bool | None = None, extra_args: tuple[str, ...] = ()):
        """huge_pages: run HF with glibc's malloc.hugetlb tunable on/off (None: this process's setting);
        extra_args: hf_switch.py options (e.g. --tgt-len 29)."""
        if not HF_PY.exists():
            raise SystemExit(f"{HF_PY} missing: run bash benchmarks/setup_hf.sh first")
        child_env = dict(os.environ)
        if huge_pages is not None:
            rest = [t for t in child_env.get("GLIBC_TUNABLES", "").split(":") if t and "malloc.hugetlb" not in t]
            child_env["GLIBC_TUNABLES"] = ":".join(rest + (["glibc.malloc.hugetlb=1"] if huge_pages else []))
        self.p = subprocess.Popen([str(HF_PY), str(REPO / "benchmarks" / "hf_switch.py"), "--serve", *extra_args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env)
        self.info = json.loads(self.p.stdout.readline())
        self.info["glibc_tunables"] = child_env.get("GLIBC_TUNABLES", "")
        self.steps, self.times, self.guards, self.warm_times = steps, [], [], []

    def _request(self) -> dict:
        self.p.stdin.write(f"time {self.steps}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def warm(self) -> None:
        self.warm_times.append(self._request()["ms_per_step"])

    def timed(self) -> float:
        r = self._request()
        self.times.append(r["ms_per_step"])
        self.guards.append(r["cpu_guard"])
        return r["ms_per_step"]

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except OSError:
            pass
        self.p.wait(timeout=60)


def interleave(items: list, reps: int) -> None:
    """reps rounds of (A, B, C, ...): each timed block is preceded by one untimed block of the same program.

    Why the untimed block: the first block of a program after another program ran can be slower (caches
    and the huge-page pool are the other program's; a pause in between does not help): each Program and
    the HF worker record it as `first_block_after_switch_ms_median`. A training run executes one program
    for thousands of steps, so steady state is what a step costs; interleaving still makes slow drifts
    of the shared machine hit every program alike."""
    for _ in range(reps):
        for it in items:
            it.warm()
            it.timed()


def env() -> dict:
    import jax

    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu": cpu, "nproc": os.cpu_count(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
            "loadavg": open("/proc/loadavg").read().split()[:3]}


# -- sections ---------------------------------------------------------------------------------------------------


def section_hf(args) -> dict:
    """The lab (sorted dispatch, the default; and the dense one-hot dispatch) vs HF, with HF also run
    with glibc's malloc.hugetlb tunable flipped (the lab process has whatever this process was started
    with: run_lab.sh runs this section both ways)."""
    peak = MatmulPeak()
    lab = Program("lab fp32 (matched)", run_for(MATCHED, "fp32"), k=args.k)
    dense = Program("lab fp32 dense dispatch", run_for({**MATCHED, "expert_dispatch": "dense"}, "fp32"), k=args.k)
    huge = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
    hf, hf_flipped = HFWorker(steps=args.k, huge_pages=huge), HFWorker(steps=args.k, huge_pages=not huge)
    try:
        interleave([lab, dense, hf, hf_flipped, peak], args.reps)
    finally:
        hf.close()
        hf_flipped.close()
    lab_s, peak_s = lab.summary(), peak.summary()
    hf_s = {**stats(hf.times), **hf.info, "first_block_after_switch_ms_median": statistics.median(hf.warm_times),
            "other_busy_cores_median": statistics.median(g.get("other_busy_cores", 0) for g in hf.guards)}
    ratios = [h / lv for h, lv in zip(hf.times, lab.times)]
    lab_ms = lab_s["ms_per_step_median"]
    hf_flipped_s = {**stats(hf_flipped.times), "glibc_tunables": hf_flipped.info["glibc_tunables"]}
    return {
        "benchmark": "lab_vs_hf_switch", "lab": lab_s, "hf": hf_s, "peak": peak_s,
        "lab_dense_dispatch": {**dense.summary(), "over_sorted_median": round(statistics.median(
            d / s_ for d, s_ in zip(dense.times, lab.times)), 3)},
        "hf_huge_pages_flipped": hf_flipped_s,
        "speedup_hf_over_lab_median": round(statistics.median(ratios), 3),
        "speedup_per_rep": [round(r, 3) for r in ratios],
        "lab_gflops": round(lab_s["matmul_gflop_per_step"] / lab_ms * 1e3, 1),
        "lab_fraction_of_peak": round(lab_s["matmul_gflop_per_step"] / lab_ms * 1e3 / peak_s["gflops_median"], 3),
        # The same useful work HF does (its FlopCounter count: routed tokens only), per lab step time:
        "lab_fraction_of_peak_hf_flops": round(hf.info["gflop_per_step_warm"] / lab_ms * 1e3 / peak_s["gflops_median"], 3),
        "hf_fraction_of_peak": round(hf.info["gflop_per_step_warm"] / hf_s["ms_per_step_median"] * 1e3
                                     / peak_s["gflops_median"], 3),
        "env": env(),
    }


def section_userpath(args) -> dict:
    """Issue 12 item 1: the fp32 step as `precision-lab train` runs it (the run's Dataset draws the data,
    telemetry and the shadow router included, metrics fetched every chunk; 16 x (128 + 29) tokens, the data
    layout's target length) vs HF's train step at the same token lengths, interleaved; also the same
    loop without the data prefetch, and the bare compiled chunk on fixed batches (no data, no fetch)."""
    run = run_for(MATCHED, "fp32")
    user = UserPath("lab user path (prefetch)", run, prefetch=True, k=args.k)
    src, tgt = (int(user.batches[n].shape[-1]) for n in ("inputs", "targets"))  # the data layout's lengths
    nopre = UserPath("lab user path (no prefetch)", run, prefetch=False, k=args.k)
    bare = Program("lab bare chunk", run, k=args.k, src=src, tgt=tgt)
    hf = HFWorker(steps=args.k, extra_args=("--src-len", str(src), "--tgt-len", str(tgt)))
    try:
        interleave([user, nopre, bare, hf], args.reps)
    finally:
        hf.close()
    out = {"benchmark": "lab_user_path_vs_hf", "tokens": [src, tgt], "batch": BATCH,
           "hf": {**stats(hf.times), **hf.info}}
    for p in (user, nopre, bare):
        r = [h / t for h, t in zip(hf.times, p.times)]
        out[p.name] = {**p.summary(), "hf_over_lab_median": round(statistics.median(r), 3),
                       "hf_over_lab_min_max": [round(min(r), 3), round(max(r), 3)]}
    t0 = time.perf_counter()
    for i in range(3):
        user.trainer.batches(user.seed_list, 1000 + i * args.k, args.k)
    out["data_ms_per_step"] = round((time.perf_counter() - t0) * 1e3 / (3 * args.k), 3)
    out["cpu_model"] = env()["cpu"]
    out["env"] = env()
    return out


def matched_sets() -> list[str]:
    """The matched configuration as `precision-lab train --preset tiny` options (the --set values)."""
    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in MATCHED.items() if k != "preset"]
    return sets + [f"optim.{k}={v}" for k, v in MATCHED_OPTIM.items()]


def cli_run(args, seeds: int, sets: list[str]) -> dict:
    """One `precision-lab train` in a fresh process: the timing of its summary.json."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "precision_lab.cli", "train", "--preset", "tiny", "--steps", str(args.cli_steps),
               "--batch-size", str(BATCH), "--seeds", str(seeds), "--no-progress", "--out", d,
               "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
        for kv in sets:
            cmd += ["--set", kv]
        t0 = time.perf_counter()
        with CpuGuard() as g:
            cp = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if cp.returncode:
            raise SystemExit(cp.stderr[-3000:])
        timing = json.loads((Path(d) / "summary.json").read_text())["timing"]
    return {**timing, "step_ms": round(timing["step_s"] * 1e3, 2), "process_s": round(time.perf_counter() - t0, 1),
            "cpu_guard": g.result(), "command": " ".join(cmd)}


def section_cli(args) -> dict:
    """`precision-lab train` itself (a fresh process, as a user runs it), fp32, 1 seed and 8 seeds, `--reps`
    rounds: the timing of its summary.json (step_s: wall per step after the first chunk, the data the loop
    could not overlap included). --cli-config matched (default): the matched configuration, with one block
    of HF's train step (at the token lengths of the run's data) after each round, so HF time / lab time per
    round is issue 12 item 1's measure, interleaved; quickstart: the quick-start model, `--preset tiny
    --batch-size 16` and nothing else (item 2 names it), no HF."""
    matched = args.cli_config == "matched"
    sets = matched_sets() if matched else []
    hf, tokens = None, None
    if matched:
        from precision_lab.train import Trainer

        probe = Trainer(run_for(MATCHED, "fp32")).batches([0], 0, 1)  # the data layout's token lengths
        tokens = [int(probe[n].shape[-1]) for n in ("inputs", "targets")]
        hf = HFWorker(steps=args.hf_steps, extra_args=("--src-len", str(tokens[0]), "--tgt-len", str(tokens[1])))
    runs: dict[str, list[dict]] = {"1 seed": [], "8 seeds": []}
    try:
        for _ in range(args.reps):
            for name, seeds in (("1 seed", 1), ("8 seeds", 8)):
                runs[name].append(cli_run(args, seeds, sets))
            if hf is not None:
                hf.warm()
                hf.timed()
    finally:
        if hf is not None:
            hf.close()
    out = {"benchmark": "cli_train", "config": args.cli_config, "reps": args.reps, "runs": {}}
    for name, rs in runs.items():
        out["runs"][name] = {**stats([r["step_ms"] for r in rs]),
                             "data_ms_median": round(statistics.median(r["data_s"] for r in rs) * 1e3, 2),
                             "first_chunk_s_median": round(statistics.median(r["first_chunk_s"] for r in rs), 2),
                             "process_s_median": statistics.median(r["process_s"] for r in rs),
                             "member_devices": rs[0]["member_devices"], "command": rs[0]["command"]}
    per_rep = [e / o for e, o in zip(out["runs"]["8 seeds"]["reps"], out["runs"]["1 seed"]["reps"])]
    out["cost_8_over_1_median"] = round(statistics.median(per_rep), 3)
    out["cost_8_over_1_min_max"] = [round(min(per_rep), 3), round(max(per_rep), 3)]
    if hf is not None:
        r = [h / c for h, c in zip(hf.times, out["runs"]["1 seed"]["reps"])]
        out["tokens"] = tokens
        out["hf"] = {**stats(hf.times), **hf.info}
        out["hf_over_lab_median"] = round(statistics.median(r), 3)
        out["hf_over_lab_min_max"] = [round(min(r), 3), round(max(r), 3)]
        out["hf_over_lab_per_rep"] = [round(x, 3) for x in r]
    out["cpu_model"] = env()["cpu"]
    out["env"] = env()
    return out


POLICIES = ["fp32", "bf16", "fp8-hybrid", "bf16,mode=native"]


def ratios_to_first(progs) -> dict:
    """Each program's summary plus its per-rep time ratio to the first program (fp32) of the same rep."""
    base = progs[0].times
    res = {}
    for p in progs:
        r = [t / b for t, b in zip(p.times, base)]
        res[p.name] = {**p.summary(), "ratio_to_fp32_median": round(statistics.median(r), 3),
                       "ratio_to_fp32_min_max": [round(min(r), 3), round(max(r), 3)]}
    return res


def section_policies(args) -> dict:
    out = {"benchmark": "policy_cost", "configs": {}}
    for cfg_name, model, batch, src, tgt in (("matched", MATCHED, BATCH, SRC_LEN, TGT_LEN),
                                             ("tiny", {"preset": "tiny"}, BATCH, 128, 32)):
        progs = [Program(p, run_for(model, p, batch=batch), k=args.k, src=src, tgt=tgt) for p in POLICIES]
        interleave(progs, args.reps)
        out["configs"][cfg_name] = ratios_to_first(progs)
    out["env"] = env()
    return out


def section_seeds(args) -> dict:
    out = {"benchmark": "vmapped_seeds", "configs": {}}
    # "quickstart" is what the quick-start sweep trains (tiny, 16 x (64 + 14) tokens); the other two use
    # 16 x (128 + 32) tokens like the matched configuration.
    for cfg_name, model, src, tgt in (("quickstart", {"preset": "tiny"}, 64, 14), ("tiny", {"preset": "tiny"}, 128, 32),
                                      ("matched", MATCHED, SRC_LEN, TGT_LEN)):
        progs = [Program(f"{cfg_name} x{s}", run_for(model, "fp32"), seeds=s, k=args.k, src=src, tgt=tgt)
                 for s in (1, 8)]
        interleave(progs, args.reps)
        r = [b / a for a, b in zip(progs[0].times, progs[1].times)]
        out["configs"][cfg_name] = {"1 seed": progs[0].summary(), "8 seeds": progs[1].summary(),
                                    "cost_8_over_1_median": round(statistics.median(r), 3),
                                    "cost_8_over_1_min_max": [round(min(r), 3), round(max(r), 3)]}
    out["env"] = env()
    return out


def section_small(args) -> dict:
    peak = MatmulPeak()
    prog = Program("small fp32", run_for({"preset": "small"}, "fp32", optim={"name": "adamw", "lr": 1e-3}),
                   k=args.k, src=128, tgt=32)
    interleave([prog, peak], args.reps)
    s, p = prog.summary(), peak.summary()
    mfu = [s["matmul_gflop_per_step"] / t * 1e3 / (2 * peak.n**3 / pt / 1e6) for t, pt in zip(prog.times, peak.times)]
    return {"benchmark": "small_mfu", "small": s, "peak": p,
            "mfu_median": round(statistics.median(mfu), 3), "mfu_per_rep": [round(m, 3) for m in mfu],
            "mfu_of_medians": round(s["matmul_gflop_per_step"] / s["ms_per_step_median"] * 1e3 / p["gflops_median"], 3),
            "env": env()}


_COMPILE_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
import jax
cache = sys.argv[1]
import jax.numpy as jnp
from precision_lab.config import run_config
from precision_lab.train import Trainer, enable_compilation_cache, hparams_of
if cache != "none":  # as every precision-lab command: jax's cache and the program cache beside it
    enable_compilation_cache(cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
run = run_config({"policy": sys.argv[3], "train": {"batch_size": 16, "chunk_steps": 10}})
tr = Trainer(run)
state, sk = tr.init([0])
hps = {n: jnp.asarray([v], jnp.float32) for n, v in hparams_of(run).items()}
b = tr.batches([0], 0, 10)
t0 = time.perf_counter()
state, m = tr._chunk(state, sk, hps, b, jnp.int32(0)); jax.block_until_ready(m)
first = time.perf_counter() - t0
ts = []
for i in range(3):
    t0 = time.perf_counter()
    state, m = tr._chunk(state, sk, hps, b, jnp.int32(10 * (i + 1))); jax.block_until_ready(m)
    ts.append(time.perf_counter() - t0)
step = sorted(ts)[1]
print(json.dumps({"first_chunk_s": first, "chunk_s": step, "step_ms": step * 100,
                  "compile_s": first - step, "process_s": time.perf_counter() - t_start}))
"""


def section_compile(args) -> dict:
    """Fresh processes: each measures the first chunk call (compile + 10 steps) and later chunks."""
    out = {"benchmark": "compile_time", "note": "tiny preset, quick-run defaults, chunk of 10 steps", "policies": {}}
    for policy in ("fp32", "bf16"):
        # warm_cache: jax's persistent cache and the program cache (precision_lab.program_cache) both warm,
        # what a rerun gets; warm_jax_cache_only: the program cache off (PRECISION_LAB_PROGRAM_CACHE=0), the
        # path before it existed (trace and lower the model, then look the program up in jax's cache).
        rows = {"no_cache": [], "cold_cache": [], "warm_cache": [], "warm_jax_cache_only": []}
        for _ in range(args.compile_reps):
            with tempfile.TemporaryDirectory() as cache:
                for label, arg in (("no_cache", "none"), ("cold_cache", cache), ("warm_cache", cache),
                                   ("warm_jax_cache_only", cache)):
                    child_env = dict(os.environ, PRECISION_LAB_PROGRAM_CACHE="0" if label == "warm_jax_cache_only" else "1")
                    cp = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, arg, str(Path(__file__).parent),
                                         policy], capture_output=True, text=True, cwd=REPO, env=child_env)
                    if cp.returncode:
                        raise SystemExit(cp.stderr[-3000:])
                    rows[label].append(json.loads(cp.stdout.strip().splitlines()[-1]))
        res = {}
        for label, rs in rows.items():
            res[label] = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
            res[label]["compile_s_all"] = [round(r["compile_s"], 2) for r in rs]
        out["policies"][policy] = res
    out["env"] = env()
    return out


def section_gain(args) -> dict:
    """This round's emulation speed-ups, before/after in one run: the "before" programs are traced with the
    short bf16-like rounding sequence (quantize._wide_ieee_fast_path) and the no-op-rounding skips
    (ops._already) switched off, which is the code as it was; both give bit-identical results (tests)."""
    import precision_lab.ops as ops_mod
    import precision_lab.rounding as q_mod

    fast, already = q_mod._wide_ieee_fast_path, ops_mod._already
    variants = {"before": (lambda *a: False, lambda *a: False), "fast rounding only": (fast, lambda *a: False),
                "after": (fast, already)}
    progs = [Program("fp32", run_for(MATCHED, "fp32"), k=args.k)]
    try:
        for policy in ("bf16", "fp8-hybrid"):
            for label, (f, a) in variants.items():
                q_mod._wide_ieee_fast_path, ops_mod._already = f, a
                progs.append(Program(f"{policy} {label}", run_for(MATCHED, policy), k=args.k))
    finally:
        q_mod._wide_ieee_fast_path, ops_mod._already = fast, already
    interleave(progs, args.reps)
    return {"benchmark": "emulation_gain", "config": "matched", "programs": ratios_to_first(progs), "env": env()}


def section_fp8cast(args) -> dict:
    """Round 12: the saturating narrow-format cast's short path (rounding._narrow_saturate_fast_path, the
    cast of every scaled fp8 recipe), before/after in one run: "before" traces fp8-hybrid with it switched
    off (the general rounding path, as the code was); both give bit-identical results (tests/test_quantize.py)."""
    import precision_lab.rounding as q_mod

    fast = q_mod._narrow_saturate_fast_path
    out = {"benchmark": "fp8_cast_gain", "configs": {}}
    for cfg_name, model, src, tgt in (("matched", MATCHED, SRC_LEN, TGT_LEN), ("tiny", {"preset": "tiny"}, 128, 32)):
        progs = [Program("fp32", run_for(model, "fp32"), k=args.k, src=src, tgt=tgt)]
        try:
            for label, f in (("fp8-hybrid before", lambda *a: False), ("fp8-hybrid after", fast)):
                q_mod._narrow_saturate_fast_path = f
                progs.append(Program(label, run_for(model, "fp8-hybrid"), k=args.k, src=src, tgt=tgt))
        finally:
            q_mod._narrow_saturate_fast_path = fast
        interleave(progs, args.reps)
        out["configs"][cfg_name] = ratios_to_first(progs)
    out["cpu_model"] = env()["cpu"]
    out["env"] = env()
    return out


def section_blocks(args) -> dict:
    """The sorted dispatch's block size (rows per grouped-GEMM block): padding vs matmul efficiency."""
    out = {"benchmark": "expert_block_size", "configs": {}}
    for cfg_name, model, src, tgt in (("matched", MATCHED, SRC_LEN, TGT_LEN), ("quickstart", {"preset": "tiny"}, 64, 14)):
        progs = [Program(f"block {b}", run_for({**model, "expert_block_size": b}, "fp32"), k=args.k, src=src, tgt=tgt)
                 for b in (16, 32, 64, 128)]
        interleave(progs, args.reps)
        out["configs"][cfg_name] = {p.name: p.summary() for p in progs}
    out["env"] = env()
    return out


def _no_shadow(x_router, w_router, *, k, shift=True):
    """router.shadow_expert_index replaced: no float32 shadow router (the flip rate against a constant)."""
    import jax.numpy as jnp

    return jnp.zeros((*x_router.shape[:-1], k), jnp.int32)


def _no_telemetry(*a, **kw):
    """moe._telemetry replaced: every router statistic a constant."""
    import jax.numpy as jnp

    import precision_lab.model.moe as moe_mod

    return {name: jnp.float32(0.0) for name in moe_mod.TELEMETRY}


@contextlib.contextmanager
def router_telemetry(shadow: bool = True, statistics_: bool = True):
    """Trace programs inside with the shadow router and/or the router statistics replaced by constants, so
    the rest of the program is the same (what the telemetry costs; a bound, not a lab mode)."""
    import precision_lab.model.moe as moe_mod
    import precision_lab.router as router_mod

    saved = router_mod.shadow_expert_index, moe_mod._telemetry
    router_mod.shadow_expert_index = saved[0] if shadow else _no_shadow
    moe_mod._telemetry = saved[1] if statistics_ else _no_telemetry
    try:
        yield
    finally:
        router_mod.shadow_expert_index, moe_mod._telemetry = saved


def section_telemetry(args) -> dict:
    """What the per-step telemetry costs at the matched configuration (fp32, the user's default) and for the
    quick-start model: the full step, the step without the float32 shadow router (flip rate against a
    constant), and without any router telemetry (every router statistic a constant). The variants are
    traced with the model's telemetry functions replaced, so the rest of the program is the same."""
    out = {"benchmark": "telemetry_cost", "configs": {}}
    for cfg_name, model, src, tgt in (("matched", MATCHED, SRC_LEN, TGT_LEN), ("quickstart", {"preset": "tiny"}, 64, 14)):
        progs = []
        for label, shadow, stats_ in (("full", True, True), ("no shadow router", False, True),
                                      ("no router telemetry", True, False)):
            with router_telemetry(shadow, stats_):
                progs.append(Program(label, run_for(model, "fp32"), k=args.k, src=src, tgt=tgt))
        interleave(progs, args.reps)
        out["configs"][cfg_name] = ratios_to_first(progs)
    out["env"] = env()
    return out


ACC_POLICIES = ["fp32", "fp32,operands=fp32:acc=e8m13/128", "fp32,operands=fp32:acc=e8m13",
                "fp8-hybrid", "fp8-hybrid,operands=fp8_e4m3fn:delayed:saturate:acc=e8m13/128"]


def section_accumulator(args) -> dict:
    """The matmul accumulator model's cost (ops.matmul_accumulated: every model matmul, forward, dgrad and
    wgrad, summed in blocks of 32 with an e8m13 running sum, promoted to float32 every 128 or never) on the
    `tiny` preset at the quick-start token lengths (16 x (64 + 14)), interleaved with fp32 and fp8-hybrid;
    ratios to fp32 of the same rep."""
    progs = [Program(p, run_for({"preset": "tiny"}, p, batch=BATCH), k=args.k, src=64, tgt=14) for p in ACC_POLICIES]
    interleave(progs, args.reps)
    return {"benchmark": "accumulator_cost", "config": "tiny (16 x (64 + 14) tokens)",
            "programs": ratios_to_first(progs), "env": env()}


CAPACITY_FACTORS = (1.25, 2.0)
# name -> (model fields, AdamW lr); "micro" (the sweep smoke test's model shape) is the test's smallest mode
CAPACITY_PRESETS = {
    "tiny": ({"preset": "tiny"}, 1e-2),
    "small": ({"preset": "small"}, 1e-3),
    "micro": ({"preset": "tiny", "d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "num_encoder_layers": 2,
               "num_decoder_layers": 2, "num_experts": 4}, 1e-2),
}


def section_capacity(args) -> dict:
    """ST-MoE Table 9: step time at train capacity factor 2.0 over 1.25 (ST-MoE-L 2.447 / 2.397 s = 1.02,
    printed +7%; ST-MoE-32B 4.819 / 4.244 s = 1.14), for each preset of --presets and both expert dispatches
    (sorted: grouped GEMM over the kept assignments only; dense: one-hot einsums over every expert's C
    slots, whose expert matmuls grow with C, i.e. with the capacity factor). fp32, one seed, batches drawn by
    the run's own Dataset (the token lengths, padding and routing `precision-lab train` sees). The four
    programs of a preset are interleaved; each ratio is CF 2.0's time over CF 1.25's time of the same dispatch
    and the same rep."""
    out = {"benchmark": "capacity_step_time", "capacity_factors": list(CAPACITY_FACTORS), "configs": {}}
    for preset in args.presets.split(","):
        if preset not in CAPACITY_PRESETS:
            raise SystemExit(f"--presets: unknown preset {preset!r}; valid: {', '.join(CAPACITY_PRESETS)}")
        progs = {}
        for dispatch in ("sorted", "dense"):
            for cf in CAPACITY_FACTORS:
                fields, lr = CAPACITY_PRESETS[preset]
                model = {**fields, "expert_dispatch": dispatch, "train_capacity_factor": cf}
                run = run_for(model, "fp32", optim={"name": "adamw", "lr": lr})
                progs[dispatch, cf] = Program(f"{preset} {dispatch} CF {cf}", run, k=args.k, dataset_batches=True)
        interleave(list(progs.values()), args.reps)
        res = {}
        lo_cf, hi_cf = CAPACITY_FACTORS
        for dispatch in ("sorted", "dense"):
            lo, hi = progs[dispatch, lo_cf], progs[dispatch, hi_cf]
            r = [b / a for a, b in zip(lo.times, hi.times)]
            res[dispatch] = {f"CF {lo_cf}": lo.summary(), f"CF {hi_cf}": hi.summary(),
                             "ratio_median": round(statistics.median(r), 3),
                             "ratio_min_max": [round(min(r), 3), round(max(r), 3)],
                             "ratio_per_rep": [round(x, 3) for x in r],
                             "matmul_gflop_ratio": round(hi.flops["matmul_gflop_per_step"]
                                                         / max(lo.flops["matmul_gflop_per_step"], 1e-12), 3)}
        out["configs"][preset] = res
    out["paper"] = {"ST-MoE-L": [2.397, 2.447], "ST-MoE-32B": [4.244, 4.819]}
    out["cpu_model"] = env()["cpu"]
    out["env"] = env()
    return out


def section_data(args) -> dict:
    """Issue 12 item 2's host side: the training data of one step for 1 and 8 seeds, as the per-seed loop
    drew it (`Dataset.seed_batches` of the base class: one `batch` call, one chain walk, per seed) vs the
    joint walk of every seed's chains (the Markov sources' override), interleaved, for the experiments'
    data (the `tiny` run's: vocab 128, 16 sentinels, 64 input tokens) and the matched configuration's. Both
    give the same arrays (tests/test_data.py pins it); ms per step of data, median over reps."""
    from precision_lab.data import Dataset
    from precision_lab.train import make_run_dataset

    out = {"benchmark": "data_per_step", "configs": {}}
    for name, run in (("tiny", run_for({"preset": "tiny"}, "fp32")), ("matched", run_for(MATCHED, "fp32"))):
        ds, batch = make_run_dataset(run), run.train.batch_size
        res = {}
        for n_seeds in (1, 8):
            seeds = list(range(n_seeds))
            ways = {"per_seed_loop": lambda st: Dataset.seed_batches(ds, st, batch, seeds),
                    "joint_walk": lambda st: ds.seed_batches(st, batch, seeds)}
            times = {w: [] for w in ways}
            step = 0
            for _ in range(args.reps):
                for w, f in ways.items():
                    f(step)  # untimed, as interleave() does
                    t0 = time.perf_counter()
                    for i in range(args.k):
                        f(step + 1 + i)
                    times[w].append((time.perf_counter() - t0) * 1e3 / args.k)
                    step += args.k + 1
            res[f"{n_seeds}_seeds"] = {w: {"ms_median": round(statistics.median(t), 3),
                                           "ms_min_max": [round(min(t), 3), round(max(t), 3)]} for w, t in times.items()}
            res[f"{n_seeds}_seeds"]["speedup_median"] = round(
                statistics.median(a / b for a, b in zip(times["per_seed_loop"], times["joint_walk"])), 2)
        out["configs"][name] = {"batch": batch, **res}
    out["cpu_model"] = env()["cpu"]
    out["env"] = env()
    return out


SECTIONS = {"userpath": section_userpath, "cli": section_cli, "telemetry": section_telemetry,
            "accumulator": section_accumulator, "gain": section_gain, "blocks": section_blocks, "hf": section_hf,
            "policies": section_policies, "seeds": section_seeds, "small": section_small,
            "compile": section_compile, "fp8cast": section_fp8cast, "capacity": section_capacity, "data": section_data}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("section", choices=[*SECTIONS, "all"])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median/spread over these)")
    p.add_argument("--k", type=int, default=5, help="steps per timed block (the scan length)")
    p.add_argument("--compile-reps", type=int, default=2)
    p.add_argument("--cli-steps", type=int, default=60, help="steps of each `precision-lab train` run (cli)")
    p.add_argument("--hf-steps", type=int, default=20, help="steps of each timed HF block (cli)")
    p.add_argument("--cli-config", choices=("matched", "quickstart"), default="matched",
                   help="cli: the matched configuration or the quick-start model")
    p.add_argument("--presets", default="tiny,small", help="capacity: the presets to time (tiny, small, micro)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from precision_lab.cli import use_one_device_per_core

    use_one_device_per_core()  # as `precision-lab` does: one XLA host device per core
    names = list(SECTIONS) if args.section == "all" else [args.section]
    for name in names:
        res = SECTIONS[name](args)
        res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        print(json.dumps(res) if args.json else json.dumps(res, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
