#!/usr/bin/env python
"""This machine's float32 matmul peak (GFLOP/s): n x n @ n x n with numpy, torch and JAX.

Each backend that imports in the running interpreter is measured (numpy always;
torch in benchmarks/.venv-hf; JAX in the main venv /work/main/.venv). With
--all-venvs the script re-runs itself under both venvs (and, for numpy, once more
with OPENBLAS_CORETYPE removed from the environment so the OpenBLAS kernel
auto-detects) and prints the merged results:

    .venv/bin/python benchmarks/matmul_peak.py --all-venvs --json

GFLOP/s = 2 n^3 / median seconds per matmul (over --reps timed calls after warm-up).
numpy's OpenBLAS kernel ("corename") is read at run time; OPENBLAS_CORETYPE in the
environment forces it (e.g. Haswell = AVX2 even on an AVX-512 CPU). torch's CPU
matmul goes through MKL in the PyTorch CPU wheel, which ignores OPENBLAS_CORETYPE.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpuguard import CpuGuard, cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENVS = {
    "main": REPO / ".venv" / "bin" / "python",
    "hf": REPO / "benchmarks" / ".venv-hf" / "bin" / "python",
}


_LAST_GUARD: dict = {}


def _timeit(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    ts = []
    with CpuGuard() as g:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    _LAST_GUARD.clear()
    _LAST_GUARD.update(g.result())
    return ts


def _summary(name: str, ts: list[float], n: int, extra: dict) -> dict:
    flop = 2.0 * n**3
    med = statistics.median(ts)
    return {
        "backend": name,
        "n": n,
        "median_ms": round(med * 1e3, 3),
        "min_ms": round(min(ts) * 1e3, 3),
        "max_ms": round(max(ts) * 1e3, 3),
        "gflops_median": round(flop / med / 1e9, 2),
        "gflops_best": round(flop / min(ts) / 1e9, 2),
        "reps": len(ts),
        "cpu_guard": dict(_LAST_GUARD),
        **extra,
    }


def openblas_corename() -> str | None:
    """Runtime OpenBLAS kernel name of numpy's bundled OpenBLAS (None if not found)."""
    import numpy as np

    a = np.ones((4, 4), np.float32)
    a @ a  # make sure the BLAS library is loaded
    try:
        paths = [ln.split()[-1] for ln in open("/proc/self/maps") if "openblas" in ln.lower()]
    except OSError:
        return None
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                    "openblas_get_corename64_", "openblas_get_corename"):
            f = getattr(lib, sym, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return None


def bench_numpy(n, reps, warmup):
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    ts = _timeit(lambda: np.matmul(a, b, out=c), reps, warmup)
    return _summary("numpy", ts, n, {
        "version": np.__version__,
        "blas_kernel": f"OpenBLAS {openblas_corename()}",
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    })


def bench_torch(n, reps, warmup, threads):
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32)
    b = torch.randn(n, n, generator=g, dtype=torch.float32)
    c = torch.empty(n, n)
    ts = _timeit(lambda: torch.matmul(a, b, out=c), reps, warmup)
    return _summary("torch", ts, n, {
        "version": torch.__version__,
        "blas_kernel": ("MKL" if torch.backends.mkl.is_available() else "non-MKL")
        + f", cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "threads": torch.get_num_threads(),
    })


def bench_jax(n, reps, warmup):
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()  # compile
    ts = _timeit(lambda: f(a, b).block_until_ready(), reps, warmup)
    return _summary("jax", ts, n, {
        "version": jax.__version__,
        "blas_kernel": f"XLA:{jax.default_backend()}",
        "devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    })


def run_here(args) -> list[dict]:
    import importlib.util

    out = []
    backends = args.backends.split(",")
    if "numpy" in backends:
        out.append(bench_numpy(args.n, args.reps, args.warmup))
    if "torch" in backends and importlib.util.find_spec("torch"):
        out.append(bench_torch(args.n, args.reps, args.warmup, args.threads))
    if "jax" in backends and importlib.util.find_spec("jax"):
        out.append(bench_jax(args.n, args.reps, args.warmup))
    for r in out:
        r["python"] = sys.executable
    return out


def run_all_venvs(args) -> list[dict]:
    common = ["--n", str(args.n), "--reps", str(args.reps), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--json"]
    plan = [
        ("main", "numpy,jax", None),
        ("hf", "torch", None),
    ]
    if os.environ.get("OPENBLAS_CORETYPE"):
        plan.append(("main", "numpy", "unset OPENBLAS_CORETYPE"))
    results = []
    for venv, backends, note in plan:
        py = VENVS[venv]
        if not py.exists():
            results.append({"backend": backends, "venv": venv, "error": f"{py} missing"})
            continue
        env = dict(os.environ)
        if note == "unset OPENBLAS_CORETYPE":
            env.pop("OPENBLAS_CORETYPE", None)
        cp = subprocess.run([str(py), __file__, "--backends", backends, *common],
                            env=env, capture_output=True, text=True)
        if cp.returncode != 0:
            results.append({"backend": backends, "venv": venv, "error": cp.stderr[-2000:]})
            continue
        for r in json.loads(cp.stdout.strip().splitlines()[-1])["results"]:
            r["venv"] = venv
            if note:
                r["note"] = note
            results.append(r)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (numpy/JAX use all cores)")
    p.add_argument("--backends", default="numpy,torch,jax")
    p.add_argument("--all-venvs", action="store_true", help="run under both venvs and merge")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    results = run_all_venvs(args) if args.all_venvs else run_here(args)
    doc = {"benchmark": "matmul_peak_f32", "n": args.n, "flop_per_matmul": 2 * args.n**3,
           "cpu": cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
           "results": results}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"f32 matmul {args.n}^3 on {doc['cpu']} ({doc['nproc']} cores)")
        for r in results:
            if "error" in r:
                print(f"  {r['backend']:6s} ERROR {r['error'][:200]}")
                continue
            print(f"  {r['backend']:6s} {r['gflops_median']:8.1f} GFLOP/s (best {r['gflops_best']:.1f}, "
                  f"median {r['median_ms']:.1f} ms)  {r['version']}  {r['blas_kernel']}"
                  + (f"  [{r['note']}]" if r.get("note") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
