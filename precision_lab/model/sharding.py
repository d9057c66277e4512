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
call happens while tracing under `make_sharded_apply` or `use_mesh` (a mesh is active only during that
trace, so a jitted single-device `apply` is never affected). The model's math does not depend on the mesh:
the number of groups comes from cfg.group_size alone. When the groups do not split over data x expert
devices (the tiny preset's decoder has one group per batch), they are split over the mesh axes that divide
them (data, else expert, else none: replicated), a layout choice that changes no routing decision. The
expert axis of the weights must split evenly (num_experts divisible by the expert axis): that is an error.

A whole training run uses a mesh through `train.mesh` ("data=2,expert=4", see `parse_mesh`), which the
trainer (precision_lab/train.py) traces its step under.

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


AXES = (DATA, EXPERT)


def parse_mesh(value) -> dict[str, int]:
    """A mesh as axis sizes: "data=2,expert=4", a table {data = 2, expert = 4}, or "" / {} for none.
    Missing axes are 1. UserError (one line, the valid axis names) for anything else."""
    example = 'valid: "data=D,expert=E" or a table {data = D, expert = E} with positive integers'
    if isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, eq, size = part.partition("=")
            if not eq:
                raise UserError(f"train.mesh {value!r}: {part!r} is not AXIS=SIZE; {example}")
            items.append((name.strip(), size.strip()))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise UserError(f"train.mesh {value!r}: not a mesh; {example}")
    sizes = {}
    for name, size in items:
        if name not in AXES:
            from precision_lab.errors import unknown_choice

            raise UserError(f"train.mesh: {unknown_choice('mesh axis', name, AXES)}")
        if isinstance(size, str) and size.isdigit():
            size = int(size)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or name in sizes:
            raise UserError(f"train.mesh {value!r}: {name}={size!r} is not a positive size given once; {example}")
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in AXES} if sizes else {}


def mesh_text(sizes: dict[str, int]) -> str:
    """The canonical string of `parse_mesh`'s result ("" for no mesh)."""
    return ",".join(f"{a}={sizes[a]}" for a in AXES) if sizes else ""


def make_mesh(data: int, expert: int, devices=None) -> Mesh:
    """A (data, expert) mesh over the first data*expert devices."""
    devices = list(jax.devices() if devices is None else devices)
    if data * expert > len(devices):
        raise UserError(f"mesh data={data} x expert={expert} needs {data * expert} devices, have {len(devices)}")
    return Mesh(np.array(devices[: data * expert]).reshape(data, expert), (DATA, EXPERT))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """While tracing inside this context, the model's `constrain` calls lay values out over `mesh`."""
    _ACTIVE.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.pop()



def constrain(x, kind: str):
    """Annotate `x` with the layout `kind` ("groups" or "experts") when a mesh is active; else return x.

    A dimension that the spec's mesh axes do not divide is split over the ones that do (or replicated),
    except the experts' own axis, which must split evenly (UserError)."""
    if not _ACTIVE:
        return x
    mesh = _ACTIVE[-1]
    spec = []
    for i, (dim, axes) in enumerate(zip(x.shape, _SPECS[kind])):
        names = axes if isinstance(axes, tuple) else (axes,)
        fits = [c for c in (names, *((a,) for a in names)) if dim % math.prod(mesh.shape[a] for a in c) == 0]
        if kind == "experts" and i == 0 and names not in fits:
            raise UserError(f"{dim} experts do not split over mesh axis {names[0]} of {mesh.shape[names[0]]} "
                            "devices; valid: an expert axis that divides model.num_experts")
        spec.append((fits[0] if len(fits[0]) > 1 else fits[0][0]) if fits else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def is_expert_weight(path) -> bool:
    """A leaf under a sparse layer's "moe" sublayer that is not its router (an [E, ...] expert weight)."""
    keys = [getattr(k, "key", None) for k in path]
    return "moe" in keys and keys[-1] != "router"


def param_shardings(params, mesh: Mesh):
    """NamedSharding per leaf: expert weights split over "expert" on axis 0, the rest replicated."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, P(EXPERT) if is_expert_weight(path) else P()), params)


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
        with use_mesh(mesh):
            return transformer.apply(params, scale_state, batch, cfg=cfg, policy=policy, train=train, key=key,
                                     return_logits=return_logits)

    return jax.jit(sharded_apply)
