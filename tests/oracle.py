"""An exact rounding oracle written with fractions.Fraction, independent of the JAX implementation.

It encodes the semantics documented in `precision_lab.rounding.quantize` one value at a time, with exact
rational arithmetic: no float rounding anywhere between the input float32 and the chosen result.
"""

from __future__ import annotations

import math
from fractions import Fraction

from precision_lab.formats import Format

NAN = float("nan")


def floor_log2(v: Fraction) -> int:
    """Exact floor(log2(v)) for v > 0."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if Fraction(2) ** e > v:
        e -= 1
    if Fraction(2) ** (e + 1) <= v:
        e += 1
    return e


def candidates(x: float, fmt: Format) -> tuple[Fraction, Fraction, Fraction]:
    """(lo, hi, |x|): the two grid points of the unbounded-exponent format around |x| (lo == hi if exact)."""
    X = Fraction(abs(x))
    if X == 0:
        return X, X, X
    emin = fmt.emin
    q = max(floor_log2(X), emin) - fmt.mantissa_bits
    Q = Fraction(2) ** q
    lo = (X // Q) * Q
    hi = lo if lo == X else lo + Q
    return lo, hi, X


def round_magnitude(x: float, fmt: Format, rounding: str) -> Fraction:
    lo, hi, X = candidates(x, fmt)
    if lo == hi:
        return lo
    neg = math.copysign(1.0, x) < 0
    if rounding == "nearest_even":
        d_lo, d_hi = X - lo, hi - X
        if d_lo != d_hi:
            return lo if d_lo < d_hi else hi
        Q = hi - lo
        return lo if (lo / Q) % 2 == 0 else hi
    if rounding == "nearest_away":
        return lo if X - lo < hi - X else hi
    if rounding == "toward_zero":
        return lo
    if rounding == "up":
        return lo if neg else hi
    if rounding == "down":
        return hi if neg else lo
    raise ValueError(rounding)


def exact(x: float, fmt: Format, rounding: str = "nearest_even", overflow=None, subnormals=True,
          magnitude: Fraction | None = None) -> float:
    """The value quantize(x, fmt, ...) must return. `magnitude` overrides the rounded magnitude (used to
    check each outcome of stochastic rounding)."""
    if math.isnan(x):
        return NAN
    neg = math.copysign(1.0, x) < 0
    truncating = rounding == "toward_zero" or (rounding == "down" and not neg) or (rounding == "up" and neg)
    own = "nonfinite" if (fmt.has_inf or fmt.has_nan) else "saturate"
    mode = overflow or own
    fmax = Fraction(fmt.max)

    if fmt.specials == "e8m0":
        if neg or x == 0:
            return NAN
        if math.isinf(x):
            return float(fmax) if overflow == "saturate" else NAN
        r = magnitude if magnitude is not None else round_magnitude(x, fmt, rounding)
        r = max(r, Fraction(fmt.min_normal))
        if r > fmax:
            sat = overflow == "saturate" or rounding in ("toward_zero", "down")
            return float(fmax) if sat else NAN
        return float(r)

    if math.isinf(x):
        if mode == "saturate":
            r = fmax
        else:
            return math.copysign(math.inf, x) if fmt.has_inf else NAN
    else:
        r = magnitude if magnitude is not None else round_magnitude(x, fmt, rounding)
        if (not subnormals or not fmt.has_subnormals) and r < Fraction(fmt.min_normal):
            r = Fraction(0)
        if r > fmax:
            if mode == "saturate" or truncating:
                r = fmax
            else:
                return math.copysign(math.inf, x) if fmt.has_inf else NAN
    if r == 0 and not fmt.has_negative_zero:
        return 0.0
    return -float(r) if neg else float(r)
