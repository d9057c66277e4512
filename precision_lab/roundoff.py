"""Roundoff analyses that need no training: how large the rounding error of each format is, in a binade, in
exp, in the router softmax, and in the routing decision. Each analysis is a pure function of its arguments
(fixed seed, deterministic) returning plain data, a list of dict rows; `precision_lab.figures` plots them and
`roundoff_report` writes every figure plus a Markdown summary next to the numbers ST-MoE prints (PAPER.md
section 3).

    binade_table     maximum roundoff per binade: one ulp (ST-MoE's column), half an ulp (the round-to-nearest
                     bound) and the maximum MEASURED with `quantize` on a dense sample of the binade
    exp_error        relative error of exp(x) when x and exp(x) are rounded to the format, against float64,
                     per |x| bin, beside the bound (1+u) exp(|x| u) - 1, u = 2^-(mantissa_bits+1)
    softmax_error    relative error of the router probabilities vs logit scale, number of experts, mean shift
                     of the logits, max-shift inside the softmax, and emulate vs native mode
    flip_rate        fraction of tokens whose top-1 expert / top-2 set changes when the router softmax is
                     computed in the format instead of float64
    footnote_example ST-MoE's footnote: ten logits of 128 and one of 128.5 (exact 0.142, bf16 0.091)
    allreduce_error  relative error of a gradient summed over R data-parallel replicas by the emulated ring
                     all-reduce (`ops.ring_allreduce`) in the format, against float64, as R grows
    accumulator_error max and median relative error of a K-long dot product vs K when the matmul accumulator
                     keeps 10..24 significant bits, with and without float32 promotion every 128 elements
                     (`ops.matmul_accumulated`'s order), inputs in fp8 e4m3 or bf16 (DeepSeek-V3 section 3.3)

Experiments are TOML files (`experiments/roundoff_*.toml`):

    # command: precision-lab roundoff experiments/roundoff_exp.toml --out runs/roundoff_exp
    kind = "roundoff"
    analysis = "exp_error"           # binade_table | exp_error | softmax_error | flip_rate | footnote_example
                                     # | accumulator_error
    description = "..."              # optional; also `name`
    formats = ["fp32", "bf16"]       # then the analysis's keyword arguments (ANALYSES[...].fields)
    x_max = 80.0

Conventions shared by every analysis: the lab stores values in float32, so an analysis starts from float32
inputs (logits, x) and compares with float64 arithmetic on those same float32 values; "emulate" rounds after
every elementary op (`precision_lab.ops`), "native" uses the real jax dtype under `jax.jit`, where XLA may keep
excess precision (it elides some float32 -> bf16 -> float32 convert pairs, depending on the program and the
array size: `_xla_note`), and formats without a jax dtype (tf32, custom eXmY) fall back to emulation there (rows
say so in `native_dtype`). Native results are recorded as measured, not corrected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from precision_lab import ops
from precision_lab.errors import UserError, read_toml, unknown_choice
from precision_lab.formats import Format, get_format, roundoff_per_binade
from precision_lab.policy import MODES, Accumulator, get_policy
from precision_lab.rounding import quantize

SEED = 0
COMPONENT = "router_softmax"  # the policy component the softmax/exp analyses round with

BINADE_FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp6_e2m3fn", "fp6_e3m2fn", "fp4_e2m1fn")
EXP_FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
SOFTMAX_FORMATS = ("fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")
FOOTNOTE_FORMATS = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3")

# ST-MoE's printed roundoff table (one ulp per binade), keyed by (format, k) for the binade [2^k, 2^(k+1)).
PAPER_BINADE: dict[tuple[str, int], float] = {
    ("bf16", 1): 0.0156, ("bf16", 5): 0.25, ("bf16", 10): 8.0, ("bf16", 20): 8192.0, ("bf16", 30): 8388608.0,
    ("fp32", 1): 2.4e-7, ("fp32", 10): 1.2e-4,
}
PAPER_FOOTNOTE = {"exact": 0.142, "bf16": 0.091}

# XLA:CPU's float32 exp is not correctly rounded: measured up to 1.32 * 2^-24 relative error on [-20, 20].
# `max_ratio_eval` allows it 2^-22 (a round 3x margin); only fp32 could notice, and on the default grid fp32
# stays under the plain analytic bound anyway (max ratio 0.83, at |x| < 2^-6).
F32_EXP_ERROR = 2.0**-22


# -- 1. roundoff per binade ------------------------------------------------------------------------------------


def _round_f64_to_f32(x: np.ndarray, rounding: str) -> np.ndarray:
    """Round float64 values to float32 (numpy's cast is round-to-nearest-even; toward_zero steps back)."""
    y = x.astype(np.float32)
    if rounding == "toward_zero":
        over = np.abs(y.astype(np.float64)) > np.abs(x)
        y = np.where(over, np.nextafter(y, np.float32(0)), y)
    return y.astype(np.float64)


def binade_table(formats: Sequence[str] = BINADE_FORMATS, *, lo: int = -2, hi: int = 31,
                 samples: int = 4096) -> list[dict]:
    """Maximum roundoff per binade [2^k, 2^(k+1)), k = lo..hi-1, analytic and measured.

    Columns: one_ulp (what ST-MoE prints), half_ulp (the round-to-nearest bound), measured_nearest and
    measured_toward_zero: max |round(x) - x| over a dense sample of the binade rounded with `quantize`.
    The sample is `samples` evenly spaced points 2^k (1 + j/samples), each of them plus half an ulp of the
    format (the midpoints, when the grid points are representable: samples >= 2^mantissa_bits) and the largest
    storage value below 2^(k+1) (below max, in the format's top binade); points above the
    format's max are dropped (overflow is not roundoff). So measured_nearest is exactly half an ulp and
    measured_toward_zero is one ulp less one storage ulp (the supremum, one ulp, is not attained). Storage
    is float32, except for fp32 itself, whose midpoints float32 cannot hold: there the sample is float64 and the
    rounding is numpy's float64 -> float32 cast. paper: ST-MoE's printed value, where it prints one.
    """
    rows = []
    for name in formats:
        fmt = get_format(name)
        binades = roundoff_per_binade(fmt, lo, hi)
        if not binades:
            continue
        storage = np.float64 if fmt.mantissa_bits > 22 else np.float32
        xs = []
        for b in binades:
            grid = b["binade_lo"] * (1.0 + np.arange(samples) / samples)
            end = min(b["binade_hi"], fmt.max)  # in the top binade: the storage value just below max
            top = np.nextafter(storage(end), storage(0)).astype(np.float64)
            x = np.concatenate([grid, grid + b["half_ulp"], [top]])
            xs.append(np.where(x <= fmt.max, x, np.nan))  # nan = not sampled (beyond max)
        x = np.stack(xs).astype(storage)  # exact: every point is a value of the storage type
        x64 = x.astype(np.float64)
        measured = {}
        for rounding in ("nearest_even", "toward_zero"):
            if storage is np.float64:
                q = _round_f64_to_f32(x64, rounding)
            else:
                q = np.asarray(jax.jit(lambda v, r=rounding: quantize(v, fmt, rounding=r))(x)).astype(np.float64)
            measured[rounding] = np.nanmax(np.abs(q - x64), axis=1)
        for i, b in enumerate(binades):
            k = int(round(math.log2(b["binade_lo"])))
            rows.append(dict(
                format=fmt.name, k=k, binade_lo=b["binade_lo"], binade_hi=b["binade_hi"],
                one_ulp=b["one_ulp"], half_ulp=b["half_ulp"],
                measured_nearest=float(measured["nearest_even"][i]),
                measured_toward_zero=float(measured["toward_zero"][i]),
                paper=PAPER_BINADE.get((fmt.name, k)),
            ))
    return rows


# -- 2. exp ----------------------------------------------------------------------------------------------------


def exp_bound(absx, mantissa_bits: int, eval_error: float = 0.0):
    """(1 + u)(1 + eval_error) exp(|x| u) - 1, u = 2^-(mantissa_bits+1): rounding x moves it by at most |x| u,
    exp turns that into a relative error exp(|x| u) - 1; rounding the output adds u; eval_error is the float32
    exp's own error (0 for the analytic bound)."""
    u = 2.0 ** -(mantissa_bits + 1)
    return (1 + u) * (1 + eval_error) * np.exp(np.asarray(absx, np.float64) * u) - 1


DEFAULT_EXP_BINS = (0.0, *(2.0 ** (k / 2) for k in range(-12, 15)))  # [0, 2^-6), then half-octaves up to 128


def exp_error(formats: Sequence[str] = EXP_FORMATS, xs=None, *, x_max: float = 80.0, num_points: int = 32001,
              bins: Sequence[float] = DEFAULT_EXP_BINS) -> list[dict]:
    """Relative error of exp(x) computed in each format (x rounded to the format, exp in float32, output
    rounded: `ops.exp` under `default=<fmt>`, emulate mode) against float64 exp of the same float32 x.

    xs: the float32 inputs (default: num_points evenly spaced on [-x_max, x_max]). Only points where exp(x) and
    exp(round(x)) are normal numbers of the format count (subnormal or overflowing outputs are range errors, not
    roundoff). One row per format and |x| bin [bin_lo, bin_hi) with points: n, max_rel_err, median_rel_err,
    bound = the analytic bound at bin_hi, max_ratio = max over the bin of error / analytic bound at that |x|,
    max_ratio_eval = the same against the bound that allows float32 exp its own error (F32_EXP_ERROR).
    """
    if xs is None:
        xs = np.linspace(-x_max, x_max, num_points)
    x32 = np.asarray(xs, np.float32).ravel()
    x64 = x32.astype(np.float64)
    exact = np.exp(x64)
    edges = np.asarray(bins, np.float64)
    rows = []
    for name in formats:
        fmt = get_format(name)
        policy = get_policy(f"default={fmt.name}")
        fn = jax.jit(lambda v, p=policy: ops.exp(v, p, COMPONENT))
        got = np.asarray(fn(x32)).astype(np.float64)
        rounded_in = np.asarray(jax.jit(lambda v: quantize(v, fmt))(x32)).astype(np.float64)
        with np.errstate(over="ignore"):
            via_rounded = np.exp(rounded_in)
        ok = ((exact >= fmt.min_normal) & (exact <= fmt.max) & (via_rounded >= fmt.min_normal)
              & (via_rounded <= fmt.max))
        absx = np.abs(x64[ok])
        err = np.abs(got[ok] - exact[ok]) / exact[ok]
        ratio = err / exp_bound(absx, fmt.mantissa_bits)
        ratio_eval = err / exp_bound(absx, fmt.mantissa_bits, F32_EXP_ERROR)
        which = np.digitize(absx, edges) - 1
        for i in range(len(edges) - 1):
            sel = which == i
            if not sel.any():
                continue
            rows.append(dict(
                format=fmt.name, mantissa_bits=fmt.mantissa_bits, bin_lo=float(edges[i]), bin_hi=float(edges[i + 1]),
                n=int(sel.sum()), max_rel_err=float(err[sel].max()), median_rel_err=float(np.median(err[sel])),
                bound=float(exp_bound(edges[i + 1], fmt.mantissa_bits)),
                max_ratio=float(ratio[sel].max()), max_ratio_eval=float(ratio_eval[sel].max()),
            ))
    return rows


# -- 3. router softmax -----------------------------------------------------------------------------------------


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _native_dtype(fmt: Format) -> bool:
    """Whether native mode really computes in a jax dtype for this format (else it emulates)."""
    if fmt.dtype is None:
        return False
    try:
        jnp.dtype(fmt.dtype)
    except TypeError:  # pragma: no cover - an ml_dtypes type this jax lacks
        return False
    return True


@functools.lru_cache(maxsize=None)
def _softmax_fn(fmt_name: str, mode: str, shifts: tuple[bool, ...], top_k: int = 0) -> Callable:
    """jit(logits -> one softmax per max-shift setting), each optionally with jax.lax.top_k(p, top_k).
    One compiled program per format and mode (cached: the report and the tests reuse it)."""
    policy = get_policy(f"default={fmt_name},mode={mode}")

    def fn(logits):
        outs = []
        for shift in shifts:
            p = ops.softmax(logits, policy, COMPONENT, shift=shift)
            outs.append((p, *jax.lax.top_k(p, top_k)) if top_k else p)
        return tuple(outs)

    return jax.jit(fn)


def _router_logits(scales, mean_shifts, tokens: int, num_experts: int, seed: int) -> np.ndarray:
    """<float32>[len(mean_shifts), len(scales), tokens, num_experts]: scale * N(0, 1) + mean_shift * scale.
    The same normals at every scale and shift (common random numbers: curves are smooth in the scale)."""
    z = np.random.default_rng([seed, num_experts]).standard_normal((tokens, num_experts))
    s = np.asarray(scales, np.float64)[None, :, None, None]
    m = np.asarray(mean_shifts, np.float64)[:, None, None, None]
    return (s * z[None, None] + m * s).astype(np.float32)


def _xla_note() -> str:
    return ("native mode is what XLA:CPU (jax 0.10) compiles, and for bf16 that depends on the program and the "
            "array size: XLA elides some float32 -> bf16 -> float32 convert pairs (here: native bf16 with the "
            "max-shift is more accurate than emulation, without it identical; a lone softmax over more than 16384 "
            "elements came out exactly float32); fp16 and fp8 native results equal emulation bit for bit")


def softmax_error(formats: Sequence[str] = SOFTMAX_FORMATS, scales: Sequence[float] = (0.5, 1, 2, 5, 10, 20, 50),
                  num_experts_list: Sequence[int] = (8, 64), modes: Sequence[str] = MODES,
                  shifts: Sequence[bool] = (True, False), *, mean_shifts: Sequence[float] = (0.0, 1.0),
                  tokens: int = 1024, p_floor: float = 1e-6, seed: int = SEED) -> list[dict]:
    """Relative error of router probabilities computed in each format against float64 softmax of the same
    float32 logits.

    Logits <float32>[tokens, num_experts] are scale * N(0, 1) + mean_shift * scale (mean_shift 1: every logit
    offset by the scale, as routers drift). The format's softmax is `ops.softmax(logits, default=<fmt>,
    shift=...)` under jax.jit, one call per [tokens, num_experts] block (native mode's result depends on the
    array size, see `_xla_note`): logits rounded on entry, then (shift) the max subtracted, exp, sum, divide,
    each rounded. The input rounding happens before the max is subtracted, so shift=True does not remove it.
    Per token: all_err = max over experts with exact probability >= p_floor of |p - p_exact| / p_exact
    (tinier probabilities carry no gate and their error is underflow), top1_err = the same for the exact top-1
    expert; a probability that is not finite (exp overflow: inf/inf, or NaN in formats without inf) counts as
    infinite error. One row per (format, mode, shift, mean_shift, num_experts, scale): median and max over
    tokens of both, and nonfinite_frac (tokens with any non-finite probability).
    """
    rows = []
    shifts = tuple(bool(v) for v in shifts)
    for num_experts in num_experts_list:
        logits = _router_logits(scales, mean_shifts, tokens, num_experts, seed)
        exact = _softmax64(logits)
        top1 = exact.argmax(axis=-1)[..., None]
        for name in formats:
            fmt = get_format(name)
            for mode in modes:
                fn = _softmax_fn(fmt.name, mode, shifts)
                probs = np.zeros((len(shifts), *exact.shape))
                for a, b in np.ndindex(*exact.shape[:2]):
                    probs[:, a, b] = np.asarray(fn(logits[a, b]))
                for p, shift in zip(probs, shifts):
                    finite = np.isfinite(p)
                    with np.errstate(invalid="ignore"):
                        rel = np.where(finite, np.abs(p - exact) / exact, np.inf)
                    all_err = np.where(exact >= p_floor, rel, 0.0).max(axis=-1)
                    top1_err = np.take_along_axis(rel, top1, axis=-1)[..., 0]
                    nonfinite = (~finite).any(axis=-1)
                    for a, ms in enumerate(mean_shifts):
                        for b, scale in enumerate(scales):
                            rows.append(dict(
                                format=fmt.name, mode=mode, native_dtype=mode == "native" and _native_dtype(fmt),
                                shift=shift, mean_shift=float(ms), scale=float(scale),
                                num_experts=int(num_experts), tokens=int(tokens),
                                all_median=float(np.median(all_err[a, b])), all_max=float(all_err[a, b].max()),
                                top1_median=float(np.median(top1_err[a, b])), top1_max=float(top1_err[a, b].max()),
                                nonfinite_frac=float(nonfinite[a, b].mean()),
                            ))
    return rows


# -- 4. routing flips ------------------------------------------------------------------------------------------


def flip_rate(formats: Sequence[str] = SOFTMAX_FORMATS,
              scales: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30), ks: Sequence[int] = (1, 2), *,
              num_experts: int = 32, tokens: int = 4096, modes: Sequence[str] = ("emulate",),
              shifts: Sequence[bool] = (True,), mean_shifts: Sequence[float] = (0.0,), seed: int = SEED) -> list[dict]:
    """Fraction of tokens whose top-1 expert (k=1) or top-2 set (k=2, order ignored) changes when the router
    softmax (logits rounded on entry, as `ops.softmax` does) is computed in the format instead of float64.

    Logits as in `softmax_error`, one jitted call per [tokens, num_experts] block. The routing decision is
    top-k of the router probabilities (as ST-MoE/flaxformer route), so near-equal probabilities that round
    to the same value tie. Top-k of the format's probabilities is `jax.lax.top_k`, which breaks ties by the
    lowest index first; the float64 reference uses the same rule (a stable sort), though it practically never
    ties. So a tie that rounding creates counts as a flip exactly when the true winner is not the
    lowest-index member of the tied group. tie_frac: fraction of tokens whose k-th and (k+1)-th largest
    probabilities in the format are equal (a tie at the selection boundary); nonfinite_frac: tokens with a
    non-finite probability (their ranking is whatever top_k makes of NaN, counted as measured).
    """
    kmax = max(ks)
    shifts = tuple(bool(v) for v in shifts)
    logits = _router_logits(scales, mean_shifts, tokens, num_experts, seed)
    exact = _softmax64(logits)
    ref_idx = np.argsort(-exact, axis=-1, kind="stable")[..., :kmax]
    rows = []
    for name in formats:
        fmt = get_format(name)
        for mode in modes:
            fn = _softmax_fn(fmt.name, mode, shifts, kmax + 1)
            nonfinite = np.zeros((len(shifts), *exact.shape[:-1]), bool)
            vals = np.zeros((len(shifts), *exact.shape[:-1], kmax + 1))
            idx = np.zeros((len(shifts), *exact.shape[:-1], kmax + 1), np.int64)
            for a, b in np.ndindex(*exact.shape[:2]):
                for i, (p, v, j) in enumerate(fn(logits[a, b])):
                    nonfinite[i, a, b] = ~np.isfinite(np.asarray(p)).all(axis=-1)
                    vals[i, a, b], idx[i, a, b] = np.asarray(v), np.asarray(j)
            for i, shift in enumerate(shifts):
                for k in ks:
                    changed = np.any(np.sort(idx[i, ..., :k], axis=-1) != np.sort(ref_idx[..., :k], axis=-1), axis=-1)
                    tie = vals[i, ..., k - 1] == vals[i, ..., k]
                    for a, ms in enumerate(mean_shifts):
                        for b, scale in enumerate(scales):
                            rows.append(dict(
                                format=fmt.name, mode=mode, native_dtype=mode == "native" and _native_dtype(fmt),
                                shift=shift, mean_shift=float(ms), scale=float(scale), k=int(k),
                                num_experts=int(num_experts), tokens=int(tokens),
                                flip_rate=float(changed[a, b].mean()), tie_frac=float(tie[a, b].mean()),
                                nonfinite_frac=float(nonfinite[i, a, b].mean()),
                            ))
    return rows


