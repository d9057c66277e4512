"""Training: a jitted step with many seeds of one configuration vmapped into one program, the precision
policy applied to parameters, gradients and optimizer state, divergence detection, telemetry, eval and
checkpoints that resume bit-identically.

Per step and seed:
    loss = CE + c_B * L_B + c_z * L_z (+ c_out * output z-loss)       (the model computes it)
    grads    -> rounded to the policy's grad_allreduce format          (the data-parallel all-reduce)
    updates  <- optimiser (state stored in the optimizer_state format)
    master   <- round(master + updates) in the master format           (stochastic rounding allowed)
    forward reads round(master) in the params format
A seed whose loss turns non-finite is frozen inside the step; every other rule of `divergence` runs on the
host between compiled chunks of `train.chunk_steps` steps and freezes the seed from then on. NaN and
divergence are results, recorded per seed, never exceptions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from precision_lab import model as stmoe
from precision_lab.model import sharding
from precision_lab import ops, program_cache, specialization
from precision_lab.config import RunConfig
from precision_lab.data import NUM_SPECIAL, Dataset, make_dataset, stack_batches
from precision_lab.divergence import DivergenceMonitor, classify_outcome
from precision_lab.errors import UserError
from precision_lab.finetune import load_params, save_params, trainable_labels
from precision_lab.optim import make_optimizer_traced_lr, map_float_leaves
from precision_lab.policy import PrecisionPolicy
from precision_lab.tasks import make_task

_F32 = jnp.float32

# Hyperparameters that enter the compiled step as traced values, one per vmapped member: runs that differ
# only in these (and in their seed) share one program and train side by side.
# The policy's traced format (`policy.traced_format`, see precision_lab.policy.TRACED_KEYS) enters as its two
# widths: runs that differ only in the format their traced component group rounds to share one program.
BATCHABLE_FIELDS: dict[str, str] = {
    "optim.lr": "lr",
    "model.load_balance_coef": "load_balance_coef",
    "model.router_z_loss_coef": "router_z_loss_coef",
    "model.output_z_loss_coef": "output_z_loss_coef",
    "policy.traced_format": "traced_format",
}
TRACED_WIDTHS = ("traced_exponent_bits", "traced_mantissa_bits")  # the hparams that carry it


def hparams_of(run: RunConfig) -> dict[str, float]:
    """The batchable hyperparameters of a run, by their short names (a traced format by its widths, only
    when the policy has traced specs: every other program is unchanged)."""
    hp = dict(lr=run.optim.lr, load_balance_coef=run.model.load_balance_coef,
              router_z_loss_coef=run.model.router_z_loss_coef, output_z_loss_coef=run.model.output_z_loss_coef)
    fmt = run.policy.traced_format
    if fmt is not None:
        hp.update(zip(TRACED_WIDTHS, (float(fmt.exponent_bits), float(fmt.mantissa_bits))))
    return hp


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
    """Keep compiled programs on disk, so a sweep compiles each shape once across processes and reruns.

    Default folder: $PRECISION_LAB_CACHE, else ~/.cache/precision_lab/jax.
    """
    path = path or os.environ.get("PRECISION_LAB_CACHE") or Path.home() / ".cache" / "precision_lab" / "jax"
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # and the Trainer's whole executables beside it, so a warm run skips tracing and lowering too
    program_cache.enable(Path(path) / "precision_lab_programs")


class TrainState(NamedTuple):
    master: Any  # float32 storage of the master weights (values in the master format)
    opt_state: Any
    scale_state: Any  # delayed-scaling histories, one per dot site (or None)
    active: jax.Array  # <bool>[]: False once the seed diverged (frozen)
    # <int32>[2] (exponent bits, mantissa bits) of the member's traced format (policy specs with `traced`),
    # None without: every rounding of the member (train, eval, routing) reads it through ops.traced_format
    formats: Any = None


def _without_batchable(config: dict) -> dict:
    """`config` (RunConfig.to_dict) without the BATCHABLE_FIELDS that are plain values (not the traced
    format, which lives in the policy's strings) and without train.label (a name, not a setting)."""
    out = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in config.items()}
    for dotted in (*BATCHABLE_FIELDS, "train.label"):
        section, _, field = dotted.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(field, None)
    return out


def _rounder(policy: PrecisionPolicy, component: str):
    """A tree function that rounds every float leaf to `component`'s spec (stochastic needs the key)."""

    def round_tree(tree, key=None):
        leaves, treedef = jax.tree.flatten(tree)
        keys = list(jax.random.split(key, len(leaves))) if key is not None else [None] * len(leaves)
        out = [ops.cast(x, policy, component, key=k) if jnp.issubdtype(x.dtype, jnp.floating) else x
               for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, out)

    return round_tree


def _needs_key(policy: PrecisionPolicy, component: str) -> bool:
    return policy[component].rounding == "stochastic"


