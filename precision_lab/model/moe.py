"""The sparse (mixture-of-experts) FFN sublayer: router -> dispatch -> experts -> combine.

Tokens [B, L] are flattened and split into G groups of S tokens (`router.num_groups`); each group routes
independently with C = capacity slots per expert (`router.route`). How the routed tokens then reach the
experts is `cfg.expert_dispatch` (model/dispatch.py): "sorted" lays them out expert by expert and runs a
grouped GEMM over the routed tokens only; "dense" uses one-hot einsums over [G, S, E, C] (Mesh TF /
flaxformer), whose [E, G, C, D] expert inputs shard over experts (model/sharding.py):

    tokens (G, S, D) --dispatch--> expert inputs --experts--> expert outputs --combine--> (G, S, D)

The two arrows through "comm" are the all-to-all of expert parallelism: what crosses them is rounded to the
policy's `comm` component. Expert matmuls use `expert_operands`; the gates `combine_weights`.

Telemetry per layer (float32, no gradient): max |router logit|, mean logsumexp^2, dropped ASSIGNMENTS (the
fraction of requested token-expert assignments that found no slot: for top-2 at capacity factor 1.25 at least
1 - 1.25/2 = 37.5% by construction) and dropped TOKENS (ST-MoE's measure, PAPER.md sections 2 and 8: the
fraction of real tokens that no expert processed, every assignment dropped, so the sublayer passes them through
the residual only), expert load coefficient of
variation (std/mean of requested assignments per expert, summed over groups), routing entropy (mean over
tokens of the router distribution's entropy, nats), and the flip rate vs a float32 shadow router.

Controls (cfg.routing "random" / "hash", `router.fixed_routing`): the experts are chosen without the router,
gates 1/k, same k, capacity and drops. The router's weights stay in the parameter tree (same shapes as the
learned model) but nothing reads them into the output: its z-loss and load-balancing loss are 0 (so it gets
no gradient), its logit telemetry (max_abs_logit, mean_lse_sq, entropy) is NaN (there is no routing
distribution), and flip_rate is 0 (no rounding can change a fixed assignment). Dropped/unrouted fractions,
load CV and sentinel entropy describe the actual assignment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from precision_lab import ops, router
from precision_lab.model import dispatch, sharding
from precision_lab.model.config import ModelConfig
from precision_lab.model.layers import dot_state, dropout, ffn_hidden_activation, init_ffn_weights, normal
from precision_lab.policy import PrecisionPolicy

TELEMETRY: tuple[str, ...] = ("max_abs_logit", "mean_lse_sq", "dropped_assignment_fraction", "dropped_token_fraction",
                              "load_cv", "entropy", "flip_rate", "sentinel_entropy")


def init_moe(key, cfg: ModelConfig, policy: PrecisionPolicy):
    """Router [D, E] and experts' FFN weights with a leading expert axis: wi_* [E, D, F], wo [E, F, D]."""
    k_router, k_experts = jax.random.split(key)
    d, e = cfg.d_model, cfg.num_experts
    if cfg.router_init == "normal":
        w_router = normal(k_router, (d, e), cfg.router_init_std)
    else:  # Switch: truncated normal (2 std), variance scaling s / fan_in
        std = (cfg.router_init_scale / d) ** 0.5
        w_router = jax.random.truncated_normal(k_router, -2.0, 2.0, (d, e), jnp.float32) * jnp.float32(std)
    params = {"router": w_router, **init_ffn_weights(k_experts, cfg, cfg.expert_hidden, lead=(e,))}
    state = {"router": ops.init_dot_state(policy, lhs="router_input", rhs="router_weights", grads="router_grads"),
             **dispatch.init_state(policy, cfg.expert_dispatch)}
    state |= {name: dot_state(policy, "expert_operands", "expert_operands") for name in params if name != "router"}
    return params, state