# -- 5. the footnote -------------------------------------------------------------------------------------------


def footnote_example(formats: Sequence[str] = FOOTNOTE_FORMATS, modes: Sequence[str] = MODES) -> list[dict]:
    """ST-MoE's footnote: ten logits equal to 128 and one equal to 128.5; the softmax of the 128.5 entry.

    Exact (float64): e^0.5 / (10 + e^0.5) = 0.1415. One row per format, mode and max-shift (True/False):
    logit_rounded = 128.5 rounded to the format, p = the format's softmax of that entry (`ops.softmax`, jit),
    rel_err = (p - exact) / exact. Rounding 128.5 to bf16 gives 128 (a tie, to even), so p = 1/11 = 0.0909
    before the output rounding (0.0908 after): the input is rounded before the max is subtracted, so the
    shift does not save it. Without the shift exp(128) overflows every format here (float32 included): p is NaN.
    """
    logits = np.array([[128.0] * 10 + [128.5]], np.float32)
    exact = float(_softmax64(logits)[0, -1])
    rows = []
    for name in formats:
        fmt = get_format(name)
        rounded = float(np.asarray(quantize(logits[0, -1:], fmt))[0])
        for mode in modes:
            for shift, p in zip((True, False), _softmax_fn(fmt.name, mode, (True, False))(logits)):
                p = float(np.asarray(p)[0, -1])
                rows.append(dict(format=fmt.name, mode=mode, native_dtype=mode == "native" and _native_dtype(fmt),
                                 shift=shift, logit_rounded=rounded, p=p, exact=exact, rel_err=(p - exact) / exact))
    return rows