class Trainer:
    """Compiles and runs the vmapped train/eval steps of one RunConfig (one shape) for a list of seeds."""

    def __init__(self, run: RunConfig, dataset: Dataset | None = None):
        self.run = run
        self.dataset = dataset or make_run_dataset(run)
        self.model_cfg = run.model
        if self.dataset.vocab_size != run.model.vocab_size:  # text data decides the vocabulary
            self.model_cfg = dataclasses.replace(run.model, vocab_size=self.dataset.vocab_size)
        self.policy = run.policy
        state_rounding = self.policy["optimizer_state"]
        quantize_state = None if state_rounding.is_identity else map_float_leaves(
            lambda x: ops.cast(x, self.policy, "optimizer_state"))
        self.optimizer = make_optimizer_traced_lr(run.optim, quantize_state=quantize_state)
        self.replicas = run.train.replicas
        if run.finetune.trainable != "all":  # frozen parameters: a zero update and no optimiser state
            self.optimizer = optax.partition(
                {"trainable": self.optimizer, "frozen": optax.set_to_zero()},
                lambda params: trainable_labels(params, run.finetune.trainable))
        self.mesh = run_mesh(run)  # None: one device per vmapped member (member_sharding)
        # Each program is a function of the run configuration (and the model as resolved against the data)
        # and of its arguments' shapes: the program cache keys it so (precision_lab.program_cache). Not of
        # the batchable hyperparameters, which reach it as traced values (a sweep group relies on the same).
        describe = functools.cache(lambda: json.dumps(
            {"run": _without_batchable(run.to_dict()), "model": dataclasses.asdict(self.model_cfg)},
            sort_keys=True, default=repr))
        self._chunk = program_cache.CachedProgram(
            jax.jit(self._under_mesh(self._chunk_impl), donate_argnums=(0,)), "chunk", describe)
        self._eval = program_cache.CachedProgram(
            jax.jit(self._under_mesh(jax.vmap(self._eval_one, in_axes=(0, 0, None)), replicate_out=True)), "eval",
            describe)
        self._init = program_cache.CachedProgram(jax.jit(jax.vmap(self.init_one)), "init", describe)

    # -- a device mesh (train.mesh) ----------------------------------------------------------------------------

    def _under_mesh(self, fn, replicate_out: bool = False):
        """`fn`, traced with the mesh active so the model's sharding constraints apply (no mesh: `fn`);
        `replicate_out`: its result replicated on every device (so every process can read it)."""
        if self.mesh is None:
            return fn

        def traced(*args):
            with sharding.use_mesh(self.mesh):
                out = fn(*args)
            if replicate_out:
                from jax.sharding import NamedSharding, PartitionSpec

                out = jax.lax.with_sharding_constraint(out, NamedSharding(self.mesh, PartitionSpec()))
            return out

        return traced

    def shardings(self, tree):
        """Per leaf of a state, key or hyperparameter tree (member axis first): expert weights and their
        optimizer statistics split over "expert" on the axis after the member axis; everything else
        replicated."""
        from jax.sharding import NamedSharding, PartitionSpec

        experts, e = self.model_cfg.num_experts, self.mesh.shape[sharding.EXPERT]

        def one(path, x):
            top = getattr(path[0], "name", None) if path else None  # TrainState field
            split = (top in ("master", "opt_state") and sharding.is_expert_weight(path) and x.ndim >= 2
                     and x.shape[1] == experts and experts % e == 0)
            return NamedSharding(self.mesh, PartitionSpec(None, sharding.EXPERT) if split else PartitionSpec())

        return jax.tree_util.tree_map_with_path(one, tree)

    def mesh_placement(self):
        """(place(tree), place_batches(batches)) onto the mesh: state by `shardings`, batches
        <int32>[k, members, B, L] split over "data" on B."""
        from jax.sharding import NamedSharding, PartitionSpec

        batch_spec = NamedSharding(self.mesh, PartitionSpec(None, None, sharding.DATA))
        return (lambda tree: jax.tree.map(_to_mesh, tree, self.shardings(tree)),
                lambda batches: jax.tree.map(lambda x: _to_mesh(x, batch_spec), batches))

    # -- one seed ------------------------------------------------------------------------------------------

    def init_one(self, seed_key, pretrained=None, formats=None):
        master, scale_state = stmoe.init(jax.random.fold_in(seed_key, 0), self.model_cfg, self.policy)
        if pretrained is not None:  # fine-tuning: the pretrained weights, fresh scaling and optimiser state
            master = pretrained
        with ops.traced_format(formats):
            master = _rounder(self.policy, "master")(master, jax.random.fold_in(seed_key, 1)
                                                      if _needs_key(self.policy, "master") else None)
            with ops.rounding_keys(jax.random.fold_in(seed_key, 4)):  # a stochastic optimizer_state
                opt_state = self.optimizer.init(master)
        return TrainState(master, opt_state, scale_state, jnp.array(True), formats)

    def _loss(self, params, scale_state, probe, batch, key, hp, weights=None):
        """(loss, ModelOutput). probe: the precision-telemetry probe (ops.count_roundings) or None.
        weights (one replica of R): (w_tokens, w_aux) multiply the token-mean parts (CE, output z-loss) and
        the router losses, so the R replicas' losses sum to the full batch's (see _replica_grads)."""
        with ops.count_roundings(probe):
            out = stmoe.apply(params, scale_state, batch, cfg=self.model_cfg, policy=self.policy, train=True,
                              key=key)
        parts = (out.ce_loss, out.output_z_loss, out.router_z_loss, out.load_balancing_loss)
        if weights is not None:
            w_tokens, w_aux = weights
            parts = (parts[0] * w_tokens, parts[1] * w_tokens, parts[2] * w_aux, parts[3] * w_aux)
        loss = stmoe.total_loss(*parts, cfg=self.model_cfg, load_balance_coef=hp["load_balance_coef"],
                                router_z_loss_coef=hp["router_z_loss_coef"],
                                output_z_loss_coef=hp["output_z_loss_coef"])
        return loss, out

    def _replica_grads(self, grad_fn, params, scale_state, probe, batch, key, hp):
        """Emulated data parallelism: the batch split into R equal shards (consecutive sequences), each
        shard's loss and gradient computed separately (vmapped), as R replicas would.

        Replica r's loss is (its token sum of CE and output z-loss) / (the batch's token count) + (its
        router losses) / R: the sum over replicas is then exactly the full batch's loss (CE is a mean over
        the batch's target tokens, the router losses a mean over routing groups, equal in number per
        shard), and the SUM of the replicas' gradients is the full-batch gradient (the all-reduce sums).
        Each replica routes its own tokens in its own groups (group_size and capacity per replica group,
        as in real data parallelism); when the full batch's groups are the shards' groups, routing is the
        same as R = 1. Delayed-scaling amax histories are reduced by max over replicas (Transformer Engine
        reduces amax across the data-parallel group). Returns (loss, combined output, per-replica grads
        [R, ...], new scale state, probe counts summed over replicas or None)."""
        r = self.replicas
        shards = jax.tree.map(lambda x: x.reshape(r, x.shape[0] // r, *x.shape[1:]), batch)
        n_total = jnp.maximum(jnp.sum(batch["loss_mask"]), jnp.float32(1.0))
        n_shard = jnp.maximum(jnp.sum(shards["loss_mask"], axis=tuple(range(1, batch["loss_mask"].ndim + 1))),
                              jnp.float32(1.0))
        w_tokens = n_shard / n_total  # (R,)

        def one(shard, k, w):
            return grad_fn(params, scale_state, probe, shard, k, hp, (w, jnp.float32(1.0 / r)))

        (losses, outs), (grads, scale_r, counts) = jax.vmap(one)(shards, jax.random.split(key, r), w_tokens)
        new_scale_state = jax.tree.map(lambda x: jnp.max(x, axis=0), scale_r)
        counts = None if counts is None else jnp.sum(counts, axis=0)
        mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
        tokens = lambda x: jnp.sum(x * w_tokens.reshape((r,) + (1,) * (x.ndim - 1)), axis=0)  # noqa: E731
        out = outs._replace(
            ce_loss=tokens(outs.ce_loss), output_z_loss=tokens(outs.output_z_loss),
            output_lse_mean=tokens(outs.output_lse_mean), router_z_loss=mean(outs.router_z_loss),
            load_balancing_loss=mean(outs.load_balancing_loss),
            max_attention_logit=jnp.max(outs.max_attention_logit, axis=0),
            router={k: (jnp.max(v, axis=0) if k.startswith("max") else mean(v)) for k, v in outs.router.items()})
        return jnp.sum(losses), out, grads, new_scale_state, counts

    def step_one(self, state: TrainState, batch, seed_key, hp, step):
        """One optimiser step of one seed. Returns (new state, metrics dict of scalars/[layers] arrays)."""
        with ops.traced_format(state.formats):
            return self._step_one(state, batch, seed_key, hp, step)

    def _step_one(self, state: TrainState, batch, seed_key, hp, step):
        key = jax.random.fold_in(jax.random.fold_in(seed_key, 2), step)
        k_model, k_params, k_master = jax.random.split(key, 3)
        params = _rounder(self.policy, "params")(state.master, k_params if _needs_key(self.policy, "params") else None)
        telemetry = self.run.train.precision_telemetry
        probe = ops.new_probe() if telemetry else None
        grad_fn = jax.value_and_grad(self._loss, argnums=(0, 1, 2), has_aux=True)
        if self.replicas == 1:
            (loss, out), (grads, new_scale_state, site_counts) = grad_fn(params, state.scale_state, probe, batch,
                                                                         k_model, hp)
        else:
            loss, out, grads, new_scale_state, site_counts = self._replica_grads(
                grad_fn, params, state.scale_state, probe, batch, k_model, hp)
        # Stochastic grad_allreduce / optimizer_state roundings draw from a key of this seed and step.
        # The all-reduce as float32 would compute it (R = 1: the local gradient), for the telemetry's relative
        # error; None where nothing is rounded (R = 1, float32 all-reduce: the error is exactly 0, and computing
        # it anyway changed XLA's fusion of the update and the trajectory by an ulp, even behind an
        # optimization barrier: test_telemetry_changes_no_result).
        exact = None
        if telemetry and not (self.replicas == 1 and self.policy["grad_allreduce"].is_identity):
            exact = grads if self.replicas == 1 else jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
        with ops.rounding_keys(jax.random.fold_in(key, 3)):
            if self.replicas == 1:
                reduced = _rounder(self.policy, "grad_allreduce")(grads)
                allreduce_counts = _tree_counts(grads, reduced, self.policy["grad_allreduce"]) if telemetry else None
                grads = reduced
            else:
                reduced = ops.ring_allreduce(
                    grads, self.policy, "grad_allreduce", with_counts=telemetry,
                    key=jax.random.fold_in(k_model, 1) if _needs_key(self.policy, "grad_allreduce") else None)
                grads, allreduce_counts = reduced if telemetry else (reduced, None)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.master, peak_lr=hp["lr"])
        stepped = jax.tree.map(lambda p, u: p + u, state.master, updates)
        master = _rounder(self.policy, "master")(stepped, k_master if _needs_key(self.policy, "master") else None)

        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = state.active & finite  # a non-finite step freezes the seed before it poisons the state
        new = TrainState(master, opt_state, new_scale_state, keep, state.formats)
        new = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, state._replace(active=keep))
        metrics = _telemetry(out)
        metrics.update(loss=loss, grad_norm=grad_norm, update_rms=_rms(updates), param_rms=_rms(state.master))
        if telemetry:
            metrics.update(_precision_telemetry(site_counts, allreduce_counts, updates, state.master, master))
            metrics["allreduce_rel_error"] = jnp.float32(0.0) if exact is None else (
                _global_norm(jax.tree.map(jnp.subtract, grads, exact))
                / jnp.maximum(_global_norm(exact), jnp.float32(1e-30)))
        # after a seed froze its numbers are not training results any more: NaN marks them
        metrics = jax.tree.map(lambda m: jnp.where(state.active, m.astype(_F32), jnp.nan), metrics)
        return new, metrics

    def _eval_one(self, state: TrainState, seed_key, batch):
        with ops.traced_format(state.formats):
            with ops.rounding_keys(jax.random.fold_in(seed_key, 5)):  # stochastic `params`
                params = _rounder(self.policy, "params")(state.master)
            out = stmoe.apply(params, state.scale_state, batch, cfg=self.model_cfg, policy=self.policy,
                              train=False, key=jax.random.fold_in(seed_key, 3), return_logits=True)
        return exact_cross_entropy(out.logits, batch["targets"], batch["loss_mask"])

    def _route_one(self, state: TrainState, seed_key, batch):
        """The top-1 expert of every position, per sparse layer: a tuple of <int32>[B, L_stack] (what
        `_eval_one` evaluates, routed the same way: eval capacity factor, the same keys)."""
        with ops.traced_format(state.formats):
            with ops.rounding_keys(jax.random.fold_in(seed_key, 5)):
                params = _rounder(self.policy, "params")(state.master)
            out = stmoe.apply(params, state.scale_state, batch, cfg=self.model_cfg, policy=self.policy,
                              train=False, key=jax.random.fold_in(seed_key, 3))
        stacks = [name.split("/")[0] for name in self.model_cfg.moe_layer_names()]
        shape = {"encoder": batch["inputs"].shape, "decoder": batch["decoder_inputs"].shape}
        return tuple(idx[..., 0].reshape(shape[st]) for idx, st in zip(out.expert_index, stacks))

    def routing_statistics(self, state, seed_keys, n_batches: int) -> list[list[dict]] | None:
        """Per seed and sparse layer, `precision_lab.specialization` statistics of the final parameters on
        `n_batches` held-out batches labelled with their language; None for a dense model or when the data
        cannot label its batches (a fine-tuning task)."""
        if not self.model_cfg.moe_layer_names() or self.run.finetune.active:
            return None
        batches = self.dataset.eval_batches(n_batches, self.run.train.batch_size, with_language=True)
        route = jax.jit(self._under_mesh(jax.vmap(self._route_one, in_axes=(0, 0, None)), replicate_out=True))
        model_batch = lambda b: {k: v for k, v in b.items() if k != "language"}  # noqa: E731
        top1 = [[np.asarray(x) for x in route(state, seed_keys, model_batch(b))] for b in batches]
        languages = getattr(getattr(self.dataset, "language", None), "languages", None)
        return specialization.routing_statistics(
            top1, batches, list(self.model_cfg.moe_layer_names()), num_experts=self.model_cfg.num_experts,
            num_languages=len(languages) if languages is not None else None)

    # -- many seeds, many steps ------------------------------------------------------------------------------

    def _chunk_impl(self, state, seed_keys, hps, batches, step0):
        """lax.scan over the leading (step) axis of `batches` <int32>[k, members, B, L]."""

        def body(state, xs):
            batch, i = xs
            if seed_keys.shape[0] == 1:
                # One member runs unbatched: XLA:CPU lays a size-1 vmapped axis out with extra copies and
                # transposes (matched step: 1,065 vs 928 copies), 16-18% of the step (benchmarks/RESULTS.md).
                first = lambda tree: jax.tree.map(lambda x: x[0], tree)
                out = self.step_one(first(state), first(batch), seed_keys[0], first(hps), step0 + i)
                return jax.tree.map(lambda x: x[None], out)
            return jax.vmap(self.step_one, in_axes=(0, 0, 0, 0, None))(state, batch, seed_keys, hps, step0 + i)

        k = jax.tree.leaves(batches)[0].shape[0]
        state, metrics = jax.lax.scan(body, state, (batches, jnp.arange(k)))
        if self.mesh is not None:  # the next chunk gets the state laid out as this one did (no recompile);
            # the metrics replicated, so every process (several hosts) can read them
            from jax.sharding import NamedSharding, PartitionSpec

            state = jax.lax.with_sharding_constraint(state, self.shardings(state))
            metrics = jax.lax.with_sharding_constraint(metrics, NamedSharding(self.mesh, PartitionSpec()))
        return state, metrics

    def init(self, seeds: list[int], hparams: list[dict] | None = None):
        """(state, seed keys) of `seeds`; `hparams` (one dict per seed) give each member its traced format
        (default: the run's own, `hparams_of`)."""
        seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        formats = None
        if self.policy.traced_format is not None:
            hparams = hparams or [hparams_of(self.run)] * len(seeds)
            formats = jnp.asarray([[h[w] for w in TRACED_WIDTHS] for h in hparams], jnp.int32)
        pretrained = None
        if self.run.finetune.active:
            template = jax.eval_shape(lambda k: stmoe.init(k, self.model_cfg, self.policy)[0], jax.random.key(0))
            pretrained = load_params(self.run.finetune.from_run, template, seeds)
        return self._init(seed_keys, pretrained, formats), seed_keys


    def batches(self, seeds: list[int], step0: int, k: int):
        return stack_batches([self.dataset.seed_batches(step0 + i, self.run.train.batch_size, seeds)
                              for i in range(k)])

    def evaluate(self, state, seed_keys, batches=None) -> np.ndarray:
        """Mean held-out cross entropy per seed (nats per target token), at the eval capacity factor, over
        `batches` (default: the dataset's evaluation batches)."""
        return np.mean(self.evaluate_batches(state, seed_keys, batches), axis=0)

    def evaluate_batches(self, state, seed_keys, batches=None) -> np.ndarray:
        """<float>[batches, seeds]: held-out cross entropy of each batch (their spread over the evaluation
        batches is the evaluation noise a report sets beside the seed noise)."""
        if batches is None:
            batches = self.dataset.eval_batches(self.run.train.eval_batches, self.run.train.batch_size)
        return np.stack([np.asarray(self._eval(state, seed_keys, b)) for b in batches])


