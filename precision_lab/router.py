"""Router math for sparse expert layers: logits, probabilities, auxiliary losses, top-k routing with
expert capacity, in the dense one-hot dispatch form of Mesh TensorFlow and flaxformer.

Shapes use G groups of S tokens, E experts, K experts selected per token, C slots per expert.
Every arithmetic step on a routing quantity goes through `precision_lab.ops` with the policy's router
components: the router input (`router_input`), its weights (`router_weights`), the logits (`router_logits`),
the softmax and its exponentials (`router_softmax`), the gates that weight expert outputs
(`combine_weights`). Integer/boolean index math (top-k, priorities, slots) is exact and needs no policy.

Losses (PAPER.md section 1) are computed from the policy-rounded logits/probabilities and reduced in
float32, as flaxformer's routing.py does (`dtype=jnp.float32` on its means).

Conventions worth knowing:
  * Capacity (flaxformer): C = max(round(CF * S / E), min_capacity), Python's round (half to even). The top-k
    count is not in the formula, so top-2 at CF 1.25 has room for 1.25x the average load of ONE choice.
  * Priority: all first choices of a group are placed before any second choice (k-major order), tokens in
    group order within a k (or, with Batch Prioritized Routing, by descending top-1 probability). An
    assignment past the expert's capacity is dropped: the token skips that expert; if it has no expert left,
    the MoE sublayer outputs 0 for it and only the residual carries it.
  * Padding tokens (token_mask 0) are never dispatched, take no capacity, and are left out of every loss and
    statistic.
  * Routing decisions read the (rounded) probabilities; ties break towards the lower expert index
    (`lax.top_k`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from precision_lab import ops
from precision_lab.policy import PrecisionPolicy, get_policy

ROUTINGS: tuple[str, ...] = ("top1", "top2", "top2-gshard", "topk", "random", "hash")
# Controls (issue 13): routings that ignore the router. "random": k distinct uniformly random experts per
# token, fresh at every step; "hash": k distinct experts fixed by a hash of the token id (Hash Layers).
FIXED_ROUTINGS: tuple[str, ...] = ("random", "hash")
_F32_POLICY = get_policy("fp32")


# -- sizes ----------------------------------------------------------------------------------------------------


def num_groups(num_tokens: int, group_size: int, num_partitions: int = 1) -> int:
    """How many routing groups `num_tokens` tokens split into (flaxformer's `_num_groups`).

    The smallest G >= max(ceil(num_tokens / group_size), num_partitions) that divides num_tokens and is a
    multiple of num_partitions, so each group has at most `group_size` tokens (when one exists): 448 tokens
    with group_size 256 make 2 groups of 224, never one group of 448.
    """
    g = max(-(-num_tokens // group_size), num_partitions, 1)
    while g < num_tokens and (num_tokens % g or g % num_partitions):
        g += 1
    return g


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float, min_capacity: int = 4) -> int:
    """Slots per expert and group: max(round(capacity_factor * tokens_per_group / num_experts), min_capacity)."""
    return max(int(round(capacity_factor * tokens_per_group / num_experts)), min_capacity)


# -- logits and probabilities ----------------------------------------------------------------------------------


def jitter(router_input, eps: float, key):
    """Multiplicative input jitter (Switch / ST-MoE): <float32>[G, S, D] times uniform[1 - eps, 1 + eps] noise.

    Training only. The product is rounded by `router_logits` (to `router_input`) on its way in.
    """
    if eps == 0.0:
        return router_input
    noise = jax.random.uniform(key, router_input.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return router_input * noise


def router_logits(router_input, router_weights, policy: PrecisionPolicy, *, state=None):
    """Router logits of a linear router without bias.

    Args:
      router_input: <float32>[G, S, D] token representations (jittered in training), rounded here to
        `router_input`.
      router_weights: <float32>[D, E], rounded by the matmul to `router_weights`.
      state: the delayed-scaling state of the router matmul (ops.init_dot_state with grads="router_grads").
    Returns:
      <float32>[G, S, E] logits rounded per `router_logits` (float32 accumulation).
    """
    x_router = ops.cast(router_input, policy, "router_input")
    # The backward pass is the router's too: its incoming gradient and the input gradient it sends back
    # are rounded per `router_grads` (float32 wherever the router is float32), not per grads/matmul_out.
    return ops.dot("gsd,de->gse", x_router, router_weights, policy, lhs="router_input", rhs="router_weights",
                   out="router_logits", state=state, grads="router_grads", grad_out="router_grads")


def router_probs(logits, policy: PrecisionPolicy, *, shift: bool = True):
    """<float32>[G, S, E] logits -> <float32>[G, S, E] softmax over experts, per `router_softmax`.
    shift=False exponentiates the raw logits (no max subtraction)."""
    return ops.softmax(logits, policy, "router_softmax", axis=-1, shift=shift)


# -- auxiliary losses ------------------------------------------------------------------------------------------


def _masked_mean(values, token_mask, axis):
    """Mean of values over `axis` counting only tokens with mask 1 (float32; 0 when no token counts)."""
    if token_mask is None:
        return jnp.mean(values, axis=axis)
    m = token_mask if values.ndim == token_mask.ndim else token_mask[..., None]
    count = jnp.sum(jnp.broadcast_to(m, values.shape), axis=axis)
    return jnp.sum(values * m, axis=axis) / jnp.maximum(count, 1.0)


def z_loss(logits, *, policy: PrecisionPolicy = _F32_POLICY, token_mask=None):
    """Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2.

    Args:
      logits: <float32>[..., E] (e.g. [G, S, E]); the logsumexp runs through ops with `router_softmax`.
      token_mask: <float32>[...] 1 for tokens that count, or None for all.
    Returns:
      <float32>[] scalar >= 0.
    """
    lse = ops.logsumexp(logits, policy, "router_softmax", axis=-1)
    return _masked_mean(lse * lse, token_mask, axis=None)


def load_balancing_loss(router_probs, expert_mask, *, token_mask=None):
    """Switch load-balancing loss N * sum_i f_i * P_i per group, averaged over groups.

    Args:
      router_probs: <float32>[G, S, E] router probabilities.
      expert_mask: <float32>[G, S, E] 1 where the token chose the expert (the top-1 one-hot, or the top-k
        set: then the uniform value is k instead of 1).
      token_mask: <float32>[G, S] or None.
    Returns:
      <float32>[] f_i = mean over tokens of expert_mask, P_i = mean over tokens of router_probs.
    """
    num_experts = router_probs.shape[-1]
    mask = None if token_mask is None else token_mask[..., None]
    f = _masked_mean(expert_mask, mask, axis=-2)  # (G, E)
    p = _masked_mean(router_probs, mask, axis=-2)  # (G, E)
    return jnp.float32(num_experts) * jnp.mean(jnp.sum(f * p, axis=-1))


# -- routing ------------------------------------------------------------------------------------------------------


class Routing(NamedTuple):
    """One routing decision for G groups of S tokens.

    dispatch: <float32>[G, S, E, C] 1 where token s occupies slot c of expert e.
    combine:  <float32>[G, S, E, C] the gate that weights that slot's output (0 elsewhere).
    expert_index: <int32>[G, S, K] the experts each token asked for, best first.
    kept: <bool>[G, S, K] whether the request got a slot (False: dropped by capacity, by GShard's random
      second-expert policy, or padding).
    requested: <bool>[G, S, K] whether the request was made (False: padding or GShard's policy declined it).
    slot: <int32>[G, S, K] the request's slot in its expert's buffer of this group (meaningful where kept;
      the kept requests of one expert and group hold slots 0, 1, ... without gaps).
    gates: <float32>[G, S, K] the combine weight of each request, 0 where not kept (`combine` summed over
      slots, without the [E, C] axes: what a sorted dispatch needs).
    """

    dispatch: jax.Array
    combine: jax.Array
    expert_index: jax.Array
    kept: jax.Array
    requested: jax.Array
    slot: jax.Array
    gates: jax.Array


def top_k(router_probs, k: int):
    """(gates <float32>[G, S, K], expert_index <int32>[G, S, K]): the k largest probabilities, best first."""
    gates, index = jax.lax.top_k(router_probs, k)
    return gates, index


def route(router_probs, policy: PrecisionPolicy, *, routing: str, k: int, capacity: int, token_mask=None,
          batch_prioritized: bool = False, gshard_threshold: float = 0.2, normalize_gates: bool = False, key=None,
          fixed=None) -> Routing:
    """Assign tokens to expert slots.

    Args:
      router_probs: <float32>[G, S, E].
      routing: "top1" | "top2" | "topk" (raw probabilities as combine weights) | "top2-gshard" (the two gates
        renormalised to sum to 1; the second request made with probability min(1, gate2 / gshard_threshold)
        when `key` is given, else iff gate2 >= gshard_threshold).
      k: experts per token (1 for top1, 2 for top2*).
      capacity: slots per expert and group.
      token_mask: <float32>[G, S] 1 for real tokens, or None.
      batch_prioritized: V-MoE's Batch Prioritized Routing: within each k, tokens with a larger top-1
        router probability take slots first (instead of group order); the raw probability, also under
        top2-gshard (whose renormalised first gate p1 / (p1 + p2) orders tokens differently).
      normalize_gates: divide the k selected probabilities by their sum (Mixtral; GShard's pair always is),
        so the combine weights of a token sum to 1 instead of p1 + ... + pk (ST-MoE's raw probabilities:
        about k / E at initialisation, which scales the experts' output down until the router sharpens).
      fixed: (gates, expert_index) <float32/int32>[G, S, K] chosen elsewhere (the "random" and "hash"
        controls, see `fixed_routing`): used instead of the top-k of router_probs; capacity and slots as usual.
    """
    num_experts = router_probs.shape[-1]
    gates, expert_index = top_k(router_probs, k) if fixed is None else fixed  # (G, S, K)
    top1_prob = gates[..., 0]  # BPR's priority: the raw top-1 probability, before any renormalisation
    requested = jnp.ones(expert_index.shape, bool)
    if token_mask is not None:
        requested = requested & (token_mask[..., None] > 0)
    if routing == "top2-gshard" or (normalize_gates and fixed is None):  # the controls' gates are 1/k already
        # the k gates renormalised to sum to 1: Mesh TF / GShard always, Mixtral's top-k with normalize_gates
        denom = ops.sum(gates, policy, "combine_weights", axis=-1, keepdims=True)
        gates = ops.cast(gates / denom, policy, "combine_weights")
    if routing == "top2-gshard":
        # Mesh TF / GShard: always ask the first expert, the second only sometimes.
        gate2_rel = gates[..., 1] / jnp.float32(gshard_threshold)
        if key is not None:
            keep2 = jax.random.uniform(key, gate2_rel.shape, jnp.float32) < gate2_rel
        else:
            keep2 = gate2_rel >= 1.0
        requested = requested.at[..., 1].set(requested[..., 1] & keep2)
    gates = ops.cast(gates, policy, "combine_weights")

    # Slot of each request in its expert's buffer: a cumulative count over (k, token) in priority order.
    expert_onehot = jnp.where(requested[..., None], jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32), 0)
    if batch_prioritized:
        order = jnp.argsort(-top1_prob, axis=-1, stable=True)  # (G, S) highest top-1 probability first
        expert_onehot = jnp.take_along_axis(expert_onehot, order[:, :, None, None], axis=1)
    groups, tokens = expert_index.shape[:2]
    priority = jnp.swapaxes(expert_onehot, 1, 2).reshape(groups, k * tokens, num_experts)  # k-major
    position = jnp.cumsum(priority, axis=1) * priority - 1  # (G, K*S, E), -1 where not requested
    position = jnp.swapaxes(position.reshape(groups, k, tokens, num_experts), 1, 2)  # (G, S, K, E)
    if batch_prioritized:
        inverse = jnp.argsort(order, axis=-1)
        position = jnp.take_along_axis(position, inverse[:, :, None, None], axis=1)
    slot = jnp.max(position, axis=-1)  # (G, S, K): the request's slot, -1 if none
    kept = requested & (slot >= 0) & (slot < capacity)

    # Dense one-hot dispatch/combine tensors: (G, S, K, E, C) masks summed over K (a token's K experts are
    # distinct, so each (e, c) gets at most one term and the sums are exact).
    slot_mask = (jax.nn.one_hot(expert_index, num_experts, dtype=bool)[..., :, None]
                 & jax.nn.one_hot(slot, capacity, dtype=bool)[..., None, :]
                 & kept[..., None, None])  # (G, S, K, E, C)
    dispatch = jnp.where(jnp.any(slot_mask, axis=2), jnp.float32(1.0), jnp.float32(0.0))
    combine = jnp.sum(jnp.where(slot_mask, gates[..., None, None], jnp.float32(0.0)), axis=2)
    return Routing(dispatch, combine, expert_index.astype(jnp.int32), kept, requested, slot.astype(jnp.int32),
                   jnp.where(kept, gates, jnp.float32(0.0)))


def _hash_u32(x):
    """A 32-bit integer mixer (the murmur3 finaliser) on <uint32> arrays: a fixed, well-spread hash."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def fixed_routing(routing: str, *, k: int, num_experts: int, shape: tuple[int, int], token_ids=None, key=None):
    """The experts of the controls, <int32>[G, S, K] distinct experts per token, with gates 1/k each:
    (gates <float32>[G, S, K], expert_index <int32>[G, S, K]) for `route(fixed=...)`.

    "random": the k experts of a uniformly random ordering of all experts, drawn from `key` (the same key
      gives the same assignment: the trainer derives it from the seed and step, so it is fixed per token
      position and step, and deterministic per seed). Needs key.
    "hash": the k experts with the largest hash(token id, expert): a fixed pseudo-random k-subset per
      vocabulary entry, the same in every layer and step (Hash Layers, Roller et al. 2021, with k hashes
      made distinct). Needs token_ids <int32>[G, S] (= `shape`).
    Both are balanced in expectation and unlearned; the router's scores play no part. The gates are a
    constant 1/k (a token's output is the mean of its experts'), since there is no router probability to use.
    """
    if routing == "random":
        scores = jax.random.uniform(key, (*shape, num_experts), jnp.float32)
    elif routing == "hash":
        experts = jnp.arange(num_experts, dtype=jnp.uint32).reshape((1,) * token_ids.ndim + (num_experts,))
        ids = token_ids.astype(jnp.uint32)[..., None] * jnp.uint32(num_experts) + experts  # (G, S, E)
        scores = (_hash_u32(ids ^ jnp.uint32(0x9E3779B9)) >> 1).astype(jnp.int32)  # 31 bits: top_k on int32
    else:
        raise ValueError(f"fixed_routing: routing must be one of {FIXED_ROUTINGS}, got {routing!r}")
    _, expert_index = jax.lax.top_k(scores, k)
    return jnp.full(expert_index.shape, 1.0 / k, jnp.float32), expert_index.astype(jnp.int32)


def expert_choice_mask(expert_index, num_experts: int, which: str = "top1"):
    """<float32>[G, S, E] one-hot of the first choice ("top1") or of the whole top-k set ("topk")."""
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # (G, S, K, E)
    chosen = onehot[..., 0, :] if which == "top1" else jnp.max(onehot, axis=-2)
    return jnp.where(chosen > 0, jnp.float32(1.0), jnp.float32(0.0))


# -- float32 shadow router ------------------------------------------------------------------------------------------


def shadow_expert_index(router_input, router_weights, *, k: int, shift: bool = True):
    """The experts a float32 router would pick from the same input and weights: <int32>[G, S, K].

    Used for the routing flip rate: how often the policy's rounding changes a token's expert set.
    """
    logits = router_logits(router_input, router_weights, _F32_POLICY)
    return top_k(router_probs(logits, _F32_POLICY, shift=shift), k)[1]


def flip_rate(expert_index, shadow_index, token_mask=None):
    """<float32>[] fraction of tokens whose SET of K experts differs between two routings ([G, S, K] each)."""
    differs = jnp.any(jnp.sort(expert_index, axis=-1) != jnp.sort(shadow_index, axis=-1), axis=-1)
    return _masked_mean(jnp.where(differs, jnp.float32(1.0), jnp.float32(0.0)), token_mask, axis=None)


__all__ = [
    "ROUTINGS", "FIXED_ROUTINGS", "fixed_routing", "Routing", "num_groups", "expert_capacity", "jitter", "router_logits", "router_probs", "z_loss",
    "load_balancing_loss", "top_k", "route", "expert_choice_mask", "shadow_expert_index", "flip_rate",
]