def footnote_text(rows: list[dict] | None = None) -> str:
    """The footnote example as text: the paper's numbers, then the lab's for every format, mode and shift."""
    rows = footnote_example() if rows is None else rows
    exact = rows[0]["exact"]
    bf16 = [r["p"] for r in rows if r["format"] == "bf16" and r["mode"] == "emulate" and r["shift"]]
    lines = [
        "ST-MoE footnote: ten logits of 128 and one of 128.5; softmax probability of the 128.5 entry.",
        f"  exact: paper {PAPER_FOOTNOTE['exact']:.3f}, lab (float64) {exact:.4f}",
    ]
    if bf16:
        lines.append(f"  bf16:  paper {PAPER_FOOTNOTE['bf16']:.3f}, lab (emulate, max-shift) {bf16[0]:.4f} "
                     f"({(bf16[0] - exact) / exact:+.0%}); 128.5 rounds to 128 and 1/11 = {1 / 11:.4f}")
    lines.append(f"  {'format':<12} {'mode':<8} {'shift':<6} {'128.5 ->':>9} {'p':>8} {'rel err':>9}")
    for r in rows:
        note = "" if r["mode"] == "emulate" or r["native_dtype"] else "  (no jax dtype: emulated)"
        if not math.isfinite(r["p"]):
            note += "  (exp overflow without the max-shift)"
        lines.append(f"  {r['format']:<12} {r['mode']:<8} {str(r['shift']):<6} {r['logit_rounded']:>9g} "
                     f"{r['p']:>8.4f} {r['rel_err']:>+9.2%}{note}")
    return "\n".join(lines)