def moe_ffn(params, state, x, token_mask, *, cfg: ModelConfig, policy: PrecisionPolicy, train: bool,
            prioritized: bool, key=None, sentinel_mask=None, token_ids=None, route_key=None):
    """Sparse FFN.

    Args:
      x: <float32>[B, L, D] normalised sublayer input.
      token_mask: <float32>[B, L] 1 for real tokens (padding is never routed).
      train: training capacity factor, jitter, expert dropout, GShard's random second expert.
      prioritized: Batch Prioritized Routing (encoder only, when cfg.batch_prioritized_routing).
      key: needed when train and any randomness is on.
      sentinel_mask: <float32>[B, L] 1 for sentinel tokens (for the specialisation telemetry), or None.
      token_ids: <int32>[B, L] the token ids at these positions (routing "hash").
      route_key: the key of routing "random" (in training and evaluation alike).
    Returns:
      (<float32>[B, L, D] output (0 for tokens no expert took), aux dict: "z_loss", "load_balancing_loss"
      <float32>[], "telemetry" {name: <float32>[]}, "expert_index" <int32>[G, S, K]).
    """
    batch, length, d = x.shape
    e, k = cfg.num_experts, cfg.num_selected_experts
    g = router.num_groups(batch * length, cfg.group_size)
    s = batch * length // g
    cf = cfg.train_capacity_factor if train else cfg.eval_capacity_factor
    capacity = router.expert_capacity(s, e, cf, cfg.min_capacity)
    k_jitter, k_route, k_drop = jax.random.split(key, 3) if key is not None else (None, None, None)

    tokens = sharding.constrain(x.reshape(g, s, d), "groups")  # (G, S, D)
    mask = token_mask.reshape(g, s)  # (G, S)
    x_router = router.jitter(tokens, cfg.router_jitter_eps if train else 0.0, k_jitter)  # (G, S, D)
    logits = router.router_logits(x_router, params["router"], policy, state=state["router"])  # (G, S, E)
    probs = router.router_probs(logits, policy, shift=cfg.router_softmax_shift)  # (G, S, E)
    fixed = None
    if cfg.routing in router.FIXED_ROUTINGS:
        ids = None if token_ids is None else token_ids.reshape(g, s)
        fixed = router.fixed_routing(cfg.routing, k=k, num_experts=e, shape=(g, s), token_ids=ids, key=route_key)
    routing = router.route(probs, policy, routing=cfg.routing, k=k, capacity=capacity, token_mask=mask,
                           batch_prioritized=prioritized, gshard_threshold=cfg.gshard_threshold,
                           normalize_gates=cfg.router_normalize_gates,
                           key=k_route if train else None, fixed=fixed)

    def expert_ffn(expert_in, matmul):  # the experts' FFN on the dispatch's layout of rows
        pre = {name: matmul(name, expert_in) for name in params if name not in ("router", "wo")}
        hidden = dropout(ffn_hidden_activation(pre, cfg, policy), cfg.expert_dropout_rate if train else 0.0,
                         k_drop, policy)
        return matmul("wo", hidden, out="comm")  # what the return all-to-all carries

    if cfg.expert_dispatch == "dense":
        y = dispatch.dense(tokens, routing, expert_ffn, params, state, policy)
    else:
        y = dispatch.sorted_blocks(tokens, routing, expert_ffn, params, state, policy, capacity=capacity,
                                   block=cfg.expert_block_size)
    y = sharding.constrain(y, "groups")  # (G, S, D)

    balance_mask = router.expert_choice_mask(routing.expert_index, e, cfg.load_balance_mask)
    telemetry = _telemetry(x_router, params["router"], logits, probs, routing, mask, cfg=cfg,
                           sentinels=None if sentinel_mask is None else sentinel_mask.reshape(g, s))
    if fixed is None:
        z, balance = (router.z_loss(logits, policy=policy, token_mask=mask),
                      router.load_balancing_loss(probs, balance_mask, token_mask=mask))
    else:  # the router is not used: no loss on it, no routing distribution to describe
        z = balance = jnp.float32(0.0)
        telemetry |= {name: jnp.float32(jnp.nan) for name in ("max_abs_logit", "mean_lse_sq", "entropy")}
        telemetry["flip_rate"] = jnp.float32(0.0)
    aux = {"z_loss": z, "load_balancing_loss": balance, "telemetry": telemetry, "expert_index": routing.expert_index}
    return y.reshape(batch, length, d), aux


def _telemetry(x_router, w_router, logits, probs, routing: router.Routing, mask, *, cfg: ModelConfig,
               sentinels=None):
    """Router statistics (float32 scalars, no gradient); padding tokens excluded.

    sentinel_entropy (ST-MoE Table 14): entropy (nats) of the distribution of sentinel tokens' top-1 experts
    over the experts: ln(num_experts) when sentinels spread uniformly, 0 when one expert takes them all;
    NaN when the batch has no sentinel (or no mask was given)."""
    x_router, w_router, logits, probs, mask = jax.lax.stop_gradient((x_router, w_router, logits, probs, mask))
    valid = mask > 0
    n_valid = jnp.maximum(jnp.sum(mask), 1.0)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (G, S)
    requested = jnp.sum(jnp.where(routing.requested, 1.0, 0.0))
    kept = jnp.sum(jnp.where(routing.kept, 1.0, 0.0))
    routed_somewhere = jnp.any(routing.kept, axis=-1) & valid
    load = jnp.sum(jnp.where(routing.requested[..., None],
                             jax.nn.one_hot(routing.expert_index, cfg.num_experts, dtype=jnp.float32), 0.0),
                   axis=(0, 1, 2))  # (E,)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)  # (G, S)
    # The float32 shadow router sees the same (jittered, unrounded) input and weights, so the flip rate
    # measures the policy's rounding alone: exactly 0 under an all-fp32 policy.
    shadow = router.shadow_expert_index(x_router, w_router, k=cfg.num_selected_experts, shift=cfg.router_softmax_shift)
    if sentinels is None:
        sentinel_entropy = jnp.float32(jnp.nan)
    else:
        top1 = jax.nn.one_hot(routing.expert_index[..., 0], cfg.num_experts, dtype=jnp.float32)  # (G, S, E)
        counts = jnp.sum(top1 * (jax.lax.stop_gradient(sentinels) * mask)[..., None], axis=(0, 1))  # (E,)
        share = counts / jnp.maximum(jnp.sum(counts), 1.0)
        sentinel_entropy = jnp.where(jnp.sum(counts) > 0,
                                     -jnp.sum(jnp.where(share > 0, share * jnp.log(jnp.maximum(share, 1e-30)), 0.0)),
                                     jnp.nan)
    return {
        "sentinel_entropy": sentinel_entropy,
        "max_abs_logit": jnp.max(jnp.where(valid[..., None], jnp.abs(logits), 0.0)),
        "mean_lse_sq": jnp.sum(jnp.where(valid, lse * lse, 0.0)) / n_valid,
        "dropped_assignment_fraction": 1.0 - kept / jnp.maximum(requested, 1.0),
        "dropped_token_fraction": 1.0 - jnp.sum(jnp.where(routed_somewhere, 1.0, 0.0)) / n_valid,
        "load_cv": jnp.std(load) / jnp.maximum(jnp.mean(load), 1e-30),
        "entropy": jnp.sum(jnp.where(valid, entropy, 0.0)) / n_valid,
        "flip_rate": router.flip_rate(routing.expert_index, shadow, mask),
    }
