"""Scaling into narrow formats against hand-worked examples; scales stay finite for any amax."""

import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab.policy import Spec
from precision_lab.rounding import quantize
from precision_lab.scaling import (DelayedState, current_scaled, delayed_scaled, init_delayed_state, mx_scaled,
                                   mx_scales, scale_from_amax, scaled_quantize, tile_scaled)


def test_current_scaling_hand_example():
    # amax 3.5 -> scale 448/3.5 = 128; 0.1*128 = 12.8 -> e4m3 13 (ulp 1 in [8,16)) -> 13/128
    y = current_scaled(jnp.array([1.0, -3.5, 0.1], jnp.float32), "fp8_e4m3fn")
    np.testing.assert_array_equal(y, np.array([1.0, -3.5, 13 / 128], np.float32))


def test_delayed_scaling_hand_example():
    state = init_delayed_state(4)
    x = jnp.array([2.0, -1.0, 0.3], jnp.float32)
    y, state = delayed_scaled(x, "fp8_e4m3fn", state)
    # empty history: scale 1, plain e4m3 rounding; then amax 2 enters the history
    np.testing.assert_array_equal(y, quantize(x, "fp8_e4m3fn"))
    np.testing.assert_array_equal(state.amax_history, [2.0, 0, 0, 0])
    y2, state = delayed_scaled(x * 0.5, "fp8_e4m3fn", state)
    # scale = 448 / 2 = 224 from the history (not from this tensor, amax 1): 0.15*224 = 33.6 -> 32 (ulp 4)
    assert float(y2[2]) == pytest.approx(32 / 224)
    np.testing.assert_array_equal(state.amax_history, [1.0, 2.0, 0, 0])
    _, s = delayed_scaled(x, "fp8_e4m3fn", DelayedState(jnp.array([4.0, 1.0], jnp.float32)), margin=1)
    assert float(scale_from_amax(4.0, __import__("precision_lab").get_format("fp8_e4m3fn"), 1)) == 56.0
    np.testing.assert_array_equal(s.amax_history, [2.0, 4.0])  # window of 2: the oldest falls out


def test_mx_hand_example():
    block = np.zeros(32, np.float32)
    block[:3] = [5.0, 0.3, -1.0]
    # e4m3: floor(log2 5) = 2, emax 8 -> X = 2^-6; 0.3*64 = 19.2 -> 20 (ulp 2 in [16,32)) -> 0.3125
    y = mx_scaled(jnp.asarray(block), "fp8_e4m3fn")
    np.testing.assert_array_equal(np.asarray(y)[:3], [5.0, 0.3125, -1.0])
    assert float(mx_scales(jnp.asarray(block), "fp8_e4m3fn")[0, 0]) == 2.0**-6
    # fp4 e2m1: emax 2 -> X = 1; 5 ties between 4 and 6 -> even mantissa (4); 0.3 -> 0.5 (subnormal 0.5)
    y4 = mx_scaled(jnp.asarray(block), "fp4_e2m1fn")
    np.testing.assert_array_equal(np.asarray(y4)[:3], [4.0, 0.5, -1.0])


def test_mx_blocks_are_independent_and_along_the_axis():
    x = np.ones((3, 64), np.float32) * 0.001
    x[:, 0] = 1000.0  # a huge value in the first block of each row only
    y = np.asarray(mx_scaled(jnp.asarray(x), "fp8_e4m3fn", axis=-1))
    np.testing.assert_allclose(y[:, 32:], x[:, 32:], rtol=2**-4)  # second block keeps its small values
    assert (y[:, 1:32] == 0).all()  # the first block's small values are below its scaled range
    yt = np.asarray(mx_scaled(jnp.asarray(x.T.copy()), "fp8_e4m3fn", axis=0))
    np.testing.assert_array_equal(yt.T, y)


def test_tiles():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    x[:128, :128] *= 1e4
    t2 = np.asarray(tile_scaled(jnp.asarray(x), "fp8_e4m3fn", tile=(128, 128)))
    rel = np.abs(t2 - x) / np.abs(x)
    assert rel.max() < 2**-4 + 1e-6 or np.median(rel) < 2**-5  # every tile uses its own range
    assert np.median(rel[128:, 128:]) < 2**-5
    t1 = np.asarray(tile_scaled(jnp.asarray(x), "fp8_e4m3fn", tile=(1, 128)))
    assert np.median(np.abs(t1 - x)[:, 128:] / np.abs(x[:, 128:])) < 2**-5
    assert t1.shape == x.shape == t2.shape


@pytest.mark.parametrize("amax", [0.0, 1e-45, 1e-38, np.inf, -np.inf, np.nan, 3e38])
def test_scales_stay_finite(amax):
    from precision_lab.formats import get_format

    s = float(scale_from_amax(jnp.float32(amax), get_format("fp8_e4m3fn")))
    assert np.isfinite(s) and s > 0


@pytest.mark.parametrize("scaling", ["current", "delayed", "mx", "tile1x128", "tile128x128"])
def test_degenerate_tensors_give_no_nan(scaling):
    spec = Spec(format="fp8_e4m3fn", scaling=scaling, overflow="saturate")
    for x in (np.zeros((4, 64)), np.full((4, 64), 1e-42), np.full((4, 64), 3e38)):
        state = init_delayed_state(4) if scaling == "delayed" else None
        y, _ = scaled_quantize(jnp.asarray(x, jnp.float32), spec, state=state)
        assert np.isfinite(np.asarray(y)).all()


def test_scaled_spec_honours_its_overflow_field():
    """Regression: `fp8_e4m3fn:delayed:nonfinite` saturated like `:saturate`. A delayed scale from a stale
    (smaller) amax history maps this step's larger values past 448: nonfinite gives NaN (e4m3fn has no inf),
    saturate and no overflow token give +-448 / scale; e5m2 (IEEE) gives inf."""
    history = DelayedState(jnp.array([1.0, 0.5], jnp.float32))  # scale = 448 / 1
    x = jnp.array([0.5, 3.0, -3.0], jnp.float32)
    nonfinite, _ = scaled_quantize(x, Spec(format="fp8_e4m3fn", scaling="delayed", overflow="nonfinite"), state=history)
    saturate, _ = scaled_quantize(x, Spec(format="fp8_e4m3fn", scaling="delayed", overflow="saturate"), state=history)
    default, _ = scaled_quantize(x, Spec(format="fp8_e4m3fn", scaling="delayed"), state=history)
    assert float(nonfinite[0]) == 0.5 and np.isnan(np.asarray(nonfinite[1:])).all()
    np.testing.assert_array_equal(saturate, [0.5, 1.0, -1.0])
    np.testing.assert_array_equal(default, saturate)
    e5m2, _ = scaled_quantize(x, Spec(format="fp8_e5m2", scaling="delayed", overflow="nonfinite"),
                              state=DelayedState(jnp.array([1.0], jnp.float32)))
    np.testing.assert_array_equal(e5m2[1:], [np.inf, -np.inf])
    # MX: e4m3's block scale puts the block max in [256, 512): 480 -> 448 saturating, NaN nonfinite
    block = jnp.full((32,), 0.25, jnp.float32).at[0].set(1.875)  # 1.875 / 2^-8 = 480
    assert float(scaled_quantize(block, Spec(format="fp8_e4m3fn", scaling="mx"))[0][0]) == 1.75
    assert np.isnan(float(scaled_quantize(block, Spec(format="fp8_e4m3fn", scaling="mx", overflow="nonfinite"))[0][0]))