# -- 6. the gradient all-reduce ---------------------------------------------------------------------------------

ALLREDUCE_FORMATS = ("fp32", "bf16")
ALLREDUCE_REPLICAS = (2, 4, 8, 16, 32, 64, 128, 256)


def allreduce_error(formats: Sequence[str] = ALLREDUCE_FORMATS, replicas: Sequence[int] = ALLREDUCE_REPLICAS, *,
                    size: int = 16384, spread_decades: float = 4.0, noise: float = 3.0, seed: int = SEED) -> list[dict]:
    """Error of the gradient sum over R replicas when the ring all-reduce (`ops.ring_allreduce`: every local
    gradient and each of the R - 1 partial sums rounded to the format) runs in the format, against the
    float64 sum of the same float32 per-replica gradients.

    Synthetic gradients with a realistic spread: `size` elements whose magnitudes m_i = 10^U(-spread, 0)
    span `spread_decades` decades (real gradients span many binades), a true gradient mu_i ~ N(0, 1) m_i,
    and replica r's gradient (mu_i + noise * m_i * eps_ri) / R with eps ~ N(0, 1): mini-batch noise
    `noise` times the signal per replica (the 1/R is the per-replica loss weight the trainer uses, so the
    sum is the full-batch gradient). Rows: rel_l2 = ||sum - ref|| / ||ref||, median and max of the
    elementwise |sum - ref| / |ref|, and bound_rel_l2 = R u || sum_r |g_r| || / ||ref|| (u = 2^-(m+1): the
    worst case of R roundings of a sequential sum; a tree would have log2(R) + 1 instead of R)."""
    rows = []
    for r in replicas:
        rng = np.random.default_rng([seed, r])
        magnitude = 10.0 ** rng.uniform(-spread_decades, 0.0, size)
        mu = rng.normal(size=size) * magnitude
        grads = ((mu[None] + noise * magnitude[None] * rng.normal(size=(r, size))) / r).astype(np.float32)
        ref = grads.astype(np.float64).sum(axis=0)
        abs_sum = np.abs(grads.astype(np.float64)).sum(axis=0)
        for name in formats:
            fmt = get_format(name)
            policy = get_policy(f"fp32,grad_allreduce={fmt.name}")
            summed = np.asarray(jax.jit(lambda g, p=policy: ops.ring_allreduce(g, p))(jnp.asarray(grads)), np.float64)
            err = np.abs(summed - ref)
            rel = err / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
            u = 2.0 ** -(fmt.mantissa_bits + 1)
            rows.append(dict(format=fmt.name, replicas=int(r), size=int(size), spread_decades=float(spread_decades),
                             noise=float(noise), rel_l2=float(np.linalg.norm(err) / np.linalg.norm(ref)),
                             median_rel=float(np.median(rel)), max_rel=float(np.max(rel)),
                             bound_rel_l2=float(r * u * np.linalg.norm(abs_sum) / np.linalg.norm(ref))))
    return rows


