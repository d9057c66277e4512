"""Precision telemetry (train.precision_telemetry): underflow / overflow counts at the matmul roundings, the
probe side channel that carries them out of the backward pass, the lost-update fraction of the master
weights, and that turning it on changes no result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab import ops
from precision_lab.config import run_config
from precision_lab.policy import get_policy, parse_spec
from precision_lab.train import hparams_of, read_run, train

MICRO = {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1,
         "moe_every": 1, "num_experts": 4}


def micro(policy, steps=4, optim=None, **train_fields):
    return run_config({"model": MICRO, "policy": policy, "optim": optim or {},
                       "train": {"steps": steps, "chunk_steps": steps, "eval_every": 0, "checkpoint_every": 0,
                                 "batch_size": 8, **train_fields}})


# -- the counts themselves ---------------------------------------------------------------------------------------


def test_rounding_counts_e5m2_by_hand():
    """fp8_e5m2: max 57344 (next value would be 65536: overflow from 61440 on), smallest subnormal 2^-16
    (below 2^-17 rounds to 0)."""
    x = jnp.asarray([0.0, 1.0, 2.0**-18, -2.0**-18, 2.0**-16, 60000.0, 61440.0, -1e6, jnp.inf, jnp.nan], jnp.float32)
    for spec, expect_y_finite in ((parse_spec("fp8_e5m2"), False), (parse_spec("fp8_e5m2:saturate"), True)):
        y = ops.cast(x, get_policy(f"fp32,grads={spec}"), "grads")
        under, nonzero, over, finite = np.asarray(ops.rounding_counts(x, y, spec))
        assert (under, nonzero) == (2, 7)  # +-2^-18 flush; 1, 2^-16, 60000, 61440, -1e6 do not
        assert (over, finite) == (2, 8)  # 61440 and -1e6: clipped (saturate) or inf; 60000 rounds to 57344
        assert np.isfinite(np.asarray(y)[6]) == expect_y_finite


def test_rounding_counts_fp32_is_zero_and_mx_sees_the_scaled_range():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 1e-30, jnp.float32)
    fp32 = parse_spec("fp32")
    assert np.asarray(ops.rounding_counts(x, x, fp32)).tolist() == [0, 256, 0, 256]
    # MX e4m3: a block's amax maps into [256, 512) and e4m3's max is 448, so an element above 1.75x the
    # block's power-of-two floor saturates, however small the tensor is.
    block = jnp.asarray([1.9] + [0.1] * 31, jnp.float32)
    spec = parse_spec("fp8_e4m3fn:mx:saturate")
    y = ops.cast(block, get_policy(f"fp32,grads={spec}"), "grads")
    assert float(y[0]) == 1.75 and np.asarray(ops.rounding_counts(block, y, spec))[2] == 1


def _two_dots(policy):
    """A tiny two-matmul function of (x, w1, w2) that goes through ops.dot with the expert and head groups."""
    def f(x, w1, w2):
        h = ops.dot("ij,jk->ik", x, w1, policy, lhs="expert_operands", rhs="expert_operands")
        y = ops.dot("ik,kl->il", h, w2, policy, lhs="head_operands", rhs="head_operands")
        return jnp.sum(y) * jnp.float32(1e-7)  # tiny incoming gradients: e5m2 flushes them
    return f


@pytest.mark.parametrize("grads", ["fp8_e5m2", "fp32"])
def test_probe_cotangent_carries_backward_counts_and_changes_no_gradient(grads):
    policy = get_policy(f"fp32,grads={grads}")
    rng = np.random.default_rng(1)
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((8, 16), (16, 32), (32, 4))]
    f = _two_dots(policy)

    def with_probe(probe, *a):
        with ops.count_roundings(probe):
            return f(*a)

    plain = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
    probed = jax.jit(jax.grad(with_probe, argnums=(0, 1, 2, 3)))(ops.new_probe(), *args)
    counts = np.asarray(probed[0])
    for a, b in zip(plain, probed[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit
    row = {s: counts[i] for i, s in enumerate(ops.TELEMETRY_SITES)}
    # forward: x and w1 (8*16 + 16*32 elements), then h and w2 (8*32 + 32*4): all nonzero, none flushed
    assert row["experts_fwd"].tolist() == [0, 8 * 16 + 16 * 32, 0, 8 * 16 + 16 * 32]
    assert row["head_fwd"].tolist() == [0, 8 * 32 + 32 * 4, 0, 8 * 32 + 32 * 4]
    # backward: head sees the constant 1e-7 gradient ([8, 4]), experts the [8, 32] gradient of h
    assert row["head_bwd"][1] == 8 * 4
    if grads == "fp8_e5m2":
        assert row["head_bwd"][0] == 8 * 4  # 1e-7 < 2^-17: every element flushed
    else:
        assert counts[:, [0, 2]].sum() == 0


# -- in training ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("telemetry")
    off = train(micro("fp32"), seeds=[0], progress=False)
    on = train(micro("fp32", precision_telemetry=True), seeds=[0], progress=False, out_dir=out)
    return off, on, out


def test_telemetry_changes_no_result(fp32_runs):
    off, on, _ = fp32_runs
    for name in ("loss", "grad_norm", "update_rms", "ce"):
        np.testing.assert_array_equal(off.metrics[name], on.metrics[name])  # bit-identical
    assert off.summary["final_eval_loss"] == on.summary["final_eval_loss"]
    assert not any("frac/" in k for k in off.metrics)


def test_fp32_shows_zero_underflow_and_overflow_everywhere(fp32_runs):
    _, on, out = fp32_runs
    names = [k for k in on.metrics if k.startswith(("underflow_frac/", "overflow_frac/"))]
    for group in ("experts", "attention", "router", "head"):
        assert f"underflow_frac/{group}_fwd" in names and f"overflow_frac/{group}_bwd" in names
    assert {"underflow_frac/grads", "underflow_frac/grad_allreduce", "overflow_frac/grad_allreduce"} <= set(names)
    for k in names:
        assert on.metrics[k].shape == (4, 1) and (on.metrics[k] == 0).all(), k
    _, stored = read_run(out)  # stored per step in metrics.npz, names as they are
    assert "underflow_frac/experts_bwd" in stored and "lost_update_frac" in stored


def test_unscaled_e5m2_gradients_underflow():
    """fp8 e5m2 gradients without scaling (the unscaled arm of the fp8 experiment): the smallest subnormal
    is 2^-16 = 1.5e-5 and the output-logit gradients are ~1/(batch * tokens), so a visible share flushes."""
    result = train(micro("fp32,grads=fp8_e5m2", precision_telemetry=True), seeds=[0], progress=False)
    m = result.metrics
    assert (m["underflow_frac/grads"] > 0.01).all(), m["underflow_frac/grads"]
    assert (m["underflow_frac/experts_bwd"] > 0).all() and (m["underflow_frac/head_bwd"] > 0).all()
    assert (m["underflow_frac/experts_fwd"] == 0).all()  # forward operands stay fp32


@pytest.fixture(scope="module")
def bf16_master_runs():
    """bf16 master weights, AdamW at a constant tiny lr (1e-5: |update| ~ lr, below half a bf16 ulp of all
    but the smallest weights), round-to-nearest vs stochastic rounding, 3 steps each."""
    optim = {"schedule": "constant", "warmup_steps": 0, "lr": 1e-5}
    return {rounding: train(micro(f"fp32,master=bf16{suffix}", steps=3, optim=optim, precision_telemetry=True),
                            seeds=[0], progress=False).metrics
            for rounding, suffix in (("nearest", ""), ("stochastic", ":stochastic"))}


@pytest.mark.slow  # compiling the stochastic-rounding master update takes minutes on 2 busy cores
def test_round_to_nearest_master_loses_tiny_updates_stochastic_does_not(bf16_master_runs):
    nearest, stochastic = bf16_master_runs["nearest"], bf16_master_runs["stochastic"]
    assert (nearest["lost_update_frac"] > 0.95).all(), nearest["lost_update_frac"]
    assert (nearest["applied_update_ratio"] < 0.2).all(), nearest["applied_update_ratio"]
    # stochastic rounding moves a weight by one ulp with probability |update|/ulp: most weights still do
    # not move in one step, but fewer than with round-to-nearest, and the updates arrive on average
    assert (stochastic["lost_update_frac"] < nearest["lost_update_frac"]).all()
    assert (np.abs(stochastic["applied_update_ratio"] - 1.0) < 0.25).all(), stochastic["applied_update_ratio"]
