"""Precision-aware ops: every numeric site of the model calls one of these with a component name, and the
policy decides how it rounds.

Two modes (`PrecisionPolicy.mode`):
  emulate  float32 storage; the result of every elementary op is rounded to the component's format with
           `quantize` (integer bit manipulation XLA cannot elide). Faithful on any backend.
  native   the real low-precision jax dtype where one exists (bf16, fp16, fp8...; others fall back to
           emulation): fast on hardware that has the dtype, but XLA may keep excess precision between ops
           (DESIGN.md fact 1) so it is not a faithful simulation. Values still cross op boundaries as
           float32 so that model code is identical in both modes.

Conventions, the same in both modes:
  * Inputs are rounded to the component's format on entry (e.g. router logits to bf16 before exp: that is
    where ST-MoE's roundoff comes from), outputs after every elementary op. One deliberate exception: gelu is
    one fused op, rounded once (see `gelu` for why).
  * Reductions (sum, mean, the sums in softmax/logsumexp/norms) accumulate in float32 and round once, as
    TPU/GPU reductions and matmuls do.
  * `dot` rounds its operands (with scaling), accumulates in float32 and rounds the output. Its custom VJP
    rounds the incoming gradient to the policy's "grads" spec, computes the input gradient from the rounded
    operands (rounded to "matmul_out", like the forward output) and the weight gradient in float32 (the
    trainer rounds it for the all-reduce and the update); an activation x activation product (QK^T, PV, the
    MoE combine) rounds its rhs gradient too. The router's matmul uses `router_grads` for both its incoming
    gradient and its input gradient, so a float32 router is float32 in the backward pass as well. With MX or
    1x128-tile scaling the backward re-blocks each operand along the reduction axis of its own product.
  * Stochastic rounding draws its random bits from the key given to `rounding_keys` (see there).
  * A matmul operand spec may carry an accumulator (`acc=e8m13/128`): then that product, and the two
    products of its backward pass (dgrad, wgrad), sum K in the order `matmul_accumulated` documents, with
    the running sum rounded to the accumulator format, instead of in float32.
  * Delayed scaling state enters `dot` as an input whose cotangent is the updated state (the "gradient
    trick" flax uses for fp8 metadata): `jax.grad` w.r.t. the state returns the new state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from precision_lab.errors import UserError
from precision_lab.formats import get_format
from precision_lab.policy import Accumulator, PrecisionPolicy, Spec, parse_accumulator
from precision_lab.rounding import quantize, quantize_ieee_traced
from precision_lab.scaling import DelayedState, format_view, init_delayed_state, scaled_quantize

_F32 = jnp.float32
_FP32_SPEC = Spec(format="fp32")


# -- rounding one tensor --------------------------------------------------------------------------------


def _native_dtype(spec: Spec):
    """The jnp dtype that holds this spec natively, or None (then native mode emulates this spec)."""
    if spec.scaling != "none" or spec.rounding != "nearest_even" or spec.traced:
        return None
    fmt = get_format(spec.format)
    if fmt.dtype is None:
        return None
    try:
        return jnp.dtype(fmt.dtype)
    except TypeError:  # pragma: no cover - a dtype ml_dtypes has but this jax does not
        return None


# -- skipping roundings that are provably no-ops -------------------------------------------------------------
#
# Emulation rounds after every op, and many of those roundings receive a value that is ALREADY in the
# target spec: a matmul output rounded to `matmul_out` (bf16) that the next matmul rounds again as its
# `attn_operands` (bf16), RMSNorm's output rounded to `norms` and again as a matmul operand, relu of a
# rounded value cast to `activations`... Each is a full pass over the tensor (and, through XLA's fusion,
# often recomputed in the backward pass too). Rounding is idempotent: for a deterministic rounding mode and
# no scaling, quantize(quantize(x, S), S) == quantize(x, S) bit for bit, NaN payloads included (the first
# rounding quiets NaN; a quiet NaN is kept as is) -- tests/test_quantize.py::test_idempotent proves it for
# every format and mode, tests/test_ops.py::test_skipped_roundings_change_no_bit the whole-model effect.
#
# So every value an emulated rounding produces is remembered (by object identity, for the duration of the
# trace) together with its spec, and rounding it again to an EQUAL spec returns it unchanged. A weak
# reference guards the identity: a dead value's entry is dropped, and a new object that reuses its id()
# never matches. Anything not found (a new tracer made by a transformation, a sum, a reshape) is rounded as
# before: the cache can only skip provable no-ops. Emulate mode only: native-mode casts are left to XLA.

_ROUNDED: dict[int, tuple[weakref.ref, Spec]] = {}


def _idempotent(spec: Spec) -> bool:
    return spec.scaling == "none" and spec.rounding != "stochastic" and not spec.is_identity


def _remember(y, spec: Spec):
    """Record that the values of `y` are exactly representable in `spec` (and round to themselves)."""
    if not _idempotent(spec):
        return y
    key = id(y)
    try:
        ref = weakref.ref(y, lambda _, key=key: _ROUNDED.pop(key, None))
    except TypeError:  # pragma: no cover - an object without weak references: just do not remember it
        return y
    _ROUNDED[key] = (ref, spec)
    return y


def _already(x, spec: Spec) -> bool:
    """True if `x` is a value this module rounded to an equal spec (so rounding it again changes no bit)."""
    entry = _ROUNDED.get(id(x))
    return entry is not None and entry[0]() is x and entry[1] == spec


def exact(y, like):
    """Declare that every value of `y` is a value of `like` or +0 (relu, max with 0, selecting between the
    two), so `y` is representable wherever `like` is. Used by the model for relu of a rounded matmul output;
    a no-op unless `like` is a remembered rounded value of a format with a zero."""
    entry = _ROUNDED.get(id(like))
    if entry is not None and entry[0]() is like and get_format(entry[1].format).specials != "e8m0":
        _remember(y, entry[1])
    return y


# -- random bits for stochastic rounding ---------------------------------------------------------------------
#
# Any component may round stochastically, and a rounding can sit anywhere in the model, the optimiser or the
# backward pass. Rather than thread a key argument through every op, the caller states once where the random
# bits come from: `with rounding_keys(key): ...` (model.apply, the trainer's gradient all-reduce and optimiser
# update do). Each stochastic rounding inside takes fold_in(key, n) with n counting the roundings in trace
# order, which is the same for every trace of one program: the bits are a deterministic function of the key
# (the trainer derives it from the seed and the step). `dot` draws one key per call and carries it into its
# custom VJP as an input, so the backward pass's roundings use keys derived from the forward's.

_KEY_SOURCES: list[list] = []  # stack of [key or None, count]


@contextlib.contextmanager
def rounding_keys(key):
    """Stochastic roundings inside this block draw their random bits from `key` (None: none allowed)."""
    _KEY_SOURCES.append([key, 0])
    try:
        yield
    finally:
        _KEY_SOURCES.pop()


def _next_key():
    source = _KEY_SOURCES[-1] if _KEY_SOURCES else [None, 0]
    if source[0] is None:
        raise ValueError("stochastic rounding needs random bits: run the computation under "
                         "ops.rounding_keys(key) (model.apply does, given a key)")
    source[1] += 1
    return jax.random.fold_in(source[0], source[1])


def _subkey(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


# -- traced formats ------------------------------------------------------------------------------------------
#
# A spec with `traced` rounds to the IEEE-style format whose widths the caller supplies at run time: `with
# traced_format(fields): ...` where fields is <int32>[2] (exponent bits, mantissa bits), a traced value (the
# trainer's per-member format, vmapped). The policy still decides WHICH components round so; the run decides
# the widths, so one compiled program trains every format of a sweep. `dot` passes the fields into its custom
# VJP as an input (a custom VJP must not close over traced values), as it does its random key.

_TRACED_FORMATS: list = []  # stack of <int32>[2] arrays, innermost last


@contextlib.contextmanager
def traced_format(fields):
    """Traced-format specs inside this block round to IEEE-style e{fields[0]}m{fields[1]}."""
    _TRACED_FORMATS.append(None if fields is None else jnp.asarray(fields, jnp.int32))
    try:
        yield
    finally:
        _TRACED_FORMATS.pop()


def _traced_fields():
    if not _TRACED_FORMATS or _TRACED_FORMATS[-1] is None:
        raise UserError("a traced-format spec needs its format's widths at run time: run the computation under "
                        "ops.traced_format(fields) (the trainer does, for a policy with traced specs)")
    return _TRACED_FORMATS[-1]


def _round(x, spec: Spec, mode: str, *, axis: int = -1, state=None, key=None, fields=None):
    """Round float32 `x` per spec. Returns (float32 y, new delayed state). `fields`: the traced format's
    widths (<int32>[2]) for a traced spec; default: those of the innermost `traced_format` block."""
    if spec.is_identity:
        return x, state
    if mode == "emulate" and _already(x, spec):
        return x, state  # idempotent: see "skipping roundings" above
    if spec.traced:
        fields = _traced_fields() if fields is None else fields
        y = quantize_ieee_traced(x, fields[0], fields[1], overflow=spec.overflow)
        if mode == "emulate":
            _remember(y, spec)
        return y, state
    dtype = _native_dtype(spec) if mode == "native" else None
    if dtype is not None:
        if spec.overflow == "saturate":
            fmax = get_format(spec.format).max
            x = jnp.clip(x, -fmax, fmax)
        return x.astype(dtype).astype(_F32), state
    if spec.scaling == "delayed" and state is None:
        # No amax history here (an elementwise cast, or a matmul site built without ops.init_dot_state): the
        # policy refuses delayed scaling on such components, so this is a caller's bug, never "current".
        raise UserError(f"delayed scaling ({spec}) at a site without an amax history; create the site's "
                        "state with ops.init_dot_state, or use current scaling")
    if spec.rounding == "stochastic" and key is None:
        key = _next_key()
    y, state = scaled_quantize(x, spec, axis=axis, state=state, key=key)
    if mode == "emulate":
        _remember(y, spec)
    return y, state


def cast(x, policy: PrecisionPolicy, component: str, *, key=None):
    """<float32>[...] -> the same values rounded to `component`'s spec (float32 storage)."""
    return _round(jnp.asarray(x, _F32), policy[component], policy.mode, key=key)[0]