# -- 7. the matmul accumulator ---------------------------------------------------------------------------------

# DeepSeek-V3 (2024) section 3.3, as published (PAPER.md section 13): FP8 GEMM on H800 tensor cores keeps
# about 14 bits in its accumulator; for K = 4096 (random inputs) the maximum relative error was nearly 2%;
# promoting partial sums to float32 every N_C = 128 elements of K fixes it.
PAPER_ACCUMULATOR = {"k": 4096, "significant_bits": 14, "max_rel_err": 0.02, "promote_every": 128}
ACC_INPUT_FORMATS = ("fp8_e4m3fn", "bf16")
ACC_BITS = (10, 12, 14, 16, 23, 24)  # significant bits: e8m9 ... e8m22, and 24 = float32 (e8m23)
ACC_KS = tuple(2**n for n in range(6, 15))  # 64 .. 16384


def _acc_operands(fmt: Format, distribution: str, m: int, k: int, n: int, seed: int):
    """float32 operands whose values the format holds: U(0, 1) ("uniform": every product positive, no
    cancellation) or N(0, 1) ("normal"), rounded to the format (nearest even)."""
    rng = np.random.default_rng([seed, k, fmt.bits])
    draw = (lambda shape: rng.uniform(0, 1, shape)) if distribution == "uniform" else rng.standard_normal
    a = np.asarray(quantize(draw((m, k)).astype(np.float32), fmt))
    b = np.asarray(quantize(draw((k, n)).astype(np.float32), fmt))
    return a, b


@functools.lru_cache(maxsize=None)
def _prefix_fn(acc) -> Callable:
    """jit(block sums <float32>[NB, ...] -> the accumulated result after every block), one per accumulator."""
    return jax.jit(lambda partial: ops.accumulate_blocks(partial, acc, prefixes=True))


def accumulator_error(input_formats: Sequence[str] = ACC_INPUT_FORMATS,
                      significant_bits: Sequence[int] = ACC_BITS, promote_every: Sequence[int] = (0, 128),
                      ks: Sequence[int] = ACC_KS, *, roundings: Sequence[str] = ("toward_zero",),
                      distributions: Sequence[str] = ("uniform", "normal"), block: int = 32, dots: int = 1024,
                      seed: int = SEED) -> list[dict]:
    """Relative error of K-long dot products whose K sum runs through a narrow accumulator, against float64.

    For each input format and distribution: `dots` dot products (a [sqrt(dots), K_max] @ [K_max, sqrt(dots)]
    product, operands already values of the format) summed as `ops.matmul_accumulated` sums them: blocks of
    `block` products in float32, the running sum rounded to e8m(bits-1) after every block (rounding per
    `roundings`), and (promote_every > 0; 0 = never) added into a float32 accumulator every promote_every
    elements. A K-long product is the first K elements of the K_max-long one: its result is the accumulator's
    value after K elements (`accumulate_blocks(prefixes=True)`), so every K comes from one pass (common random
    numbers: the curves are smooth in K). Reference: the same products summed in float64.
    rel_err = |result - exact| / sum_k |a_k b_k|: the plain relative error |result - exact| / |exact| for
    "uniform" (positive) inputs, and for "normal" inputs the error scaled by the sum of the magnitudes (the
    plain relative error of a dot product that cancels to near zero is unbounded). One row per (input format,
    distribution, rounding, bits, promote_every, K): max_rel_err and median_rel_err over the dot products.
    """
    for k in ks:
        if k % block:
            raise UserError(f"accumulator_error: every K must be a multiple of the block ({block}), got {k}")
    for bits in significant_bits:
        if not 2 <= bits <= 24:
            raise UserError(f"accumulator_error: significant_bits must be 2..24 (e8m1 .. float32), got {bits}")
    for d in distributions:
        if d not in ("uniform", "normal"):
            raise unknown_choice("accumulator_error distribution", d, ("uniform", "normal"))
    side = max(1, int(round(math.sqrt(dots))))
    k_max = max(ks)
    nb = k_max // block
    at = np.asarray(ks) // block - 1  # block index after which K elements have been summed
    block_sums = jax.jit(lambda a, b: jnp.einsum("mjk,jkn->jmn", a.reshape(side, nb, block),
                                                 b.reshape(nb, block, side),
                                                 precision=jax.lax.Precision.HIGHEST))
    rows = []
    for name in input_formats:
        fmt = get_format(name)
        for distribution in distributions:
            a, b = _acc_operands(fmt, distribution, side, k_max, side, seed)
            partial = block_sums(a, b)
            a64 = np.swapaxes(a.astype(np.float64).reshape(side, nb, block), 0, 1)  # [nb, m, block]
            b64 = b.astype(np.float64).reshape(nb, block, side)
            exact = np.cumsum(a64 @ b64, axis=0)[at]  # [len(ks), m, n]
            scale = np.cumsum(np.abs(a64) @ np.abs(b64), axis=0)[at]
            for rounding in roundings:
                for bits in significant_bits:
                    for promote in promote_every:
                        acc = Accumulator(format=f"e8m{int(bits) - 1}", promote_every=int(promote) or None,
                                              block=block, rounding=rounding)
                        got = np.asarray(_prefix_fn(acc)(partial))[at].astype(np.float64)  # [len(ks), m, n]
                        err = np.abs(got - exact) / scale
                        for i, k in enumerate(ks):
                            e = err[i].ravel()
                            rows.append(dict(
                                input_format=fmt.name, distribution=distribution, rounding=rounding,
                                significant_bits=int(bits), accumulator=acc.format, promote_every=int(promote),
                                block=block, k=int(k), dots=int(e.size), max_rel_err=float(e.max()),
                                median_rel_err=float(np.median(e)),
                            ))
    return rows


