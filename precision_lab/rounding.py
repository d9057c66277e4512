"""Bit-exact rounding of float32 values into any `Format`, in pure JAX.

`quantize(x, fmt)` returns float32 values that `fmt` holds exactly. It works on the float32 bit pattern
with integer arithmetic only (bitcast, shifts, adds, compares). That choice is what makes the simulation
faithful under XLA:
  * XLA's excess-precision rewrite (`--xla_allow_excess_precision`, on by default) only touches floating
    point converts; it cannot elide or fuse away an integer computation on the bit pattern.
  * XLA:CPU flushes subnormal results of float arithmetic to zero; integer code does not, so subnormal
    inputs and subnormal target values (bf16 shares float32's subnormals) come out exactly right.
  * no float multiply-add appears, so FMA contraction cannot change a rounding either.

Algorithm, per element: split |x| into an integer significand `sig` and exponent `e`; the target's quantum
in x's binade is 2^q with q = max(e, emin) - mantissa_bits; shift `sig` right by s = q - (e - 23) bits and
round the dropped bits per the rounding mode; rebuild the float32 bit pattern of n * 2^q; then apply the
format's special-value rules (overflow, inf, NaN, signed zero).

Gradient: straight-through (identity), the convention of quantization-aware training; the precision of the
backward pass is decided by the policy's gradient components, not here.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from precision_lab.errors import unknown_choice
from precision_lab.formats import Format, get_format

Rounding = Literal["nearest_even", "nearest_away", "toward_zero", "up", "down", "stochastic"]
Overflow = Literal["saturate", "nonfinite"] | None

ROUNDINGS: tuple[str, ...] = ("nearest_even", "nearest_away", "toward_zero", "up", "down", "stochastic")
OVERFLOWS: tuple[str, ...] = ("saturate", "nonfinite")

_U32 = jnp.uint32
_SIGN = 0x80000000
_ABS = 0x7FFFFFFF
_INF = 0x7F800000
_QNAN = 0x7FC00000


def _f32_bits(value: float) -> int:
    """Float32 bit pattern of a Python float that float32 holds exactly."""
    import numpy as np

    return int(np.array(value, np.float32).view(np.uint32))


def _u(v: int) -> jax.Array:
    return jnp.asarray(v, _U32)


def _round_significand(sig, s, negative, rounding: str, key):
    """Round sig / 2^s to an integer per `rounding`. sig < 2^24 (uint32), s >= 0 (uint32, may exceed 31).

    Returns the rounded integer n (uint32). Deterministic modes clamp s at 25: for s >= 25 the quotient is
    0 and the remainder (sig < 2^24) is below half a quantum, so every deterministic decision is unchanged.
    """
    s_c = jnp.minimum(s, _u(25))
    trunc = lax.shift_right_logical(sig, s_c)
    rem = sig - lax.shift_left(trunc, s_c)
    # half = 2^(s-1); with s = 0 there is nothing to round (rem == 0), so any half > 0 works.
    half = lax.shift_left(_u(1), jnp.maximum(s_c, _u(1)) - _u(1))
    inexact = rem != 0
    if rounding == "nearest_even":
        odd = (trunc & _u(1)) == 1
        up = (rem > half) | ((rem == half) & odd & (s_c > 0))
    elif rounding == "nearest_away":
        up = (rem >= half) & inexact
    elif rounding == "toward_zero":
        up = jnp.zeros_like(inexact)
    elif rounding == "up":
        up = inexact & ~negative
    elif rounding == "down":
        up = inexact & negative
    elif rounding == "stochastic":
        up = _stochastic_up(sig, s, key)
        trunc = jnp.where(s >= 32, _u(0), lax.shift_right_logical(sig, jnp.minimum(s, _u(31))))
    else:  # pragma: no cover - validated by the caller
        raise unknown_choice("rounding", rounding, ROUNDINGS)
    return trunc + up.astype(_U32)


def _stochastic_up(sig, s, key):
    """Round up with probability exactly rem / 2^s (rem = sig mod 2^s), for every s <= 64.

    Draw r uniform on [0, 2^s) and round up iff r < rem. For s <= 32 r is the top s bits of one random
    word. For 32 < s <= 64, rem = sig < 2^24 < 2^32, so r < rem iff the high (s - 32) bits of r are zero
    and the low 32 bits are < rem. Beyond s = 64 (|x| below 2^-41 times the format's smallest subnormal)
    the probability rem / 2^s is below 2^24 / 2^65 = 2^-41 and we round toward zero: the one place where
    stochastic rounding is not exactly unbiased. Float32 inputs reach it only in formats with a narrower
    exponent range than float32's (bf16 drops at most 39 bits; fp8_e4m3fn, say, below 2^-50).
    """
    k_lo, k_hi = jax.random.split(key)
    r_lo = jax.random.bits(k_lo, sig.shape, _U32)
    r_hi = jax.random.bits(k_hi, sig.shape, _U32)
    s_small = jnp.clip(s, _u(1), _u(32))
    mask_small = jnp.where(s_small >= 32, _u(0xFFFFFFFF), lax.shift_left(_u(1), jnp.minimum(s_small, _u(31))) - _u(1))
    rem_small = sig & mask_small
    r_small = jnp.where(s_small >= 32, r_lo, lax.shift_right_logical(r_lo, _u(32) - s_small))
    up_small = r_small < rem_small
    hi_bits = jnp.clip(s, _u(32), _u(64)) - _u(32)  # 0..32 high random bits that must all be zero
    hi_mask = jnp.where(hi_bits >= 32, _u(0xFFFFFFFF), lax.shift_left(_u(1), jnp.minimum(hi_bits, _u(31))) - _u(1))
    up_big = ((r_hi & hi_mask) == 0) & (r_lo < sig)
    up = jnp.where(s <= 32, up_small, jnp.where(s <= 64, up_big, False))
    return up & (s > 0)


def _build_bits(n, q):
    """Float32 bit pattern (magnitude) of n * 2^q, for n < 2^25 (uint32) and q (int32) such that the value
    is a float32 or overflows to inf. Pure integer code: exact for normal and subnormal results."""
    nonzero = n != 0
    lead = _u(31) - lax.clz(jnp.where(nonzero, n, _u(1)))  # position of the leading one
    lead_i = lead.astype(jnp.int32)
    rexp = q + lead_i  # unbiased exponent of the result
    # Normal result: exponent field rexp + 127, mantissa = n without its leading one, aligned to bit 23.
    left = jnp.clip(23 - lead_i, 0, 31).astype(_U32)
    right = jnp.clip(lead_i - 23, 0, 31).astype(_U32)
    aligned = lax.shift_right_logical(lax.shift_left(n, left), right)
    field = jnp.clip(rexp + 127, 0, 255).astype(_U32)
    normal = lax.shift_left(field, _u(23)) | (aligned & _u(0x7FFFFF))
    normal = jnp.where(rexp + 127 >= 255, _u(_INF), normal)
    # Subnormal float32 result (only formats with float32's exponent range get here): bits = n << (q + 149).
    sub_shift = jnp.clip(q + 149, 0, 31).astype(_U32)
    subnormal = lax.shift_left(n, sub_shift)
    bits = jnp.where(rexp < -126, subnormal, normal)
    return jnp.where(nonzero, bits, _u(0))


def _round_bits_nearest_even(v, m: int):
    """Float32 bit patterns v rounded as integers to keep m < 23 mantissa bits, ties to even: exact in a
    binade where the quantum is 2^(23 - m) bit units (the carry walks into the exponent by itself). With no
    mantissa bits every significand is 1 (odd): ties round up. For a signed pattern the carry stays below the
    sign bit (|v| + 2^22 < 2^31 for finite v) and the tie bit is |v|'s."""
    shift = 23 - m
    lsb = lax.shift_right_logical(v, _u(shift)) & _u(1) if m > 0 else _u(1)
    return (v + _u((1 << (shift - 1)) - 1) + lsb) & _u(~((1 << shift) - 1) & 0xFFFFFFFF)


def _nearest_even_magnitude(a, fmt: Format):
    """Fast path for round-to-nearest-even (the rounding of every emulated op): |x| bits in, bits out.

    In the format's normal range the quantum is a fixed 2^(23 - m) float32 bit units, so rounding the bit
    pattern as an integer is exact, and the carry walks into the exponent by itself. Formats with float32's
    exponent range (bf16, tf32, e8mY) need nothing else: float32 subnormals are linear in the bit pattern
    too. Below a narrower format's smallest normal the quantum is the fixed 2^(emin - m): the significand is
    shifted right by a per-element amount and rounded as an integer, and the integer n is turned back into
    n * 2^(emin - m) by an exact float32 multiply (n < 2^24, the product is a normal float32). Float32
    inputs below 2^-126 round to zero for every such format (its smallest subnormal is >= 2^-85).
    (A float magic-number trick, (t + 2^23) - 2^23, does NOT survive XLA: it folds the pair away.)
    """
    m = fmt.mantissa_bits
    shift = 23 - m
    if shift == 0:
        # 23 mantissa bits: every float32 in the format's normal range is already on its grid; but a
        # narrower exponent range (e5m23, e7m23) still has a subnormal range to round into below.
        normal = a
    else:
        normal = _round_bits_nearest_even(a, m)
    if fmt.emin <= -126:
        return normal
    biased = lax.shift_right_logical(a, _u(23)).astype(jnp.int32)
    sig = (a & _u(0x7FFFFF)) | _u(0x800000)
    drop = jnp.clip(shift + (fmt.emin + 127) - biased, 0, 25).astype(_U32)  # s >= 25: below half a quantum
    trunc = lax.shift_right_logical(sig, drop)
    rem = sig - lax.shift_left(trunc, drop)
    half = lax.shift_left(_u(1), jnp.maximum(drop, _u(1)) - _u(1))
    n = trunc + ((rem > half) | ((rem == half) & ((trunc & _u(1)) == 1))).astype(_U32)
    n = jnp.where(biased == 0, _u(0), n)
    sub = lax.bitcast_convert_type(n.astype(jnp.float32) * jnp.float32(2.0 ** (fmt.emin - m)), _U32)
    return jnp.where(a < _u(_f32_bits(fmt.min_normal)), sub, normal)


def _wide_ieee_fast_path(fmt: Format, rounding: str, overflow, subnormals: bool) -> bool:
    """Whether `_nearest_even_wide_ieee` applies: round-to-nearest-even into an IEEE format with float32's
    exponent range (bf16, tf32, e8mY), keeping subnormals, overflowing to inf or saturating."""
    return (rounding == "nearest_even" and fmt.specials == "ieee" and fmt.emin <= -126
            and fmt.mantissa_bits < 23 and overflow in (None, "nonfinite", "saturate")
            and subnormals and fmt.has_subnormals)


def _nearest_even_wide_ieee(u, fmt: Format, overflow):
    """The whole of `_quantize_bits` for the formats `_wide_ieee_fast_path` accepts, in 7-9 integer ops
    instead of ~20 (this is the rounding after every emulated bf16 op, so its cost is the emulation's cost).

    Why it equals the general path bit for bit (tests/test_quantize.py checks it exhaustively per binade):
      * rounding: `_nearest_even_magnitude` with fmt.emin <= -126 is exactly `_round_bits_nearest_even`.
        Applying it to the signed pattern u instead of |u| changes nothing for non-NaN inputs: |u| + 2^(shift-1) <=
        0x7F7FFFFF + 2^22 < 2^31, so the carry never reaches the sign bit, and the tie bit (bit `shift`) is
        the same in u and |u|. So r = sign | rounded magnitude.
      * specials: the format's max is float32's largest value with the low `shift` bits cleared, so a finite
        input whose rounded magnitude exceeds it has carried into the exponent field and IS inf (0x7F800000),
        as is +-inf itself. With overflow None/"nonfinite" an IEEE format's overflow value is inf (the
        rounding is nearest, never truncating): nothing to change. With "saturate" the value is +-max:
        min(magnitude, max) restores the sign afterwards. Subnormals are kept (flush only when asked), the
        format has -0, and no rounded non-NaN magnitude equals the quiet NaN pattern, so the remaining
        `_apply_specials` rules are no-ops. NaN inputs stay NaN, quieted (u | 0x400000), as in the general path.
    """
    a = u & _u(_ABS)
    if overflow == "saturate":
        mag = jnp.minimum(_round_bits_nearest_even(a, fmt.mantissa_bits), _u(_f32_bits(fmt.max)))
        out = mag | (u & _u(_SIGN))
    else:
        out = _round_bits_nearest_even(u, fmt.mantissa_bits)
    return jnp.where(a > _u(_INF), u | _u(0x400000), out)


def _narrow_saturate_fast_path(fmt: Format, rounding: str, overflow, subnormals: bool) -> bool:
    """Whether `_nearest_even_narrow_saturate` applies: round-to-nearest-even with saturation into a signed
    format with a narrower exponent range than float32's (fp8, fp6, fp4, fp16-like), subnormals and -0 kept:
    the cast of every scaled fp8 recipe (delayed, current, tile scaling), so its cost is their cost."""
    # emin - m >= -125: the subnormal quantum 2^(emin - m) and its inverse are normal float32 powers of two,
    # and every float32 subnormal input lies below half a quantum (every eXmY with X <= 7 has emin - m >= -84).
    return (rounding == "nearest_even" and overflow == "saturate" and subnormals and fmt.emin > -126
            and fmt.emin - fmt.mantissa_bits >= -125 and fmt.mantissa_bits < 23 and fmt.has_subnormals
            and fmt.has_negative_zero)


def _nearest_even_narrow_saturate(u, fmt: Format):
    """The whole of `_quantize_bits` for the formats and options `_narrow_saturate_fast_path` accepts, in
    ~16 ops instead of ~40 (tests/test_quantize.py checks it against the general path bit for bit).

    Why it equals the general path:
      * normal range (|x| >= the format's smallest normal): the integer rounding of the bit pattern that
        `_nearest_even_magnitude` uses there (`_round_bits_nearest_even`).
      * below it the quantum is the fixed 2^(emin - m), so the rounded magnitude is
        roundeven(|x| * 2^(m - emin)) * 2^(emin - m): both products are exact (powers of two; the first
        scales up, the second gives n * 2^(emin - m) with n <= 2^m, a normal float32) and roundeven is
        IEEE's round-half-even to an integer, exactly what the general path's integer shift-and-round
        computes. Float32 subnormal inputs (< 2^-126) give 0 either way, also if XLA:CPU flushes them
        (DESIGN.md): they lie below half the format's smallest subnormal, 2^(emin - m) >= 2^-125. A result
        of 2^m * quantum is the smallest normal, as in the general path (the carry into the exponent).
      * saturation: any magnitude above the format's max, inf included, becomes max (`_apply_specials`
        with overflow "saturate"); min() on the bit patterns does it because both are non-negative floats.
      * the sign is put back (the format has -0), NaN stays NaN, quieted (u | 0x400000), as in the general
        path; no saturated magnitude equals the quiet NaN pattern, so no other rule of `_apply_specials`
        applies.
    """
    m = fmt.mantissa_bits
    a = u & _u(_ABS)
    normal = _round_bits_nearest_even(a, m)
    magnitude = lax.bitcast_convert_type(a, jnp.float32)
    n = lax.round(magnitude * jnp.float32(2.0 ** (m - fmt.emin)), lax.RoundingMethod.TO_NEAREST_EVEN)
    sub = lax.bitcast_convert_type(n * jnp.float32(2.0 ** (fmt.emin - m)), _U32)
    mag = jnp.minimum(jnp.where(a < _u(_f32_bits(fmt.min_normal)), sub, normal), _u(_f32_bits(fmt.max)))
    return jnp.where(a > _u(_INF), u | _u(0x400000), mag | (u & _u(_SIGN)))


def _quantize_bits(u, fmt: Format, rounding: str, overflow, subnormals: bool, key):
    """Core: float32 bit patterns in, float32 bit patterns of the rounded values out."""
    if _wide_ieee_fast_path(fmt, rounding, overflow, subnormals):
        return _nearest_even_wide_ieee(u, fmt, overflow)
    if _narrow_saturate_fast_path(fmt, rounding, overflow, subnormals):
        return _nearest_even_narrow_saturate(u, fmt)
    if rounding == "nearest_even" and fmt.specials != "e8m0":
        sign = u & _u(_SIGN)
        a = u & _u(_ABS)
        return _apply_specials(u, sign, a, _nearest_even_magnitude(a, fmt), fmt, rounding, overflow, subnormals)
    m = fmt.mantissa_bits
    sign = u & _u(_SIGN)
    negative = sign != 0
    a = u & _u(_ABS)
    is_nan = a > _u(_INF)
    is_inf = a == _u(_INF)

    biased = lax.shift_right_logical(a, _u(23))
    man = a & _u(0x7FFFFF)
    # Normalise float32 subnormal inputs so that every nonzero sig has its leading one at bit 23 and e is
    # the true binade exponent (formats like e8m0 reach below float32's smallest normal).
    is_sub = biased == 0
    lead_sub = (_u(31) - lax.clz(man)).astype(jnp.int32)  # -1 for zero
    sub_shift = jnp.clip(23 - lead_sub, 0, 31).astype(_U32)
    sig = jnp.where(is_sub, lax.shift_left(man, sub_shift), man | _u(0x800000))
    e = jnp.where(is_sub, lead_sub - 149, biased.astype(jnp.int32) - 127)
    emin = fmt.emin
    q = jnp.maximum(e, emin) - m  # exponent of the target's quantum in x's binade
    s = (q - (e - 23)).astype(_U32)  # bits to drop, >= 23 - m

    n = _round_significand(sig, s, negative, rounding, key)
    mag = _build_bits(n, q)

    max_bits = _u(_f32_bits(fmt.max))
    min_bits = _u(_f32_bits(fmt.min_normal))

    if fmt.specials == "e8m0":
        return _e8m0_specials(u, mag, negative, is_nan, is_inf, max_bits, min_bits, overflow, rounding)

    return _apply_specials(u, sign, a, mag, fmt, rounding, overflow, subnormals)


def _apply_specials(u, sign, a, mag, fmt: Format, rounding: str, overflow, subnormals: bool):
    """Subnormal flushing, overflow, inf, NaN and signed zero, given the rounded magnitude bits `mag`."""
    negative = sign != 0
    is_nan = a > _u(_INF)
    is_inf = a == _u(_INF)
    max_bits = _u(_f32_bits(fmt.max))
    min_bits = _u(_f32_bits(fmt.min_normal))
    if not subnormals or not fmt.has_subnormals:
        mag = jnp.where(mag < min_bits, _u(0), mag)

    # Overflow. Rounding toward zero (for this sign) never produces inf: IEEE gives the largest finite.
    overflowed = (mag > max_bits) | is_inf
    truncating = {
        "toward_zero": jnp.ones_like(negative),
        "down": ~negative,
        "up": negative,
    }.get(rounding, jnp.zeros_like(negative))
    own = "nonfinite" if fmt.has_inf or fmt.has_nan else "saturate"  # what the format's own cast does
    mode = own if overflow is None else overflow
    if mode == "saturate":
        over_value = max_bits
    elif fmt.has_inf:
        # Finite inputs that truncate saturate at max; infinite inputs stay infinite (IEEE conversion).
        over_value = jnp.where(truncating & ~is_inf, max_bits, _u(_INF))
    else:  # formats without inf: out of range is NaN (the fn types' cast, or "nonfinite" by request)
        over_value = jnp.where(truncating & ~is_inf, max_bits, _u(_QNAN))
    mag = jnp.where(overflowed, over_value, mag)

    out = mag | sign
    out = jnp.where(mag == _u(_QNAN), _u(_QNAN), out)  # NaN produced by overflow: canonical, unsigned
    if not fmt.has_negative_zero:
        out = jnp.where(mag == 0, _u(0), out)  # fnuz formats have no -0
    return jnp.where(is_nan, u | _u(0x400000), out)  # NaN stays NaN (quieted)


def _e8m0_specials(u, mag, negative, is_nan, is_inf, max_bits, min_bits, overflow, rounding):
    """The MX scale format: unsigned powers of two 2^-127..2^127; zero, negatives and NaN map to NaN.

    There is no zero, so values below 2^-127 go to 2^-127 (as the ml_dtypes cast does)."""
    mag = jnp.where(mag < min_bits, min_bits, mag)
    overflowed = (mag > max_bits) | is_inf
    truncating = rounding in ("toward_zero", "down")  # e8m0 is unsigned: down is toward zero
    sat = overflow == "saturate" or truncating
    mag = jnp.where(overflowed & ~is_inf, max_bits if sat else _u(_QNAN), mag)
    mag = jnp.where(is_inf, max_bits if overflow == "saturate" else _u(_QNAN), mag)
    zero = (u & _u(_ABS)) == 0
    return jnp.where(is_nan | negative | zero, _u(_QNAN), mag)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _quantize_st(x, fmt, rounding, overflow, subnormals, key):
    u = lax.bitcast_convert_type(x, _U32)
    return lax.bitcast_convert_type(_quantize_bits(u, fmt, rounding, overflow, subnormals, key), jnp.float32)


@_quantize_st.defjvp
def _quantize_st_jvp(fmt, rounding, overflow, subnormals, primals, tangents):
    x, key = primals
    dx, _ = tangents
    return _quantize_st(x, fmt, rounding, overflow, subnormals, key), dx  # straight-through


# -- IEEE-style formats with field widths known only at run time --------------------------------------------
#
# A sweep over formats (the sensitivity map: mantissa bits 0..10, exponent bits 2..8) would compile one XLA
# program per format if the format were baked in, and compiling dominates a small run. `quantize_ieee_traced`
# takes the exponent and mantissa widths as (traced) integer arrays instead, so one compiled program serves
# every IEEE-style format (specials "ieee": inf and NaN on the all-ones exponent, bias 2^(e-1) - 1) and a
# vmapped program can hold members in different formats side by side. It is the static path's
# round-to-nearest-even (`_nearest_even_magnitude` + `_apply_specials`, and `_nearest_even_wide_ieee` for 8
# exponent bits) written with per-element shift amounts: bit for bit the same result for every input and
# every format it covers (tests/test_traced_format.py checks all of them on the edge cases of each binade,
# float32 subnormals, overflow, inf and NaN, and on random bit patterns).


def _pow2_f32(k):
    """float32 2^k for int32 k in [-126, 127], built from its bit pattern (exact, no float arithmetic)."""
    return lax.bitcast_convert_type(jnp.left_shift((k + 127).astype(_U32), _u(23)), jnp.float32)


def ieee_format_fields(exponent_bits, mantissa_bits):
    """(emin, max bits, min-normal bits) of the IEEE-style format eXmY as integer arrays (traced or not)."""
    e = jnp.asarray(exponent_bits, jnp.int32)
    m = jnp.asarray(mantissa_bits, jnp.int32)
    bias = jnp.left_shift(jnp.int32(1), e - 1) - 1
    emin = 1 - bias
    emax = jnp.left_shift(jnp.int32(1), e) - 2 - bias  # the all-ones exponent is inf/NaN
    shift = (23 - m).astype(_U32)
    frac = jnp.bitwise_and(jnp.bitwise_not(jnp.left_shift(_u(1), shift) - _u(1)), _u(0x7FFFFF))
    max_bits = jnp.left_shift((emax + 127).astype(_U32), _u(23)) | frac
    min_bits = jnp.left_shift((emin + 127).astype(_U32), _u(23))
    return emin, max_bits, min_bits


def _quantize_ieee_bits_traced(u, e, m, overflow, subnormals: bool):
    """`_quantize_bits(u, eXmY, "nearest_even", overflow, subnormals)` with e, m int32 arrays (see above)."""
    sign = u & _u(_SIGN)
    a = u & _u(_ABS)
    shift = (23 - m).astype(_U32)  # 0..23 float32 bit units per quantum in the normal range
    emin, max_bits, min_bits = ieee_format_fields(e, m)
    # Normal range: round the bit pattern as an integer (the carry walks into the exponent by itself). Ties
    # go to the even significand; with no mantissa bits every significand is 1 (odd), so ties round up;
    # with 23 mantissa bits nothing is dropped.
    half_m1 = jnp.where(shift > 0, jnp.left_shift(_u(1), jnp.maximum(shift, _u(1)) - _u(1)) - _u(1), _u(0))
    lsb = jnp.where(m == 0, _u(1), jnp.right_shift(a, shift) & _u(1))
    lsb = jnp.where(shift > 0, lsb, _u(0))
    keep = jnp.bitwise_not(jnp.left_shift(_u(1), shift) - _u(1))
    normal = (a + half_m1 + lsb) & keep
    # Below a narrower format's smallest normal the quantum is the fixed 2^(emin - m): shift the significand
    # by a per-element amount, round it as an integer, scale back exactly (n < 2^24: a normal float32).
    biased = jnp.right_shift(a, _u(23)).astype(jnp.int32)
    sig = (a & _u(0x7FFFFF)) | _u(0x800000)
    drop = jnp.clip(shift.astype(jnp.int32) + (emin + 127) - biased, 0, 25).astype(_U32)
    trunc = jnp.right_shift(sig, drop)
    rem = sig - jnp.left_shift(trunc, drop)
    half = jnp.left_shift(_u(1), jnp.maximum(drop, _u(1)) - _u(1))
    n = trunc + ((rem > half) | ((rem == half) & ((trunc & _u(1)) == 1))).astype(_U32)
    n = jnp.where(biased == 0, _u(0), n)  # float32 subnormals are below half the format's smallest subnormal
    sub = lax.bitcast_convert_type(n.astype(jnp.float32) * _pow2_f32(emin - m), _U32)
    # 8 exponent bits (emin = -126): float32's own subnormals are on the format's grid, as in the static path.
    mag = jnp.where((emin > -126) & (a < min_bits), sub, normal)
    # Specials (`_apply_specials` for an IEEE format rounding to nearest): flush, overflow, NaN.
    if not subnormals:
        mag = jnp.where(mag < min_bits, _u(0), mag)
    else:
        mag = jnp.where((m == 0) & (mag < min_bits), _u(0), mag)  # no mantissa bits: no subnormals
    overflowed = (mag > max_bits) | (a == _u(_INF))
    mag = jnp.where(overflowed, max_bits if overflow == "saturate" else _u(_INF), mag)
    return jnp.where(a > _u(_INF), u | _u(0x400000), mag | sign)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _quantize_traced_st(x, e, m, overflow, subnormals):
    u = lax.bitcast_convert_type(x, _U32)
    return lax.bitcast_convert_type(_quantize_ieee_bits_traced(u, e, m, overflow, subnormals), jnp.float32)


@_quantize_traced_st.defjvp
def _quantize_traced_st_jvp(overflow, subnormals, primals, tangents):
    x, e, m = primals
    return _quantize_traced_st(x, e, m, overflow, subnormals), tangents[0]  # straight-through


def quantize_ieee_traced(x, exponent_bits, mantissa_bits, *, overflow: Overflow = None,
                         subnormals: bool = True) -> jax.Array:
    """Round float32 `x` to nearest-even into the IEEE-style format with `exponent_bits` (2..8) and
    `mantissa_bits` (0..23) given as integers or integer arrays (traced: one compiled program serves every
    such format; arrays broadcast against x, e.g. one format per vmapped member).

    Bit-identical to `quantize(x, f"e{e}m{m}", overflow=overflow, subnormals=subnormals)` for the IEEE
    custom format eXmY (NaN quieted, signed zeros kept, overflow to inf unless "saturate"). Widths outside
    the ranges are not checked here (they may be tracers): `precision_lab.policy` only lets valid ones in.
    """
    if overflow is not None and overflow not in OVERFLOWS:
        raise unknown_choice("overflow", overflow, OVERFLOWS)
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)
    e = jnp.asarray(exponent_bits, jnp.int32)
    m = jnp.asarray(mantissa_bits, jnp.int32)
    return _quantize_traced_st(x, e, m, "saturate" if overflow == "saturate" else None, subnormals)


