"""Optimisers and learning-rate schedules, built from optax, plus precision hooks for optimizer state.

Optimisers (`OptimConfig.name`):
  "adafactor"  as ST-MoE / T5X use it: second-moment decay beta2_t = 1 - t^-decay_rate (decay_rate 0.8,
               t = 1, 2, ... so the first step uses the squared gradient alone), factored second moments
               for arrays with two dims >= `min_dim_size_to_factor`, no momentum, update clipping (the
               RMS of each parameter's update is clipped to `clipping_threshold` before the learning rate
               is applied; ST-MoE's stability table has a 0.1 row). Parameter-scale ("relative step": the
               step is lr x max(1e-3, RMS(param))) is a knob, off by default. Built by `optax.adafactor`.
               `weight_decay` here is decoupled and absolute per step (p -= weight_decay * p), as in T5X.
  "adamw"      `optax.adamw`: b1, b2 (0.95 or 0.999), eps, decoupled weight decay scaled by the lr.

Schedules (`OptimConfig.schedule`), as optax schedules (step count -> lr, float32):
  "rsqrt"     T5's inverse square root with linear warm-up, scaled so the peak (at step = warmup) is lr:
              lr * min(1, step / warmup) * sqrt(warmup / max(step, warmup)); with no warm-up,
              lr / sqrt(max(step, 1)). Adafactor's "relative step" min(1e-2, 1/sqrt(t)) is this schedule
              with lr = 0.01 and warmup = 10_000.
  "cosine"    linear warm-up to lr, then half a cosine down to final_lr_fraction * lr at total_steps,
              flat after.
  "constant"  linear warm-up to lr, then lr.
The step is optax's update count: the first update uses step 0, so with warm-up its lr is 0.

Global-norm gradient clipping (`grad_clip_norm` > 0) is applied to the raw gradient before the optimiser.

Precision hooks: `quantized_state(inner, quantize_fn)` stores the inner optimiser's state through
`quantize_fn` (e.g. rounding every float leaf to bf16 in float32 storage) at init and after every update,
so the state's storage precision is simulated faithfully; `quantized_updates` does the same for the
update it returns. Both take plain callables; `map_float_leaves` lifts a per-array rounding function to a
tree function that leaves integer leaves (step counts) alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from precision_lab.errors import UserError, unknown_choice

OPTIMIZERS: tuple[str, ...] = ("adafactor", "adamw")
SCHEDULES: tuple[str, ...] = ("rsqrt", "cosine", "constant")

TreeFn = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser, schedule and clipping settings. Defaults are ST-MoE's Adafactor with T5's rsqrt schedule.

    Attributes:
      name: "adafactor" | "adamw".
      lr: peak learning rate.
      schedule: "rsqrt" | "cosine" | "constant"; warmup_steps: linear warm-up length (0 = none);
        total_steps: end of the cosine decay ("cosine" only; 0 = train.steps, filled in by the run config);
        final_lr_fraction: cosine end / lr.
      decay_rate, clipping_threshold (0 = off), multiply_by_parameter_scale, momentum (None = none),
        factored, min_dim_size_to_factor, adafactor_eps: Adafactor knobs (optax.adafactor's meaning).
      b1, b2, eps: AdamW knobs.
      weight_decay: decoupled weight decay (0 = off); see the module docstring for each optimiser's scale.
      grad_clip_norm: global-norm clipping of the gradient (0 = off).
    """

    name: str = "adafactor"
    lr: float = 0.01
    schedule: str = "rsqrt"
    warmup_steps: int = 0
    total_steps: int = 0
    final_lr_fraction: float = 0.0
    # Adafactor
    decay_rate: float = 0.8
    clipping_threshold: float = 1.0
    multiply_by_parameter_scale: bool = False
    momentum: float | None = None
    factored: bool = True
    min_dim_size_to_factor: int = 128
    adafactor_eps: float = 1e-30
    # AdamW
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # Both
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.name, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        _check_number("lr", self.lr, low=0.0, low_open=True)
        for name in ("warmup_steps", "total_steps", "min_dim_size_to_factor"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise UserError(f"{name} must be an integer >= 0, got {value!r}")
        if self.schedule == "cosine" and 0 < self.total_steps <= self.warmup_steps:
            raise UserError(
                f"total_steps must be > warmup_steps ({self.warmup_steps}) for the cosine schedule, "
                f"got {self.total_steps}"
            )
        _check_number("final_lr_fraction", self.final_lr_fraction, low=0.0, high=1.0)
        _check_number("decay_rate", self.decay_rate, low=0.0, low_open=True)
        for name in ("clipping_threshold", "weight_decay", "grad_clip_norm", "adafactor_eps", "eps"):
            _check_number(name, getattr(self, name), low=0.0)
        for name in ("b1", "b2"):
            _check_number(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
        if self.momentum is not None:
            _check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)


def _check_number(name, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise UserError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")


# -- schedules -------------------------------------------------------------------------------------------


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """The learning-rate schedule of `cfg`: optax update count (int) -> lr (float32 scalar)."""
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)

    def warm(step):
        # Linear warm-up factor in [0, 1]; exactly 1 with no warm-up.
        return jnp.minimum(1.0, step / warmup) if warmup > 0 else jnp.ones_like(step)

    if cfg.schedule == "rsqrt":
        peak_at = max(warmup, 1)

        def schedule(count):
            step = jnp.asarray(count, jnp.float32)
            return lr * warm(step) * jnp.sqrt(peak_at / jnp.maximum(step, peak_at))

    elif cfg.schedule == "cosine":
        total, final = int(cfg.total_steps), float(cfg.final_lr_fraction)
        if total <= warmup:  # 0 means train.steps, which only a RunConfig knows (config.build fills it in)
            raise UserError(f"optim.total_steps ({total}) must be > optim.warmup_steps ({warmup}) for the cosine "
                            "schedule; build the optimiser from a run config to default it to train.steps")

        def schedule(count):
            step = jnp.asarray(count, jnp.float32)
            progress = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
            cosine = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
            return lr * jnp.where(step < warmup, warm(step), cosine)

    else:  # constant

        def schedule(count):
            return lr * warm(jnp.asarray(count, jnp.float32))

    return schedule


# -- optimisers ------------------------------------------------------------------------------------------


def make_optimizer(
    cfg: OptimConfig,
    *,
    weight_decay_mask: Any = None,
    quantize_state: TreeFn | None = None,
) -> optax.GradientTransformation:
    """The optimiser of `cfg` (with its schedule and clipping) as one optax transformation.

    weight_decay_mask: optax mask (tree of bools or callable params -> tree) for which leaves decay.
    quantize_state: if given, the whole state is stored through it (see `quantized_state`).
    """
    schedule = make_schedule(cfg)
    if cfg.name == "adafactor":
        tx = optax.adafactor(
            learning_rate=schedule,
            min_dim_size_to_factor=cfg.min_dim_size_to_factor,
            decay_rate=cfg.decay_rate,
            multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
            # optax documents "must be >= 1" (the paper's d = 1) but does not enforce it; ST-MoE uses 0.1.
            clipping_threshold=cfg.clipping_threshold if cfg.clipping_threshold > 0 else None,
            momentum=cfg.momentum,
            weight_decay_rate=cfg.weight_decay if cfg.weight_decay > 0 else None,
            weight_decay_mask=weight_decay_mask,
            eps=cfg.adafactor_eps,
            factored=cfg.factored,
        )
    else:
        tx = optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
        )
    if cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    tx = _standard_promotion(tx)
    if quantize_state is not None:
        tx = quantized_state(tx, quantize_state)
    return tx


