"""Router math: losses against their formulas and provable bounds, capacity and priority rules, BPR, GShard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from precision_lab import ops, router
from precision_lab.policy import get_policy

FP32 = get_policy("fp32")
_finite = st.floats(-30.0, 30.0, width=32, allow_nan=False, allow_infinity=False)


# A few fixed shapes: every new shape recompiles each jax op, which would dominate the test time.
SHAPES = [(1, 5, 3), (2, 16, 8), (1, 24, 2)]


def logits_arrays():
    """<float32>[G, S, E] logits (hypothesis shrinks values, not shapes)."""
    return st.sampled_from(SHAPES).flatmap(lambda s: hnp.arrays(np.float32, s, elements=_finite))


def _np_lse(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _softmax(x):
    return jax.nn.softmax(jnp.asarray(x), axis=-1)


# -- z-loss ---------------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(logits_arrays())
def test_z_loss_is_mean_squared_logsumexp(x):
    expected = np.mean(_np_lse(x) ** 2)
    got = float(router.z_loss(jnp.asarray(x)))
    assert got >= 0.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=40)
@given(logits_arrays(), st.floats(0.0, 20.0, width=32), st.floats(0.0, 20.0, width=32))
def test_z_loss_grows_with_shift_once_logsumexp_is_nonnegative(x, c1, c2):
    """lse(x + c) = lse(x) + c, so each token's (lse + c)^2 increases in c wherever lse + c >= 0. Claim: if
    every token has lse(x) + c1 >= 0 and c2 >= c1, then z(x + c2) >= z(x + c1) (up to float32 roundoff)."""
    lo, hi = sorted((c1, c2))
    lo = max(lo, float(-_np_lse(x).min()))  # shift far enough that every logsumexp is >= 0
    hi = max(hi, lo)
    z_lo = float(router.z_loss(jnp.asarray(x) + jnp.float32(lo)))
    z_hi = float(router.z_loss(jnp.asarray(x) + jnp.float32(hi)))
    assert z_hi >= z_lo * (1 - 1e-5) - 1e-5


def test_z_loss_masks_padding():
    x = jnp.asarray([[[1.0, 2.0], [50.0, 0.0]]], jnp.float32)
    only_first = router.z_loss(x, token_mask=jnp.asarray([[1.0, 0.0]], jnp.float32))
    np.testing.assert_allclose(float(only_first), _np_lse(np.asarray(x)[0, :1]) ** 2, rtol=1e-6)


# -- load balancing ----------------------------------------------------------------------------------------------


def _top1_mask(probs):
    return router.expert_choice_mask(jax.lax.top_k(probs, 1)[1], probs.shape[-1], "top1")


@settings(max_examples=40)
@given(logits_arrays())
def test_load_balance_is_one_under_uniform_probabilities(x):
    """P_i = 1/N makes L = N * sum_i f_i / N = 1 whatever the assignment."""
    probs = jnp.full(x.shape, 1.0 / x.shape[-1], jnp.float32)
    loss = router.load_balancing_loss(probs, _top1_mask(_softmax(x)))
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-5)


@settings(max_examples=40)
@given(logits_arrays())
def test_load_balance_at_least_one_when_probs_equal_load(x):
    """With P_i = f_i: L = N sum f_i^2 >= N (sum f_i)^2 / N = 1 (Cauchy-Schwarz), = 1 iff f is uniform."""
    mask = _top1_mask(_softmax(x))
    loss = float(router.load_balancing_loss(mask, mask))
    assert loss >= 1.0 - 1e-5


@settings(max_examples=40)
@given(logits_arrays())
def test_load_balance_lower_bound_with_soft_probs(x):
    """The true bound for f = top-1 fractions and P = the same softmax: each token's chosen probability is its
    largest, so P_i >= f_i * (mean chosen prob) >= f_i / N, hence L >= sum_i f_i^2 >= 1/N. (L >= 1 is false:
    see the pinned counterexample below.)"""
    probs = _softmax(x)
    mask = _top1_mask(probs)
    loss = router.load_balancing_loss(probs, mask)  # mean over groups of N sum f P
    f = jnp.mean(mask, axis=-2)
    bound = jnp.mean(jnp.sum(f * f, axis=-1))
    assert float(loss) >= float(bound) * (1 - 1e-5) - 1e-6 >= 1.0 / x.shape[-1] - 1e-5


def test_load_balance_below_one_counterexample():
    """Pinned: two tokens pick experts 0 and 1, but both put almost half their mass on expert 2.
    f = (1/2, 1/2, 0), P = (1/4, 1/4, 1/2 - d): L = 3 * (1/8 + 1/8) = 0.75 < 1."""
    probs = jnp.asarray([[[0.5, 0.0, 0.499], [0.0, 0.5, 0.499]]], jnp.float32)
    mask = _top1_mask(probs)
    np.testing.assert_array_equal(np.asarray(mask[0]), [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(float(router.load_balancing_loss(probs, mask)), 0.75, rtol=1e-3)


def test_load_balance_topk_mask_uniform_is_k():
    probs = jnp.full((1, 4, 4), 0.25, jnp.float32)
    idx = jnp.asarray([[[0, 1], [1, 2], [2, 3], [3, 0]]], jnp.int32)
    loss = router.load_balancing_loss(probs, router.expert_choice_mask(idx, 4, "topk"))
    np.testing.assert_allclose(float(loss), 2.0, rtol=1e-6)


# -- capacity and priority ------------------------------------------------------------------------------------------


def test_capacity_formula_rounds_with_floor():
    assert router.expert_capacity(256, 8, 1.25) == 40
    assert router.expert_capacity(10, 8, 1.25) == 4  # floor
    assert router.expert_capacity(20, 8, 1.0) == 4  # round(2.5) = 2 (half to even) -> floor 4
    assert router.expert_capacity(20, 8, 1.0, min_capacity=0) == 2
    assert router.num_groups(1024, 256) == 4
    assert router.num_groups(100, 256) == 1
    assert router.num_groups(224, 64) == 4  # 3 does not divide 224


@pytest.mark.parametrize("tokens, groups", [(300, 2), (384, 2), (448, 2), (256, 1), (257, 257), (520, 4)])
def test_num_groups_never_exceeds_group_size(tokens, groups):
    """flaxformer's `_num_groups`: the fewest groups of at most group_size tokens that split the tokens
    evenly (the old floor gave ONE group of 448 tokens); capacity follows from the real group size."""
    g = router.num_groups(tokens, 256)
    assert g == groups
    assert tokens % g == 0 and tokens // g <= 256
    assert all(tokens % h or tokens // h > 256 for h in range(1, g))  # no fewer groups would do
    assert router.expert_capacity(tokens // g, 8, 1.25) == max(round(1.25 * (tokens // g) / 8), 4)


@settings(max_examples=25)
@given(logits_arrays(), st.integers(1, 3), st.integers(1, 6), st.booleans())
def test_no_expert_exceeds_capacity_and_first_choices_win(x, k, capacity, bpr):
    num_experts = x.shape[-1]
    k = min(k, num_experts)
    probs = _softmax(x)
    r = router.route(probs, FP32, routing="topk", k=k, capacity=capacity, batch_prioritized=bpr)
    dispatch = np.asarray(r.dispatch)  # (G, S, E, C)
    assert dispatch.sum(axis=1).max() <= 1  # each slot holds at most one token
    assert (dispatch.sum(axis=(1, 3)) <= capacity).all()  # no expert over capacity
    assert (dispatch.sum(axis=(2, 3)) <= k).all()
    kept, idx = np.asarray(r.kept), np.asarray(r.expert_index)
    np.testing.assert_array_equal(dispatch.sum(axis=(2, 3)), kept.sum(-1))
    for g in range(idx.shape[0]):
        for e in range(num_experts):
            firsts = idx[g, :, 0] == e
            # all first choices of e are placed before any later choice: min(#first, C) of them are kept
            assert kept[g, firsts, 0].sum() == min(firsts.sum(), capacity)
            later = (idx[g, :, 1:] == e) & kept[g, :, 1:]
            if later.any():
                assert kept[g, firsts, 0].all()


def test_group_order_priority_and_bpr():
    """All four tokens want expert 0, capacity 2: in group order tokens 0, 1 win; with BPR the two with the
    highest top-1 probability (tokens 3 and 2) win."""
    p = jnp.asarray([[[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]]], jnp.float32)
    plain = router.route(p, FP32, routing="top1", k=1, capacity=2)
    np.testing.assert_array_equal(np.asarray(plain.kept[0, :, 0]), [True, True, False, False])
    bpr = router.route(p, FP32, routing="top1", k=1, capacity=2, batch_prioritized=True)
    np.testing.assert_array_equal(np.asarray(bpr.kept[0, :, 0]), [False, False, True, True])
    # combine weights are the raw gates of the kept tokens
    np.testing.assert_allclose(np.asarray(bpr.combine[0].sum(axis=(1, 2))), [0, 0, 0.8, 0.9], rtol=1e-6)


def test_bpr_with_gshard_sorts_on_the_raw_top1_probability():
    """Regression: under top2-gshard BPR sorted on the renormalised first gate p1 / (p1 + p2). Token 0 has
    raw top-1 probability 0.4 (renormalised 0.4 / 0.65 = 0.62), token 1 has 0.5 (renormalised 0.53): one
    slot for expert 0 goes to token 1, the higher raw probability."""
    p = jnp.asarray([[[0.4, 0.1, 0.25, 0.25], [0.5, 0.45, 0.05, 0.0]]], jnp.float32)
    bpr = router.route(p, FP32, routing="top2-gshard", k=2, capacity=1, batch_prioritized=True)
    np.testing.assert_array_equal(np.asarray(bpr.kept[0, :, 0]), [False, True])
    plain = router.route(p, FP32, routing="top2-gshard", k=2, capacity=1)
    np.testing.assert_array_equal(np.asarray(plain.kept[0, :, 0]), [True, False])  # group order


def test_padding_takes_no_capacity():
    p = jnp.asarray([[[0.9, 0.1]] * 4], jnp.float32)
    mask = jnp.asarray([[0.0, 0.0, 1.0, 1.0]], jnp.float32)
    r = router.route(p, FP32, routing="top1", k=1, capacity=2, token_mask=mask)
    np.testing.assert_array_equal(np.asarray(r.kept[0, :, 0]), [False, False, True, True])


def test_gshard_renormalises_and_thresholds():
    p = jnp.asarray([[[0.6, 0.3, 0.1], [0.8, 0.05, 0.15]]], jnp.float32)
    r = router.route(p, FP32, routing="top2-gshard", k=2, capacity=4, gshard_threshold=0.2)
    gates = np.asarray(r.combine[0].sum(axis=-1))  # (S, E)
    np.testing.assert_allclose(gates[0], [0.6 / 0.9, 0.3 / 0.9, 0.0], rtol=1e-6)  # 1/3 >= 0.2: second kept
    np.testing.assert_allclose(gates[1], [0.8 / 0.95, 0.0, 0.0], rtol=1e-6)  # 0.158 < 0.2: dropped at eval
    # in training the second expert is kept with probability min(1, gate2 / threshold) = 0.789 for token 1
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    kept = jax.vmap(lambda kk: router.route(p, FP32, routing="top2-gshard", k=2, capacity=4, key=kk).kept)(keys)
    rate = float(jnp.mean(jnp.where(kept[:, 0, 1, 1], 1.0, 0.0)))
    assert abs(rate - (0.15 / 0.95) / 0.2) < 0.04
    assert bool(jnp.all(kept[:, 0, 0, 1]))  # gate2 1/3 > threshold: always


def test_normalize_gates_divides_the_selected_probabilities_by_their_sum():
    """router_normalize_gates (Mixtral's top-2): combine weights p_i / (p1 + p2), both experts always asked;
    off (ST-MoE's default), the raw probabilities, summing to 0.9 and 0.95 here."""
    p = jnp.asarray([[[0.6, 0.3, 0.1], [0.8, 0.05, 0.15]]], jnp.float32)
    norm = np.asarray(router.route(p, FP32, routing="top2", k=2, capacity=4, normalize_gates=True).combine[0].sum(-1))
    np.testing.assert_allclose(norm[0], [0.6 / 0.9, 0.3 / 0.9, 0.0], rtol=1e-6)
    np.testing.assert_allclose(norm[1], [0.8 / 0.95, 0.0, 0.15 / 0.95], rtol=1e-6)
    raw = np.asarray(router.route(p, FP32, routing="top2", k=2, capacity=4).combine[0].sum(-1))
    np.testing.assert_allclose(raw, [[0.6, 0.3, 0.0], [0.8, 0.0, 0.15]], rtol=1e-6)


def test_shadow_router_agrees_under_fp32_and_flips_under_bf16():
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (2, 512, 32), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(4), (32, 16), jnp.float32) * jnp.float32(0.02)
    for name, expect_zero in (("fp32", True), ("router=bf16", False)):
        pol = get_policy(name)
        idx = router.top_k(router.router_probs(router.router_logits(x, w, pol), pol), 2)[1]
        rate = float(router.flip_rate(idx, router.shadow_expert_index(x, w, k=2)))
        assert (rate == 0.0) == expect_zero, (name, rate)
        assert rate < 0.2


def test_jitter_range():
    x = jnp.ones((1, 1000, 4), jnp.float32)
    y = router.jitter(x, 0.01, jax.random.PRNGKey(0))
    assert 0.99 <= float(y.min()) < 0.991 and 1.009 < float(y.max()) <= 1.01
    assert router.jitter(x, 0.0, None) is x


@pytest.mark.parametrize("shift", [True, False])
def test_softmax_shift_switch_same_in_fp32(shift):
    x = jnp.asarray([[[1.0, 2.0, 3.0]]], jnp.float32)
    np.testing.assert_allclose(np.asarray(router.router_probs(x, FP32, shift=shift)), np.asarray(_softmax(x)),
                               rtol=1e-6)


@pytest.mark.parametrize("preset", ["bf16-selective", "st-moe", "fp8-hybrid"])
def test_float32_router_backward_rounds_nothing(preset):
    """Regression: a "float32 router" had a float32 forward only: its incoming gradient was rounded to
    `grads` (bf16; e5m2 under fp8-hybrid) and its input gradient to `matmul_out`. Now `router_grads` governs
    both: given the same upstream cotangent (on the router probabilities), router dW and the router input
    gradient equal the fp32 policy's bit for bit; under plain bf16 they do not."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 8)) * 0.3, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 16, 8)) * 1e-2, jnp.float32)

    def backward(policy):
        state = ops.init_dot_state(policy, lhs="router_input", rhs="router_weights", grads="router_grads")
        f = lambda x_, w_: router.router_probs(router.router_logits(x_, w_, policy, state=state), policy)  # noqa: E731
        return jax.jit(lambda: jax.vjp(f, x, w)[1](cot))()

    dx32, dw32 = backward(get_policy("fp32"))
    dx, dw = backward(get_policy(preset))
    np.testing.assert_array_equal(dw, dw32)
    np.testing.assert_array_equal(dx, dx32)
    dx16, dw16 = backward(get_policy("bf16"))
    assert not np.array_equal(dw16, dw32) and not np.array_equal(dx16, dx32)