def make_run_dataset(run: RunConfig) -> Dataset:
    """The run's data: its pretraining data, or, when fine-tuning, the task built from that data's languages."""
    if not run.finetune.active:
        return make_dataset(run.data)
    return make_task(run.finetune.task, run.data, inputs_length=run.model.inputs_length,
                     targets_length=run.model.targets_length, vocab_size=run.model.vocab_size)


def _to_mesh(x, target):
    """`x` (an array this process holds whole, the same in every process) laid out as `target`. With
    several processes (jax.distributed) `device_put` cannot reach other hosts' devices: each process
    hands over the slices its own devices hold."""
    if target.is_fully_addressable:
        return jax.device_put(x, target)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_to_mesh(jax.random.key_data(x), target),
                                        impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def _to_host(x) -> np.ndarray:
    """The whole value of `x` as numpy, also when other processes hold parts of it (then all must call)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_mesh(run: RunConfig):
    """The (data, expert) Mesh of `run.train.mesh` over the devices JAX sees, or None without a mesh.
    Its sizes must multiply to the device count (run_config checked everything else)."""
    sizes = sharding.parse_mesh(run.train.mesh)
    if not sizes:
        return None
    n, have = sizes[sharding.DATA] * sizes[sharding.EXPERT], jax.device_count()
    if n != have:
        raise UserError(f"train.mesh {run.train.mesh} needs {n} devices, JAX sees {have} "
                        f"({jax.default_backend()}); valid: sizes that multiply to {have}")
    return sharding.make_mesh(sizes[sharding.DATA], sizes[sharding.EXPERT])


def member_sharding(num_members: int):
    """Spread vmapped members over the local devices: `place(tree, axis)` puts each array's member axis
    (`axis`) on a 1-D "members" mesh of the largest device count that divides num_members.

    Members are independent, so this is plain data parallelism with no communication: on a CPU with
    several XLA host devices (`precision_lab.cli` asks for one per core) the members' programs run side
    by side, where one vmapped program keeps about one core busy between its large matmuls (4 vmapped
    members on each of 2 devices beat 2 on each of 4 and 1 on each of 8; 8 quick-start seeds
    still cost 5.2-5.6x one seed on 2 cores: benchmarks/RESULTS.md, rounds 7-10). On one device, `place` is
    a no-op. Each member's numbers may differ from an unsharded run by float32 re-association (XLA picks
    kernels for the per-device shapes)."""
    devices = jax.local_devices()
    count = max(n for n in range(1, len(devices) + 1) if num_members % n == 0)
    if count == 1:
        return count, lambda tree, axis=0: tree
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices[:count]), ("members",))

    def place(tree, axis: int = 0):
        spec = NamedSharding(mesh, PartitionSpec(*([None] * axis), "members"))
        return jax.tree.map(lambda x: jax.device_put(x, spec), tree)

    return count, place


def exact_cross_entropy(logits, targets, loss_mask):
    """Masked mean cross entropy of `logits` <float32>[B, Lt, V] (as the model produced them, in its
    output_logits format) computed in float32: what evaluation reports. Training's loss is computed in the
    policy's output_logits format (its roundings shape the gradients); scoring the model with that rounded
    loss would make the metric itself depend on the format (with 1 mantissa bit the rounded loss read 0.6
    nats below float32's in sensitivity_map)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * loss_mask) / jnp.maximum(jnp.sum(loss_mask), jnp.float32(1.0))


def _telemetry(out) -> dict:
    """Per-step scalars and per-sparse-layer [M] arrays from a ModelOutput."""
    metrics = dict(ce=out.ce_loss, router_z_loss=out.router_z_loss, load_balancing_loss=out.load_balancing_loss,
                   output_z_loss=out.output_z_loss, output_lse=out.output_lse_mean,
                   max_attention_logit=out.max_attention_logit)
    metrics.update({f"router_{k}": v for k, v in out.router.items()})
    return metrics


def _tree_counts(before, after, spec):
    """ops.rounding_counts summed over the leaves of a tree rounded from `before` to `after` per `spec`."""
    return sum(ops.rounding_counts(x, y, spec) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _precision_telemetry(site_counts, allreduce_counts, updates, old_master, new_master) -> dict:
    """Per-step precision telemetry (train.precision_telemetry): underflow_frac/SITE and overflow_frac/SITE
    for every matmul site group's operands (SITE = GROUP_fwd) and incoming gradients (GROUP_bwd, rounded to
    `grads`), for all gradient roundings together (grads) and for the all-reduce (grad_allreduce); and
    lost_update_frac: of the parameters with a nonzero intended update, the fraction whose master value did
    not move after rounding into the master format (Zamirai et al. 2020's cancelled small updates); and
    applied_update_ratio = sum |applied update| / sum |intended update|. (step_one adds allreduce_rel_error:
    ||all-reduced gradient - its float32 sum|| / ||float32 sum||, the all-reduce's own roundoff.)"""
    out = ops.fractions(site_counts)
    bwd = [i for i, site in enumerate(ops.TELEMETRY_SITES) if site.endswith("_bwd")]
    out.update(ops.fractions(jnp.sum(site_counts[np.asarray(bwd)], axis=0), "grads"))
    out.update(ops.fractions(allreduce_counts, "grad_allreduce"))
    pairs = list(zip(jax.tree.leaves(updates), jax.tree.leaves(old_master), jax.tree.leaves(new_master)))
    intended = sum(jnp.sum(u != 0, dtype=_F32) for u, _, _ in pairs)
    lost = sum(jnp.sum((u != 0) & (new == old), dtype=_F32) for u, old, new in pairs)
    out["lost_update_frac"] = jnp.where(intended > 0, lost / jnp.maximum(intended, jnp.float32(1.0)),
                                        jnp.float32(0.0))
    # sum |applied| / sum |intended|: ~1 when the updates arrive on average (stochastic rounding moves a
    # weight by a whole ulp with probability |update|/ulp, so its per-step lost fraction stays high at a tiny
    # lr while this ratio stays ~1); ~0 when round-to-nearest cancels them.
    applied = sum(jnp.sum(jnp.abs(new - old)) for _, old, new in pairs)
    wanted = sum(jnp.sum(jnp.abs(u)) for u, _, _ in pairs)
    out["applied_update_ratio"] = jnp.where(wanted > 0, applied / jnp.where(wanted > 0, wanted, jnp.float32(1.0)),
                                            jnp.float32(0.0))
    return out


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _rms(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves) / sum(x.size for x in leaves))


# -- the loop ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    summary: dict
    metrics: dict[str, np.ndarray]  # name -> [steps, seeds, ...]


def _members(run: RunConfig, seeds, hparams) -> tuple[list[int], list[dict]]:
    """The seeds and per-member hyperparameters `train` runs (defaults: run.train's seeds, the run's values)."""
    seeds = list(seeds if seeds is not None else range(run.train.seed, run.train.seed + run.train.seeds))
    return seeds, list(hparams) if hparams is not None else [hparams_of(run)] * len(seeds)


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _config_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def prepare_out_dir(out_dir: str | Path, run: RunConfig, seeds: list[int] | None = None,
                    hparams: list[dict] | None = None, *, resume: bool = False, force: bool = False) -> str:
    """Decide what `train` may do with `out_dir` before any work: never overwrite silently.

    Returns "new" (train from step 0), "resume" (continue this run's checkpoint) or "finished" (the folder
    already holds this finished run and `resume` was asked: nothing to do). Raises UserError when the folder
    holds a checkpoint and `resume` was not asked, a checkpoint or finished run of another configuration,
    this finished run without `resume`, or a finished run with fewer steps (a finished run keeps no
    checkpoint, so it cannot be extended: train into a new folder). `force` discards what is there
    (checkpoint and outputs) and trains from step 0, except a checkpoint of this very run with `resume`."""
    from precision_lab.errors import UserError

    out = Path(out_dir)
    seeds, hparams = _members(run, seeds, hparams)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; give a folder")
    if (out / "sweep.json").exists():
        raise UserError(f"--out {out}: is a sweep's results store, not a train output folder; use another --out")
    ckpt = out / "checkpoint"
    meta = _read_json(ckpt / "meta.json")
    if meta is not None:
        same = (meta.get("fingerprint") == run.fingerprint() and meta.get("seeds") == seeds
                and meta.get("hparams") == hparams)
        if resume and same:
            return "resume"
        if not force:
            if not resume:
                raise UserError(f"--out {out}: holds the checkpoint of an unfinished run (step {meta.get('step')}); "
                                "--resume continues it, --force discards it and trains from step 0")
            raise UserError(f"{ckpt}: the checkpoint belongs to another configuration or seed list; use a new "
                            "--out folder, or --force to discard it and train from step 0")
    elif (out / "summary.json").exists() and not force:
        summary = _read_json(out / "summary.json") or {}
        diff = _config_diff(_read_json(out / "config.json"), json.loads(json.dumps(run.to_dict())))
        if summary.get("seeds") != seeds:
            diff.append("seeds")
        if not diff and summary.get("hparams") not in (None, hparams):
            diff.append("hparams")  # library callers may give members their own hyperparameters
        if not diff:
            if resume:
                return "finished"
            raise UserError(f"--out {out}: already holds this finished run; --resume does nothing to it, "
                            "--force trains it again and replaces it")
        if set(diff) <= {"train.steps", "optim.total_steps"}:
            steps = (_read_json(out / "config.json") or {}).get("train", {}).get("steps")
            raise UserError(f"--out {out}: holds a finished run of {steps} steps; a finished run cannot be "
                            f"extended to {run.train.steps} (it keeps no checkpoint): train into a new --out, "
                            "or --force to train from step 0 and replace it")
        shown = ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")
        raise UserError(f"--out {out}: holds a finished run of another configuration (differs in {shown}); "
                        "use a new --out, or --force to replace it")
    if force:  # discard what is there now, so the folder never mixes two runs
        shutil.rmtree(ckpt, ignore_errors=True)
        for name in ("summary.json", "metrics.npz", "config.json"):
            (out / name).unlink(missing_ok=True)
    return "new"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train(run: RunConfig, seeds: list[int] | None = None, *, hparams: list[dict] | None = None,
          out_dir: str | Path | None = None, resume: bool = False, force: bool = False,
          progress: bool | Callable[[int], object] = True) -> RunResult:
    """Train `seeds` (default: run.train.seeds seeds from run.train.seed) of one configuration, vmapped.

    `hparams` (one dict per seed, keys from BATCHABLE_FIELDS' values) lets the vmapped members differ in
    learning rate and loss coefficients too; default: the run's own values for every member.
    With `out_dir`, checkpoints go to out_dir/checkpoint every `train.checkpoint_every` steps and `resume`
    continues from the last one; the result is bit-identical to an uninterrupted run. What is already in
    `out_dir` is never overwritten silently (see `prepare_out_dir`; `force` replaces it); `resume` of a
    finished run returns its stored result without training. `progress`: a bar on stderr (True), none
    (False), or a function called with the number of member-steps (members x steps) each chunk finished.
    """
    cfg = run.train
    seeds, hparams = _members(run, seeds, hparams)
    if out_dir is not None and prepare_out_dir(out_dir, run, seeds, hparams, resume=resume,
                                               force=force) == "finished":
        return RunResult(*read_run(out_dir))
    hps = {name: jnp.asarray([h[name] for h in hparams], _F32) for name in hparams_of(run)}
    trainer = Trainer(run)
    t0 = time.perf_counter()
    state, seed_keys = trainer.init(seeds, hparams)
    if trainer.mesh is None:
        member_devices, place = member_sharding(len(seeds))
        place_batches = functools.partial(place, axis=1)
    else:  # every member runs over the whole mesh
        member_devices, (place, place_batches) = 1, trainer.mesh_placement()
    state, seed_keys, hps = place(state), place(seed_keys), place(hps)
    monitor = DivergenceMonitor(run.divergence, num_seeds=len(seeds))
    # Loss spikes (mean + k sigma) that are not a rule of run.divergence are recorded, not acted on.
    spikes = DivergenceMonitor(dataclasses.replace(run.divergence, rules=("sigma",)), num_seeds=len(seeds))
    history: dict[str, list[np.ndarray]] = {}
    evals: list[tuple[int, np.ndarray]] = []
    step = 0
    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if resume and ckpt is not None and (ckpt / "meta.json").exists():
        state, monitor, spikes, history, evals, step = _load_checkpoint(ckpt, run, seeds, hparams, state)
        state = place(state)

    bar = _progress(cfg.steps, step, progress is True)
    if bar is not None:
        bar.set_description_str("compiling", refresh=True)  # the first chunk compiles: minutes on big models
    compile_s, step_s, data_s = 0.0, 0.0, 0.0

    def chunk_batches(start: int):  # [k, members, ...]: a pure function of (seeds, start step)
        nonlocal data_s
        tic = time.perf_counter()
        b = place_batches(trainer.batches(seeds, start, min(cfg.chunk_steps, cfg.steps - start)))
        data_s += time.perf_counter() - tic
        return b

    batches = chunk_batches(step) if step < cfg.steps else None
    while step < cfg.steps:
        k = min(cfg.chunk_steps, cfg.steps - step)
        tic = time.perf_counter()
        state, metrics = trainer._chunk(state, seed_keys, hps, batches, jnp.int32(step))
        # The chunk runs asynchronously: the host draws the next chunk's data meanwhile (the data is a pure
        # function of seed and step, so this changes no number), instead of leaving the device idle while it
        # draws them after the chunk (one Dataset.batch call per seed and step: benchmarks/RESULTS.md, round 3).
        batches = chunk_batches(step + k) if step + k < cfg.steps else None
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - tic  # the chunk, and the next chunk's data as far as it did not overlap
        if compile_s == 0.0:
            compile_s = elapsed
        else:
            step_s += elapsed
        for name, value in metrics.items():
            history.setdefault(name, []).append(np.asarray(value))
        monitor.update(step, metrics["loss"], metrics["grad_norm"])
        spikes.update(step, metrics["loss"], metrics["grad_norm"])
        diverged = np.asarray(monitor.diverged)
        if diverged.any():  # host-side rules freeze the seed from the next step on
            state = place(state._replace(active=np.logical_and(_to_host(state.active), ~diverged)))
        step += k
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evals.append((step, trainer.evaluate(state, seed_keys)))
        if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(ckpt, run, seeds, hparams, state, monitor, spikes, history, evals, step)
        if callable(progress):
            progress(k * len(seeds))
        if bar is not None:
            bar.set_description_str("training", refresh=False)
            bar.update(k)
            bar.set_postfix(loss=f"{np.nanmean(metrics['loss'][-1]):.3f}", diverged=int(diverged.sum()))
    if bar is not None:
        bar.close()

    final_eval_batches = trainer.evaluate_batches(state, seed_keys)
    final_eval = np.mean(final_eval_batches, axis=0)
    evals.append((cfg.steps, final_eval))
    test_batches = getattr(trainer.dataset, "test_batches", None)  # fine-tuning tasks have a test split
    final_test = trainer.evaluate(state, seed_keys, test_batches(cfg.batch_size)) if test_batches else None
    metrics = {name: np.concatenate(chunks, axis=0) for name, chunks in history.items()}
    summary = _summary(run, trainer, seeds, hparams, monitor, spikes, final_eval_batches, evals, metrics,
                       timing=dict(total_s=time.perf_counter() - t0, first_chunk_s=compile_s,
                                   step_s=step_s / max(cfg.steps - cfg.chunk_steps, 1),
                                   data_s=data_s / max(cfg.steps, 1),
                                   member_devices=member_devices))
    if cfg.routing_stats_batches:
        summary["routing_stats"] = trainer.routing_statistics(state, seed_keys, cfg.routing_stats_batches)
    if final_test is not None:
        summary["finetune"] = dict(task=run.finetune.task, trainable=run.finetune.trainable,
                                   from_run=run.finetune.from_run, chance_loss=trainer.dataset.chance_loss,
                                   train_examples=trainer.dataset.num_examples("train"),
                                   final_test_loss=[None if not np.isfinite(v) else float(v) for v in final_test])
    master = jax.tree.map(_to_host, state.master) if out_dir is not None else None  # all processes gather
    if out_dir is not None and jax.process_index() == 0:  # several processes (hosts): the first writes
        _write_outputs(Path(out_dir), run, summary, metrics)
        save_params(Path(out_dir), master, seeds)
        if ckpt is not None and ckpt.exists():
            shutil.rmtree(ckpt)
    return RunResult(summary, metrics)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _summary(run, trainer, seeds, hparams, monitor, spikes, final_eval_batches, evals, metrics, timing) -> dict:
    results = monitor.results()
    best = trainer.dataset.best_loss
    unigram = unigram_reference(trainer.dataset)
    final_eval = [None if not np.isfinite(v) else float(v) for v in np.mean(final_eval_batches, axis=0)]
    return {
        "seeds": seeds,
        "hparams": hparams,
        "final_eval_loss": final_eval,
        "final_eval_batch_losses": [[None if not np.isfinite(v) else float(v) for v in final_eval_batches[:, i]]
                                    for i in range(len(seeds))],
        "quality_gap": None if best is None else [None if v is None else v - best for v in final_eval],
        "best_loss": best,
        "best_loss_stderr": getattr(trainer.dataset, "best_loss_stderr", None),
        "unigram_loss": unigram,
        "entropy_rate": trainer.dataset.entropy_rate,
        "outcome": [classify_outcome(diverged=r.diverged, final_eval_loss=v, unigram_loss=unigram)
                    for r, v in zip(results, final_eval)],
        "diverged": [bool(r.diverged) for r in results],
        "divergence_step": [r.step for r in results],
        "divergence_rule": [r.rule for r in results],
        "first_loss_spike_step": [r.step for r in spikes.results()],
        "eval_history": [{"step": s, "loss": [float(x) for x in v]} for s, v in evals],
        "final_train_loss": [float(np.nanmean(metrics["loss"][-10:, i])) if np.isfinite(metrics["loss"][-10:, i]).any()
                             else None for i in range(len(seeds))],
        "backend": jax.default_backend(),
        "mesh": run.train.mesh,
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "policy": run.to_dict()["policy"],
        "policy_resolved": run.policy.to_dict(),
        "timing": timing,
    }


# Content tokens sampled to estimate their unigram distribution: the plug-in entropy's bias is about
# (tokens in the vocabulary - 1) / (2 x sample) nats, under 0.004 for a 512-token vocabulary.
UNIGRAM_SAMPLE_TOKENS = 1 << 16
_UNIGRAM_CACHE: dict = {}


def unigram_reference(dataset: Dataset) -> float | None:
    """The "failed to learn" reference in nats per target token: the loss of a model that knows the span
    corruption format but no language, i.e. predicts every hidden token from the unigram (marginal)
    distribution of tokens, and the span lengths (where the sentinels and EOS fall) from their prior.

    The data module's own `unigram_loss` is used where the dataset has one (a fine-tuning task's
    `chance_loss`, its "learned nothing" reference, where it has that). Otherwise, with N noise tokens in
    k spans per example and T target positions: (N * H1 + log C(N-1, k-1)) / T, where H1 is the entropy of
    the content tokens of held-out targets (plug-in, UNIGRAM_SAMPLE_TOKENS tokens) and C(N-1, k-1) the
    number of equally likely span-length compositions. On the Markov language this gives 3.42 nats for the
    defaults (H1 = 4.436 against the exact stationary entropy 4.437), the level the issue-13 runs stalled at.
    """
    own = getattr(dataset, "unigram_loss", None)
    if own is None:  # a fine-tuning task: predicting from the label (or token) prior alone
        own = getattr(dataset, "chance_loss", None)
    if own is not None:
        return float(own)
    if not hasattr(dataset, "layout"):  # not span corruption and no reference of its own
        return None
    key = (type(dataset).__name__, dataset.config)
    if key not in _UNIGRAM_CACHE:
        layout = dataset.layout
        n, k = layout.num_noise_tokens, layout.num_noise_spans
        first_sentinel = dataset.vocab_size - dataset.config.num_sentinels
        batches = dataset.eval_batches(-(-UNIGRAM_SAMPLE_TOKENS // (256 * n)), 256)
        tokens = np.concatenate([b["targets"][(b["loss_mask"] > 0) & (b["targets"] >= NUM_SPECIAL)
                                              & (b["targets"] < first_sentinel)] for b in batches])
        counts = np.bincount(tokens)
        p = counts[counts > 0] / tokens.size
        h1 = float(-(p * np.log(p)).sum())
        _UNIGRAM_CACHE[key] = (n * h1 + math.log(math.comb(n - 1, k - 1))) / layout.targets_length
    return _UNIGRAM_CACHE[key]


def _write_outputs(out: Path, run: RunConfig, summary: dict, metrics: dict) -> None:
    from precision_lab.store import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps(run.to_dict(), indent=2).encode())
    buf = _npz_bytes(metrics)
    atomic_write(out / "metrics.npz", buf)
    atomic_write(out / "summary.json", json.dumps(_json_safe(summary), indent=2).encode())


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return _json_safe(v.item())
    return v


# -- checkpoints ---------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, run, seeds, hparams, state, monitor, spikes, history, evals, step) -> None:
    """Write the whole loop state atomically: a temp folder renamed over the old checkpoint."""
    leaves = [_to_host(x) for x in jax.tree.leaves(state)]  # every process takes part in the gathers
    if jax.process_index() != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.savez(tmp / "state.npz", *[np.asarray(x) for x in leaves])
    np.savez(tmp / "history.npz", **{k: np.concatenate(v, axis=0) for k, v in history.items()})
    meta = dict(step=step, seeds=seeds, hparams=hparams, fingerprint=run.fingerprint(), monitor=monitor.to_json(),
                spikes=spikes.to_json(),
                evals=[[s, [float(x) for x in v]] for s, v in evals])
    (tmp / "meta.json").write_text(json.dumps(meta))
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(path: Path, run, seeds, hparams, template):
    from precision_lab.errors import UserError

    meta = json.loads((path / "meta.json").read_text())
    if meta["fingerprint"] != run.fingerprint() or meta["seeds"] != seeds or meta["hparams"] != hparams:
        raise UserError(f"{path}: the checkpoint belongs to another configuration or seed list; "
                        "use a new --out folder, or --force to discard it and train from step 0")
    with np.load(path / "state.npz") as z:
        leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    treedef = jax.tree.structure(template)
    state = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
    with np.load(path / "history.npz") as z:
        history = {k: [z[k]] for k in z.files}
    monitor = DivergenceMonitor.from_json(meta["monitor"])
    spikes = DivergenceMonitor.from_json(meta["spikes"])
    evals = [(s, np.asarray(v)) for s, v in meta["evals"]]
    return state, monitor, spikes, history, evals, meta["step"]


def read_run(out_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(summary, per-step metrics) of a finished `precision-lab train` output folder."""
    from precision_lab.errors import UserError

    out = Path(out_dir)
    if not (out / "summary.json").exists():
        raise UserError(f"{out}: no summary.json here; is it the --out folder of a finished `precision-lab train`?")
    with np.load(out / "metrics.npz") as z:
        metrics = {k: z[k] for k in z.files}
    return json.loads((out / "summary.json").read_text()), metrics