def make_optimizer_traced_lr(
    cfg: OptimConfig,
    *,
    weight_decay_mask: Any = None,
    quantize_state: TreeFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    """As `make_optimizer`, but the peak learning rate is a runtime value: `update(..., peak_lr=x)`.

    The schedule runs with peak 1 and the update is multiplied by `peak_lr` (a traced scalar), so runs that
    differ only in their learning rate compile to one program and can be vmapped together. Equal to
    `make_optimizer(cfg)` with `cfg.lr = peak_lr`: AdamW's decoupled weight decay is lr-scaled anyway, and
    Adafactor's absolute weight decay (T5X) is applied after the scaling, as optax's adafactor does.
    """
    absolute_decay = cfg.name == "adafactor" and cfg.weight_decay > 0
    unit = dataclasses.replace(cfg, lr=1.0, weight_decay=0.0 if absolute_decay else cfg.weight_decay)
    inner = make_optimizer(unit, weight_decay_mask=weight_decay_mask, quantize_state=quantize_state)
    decay = optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask) if absolute_decay else None

    def init_fn(params):
        return inner.init(params)

    def update_fn(updates, state, params=None, *, peak_lr, **extra_args):
        updates, state = inner.update(updates, state, params, **extra_args)
        updates = jax.tree.map(lambda u: u * jnp.asarray(peak_lr, u.dtype), updates)
        if decay is not None:  # optax's adafactor subtracts weight_decay * p after the lr (absolute decay)
            decayed, _ = decay.update(jax.tree.map(jnp.zeros_like, updates), decay.init(params), params)
            updates = jax.tree.map(lambda u, d: u - d, updates, decayed)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _standard_promotion(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`inner` run under jax's standard dtype promotion, whatever the caller's setting.

    optax (0.2.8) is not clean under jax_numpy_dtype_promotion="strict", which the lab's tests use:
    adamw's bias correction computes `b1 ** count` (Python float ** int32), and adafactor multiplies its
    float32 decay rate into state of the parameters' dtype (bf16 parameters fail). The promotions
    involved are the intended ones, so only optax's own arithmetic is exempted; hooks such as
    `quantized_state` run outside this wrapper, under the caller's setting.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        with jax.numpy_dtype_promotion("standard"):
            return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- precision hooks ------------------------------------------------------------------------------------


def map_float_leaves(leaf_fn: Callable[[jax.Array], jax.Array]) -> TreeFn:
    """Lift `leaf_fn` (array -> array of the same shape/dtype) to a tree function on floating leaves only."""

    def tree_fn(tree):
        return jax.tree.map(
            lambda x: leaf_fn(x) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
        )

    return tree_fn


def quantized_state(
    inner: optax.GradientTransformation, quantize_fn: TreeFn
) -> optax.GradientTransformationExtraArgs:
    """`inner` with its state stored through `quantize_fn` (tree -> tree of the same structure).

    The function is applied to the state returned by `inner.init` and by every `inner.update`, so each
    update reads the state as it would be stored, e.g. bf16-rounded moments in float32 storage.
    `quantize_fn` sees the whole state (counts included): it must leave integer leaves unchanged
    (`map_float_leaves` does).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return quantize_fn(inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        updates, new_state = inner.update(updates, state, params, **extra_args)
        return updates, quantize_fn(new_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def quantized_updates(
    inner: optax.GradientTransformation, quantize_fn: TreeFn
) -> optax.GradientTransformationExtraArgs:
    """`inner` with the updates it returns passed through `quantize_fn` (the parameter-update format)."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        updates, new_state = inner.update(updates, state, params, **extra_args)
        return quantize_fn(updates), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
