"""Precision-aware ops: emulate mode against an op-by-op numpy + ml_dtypes reference, native mode's
measured excess precision under jit, gradients under fp8-hybrid, delayed-scaling state via the VJP."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from precision_lab import ops
from precision_lab.formats import get_format
from precision_lab.policy import PRESETS, parse_policy
from precision_lab.rounding import quantize

BF16 = ml_dtypes.bfloat16
EMU = parse_policy("default=bf16")
NATIVE = parse_policy("default=bf16,mode=native")


def r(x):
    """Round to bf16 (numpy + ml_dtypes), kept as float32."""
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def xla_exp(x):
    """The elementary function as XLA:CPU computes it in float32 (numpy's exp may differ in the last bit,
    which is not what these tests are about)."""
    return np.asarray(jax.jit(jnp.exp)(jnp.asarray(x, jnp.float32)))


def xla_f32(fn, x):
    return np.asarray(jax.jit(fn)(jnp.asarray(x, jnp.float32)))


@pytest.fixture
def logits():
    return (np.random.default_rng(0).standard_normal((512, 16)) * 6).astype(np.float32)


def same(a, b):
    np.testing.assert_array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("shift", [True, False])
def test_softmax_matches_op_by_op_reference(logits, shift):
    x = r(logits)
    if shift:
        x = r(x - x.max(-1, keepdims=True))
    e = r(xla_exp(x))
    s = r(e.sum(-1, keepdims=True, dtype=np.float32))
    ref = r(e / s)
    same(jax.jit(lambda v: ops.softmax(v, EMU, "router_softmax", shift=shift))(logits), ref)


def test_logsumexp_exp_sum_mean_match_reference(logits):
    x = r(logits)
    m = x.max(-1, keepdims=True)
    e = r(xla_exp(r(x - m)))
    ref = r(r(xla_f32(jnp.log, r(e.sum(-1, keepdims=True, dtype=np.float32)))) + m)[:, 0]
    same(jax.jit(lambda v: ops.logsumexp(v, EMU, "router_softmax"))(logits), ref)
    same(jax.jit(lambda v: ops.exp(v, EMU, "attn_softmax"))(logits / 4), r(xla_exp(r(logits / 4))))
    same(ops.sum(logits, EMU, "activations", axis=0), r(x.sum(0, dtype=np.float32)))
    same(ops.mean(logits, EMU, "activations", axis=1), r(r(x.sum(1, dtype=np.float32)) / np.float32(16)))


def test_rms_norm_matches_reference(logits):
    scale = np.linspace(0.5, 1.5, 16).astype(np.float32)
    x = r(logits)
    ms = r(r(r(x * x).sum(-1, keepdims=True, dtype=np.float32)) / np.float32(16))
    rs = r(xla_f32(jax.lax.rsqrt, r(ms + np.float32(1e-6))))
    ref = r(r(x * rs) * r(scale))
    same(jax.jit(lambda v: ops.rms_norm(v, scale, EMU))(logits), ref)
    same(ops.rms_norm(logits, None, EMU), r(x * rs))


def test_dot_rounds_operands_accumulates_f32_rounds_output():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 96)).astype(np.float32)
    b = rng.standard_normal((96, 32)).astype(np.float32)
    y = np.asarray(jax.jit(lambda a, b: ops.dot("ik,kj->ij", a, b, EMU, lhs="ffn_operands", rhs="ffn_operands"))(a, b))
    exact = r(a).astype(np.float64) @ r(b).astype(np.float64)  # the products of bf16 values are exact in f32
    same(y, r(y))  # the output is bf16
    # float32 accumulation order may differ from float64's in the last float32 bit; after rounding to bf16
    # that can only move a value that sits on a bf16 midpoint: at most one bf16 ulp, rarely.
    ref = r(exact.astype(np.float32))
    ulp = get_format("bf16").ulp(ref)
    assert (np.abs(y - ref) <= ulp).all() and (y == ref).mean() > 0.99
    tpu = PRESETS["tpu-default"]  # operands bf16, output float32
    yt = np.asarray(ops.dot("ik,kj->ij", a, b, tpu, lhs="ffn_operands", rhs="ffn_operands"))
    np.testing.assert_allclose(yt, exact, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(yt, r(yt))


def test_native_mode_measurably_differs_under_jit(logits):
    """XLA removes float32->bf16->float32 convert pairs under jit (excess precision): native mode skips
    roundings that emulate mode performs. Eagerly (no fusion) the two modes agree bit for bit."""
    fn = lambda p: jax.jit(lambda v: ops.softmax(v, p, "router_softmax"))  # noqa: E731
    emulated, native_jit = np.asarray(fn(EMU)(logits)), np.asarray(fn(NATIVE)(logits))
    native_eager = np.asarray(ops.softmax(logits, NATIVE, "router_softmax"))
    same(native_eager, emulated)
    differ = (native_jit != emulated).mean()
    assert differ > 0.5, differ  # measured: 100% of the probabilities differ
    exact = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    # the skipped roundings make native mode *more* accurate than the format it claims to simulate
    assert np.abs(native_jit - exact).mean() < 0.5 * np.abs(emulated - exact).mean()
    same(emulated, r(emulated))


def test_fp8_hybrid_gradients_are_e5m2_after_scaling():
    """The incoming gradient of every matmul is rounded to e5m2 with delayed scaling: with b = I the input
    gradient is exactly that rounded gradient (in bf16), so g * scale must be an e5m2 value."""
    # matmul outputs in float32 so that the rounded gradient is observed without the bf16 output rounding
    p = PRESETS["fp8-hybrid"].replace(matmul_out="fp32")
    state = ops.init_dot_state(p, lhs="ffn_operands", rhs="ffn_operands", history=4)
    a = jnp.asarray(np.random.default_rng(2).standard_normal((8, 16)), jnp.float32)
    eye = jnp.eye(16, dtype=jnp.float32)
    g = jnp.asarray(np.random.default_rng(3).standard_normal((8, 16)) * 7, jnp.float32)
    e5m2 = get_format("fp8_e5m2")

    def input_grad(state):
        _, vjp = jax.vjp(lambda a_, s_: ops.dot("ik,kj->ij", a_, eye, p, lhs="ffn_operands", rhs="ffn_operands",
                                                  state=s_), a, state)
        return vjp(g)

    da, new_state = input_grad(state)  # first step: empty history, scale 1
    same(da, quantize(da, e5m2))
    assert float(new_state.grad.amax_history[0]) == float(jnp.max(jnp.abs(g)))
    da2, _ = input_grad(new_state)  # second step: scale = 57344 / amax(g)
    scale = e5m2.max / float(jnp.max(jnp.abs(g)))
    scaled = np.asarray(da2, np.float64) * scale
    back = np.asarray(quantize(jnp.asarray(scaled, jnp.float32), e5m2), np.float64)
    np.testing.assert_allclose(scaled, back, rtol=2e-6)  # e5m2 values up to float32 dequantization
    assert np.abs(back).max() <= e5m2.max and not np.array_equal(da2, da)


def test_delayed_state_comes_back_as_the_gradient():
    p = parse_policy("experts=fp8_e4m3fn:delayed:saturate,grads=fp8_e5m2:delayed")
    state = ops.init_dot_state(p, lhs="expert_operands", rhs="expert_operands", history=3)
    a = jnp.full((4, 8), 3.0, jnp.float32)
    w = jnp.full((8, 2), 0.5, jnp.float32)
    f = lambda a, w, s: jnp.sum(ops.dot("ik,kj->ij", a, w, p, lhs="expert_operands", rhs="expert_operands", state=s))  # noqa: E731
    _, _, new = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(a, w, state)
    np.testing.assert_array_equal(new.lhs.amax_history, [3.0, 0, 0])
    np.testing.assert_array_equal(new.rhs.amax_history, [0.5, 0, 0])
    np.testing.assert_array_equal(new.grad.amax_history, [1.0, 0, 0])
    assert ops.init_dot_state(PRESETS["st-moe"], lhs="expert_operands", rhs="expert_operands") is None


def test_footnote_example():
    """ST-MoE footnote: ten logits of 128 and one of 128.5: 0.142 exact, 0.091 after bf16 rounding."""
    x = jnp.array([128.0] * 10 + [128.5], jnp.float32)
    assert float(ops.softmax(x, PRESETS["fp32"], "router_softmax")[-1]) == pytest.approx(0.142, abs=5e-4)
    assert float(ops.softmax(x, PRESETS["bf16"], "router_softmax")[-1]) == pytest.approx(0.091, abs=5e-4)
    assert float(ops.softmax(x, PRESETS["bf16-selective"], "router_softmax")[-1]) == pytest.approx(0.142, abs=5e-4)


def test_gradients_flow_through_every_op(logits):
    x = jnp.asarray(logits[:8])
    for fn in (lambda v: ops.softmax(v, EMU, "router_softmax")[:, 0], lambda v: ops.logsumexp(v, EMU, "router_softmax"),
               lambda v: ops.rms_norm(v, None, EMU)[:, 0], lambda v: ops.exp(v / 8, EMU, "attn_softmax")[:, 0]):
        g = jax.grad(lambda v: jnp.sum(fn(v)))(x)
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_skipped_roundings_are_noops_and_happen():
    """A value rounded to a spec is not rounded to an equal spec again (ops' "skipping roundings"): the
    result is bit-identical to rounding again, and the skip really happens (fewer roundings in the HLO)."""
    x = jnp.asarray((np.random.default_rng(1).standard_normal((64, 32)) * 3).astype(np.float32))
    w = jnp.asarray((np.random.default_rng(2).standard_normal((32, 32)) * 0.2).astype(np.float32))

    def chain(x, w):
        h = ops.dot("ij,jk->ik", x, w, EMU, lhs="attn_operands", rhs="attn_operands")  # rounded (matmul_out)
        h = ops.exact(jax.nn.relu(h), like=h)
        h = ops.cast(h, EMU, "activations")  # already bf16: skipped
        return ops.dot("ij,jk->ik", h, w, EMU, lhs="attn_operands", rhs="attn_operands")  # lhs skipped

    def reference(x, w):  # every rounding explicit, in numpy + ml_dtypes
        xn, wn = np.asarray(x), np.asarray(w)
        h = r(r(r(xn) @ r(wn)))
        h = r(np.maximum(h, 0))
        return r(r(h) @ r(wn))

    out = np.asarray(jax.jit(chain)(x, w))
    same(out, reference(x, w))
    grads = jax.jit(jax.grad(lambda x, w: chain(x, w).sum(), argnums=(0, 1)))(x, w)
    orig = ops._already
    try:
        ops._already = lambda *a: False  # the same chain with every rounding performed
        grads_all = jax.jit(jax.grad(lambda x, w: chain(x, w).sum(), argnums=(0, 1)))(x, w)
        n_all = jax.jit(lambda *a: chain(*a)).lower(x, w).as_text().count("bitcast_convert")  # fresh trace
    finally:
        ops._already = orig
    n_skip = jax.jit(lambda *a: chain(*a)).lower(x, w).as_text().count("bitcast_convert")
    for a, b in zip(grads, grads_all):
        same(a, b)
    assert n_skip < n_all


@pytest.mark.parametrize("policy", ["bf16", "fp8-hybrid", "st-moe"])
def test_skipped_roundings_change_no_bit_of_a_train_step(policy):
    """The whole model: loss and every gradient bit-identical with and without skipping no-op roundings."""
    from precision_lab import model as stmoe
    from precision_lab.model.config import get_model_config

    pol = PRESETS[policy]
    cfg = get_model_config("tiny")
    params, state = stmoe.init(jax.random.key(0), cfg, pol)
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(2, 512, (4, 32)), jnp.int32),
             "decoder_inputs": jnp.asarray(rng.integers(0, 512, (4, 8)), jnp.int32),
             "targets": jnp.asarray(rng.integers(2, 512, (4, 8)), jnp.int32),
             "loss_mask": jnp.ones((4, 8), jnp.float32)}

    def loss(p, s):
        return stmoe.apply(p, s, batch, cfg=cfg, policy=pol, train=True, key=jax.random.key(1)).loss

    def run():
        return jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1)))(params, state)  # fresh trace

    fast = run()
    orig = ops._already
    try:
        ops._already = lambda *a: False
        slow = run()
    finally:
        ops._already = orig
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


# -- backward pass: both operand gradients, MX blocks per product, stochastic keys -----------------------------


def test_dot_rounds_both_operand_gradients_of_activation_products():
    """Regression: only the lhs gradient of `dot` was rounded to matmul_out, so for QK^T and PV (both operands
    activations) the rhs gradient stayed float32. With rhs_grad="matmul_out" both are bf16 values; a weight
    (rhs_grad None) keeps its float32 gradient for the trainer to round."""
    rng = np.random.default_rng(4)
    q, k = (jnp.asarray(rng.standard_normal((2, 3, 8, 16)), jnp.float32) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((2, 3, 8, 8)), jnp.float32)

    def grads(rhs_grad):
        f = lambda q_, k_: ops.dot("bhqk,bhtk->bhqt", q_, k_, EMU, lhs="attn_operands", rhs="attn_operands",  # noqa: E731
                                    out="attn_logits", rhs_grad=rhs_grad)
        return jax.vjp(f, q, k)[1](g)

    dq, dk = grads("matmul_out")
    same(dq, r(dq))
    same(dk, r(dk))
    _, dk_weight = grads(None)
    assert not np.array_equal(dk_weight, r(dk_weight))  # float32, not rounded
    same(r(dk_weight), dk)


def _mx(x, fmt, axis):
    from precision_lab.scaling import mx_scaled

    # jitted: op by op, the reference's many small ops each compiled on their own (~3x the test's time)
    return jax.jit(mx_scaled, static_argnums=(1,), static_argnames=("axis",))(jnp.asarray(x, jnp.float32), fmt,
                                                                            axis=axis)


def test_mx_backward_blocks_along_each_products_reduction_axis():
    """OCP MX blocks lie along the reduction axis of each product: forward y = a.b blocks a and b along K;
    dgrad da = g.b^T along N (g and b re-blocked from float32); wgrad db = a^T.g along M (a and g
    re-blocked). Regression: the backward reused the forward's K-blocked operands and N-blocked g."""
    p = parse_policy("attn_operands=fp8_e4m3fn:mx,grads=fp8_e5m2:mx")  # matmul outputs float32
    rng = np.random.default_rng(5)
    wide = lambda *s: (rng.standard_normal(s) * np.exp(2 * rng.standard_normal(s))).astype(np.float32)  # noqa: E731
    a, b, g = wide(64, 96), wide(96, 64), wide(64, 64)  # a [M, K], b [K, N], g [M, N]
    f = lambda a_, b_: ops.dot("mk,kn->mn", a_, b_, p, lhs="attn_operands", rhs="attn_operands")  # noqa: E731
    def forward_and_backward(a_, b_, g_):  # jitted: op by op, each small op would be compiled on its own
        y_, vjp = jax.vjp(f, a_, b_)
        return y_, vjp(g_)

    y, (da, db) = jax.jit(forward_and_backward)(jnp.asarray(a), jnp.asarray(b), jnp.asarray(g))
    e4, e5 = "fp8_e4m3fn", "fp8_e5m2"
    hi = lambda eq, x, z: np.asarray(jnp.einsum(eq, x, z, precision=jax.lax.Precision.HIGHEST))  # noqa: E731
    np.testing.assert_allclose(y, hi("mk,kn->mn", _mx(a, e4, 1), _mx(b, e4, 0)), rtol=1e-5)
    want_da = hi("mn,kn->mk", _mx(g, e5, 1), _mx(b, e4, 1))  # reduction over N: blocks along N
    want_db = hi("mk,mn->kn", _mx(a, e4, 0), _mx(g, e5, 0))  # reduction over M: blocks along M
    np.testing.assert_allclose(da, want_da, rtol=1e-5, atol=1e-6 * np.abs(want_da).max())
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-6 * np.abs(want_db).max())
    # the forward's blocks would have given something else (what the test guards against)
    old_db = hi("mk,mn->kn", _mx(a, e4, 1), _mx(g, e5, 1))
    assert np.abs(old_db - want_db).max() > 1e-3 * np.abs(want_db).max()
    # several token axes are one reduction: [B, L] blocks run along the flattened B*L
    a3, g3 = wide(2, 48, 96), wide(2, 48, 64)
    f3 = lambda a_, b_: ops.dot("blk,kn->bln", a_, b_, p, lhs="attn_operands", rhs="attn_operands")  # noqa: E731
    _, db3 = jax.jit(lambda a_, b_, g_: jax.vjp(f3, a_, b_)[1](g_))(jnp.asarray(a3), jnp.asarray(b), jnp.asarray(g3))
    want_db3 = hi("tk,tn->kn", _mx(a3.reshape(96, 96), e4, 0), _mx(g3.reshape(96, 64), e5, 0))
    np.testing.assert_allclose(db3, want_db3, rtol=1e-5, atol=1e-6 * np.abs(want_db3).max())


