"""Optimisers reduce a quadratic; Adafactor's decay and update clipping; schedules; precision hooks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from precision_lab.errors import UserError
from precision_lab.optim import (
    OptimConfig,
    make_optimizer,
    make_schedule,
    map_float_leaves,
    quantized_state,
    quantized_updates,
)


def quadratic_problem(rng):
    """A factored-size matrix and a vector, with the loss sum((p - target)^2)."""
    target = {
        "w": jnp.asarray(rng.standard_normal((128, 160)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((7,)), jnp.float32),
    }
    params = jax.tree.map(jnp.zeros_like, target)

    def loss(p):
        return sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)

    return params, loss


def run(tx, params, loss, steps):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="adafactor", lr=0.05, schedule="constant"),
        OptimConfig(name="adafactor", lr=0.5, schedule="rsqrt", warmup_steps=100, clipping_threshold=0.1),
        OptimConfig(
            name="adafactor", lr=0.05, schedule="constant", momentum=0.9, multiply_by_parameter_scale=True
        ),
        OptimConfig(name="adamw", lr=0.05, schedule="constant", b2=0.95),
        OptimConfig(name="adamw", lr=0.05, schedule="cosine", warmup_steps=10, total_steps=300, b2=0.999,
                    weight_decay=0.01, grad_clip_norm=1.0),
    ],
    ids=["adafactor", "adafactor-rsqrt-clip0.1", "adafactor-momentum-pscale", "adamw", "adamw-cosine-wd"],
)
def test_optimizer_reduces_quadratic(rng, cfg):
    params, loss = quadratic_problem(rng)
    tx = make_optimizer(cfg)
    start = float(loss(params))
    params, _ = run(tx, params, loss, 300)
    assert float(loss(params)) < 0.05 * start


def find_state(state, cls):
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]
    assert len(found) == 1
    return found[0]


def test_adafactor_second_moment_decay_follows_power_law():
    # Unfactored vector: v_t = beta_t v_{t-1} + (1 - beta_t) (g_t^2 + eps), beta_t = 1 - t^-0.8, t = 1, 2, ...
    cfg = OptimConfig(name="adafactor", lr=0.1, schedule="constant", clipping_threshold=0.0)
    tx = make_optimizer(cfg)
    params = jnp.zeros((3,), jnp.float32)
    state = tx.init(params)
    rng = np.random.default_rng(1)
    expected = np.zeros(3)
    for t in range(1, 8):
        g = rng.standard_normal(3).astype(np.float32)
        _, state = tx.update(jnp.asarray(g), state, params)
        beta = 1.0 - t**-0.8
        expected = beta * expected + (1.0 - beta) * (g.astype(np.float64) ** 2 + 1e-30)
        v = np.asarray(find_state(state, optax.FactoredState).v)
        np.testing.assert_allclose(v, expected, rtol=1e-5)
    # decay_rate is a knob: with 0.5 the second step keeps 1 - 2^-0.5 of the first moment.
    tx = make_optimizer(dataclasses.replace(cfg, decay_rate=0.5))
    state = tx.init(params)
    _, state = tx.update(jnp.full((3,), 2.0, jnp.float32), state, params)
    _, state = tx.update(jnp.zeros((3,), jnp.float32), state, params)
    v = np.asarray(find_state(state, optax.FactoredState).v)
    np.testing.assert_allclose(v, (1 - 2**-0.5) * 4.0, rtol=1e-5)


def test_adafactor_factors_matrices_only():
    tx = make_optimizer(OptimConfig())
    params = {"w": jnp.zeros((128, 256)), "small": jnp.zeros((4, 256))}
    state = find_state(tx.init(params), optax.FactoredState)
    assert sorted([state.v_row["w"].shape, state.v_col["w"].shape]) == [(128,), (256,)]
    assert state.v["small"].shape == (4, 256)  # a dim below min_dim_size_to_factor: unfactored


@pytest.mark.parametrize("threshold", [0.1, 1.0])
def test_update_clipping_bounds_update_rms(rng, threshold):
    lr = 0.5
    cfg = OptimConfig(name="adafactor", lr=lr, schedule="constant", clipping_threshold=threshold)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros((128, 192), jnp.float32), "b": jnp.zeros((9,), jnp.float32)}
    state = tx.init(params)
    rms = []
    for i in range(5):
        # Heavy-tailed, growing gradients: the scaled update's RMS would exceed the threshold.
        grads = jax.tree.map(
            lambda p: jnp.asarray(rng.standard_cauchy(p.shape) * 10.0**i, jnp.float32), params
        )
        updates, state = tx.update(grads, state, params)
        for u in jax.tree.leaves(updates):
            rms.append(float(jnp.sqrt(jnp.mean(u**2))) / lr)
    assert max(rms) <= threshold * (1 + 1e-5)
    # The first step's scaled update is sign(g) (RMS 1), so clipping at < 1 is active and exact there.
    if threshold < 1:
        assert rms[0] == pytest.approx(threshold, rel=1e-5)


def test_update_clipping_off():
    tx = make_optimizer(OptimConfig(name="adafactor", lr=1.0, schedule="constant", clipping_threshold=0.0))
    params = jnp.zeros((4,), jnp.float32)
    state = tx.init(params)
    updates, _ = tx.update(jnp.asarray([1.0, -2.0, 3.0, -4.0]), state, params)
    np.testing.assert_allclose(np.asarray(updates), [-1.0, 1.0, -1.0, 1.0], rtol=1e-6)


def test_global_norm_clipping():
    cfg = OptimConfig(name="adamw", lr=1.0, schedule="constant", grad_clip_norm=1.0, eps=0.0)
    tx = make_optimizer(cfg)
    params = jnp.zeros((2,), jnp.float32)
    state = tx.init(params)
    # Clipped to norm 1 then Adam: the first Adam step is sign(g) whatever the scale, so check the mu state.
    _, state = tx.update(jnp.asarray([30.0, 40.0]), state, params)
    mu = find_state(state, optax.ScaleByAdamState).mu
    np.testing.assert_allclose(np.asarray(mu), 0.1 * np.array([0.6, 0.8]), rtol=1e-6)


# -- schedules -----------------------------------------------------------------------------------------


def values(schedule, steps):
    return [float(schedule(jnp.asarray(s, jnp.int32))) for s in steps]


def test_rsqrt_schedule_hand_values():
    s = make_schedule(OptimConfig(lr=0.01, schedule="rsqrt", warmup_steps=100))
    got = values(s, [0, 50, 100, 400, 10_000])
    np.testing.assert_allclose(got, [0.0, 0.005, 0.01, 0.005, 0.001], rtol=1e-6)
    # No warm-up: lr / sqrt(max(step, 1)).
    s = make_schedule(OptimConfig(lr=0.01, schedule="rsqrt"))
    np.testing.assert_allclose(values(s, [0, 1, 4, 100]), [0.01, 0.01, 0.005, 0.001], rtol=1e-6)
    # T5's relative step min(1e-2, 1/sqrt(t)) is rsqrt with lr 0.01 and warm-up 10k (after the warm-up).
    s = make_schedule(OptimConfig(lr=0.01, schedule="rsqrt", warmup_steps=10_000))
    np.testing.assert_allclose(values(s, [10_000, 40_000]), [0.01, 1 / math.sqrt(40_000)], rtol=1e-6)


def test_cosine_schedule_hand_values():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=110, final_lr_fraction=0.1)
    s = make_schedule(cfg)
    got = values(s, [0, 5, 10, 60, 110, 500])
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
    s = make_schedule(OptimConfig(lr=2.0, schedule="cosine", total_steps=100))
    np.testing.assert_allclose(values(s, [0, 50, 100]), [2.0, 1.0, 0.0], rtol=1e-6, atol=1e-6)


def test_constant_schedule():
    s = make_schedule(OptimConfig(lr=0.3, schedule="constant", warmup_steps=10))
    np.testing.assert_allclose(values(s, [0, 5, 10, 1000]), [0.0, 0.15, 0.3, 0.3], rtol=1e-6)
    s = make_schedule(OptimConfig(lr=0.3, schedule="constant"))
    np.testing.assert_allclose(values(s, [0, 7]), [0.3, 0.3], rtol=1e-6)
    assert s(jnp.asarray(3, jnp.int32)).dtype == jnp.float32


# -- precision hooks -----------------------------------------------------------------------------------


def round_to_bf16(x):
    """Round a float32 array to bf16 and back (storage in float32), via numpy ml_dtypes."""
    return jnp.asarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32))


def round_to_bf16_jnp(x):
    """Traceable bf16 rounding (round-to-nearest-even) in float32 storage."""
    return x.astype(jnp.bfloat16).astype(x.dtype)


def bf16_representable(x):
    x = np.asarray(x, np.float32)
    return np.array_equal(x.astype(ml_dtypes.bfloat16).astype(np.float32), x, equal_nan=True)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_quantized_state_really_rounds_every_float_leaf(rng, name):
    cfg = OptimConfig(name=name, lr=0.01, schedule="constant", momentum=0.9 if name == "adafactor" else None)
    inner = make_optimizer(cfg)
    tx = quantized_state(inner, map_float_leaves(round_to_bf16))
    params = {
        "w": jnp.asarray(rng.standard_normal((128, 130)), jnp.float32),
        "b": jnp.zeros((3,), jnp.float32),
    }
    state = tx.init(params)
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) / 3.0, params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        float_leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert float_leaves and all(bf16_representable(x) for x in float_leaves)
    # Integer leaves (the step count) are untouched, and the unrounded optimiser's state would differ.
    counts = [int(x) for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert counts and all(c == 3 for c in counts)
    plain_state = inner.init(params)
    _, plain_state = inner.update(grads, plain_state, params)
    assert not all(bf16_representable(x) for x in jax.tree.leaves(plain_state) if x.dtype == jnp.float32)


def test_quantized_state_applies_at_init_and_every_update():
    calls = []

    def record(tree):
        calls.append(jax.tree.structure(tree))
        return tree

    tx = quantized_state(optax.sgd(0.1, momentum=0.9), record)
    params = jnp.ones((2,), jnp.float32)
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    _, state = tx.update(params, state, params)
    assert len(calls) == 3 and calls[0] == calls[1] == calls[2]
    # Also composes with make_optimizer's hook argument and under jit.
    cfg = OptimConfig(name="adamw", lr=0.1, schedule="constant")
    tx = make_optimizer(cfg, quantize_state=map_float_leaves(round_to_bf16_jnp))
    state = tx.init(params)
    _, state = jax.jit(tx.update)(params * 1.2345678, state, params)
    assert all(bf16_representable(x) for x in jax.tree.leaves(state) if x.dtype == jnp.float32)


def test_quantized_updates():
    tx = quantized_updates(optax.sgd(1.0), map_float_leaves(round_to_bf16_jnp))
    params = jnp.zeros((3,), jnp.float32)
    updates, _ = tx.update(jnp.asarray([1.0001, 2.0, 3.0000002], jnp.float32), tx.init(params), params)
    assert bf16_representable(updates)
    np.testing.assert_array_equal(np.asarray(updates), [-1.0, -2.0, -3.0])


# -- validation ----------------------------------------------------------------------------------------


def test_unknown_names_raise_user_error():
    with pytest.raises(UserError, match="unknown optimizer 'adam'.*adafactor, adamw"):
        OptimConfig(name="adam")
    with pytest.raises(UserError, match="unknown schedule 'cosin'.*closest match: 'cosine'"):
        OptimConfig(schedule="cosin")


def test_bad_values_raise_user_error():
    with pytest.raises(UserError, match="total_steps"):
        OptimConfig(schedule="cosine", warmup_steps=10, total_steps=10)
    with pytest.raises(UserError, match="lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(UserError, match="b2"):
        OptimConfig(name="adamw", b2=1.0)
    with pytest.raises(UserError, match="clipping_threshold"):
        OptimConfig(clipping_threshold=-0.1)
    with pytest.raises(UserError, match="warmup_steps"):
        OptimConfig(warmup_steps=-1)


def test_cosine_total_steps_defaults_to_train_steps():
    """`--set optim.schedule="cosine"` alone used to exit 2 (total_steps 0): it now decays over train.steps,
    and a cosine that ends before its warm-up is still refused with one line."""
    from precision_lab.config import run_config

    cfg = run_config({"train": {"steps": 120}, "optim": {"schedule": "cosine", "warmup_steps": 20}})
    assert cfg.optim.total_steps == 120
    s = make_schedule(cfg.optim)
    assert float(s(120)) == pytest.approx(0.0, abs=1e-9) and float(s(20)) == pytest.approx(cfg.optim.lr)
    with pytest.raises(UserError, match="total_steps"):
        run_config({"train": {"steps": 20}, "optim": {"schedule": "cosine", "warmup_steps": 20}})
    with pytest.raises(UserError, match="total_steps"):
        make_schedule(OptimConfig(schedule="cosine", warmup_steps=5))
