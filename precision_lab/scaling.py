"""Scaling into narrow formats: map a tensor's range onto the format's before rounding.

Every function returns the *dequantized* float32 tensor (what the narrow values stand for), so callers keep
float32 storage; `scaled_quantize` dispatches on the spec's scaling name.

  current      per-tensor: scale = fmax / amax / 2^margin with amax = max|x| of this tensor.
  delayed      per-tensor, Transformer Engine style: scale from the max of an amax history window of past
               steps (the current amax is pushed into the history afterwards); state carried functionally.
  mx           OCP MX v1.0: blocks of 32 consecutive elements along `axis` share one power-of-two scale
               X = 2^(floor(log2(amax_block)) - emax_elem), stored as e8m0; elements rounded with saturation.
  tile1x128    per 1x128 tile along `axis` (DeepSeek-V3 activations): scale = fmax / amax_tile.
  tile128x128  per 128x128 tile over the last two axes (weights).

Scales are kept finite: a zero, subnormal-tiny or non-finite amax gives scale 1 (nothing known about the
range), and scales are clipped to [2^-126, 2^126]. Dequantizing by dividing by a non-power-of-two scale in
float32 adds at most half a float32 ulp, far below any narrow format's rounding (documented, not hidden).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from precision_lab.formats import Format, get_format
from precision_lab.rounding import quantize

MX_BLOCK = 32
TILE = 128
DEFAULT_HISTORY = 16  # Transformer Engine defaults to 1024 steps; small runs need a shorter memory
_SCALE_MIN, _SCALE_MAX = 2.0**-126, 2.0**126


class DelayedState(NamedTuple):
    """<float32>[history]: the amax of the last `history` steps, newest first."""

    amax_history: jax.Array


def init_delayed_state(history: int = DEFAULT_HISTORY) -> DelayedState:
    return DelayedState(jnp.zeros((history,), jnp.float32))


def scale_from_amax(amax, fmt: Format, margin: int = 0) -> jax.Array:
    """scale = fmax / amax / 2^margin, finite for every amax (zero, tiny, inf, NaN give 1)."""
    amax = jnp.asarray(amax, jnp.float32)
    usable = jnp.isfinite(amax) & (amax >= jnp.float32(2.0**-126))
    safe_amax = jnp.where(usable, amax, jnp.float32(1.0))
    scale = jnp.float32(fmt.max / 2.0**margin) / safe_amax
    return jnp.where(usable, jnp.clip(scale, _SCALE_MIN, _SCALE_MAX), jnp.float32(1.0))


def _amax(x, axis=None, keepdims=False):
    ax = jnp.abs(x)
    ax = jnp.where(jnp.isnan(ax), jnp.float32(0.0), ax)  # a NaN element must not poison the scale
    return jnp.max(ax, axis=axis, keepdims=keepdims)


def _round(x, fmt, rounding, key, overflow=None):
    # Scaled casts clip by default: the scale maps amax onto fmax, and real fp8 recipes saturate (PAPER.md
    # section 11). overflow="nonfinite" keeps the format's inf/NaN instead (a spec's explicit overflow token).
    return quantize(x, fmt, rounding=rounding, overflow=overflow or "saturate", key=key)


def current_scaled(x, fmt, *, rounding="nearest_even", key=None, margin: int = 0, overflow=None):
    fmt = get_format(fmt)
    scale = scale_from_amax(_amax(x), fmt, margin)
    return _round(x * scale, fmt, rounding, key, overflow) / scale


def delayed_scaled(x, fmt, state: DelayedState, *, rounding="nearest_even", key=None, margin: int = 0,
                   overflow=None):
    """Returns (dequantized x, new state). The scale uses only past amaxes (that is what 'delayed' means:
    the cast does not wait for a reduction over the tensor); on the first step the history is empty and
    the scale is 1."""
    fmt = get_format(fmt)
    scale = scale_from_amax(jnp.max(state.amax_history), fmt, margin)
    y = _round(x * scale, fmt, rounding, key, overflow) / scale
    new_history = jnp.roll(state.amax_history, 1).at[0].set(jax.lax.stop_gradient(_amax(x)))
    return y, DelayedState(new_history)


def _blocked(x, axis: int, block: int):
    """Move `axis` last and split it into blocks of `block` (zero padded). Returns (blocks, undo)."""
    moved = jnp.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    pad = (-n) % block
    padded = jnp.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)]) if pad else moved
    blocks = padded.reshape(*padded.shape[:-1], (n + pad) // block, block)

    def undo(b):
        flat = b.reshape(*b.shape[:-2], -1)[..., :n]
        return jnp.moveaxis(flat, -1, axis)

    return blocks, undo


def mx_scales(x, fmt, *, axis: int = -1, block: int = MX_BLOCK) -> jax.Array:
    """The e8m0 shared scale X of each block (float32 powers of two), per OCP MX v1.0 section 6.3."""
    fmt = get_format(fmt)
    blocks, _ = _blocked(x, axis, block)
    amax = _amax(blocks, axis=-1, keepdims=True)
    # floor(log2(amax)) exactly, from the float32 exponent field (amax of a float32 tensor is a float32).
    bits = jax.lax.bitcast_convert_type(jnp.maximum(amax, jnp.float32(2.0**-126)), jnp.int32)
    exp = jnp.right_shift(bits, 23) - 127
    # e8m0 reaches 2^-127, but a float32 subnormal scale would be flushed by XLA:CPU arithmetic; a block
    # that small is all zeros after scaling in any case, so the floor is 2^-126.
    shared = jnp.clip(exp - fmt.emax, -126, 127)
    return jax.lax.bitcast_convert_type(jnp.left_shift(shared + 127, 23), jnp.float32)  # exactly 2^shared


def mx_scaled(x, fmt, *, rounding="nearest_even", key=None, axis: int = -1, block: int = MX_BLOCK, overflow=None):
    """MX block scaling: each block of 32 along `axis` shares one power-of-two (e8m0) scale."""
    fmt = get_format(fmt)
    blocks, undo = _blocked(x, axis, block)
    scale = mx_scales(x, fmt, axis=axis, block=block)
    # Division and multiplication by a power of two are exact (barring float32 underflow at 2^-126).
    q = _round(blocks / scale, fmt, rounding, key, overflow) * scale
    return undo(q)


def tile_scaled(x, fmt, *, rounding="nearest_even", key=None, axis: int = -1, tile=(1, TILE), overflow=None):
    """Per-tile current scaling: 1x128 tiles along `axis`, or 128x128 tiles over the last two axes."""
    fmt = get_format(fmt)
    if tile == (1, TILE) or x.ndim < 2:
        blocks, undo = _blocked(x, axis, TILE)
        scale = scale_from_amax(_amax(blocks, axis=-1, keepdims=True), fmt)
        return undo(_round(blocks * scale, fmt, rounding, key, overflow) / scale)
    r, c = x.shape[-2:]
    pr, pc = (-r) % TILE, (-c) % TILE
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pr), (0, pc)])
    lead = padded.shape[:-2]
    t = padded.reshape(*lead, (r + pr) // TILE, TILE, (c + pc) // TILE, TILE)
    scale = scale_from_amax(_amax(t, axis=(-3, -1), keepdims=True), fmt)
    q = (_round(t * scale, fmt, rounding, key, overflow) / scale).reshape(padded.shape)
    return q[..., :r, :c]


def scaled_quantize(x, spec, *, axis: int = -1, state: DelayedState | None = None, key=None, margin: int = 0):
    """Round `x` per a policy `Spec` (format, scaling, rounding, overflow). Returns (y, new_state); the
    state is only used and changed by delayed scaling. A scaled spec saturates unless its overflow says
    "nonfinite" (None means the format's own cast only without scaling)."""
    fmt = get_format(spec.format)
    if spec.scaling == "none":
        return quantize(x, fmt, overflow=spec.overflow, rounding=spec.rounding, key=key), state
    kw = dict(rounding=spec.rounding, key=key, overflow=spec.overflow)
    if spec.scaling == "current":
        return current_scaled(x, fmt, margin=margin, **kw), state
    if spec.scaling == "delayed":
        if state is None:
            raise ValueError("delayed scaling needs a DelayedState (ops.init_dot_state creates one per site)")
        return delayed_scaled(x, fmt, state, margin=margin, **kw)
    if spec.scaling == "mx":
        return mx_scaled(x, fmt, axis=axis, **kw), state
    if spec.scaling == "tile1x128":
        return tile_scaled(x, fmt, axis=axis, tile=(1, TILE), **kw), state
    if spec.scaling == "tile128x128":
        return tile_scaled(x, fmt, axis=axis, tile=(TILE, TILE), **kw), state
    raise ValueError(f"unknown scaling {spec.scaling!r}")  # the policy validates names before this


def format_view(x, spec, *, axis: int = -1, state: DelayedState | None = None, margin: int = 0):
    """`x` times the scale `scaled_quantize` applies before rounding: the values the format itself sees (for
    the overflow telemetry of `precision_lab.ops`: an element overflows when this exceeds the format's
    range). Delayed scaling without a state scales with the current amax, as `ops` does."""
    fmt = get_format(spec.format)
    if spec.scaling == "none":
        return x
    if spec.scaling == "current" or (spec.scaling == "delayed" and state is None):
        return x * scale_from_amax(_amax(x), fmt, margin)
    if spec.scaling == "delayed":
        return x * scale_from_amax(jnp.max(state.amax_history), fmt, margin)
    if spec.scaling == "mx":
        blocks, undo = _blocked(x, axis, MX_BLOCK)
        return undo(blocks / mx_scales(x, fmt, axis=axis))
    if spec.scaling == "tile1x128" or x.ndim < 2:
        blocks, undo = _blocked(x, axis, TILE)
        return undo(blocks * scale_from_amax(_amax(blocks, axis=-1, keepdims=True), fmt))
    r, c = x.shape[-2:]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, (-r) % TILE), (0, (-c) % TILE)])
    t = padded.reshape(*padded.shape[:-2], padded.shape[-2] // TILE, TILE, padded.shape[-1] // TILE, TILE)
    scaled = t * scale_from_amax(_amax(t, axis=(-3, -1), keepdims=True), fmt)
    return scaled.reshape(padded.shape)[..., :r, :c]


__all__ = [
    "format_view", "DelayedState", "init_delayed_state", "scale_from_amax", "current_scaled", "delayed_scaled", "mx_scales",
    "mx_scaled", "tile_scaled", "scaled_quantize", "MX_BLOCK", "TILE",
]