# -- the accumulator model --------------------------------------------------------------------------------
#
# Summation order modelled (the "stated order"), for every output element of a product contracting K:
#   1. K is cut into consecutive blocks of `block` elements (default 32), zero-padded at the end.
#   2. Within a block the products a_k * b_k are summed by a float32 matmul (XLA's order inside the block,
#      one float32 rounding per add at most). Products of bf16/fp8 operands are exact in float32, and the
#      block sum carries 24 significant bits, far more than the narrow accumulator keeps: this stands for
#      the tensor core's fused multi-term adder, which adds one MMA step's products at once.
#   3. The narrow running sum s (start 0) takes each block sum in K order: s = round_acc(s + block_sum),
#      the add in float32, then rounded to the accumulator format (`quantize`, default toward zero: tensor
#      cores truncate the bits they shift out when they align and normalise -- Fasi et al. 2021 measured
#      truncation on V100/T4/A100; the e8m13 accumulator of Hopper's FP8 MMA is reported truncating too).
#   4. promote_every = N_C: after every N_C elements of K (a whole number of blocks) s is added into a
#      float32 accumulator f (f = f + s, float32 round-to-nearest, in K order) and reset to 0 -- DeepSeek-V3
#      section 3.3's promotion of the tensor core's partial sums to CUDA-core float32 registers. The result
#      is f + s (s after the last, possibly partial, group). promote_every None: the result is s.
# Why blocks and not one rounding per element: a tensor core does not add products to its accumulator one
# at a time; each MMA instruction adds a k-long dot product (k = 32 for FP8 wgmma, 16 for bf16) to the
# accumulator in one fused, aligned addition, so the accumulator is rounded once per instruction, i.e.
# once per `block` products. With block=1 the model is the textbook recursive summation.
# The difference from a fused adder (which rounds acc + exact block sum once) is the float32 rounding of
# the block sum and of the add before the accumulator rounding: at most 2^-24 relative, against the
# accumulator's 2^-(m+1) or 2^-m.
# Speed: the heavy work (M*N*K multiply-adds) is one float32 matmul producing every block sum at once
# ([K/block, M, N]); only the K/block accumulator steps run as a `lax.scan` (M*N work each), and with
# promotion the N_C/block steps of every promotion group run side by side (a scan of N_C/block steps over
# [K/N_C, M, N]) before the K/N_C float32 adds.