def accumulator_markdown(rows: list[dict], paths: Sequence[Path] = ()) -> list[str]:
    """The accumulator analysis as Markdown: DeepSeek-V3's statement, then max / median relative error at
    the K nearest 4096 for every input format, accumulator width and promotion, per distribution and rounding."""
    k_ref = min({r["k"] for r in rows}, key=lambda k: abs(math.log2(k / PAPER_ACCUMULATOR["k"])))
    md = ["## The matmul accumulator", "",
          f"DeepSeek-V3 (section 3.3): FP8 GEMM accumulation on H800 tensor cores keeps about "
          f"{PAPER_ACCUMULATOR['significant_bits']} bits; for K = {PAPER_ACCUMULATOR['k']} this gave a maximum "
          f"relative error near {PAPER_ACCUMULATOR['max_rel_err']:.0%}; promoting partial sums to float32 every "
          f"{PAPER_ACCUMULATOR['promote_every']} elements of K fixes it. The lab's model "
          "(`ops.matmul_accumulated`): blocks of "
          f"{rows[0]['block']} products summed in float32, the running sum rounded to e8m(bits-1) after each "
          "block, optional float32 promotion; reference float64. Error = |result - exact| / sum |a b| (for "
          "uniform, positive inputs that is the plain relative error).", ""]
    for (dist, rounding), rs in _group(rows, "distribution", "rounding").items():
        md += [f"K = {k_ref}, {dist} inputs, accumulator rounding {rounding}: max / median over "
               f"{rs[0]['dots']} dot products.", ""]
        promotes = sorted({r["promote_every"] for r in rs})
        inputs = list(dict.fromkeys(r["input_format"] for r in rs))
        head = ["bits"] + [f"{f}, {'never promoted' if p == 0 else f'promote every {p}'}" for f in inputs
                           for p in promotes]
        table = []
        for bits in sorted({r["significant_bits"] for r in rs}):
            cells = [str(bits)]
            for f in inputs:
                for p in promotes:
                    hit = [r for r in rs if r["input_format"] == f and r["promote_every"] == p
                           and r["significant_bits"] == bits and r["k"] == k_ref]
                    cells.append(f"{_g(hit[0]['max_rel_err'])} / {_g(hit[0]['median_rel_err'])}" if hit else "")
            table.append(cells)
        md += _md_table(head, table) + [""]
    md += [f"![accumulator error]({p.name})" for p in paths
           if p.name.startswith("accumulator_error") and p.suffix == ".png"] + [""]
    return md


# -- experiments (TOML) ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analysis: its function, its TOML fields (name -> kind), its figure(s)."""

    fn: Callable[..., list[dict]]
    fields: dict[str, str]
    figure: str  # name of the function in precision_lab.figures
    description: str
    in_report: bool = True  # run by `roundoff_report` (hence `precision-lab roundoff` and `run`) by default


ANALYSES: dict[str, Analysis] = {
    "binade_table": Analysis(binade_table, {"formats": "formats", "lo": "int", "hi": "int", "samples": "posint"},
                             "roundoff_table_figure", "maximum roundoff per binade (ST-MoE's table), measured"),
    "exp_error": Analysis(exp_error, {"formats": "formats", "x_max": "posnum", "num_points": "posint",
                                      "bins": "nums"},
                          "exp_error_figure", "relative error of exp(x) vs |x| and its analytic bound"),
    "softmax_error": Analysis(softmax_error, {"formats": "formats", "scales": "posnums", "num_experts_list": "posints",
                                              "modes": "modes", "shifts": "bools", "mean_shifts": "nums",
                                              "tokens": "posint", "p_floor": "num", "seed": "int"},
                              "softmax_error_figure", "router probability error vs logit scale"),
    "flip_rate": Analysis(flip_rate, {"formats": "formats", "scales": "posnums", "ks": "posints",
                                      "num_experts": "posint", "tokens": "posint", "modes": "modes", "shifts": "bools",
                                      "mean_shifts": "nums", "seed": "int"},
                          "flip_rate_figure", "routing flips (top-1 / top-2) vs logit scale"),
    "footnote_example": Analysis(footnote_example, {"formats": "formats", "modes": "modes"},
                                 "footnote_figure", "ST-MoE footnote: 128 x10 and 128.5"),
    "allreduce_error": Analysis(allreduce_error, {"formats": "formats", "replicas": "posints", "size": "posint",
                                                  "spread_decades": "posnum", "noise": "num", "seed": "int"},
                                "allreduce_error_figure", "gradient ring all-reduce error vs replicas"),
    "accumulator_error": Analysis(accumulator_error, {"input_formats": "formats", "significant_bits": "posints",
                                                      "promote_every": "nonnegints", "ks": "posints",
                                                      "roundings": "roundings", "distributions": "distributions",
                                                      "block": "posint", "dots": "posint", "seed": "int"},
                                  "accumulator_error_figure",
                                  "dot-product error vs K with a narrow matmul accumulator (DeepSeek-V3 3.3)",
                                  # not in the default report: its 12 compiled accumulator programs cost
                                  # more than the whole report (README, "Roundoff analyses")
                                  in_report=False),
}
_META_KEYS = ("kind", "analysis", "name", "description")

