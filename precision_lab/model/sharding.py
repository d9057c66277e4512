"""Expert parallelism with jax.sharding: the same `apply`, run SPMD over a ("data", "expert") mesh.

Layout (as in flaxformer / GShard):
  * batch: examples split over "data" (replicated over "expert");
  * parameters: every expert weight ([E, ...] under a "moe" sublayer, router excluded) split over "expert" on
    its expert axis; everything else replicated;
  * routing groups (G, S, D): split over ("data", "expert") jointly, so each device routes its own groups;
  * expert inputs/outputs (E, G, C, D): experts over "expert", groups over "data". Going from the group layout
    to the expert layout and back is the all-to-all of expert parallelism; XLA's SPMD partitioner inserts the
    collectives where the sharding constraints below change layout, right at the dispatch/combine einsums,
    whose outputs the model rounds to the policy's `comm` component (so what crosses devices is
    `comm`-format values). On XLA:CPU the partitioner lowers these layout changes to all-gathers plus local
    slicing rather than a literal all-to-all op (same values; TPU/GPU typically emit all-to-all).

The constraints are applied by `constrain(x, kind)` calls inside the MoE layer; they are no-ops unless the
call happens while tracing under `make_sharded_apply` (a mesh is active only during that trace, so a jitted
single-device `apply` is never affected). The model's math does not depend on the mesh: the number of
groups comes from cfg.group_size alone, and a mesh that cannot split it evenly is an error, not a silent
change of routing.

Equality with the single-device run: the same numbers are computed, but not always summed in the same order.
  * routing decisions are identical (each group is routed on one device from the same logits);
  * float32 sums can be re-associated: XLA:CPU blocks matmuls differently for the smaller per-device shapes,
    the batch means of the losses sum partial results across "data", and weight gradients sum over the
    batch in per-device partial sums. Measured (tests/test_sharding.py, tiny, fp32): per-token losses within
    a few float32 ulp (3e-6 relative), gradients within ~1e-6 of each tensor's max. Rounding the all-to-all
    payload to bf16 does not make the run bit-identical (attention and the output projection still differ
    by an ulp), and with low-precision "grads" a one-ulp difference can flip a later rounding, so the tests
    compare fp32 runs at rtol 1e-5 rather than claim bit-equality.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from precision_lab.errors import UserError

DATA, EXPERT = "data", "expert"
_SPECS = {
    "groups": P((DATA, EXPERT)),  # (G, S, D)
    "experts": P(EXPERT, DATA),  # (E, G, C, D)
}
_ACTIVE: list[Mesh] = []  # the mesh of the trace in progress (a stack: traces do not nest in practice)


def make_mesh(data: int, expert: int, devices=None) -> Mesh:
    """A (data, expert) mesh over the first data*expert devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data * expert > len(devices):
        raise UserError(f"mesh data={data} x expert={expert} needs {data * expert} devices, have {len(devices)}")
    return Mesh(np.array(devices[: data * expert]).reshape(data, expert), (DATA, EXPERT))


@contextlib.contextmanager
def _use_mesh(mesh: Mesh):
    _ACTIVE.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x, kind: str):
    """Annotate `x` with the layout `kind` ("groups" or "experts") when a mesh is active; else return x."""
    if not _ACTIVE:
        return x
    mesh = _ACTIVE[-1]
    spec = _SPECS[kind]
    for dim, axes in zip(x.shape, spec):
        names = axes if isinstance(axes, tuple) else (axes,)
        parts = math.prod(mesh.shape[a] for a in names)
        if dim % parts:
            raise UserError(f"{kind} axis of size {dim} does not split over mesh axes {names} ({parts} devices); "
                            "choose group_size / batch / num_experts so it divides")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_expert_weight(path) -> bool:
    keys = [getattr(k, "key", None) for k in path]
    return "moe" in keys and keys[-1] != "router"


def param_shardings(params, mesh: Mesh):
    """NamedSharding per leaf: expert weights split over "expert" on axis 0, the rest replicated."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, P(EXPERT) if _is_expert_weight(path) else P()), params)


def batch_shardings(batch, mesh: Mesh):
    """Every batch array split over "data" on its leading (example) axis."""
    return jax.tree.map(lambda _: NamedSharding(mesh, P(DATA)), batch)


def shard(params, scale_state, batch, mesh: Mesh):
    """Place params (experts split), scale state (replicated) and batch (split over data) on the mesh."""
    replicated = NamedSharding(mesh, P())
    return (jax.device_put(params, param_shardings(params, mesh)),
            jax.device_put(scale_state, jax.tree.map(lambda _: replicated, scale_state)),
            jax.device_put(batch, batch_shardings(batch, mesh)))


def make_sharded_apply(mesh: Mesh, *, cfg, policy, train: bool, return_logits: bool = False):
    """A jitted `(params, scale_state, batch, key) -> ModelOutput`: `transformer.apply` traced under `mesh`.

    Use it on arrays placed by `shard`; grads: `jax.grad(lambda p: f(p, s, b, k).loss)(params)`.
    """
    from precision_lab.model import transformer  # here: transformer -> moe -> sharding imports this module

    if cfg.num_experts and cfg.expert_dispatch != "dense":
        raise UserError(f"expert parallelism needs expert_dispatch='dense' (the [E, G, C, D] layout that splits "
                        f"over experts), got {cfg.expert_dispatch!r}; valid: 'dense'")

    def sharded_apply(params, scale_state, batch, key):
        with _use_mesh(mesh):
            return transformer.apply(params, scale_state, batch, cfg=cfg, policy=policy, train=train, key=key,
                                     return_logits=return_logits)

    return jax.jit(sharded_apply)