def test_stochastic_roundings_in_dot_are_keyed_and_deterministic():
    """Stochastic operands, output and gradients draw their bits from the key of `rounding_keys`: the same
    key gives the same bits, another key other bits; without a key there is a clear error."""
    p = parse_policy("default=fp32,attn_operands=bf16:stochastic,matmul_out=bf16:stochastic,grads=bf16:stochastic")
    rng = np.random.default_rng(6)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((8, 32), (32, 4)))

    @jax.jit
    def grads(key):
        def f(a_, b_):
            with ops.rounding_keys(key):
                return jnp.sum(ops.dot("mk,kn->mn", a_, b_, p, lhs="attn_operands", rhs="attn_operands") ** 2)
        return jax.grad(f, argnums=(0, 1))(a, b)

    one, again, other = grads(jax.random.key(1)), grads(jax.random.key(1)), grads(jax.random.key(2))
    for x, y, z in zip(one, again, other):
        same(x, y)
        assert not np.array_equal(x, z)
    same(one[0], r(one[0]))  # the input gradient is a bf16 value (matmul_out)
    with pytest.raises(ValueError, match="rounding_keys"):
        ops.dot("mk,kn->mn", a, b, p, lhs="attn_operands", rhs="attn_operands")


def test_gelu_is_one_fused_op_rounded_once(logits):
    """GEGLU's gelu is documented as one fused op: the rounded input, gelu_tanh in float32, one rounding of
    the output (not a rounding after each of its elementary ops)."""
    x = logits[:64] / 3
    y = np.asarray(jax.jit(lambda v: ops.gelu(v, EMU, "activations"))(x))
    same(y, r(xla_f32(lambda v: jax.nn.gelu(v, approximate=True), r(x))))
