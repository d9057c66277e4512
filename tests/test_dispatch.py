"""The sorted (grouped-GEMM) dispatch computes what the dense one-hot dispatch computes.

Both take the same routing decision; the sorted one lays kept assignments out expert by expert and runs
only the routed rows. See precision_lab/model/dispatch.py for what may differ (float32 re-association in
matmuls and weight gradients) and what may not (routing, drops, which values are rounded to which format).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precision_lab import ops, router
from precision_lab.errors import UserError
from precision_lab.model import apply, dispatch, get_model_config, init, sharding
from precision_lab.policy import get_policy

from test_model import make_batch

TINY = get_model_config("tiny")


@functools.lru_cache(maxsize=None)
def _loss_and_grads(cfg, policy_name):
    policy = get_policy(policy_name)
    params, state = init(jax.random.PRNGKey(0), cfg, policy)

    def loss(p):
        out = apply(p, state, make_batch(), cfg=cfg, policy=policy, train=True, key=jax.random.PRNGKey(1))
        return out.loss, out.expert_index

    (value, experts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, experts, grads


SMALL = dataclasses.replace(TINY, num_encoder_layers=1, num_decoder_layers=1, moe_every=1,
                            train_capacity_factor=0.5)  # every block sparse, and tokens dropped


def _check_sorted_matches_dense(routing, policy, blocks):
    base = dataclasses.replace(SMALL, routing=routing)
    dense = _loss_and_grads(dataclasses.replace(base, expert_dispatch="dense"), policy)
    for block in blocks:
        got = _loss_and_grads(dataclasses.replace(base, expert_dispatch="sorted", expert_block_size=block), policy)
        # The same loss up to float32 re-association: XLA:CPU may pick another matmul kernel (and order of
        # the K sum) for [blocks, rows, K] than for [E, G, C, K] operands.
        np.testing.assert_allclose(float(got[0]), float(dense[0]), rtol=1e-6)
        for a, b in zip(got[1], dense[1]):
            np.testing.assert_array_equal(a, b)  # the same routing
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(got[2]), jax.tree.leaves(got[2]),
                              jax.tree.leaves(dense[2])):
            scale = float(jnp.max(jnp.abs(b))) or 1.0
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.parametrize("routing, policy, blocks", [("top1", "fp32", (4, 32)), ("top2", "bf16", (8,)),
                                                     ("top2", "fp8-hybrid", (8,))])
def test_sorted_matches_dense(routing, policy, blocks):
    _check_sorted_matches_dense(routing, policy, blocks)


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["top1", "top2"])
@pytest.mark.parametrize("policy", ["fp32", "bf16", "fp8-hybrid", "mxfp8", "st-moe"])
def test_sorted_matches_dense_all_policies(routing, policy):
    _check_sorted_matches_dense(routing, policy, (4, 32))


def _routing(expert_index, kept, num_experts, capacity):
    """A Routing with slots numbered as router.route numbers them (kept requests first-come)."""
    g, s, k = expert_index.shape
    slot = np.full(expert_index.shape, -1)
    for gi in range(g):
        count = np.zeros(num_experts, int)
        for ki in range(k):
            for si in range(s):
                if kept[gi, si, ki]:
                    slot[gi, si, ki] = count[expert_index[gi, si, ki]]
                    count[expert_index[gi, si, ki]] += 1
    assert (slot < capacity).all()
    zeros = jnp.zeros((g, s, num_experts, capacity), jnp.float32)
    return router.Routing(zeros, zeros, jnp.asarray(expert_index, jnp.int32), jnp.asarray(kept), jnp.asarray(kept),
                          jnp.asarray(slot, jnp.int32), jnp.where(jnp.asarray(kept), jnp.float32(0.5), jnp.float32(0)))


@settings(max_examples=40)  # each example traces the layout eagerly (~0.3 s)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 2), st.integers(1, 5), st.sampled_from([1, 2, 4]),
       st.integers(0, 2**31 - 1))
def test_sorted_layout_places_every_kept_request_once(groups, tokens, k, num_experts, block, seed):
    rng = np.random.default_rng(seed)
    k = min(k, num_experts)
    expert_index = np.stack([rng.permutation(num_experts)[:k] for _ in range(groups * tokens)]).reshape(groups, tokens, k)
    capacity = int(rng.integers(1, tokens * k + 1))
    kept = rng.random(expert_index.shape) < 0.8
    for gi in range(groups):  # drop what would exceed capacity, in route's priority order
        count = np.zeros(num_experts, int)
        for ki in range(k):
            for si in range(tokens):
                if kept[gi, si, ki]:
                    kept[gi, si, ki] = count[expert_index[gi, si, ki]] < capacity
                    count[expert_index[gi, si, ki]] += kept[gi, si, ki]
    layout = dispatch.sorted_layout(_routing(expert_index, kept, num_experts, capacity), num_experts, capacity, block)
    rows, block_expert, request_row = (np.asarray(a) for a in layout)
    num_rows = dispatch.buffer_rows(groups * tokens, k, num_experts, capacity, groups, block)
    assert rows.shape == (num_rows,) and num_rows % block == 0 and block_expert.shape == (num_rows // block,)
    flat_expert, flat_kept = expert_index.reshape(groups * tokens, k), kept.reshape(groups * tokens, k)
    assert (request_row[~flat_kept] == num_rows).all()
    placed = request_row[flat_kept]
    assert len(set(placed.tolist())) == placed.size  # one row per kept request
    token = np.repeat(np.arange(groups * tokens)[:, None], k, axis=1)
    np.testing.assert_array_equal(rows[placed], token[flat_kept])  # the row holds its token
    assert (rows[np.setdiff1d(np.arange(num_rows), placed)] == groups * tokens).all()  # the rest is empty
    np.testing.assert_array_equal(block_expert[placed // block], flat_expert[flat_kept])  # the right matrices
    assert (np.diff(block_expert) >= 0).all()  # experts in order, each a contiguous run of blocks


def test_gather_rows_rounds_like_the_one_hot_matmul(rng):
    """gather_rows == dot(onehot, x) with the same specs, forward and backward, bit for bit (bf16)."""
    policy = get_policy("bf16")
    x = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
    rows = jnp.asarray([3, 6, 0, 3, 5, 6, 1], jnp.int32)  # 6 = an empty row; row 3 gathered twice
    onehot = jax.nn.one_hot(rows, 6, dtype=jnp.float32)  # (7, 6), all zero for row 6
    cot = jnp.asarray(rng.standard_normal((7, 8)), jnp.float32)
    f_rows = lambda x_: ops.gather_rows(x_, rows, policy, lhs="activations", out="comm")
    # tokens are the lhs, as in the dense dispatch einsum (whose lhs gradient is rounded to matmul_out)
    f_dot = lambda x_: ops.dot("td,rt->rd", x_, onehot, policy, lhs="activations", rhs="activations", out="comm")
    y_rows, vjp_rows = jax.vjp(f_rows, x)
    y_dot, vjp_dot = jax.vjp(f_dot, x)
    np.testing.assert_array_equal(y_rows, y_dot)
    np.testing.assert_array_equal(vjp_rows(cot)[0], vjp_dot(cot)[0])
    assert not np.array_equal(vjp_rows(cot)[0], jnp.zeros_like(x))


def test_grouped_dot_is_a_dot_per_block(rng):
    policy = get_policy("bf16")
    x = jnp.asarray(rng.standard_normal((5, 4, 8)), jnp.float32)  # 5 blocks of 4 rows
    w = jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32)  # 3 experts
    group = jnp.asarray([0, 0, 2, 2, 2], jnp.int32)  # expert 1 has no block
    y, vjp = jax.vjp(lambda x_, w_: ops.grouped_dot(x_, w_, group, policy, lhs="expert_operands",
                                                     rhs="expert_operands"), x, w)
    for b in range(5):
        ref = ops.dot("mk,kn->mn", x[b], w[group[b]], policy, lhs="expert_operands", rhs="expert_operands")
        np.testing.assert_array_equal(y[b], ref)
    cot = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx, dw = vjp(cot)
    q = lambda v, c: ops.cast(v, policy, c)
    dx_ref = q(jnp.einsum("bmn,bkn->bmk", q(cot, "grads"), q(w, "expert_operands")[group]), "matmul_out")
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6)
    dw_ref = np.zeros(w.shape, np.float32)
    for b in range(5):
        dw_ref[group[b]] += np.asarray(q(x[b], "expert_operands")).T @ np.asarray(q(cot[b], "grads"))
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(dw[1]))  # an expert without tokens gets no gradient


def test_dispatch_config_is_checked():
    with pytest.raises(UserError, match="expert_dispatch"):
        dataclasses.replace(TINY, expert_dispatch="ragged")
    with pytest.raises(UserError, match="expert_block_size"):
        dataclasses.replace(TINY, expert_block_size=0)
    with pytest.raises(UserError, match="expert_dispatch='dense'"):
        sharding.make_sharded_apply(sharding.make_mesh(1, 1), cfg=TINY, policy=get_policy("fp32"), train=False)
