#!/usr/bin/env python
"""Throughput (elements/s) of rounding float32 arrays to bf16 / fp8 with round-to-nearest-even.

Contenders (each one line in CONTENDERS below; a contender whose module does not
import in the running interpreter is skipped):

  * ml_dtypes cast round trip: x.astype(ml_dtypes.<fmt>).astype(np.float32)
  * pychop.Chop(exp_bits, sig_bits, rmode=1), NumPy backend (pychop's LightChop_), with
    its default chunk_size=800: arrays larger than that go through dask.array
    map_blocks (threaded scheduler), one block per 800 elements
  * the same with chunk_size >= array size: one plain NumPy pass, no dask
  * pychop.np.float_point.Chop_(prec=..., rmode=1): pychop's classic port of
    Higham & Pranesh's MATLAB chop (subnormal=True passed explicitly: for bf16 its
    default is subnormal=False, ml_dtypes keeps bf16 subnormals)

Formats use precision_lab's names: bf16, fp8_e4m3fn (OCP, max 448, no inf) and
fp8_e4m3 (IEEE-style, max 240, with inf). pychop's E4M3 (exp_bits=4, sig_bits=3, or
prec='fp8-e4m3') is the IEEE-style one; it is also timed under fp8_e4m3fn (same work),
where `agree` shows whether results still match OCP e4m3fn on the test data.

Each result carries `agree`: the fraction of elements bit-identical (as float32) to
the ml_dtypes reference for that format (float8_e4m3 for fp8_e4m3).

pychop lives in benchmarks/.venv-hf, precision_lab (JAX) in the main venv; with
--all-venvs the script re-runs itself under both and merges the JSON:

    .venv/bin/python benchmarks/pychop_quantize.py --all-venvs --json

Adding a contender is one line in CONTENDERS, e.g. for the lab's JAX quantizer:

    Contender("precision_lab.quantize (jit)", "precision_lab.rounding",
              jax_jit(lambda x, fmt: _imp("precision_lab.rounding").quantize(x, fmt))),
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpuguard import CpuGuard  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENVS = {
    "hf": REPO / "benchmarks" / ".venv-hf" / "bin" / "python",
    "main": REPO / ".venv" / "bin" / "python",
}

FORMATS = ("bf16", "fp8_e4m3fn", "fp8_e4m3")
ML_DTYPE = {"bf16": "bfloat16", "fp8_e4m3fn": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3"}
PYCHOP_BITS = {"bf16": (8, 7), "fp8_e4m3fn": (4, 3), "fp8_e4m3": (4, 3)}  # (exp_bits, sig_bits)
PYCHOP_PREC = {"bf16": "bf16", "fp8_e4m3fn": "fp8-e4m3", "fp8_e4m3": "fp8-e4m3"}

# A runner is (prepare, run): prepare(x_np) -> backend input (untimed); run(prepared) -> result,
# finished (block_until_ready for async backends). make(fmt) returns a runner or None if unsupported.
Runner = tuple[Callable[[np.ndarray], Any], Callable[[Any], Any]]


@dataclasses.dataclass
class Contender:
    name: str
    needs: str  # module that must import for this contender to run
    make: Callable[[str], Runner | None]
    note: str = ""


def _imp(mod: str):
    return importlib.import_module(mod)


def numpy_fn(fn: Callable[[np.ndarray, str], np.ndarray]) -> Callable[[str], Runner]:
    """Wrap fn(x_np, fmt) -> np.ndarray as a contender maker."""
    return lambda fmt: (lambda x: x, lambda x: fn(x, fmt))


def jax_jit(fn: Callable[[Any, str], Any], reuse_output: bool = True) -> Callable[[str], Runner]:
    """Wrap fn(x_jax, fmt) -> jax.Array: jit it with fmt static; time includes block_until_ready.

    reuse_output=True (the default): each call writes its result into the previous call's result
    buffer (donated; `keep_unused=True`, else jit drops the unused argument and donation is moot).
    The input is the same every call and the output a separate buffer, as for the NumPy contenders,
    whose output allocations come from malloc's warm free lists (0 page faults per call measured).
    Why: with a fresh output per call, XLA:CPU mallocs the 16 MB result on an XLA worker thread and
    the Python thread frees it. When that worker's glibc arena has no room in its (at most 64 MB)
    heap, malloc maps a new heap for the buffer and deletes it again when the buffer is freed
    (strace: mmap 128 MB / mprotect 16.9 MB / munmap 64 MB per call), so every call writes to
    4096 fresh pages: ~4096 minor faults, ~4-6 ms per call instead of ~0.5-1 ms. Whether a
    process lands there depends on earlier allocations (the input copy, the kept first result,
    other contenders), not on the program: the HLO is identical, `x * 2` does the same, and
    MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ do not stop
    it. Inside a jitted model XLA's buffer assignment preallocates such buffers, so the per-call
    heap churn is an artefact of timing a lone call. reuse_output=False (--fresh-output) times it
    that way anyway; `minflt_per_call` in every result shows which mode a run was in.

    The runner returns the live buffer that the next call donates: use the result before the next run.
    """
    def make(fmt):
        import jax
        import jax.numpy as jnp

        if not reuse_output:
            f = jax.jit(lambda x: fn(x, fmt))
            return (lambda x: jax.device_put(jnp.asarray(x)), lambda xj: f(xj).block_until_ready())
        f = jax.jit(lambda x, out: fn(x, fmt), donate_argnums=1, keep_unused=True)
        state: dict[str, Any] = {}

        def prep(x):
            xj = jax.device_put(jnp.asarray(x))
            shape = jax.eval_shape(lambda v: fn(v, fmt), xj)
            state["out"] = jnp.zeros(shape.shape, shape.dtype)
            return xj

        def run(xj):
            state["out"] = f(xj, state["out"]).block_until_ready()
            return state["out"]
        return prep, run
    return make


def _ml_cast(x, fmt):
    import ml_dtypes

    return x.astype(getattr(ml_dtypes, ML_DTYPE[fmt])).astype(np.float32)


def _pychop_light(chunk_size: int | None):
    def make(fmt):
        pychop = _imp("pychop")
        pychop.backend("numpy")
        e, s = PYCHOP_BITS[fmt]
        kw = {} if chunk_size is None else {"chunk_size": chunk_size}
        ch = pychop.Chop(exp_bits=e, sig_bits=s, rmode=1, subnormal=True, **kw)
        return (lambda x: x, lambda x: ch(x))
    return make


def _pychop_classic(fmt):
    Chop_ = _imp("pychop.np.float_point").Chop_
    ch = Chop_(prec=PYCHOP_PREC[fmt], rmode=1, subnormal=True)
    return (lambda x: x, lambda x: ch(x))


CONTENDERS: list[Contender] = [
    Contender("ml_dtypes astype round trip", "ml_dtypes", numpy_fn(_ml_cast)),
    Contender("pychop.Chop numpy (default chunk_size=800, dask)", "pychop", _pychop_light(None)),
    Contender("pychop.Chop numpy (chunk_size=N, no dask)", "pychop", _pychop_light(1 << 40)),
    Contender("pychop classic np Chop_(prec)", "pychop", _pychop_classic),
    Contender("precision_lab.quantize (jit)", "precision_lab.rounding",
              jax_jit(lambda x, fmt: _imp("precision_lab.rounding").quantize(x, fmt))),
]
# --fresh-output: the same, with a new output buffer every call (see jax_jit: allocator-dependent).
FRESH_OUTPUT = Contender("precision_lab.quantize (jit, new output buffer per call)", "precision_lab.rounding",
                         jax_jit(lambda x, fmt: _imp("precision_lab.rounding").quantize(x, fmt),
                                 reuse_output=False))


def make_input(n: int, seed: int) -> np.ndarray:
    # N(0, 4^2): |x| up to ~25, in range of every format; ~0.3% below fp8's 2^-6 min normal,
    # so the subnormal path is exercised too.
    return (np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 4).astype(np.float32)


def _agree(y, ref: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float32).reshape(ref.shape)
    same = (y.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(y) & np.isnan(ref))
    return float(same.mean())


def bench(c: Contender, fmt: str, x: np.ndarray, reps: int, warmup: int, max_s: float) -> dict | None:
    runner = c.make(fmt)
    if runner is None:
        return None
    prep, run = runner
    xp = prep(x)
    t_first = time.perf_counter()
    y = run(xp)
    t_first = time.perf_counter() - t_first
    agree = _agree(y, _ml_cast(x, fmt))  # now: a jax_jit runner recycles y's buffer in the next call
    del y
    for _ in range(max(0, warmup - 1)):
        run(xp)
    ts, t_start = [], time.perf_counter()
    minflt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with CpuGuard() as guard:
        while len(ts) < reps:
            t0 = time.perf_counter()
            run(xp)
            ts.append(time.perf_counter() - t0)
            if len(ts) >= 3 and time.perf_counter() - t_start > max_s:
                break
    minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt0
    med = statistics.median(ts)
    return {
        "contender": c.name,
        "format": fmt,
        "elements": int(x.size),
        "median_ms": round(med * 1e3, 3),
        "min_ms": round(min(ts) * 1e3, 3),
        "max_ms": round(max(ts) * 1e3, 3),
        "first_call_ms": round(t_first * 1e3, 3),
        "reps": len(ts),
        "melem_per_s": round(x.size / med / 1e6, 3),
        "agree": round(agree, 8),
        # minor page faults per timed call (whole process): ~size/4096 means each call wrote to fresh pages
        "minflt_per_call": round(minflt / len(ts), 1),
        "cpu_guard": guard.result(),
        **({"note": c.note} if c.note else {}),
    }


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    import importlib.metadata as md

    for pkg in ("ml_dtypes", "pychop", "dask", "jax", "jaxlib", "precision-lab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_here(args) -> list[dict]:
    x = make_input(1 << args.log2n, args.seed)
    results = []
    for c in CONTENDERS + ([FRESH_OUTPUT] if args.fresh_output else []):
        if args.only and not any(s in c.name for s in args.only.split(",")):
            continue
        try:
            ok = importlib.util.find_spec(c.needs) is not None
        except ModuleNotFoundError:
            ok = False
        if not ok:
            continue
        for fmt in args.formats.split(","):
            try:
                r = bench(c, fmt, x, args.reps, args.warmup, args.max_seconds)
            except Exception as e:  # report, keep going
                r = {"contender": c.name, "format": fmt, "error": f"{type(e).__name__}: {e}"[:500]}
            if r is not None:
                r["python"] = sys.executable
                r["versions"] = _versions()
                results.append(r)
                if not args.json:
                    print(_fmt_row(r), flush=True)
    return results


def run_all_venvs(args) -> list[dict]:
    fwd = ["--log2n", str(args.log2n), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--max-seconds", str(args.max_seconds), "--formats", args.formats, "--seed", str(args.seed),
           "--json"] + (["--only", args.only] if args.only else []) + (["--fresh-output"] if args.fresh_output else [])
    results = []
    for venv, py in VENVS.items():
        if not py.exists():
            results.append({"venv": venv, "error": f"{py} missing"})
            continue
        cp = subprocess.run([str(py), __file__, *fwd], capture_output=True, text=True)
        if cp.returncode != 0:
            results.append({"venv": venv, "error": cp.stderr[-2000:]})
            continue
        for r in json.loads(cp.stdout.strip().splitlines()[-1])["results"]:
            r["venv"] = venv
            results.append(r)
            if not args.json:
                print(_fmt_row(r), flush=True)
    return results


def _fmt_row(r: dict) -> str:
    tag = f"[{r['venv']}] " if "venv" in r else ""
    if "error" in r:
        return f"{tag}{r.get('contender', '?')} {r.get('format', '')}: ERROR {r['error'][:300]}"
    return (f"{tag}{r['format']:11s} {r['contender']:52s} {r['melem_per_s']:9.2f} Melem/s "
            f"(median {r['median_ms']:9.2f} ms, {r['reps']} reps)  agree {r['agree']:.6f}"
            f"  minflt/call {r.get('minflt_per_call')}  other-cpu {r.get('cpu_guard', {}).get('other_busy_cores')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log2n", type=int, default=22, help="array size 2^k float32 elements")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a contender after this long (min 3 reps)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--only", default="", help="comma list of substrings of contender names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh-output", action="store_true",
                   help="also time quantize with a new output buffer per call (glibc-arena-dependent page faults)")
    p.add_argument("--all-venvs", action="store_true", help="run under both venvs and merge")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    # pychop's LightChop_ computes abs_x * 2^-min_exp on every element and overflows harmlessly.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"pychop\..*")

    results = run_all_venvs(args) if args.all_venvs else run_here(args)
    doc = {"benchmark": "quantize_throughput", "elements": 1 << args.log2n, "input": "N(0, 4^2) float32",
           "rounding": "nearest_even", "cpu_count": os.cpu_count(), "results": results}
    if args.json:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
