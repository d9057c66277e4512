"""How routed tokens reach their experts and come back: the two implementations of an MoE layer's dispatch.

Both take the same routing decision (`router.Routing`: the same experts, the same capacity drops) and
compute the same function with the same roundings; they differ in what work they do.

  dense   Mesh TF / flaxformer: one-hot dispatch and combine einsums over [G, S, E, C], every expert runs
          on all C slots of every group, used or not. Static, evenly shaped [E, G, C, D] expert inputs
          shard over an "expert" mesh axis (model/sharding.py: this is the expert-parallel layout). Expert
          matmul rows: E * G * C = capacity_factor x the routed tokens; the two einsums add 2 * G*S*E*C*D
          multiply-adds each way.
  sorted  Block-sparse, as MegaBlocks (Gale et al. 2022) does on GPU: the kept assignments are laid out
          expert by expert in one buffer, each expert's run padded to a multiple of `block` rows; a grouped
          GEMM (`ops.grouped_dot`) multiplies each block by its expert's matrices, a gather brings the
          outputs back. Shapes stay static (the buffer has room for the worst case: every routed token plus
          E * (block - 1) padding rows), but expert work follows the routed tokens, not the capacity. One
          device only: it does not shard over experts.

Equality (tests/test_dispatch.py): the same routing and drops, and every value rounded to the same format
at the same site. What is not bit for bit: float32 sums, which XLA:CPU may order differently for the
differently shaped matmuls (losses agree to ~1e-7 relative, often exactly), weight gradients summed block by
block, and expert dropout, whose mask is drawn in the buffer's shape. Also different by design: MX or tile
scaling of `activations`/`comm` blocks along the dense einsum's contracted (token or expert) axis, the
sorted layout along d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from precision_lab import ops
from precision_lab.model import sharding
from precision_lab.policy import PrecisionPolicy
from precision_lab.router import Routing

# expert_ffn(x, matmul) -> y: the experts' FFN on any leading shape, matmul(name, x, out) its matmuls.
ExpertFFN = Callable[[jax.Array, Callable], jax.Array]


def init_state(policy: PrecisionPolicy, dispatch: str):
    """Delayed-scaling state of the dispatch and combine sites (None entries without delayed scaling)."""
    # The dense dispatch is a matmul with a one-hot rhs; the sorted one a gather (no rhs to scale).
    return {"dispatch": ops.init_dot_state(policy, lhs="activations", rhs="activations" if dispatch == "dense" else None),
            "combine": ops.init_dot_state(policy, lhs="comm", rhs="combine_weights")}


def dense(tokens, routing: Routing, expert_ffn: ExpertFFN, params, state, policy: PrecisionPolicy):
    """tokens <float32>[G, S, D] -> [G, S, D] through one-hot einsums (see the module docstring)."""

    def matmul(name, x, out="matmul_out"):  # (E, G, C, K) x (E, K, N) -> (E, G, C, N)
        return ops.dot("egck,ekn->egcn", x, params[name], policy, lhs="expert_operands", rhs="expert_operands",
                       out=out, state=state[name])

    expert_in = ops.dot("gsd,gsec->egcd", tokens, routing.dispatch, policy, lhs="activations", rhs="activations",
                        out="comm", state=state["dispatch"])  # (E, G, C, D): the all-to-all
    expert_out = sharding.constrain(expert_ffn(sharding.constrain(expert_in, "experts"), matmul), "experts")
    # The combine weights' gradient is the router's incoming gradient: rounded per `router_grads`.
    return ops.dot("egcd,gsec->gsd", expert_out, routing.combine, policy, lhs="comm", rhs="combine_weights",
                   out="activations", state=state["combine"], rhs_grad="router_grads")  # (G, S, D): the return all-to-all


class Layout(NamedTuple):
    """Where each kept assignment sits in the sorted buffer of P = NB * block rows.

    rows: <int32>[P] the token (index into the G*S flattened tokens) of each buffer row; G*S = empty row.
    block_expert: <int32>[NB] the expert whose matrices block i uses.
    request_row: <int32>[G*S, K] the buffer row of each request; P where it was not kept.
    """

    rows: jax.Array
    block_expert: jax.Array
    request_row: jax.Array


def buffer_rows(num_tokens: int, k: int, num_experts: int, capacity: int, num_groups: int, block: int) -> int:
    """P: room for every kept assignment (at most min(T*K, E*G*C)) plus each expert's padding (< block)."""
    worst = min(num_tokens * k, num_experts * num_groups * capacity) + num_experts * (block - 1)
    return -(-worst // block) * block


def sorted_layout(routing: Routing, num_experts: int, capacity: int, block: int) -> Layout:
    """Lay the kept assignments out expert by expert (within an expert: group, then slot)."""
    groups, tokens, k = routing.expert_index.shape
    num_rows = buffer_rows(groups * tokens, k, num_experts, capacity, groups, block)
    expert = routing.expert_index
    onehot = jnp.where(routing.kept[..., None], jax.nn.one_hot(expert, num_experts, dtype=jnp.int32), 0)
    per_group = jnp.sum(onehot, axis=(1, 2))  # (G, E) kept assignments of each expert in each group
    before_group = jnp.cumsum(per_group, axis=0) - per_group  # (G, E) the same expert's rows in earlier groups
    padded = -(-jnp.sum(per_group, axis=0) // block) * block  # (E,) each expert's run, whole blocks
    end = jnp.cumsum(padded)
    start = end - padded
    offset = start[None, :] + before_group  # (G, E) first row of (group, expert)
    row = jnp.take_along_axis(offset, expert.reshape(groups, tokens * k), axis=1).reshape(expert.shape)
    row = jnp.where(routing.kept, row + routing.slot, num_rows)  # (G, S, K)
    token = jnp.broadcast_to(jnp.arange(groups * tokens, dtype=jnp.int32).reshape(groups, tokens, 1), row.shape)
    rows = jnp.full((num_rows,), groups * tokens, jnp.int32).at[row.reshape(-1)].set(token.reshape(-1), mode="drop")
    block_start = jnp.arange(num_rows // block, dtype=jnp.int32) * block
    # Expert of block b: how many experts' runs end at or before its first row. Blocks past the last run
    # hold only empty rows; they compute zeros with the last expert's matrices.
    block_expert = jnp.minimum(jnp.sum(end[None, :] <= block_start[:, None], axis=1), num_experts - 1)
    return Layout(rows, block_expert.astype(jnp.int32), row.reshape(groups * tokens, k).astype(jnp.int32))


def sorted_blocks(tokens, routing: Routing, expert_ffn: ExpertFFN, params, state, policy: PrecisionPolicy, *,
                  capacity: int, block: int):
    """tokens <float32>[G, S, D] -> [G, S, D] through a sorted, block-padded buffer (module docstring)."""
    groups, seq, d = tokens.shape
    num_experts = params["wo"].shape[0]
    layout = sorted_layout(routing, num_experts, capacity, block)

    def matmul(name, x, out="matmul_out"):  # (NB, block, K) x (E, K, N) -> (NB, block, N)
        return ops.grouped_dot(x, params[name], layout.block_expert, policy, lhs="expert_operands",
                               rhs="expert_operands", out=out, state=state[name])

    expert_in = ops.gather_rows(tokens.reshape(groups * seq, d), layout.rows, policy, lhs="activations",
                                out="comm", state=state["dispatch"])  # (P, D)
    expert_out = expert_ffn(expert_in.reshape(-1, block, d), matmul)  # (NB, block, D)
    # Back to token order: each request's output row (0 where dropped). Pure data movement (its transpose
    # adds at most one term per row), so the values are still `comm` values.
    per_request = jnp.take(expert_out.reshape(-1, d), layout.request_row, axis=0, mode="fill", fill_value=0)
    per_request = ops.exact(per_request, like=expert_out)  # (G*S, K, D)
    y = ops.dot("tkd,tk->td", per_request, routing.gates.reshape(groups * seq, -1), policy, lhs="comm",
                rhs="combine_weights", out="activations", state=state["combine"], rhs_grad="router_grads")
    return y.reshape(groups, seq, d)