def quantize(
    x,
    fmt: str | Format,
    *,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = None,
    subnormals: bool = True,
    key: jax.Array | None = None,
) -> jax.Array:
    """Round `x` into `fmt` and return float32 values that `fmt` holds exactly.

    Args:
      x: array-like of any float dtype; converted to float32 first (exactly, for every narrower input).
      fmt: a `Format` or a name accepted by `get_format` ("bf16", "fp8_e4m3fn", "e5m7", ...).
      rounding: nearest_even | nearest_away | toward_zero | up | down | stochastic (needs `key`; rounds up
        with probability equal to the fraction of the quantum dropped, exactly while at most 64 bits are
        dropped, i.e. for |x| >= 2^-41 x the smallest subnormal; smaller values round toward zero).
      overflow: "saturate" clips to +-max (inf included); "nonfinite" gives inf where the format has inf and
        NaN otherwise; None gives what the format's own cast gives (IEEE formats: inf, fn/fnuz: NaN,
        fp6/fp4: saturate, e8m0: NaN). Rounding toward zero never overflows to inf (IEEE).
      subnormals: False flushes results below the smallest normal to (signed) zero.
      key: PRNG key for stochastic rounding.

    NaN stays NaN, also for fp6/fp4 which have no NaN encoding (the OCP MX spec leaves that conversion to
    the implementation; the ml_dtypes cast gives -0 there, we keep the NaN so it stays visible). Signed
    zeros keep their sign, except in the fnuz formats which have no negative zero.
    """
    fmt = get_format(fmt)
    if rounding not in ROUNDINGS:
        raise unknown_choice("rounding", rounding, ROUNDINGS)
    if overflow is not None and overflow not in OVERFLOWS:
        raise unknown_choice("overflow", overflow, OVERFLOWS)
    if rounding == "stochastic":
        if key is None:
            raise ValueError("stochastic rounding needs a PRNG key: quantize(x, fmt, rounding='stochastic', key=key)")
    else:
        key = jax.random.key(0)  # unused; keeps one code path for every mode
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)  # exact: every input dtype we accept is narrower than float32
    if fmt.name == "fp32" and subnormals and overflow != "saturate":
        return x  # float32 into float32 is exact
    return _quantize_st(x, fmt, rounding, overflow, subnormals, key)


__all__ = ["quantize", "quantize_ieee_traced", "ieee_format_fields", "ROUNDINGS", "OVERFLOWS", "Rounding", "Overflow"]