def _as_accumulator(accumulator, promote_every, block, rounding) -> Accumulator:
    if isinstance(accumulator, Accumulator):
        return accumulator
    if "/" in str(accumulator):
        return parse_accumulator(accumulator)
    kw = {} if block is None else {"block": block}
    if rounding is not None:
        kw["rounding"] = rounding
    return Accumulator(format=str(accumulator), promote_every=promote_every, **kw)


def accumulate_blocks(partial, acc: Accumulator, *, prefixes: bool = False):
    """Sum <float32>[NB, ...] block sums along axis 0 in the accumulator's order (steps 3-4 above).

    Returns the [...] result; prefixes=True returns <float32>[NB, ...] instead: the result the product
    would have had with K cut after each block (f + s at every block boundary), which is what a dot
    product of that shorter length gives (the roundoff analysis reads every K from one long product)."""
    partial = jnp.asarray(partial, _F32)
    fmt = get_format(acc.format)
    q = (lambda v: v) if fmt.mantissa_bits >= 23 and fmt.exponent_bits >= 8 else (
        lambda v: quantize(v, fmt, rounding=acc.rounding))
    per_group = None if acc.promote_every is None else acc.promote_every // acc.block
    nb = partial.shape[0]
    if per_group is None or per_group >= nb:
        def step(s, p):
            s = q(s + p)
            return s, (s if prefixes else None)

        s, hist = jax.lax.scan(step, jnp.zeros(partial.shape[1:], _F32), partial)
        return hist if prefixes else s
    groups = -(-nb // per_group)
    pad = groups * per_group - nb
    if pad:
        partial = jnp.concatenate([partial, jnp.zeros((pad, *partial.shape[1:]), _F32)])
    # [groups, per_group, ...] -> scan over the per_group axis, every group side by side.
    grouped = jnp.swapaxes(partial.reshape(groups, per_group, *partial.shape[1:]), 0, 1)

    def narrow(s, p):
        s = q(s + p)
        return s, (s if prefixes else None)

    s, hist = jax.lax.scan(narrow, jnp.zeros(grouped.shape[1:], _F32), grouped)

    def promote(f, g):
        f = f + g
        return f, f

    # f before each group is the float32 sum of the groups before it (in K order).
    f_last, f_after = jax.lax.scan(promote, jnp.zeros(s.shape[1:], _F32), s)
    if not prefixes:
        return f_last
    f_before = jnp.concatenate([jnp.zeros((1, *f_after.shape[1:]), _F32), f_after[:-1]])
    out = jnp.swapaxes(hist, 0, 1) + f_before[:, None]  # [groups, per_group, ...]: f + s at each block end
    return out.reshape(groups * per_group, *out.shape[2:])[:nb]


def _block_sums(eq: str, a, b, block: int):
    """Float32 sums of `block` consecutive products along the contracted axes of einsum(eq, a, b):
    <float32>[NB, *out]. The contracted axes (all indices in both operands but not the output) are merged
    into one K axis (in the order they appear in the lhs), zero-padded to a multiple of `block` (K <= block:
    one block of K, no padding; zero products change no float32 sum, so the result is the same)."""
    ins, out = eq.replace(" ", "").split("->")
    xa, xb = ins.split(",")
    con = [c for c in xa if c in xb and c not in out]
    if any(c not in xb and c not in out for c in xa) or any(c not in xa and c not in out for c in xb):
        raise ValueError(f"accumulated einsum {eq!r}: an index summed over one operand alone is not supported")
    keep_a, keep_b = [c for c in xa if c not in con], [c for c in xb if c not in con]
    a = jnp.transpose(a, [xa.index(c) for c in keep_a + con])
    b = jnp.transpose(b, [xb.index(c) for c in keep_b + con])
    k = int(np.prod([a.shape[len(keep_a) + i] for i in range(len(con))], dtype=np.int64))
    a = a.reshape(*a.shape[:len(keep_a)], k)
    b = b.reshape(*b.shape[:len(keep_b)], k)
    block = min(block, k)
    padded = -(-k // block) * block
    if padded != k:
        a = jnp.pad(a, [(0, 0)] * len(keep_a) + [(0, padded - k)])
        b = jnp.pad(b, [(0, 0)] * len(keep_b) + [(0, padded - k)])
    nb = padded // block
    a = a.reshape(*a.shape[:-1], nb, block)
    b = b.reshape(*b.shape[:-1], nb, block)
    free = [chr(c) for c in range(ord("A"), ord("Z") + 1) if chr(c) not in eq][:2]
    jj, kk = free
    sub = f"{''.join(keep_a)}{jj}{kk},{''.join(keep_b)}{jj}{kk}->{jj}{out}"
    return jnp.einsum(sub, a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)


def accumulated_einsum(eq: str, a, b, acc: Accumulator):
    """einsum(eq, a, b) for float32 operands with the contracted axes summed in the accumulator's order
    (see "the accumulator model" above; several contracted axes are merged into one K, lhs order)."""
    partial = _block_sums(eq, jnp.asarray(a, _F32), jnp.asarray(b, _F32), acc.block)
    return accumulate_blocks(partial, acc)


def matmul_accumulated(a, b, accumulator: str | Accumulator = "e8m13", promote_every: int | None = 128, *,
                       block: int | None = None, rounding: str | None = None):
    """<float32>[M, K] @ <float32>[K, N] -> <float32>[M, N] with a narrow matmul accumulator.

    The K sum runs in this order (the reasons are in the block comment "the accumulator model" of
    precision_lab/ops.py): K in blocks of `block` (default 32) products, each block summed in float32; a
    running sum s takes the block sums in K order and is rounded to `accumulator` (default `e8m13`, 14
    significant bits, rounding toward zero) after each; with `promote_every` (default 128, DeepSeek-V3's
    N_C; None: never) s is added into a float32 accumulator every `promote_every` elements of K and reset.

    accumulator: a format name (`e8m13`, `fp16`, `fp32` = plain float32 summation in the same order), or the
    policy's form `e8m13/128/k32/toward_zero` (then promote_every, block and rounding come from it), or an
    `Accumulator`. Bad values raise UserError naming the field and the valid choices.
    """
    acc = _as_accumulator(accumulator, promote_every, block, rounding)
    a, b = jnp.asarray(a, _F32), jnp.asarray(b, _F32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul_accumulated needs [M, K] @ [K, N], got {a.shape} @ {b.shape}")
    return _matmul_accumulated_jit(a, b, acc)


@functools.partial(jax.jit, static_argnums=2)
def _matmul_accumulated_jit(a, b, acc: Accumulator):
    return accumulated_einsum("mk,kn->mn", a, b, acc)


# -- precision telemetry: what the roundings of the matmul operands and gradients lose ------------------------
#
# Counted per rounding (`rounding_counts`), as four numbers: underflow (a finite nonzero input that rounds to
# 0), nonzero (finite nonzero inputs: the underflow fraction's denominator), overflow (a finite input the
# format cannot hold: it rounds past the format's max with an unbounded exponent, i.e. |x| * scale >=
# max + ulp(max)/2, so a saturating cast clips it and an IEEE cast makes it inf or NaN; or the rounding
# turned it non-finite), finite (finite inputs: the overflow fraction's denominator). With scaling, the
# range is the scaled one (`scaling.format_view`).
#
# Where the counts travel, without changing a result: the trainer opens `count_roundings(probe)` around the
# model's forward pass, with `probe` = `new_probe()` (zeros [sites, 4]) an argument of the function it
# differentiates. Every `dot` then takes the probe as one more input that its forward pass never reads.
# The forward counts (operands) are computed next to the rounding and kept as residuals; the backward pass
# counts the rounding of the incoming gradient to "grads" and returns both as the probe's COTANGENT, at the
# rows of the site's group ("experts_fwd", "experts_bwd", ...). Autodiff sums cotangents over every use of
# the probe, so `jax.grad` with respect to the probe is the sum of the counts over all matmul sites of a
# group: the same side channel as the delayed-scaling state (above: an input whose cotangent is the news).
# No probe (the default, and every evaluation) means no counting and no extra work. A dot whose output
# does not reach the loss (none in the model) is not counted: its backward pass never runs.

COUNT_KINDS: tuple[str, ...] = ("underflow", "nonzero", "overflow", "finite")
# A matmul site's group is named after its lhs component (the router's lhs is router_input, the expert
# dispatch's is activations, the combine's is comm).
SITE_GROUPS: dict[str, str] = {
    "attn_operands": "attention", "ffn_operands": "ffn", "expert_operands": "experts", "head_operands": "head",
    "router_input": "router", "activations": "dispatch", "comm": "combine",
}
TELEMETRY_SITES: tuple[str, ...] = tuple(f"{g}_{d}" for g in dict.fromkeys(SITE_GROUPS.values())
                                         for d in ("fwd", "bwd"))
_PROBES: list = []  # the probe of the innermost open count_roundings (a trace-time stack, like _ROUNDED)


def new_probe():
    """<float32>[len(TELEMETRY_SITES), len(COUNT_KINDS)] zeros: pass to `count_roundings` and differentiate."""
    return jnp.zeros((len(TELEMETRY_SITES), len(COUNT_KINDS)), _F32)


@contextlib.contextmanager
def count_roundings(probe):
    """While open, every `dot` counts its roundings into `probe`'s cotangent (see above); probe None: off."""
    _PROBES.append(probe)
    try:
        yield
    finally:
        _PROBES.pop()


def rounding_counts(x, y, spec: Spec, *, axis: int = -1, state=None):
    """<float32>[4] (underflow, nonzero, overflow, finite) of rounding float32 `x` to `y` per `spec` (the
    state: the delayed-scaling history the rounding used)."""
    finite = jnp.isfinite(x)
    nonzero = finite & (x != 0)
    count = lambda m: jnp.sum(m, dtype=_F32)  # noqa: E731
    if spec.is_identity:  # nothing can underflow or overflow
        return jnp.stack([jnp.float32(0.0), count(nonzero), jnp.float32(0.0), count(finite)])
    fmt = get_format(spec.format)
    beyond = float(fmt.max + 0.5 * fmt.ulp(fmt.max))  # fp32-wide formats: inf (no finite float32 reaches it)
    beyond = np.float32(beyond if beyond <= float(np.finfo(np.float32).max) else np.inf)
    view = jnp.abs(format_view(x, spec, axis=axis, state=state))
    overflow = finite & (~jnp.isfinite(y) | (view >= beyond))
    return jnp.stack([count(nonzero & (y == 0)), count(nonzero), count(overflow), count(finite)])


def fractions(counts, prefix: str = "") -> dict:
    """{underflow_frac/NAME: underflow / nonzero, overflow_frac/NAME: overflow / finite} from counts
    [..., 4] (0 where nothing was counted). NAME is `prefix`, or each TELEMETRY_SITES name for [sites, 4]."""
    def frac(num, den):
        return jnp.where(den > 0, num / jnp.maximum(den, jnp.float32(1.0)), jnp.float32(0.0))
    if counts.ndim == 1:
        return {f"underflow_frac/{prefix}": frac(counts[0], counts[1]),
                f"overflow_frac/{prefix}": frac(counts[2], counts[3])}
    out = {}
    for i, site in enumerate(TELEMETRY_SITES):
        out.update(fractions(counts[i], site))
    return out


# -- matmul ---------------------------------------------------------------------------------------------


class DotState(NamedTuple):
    """Delayed-scaling histories of one matmul site: lhs operand, rhs operand, incoming gradient."""

    lhs: DelayedState | None
    rhs: DelayedState | None
    grad: DelayedState | None


def init_dot_state(policy: PrecisionPolicy, *, lhs: str, rhs: str | None, history: int | None = None,
                   grads: str = "grads") -> DotState | None:
    """The state one `dot` (or `grouped_dot`, `gather_rows` with rhs=None) site needs: None unless a spec
    it uses has delayed scaling. `grads` is the component of the site's incoming gradient (as in `dot`)."""
    specs = (policy[lhs], None if rhs is None else policy[rhs], policy[grads])
    if not any(s is not None and s.scaling == "delayed" for s in specs):
        return None
    make = (lambda: init_delayed_state(history)) if history else init_delayed_state
    return DotState(*(make() if s is not None and s.scaling == "delayed" else None for s in specs))


def _contracting_axes(eq: str) -> tuple[int, int]:
    """Index of the (first) contracted axis of each operand of a two-operand einsum (for MX/tile blocks)."""
    ins, out = eq.replace(" ", "").split("->")
    a, b = ins.split(",")
    shared = [c for c in a if c in b and c not in out]
    if not shared:
        return a.__len__() - 1, b.__len__() - 1
    return a.index(shared[0]), b.index(shared[0])


def _backward_axes(eq: str):
    """The reduction axes of the two backward products of einsum(eq, a, b) = y (OCP MX and 1x128 tiles put
    their blocks along the reduction axis of EACH product, so the backward re-blocks its operands):
      dgrad  da = g . b^T contracts the output features (in y and b, not a): their axes in y and in b;
      wgrad  db = a^T . g contracts the tokens (in y and a, not b): their axes in y and in a.
    Returns (dgrad axes of y, dgrad axes of b, wgrad axes of y, wgrad axes of a)."""
    ins, out = eq.replace(" ", "").split("->")
    a, b = ins.split(",")
    feats = [c for c in out if c in b and c not in a]
    toks = [c for c in out if c in a and c not in b]
    return (tuple(out.index(c) for c in feats), tuple(b.index(c) for c in feats),
            tuple(out.index(c) for c in toks), tuple(a.index(c) for c in toks))


_BLOCKED_SCALINGS = ("mx", "tile1x128")  # scalings whose blocks run along one axis of the operand


def _blocked(spec: Spec | None) -> bool:
    return spec is not None and spec.scaling in _BLOCKED_SCALINGS


def _round_along(x, spec: Spec, mode: str, axes: tuple[int, ...], *, key=None):
    """Round `x` with its blocks along `axes` taken together as one axis (several token axes, say [B, L],
    are one reduction of B*L terms). Only blocked (MX, tile) specs come here, never traced ones."""
    if len(axes) <= 1:
        return _round(x, spec, mode, axis=axes[0] if axes else -1, key=key)[0]
    rest = [i for i in range(x.ndim) if i not in axes]
    moved = jnp.transpose(x, rest + list(axes))
    flat = moved.reshape(*moved.shape[:len(rest)], -1)
    y = _round(flat, spec, mode, axis=-1, key=key)[0].reshape(moved.shape)
    return jnp.transpose(y, np.argsort(rest + list(axes)))


class _DotConfig(NamedTuple):
    eq: str
    lhs: Spec
    rhs: Spec | None
    out: Spec
    grad: Spec
    grad_out: Spec
    mode: str
    kind: str = "einsum"  # "einsum" | "grouped" (b[index] per block) | "rows" (a[index], no b)
    site: int = 0  # the site's group's "_fwd" row of the telemetry probe (TELEMETRY_SITES); "_bwd" is + 1
    acc: Accumulator | None = None  # narrow accumulator of this product and its backward products
    rhs_grad_out: Spec | None = None  # None: the rhs gradient stays float32 (a weight: the trainer rounds it)

    @property
    def stochastic(self) -> bool:
        return any(s is not None and s.rounding == "stochastic"
                   for s in (self.lhs, self.rhs, self.out, self.grad, self.grad_out, self.rhs_grad_out))

    @property
    def traced(self) -> bool:
        return any(s is not None and s.traced
                   for s in (self.lhs, self.rhs, self.out, self.grad, self.grad_out, self.rhs_grad_out))

    @property
    def reblocks(self) -> bool:
        """Whether the backward re-quantizes operands along its own reduction axes (MX / 1x128 tiles)."""
        return self.kind != "rows" and (_blocked(self.lhs) or _blocked(self.rhs) or _blocked(self.grad))


def _einsum(cfg: _DotConfig, a, b):
    if cfg.acc is not None:
        return accumulated_einsum(cfg.eq, a, b, cfg.acc)
    if cfg.mode == "native":
        da, db = _native_dtype(cfg.lhs), _native_dtype(cfg.rhs)
        if da is not None and da == db:
            return jnp.einsum(cfg.eq, a.astype(da), b.astype(db), preferred_element_type=_F32)
    return jnp.einsum(cfg.eq, a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)


def _contract(cfg: _DotConfig, a, b, index):
    """The product itself, on already rounded operands (its VJP is the backward pass's, too)."""
    if cfg.kind == "rows":  # a one-hot matmul done as what it is: row i of the result is a[index[i]] or 0
        return jnp.take(a, index, axis=0, mode="fill", fill_value=0)
    if cfg.kind == "grouped":  # block i multiplies expert index[i]'s matrix: a grouped (ragged) GEMM
        b = jnp.take(b, index, axis=0, mode="clip")
    return _einsum(cfg, a, b)


def _dot_fwd_impl(cfg: _DotConfig, a, b, state, index, key, fields):
    ka, kb = _contracting_axes(cfg.eq)
    st = state if state is not None else DotState(None, None, None)
    qa, sa = _round(a, cfg.lhs, cfg.mode, axis=ka, state=st.lhs, key=_subkey(key, 0), fields=fields)
    # The rhs is rounded BEFORE any gather (grouped): each expert's matrix once, with the scale of the
    # whole [E, ...] tensor, exactly as the dense einsum over all experts rounds it.
    qb, sb = (None, None) if cfg.rhs is None else _round(b, cfg.rhs, cfg.mode, axis=kb, state=st.rhs,
                                                         key=_subkey(key, 1), fields=fields)
    y, _ = _round(_contract(cfg, qa, qb, index), cfg.out, cfg.mode, key=_subkey(key, 2), fields=fields)
    return y, (qa, qb, sa, sb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dot(cfg: _DotConfig, a, b, state, index, key, probe, fields):
    return _dot_fwd_impl(cfg, a, b, state, index, key, fields)[0]


def _dot_fwd(cfg, a, b, state, index, key, probe, fields):
    y, (qa, qb, sa, sb) = _dot_fwd_impl(cfg, a, b, state, index, key, fields)
    counts = None
    if probe is not None:  # precision telemetry (see above): the operands' roundings
        ka, kb = _contracting_axes(cfg.eq)
        st = state if state is not None else DotState(None, None, None)
        counts = rounding_counts(a, qa, cfg.lhs, axis=ka, state=st.lhs)
        if cfg.rhs is not None:
            counts = counts + rounding_counts(b, qb, cfg.rhs, axis=kb, state=st.rhs)
    raw = (a, b) if cfg.reblocks else (None, None)  # the float32 operands, re-blocked by the backward
    return y, (qa, qb, sa, sb, state, index, key, raw, counts, fields)


def _dot_bwd(cfg, res, g):
    qa, qb, sa, sb, state, index, key, (a, b), counts, fields = res
    st = state if state is not None else DotState(None, None, None)
    qg, sg = _round(g, cfg.grad, cfg.mode, state=st.grad, key=_subkey(key, 3), fields=fields)
    dprobe = None
    if counts is not None:  # the probe's cotangent: this site's forward and gradient rounding counts
        grad_counts = rounding_counts(g, qg, cfg.grad, state=st.grad)
        dprobe = new_probe().at[cfg.site].set(counts).at[cfg.site + 1].set(grad_counts)
    if cfg.acc is not None and cfg.rhs is not None:
        da, db = _accumulated_grads(cfg, qa, qb, qg, index)
    elif cfg.rhs is None:
        _, vjp = jax.vjp(lambda a_: _contract(cfg, a_, None, index), qa)
        (da,), db = vjp(qg), None
    elif not cfg.reblocks:
        _, vjp = jax.vjp(lambda a_, b_: _contract(cfg, a_, b_, index), qa, qb)
        da, db = vjp(qg)
    else:
        # OCP MX / 1x128 tiles: each backward product blocks its operands along ITS reduction axis, from the
        # float32 values (as MX training re-quantizes the transposed operands), not the forward's blocks.
        g_out, b_axes, t_out, a_axes = _backward_axes(cfg.eq)
        g_d = _round_along(g, cfg.grad, cfg.mode, g_out, key=_subkey(key, 3)) if _blocked(cfg.grad) else qg
        g_w = _round_along(g, cfg.grad, cfg.mode, t_out, key=_subkey(key, 6)) if _blocked(cfg.grad) else qg
        b_d = _round_along(b, cfg.rhs, cfg.mode, b_axes, key=_subkey(key, 7)) if _blocked(cfg.rhs) else qb
        a_w = _round_along(a, cfg.lhs, cfg.mode, a_axes, key=_subkey(key, 8)) if _blocked(cfg.lhs) else qa
        (da,) = jax.vjp(lambda a_: _contract(cfg, a_, b_d, index), qa)[1](g_d)
        (db,) = jax.vjp(lambda b_: _contract(cfg, a_w, b_, index), qb)[1](g_w)
    da, _ = _round(da.astype(_F32), cfg.grad_out, cfg.mode, key=_subkey(key, 4), fields=fields)
    if db is not None:
        db = db.astype(_F32)
        if cfg.rhs_grad_out is not None:
            db, _ = _round(db, cfg.rhs_grad_out, cfg.mode, key=_subkey(key, 5), fields=fields)
    new_state = None if state is None else DotState(sa, sb, sg)
    return da, db, new_state, _zero_cotangent(index), _zero_cotangent(key), dprobe, _zero_cotangent(fields)


def _accumulated_grads(cfg: _DotConfig, qa, qb, qg, index):
    """dgrad and wgrad of an accumulated product, each itself a product summed in the accumulator's order
    (over the forward's output-only axes for dgrad, over the shared batch/token axes for wgrad)."""
    ins, out = cfg.eq.replace(" ", "").split("->")
    xa, xb = ins.split(",")
    if cfg.kind == "grouped":  # per block: b = w[index]; the blocks of one expert then add in float32
        wb, take_vjp = jax.vjp(lambda w: jnp.take(w, index, axis=0, mode="clip"), qb)
        da = accumulated_einsum(f"{out},{xb}->{xa}", qg, wb, cfg.acc)
        (db,) = take_vjp(accumulated_einsum(f"{xa},{out}->{xb}", qa, qg, cfg.acc))
        return da, db
    return (accumulated_einsum(f"{out},{xb}->{xa}", qg, qb, cfg.acc),
            accumulated_einsum(f"{xa},{out}->{xb}", qa, qg, cfg.acc))


def _zero_cotangent(index):
    """The cotangent of an integer (or PRNG key) input (float0 zeros), or None when there is none."""
    return None if index is None else np.zeros(np.shape(index), dtype=jax.dtypes.float0)


_dot.defvjp(_dot_fwd, _dot_bwd)


def _without_accumulator(spec: Spec) -> Spec:
    return spec if spec.accumulator is None else dataclasses.replace(spec, accumulator=None)


def _run_dot(kind: str, eq: str, a, b, index, policy: PrecisionPolicy, lhs: str, rhs: str | None, out: str,
             state: DotState | None, grads: str = "grads", grad_out: str = "matmul_out", rhs_grad: str | None = None):
    a = jnp.asarray(a, _F32)
    b = None if b is None else jnp.asarray(b, _F32)
    lhs_spec, rhs_spec = policy[lhs], None if rhs is None else policy[rhs]
    # The accumulator is the product's (the lhs operand's, else the rhs's); the operands round without it.
    acc = lhs_spec.accumulator or (None if rhs_spec is None else rhs_spec.accumulator)
    lhs_spec = _without_accumulator(lhs_spec)
    rhs_spec = None if rhs_spec is None else _without_accumulator(rhs_spec)
    if policy.mode == "emulate":
        # An operand already rounded to its spec (e.g. the previous matmul's output) is not rounded again
        # (see "skipping roundings"). Decided here, outside the custom_vjp, where the operands are the
        # caller's own values; the fp32 spec makes the rounding inside the identity.
        lhs_spec = _FP32_SPEC if _already(a, lhs_spec) else lhs_spec
        if b is not None:
            rhs_spec = _FP32_SPEC if _already(b, rhs_spec) else rhs_spec
    site = TELEMETRY_SITES.index(SITE_GROUPS.get(lhs, "dispatch") + "_fwd")
    cfg = _DotConfig(eq, lhs_spec, rhs_spec, policy[out], policy[grads], policy[grad_out], policy.mode, kind,
                     site=site, acc=acc, rhs_grad_out=None if rhs_grad is None else policy[rhs_grad])
    key = _next_key() if cfg.stochastic else None  # one per call; the VJP derives its own from it
    probe = _PROBES[-1] if _PROBES else None
    fields = _traced_fields() if cfg.traced else None  # an input of the custom VJP, never a closure
    y = _dot(cfg, a, b, state, None if index is None else jnp.asarray(index, jnp.int32), key, probe, fields)
    if policy.mode == "emulate":
        _remember(y, policy[out])
    return y


def dot(eq: str, a, b, policy: PrecisionPolicy, *, lhs: str, rhs: str, out: str = "matmul_out",
        state: DotState | None = None, grads: str = "grads", grad_out: str = "matmul_out",
        rhs_grad: str | None = None):
    """einsum(eq, a, b) with operands rounded per `lhs`/`rhs` (scaling included), float32 accumulation (or
    the lhs/rhs spec's accumulator, `acc=`: see `matmul_accumulated`) and the output rounded per `out`.

    Backward: the incoming gradient is rounded per `grads`, the lhs (input) gradient per `grad_out`, the rhs
    gradient per `rhs_grad`, or kept float32 when None (a weight: the trainer rounds weight gradients for
    the all-reduce and the update; an activation x activation product such as QK^T or PV passes
    rhs_grad="matmul_out"). The router passes its own `router_grads` component for its backward."""
    return _run_dot("einsum", eq, a, b, None, policy, lhs, rhs, out, state, grads, grad_out, rhs_grad)


def grouped_dot(x, w, group, policy: PrecisionPolicy, *, lhs: str, rhs: str, out: str = "matmul_out",
                state: DotState | None = None):
    """Grouped GEMM: <float32>[NB, M, K] blocks x <float32>[E, K, N] matrices -> [NB, M, N], block i
    multiplied by w[group[i]] (<int32>[NB]). The rounding is `dot`'s for einsum("ebmk,ekn->ebmn") over
    the experts' blocks: w is rounded as one [E, K, N] tensor before the gather, x per row (MX and 1x128
    blocks run along K; a per-tensor scale sees the same amax as the dense einsum, padding being zeros).
    The weight gradient sums the blocks of each expert in float32."""
    return _run_dot("grouped", "bmk,bkn->bmn", x, w, group, policy, lhs, rhs, out, state)


def gather_rows(x, rows, policy: PrecisionPolicy, *, lhs: str, out: str, state: DotState | None = None):
    """<float32>[T, D] -> [R, D]: row i is x[rows[i]], or 0 where rows[i] is out of range (>= T).

    This is the matmul onehot(rows) @ x done as the gather it is (the expert dispatch, an all-to-all),
    rounded as `dot` would round it: x per `lhs` on entry, the result per `out`; the backward pass rounds
    the incoming gradient per "grads", scatter-adds it onto x's rows in float32 (a row gathered k times
    sums k terms) and rounds that per "matmul_out"."""
    return _run_dot("rows", "td,td->td", x, None, rows, policy, lhs, None, out, state)


# -- elementwise and reductions ----------------------------------------------------------------------------


def _rounder(policy: PrecisionPolicy, component: str):
    spec, mode = policy[component], policy.mode
    return lambda v: _round(v, spec, mode)[0]


def exp(x, policy: PrecisionPolicy, component: str):
    """exp with the input and the output rounded to the component's format."""
    q = _rounder(policy, component)
    return q(jnp.exp(q(jnp.asarray(x, _F32))))


def gelu(x, policy: PrecisionPolicy, component: str):
    """gelu with the tanh approximation (T5.1.1's gated-gelu) as ONE fused op: the input rounded on entry,
    evaluated in float32, the result rounded once.

    The exception to "round after every elementary op", and why: gelu's ~8 elementwise ops (cube, multiply,
    add, tanh, ...) are one fused kernel on every backend the lab models (XLA fuses them into one loop; the
    GEGLU/GELU kernels of cuDNN and Transformer Engine evaluate them in float32 registers and store the
    output once), so no intermediate of gelu is ever stored in a narrow format. Softmax and RMSNorm are
    rounded per op because their intermediates (the exponentials, the sum, the mean square) are reductions
    or stored tensors on those backends, and the exponential's rounding is the very roundoff ST-MoE studies."""
    q = _rounder(policy, component)
    return q(jax.nn.gelu(q(jnp.asarray(x, _F32)), approximate=True))


def sum(x, policy: PrecisionPolicy, component: str, axis=None, keepdims: bool = False):  # noqa: A001
    """float32 accumulation, one rounding of the result."""
    q = _rounder(policy, component)
    return q(jnp.sum(q(jnp.asarray(x, _F32)), axis=axis, keepdims=keepdims))


def mean(x, policy: PrecisionPolicy, component: str, axis=None, keepdims: bool = False):
    q = _rounder(policy, component)
    x = q(jnp.asarray(x, _F32))
    n = x.size if axis is None else _count(x.shape, axis)
    return q(q(jnp.sum(x, axis=axis, keepdims=keepdims)) / jnp.float32(n))


def _count(shape, axis) -> int:
    axes = (axis,) if isinstance(axis, int) else axis
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def softmax(x, policy: PrecisionPolicy, component: str, axis: int = -1, shift: bool = True, where=None):
    """softmax rounded after every elementary op. shift=False exponentiates the raw logits (the form ST-MoE
    worries about: exp of large logits, whose relative roundoff grows with |logit|).

    where: <bool> broadcastable to x, False for masked entries (probability exactly 0). Masking happens
    AFTER the input is rounded and is independent of the format: a large negative fill value (T5's -1e10)
    is not a value every format holds (fn/fnuz formats overflow it to NaN, fp6/fp4 saturate it to -max,
    which no longer masks). Masked entries enter exp as 0 (finite in every format, and finite gradients)
    and their exponential is replaced by 0. A row with every entry masked gives all zeros."""
    q = _rounder(policy, component)
    x = q(jnp.asarray(x, _F32))
    if where is not None:
        where = jnp.broadcast_to(where, x.shape)
        x = jnp.where(where, x, jnp.float32(0.0))
    if shift:
        big = x if where is None else jnp.where(where, x, -jnp.inf)
        m = jax.lax.stop_gradient(jnp.max(big, axis=axis, keepdims=True))
        m = m if where is None else jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))
        x = q(x - m)
        if where is not None:
            x = jnp.where(where, x, jnp.float32(0.0))
    e = q(jnp.exp(x))
    if where is not None:
        e = jnp.where(where, e, jnp.float32(0.0))
    s = q(jnp.sum(e, axis=axis, keepdims=True))
    if where is not None:
        s = jnp.where(s > 0, s, jnp.float32(1.0))  # every entry masked: 0 / 1, not 0 / 0
    return q(e / s)


def logsumexp(x, policy: PrecisionPolicy, component: str, axis: int = -1, keepdims: bool = False):
    """max-shifted logsumexp, rounded after every elementary op."""
    q = _rounder(policy, component)
    x = q(jnp.asarray(x, _F32))
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, jnp.float32(0.0))
    e = q(jnp.exp(q(x - m)))
    s = q(jnp.sum(e, axis=axis, keepdims=True))
    out = q(q(jnp.log(s)) + m)
    return out if keepdims else jnp.squeeze(out, axis=axis)


def rms_norm(x, scale, policy: PrecisionPolicy, component: str = "norms", eps: float = 1e-6):
    """x * rsqrt(mean(x^2) + eps) (* scale), rounded after every elementary op; scale may be None
    (ST-MoE's "remove RMSNorm scale" ablation)."""
    q = _rounder(policy, component)
    x = q(jnp.asarray(x, _F32))
    ms = q(q(jnp.sum(q(x * x), axis=-1, keepdims=True)) / jnp.float32(x.shape[-1]))
    r = q(jax.lax.rsqrt(q(ms + jnp.float32(eps))))
    y = q(x * r)
    if scale is not None:
        scale = q(jnp.asarray(scale, _F32))
        y = q(y * scale.reshape((1,) * (y.ndim - scale.ndim) + scale.shape))  # explicit broadcast
    return y


# -- the data-parallel all-reduce ------------------------------------------------------------------------------


def ring_allreduce(stacked, policy: PrecisionPolicy, component: str = "grad_allreduce", *, key=None,
                   with_counts: bool = False):
    """Sum a pytree of per-replica arrays <float32>[R, ...] over R replicas as a ring all-reduce does, every
    value on the wire and every partial sum rounded to `component`'s spec. Returns the summed tree (and,
    with_counts, the <float32>[4] `rounding_counts` of all those roundings together).

    The order, stated: ring all-reduce (NCCL's algorithm for large messages) = reduce-scatter + all-gather.
    All leaves are concatenated into one flat buffer per replica (as DDP's gradient buckets and XLA's
    all-reduce combiner do: one collective, not one per parameter), which is cut into R chunks (zero padded);
    chunk c starts at replica (c + 1) mod R and travels the ring c+1, c+2, ..., c (mod R): each replica
    rounds its own gradient to the format, adds the incoming partial sum and rounds the result
    (s = round(s + round(g_r)): R - 1 rounded partial sums per element, in an order that differs per chunk,
    as on real hardware). The all-gather then copies the finished chunks, which rounds nothing. A sequential
    chain, not a tree: error grows like (R - 1) units of roundoff in the worst case, against log2(R) for a
    tree, which is why a bf16 all-reduce over many replicas is a precision risk. R = 1 is one rounding of
    the local gradient. Stochastic rounding needs `key` (one fresh key per rounding).
    One buffer also means one scan of R - 1 hops per step, not one per leaf: with a leaf at a time the tiny
    model's step held 55 while loops (benchmarks/RESULTS.md)."""
    spec = policy[component]
    leaves, treedef = jax.tree.flatten(stacked)
    r = leaves[0].shape[0]
    flat = jnp.concatenate([jnp.asarray(leaf, _F32).reshape(r, -1) for leaf in leaves], axis=1)
    summed, counts = _ring_sum(flat, spec, policy.mode, key if spec.rounding == "stochastic" else None,
                               with_counts)
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    parts = jnp.split(summed, np.cumsum(sizes)[:-1])
    tree = jax.tree.unflatten(treedef, [p.reshape(leaf.shape[1:]) for p, leaf in zip(parts, leaves)])
    return (tree, counts) if with_counts else tree


def _ring_sum(x, spec: Spec, mode: str, key, with_counts: bool):
    """One leaf <float32>[R, ...] -> (ring sum [...], counts [4]); see `ring_allreduce`."""
    r, shape = x.shape[0], x.shape[1:]
    flat = x.reshape(r, -1)
    n = flat.shape[1]
    pad = (-n) % r
    chunks = jnp.pad(flat, ((0, 0), (0, pad))).reshape(r, r, (n + pad) // r)  # (replica, chunk, m)
    hops = np.arange(r)
    order = (hops[:, None] + hops[None, :] + 1) % r  # order[j, c]: the replica chunk c visits at hop j
    seq = chunks[order, hops[None, :]]  # (hop, chunk, m)

    def rnd(v, k):
        y = _round(v, spec, mode, key=k)[0]
        return y, (rounding_counts(v, y, spec) if with_counts else jnp.zeros((len(COUNT_KINDS),), _F32))

    hop_keys = jax.random.split(key, 2 * r) if key is not None else None
    s, counts = rnd(seq[0], None if hop_keys is None else hop_keys[0])

    def hop(carry, xs):
        s, counts = carry
        g, j = xs
        kg, ks = (None, None) if hop_keys is None else (hop_keys[2 * j], hop_keys[2 * j + 1])
        qg, cg = rnd(g, kg)
        s, cs = rnd(s + qg, ks)
        return (s, counts + cg + cs), None

    if r > 1:
        (s, counts), _ = jax.lax.scan(hop, (s, counts), (seq[1:], jnp.arange(1, r)))
    return s.reshape(-1)[:n].reshape(shape), counts


__all__ = [
    "COUNT_KINDS", "SITE_GROUPS", "TELEMETRY_SITES", "new_probe", "count_roundings", "rounding_counts", "fractions",
    "ring_allreduce",
    "cast", "exact", "dot", "rounding_keys", "matmul_accumulated", "accumulated_einsum", "accumulate_blocks",
    "DotState", "init_dot_state", "exp", "gelu", "sum", "mean", "softmax", "logsumexp", "rms_norm",
]
