"""Traced-format rounding (`quantize_ieee_traced`): one compiled program for every IEEE-style eXmY format,
bit-identical to the static `quantize` for each of them."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from precision_lab.formats import Format, get_format
from precision_lab.rounding import quantize, quantize_ieee_traced

ALL_IEEE = [(e, m) for e in range(2, 9) for m in range(0, 24)]  # every IEEE-style format float32 holds


def ieee(e: int, m: int) -> Format:
    """The IEEE-style custom format eXmY (built directly: names like e8m0 or e4m3 mean other formats)."""
    return Format(name=f"e{e}m{m}_ieee", exponent_bits=e, mantissa_bits=m, bias=2 ** (e - 1) - 1, specials="ieee")


def edge_inputs(rng) -> np.ndarray:
    """float32 bit patterns that reach every decision of the rounding: in every float32 binade (subnormals,
    inf and NaN included) each mantissa at, just below and just above a tie and a grid point for every
    number of dropped bits, both signs; plus random bit patterns."""
    mants = {0, 1, 2, 3, 0x7FFFFF, 0x7FFFFE, 0x400000, 0x3FFFFF}
    for s in range(0, 24):
        for base in (1 << s, 3 << s, (1 << s) * 5):
            for d in (-1, 0, 1):
                mants.add((base + d) & 0x7FFFFF)
        if s:
            half = 1 << (s - 1)
            for k in (0, 1, 2, 3):
                for d in (-1, 0, 1):
                    mants.add(((k << s) + half + d) & 0x7FFFFF)
    mants = np.array(sorted(mants), np.uint32)
    exps = np.arange(256, dtype=np.uint32)
    grid = (exps[:, None] << np.uint32(23)) | mants[None, :]
    bits = np.concatenate([grid.ravel(), grid.ravel() | np.uint32(0x80000000),
                           rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000], np.uint32)])
    return bits.view(np.float32)


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("overflow,subnormals", [(None, True), ("saturate", True), ("nonfinite", True),
                                                 (None, False)])
def test_traced_equals_static_for_every_ieee_format(rng, overflow, subnormals):
    """One jitted program, the widths traced, against the static path for all 168 IEEE-style formats."""
    xs = jnp.asarray(edge_inputs(rng))
    traced = jax.jit(lambda x, e, m: quantize_ieee_traced(x, e, m, overflow=overflow, subnormals=subnormals))
    for e, m in ALL_IEEE:
        want = _bits(quantize(xs, ieee(e, m), overflow=overflow, subnormals=subnormals))
        got = _bits(traced(xs, jnp.int32(e), jnp.int32(m)))
        bad = np.flatnonzero(want != got)
        assert bad.size == 0, (e, m, hex(int(_bits(xs)[bad[0]])), hex(int(want[bad[0]])), hex(int(got[bad[0]])))
    assert traced._cache_size() == 1  # one compiled program served every format


def test_traced_matches_named_custom_formats_vmapped():
    """Members of a vmapped program in different formats, each bit for bit its own named format (the
    sweep's use: one member per format)."""
    names = ["e8m3", "e8m10", "e5m3", "e3m3", "e8m1", "fp16", "bf16", "fp8_e5m2", "fp8_e4m3"]
    fmts = [get_format(n) for n in names]
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((len(names), 4096)).astype(np.float32)
                     * np.float32(300.0))
    es = jnp.asarray([f.exponent_bits for f in fmts], jnp.int32)
    ms = jnp.asarray([f.mantissa_bits for f in fmts], jnp.int32)
    got = jax.vmap(lambda x, e, m: quantize_ieee_traced(x, e, m))(xs, es, ms)
    for i, f in enumerate(fmts):
        np.testing.assert_array_equal(_bits(got[i]), _bits(quantize(xs[i], f)))


def test_traced_gradient_is_straight_through():
    g = jax.grad(lambda x: jnp.sum(quantize_ieee_traced(x, 5, 2) * x))(jnp.asarray([1.3, -700.0, 1e-9], jnp.float32))
    want = np.asarray(quantize(jnp.asarray([1.3, -700.0, 1e-9], jnp.float32), get_format("fp8_e5m2"))) + \
        np.array([1.3, -700.0, 1e-9], np.float32)
    np.testing.assert_array_equal(np.asarray(g), want)


_TRACED = jax.jit(lambda x, e, m, sat: jnp.where(sat, quantize_ieee_traced(x, e, m, overflow="saturate"),
                                                  quantize_ieee_traced(x, e, m)))


@settings(max_examples=60)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64),
       fmt=st.sampled_from(ALL_IEEE), saturate=st.booleans())
def test_traced_equals_static_hypothesis(bits, fmt, saturate):
    bits = (bits * 64)[:64]  # one shape: one compiled program for every example
    xs = jnp.asarray(np.array(bits, np.uint32).view(np.float32))
    e, m = fmt
    want = _bits(quantize(xs, ieee(e, m), overflow="saturate" if saturate else None))
    got = _bits(_TRACED(xs, jnp.int32(e), jnp.int32(m), jnp.bool_(saturate)))
    np.testing.assert_array_equal(got, want)


def test_ieee_name_spelling_reaches_formats_aliases_hide():
    """e8m0 is the MX scale format and e2m3 the OCP fp6 format; `_ieee` names the IEEE-style ones."""
    assert get_format("e8m0").specials == "e8m0"
    f = get_format("e8m0_ieee")
    assert (f.exponent_bits, f.mantissa_bits, f.specials, f.bias, f.name) == (8, 0, "ieee", 127, "e8m0_ieee")
    assert get_format("e2m3_ieee").max == 3.75 and get_format("e2m3_ieee").has_inf
    assert get_format("e5m3_ieee").name == "e5m3"  # no clash: the plain name
    assert get_format("e4m3_ieee").name == "fp8_e4m3"  # the existing alias of the IEEE-style e4m3
    for e, m in itertools.product((2, 8), (0, 3)):
        f = get_format(f"e{e}m{m}_ieee")
        assert (f.exponent_bits, f.mantissa_bits, f.specials) == (e, m, "ieee")