_KINDS = {
    "int": "an integer", "posint": "a positive integer", "num": "a number", "posnum": "a positive number",
    "nums": "a list of numbers", "posnums": "a non-empty list of positive numbers",
    "posints": "a non-empty list of positive integers", "bools": "a non-empty list of true/false",
    "formats": "a non-empty list of format names", "modes": f"a non-empty list of {', '.join(MODES)}",
    "nonnegints": "a non-empty list of integers >= 0",
    "roundings": "a non-empty list of nearest_even, nearest_away, toward_zero, up, down",
    "distributions": "a non-empty list of uniform, normal",
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(source: str, field: str, kind: str, value: Any) -> Any:
    bad = UserError(f"{source}: field {field!r} must be {_KINDS[kind]}, got {value!r}")
    single = {"int": _is_int, "posint": lambda v: _is_int(v) and v > 0, "num": _is_num,
              "posnum": lambda v: _is_num(v) and v > 0}
    if kind in single:
        if not single[kind](value):
            raise bad
        return value
    if not isinstance(value, list) or (kind != "nums" and not value):
        raise bad
    each = {"nums": _is_num, "posnums": lambda v: _is_num(v) and v > 0, "posints": lambda v: _is_int(v) and v > 0,
            "bools": lambda v: isinstance(v, bool), "formats": lambda v: isinstance(v, str),
            "modes": lambda v: isinstance(v, str), "nonnegints": lambda v: _is_int(v) and v >= 0,
            "roundings": lambda v: v in ("nearest_even", "nearest_away", "toward_zero", "up", "down"),
            "distributions": lambda v: v in ("uniform", "normal")}[kind]
    if not all(each(v) for v in value):
        raise bad
    if kind == "formats":
        for v in value:
            try:
                get_format(v)
            except UserError as e:
                raise UserError(f"{source}: field 'formats': {e}") from None
    if kind == "modes":
        for v in value:
            if v not in MODES:
                raise UserError(f"{source}: field 'modes': {unknown_choice('mode', v, MODES)}")
    return tuple(value)


def load_roundoff_experiment(path: str | os.PathLike) -> tuple[str, dict]:
    """Read a roundoff experiment TOML: (analysis name, keyword arguments for `ANALYSES[name].fn`).

    Every problem (missing file, malformed TOML, wrong kind, unknown analysis or field, bad value, unknown
    format) raises a one-line UserError naming the file and the field, with the valid choices."""
    source = str(path)
    data = read_toml(path, "experiment file")
    kind = data.get("kind")
    if kind is None and ("base" in data or "axes" in data):
        raise UserError(f"{source}: is a sweep (it has [base]/[[axes]]), not a roundoff experiment; "
                        f"run it with: precision-lab sweep {source} --out DIR")
    if kind != "roundoff":
        raise UserError(f"{source}: field 'kind' must be \"roundoff\" for a roundoff experiment, got {kind!r}")
    name = data.get("analysis")
    if name not in ANALYSES:
        raise UserError(f"{source}: field 'analysis': {unknown_choice('analysis', name, ANALYSES)}")
    fields = ANALYSES[name].fields
    kwargs = {}
    for key, value in data.items():
        if key in _META_KEYS:
            if key in ("name", "description") and not isinstance(value, str):
                raise UserError(f"{source}: field {key!r} must be a string, got {value!r}")
            continue
        if key not in fields:
            raise UserError(f"{source}: {unknown_choice(f'field for analysis {name!r}', key, [*_META_KEYS, *fields])}")
        kwargs[key] = _check(source, key, fields[key], value)
    return name, kwargs


def run_analysis(name: str, kwargs: dict, out_dir: str | os.PathLike,
                 stem: str | None = None) -> tuple[list[dict], list[Path]]:
    """Run one analysis, write its rows as STEM.json and its figure(s); return (rows, written paths)."""
    import json

    from precision_lab import figures

    if name not in ANALYSES:
        raise unknown_choice("analysis", name, ANALYSES)
    analysis = ANALYSES[name]
    rows = analysis.fn(**kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or name
    data_path = out / f"{stem}.json"
    data_path.write_text(json.dumps(rows, indent=1, allow_nan=True) + "\n")
    paths = [data_path, *getattr(figures, analysis.figure)(rows, out)]
    if name == "footnote_example":
        text_path = out / "footnote.txt"
        text_path.write_text(footnote_text(rows) + "\n")
        paths.append(text_path)
    if name == "accumulator_error":  # the numbers beside the figure, with DeepSeek-V3's
        text_path = out / f"{stem}.md"
        text_path.write_text("\n".join(accumulator_markdown(rows, paths)))
        paths.append(text_path)
    return rows, paths


def run_roundoff_experiment(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Load an experiment TOML, run its analysis, write its data (JSON) and figure(s) into out_dir."""
    name, kwargs = load_roundoff_experiment(path)
    return run_analysis(name, kwargs, out_dir)[1]


# -- the report ------------------------------------------------------------------------------------------------


def _g(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def _num(v) -> str:
    """Integers as integers (8388608), everything else to 6 significant digits."""
    if v is None:
        return ""
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}"


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def roundoff_report(out_dir: str | os.PathLike, overrides: dict[str, dict] | None = None) -> list[Path]:
    """Run every analysis marked in_report (the six analyses above; accumulator_error only when overrides
    names it) with its defaults, write every figure, the data (JSON) and roundoff.md into
    out_dir. Returns the written paths (roundoff.md last). overrides: analysis name -> keyword arguments that
    replace defaults (smaller runs for tests; the report says the defaults were changed)."""
    import time

    out = Path(out_dir)
    overrides = overrides or {}
    for name in overrides:
        if name not in ANALYSES:
            raise unknown_choice("analysis", name, ANALYSES)
    results, paths, seconds = {}, [], {}
    for name in [n for n, a in ANALYSES.items() if a.in_report or n in overrides]:
        t0 = time.perf_counter()
        results[name], written = run_analysis(name, dict(overrides.get(name, {})), out)
        seconds[name] = time.perf_counter() - t0
        paths += written
    md = ["# Roundoff analyses", "",
          "Generated by `precision_lab.roundoff.roundoff_report` "
          + (f"(defaults changed: {overrides}). " if overrides else "(default arguments, seed 0). ")
          + "Runtime here: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".", ""]

    md += ["## Maximum roundoff per binade", "",
           "one ulp is what ST-MoE prints; half an ulp is the round-to-nearest bound; the measured columns are "
           "max |round(x) - x| over a dense sample of the binade (`quantize`, nearest-even and toward-zero).", ""]
    bt = results["binade_table"]
    paper_rows = [r for r in bt if r["paper"] is not None]
    md += ["Beside the paper's printed values:", ""]
    md += _md_table(["format", "binade", "paper (printed)", "one ulp", "half ulp", "measured nearest",
                     "measured toward zero"],
                    [[r["format"], f"[2^{r['k']}, 2^{r['k'] + 1})", _num(r["paper"])]
                     + [_num(r[c]) for c in ("one_ulp", "half_ulp", "measured_nearest", "measured_toward_zero")]
                     for r in paper_rows])
    md += ["", "Measured toward-zero maxima are one ulp less one storage ulp: the supremum, one ulp, is not "
           "attained.", "", "<details><summary>Every format and binade</summary>", ""]
    md += _md_table(["format", "k", "one ulp", "half ulp", "measured nearest", "measured toward zero"],
                    [[r["format"], str(r["k"])]
                     + [_num(r[c]) for c in ("one_ulp", "half_ulp", "measured_nearest", "measured_toward_zero")]
                     for r in bt])
    md += ["", "</details>", "", "![roundoff per binade](roundoff_table.png)", ""]

    md += ["## exp(x)", "", "Relative error of exp when x and exp(x) are rounded to the format, against float64; "
           "bound = (1+u) exp(|x| u) - 1 at the bin's upper end, u = 2^-(mantissa bits + 1).", ""]
    ee = results["exp_error"]
    probes = (1.0, 10.0, 50.0)
    head = ["format"] + [f"\\|x\\| ~ {p:g}: max / median / bound" for p in probes]
    table = []
    for fmt in dict.fromkeys(r["format"] for r in ee):
        cells = [fmt]
        for probe in probes:
            hit = [r for r in ee if r["format"] == fmt and r["bin_lo"] <= probe < r["bin_hi"]]
            cells.append(" / ".join(_g(v) for v in (hit[0]["max_rel_err"], hit[0]["median_rel_err"], hit[0]["bound"]))
                         if hit else "out of range")
        table.append(cells)
    md += _md_table(head, table) + ["", "![exp error](exp_error.png)", ""]

    se = results["softmax_error"]
    e_max = max(r["num_experts"] for r in se)
    scales = sorted({r["scale"] for r in se})
    md += ["## Router softmax", "", f"Relative error of the router probabilities, {e_max} experts, median over "
           "tokens: max over experts with p >= 1e-6 / top-1 expert. `inf`: exp overflowed (non-finite "
           "probabilities) in at least half of the tokens; 1: a probability above the floor flushed to zero. "
           + _xla_note()[0].upper() + _xla_note()[1:] + ".", ""]
    table = []
    for (fmt, mode, shift, ms), rs in _group(se, "format", "mode", "shift", "mean_shift").items():
        by_scale = {r["scale"]: r for r in rs if r["num_experts"] == e_max}
        table.append([fmt, mode, str(shift), _g(ms)] + [
            f"{_g(by_scale[x]['all_median'])} / {_g(by_scale[x]['top1_median'])}" if x in by_scale else ""
            for x in scales])
    md += _md_table(["format", "mode", "max-shift", "mean shift (x scale)", *(f"scale {x:g}" for x in scales)], table)
    md += [""] + [f"![softmax error]({p.name})" for p in paths
                  if p.name.startswith("softmax_error") and p.suffix == ".png"] + [""]

    fr = results["flip_rate"]
    scales = sorted({r["scale"] for r in fr})
    md += ["## Routing flips", "", "Fraction of tokens whose top-1 expert (k=1) or top-2 set (k=2) differs from "
           "float64, with the fraction that tie at the k-th place in the format in brackets (ties broken by the "
           "lowest index, as jax.lax.top_k does).", ""]
    table = []
    for (fmt, mode, shift, ms, k), rs in _group(fr, "format", "mode", "shift", "mean_shift", "k").items():
        by_scale = {r["scale"]: r for r in rs}
        table.append([fmt, mode, str(shift), _g(ms), str(k)] + [
            f"{_g(by_scale[x]['flip_rate'])} ({_g(by_scale[x]['tie_frac'])})" for x in scales])
    md += _md_table(["format", "mode", "max-shift", "mean shift", "k", *(f"scale {x:g}" for x in scales)], table)
    md += ["", "![flip rate](flip_rate.png)", ""]

    fn = results["footnote_example"]
    lab_bf16 = next((r["p"] for r in fn if r["format"] == "bf16" and r["mode"] == "emulate" and r["shift"]),
                    float("nan"))
    md += ["## The footnote example", "", "Ten logits of 128 and one of 128.5: softmax probability of the 128.5 "
           "entry.", ""]
    md += _md_table(["", "ST-MoE", "this lab"],
                    [["exact", f"{PAPER_FOOTNOTE['exact']:.3f}", f"{fn[0]['exact']:.4f} (float64)"],
                     ["bf16", f"{PAPER_FOOTNOTE['bf16']:.3f}", f"{lab_bf16:.4f} (emulate, max-shift; 128.5 -> 128)"]])
    md += ["", "```", footnote_text(fn), "```", "", "![footnote](footnote.png)", ""]

    ar = results["allreduce_error"]
    reps = sorted({r["replicas"] for r in ar})
    md += ["## Gradient all-reduce", "", "Relative L2 error of a gradient summed over R replicas by the emulated "
           "ring all-reduce in the format (R - 1 rounded partial sums; `ops.ring_allreduce`) against float64, "
           "synthetic gradients spanning "
           f"{ar[0]['spread_decades']:g} decades with per-replica noise {ar[0]['noise']:g}x the signal; in brackets "
           "the worst-case bound R u ||sum |g_r||| / ||sum g_r||.", ""]
    md += _md_table(["format", *(f"R = {r}" for r in reps)],
                    [[fmt] + [f"{_g(by[r]['rel_l2'])} ({_g(by[r]['bound_rel_l2'])})" if r in by else ""
                              for r in reps]
                     for fmt, by in ((f, {r["replicas"]: r for r in rs}) for (f,), rs in _group(ar, "format").items())])
    md += ["", "![all-reduce error](allreduce_error.png)", ""]
    if "accumulator_error" in results:
        md += accumulator_markdown(results["accumulator_error"], paths)
    md_path = out / "roundoff.md"
    md_path.write_text("\n".join(md))
    return [*paths, md_path]


__all__ = [
    "binade_table", "exp_error", "exp_bound", "softmax_error", "flip_rate", "footnote_example", "footnote_text",
    "allreduce_error",
    "ANALYSES", "load_roundoff_experiment", "run_analysis", "run_roundoff_experiment", "roundoff_report",
    "PAPER_BINADE", "PAPER_FOOTNOTE", "accumulator_error", "PAPER_ACCUMULATOR",
]
