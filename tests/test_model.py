"""The ST-MoE model: config validation, shapes, causality, dropping, expert permutation, determinism, router
precision isolation, vmap over seeds, end-to-end training on `tiny`, model-info sizes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from precision_lab import router
from precision_lab.errors import UserError
from precision_lab.model import apply, get_model_config, init, moe
from precision_lab.model.info import model_info
from precision_lab.optim import OptimConfig, make_optimizer
from precision_lab.policy import get_policy

FP32 = get_policy("fp32")
TINY = get_model_config("tiny")


def make_batch(seed=0, batch=4, len_in=32, len_out=8, vocab=128):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab, (batch, len_in)).astype(np.int32)
    inputs[0, -5:] = 0  # some encoder padding
    targets = rng.integers(2, vocab, (batch, len_out)).astype(np.int32)
    targets[1, -2:] = 0  # some target padding
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "decoder_inputs": jnp.asarray(dec_in),
            "loss_mask": jnp.asarray((targets != 0).astype(np.float32))}


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg, policy, train, return_logits=False):
    return jax.jit(lambda p, s, b, k: apply(p, s, b, cfg=cfg, policy=policy, train=train, key=k,
                                            return_logits=return_logits))


# -- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    (dict(routing="topk", top_k=3, num_experts=2), "top_k"),
    (dict(moe_every=0), "moe_every"),
    (dict(moe_every=5), "moe_every"),
    (dict(d_kv=None, d_model=66, num_heads=4), "d_model"),
    (dict(routing="top3"), "routing"),
    (dict(routing="randm"), "routing.*random"),
    (dict(ffn_type="swiglu"), "ffn_type"),
    (dict(train_capacity_factor=0.0), "train_capacity_factor"),
    (dict(extra_dense_ffn="middle"), "extra_dense_ffn"),
])
def test_config_validation_names_the_field(change, field):
    with pytest.raises(UserError, match=field) as err:
        dataclasses.replace(TINY, **change)
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(UserError, match="model preset.*closest match: 'st-moe-l'"):
        get_model_config("st-moe-L1")


def test_sparse_layout_is_flaxformer_mixed():
    cfg = get_model_config("st-moe-l")
    assert cfg.sparse_blocks("encoder") == (3, 7, 11, 15, 19, 23)
    assert TINY.moe_layer_names() == ("encoder/1", "decoder/1")


# -- forward -------------------------------------------------------------------------------------------------------


def test_forward_shapes_and_finite():
    params, state = init(jax.random.PRNGKey(0), TINY, FP32)
    out = jitted_apply(TINY, FP32, False, True)(params, state, make_batch(), None)
    assert out.logits.shape == (4, 8, 128) and out.token_ce.shape == (4, 8)
    assert out.router_z_loss.shape == out.load_balancing_loss.shape == (2,)
    assert set(out.router) == set(moe.TELEMETRY) and all(v.shape == (2,) for v in out.router.values())
    assert out.expert_index[0].shape[-1] == 2 and out.expert_index[0].dtype == jnp.int32
    assert np.isfinite(float(out.loss)) and abs(float(out.ce_loss) - np.log(128)) < 1.0
    np.testing.assert_array_equal(np.asarray(out.router["flip_rate"]), 0.0)  # fp32 router == its shadow


@pytest.mark.parametrize("change", [dict(num_experts=0), dict(extra_dense_ffn="before", tie_embeddings=True,
                                                              rmsnorm_scale=False, ffn_type="relu", routing="top1")])
def test_variants_run(change):
    cfg = dataclasses.replace(TINY, **change)
    params, state = init(jax.random.PRNGKey(0), cfg, FP32)
    out = jitted_apply(cfg, FP32, False)(params, state, make_batch(), None)
    assert np.isfinite(float(out.loss))
    assert ("lm_head" in params) != cfg.tie_embeddings


def test_decoder_is_causal():
    """Changing decoder input t leaves the outputs at positions < t unchanged. Top-2 routing is causal only
    when nothing is dropped (a later first choice can outrank an earlier second choice), so evaluation runs
    with a capacity factor large enough to drop nothing; asserted below."""
    cfg = dataclasses.replace(TINY, eval_capacity_factor=20.0)
    params, state = init(jax.random.PRNGKey(1), cfg, FP32)
    batch = make_batch()
    t = 5
    changed = dict(batch, decoder_inputs=batch["decoder_inputs"].at[:, t].set(7))
    f = jitted_apply(cfg, FP32, False)
    a, b = f(params, state, batch, None), f(params, state, changed, None)
    assert float(jnp.max(a.router["dropped_assignment_fraction"])) == 0.0
    np.testing.assert_array_equal(np.asarray(a.token_ce[:, :t]), np.asarray(b.token_ce[:, :t]))
    assert not np.array_equal(np.asarray(a.token_ce[:, t:]), np.asarray(b.token_ce[:, t:]))


def test_jitter_only_in_training_and_seed_determinism():
    cfg = dataclasses.replace(TINY, router_jitter_eps=0.5)
    params, state = init(jax.random.PRNGKey(0), cfg, FP32)
    params2, _ = init(jax.random.PRNGKey(0), cfg, FP32)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
    batch, k1, k2 = make_batch(), jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    ev, tr = jitted_apply(cfg, FP32, False), jitted_apply(cfg, FP32, True)
    assert float(ev(params, state, batch, k1).loss) == float(ev(params, state, batch, k2).loss)
    assert float(tr(params, state, batch, k1).loss) == float(tr(params, state, batch, k1).loss)
    assert float(tr(params, state, batch, k1).loss) != float(tr(params, state, batch, k2).loss)
    with pytest.raises(ValueError, match="PRNG key"):
        apply(params, state, batch, cfg=cfg, policy=FP32, train=True, key=None)


# -- the MoE sublayer ----------------------------------------------------------------------------------------------


def _moe_setup(cfg, seed=0, tokens=64):
    params, state = moe.init_moe(jax.random.PRNGKey(seed), cfg, FP32)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, tokens // 2, cfg.d_model), jnp.float32)
    return params, state, x, jnp.ones((2, tokens // 2), jnp.float32)


def test_dropped_tokens_get_zero_moe_output():
    """With capacity forced to 1 slot per expert most tokens are dropped: their MoE output is exactly 0 (the
    block then passes them through the residual alone); kept tokens get a nonzero output."""
    cfg = dataclasses.replace(TINY, routing="top1", eval_capacity_factor=0.01, min_capacity=1)
    params, state, x, mask = _moe_setup(cfg)
    y, aux = moe.moe_ffn(params, state, x, mask, cfg=cfg, policy=FP32, train=False, prioritized=False)
    g = router.num_groups(64, cfg.group_size)
    logits = router.router_logits(x.reshape(g, -1, cfg.d_model), params["router"], FP32)
    r = router.route(router.router_probs(logits, FP32), FP32, routing="top1", k=1, capacity=1)
    kept = np.asarray(r.kept[..., 0]).reshape(2, -1)
    norms = np.abs(np.asarray(y)).sum(-1)
    assert (~kept).sum() > 0 and kept.sum() > 0
    assert (norms[~kept] == 0).all() and (norms[kept] > 0).all()
    assert float(aux["telemetry"]["dropped_assignment_fraction"]) == pytest.approx((~kept).mean())


def test_telemetry_reports_dropped_tokens_and_dropped_assignments():
    """Top-2 with little capacity: a dropped ASSIGNMENT is one request without a slot; a dropped TOKEN (ST-MoE's
    measure) is one no expert processed, all its assignments dropped, so its MoE output is exactly 0."""
    cfg = dataclasses.replace(TINY, routing="top2", eval_capacity_factor=0.5, min_capacity=1)
    params, state, x, mask = _moe_setup(cfg)
    y, aux = moe.moe_ffn(params, state, x, mask, cfg=cfg, policy=FP32, train=False, prioritized=False)
    g = router.num_groups(64, cfg.group_size)
    logits = router.router_logits(x.reshape(g, -1, cfg.d_model), params["router"], FP32)
    capacity = router.expert_capacity(64 // g, cfg.num_experts, 0.5, 1)
    r = router.route(router.router_probs(logits, FP32), FP32, routing="top2", k=2, capacity=capacity)
    kept = np.asarray(r.kept).reshape(64, 2)
    tokens_dropped = ~kept.any(-1)
    assert 0 < tokens_dropped.mean() < (~kept).mean()  # the two measures differ
    t = aux["telemetry"]
    assert float(t["dropped_assignment_fraction"]) == pytest.approx((~kept).mean())
    assert float(t["dropped_token_fraction"]) == pytest.approx(tokens_dropped.mean())
    assert (np.abs(np.asarray(y)).reshape(64, -1).sum(-1)[tokens_dropped] == 0).all()


def test_permuting_experts_with_router_columns_leaves_output_unchanged():
    cfg = TINY
    params, state, x, mask = _moe_setup(cfg)
    perm = np.random.default_rng(0).permutation(cfg.num_experts)
    permuted = {name: (w[:, perm] if name == "router" else w[perm]) for name, w in params.items()}
    y, aux = moe.moe_ffn(params, state, x, mask, cfg=cfg, policy=FP32, train=False, prioritized=False)
    yp, auxp = moe.moe_ffn(permuted, state, x, mask, cfg=cfg, policy=FP32, train=False, prioritized=False)
    np.testing.assert_allclose(np.asarray(yp), np.asarray(y), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(perm[np.asarray(auxp["expert_index"])], np.asarray(aux["expert_index"]))
    np.testing.assert_allclose(float(auxp["z_loss"]), float(aux["z_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(auxp["load_balancing_loss"]), float(aux["load_balancing_loss"]), rtol=1e-6)


def test_bf16_router_changes_only_router_numerics():
    """Policy "router=bf16" (router input, weights, logits, softmax in bf16; everything else fp32) vs fp32,
    same input and weights, top-1, nothing dropped (checked). For every token both pick the same expert for
    (most tokens; the rest are the flips the telemetry counts), the dispatched expert input and the expert
    output are identical, so the token's output is gate * expert_out(x) with only the gate differing:
    y_bf16 * gate_fp32 == y_fp32 * gate_bf16 up to float32 roundoff of the two products. The bf16 gates are
    bf16 values (combine_weights stays fp32, it only carries them)."""
    cfg = dataclasses.replace(TINY, routing="top1", eval_capacity_factor=8.0)
    params, state, x, mask = _moe_setup(cfg, seed=2)
    bf16_router = get_policy("router=bf16")

    def run(policy):
        y, aux = moe.moe_ffn(params, state, x, mask, cfg=cfg, policy=policy, train=False, prioritized=False)
        logits = router.router_logits(x.reshape(1, -1, cfg.d_model), params["router"], policy)
        gate = jnp.max(router.router_probs(logits, policy), axis=-1).reshape(2, -1, 1)
        return y, aux, gate

    y32, aux32, g32 = run(FP32)
    y16, aux16, g16 = run(bf16_router)
    assert float(aux32["telemetry"]["dropped_assignment_fraction"]) == 0.0 == float(aux16["telemetry"]["dropped_assignment_fraction"])
    same = (np.asarray(aux16["expert_index"]) == np.asarray(aux32["expert_index"])).reshape(2, -1)
    assert 0.8 < same.mean()
    assert float(aux16["telemetry"]["flip_rate"]) == pytest.approx(1 - same.mean())
    assert not np.array_equal(np.asarray(g16), np.asarray(g32))
    bf16_values = np.asarray(g16).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(bf16_values, np.asarray(g16))
    np.testing.assert_allclose(np.asarray(y16 * g32)[same], np.asarray(y32 * g16)[same], rtol=1e-6, atol=1e-9)
    assert float(aux16["z_loss"]) != float(aux32["z_loss"])


# -- seeds, gradients, training ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vmap_over_seeds_matches_single_runs():
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params, state = jax.vmap(lambda k: init(k, TINY, FP32))(keys)
    batch = make_batch()
    losses = jax.jit(jax.vmap(lambda p, s: apply(p, s, batch, cfg=TINY, policy=FP32, train=False).loss))(params, state)
    for i, k in enumerate(keys):
        p, s = init(k, TINY, FP32)
        np.testing.assert_allclose(float(losses[i]), float(jitted_apply(TINY, FP32, False)(p, s, batch, None).loss),
                                   rtol=1e-5)


def test_tiny_trains_end_to_end():
    """A few Adam steps on one fixed batch drive the loss down (train=True: jitter and expert dropout on)."""
    cfg = dataclasses.replace(TINY, router_jitter_eps=0.01, expert_dropout_rate=0.1)
    params, state = init(jax.random.PRNGKey(0), cfg, FP32)
    batch = make_batch()
    opt = make_optimizer(OptimConfig(name="adamw", lr=3e-3, schedule="constant"))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, key):
        (loss, out), grads = jax.value_and_grad(
            lambda p: (lambda o: (o.loss, o))(apply(p, state, batch, cfg=cfg, policy=FP32, train=True, key=key)),
            has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(12):
        params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses


# -- model info ----------------------------------------------------------------------------------------------------


def test_model_info_matches_paper_sizes():
    for name, rel in (("st-moe-l", 0.01), ("st-moe-32b", 0.005)):
        info = model_info(name)
        assert abs(info["params"] / info["paper"]["params"] - 1) < rel, (name, info["params"])
    tiny = model_info("tiny")
    assert tiny["active_params"] < tiny["params"] and tiny["flops_per_sequence"] > 0
    dense = model_info("dense-l")
    assert dense["active_params"] == dense["params"] and dense["expert_params"] == 0


def test_sentinel_entropy_telemetry():
    """ST-MoE Table 14's statistic: entropy of the top-1 experts of sentinel tokens, in [0, ln E]; NaN when
    the batch says nothing about sentinels."""
    params, state = init(jax.random.key(0), TINY, FP32)
    batch = make_batch()
    out = jitted_apply(TINY, FP32, False)(params, state, batch, None)
    assert np.isnan(np.asarray(out.router["sentinel_entropy"])).all()
    marked = dict(batch, inputs_sentinel=(batch["inputs"] >= 120).astype(np.float32),
                  decoder_inputs_sentinel=(batch["decoder_inputs"] >= 120).astype(np.float32))
    ent = np.asarray(jitted_apply(TINY, FP32, False)(params, state, marked, None).router["sentinel_entropy"])
    assert np.isfinite(ent).all() and (ent >= 0).all() and (ent <= np.log(TINY.num_experts) + 1e-6).all()


# -- attention masking -------------------------------------------------------------------------------------------

# e8m0 is left out: it is the MX scale format, unsigned with no zero, so no softmax can run in it (every
# max-shifted logit is <= 0 and becomes NaN), masked or not.
_SOFTMAX_FORMATS = [name for name in __import__("precision_lab.formats", fromlist=["FORMATS"]).FORMATS
                    if name != "e8m0"]


@pytest.mark.parametrize("component", ["attn_softmax", "attn_logits"])
def test_attention_masking_is_finite_and_exact_in_every_format(component):
    """Regression: masked logits were filled with -1e9 BEFORE the softmax rounded its input, which an
    fn/fnuz format overflows to NaN (every row NaN) and fp6/fp4 saturate to -max (masked keys got weight).
    Now every format gives finite attention and masked keys get exactly zero weight: attending over 8 keys
    with the last 3 masked equals attending over the first 5."""
    from precision_lab.model import layers

    cfg = dataclasses.replace(TINY, d_model=16, num_heads=2, d_kv=8)
    params, state = layers.init_attention(jax.random.key(0), cfg, FP32)
    x = jax.random.normal(jax.random.key(1), (2, 8, 16), jnp.float32) * 0.5
    mask = jnp.asarray(np.arange(8) < 5)[None, None, None, :]  # (1, 1, 1, Lk): the last 3 keys are padding

    @jax.jit
    def both(x):
        out = {}
        for name in _SOFTMAX_FORMATS:
            policy = FP32.replace(**{component: name})
            masked, _ = layers.attention(params, state, x, x, None, mask, policy=policy)
            short, _ = layers.attention(params, state, x, x[:, :5], None, jnp.ones((1, 1, 1, 5), bool),
                                        policy=policy)
            out[name] = (masked, short)
        return out

    for name, (masked, short) in both(x).items():
        assert bool(jnp.all(jnp.isfinite(masked))), f"{component}={name}: non-finite attention"
        np.testing.assert_allclose(masked, short, rtol=1e-6, atol=1e-7, err_msg=f"{component}={name}")


def test_model_wide_init_scale_scales_every_weight_matrix():
    """Switch Table 3's init scale s acts on ALL weight matrices (truncated normal, std sqrt(s / fan_in)), not
    only the router: with weight_init="truncated_normal", every attention, FFN, expert and output matrix's
    std is sqrt(s) times that at s = 1 and 0.8796 sqrt(s / fan_in) (a normal cut at 2 std); the router
    keeps its own knob and the embedding stays N(0, 1)."""
    cfg = dataclasses.replace(TINY, weight_init="truncated_normal", tie_embeddings=False)
    stds = {}
    for s in (0.1, 1.0):
        params, _ = init(jax.random.key(0), dataclasses.replace(cfg, init_scale=s), FP32)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        stds[s] = {jax.tree_util.keystr(path): (np.asarray(leaf), float(np.std(leaf))) for path, leaf in flat}
    fan_in = {"['q']": cfg.d_model * cfg.head_dim, "['k']": cfg.d_model, "['v']": cfg.d_model,
              "['o']": cfg.num_heads * cfg.head_dim, "['wi_0']": cfg.d_model, "['wi_1']": cfg.d_model,
              "['wo']": cfg.d_ff, "['lm_head']": cfg.d_model}
    checked = 0
    for name, (w, std) in stds[0.1].items():
        leaf = name[name.rfind("["):]
        if leaf in fan_in:
            np.testing.assert_allclose(std / stds[1.0][name][1], 0.1**0.5, rtol=1e-5, err_msg=name)
            assert abs(np.abs(w).max() / (0.1 / fan_in[leaf]) ** 0.5) <= 2.0 + 1e-5, name  # truncated at 2 std
            assert std == pytest.approx(0.8796 * (0.1 / fan_in[leaf]) ** 0.5, rel=0.15), name
            checked += 1
        elif leaf in ("['router']", "['token_embed']"):
            np.testing.assert_array_equal(w, stds[1.0][name][0])  # not scaled by the model-wide knob
    assert checked >= 20  # 2+2 blocks' attention (self, cross), FFNs, experts and the output projection
    with pytest.raises(UserError, match="weight_init"):
        dataclasses.replace(cfg, weight_init="xavier")


# -- controls: random and hash routing, the FLOP-matched dense model (issue 13) --------------------------------


def test_fixed_routings_pick_k_distinct_experts():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 64)), jnp.int32)
    gates, idx = router.fixed_routing("random", k=2, num_experts=8, shape=(4, 64), key=jax.random.PRNGKey(3))
    assert idx.shape == gates.shape == (4, 64, 2) and np.all(np.asarray(gates) == 0.5)
    idx = np.asarray(idx)
    assert np.all(idx[..., 0] != idx[..., 1]) and idx.min() >= 0 and idx.max() < 8
    again = router.fixed_routing("random", k=2, num_experts=8, shape=(4, 64), key=jax.random.PRNGKey(3))[1]
    other = router.fixed_routing("random", k=2, num_experts=8, shape=(4, 64), key=jax.random.PRNGKey(4))[1]
    assert np.array_equal(idx, np.asarray(again)) and not np.array_equal(idx, np.asarray(other))
    # uniform over experts: 512 assignments, 64 expected per expert
    assert np.all(np.abs(np.bincount(idx.ravel(), minlength=8) - 64) < 30)
    _, h = router.fixed_routing("hash", k=2, num_experts=8, shape=(4, 64), token_ids=ids)
    h, ids = np.asarray(h), np.asarray(ids)
    assert np.all(h[..., 0] != h[..., 1])
    for t in np.unique(ids):  # the experts are a function of the token id alone
        assert len({tuple(r) for r in h[ids == t]}) == 1
    table = np.asarray(router.fixed_routing("hash", k=2, num_experts=8, shape=(1, 128),
                                            token_ids=jnp.arange(128, dtype=jnp.int32)[None])[1])
    assert np.all(np.bincount(table.ravel(), minlength=8) > 16)  # spread over every expert (32 expected)


@pytest.mark.parametrize("routing", ["random", "hash"])
def test_fixed_routing_ignores_the_router(routing):
    """The controls: no router loss, no router gradient, telemetry NaN where there is no router distribution,
    flip rate 0; evaluation is deterministic (random: from the key given, or a fixed one)."""
    cfg = dataclasses.replace(TINY, routing=routing)
    params, state = init(jax.random.PRNGKey(0), cfg, FP32)
    batch, key = make_batch(), jax.random.PRNGKey(5)
    out = jitted_apply(cfg, FP32, True)(params, state, batch, key)
    assert np.isfinite(float(out.loss)) and float(out.loss) == float(out.ce_loss)
    np.testing.assert_array_equal(np.asarray(out.router_z_loss), 0.0)
    np.testing.assert_array_equal(np.asarray(out.load_balancing_loss), 0.0)
    np.testing.assert_array_equal(np.asarray(out.router["flip_rate"]), 0.0)
    assert np.isnan(np.asarray(out.router["max_abs_logit"])).all()
    assert np.isfinite(np.asarray(out.router["dropped_assignment_fraction"])).all()
    grads = jax.jit(jax.grad(lambda p: apply(p, state, batch, cfg=cfg, policy=FP32, train=True, key=key).loss))(params)
    assert float(jnp.abs(grads["encoder"]["blocks"][1]["moe"]["router"]).max()) == 0.0
    assert float(jnp.abs(grads["encoder"]["blocks"][1]["moe"]["wo"]).max()) > 0.0
    # the router's weights do not matter to the output at all
    scrambled = jax.tree.map(lambda x: x, params)
    scrambled["encoder"]["blocks"][1]["moe"]["router"] = params["encoder"]["blocks"][1]["moe"]["router"] * 7.0
    again = jitted_apply(cfg, FP32, True)(scrambled, state, batch, key)
    assert float(again.loss) == float(out.loss)
    ev = jitted_apply(cfg, FP32, False)
    assert float(ev(params, state, batch, None).loss) == float(ev(params, state, batch, None).loss)
    other_key = jitted_apply(cfg, FP32, True)(params, state, batch, jax.random.PRNGKey(6))
    assert (float(other_key.loss) != float(out.loss)) == (routing == "random")
    if routing == "random":
        with pytest.raises(ValueError, match="PRNG key"):
            apply(params, state, batch, cfg=cfg, policy=FP32, train=True, key=None)


def test_flop_matched_dense_model():
    """num_experts = 0 with flop_matched_dense: the would-be sparse blocks get a dense FFN of k * expert
    width, so the forward FLOPs equal the MoE model's minus its router matmul."""
    dense = dataclasses.replace(TINY, num_experts=0, flop_matched_dense=True)
    moe_info, dense_info = model_info(TINY), model_info(dense)
    assert dense_info["flops_per_sequence"] == moe_info["flops_per_sequence"] - moe_info["flops_by_part"]["router"]
    router_params = 2 * TINY.d_model * TINY.num_experts  # one router per sparse layer
    assert dense_info["active_params"] == moe_info["active_params"] - router_params
    params, state = init(jax.random.PRNGKey(0), dense, FP32)
    assert params["encoder"]["blocks"][1]["ffn"]["wi_0"].shape == (64, 2 * 128)
    assert params["encoder"]["blocks"][0]["ffn"]["wi_0"].shape == (64, 128)
    assert np.isfinite(float(jitted_apply(dense, FP32, False)(params, state, make_batch(), None).loss))
    with pytest.raises(UserError, match="num_experts = 0") as err:
        dataclasses.replace(TINY, flop_matched_dense=True)
    assert "\n" not in str(err.value)
