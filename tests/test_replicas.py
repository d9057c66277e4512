"""Emulated data parallelism (train.replicas): the ring all-reduce's order and rounding, bad R, and R float32
replicas training like one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab import ops
from precision_lab.cli import main
from precision_lab.config import run_config
from precision_lab.errors import UserError
from precision_lab.policy import get_policy
from precision_lab.train import train

# group_size 8 divides every shard's token count (encoder 4 x 64, decoder 4 x 14 per replica of 2), so the
# full batch's routing groups are exactly the replicas' groups and the routing is the same for R = 1 and 2.
MICRO = {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1,
         "moe_every": 1, "num_experts": 4, "group_size": 8}


def micro(policy="fp32", steps=8, **train_fields):
    return run_config({"model": MICRO, "policy": policy,
                       "train": {"steps": steps, "chunk_steps": steps, "eval_every": 0, "checkpoint_every": 0,
                                 "batch_size": 8, **train_fields}})


# -- the all-reduce ------------------------------------------------------------------------------------------------


def test_ring_order_is_the_stated_one():
    """Chunk c of R starts at replica (c + 1) mod R and each hop rounds: with bf16 and values chosen so
    that the order matters, every chunk equals a sequential bf16 sum in its own ring order."""
    r, n = 3, 3
    x = np.zeros((r, n), np.float32)
    x[:, 0] = [1.0, 2.0**-8, 2.0**-8]  # chunk 0: order 1, 2, 0: 2^-8 + 2^-8 = 2^-7 survives, + 1 -> 1.0078125
    x[:, 1] = [2.0**-8, 1.0, 2.0**-8]  # chunk 1: order 2, 0, 1: 2^-8 + 2^-8 = 2^-7, + 1 -> 1.0078125
    x[:, 2] = [2.0**-8, 2.0**-8, 1.0]  # chunk 2: order 0, 1, 2: same
    bf16 = get_policy("fp32,grad_allreduce=bf16")
    got = np.asarray(ops.ring_allreduce(jnp.asarray(x), bf16))
    assert got.tolist() == [1.0078125] * 3
    # replica order 0, 1, 2 for chunk 0 would give 1.0: 1 + 2^-8 is a tie that rounds to even, twice
    q = lambda v: float(ops.cast(jnp.float32(v), bf16, "grad_allreduce"))  # noqa: E731
    assert q(q(1.0 + 2.0**-8) + 2.0**-8) == 1.0


def test_ring_allreduce_fp32_and_bf16_error_bounds():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(16, 33, 5)).astype(np.float32)
    ref = g.astype(np.float64).sum(axis=0)
    bound_scale = np.abs(g.astype(np.float64)).sum(axis=0)
    for fmt, u in (("fp32", 2.0**-24), ("bf16", 2.0**-9)):
        got = np.asarray(ops.ring_allreduce({"w": jnp.asarray(g)}, get_policy(f"fp32,grad_allreduce={fmt}"))["w"])
        err = np.abs(got - ref)
        assert (err <= 16 * u * bound_scale * 1.01).all()  # R roundings of partial sums of |g|
    one = np.asarray(ops.ring_allreduce(jnp.asarray(g[:1]), get_policy("bf16"), "grad_allreduce"))
    np.testing.assert_array_equal(one, np.asarray(ops.cast(g[0], get_policy("bf16"), "grad_allreduce")))


# -- configuration -------------------------------------------------------------------------------------------------


def test_replicas_must_divide_the_batch(capsys):
    with pytest.raises(UserError, match=r"train.replicas \(3\) must divide train.batch_size \(8\)"):
        micro(replicas=3)
    assert main(["train", "--preset", "tiny", "--steps", "1", "--set", "train.batch_size=8",
                 "--set", "train.replicas=3", "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.replicas" in err and "[1, 2, 4, 8]" in err


# -- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_and_two():
    return (train(micro(), seeds=[0], progress=False),
            train(micro(replicas=2, precision_telemetry=True), seeds=[0], progress=False))


def test_replica_losses_sum_to_the_full_batch_loss(one_and_two):
    """Step 0 runs on the same parameters: the sum of the replicas' weighted losses is the full batch's
    loss, and the all-reduced gradient its gradient, to float32 re-association of the batch sums."""
    one, two = one_and_two
    for name in ("loss", "ce", "grad_norm", "router_z_loss", "load_balancing_loss", "output_lse"):
        np.testing.assert_allclose(two.metrics[name][0], one.metrics[name][0], rtol=2e-6, err_msg=name)


def test_float32_replicas_train_like_one(one_and_two):
    """fp32 all-reduce: R = 2 follows R = 1's trajectory. The only difference is the order of float32
    sums over the batch (two halves summed, then added); over 8 Adam steps that re-association drifts the
    loss by a few float32 ulps per step. 1e-5 relative allows ~80 ulps of float32 loss."""
    one, two = one_and_two
    np.testing.assert_allclose(two.metrics["loss"], one.metrics["loss"], rtol=1e-5)
    assert (two.metrics["overflow_frac/grad_allreduce"] == 0).all()


def test_allreduce_relative_error_telemetry(one_and_two):
    """allreduce_rel_error measures the all-reduce's own roundoff: a float32 ring over 2 replicas differs
    from the float32 sum only by re-association (a few ulps, < 1e-6 relative), a bf16 ring by about bf16's
    half-ulp (2^-9 = 2e-3 relative per element, so 1e-4 .. 1e-2 over the whole gradient)."""
    _, two = one_and_two
    fp32_err = two.metrics["allreduce_rel_error"]
    assert np.isfinite(fp32_err).all() and (fp32_err < 1e-6).all()
    bf16 = train(micro("fp32,grad_allreduce=bf16", steps=2, replicas=2, precision_telemetry=True), seeds=[0],
                 progress=False)
    err = bf16.metrics["allreduce_rel_error"]
    assert ((err > 1e-4) & (err < 1e-2)).all(), err
