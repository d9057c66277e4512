"""A run's whole configuration: model, data, training, optimiser, divergence rules and precision policy.

`RunConfig` is built from a nested dict (the form a sweep TOML or the CLI produces):

    {"model": {"preset": "tiny", "num_experts": 8}, "data": {"inputs_length": 64},
     "train": {"steps": 300, "batch_size": 16}, "optim": {"name": "adamw", "lr": 1e-2},
     "divergence": {"sigma_k": 6.0}, "policy": "bf16"}

Every section is optional; unknown sections or fields fail with one line naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

from precision_lab.data import DataConfig
from precision_lab.divergence import DivergenceConfig
from precision_lab.errors import UserError, unknown_choice
from precision_lab.finetune import FinetuneConfig
from precision_lab.model.config import ModelConfig, get_model_config
from precision_lab.model.sharding import mesh_text, parse_mesh
from precision_lab.optim import OptimConfig
from precision_lab.policy import PrecisionPolicy, format_policy, get_policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop.

    steps: optimiser steps; batch_size: sequences per step; seeds: how many seeds `precision-lab train`
    runs (vmapped into one program); seed: the first seed (seeds are seed, seed+1, ...);
    chunk_steps: steps per compiled call (lax.scan) between host-side divergence checks and logging;
    eval_every / eval_batches: held-out evaluation cadence and size; checkpoint_every: steps between
    checkpoints (0 = only at the end); label: a free-form name for the run (reports match paper rows by it);
    mesh: run each step over a device mesh, "data=2,expert=4" or a table {data = 2, expert = 4} (batch
    split over data, experts over expert; dense dispatch; "" = no mesh; see precision_lab/model/sharding.py).
    replicas: R emulated data-parallel replicas: each step's batch is split into R equal shards whose
    gradients are computed separately (vmapped) and summed by a ring all-reduce in the policy's
    `grad_allreduce` format (`precision_lab.ops.ring_allreduce`); batch_size must be a multiple of R.
    precision_telemetry: record per step the underflow and overflow fractions of the matmul operand and
    gradient roundings per component group, of the all-reduce, and the lost-update fraction of the master
    weights (off: none of that work is done; on or off, every other number is the same).
    routing_stats_batches: after training, route this many held-out batches (labelled with their latent
    language) through the final parameters and store the specialisation statistics of every sparse layer
    (`precision_lab.specialization`: by language, sentinels, frequent tokens); 0 = none (the default).
    """

    steps: int = 300
    batch_size: int = 16
    seeds: int = 1
    seed: int = 0
    chunk_steps: int = 10
    eval_every: int = 100
    eval_batches: int = 2
    checkpoint_every: int = 100
    label: str = ""
    replicas: int = 1
    precision_telemetry: bool = False
    mesh: str = ""
    routing_stats_batches: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mesh", mesh_text(parse_mesh(self.mesh)))  # canonical: "data=2,expert=4"
        for name in ("steps", "batch_size", "seeds", "chunk_steps", "eval_batches", "replicas"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("seed", "eval_every", "checkpoint_every", "routing_stats_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UserError(f"train.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.batch_size % self.replicas:
            valid = [r for r in range(1, self.batch_size + 1) if self.batch_size % r == 0]
            raise UserError(f"train.replicas ({self.replicas}) must divide train.batch_size ({self.batch_size}) "
                            f"so every replica gets an equal shard; valid: {valid}")
        if not isinstance(self.precision_telemetry, bool):
            raise UserError(f"train.precision_telemetry must be true or false, got {self.precision_telemetry!r}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
    "divergence": DivergenceConfig, "finetune": FinetuneConfig,
}

# Defaults a lab user expects from a quick run: the tiny model, short sequences (T5's 100 sentinels would
# crowd a small vocabulary; a 64-token input has at most a handful of spans), AdamW with warm-up, and the
# divergence rules that mean "training broke" (the mean + k sigma rule flags loss spikes that recover; the
# trainer records its first firing per seed as a spike, without freezing the seed).
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny"},
    "data": {"num_sentinels": 16},
    "optim": {"name": "adamw", "lr": 1e-2, "schedule": "rsqrt", "warmup_steps": 20, "b2": 0.95},
    "divergence": {"rules": ("nonfinite", "early_max", "spikes")},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    divergence: DivergenceConfig
    finetune: FinetuneConfig
    policy: PrecisionPolicy

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, fully resolved (every field, the policy in canonical and per-component form)."""
        # an inactive finetune section is left out, so pretraining runs keep the fingerprints they had
        out = {name: _jsonable(dataclasses.asdict(getattr(self, name))) for name in SECTIONS
               if name != "finetune" or self.finetune.active}
        out["policy"] = format_policy(self.policy)
        out["policy_resolved"] = self.policy.to_dict()
        return out

    def fingerprint(self) -> str:
        """Hash of everything except the seeds: runs with equal fingerprints compile to one program."""
        d = self.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("seeds", "seed")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    """A field type in the words a TOML or --set user needs."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = " or ".join(_describe(a) for a in args if a is not type(None))
        return inner + (" (leave the field out for none)" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(args[0], str(args[0]))
    return {bool: "true or false (TOML booleans, lowercase)", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value) for `value` against the field type `tp`: bools are only TOML booleans (never 1, "no" or
    "False"), ints are not bools, floats accept integers (stored as float, so 1 and 1.0 are one config),
    Literal fields one of their values, tuple fields a list or tuple of the element type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is not type(None):
                ok, out = _coerce(arg, value)
                if ok:
                    return True, out
        return False, value
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_coerce(args[0], v) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return True, value  # a type without a TOML spelling: the dataclass's own checks judge it


def check_field_types(section: str, cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every value against its dataclass field's annotation; one UserError line naming the field
    and the expected type otherwise. Returns the values with integers in float fields made floats and
    lists in tuple fields made tuples. One generic check for every section (the dataclasses' own
    `__post_init__` checks ranges and choices)."""
    types_ = _field_types(cls)
    out = dict(values)
    for key, value in values.items():
        if key not in types_:
            continue
        ok, out[key] = _coerce(types_[key], value)
        if not ok:
            if typing.get_origin(types_[key]) is typing.Literal and isinstance(value, str):
                raise unknown_choice(f"{section}.{key}", value, typing.get_args(types_[key]))
            hint = ""
            if types_[key] is bool and isinstance(value, str) and value.lower() in ("true", "false"):
                hint = f" (write {value.lower()})"
            elif str in (types_[key], *typing.get_args(types_[key])) and typing.get_origin(types_[key]) in (
                    None, typing.Union, types.UnionType) and not isinstance(value, (str, list, dict)):
                hint = f' (quote it: "{value}")'
            raise UserError(f"{section}.{key} must be {_describe(types_[key])}, got {value!r}{hint}")
    return out


def _section(name: str, cls: type, values: Mapping[str, Any] | None):
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    if name == "model":
        preset = values.pop("preset", "tiny")
        if not isinstance(preset, str):
            raise UserError(f"model.preset must be a string (a preset name), got {preset!r}")
        base = get_model_config(preset)
        fields.add("preset")
    else:
        base = cls()
    for key in values:
        if key not in fields:
            raise unknown_choice(f"{name} field", key, sorted(fields))
    if name == "train" and isinstance(values.get("mesh"), Mapping):  # the TOML table form of train.mesh
        values["mesh"] = mesh_text(parse_mesh(dict(values["mesh"])))
    values = check_field_types(name, cls, values)
    try:
        return dataclasses.replace(base, **values)
    except TypeError as err:
        raise UserError(f"{name}: {err}") from None


def _merge(base: Mapping, override: Mapping) -> dict:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def run_config(spec: Mapping[str, Any] | None = None) -> RunConfig:
    """Build and validate a RunConfig from a nested dict (missing parts take `DEFAULTS`)."""
    spec = _merge(DEFAULTS, spec or {})
    unknown = [k for k in spec if k not in (*SECTIONS, "policy")]
    if unknown:
        raise unknown_choice("config section", unknown[0], [*SECTIONS, "policy"])
    parts = {name: _section(name, cls, spec.get(name)) for name, cls in SECTIONS.items()}
    if spec.get("data", {}).get("vocab_size") not in (None, parts["model"].vocab_size):
        raise UserError("data.vocab_size must equal model.vocab_size (the model's vocabulary is the data's); "
                        "set model.vocab_size only")
    data_fields = {"vocab_size": parts["model"].vocab_size}
    if "inputs_length" not in spec.get("data", {}):  # the preset's sequence length, unless asked otherwise
        data_fields["inputs_length"] = parts["model"].inputs_length
    parts["data"] = dataclasses.replace(parts["data"], **data_fields)
    if parts["train"].mesh:
        parts["model"] = _model_for_mesh(parts["model"], parts["train"], "expert_dispatch" in spec.get("model", {}))
    optim = parts["optim"]
    if optim.schedule == "cosine" and optim.total_steps == 0:
        # replace() re-runs OptimConfig's check: a cosine that ends inside its warm-up is refused there
        parts["optim"] = dataclasses.replace(optim, total_steps=parts["train"].steps)
    run = RunConfig(**parts, policy=get_policy(spec.get("policy", "fp32")))
    if run.policy.traced_format is not None and (run.train.precision_telemetry or run.train.mesh):
        field = "train.precision_telemetry" if run.train.precision_telemetry else "train.mesh"
        raise UserError(f"{field}: not available with a traced format (policy {format_policy(run.policy)}); "
                        "valid: leave it off, or name the format without :traced")
    if run.finetune.pretrain:  # a pretraining sweep point: checked now, not when its fine-tuning group starts
        from precision_lab.finetune import pretraining_spec

        try:
            run_config(pretraining_spec(run.to_dict()))
        except UserError as err:
            raise UserError(f"finetune.pretrain: {err}") from None
    return run


def _model_for_mesh(model: ModelConfig, train: TrainConfig, dispatch_given: bool) -> ModelConfig:
    """Check what a mesh needs of the run (all but the device count, which the trainer checks): experts
    split evenly over the expert axis, the batch over the data axis, and the dense dispatch (the [E, G, C, D]
    layout that splits over experts), which a mesh selects unless model.expert_dispatch says otherwise."""
    sizes = parse_mesh(train.mesh)
    data, expert = sizes["data"], sizes["expert"]
    if expert > 1 and (not model.num_experts or model.num_experts % expert):
        raise UserError(f"train.mesh {train.mesh}: model.num_experts = {model.num_experts} does not split over "
                        f"expert={expert}; valid: an expert axis that divides {model.num_experts or 'the expert count'}")
    if train.batch_size % data:
        raise UserError(f"train.mesh {train.mesh}: train.batch_size = {train.batch_size} does not split over "
                        f"data={data}; valid: a data axis that divides the batch size")
    if dispatch_given and model.expert_dispatch != "dense":
        raise UserError(f"train.mesh {train.mesh}: model.expert_dispatch = {model.expert_dispatch!r} cannot run "
                        "over a mesh; valid: 'dense' (or leave it unset: a mesh selects it)")
    return dataclasses.replace(model, expert_dispatch="dense")


def validate(spec: Mapping[str, Any]) -> None:
    """For sweep expansion: raise UserError if `spec` is not a valid run configuration."""
    run_config(spec)
