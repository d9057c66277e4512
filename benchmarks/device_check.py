#!/usr/bin/env python
"""What the lab does on an accelerator, in one run of a few minutes: run it through device_check.sh.

    bash benchmarks/device_check.sh OUTDIR                # one GPU (H200): under 8 minutes
    bash benchmarks/device_check.sh OUTDIR --cpu-smoke    # reduced, on CPU, well under a minute

Parts, each written to OUTDIR/<part>.json as soon as it finishes (a run cut short keeps the parts done),
then OUTDIR/summary.json with all of them:
  env          jax, backend, device kind, which optional packages are importable (nothing is installed)
  peaks        n^3 matmul TFLOP/s per operand dtype (float32 at HIGHEST and DEFAULT precision, bf16, fp8)
  fp8_matmul   the device's real FP8 matmul (float8_e4m3fn operands, float32 output, precision DEFAULT and
               HIGHEST) against a float64 reference at K = 256..16384, and against the lab's accumulator
               model (precision_lab.ops.matmul_accumulated) for accumulator widths e8m10..e8m23: the width
               whose errors match the hardware's is the estimate of the bits the hardware keeps
  train        native vs emulated bf16 / fp8 train steps (the Trainer's compiled chunk, as lab_bench.py
               times it) for `tiny`, `small` and a wider model: ms/step, compile s, matmul GFLOP/step, MFU
  tests        the GPU-meaningful test files (bit-exact rounding, ops, dispatch, training), one pytest
               process per file, junit XML + a JSON digest; files needing a missing package are skipped
Every part has a time budget; what did not fit is listed as skipped, never silently dropped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Test files whose results can differ on an accelerator: bit-exact rounding (XLA:GPU fuses and may flush
# subnormals differently), the ops against their numpy reference, scaling, the sorted dispatch, routing,
# the model and the trainer (bit-identical resume). Host-only files (store, sweep, figures, CLI) are not.
GPU_TESTS = ["tests/test_quantize.py", "tests/test_ops.py", "tests/test_scaling.py", "tests/test_dispatch.py",
             "tests/test_router.py", "tests/test_model.py", "tests/test_train.py", "tests/test_optim.py"]
SMOKE_TESTS = ["tests/test_formats.py"]
OPTIONAL = ["numpy", "ml_dtypes", "optax", "scipy", "pytest", "hypothesis", "tqdm", "matplotlib"]

# H200 SXM datasheet dense peaks (TFLOP/s), for an MFU against the nominal number beside the measured one.
NOMINAL_TFLOPS = {"H200": {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
                  "H100": {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}}


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def write_json(out: Path, name: str, obj) -> None:
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, out / f"{name}.json")


# -- env ---------------------------------------------------------------------------------------------------------


def part_env(args) -> dict:
    import jax

    dev = jax.devices()[0]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"mode": "cpu-smoke" if args.cpu_smoke else "device", "jax": jax.__version__,
            "jaxlib": getattr(jax.lib, "__version__", None) if hasattr(jax, "lib") else None,
            "backend": jax.default_backend(), "device_kind": dev.device_kind, "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(), "cpu_model": cpu, "nproc": os.cpu_count(),
            "importable": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL},
            "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                    "PYTHONPATH", "CUDA_VISIBLE_DEVICES")}}


# -- matmul peaks ------------------------------------------------------------------------------------------------


def _time_call(f, *xs, reps: int) -> float:
    """Median seconds of one call of f(*xs) (compiled and run once before timing)."""
    import jax

    jax.block_until_ready(f(*xs))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*xs))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def part_peaks(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = 256 if args.cpu_smoke else 8192
    key = jax.random.PRNGKey(0)
    a32 = jax.random.normal(key, (n, n), jnp.float32)
    b32 = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    out = {"n": n, "tflops": {}}
    cases = {"fp32_highest": (jnp.float32, jax.lax.Precision.HIGHEST), "fp32_default": (jnp.float32, None),
             "bf16": (jnp.bfloat16, None), "fp8_e4m3fn": (jnp.float8_e4m3fn, None)}
    for name, (dt, prec) in cases.items():
        try:
            f = jax.jit(lambda x, y, prec=prec: jax.lax.dot(x, y, precision=prec, preferred_element_type=jnp.float32))
            s = _time_call(f, a32.astype(dt), b32.astype(dt), reps=3 if args.cpu_smoke else 10)
            out["tflops"][name] = round(2 * n**3 / s / 1e12, 3)
        except Exception as err:  # noqa: BLE001 - an unsupported dtype on this backend is a result
            out["tflops"][name] = None
            out.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err)[:300]}"
    kind = jax.devices()[0].device_kind
    out["nominal_tflops"] = next((v for k, v in NOMINAL_TFLOPS.items() if k in kind), None)
    return out


# -- the FP8 tensor-core matmul vs the accumulator model ---------------------------------------------------------


def _accumulator_model():
    """precision_lab.ops.matmul_accumulated if this tree has it (another change adds it), else None + why."""
    try:
        from precision_lab.ops import matmul_accumulated  # noqa: PLC0415
    except ImportError as err:
        return None, f"precision_lab.ops.matmul_accumulated not importable ({err})"
    return matmul_accumulated, None


def _err_stats(approx, ref, scale) -> dict:
    """Errors of `approx` against the float64 `ref`, in units of sum_k |a_ik b_kj| (the accumulation bound's
    denominator): mean (bias: truncation shows as a negative mean on positive data), rms, max; plus the
    fraction of outputs equal to float32(ref) (the correctly rounded result)."""
    import numpy as np

    e = (np.asarray(approx, np.float64) - ref) / np.where(scale > 0, scale, 1.0)
    return {"mean": float(e.mean()), "rms": float(np.sqrt(np.mean(e * e))), "max_abs": float(np.abs(e).max()),
            "frac_correctly_rounded": float(np.mean(np.asarray(approx, np.float32) == ref.astype(np.float32)))}


def part_fp8_matmul(args, budget: Budget) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    m = n = 16 if args.cpu_smoke else 256
    ks = [256, 512] if args.cpu_smoke else [256, 512, 1024, 2048, 4096, 8192, 16384]
    widths = [13, 23] if args.cpu_smoke else [10, 11, 12, 13, 14, 15, 16, 18, 20, 23]
    model, why = _accumulator_model()
    res = {"m": m, "n": n, "ks": ks, "operands": "float8_e4m3fn, values of N(0,1) ('normal') or |N(0,1)| "
           "('positive') rounded to e4m3fn", "errors_in_units_of": "sum_k |a_ik b_kj|",
           "accumulator_model": {"available": model is not None, "reason_unavailable": why,
                                 "call": "matmul_accumulated(a, b, accumulator='e8mM', promote_every=P)"},
           "cases": [], "skipped": []}
    dots = {p: jax.jit(lambda a, b, p=p: jax.lax.dot(a, b, precision=p, preferred_element_type=jnp.float32))
            for p in (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST)}
    rng = np.random.default_rng(0)
    data = {}  # (dist, k) -> operands, reference, hardware outputs (kept for the model comparison)
    for dist in ("positive", "normal"):  # phase 1, cheap: the hardware against float64, every case
        for k in ks:
            if budget.left() < 5:
                res["skipped"].append(f"{dist} K={k}: time budget")
                continue
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            if dist == "positive":
                a, b = np.abs(a), np.abs(b)
            a8, b8 = jnp.asarray(a).astype(jnp.float8_e4m3fn), jnp.asarray(b).astype(jnp.float8_e4m3fn)
            a64, b64 = np.asarray(a8.astype(jnp.float32), np.float64), np.asarray(b8.astype(jnp.float32), np.float64)
            ref, scale = a64 @ b64, np.abs(a64) @ np.abs(b64)  # products of e4m3 values are exact in float64
            case = {"dist": dist, "k": k, "hardware": {}, "model": {}}
            outs = {}
            for p, f in dots.items():
                name = str(p).split(".")[-1]
                outs[name] = np.asarray(f(a8, b8))
                case["hardware"][name] = _err_stats(outs[name], ref, scale)
                if "kernels" not in res or name not in res["kernels"]:  # an fp8 GEMM, or convert + f32 dot?
                    hlo = f.lower(a8, b8).compile().as_text()
                    calls = re.findall(r"custom_call_target=\"([^\"]+)\"", hlo)
                    res.setdefault("kernels", {})[name] = {"custom_calls": sorted(set(calls)),
                                                           "f8_in_hlo": "f8e4m3fn" in hlo}
            res["cases"].append(case)
            data[(dist, k)] = (a64, b64, ref, scale, outs, case)
    write_json(args.out, "fp8_matmul.partial", res)
    # Phase 2, expensive (the model simulates the accumulator step by step): the most telling cases first
    # (positive operands, where every accumulation step loses low bits in the same direction; large K).
    order = sorted(data, key=lambda dk: (dk[0] != "positive", -dk[1]))
    for dist, k in order if model is not None else ():
        a64, b64, ref, scale, outs, case = data[(dist, k)]
        a32, b32 = jnp.asarray(a64, jnp.float32), jnp.asarray(b64, jnp.float32)
        for w in widths:
            for pe in (None, 128):
                key = f"e8m{w}/promote_every={pe}"
                if budget.left() < 5:
                    res["skipped"].append(f"{dist} K={k} model {key}: time budget")
                    continue
                try:
                    y = np.asarray(model(a32, b32, accumulator=f"e8m{w}", promote_every=pe))
                except Exception as err:  # noqa: BLE001 - an unsupported combination is recorded
                    case["model"][key] = {"error": f"{type(err).__name__}: {err}"[:300]}
                    continue
                st = _err_stats(y, ref, scale)
                for pname, hw in outs.items():
                    st[f"frac_equal_to_{pname}"] = float(np.mean(y == hw))
                case["model"][key] = st
        write_json(args.out, "fp8_matmul.partial", res)
    res["estimate"] = _estimate_bits(res) if model is not None else None
    return res


def _estimate_bits(res: dict) -> dict:
    """Per hardware precision: the model (width, promotion) whose rms errors are closest to the hardware's
    over all cases (mean |log2(rms_model / rms_hw)|), and its mean exact-agreement with the hardware."""
    out = {}
    for pname in ("DEFAULT", "HIGHEST"):
        scores: dict[str, list] = {}
        for c in res["cases"]:
            hw = c["hardware"].get(pname)
            for mk, st in c["model"].items():
                if hw is None or "rms" not in st:
                    continue
                # 2^-30 (1/64 of float32's unit roundoff) keeps exact cases (rms 0) from dominating
                d = abs(math.log2((st["rms"] + 2**-30) / (hw["rms"] + 2**-30)))
                scores.setdefault(mk, []).append((d, st.get(f"frac_equal_to_{pname}", 0.0)))
        if not scores:
            continue
        ranked = sorted(scores, key=lambda mk: statistics.mean(d for d, _ in scores[mk]))
        out[pname] = [{"model": mk, "mean_abs_log2_rms_ratio": round(statistics.mean(d for d, _ in scores[mk]), 3),
                       "mean_frac_equal": round(statistics.mean(f for _, f in scores[mk]), 4)} for mk in ranked[:4]]
    return out


# -- train steps -------------------------------------------------------------------------------------------------

WIDE = {"preset": "small", "d_model": 1024, "d_ff": 4096, "num_heads": 16, "d_kv": 64, "vocab_size": 8192}
MICRO = {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "group_size": 64}
POLICIES = ["fp32", "bf16,mode=native", "bf16", "fp8-hybrid,mode=native", "fp8-hybrid"]


def part_train(args, budget: Budget) -> dict:
    if importlib.util.find_spec("optax") is None:  # the trainer's optimizer; nothing is installed here
        return {"configs": {}, "skipped": ["every config: optax not importable (put it in shared/pydeps)"]}
    from lab_bench import Program, interleave, run_for

    if args.cpu_smoke:
        configs = [("micro", MICRO, 4, 32, 8)]
        policies, k, reps = ["fp32", "bf16,mode=native"], 2, 1
    else:
        configs = [("tiny", {"preset": "tiny"}, 16, 64, 14), ("small", {"preset": "small"}, 32, 128, 29),
                   ("wide", WIDE, 64, 128, 29)]
        policies, k, reps = POLICIES, 10, 3
    peaks = args.results.get("peaks", {}).get("tflops", {})
    bf16_peak = peaks.get("bf16")
    res = {"k_steps_per_block": k, "reps": reps, "configs": {}, "skipped": [],
           "mfu_note": "matmul FLOPs of one train step (dots of the program) / ms per step / the measured bf16 "
                       "matmul peak of part `peaks` (and the nominal one, if the device is known)"}
    nominal = (args.results.get("peaks", {}).get("nominal_tflops") or {}).get("bf16")
    # Two phases, so a tight budget still covers every model: first fp32 and the native policies of each
    # config (cheap to compile), then the emulated ones, timed again together with that config's first
    # phase (the phase-1 times are then replaced, so every ratio comes from one interleaved run).
    cheap = [p for p in policies if p == "fp32" or "native" in p]
    phases = [cheap, [p for p in policies if p not in cheap]]
    progs: dict[str, list] = {}
    for phase in phases:
        for cfg_name, model, batch, src, tgt in configs:
            new = []
            for policy in phase:
                if budget.left() < (5 if args.cpu_smoke else 30):  # a program's compile + timing, at least
                    res["skipped"].append(f"{cfg_name} {policy}: time budget")
                    continue
                try:
                    new.append(Program(policy, run_for(model, policy, batch=batch), k=k, src=src, tgt=tgt))
                except Exception as err:  # noqa: BLE001 - a policy that fails to build/compile is a result
                    res["configs"].setdefault(cfg_name, {})[policy] = {"error": traceback.format_exc()[-1500:]}
                    print(f"[device_check] {cfg_name} {policy}: {type(err).__name__}", file=sys.stderr)
            if not new:
                continue
            group = progs.setdefault(cfg_name, [])
            for p in group:  # timed again beside the new programs
                p.times, p.warm_times, p.guards = [], [], []
            group += new
            interleave(group, reps)
            res["configs"][cfg_name] = {**res["configs"].get(cfg_name, {}),
                                        **_train_rows(group, batch, src, tgt, bf16_peak, nominal)}
            write_json(args.out, "train.partial", res)
    return res


def _train_rows(progs, batch, src, tgt, bf16_peak, nominal) -> dict:
    rows = {}
    base = next((p.times for p in progs if p.name == "fp32"), None)
    for p in progs:
        s = p.summary()
        s.pop("member_devices", None)
        tf = s["matmul_gflop_per_step"] / s["ms_per_step_median"]  # GFLOP/ms = TFLOP/s
        rows[p.name] = {**s, "batch": batch, "tokens": [src, tgt], "achieved_tflops": round(tf, 3),
                        "mfu_vs_measured_bf16_peak": round(tf / bf16_peak, 4) if bf16_peak else None,
                        "mfu_vs_nominal_bf16_peak": round(tf / nominal, 4) if nominal else None,
                        "ratio_to_fp32_median": round(statistics.median(t / b for t, b in zip(p.times, base)), 3)
                        if base else None}
    return rows


# -- tests -------------------------------------------------------------------------------------------------------


def _junit_digest(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    d = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    d["failed"] = []
    for tc in root.iter("testcase"):
        for bad in list(tc.findall("failure")) + list(tc.findall("error")):
            d["failed"].append({"test": f"{tc.get('classname')}::{tc.get('name')}",
                                "message": (bad.get("message") or "")[:400]})
    return d


def part_tests(args, budget: Budget) -> dict:
    files = SMOKE_TESTS if args.cpu_smoke else GPU_TESTS
    res = {"files": {}, "skipped": []}
    if importlib.util.find_spec("pytest") is None:
        res["skipped"] = [f"{f}: pytest not importable" for f in files]
        return res
    has_hypothesis = importlib.util.find_spec("hypothesis") is not None
    for f in files:
        if not has_hypothesis and "hypothesis" in (REPO / f).read_text():
            res["skipped"].append(f"{f}: needs hypothesis, not importable here")
            continue
        left = budget.left()
        if left < 20:
            res["skipped"].append(f"{f}: time budget")
            continue
        xml = args.out / f"junit-{Path(f).stem}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not exhaustive and not slow",
               f"--junitxml={xml}", f]
        t0 = time.perf_counter()
        try:
            cp = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=left - 5)
            row = {"returncode": cp.returncode, "tail": cp.stdout[-600:]}
        except subprocess.TimeoutExpired:
            row = {"returncode": None, "timed_out_after_s": round(left - 5)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if xml.exists():
            row.update(_junit_digest(xml))
        res["files"][f] = row
        write_json(args.out, "tests.partial", res)
    return res


# -- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder for the JSON results (created)")
    p.add_argument("--cpu-smoke", action="store_true", help="reduced sizes, on CPU: checks that it all works")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total time budget (default 420 s on a device; 240 s for --cpu-smoke, which needs ~30 s "
                        "on 2 idle cores: the cap only matters on a crowded machine)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = args.budget_s or (240.0 if args.cpu_smoke else 420.0)
    t_start = time.perf_counter()
    # Share of the total budget each part may use up to (unused time passes on to the later parts).
    plan = [("env", 0.0), ("peaks", 0.06), ("fp8_matmul", 0.25), ("train", 0.62), ("tests", 1.0)]
    if os.environ.get("PRECISION_LAB_CACHE"):  # the test suite's persistent compilation cache, if it set one
        from precision_lab.train import enable_compilation_cache

        enable_compilation_cache(os.environ["PRECISION_LAB_CACHE"])
    args.results = {}
    status = {}
    for name, until in plan:
        budget = Budget(max(total * until - (time.perf_counter() - t_start), 0.0))
        t0 = time.perf_counter()
        try:
            fn = globals()[f"part_{name}"]
            r = fn(args) if name in ("env", "peaks") else fn(args, budget)
            status[name] = "ok"
        except Exception:  # noqa: BLE001 - one broken part must not lose the others
            r = {"error": traceback.format_exc()[-3000:]}
            status[name] = "error"
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        args.results[name] = r
        write_json(args.out, name, r)
        (args.out / f"{name}.partial.json").unlink(missing_ok=True)
        print(f"[device_check] {name}: {status[name]} in {r['wall_s']} s", file=sys.stderr, flush=True)
    summary = {"status": status, "wall_s": round(time.perf_counter() - t_start, 1), "budget_s": total,
               **args.results}
    write_json(args.out, "summary", summary)
    print(f"[device_check] wrote {args.out}/summary.json in {summary['wall_s']} s", file=sys.stderr)
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
