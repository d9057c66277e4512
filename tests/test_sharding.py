"""Expert parallelism on 8 forced CPU devices (conftest sets the XLA flag): mesh data=2 x expert=4.

Tolerances (see precision_lab/model/sharding.py): XLA:CPU partitions the einsums differently per device, so
float32 sums can be re-associated (batch-mean losses, weight gradients summed over the data axis, matmul
blocking on the smaller per-device shapes). Measured here: per-token losses within 3e-6 relative (a few
float32 ulp), gradients within ~1e-6 of each tensor's max. Routing decisions must be identical. Rounding the
all-to-all payload to bf16 ("comm=bf16") does not make the run bit-identical: attention and the output
projection, outside the comm boundary, still differ by an ulp.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab.data import DataConfig, make_dataset
from precision_lab.errors import UserError
from precision_lab.model import apply, get_model_config, init, sharding
from precision_lab.policy import get_policy

# group_size 28 gives 64 encoder groups (16 x 64 tokens) and 8 decoder groups (16 x 14 tokens): both split
# over the 8 devices, so the sharded run routes exactly the same groups as the single-device one.
CFG = dataclasses.replace(get_model_config("tiny"), group_size=28, expert_dispatch="dense")


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (forced CPU) devices")
    batch = {k: jnp.asarray(v) for k, v in make_dataset(DataConfig(inputs_length=64)).batch(0, 16).items()}
    return sharding.make_mesh(2, 4), batch


@pytest.mark.parametrize("policy_name", ["fp32", pytest.param("comm=bf16", marks=pytest.mark.slow)])
def test_sharded_forward_and_grad_match_single_device(setup, policy_name):
    mesh, batch = setup
    policy = get_policy(policy_name)
    params, state = init(jax.random.PRNGKey(0), CFG, policy)
    single = jax.jit(lambda p: apply(p, state, batch, cfg=CFG, policy=policy, train=False))
    sharded_apply = sharding.make_sharded_apply(mesh, cfg=CFG, policy=policy, train=False)
    p_sh, s_sh, b_sh = sharding.shard(params, state, batch, mesh)

    expert_w = p_sh["encoder"]["blocks"][1]["moe"]["wi_0"]
    assert expert_w.sharding.spec == jax.sharding.PartitionSpec("expert")
    assert len({d for s in expert_w.addressable_shards for d in s.data.devices()}) == 8

    a, b = single(params), sharded_apply(p_sh, s_sh, b_sh, None)
    for ia, ib in zip(a.expert_index, b.expert_index):
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
    np.testing.assert_allclose(np.asarray(b.token_ce), np.asarray(a.token_ce), rtol=1e-5)
    np.testing.assert_allclose(float(b.loss), float(a.loss), rtol=1e-5)

    if policy_name == "fp32":
        g1 = jax.jit(jax.grad(lambda p: single(p).loss))(params)
        g2 = jax.jit(jax.grad(lambda p: sharded_apply(p, s_sh, b_sh, None).loss))(p_sh)
        for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            scale = float(jnp.max(jnp.abs(x)))
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-5 * scale + 1e-12)


def test_groups_that_do_not_split_over_the_mesh_fall_back_to_fewer_axes(setup):
    """group_size 512: 2 encoder groups and 1 decoder group cannot split over 8 devices; they split over
    "data" (2) and are replicated, a layout choice only: routing and losses as on one device."""
    mesh, batch = setup
    cfg = dataclasses.replace(CFG, group_size=512)
    policy = get_policy("fp32")
    params, state = init(jax.random.PRNGKey(0), cfg, policy)
    a = jax.jit(lambda p: apply(p, state, batch, cfg=cfg, policy=policy, train=False))(params)
    f = sharding.make_sharded_apply(mesh, cfg=cfg, policy=policy, train=False)
    b = f(*sharding.shard(params, state, batch, mesh), None)
    for ia, ib in zip(a.expert_index, b.expert_index):
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
    np.testing.assert_allclose(float(b.loss), float(a.loss), rtol=1e-5)


def test_experts_that_do_not_split_over_the_expert_axis_are_an_error(setup):
    _, batch = setup
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:3]).reshape(1, 3), (sharding.DATA, sharding.EXPERT))
    params, state = init(jax.random.PRNGKey(0), CFG, get_policy("fp32"))  # 8 experts over 3 devices
    f = sharding.make_sharded_apply(mesh, cfg=CFG, policy=get_policy("fp32"), train=False)
    with pytest.raises(UserError, match="8 experts do not split over mesh axis expert of 3 devices"):
        f(params, state, batch, None)
