"""Sweep specs in TOML: parsing, deterministic expansion into runs, sharding and resumable execution.

A sweep is a base configuration, a list of axes that vary fields of it, and a number of seeds:

    # command: precision-lab sweep experiments/z_loss.toml --out runs/z_loss
    name = "z_loss"                 # optional; defaults to the file name without .toml
    description = "Does the router z-loss keep bf16 training stable?"
    seeds = 8                       # 8 seeds 0..7, or an explicit list such as [0, 1, 2]
    [base]                          # the configuration every run starts from: nested tables
    model = { preset = "tiny", d_model = 64 }
    train = { steps = 300, lr = 1e-2, z_loss = 1e-3 }
    policy = "bf16"
    [[axes]]                        # a grid axis: each value is crossed with every other axis
    field = "train.z_loss"          # a dotted path into the configuration
    values = [0.0, 1e-4, 1e-3, 1e-2]
    [[axes]]                        # a zipped group: the lists are walked together, not crossed
    zip = { "policy" = ["fp32", "bf16"], "train.lr" = [1e-2, 3e-2] }
    [report]                        # what `precision-lab report` draws from this sweep
    figures = ["loss_curves", "router_logits"]
    tables = ["stability"]

This example expands to 4 (z_loss) x 2 (policy+lr pairs) configurations x 8 seeds = 64 runs. Top-level keys
are exactly name, description, seeds, base, axes and report; an axis has either `field` + `values` or
`zip` (a table of equally long lists; `zip = { train.lr = [...] }` without quotes works too). A field must
exist in [base], unless a `validate` function (supplied by the trainer) accepts it.

Expansion is deterministic: axes in file order with the last axis varying fastest, seeds innermost. Each
run has a stable `run_id`: a readable prefix from the axis values and a hash of the canonical JSON of its
resolved configuration and seed, e.g. `z_loss=0.001,policy=bf16,lr=0.03-s3-9f1c2ab04e7d`. The id depends
on nothing else (not the order, not the sweep name), so re-running or extending a sweep into the same
output directory finds the runs it already has. Runs that differ only in their seed (and in any
`batchable_fields` the trainer can batch over without recompiling) share a `group_key`; the trainer runs
one group as one vmapped, compiled program. Shards split the groups, never a group.

`run_sweep` writes the manifest, skips runs already in the results store (`precision_lab.store`), runs
each group that still misses seeds (only the missing seeds), and stores each record as soon as its group
finishes: a killed sweep resumes where it stopped, and shards in separate processes can share one store.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import hashlib
import inspect
import itertools
import os
import re
import socket
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from precision_lab.errors import UserError, read_toml, unknown_choice
from precision_lab.store import NONFINITE, RecordConflict, ResultsStore, canonical_json, to_jsonable

TOP_LEVEL_KEYS = ("name", "description", "seeds", "base", "axes", "report")
AXIS_KEYS = ("field", "values", "zip")
REPORT_KEYS = ("figures", "tables")

# Keys run_sweep puts in every record; a run_group's own record may repeat them only with equal values.
RUN_KEYS = ("run_id", "sweep", "seed", "group_key", "overrides", "config")

Validate = Callable[[dict], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Axis:
    """One axis of a sweep: a grid axis has one field, a zipped axis several walked together.

    Attributes:
      fields: dotted configuration paths this axis sets.
      points: the values, one tuple per point, aligned with `fields`.
      zipped: True for a `zip = {...}` axis.
    """

    fields: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]
    zipped: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A parsed sweep file. `base` and the axis values are plain TOML data; do not mutate them."""

    name: str
    description: str = ""
    source: str = "<sweep>"
    seeds: tuple[int, ...] = (0,)
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    axes: tuple[Axis, ...] = ()
    report: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run of a sweep.

    Attributes:
      run_id: stable id (readable prefix + hash of config and seed); the store's file name.
      group_key: hash of the config without the seed and without batchable fields.
      seed: the run's seed.
      config: the fully resolved nested configuration (base with the axis values applied).
      overrides: dotted path -> value for every field the axes set (for labels and tables).
      index: position in the expanded sweep.
    """

    run_id: str
    group_key: str
    seed: int
    config: Mapping[str, Any]
    overrides: Mapping[str, Any]
    index: int

    def __hash__(self) -> int:
        # The generated hash would hash the config dict (unhashable); the id identifies the run.
        return hash(self.run_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSummary:
    """What one `run_sweep` call did (counts are runs, not groups, unless named so)."""

    name: str
    out_dir: str
    shard: tuple[int, int]
    total_runs: int  # in the whole sweep
    shard_runs: int  # assigned to this shard
    skipped: int  # already in the store when we looked
    computed: int  # computed and stored by this call
    raced: int  # computed, but another process had stored them first (theirs kept)
    groups_run: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.skipped + self.computed + self.raced == self.shard_runs


# -- parsing ----------------------------------------------------------------------------------------------


def _err(source: str, field: str, message: str) -> UserError:
    return UserError(f"{source}: {field}: {message}")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _paths(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path in a nested config: tables and leaves (a whole table can be swept too)."""
    out = []
    for key, value in config.items():
        out.append(prefix + key)
        if isinstance(value, Mapping):
            out.extend(_paths(value, prefix + key + "."))
    return out


def _lookup(config: Mapping[str, Any], path: str) -> bool:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _assign(config: dict, path: str, value: Any) -> None:
    """Set `path` in `config`, creating missing tables (only reached when the field is known valid)."""
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {part!r} is not a table")
    node[leaf] = copy.deepcopy(value)


def _check_plain(source: str, field: str, value: Any) -> None:
    # TOML dates and times have no JSON form; the store and the run ids need JSON.
    if isinstance(value, (dt.date, dt.time)):
        valid = "numbers, strings, booleans, lists, tables"
        raise _err(source, field, f"dates and times are not supported (got {value!r}); valid: {valid}")
    if isinstance(value, str) and value in NONFINITE:
        valid = "nan, inf, -inf (TOML floats, unquoted)"
        raise _err(source, field, f"the string {value!r} is reserved for non-finite floats; valid: {valid}")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(source, f"{field}.{k}", v)
    elif isinstance(value, list):
        for v in value:
            _check_plain(source, field, v)


def _flatten_zip(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # `zip = { train.lr = [...] }` parses as nested tables; `"train.lr"` as one key. Accept both.
    out = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten_zip(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # TOML true is a bool, and bool is an int


def _parse_seeds(source: str, raw: Any) -> tuple[int, ...]:
    valid = "valid: a positive integer count (seeds = 8) or a non-empty list of distinct integers >= 0"
    if _is_int(raw):
        if raw < 1:
            raise _err(source, "seeds", f"{raw} is not a positive count; {valid}")
        return tuple(range(raw))
    if isinstance(raw, list) and raw and all(_is_int(s) and s >= 0 for s in raw):
        if len(set(raw)) != len(raw):
            raise _err(source, "seeds", f"{raw} repeats a seed; {valid}")
        return tuple(raw)
    raise _err(source, "seeds", f"{raw!r} is not a seed count or list; {valid}")


def _parse_axis(source: str, k: int, raw: Any, base: Mapping[str, Any], validate: Validate | None) -> Axis:
    where = f"axes[{k}]"
    if not isinstance(raw, Mapping):
        raise _err(source, where, "must be a table ([[axes]] with field + values, or zip)")
    for key in raw:
        if key not in AXIS_KEYS:
            raise UserError(f"{source}: {unknown_choice(f'key in {where}', key, AXIS_KEYS)}")
    if "zip" in raw:
        if "field" in raw or "values" in raw:
            raise _err(source, where, "has both zip and field/values; valid: either field + values, or zip")
        if not isinstance(raw["zip"], Mapping) or not raw["zip"]:
            example = 'zip = { "policy" = ["fp32", "bf16"], "train.lr" = [1e-2, 3e-2] }'
            raise _err(source, f"{where}.zip", f"must be a non-empty table of lists, e.g. {example}")
        columns = _flatten_zip(raw["zip"])
        zipped = True
    else:
        if "field" not in raw or "values" not in raw:
            missing = "field" if "field" not in raw else "values"
            raise _err(source, f"{where}.{missing}", "is missing; valid: field + values, or zip")
        if not isinstance(raw["field"], str):
            raise _err(source, f"{where}.field", f"{raw['field']!r} is not a dotted field path string")
        columns = {raw["field"]: raw["values"]}
        zipped = False

    valid_paths = _paths(base)
    for field, values in columns.items():
        label = f"{where}.zip.{field}" if zipped else f"{where}.values ({field})"
        if not field or any(not part for part in field.split(".")):
            raise _err(source, f"{where} field {field!r}", "is not a dotted path like train.lr")
        if not _lookup(base, field) and validate is None:
            raise UserError(f"{source}: {unknown_choice(f'{where} field', field, valid_paths)}")
        if not _lookup(base, field):
            # Not in base: it must at least not go through a non-table (the validator judges the rest).
            parent = field.rsplit(".", 1)[0] if "." in field else ""
            node: Any = base
            for part in parent.split(".") if parent else []:
                node = node.get(part, {}) if isinstance(node, Mapping) else None
            if not isinstance(node, Mapping):
                raise _err(source, f"{where} field {field!r}", f"{parent!r} is not a table in [base]")
        if not isinstance(values, list):
            raise _err(source, label, f"{values!r} is not a list of values")
        if not values:
            raise _err(source, label, "has no values; give at least one")
        _check_plain(source, label, values)
        keys = [canonical_json(v) for v in values]
        if not zipped and len(set(keys)) != len(keys):
            dup = next(v for v, key in zip(values, keys) if keys.count(key) > 1)
            raise _err(source, label, f"repeats the value {dup!r}; every value must be distinct")
    lengths = {field: len(values) for field, values in columns.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{f}: {n}" for f, n in lengths.items())
        raise _err(source, f"{where}.zip", f"lists have different lengths ({shown}); make them equally long")
    fields = tuple(columns)
    points = tuple(zip(*(columns[f] for f in fields)))
    # In a zip a column may repeat a value (rows share a setting); a whole point must not repeat.
    point_keys = [canonical_json(list(p)) for p in points]
    if len(set(point_keys)) != len(point_keys):
        dup = next(p for p, key in zip(points, point_keys) if point_keys.count(key) > 1)
        raise _err(source, f"{where}.zip", f"repeats the point {dict(zip(fields, dup))!r}; every point must be distinct")
    return Axis(fields=fields, points=points, zipped=zipped)


def _parse_report(source: str, raw: Any, report_names: Mapping[str, Iterable[str]] | None) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise _err(source, "report", "must be a table with figures and/or tables lists")
    report = {}
    for key, names in raw.items():
        if key not in REPORT_KEYS:
            raise UserError(f"{source}: {unknown_choice('key in [report]', key, REPORT_KEYS)}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _err(source, f"report.{key}", f"{names!r} is not a list of names")
        valid = None if report_names is None else list(report_names.get(key, ()))
        for n in names if valid is not None else ():
            if n not in valid:  # checked now, not after the sweep has trained for minutes
                raise UserError(f"{source}: report.{key}: {unknown_choice(key[:-1], n, valid)}")
        report[key] = tuple(names)
    return report


def parse_sweep(
    data: Mapping[str, Any], source: str = "<sweep>", validate: Validate | None = None,
    report_names: Mapping[str, Iterable[str]] | None = None,
) -> SweepSpec:
    """Build a SweepSpec from already-parsed TOML data; `source` names it in error messages.
    `report_names` ({"figures": names, "tables": names}, from the report code) checks [report] now."""
    if data.get("kind") == "roundoff":
        raise UserError(f"{source}: is a roundoff experiment (kind = \"roundoff\"), not a sweep; "
                        f"run it with: precision-lab roundoff {source} --out DIR")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise UserError(f"{source}: {unknown_choice('top-level key', key, TOP_LEVEL_KEYS)}")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        raise _err(source, "name", f"{name!r} is not a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(source, "description", f"{description!r} is not a string")
    seeds = _parse_seeds(source, data.get("seeds", 1))
    base = data.get("base", {})
    if not isinstance(base, Mapping):
        raise _err(source, "base", f"{base!r} is not a table; write [base] with the configuration under it")
    _check_plain(source, "base", base)
    raw_axes = data.get("axes", [])
    if not isinstance(raw_axes, list):
        raise _err(source, "axes", "must be an array of tables: write each axis as [[axes]]")
    axes = tuple(_parse_axis(source, k, raw, base, validate) for k, raw in enumerate(raw_axes))
    seen: dict[str, int] = {}
    for k, axis in enumerate(axes):
        for field in axis.fields:
            # Also catches a field and one of its sub-fields (model / model.d_model): the order would matter.
            for other, j in seen.items():
                if field == other or field.startswith(other + ".") or other.startswith(field + "."):
                    raise _err(
                        source,
                        f"axes[{k}] field {field!r}",
                        f"overlaps {other!r} of axes[{j}]; each field may be swept by one axis only",
                    )
            seen[field] = k
    report = _parse_report(source, data.get("report", {}), report_names)
    spec = SweepSpec(
        name=name, description=description, source=source, seeds=seeds, base=base, axes=axes, report=report
    )
    if validate is not None:
        for config, overrides in _configs(spec):
            try:
                validate(copy.deepcopy(config))
            except UserError as e:
                at = ", ".join(f"{f}={v!r}" for f, v in overrides.items()) or "[base]"
                if overrides and _same_error(validate, base, e):
                    at = "[base]"  # the base itself is wrong: not the fault of the first axis point
                raise UserError(f"{source}: {at}: {_one_line(e)}") from None
    return spec


def _same_error(validate: Validate, base: Mapping[str, Any], err: UserError) -> bool:
    try:
        validate(copy.deepcopy(dict(base)))
    except UserError as base_err:
        return str(base_err) == str(err)
    return False


def load_sweep(path: str | os.PathLike, validate: Validate | None = None,
               report_names: Mapping[str, Iterable[str]] | None = None) -> SweepSpec:
    """Read and check a sweep TOML file. Every problem raises a one-line UserError naming the file and
    the field; `validate(config)` (optional, from the trainer) may raise UserError for a bad config;
    `report_names` checks the [report] figure and table names."""
    return parse_sweep(read_toml(path, "sweep file"), str(path), validate, report_names)


# -- expansion --------------------------------------------------------------------------------------------


def _configs(spec: SweepSpec) -> list[tuple[dict, dict]]:
    """(config, overrides) for every point of the axes' product, the last axis fastest."""
    out = []
    for combo in itertools.product(*(axis.points for axis in spec.axes)):
        overrides: dict[str, Any] = {}
        for axis, point in zip(spec.axes, combo):
            overrides.update(zip(axis.fields, point))
        config = copy.deepcopy(dict(spec.base))
        for field, value in overrides.items():
            _assign(config, field, value)
        out.append((config, overrides))
    return out


def _hash(value: Any, n: int) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:n]


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return canonical_json(value)


def _prefix(overrides: Mapping[str, Any]) -> str:
    # Readable, not unique: the hash after it carries the identity. The last path component is enough
    # to recognise a field (train.z_loss -> z_loss); file-name-safe characters only.
    text = ",".join(f"{field.rsplit('.', 1)[-1]}={_label(v)}" for field, v in overrides.items()) or "base"
    text = re.sub(r"[^A-Za-z0-9._=+,-]", "_", text).lstrip(".")
    return text[:60] or "base"


def _without(config: Mapping[str, Any], fields: Iterable[str]) -> dict:
    config = copy.deepcopy(dict(config))
    for field in fields:
        *parents, leaf = field.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def run_id_for(config: Mapping[str, Any], seed: int, overrides: Mapping[str, Any] | None = None) -> str:
    """The stable id of (config, seed): readable prefix from `overrides`, then a 48-bit content hash."""
    return f"{_prefix(overrides or {})}-s{seed}-{_hash({'config': config, 'seed': seed}, 12)}"


def expand(spec: SweepSpec, batchable_fields: Iterable[str] = ()) -> list[RunSpec]:
    """Every run of the sweep in a deterministic order (axes product, last axis fastest; seeds innermost).

    `batchable_fields`: dotted paths the trainer can batch over inside one compiled program (values that
    do not change compiled shapes or dtypes, e.g. "train.lr"). Runs that differ only in the seed and in
    these fields share a group_key. By default only seeds are batched. `train.label` never splits a group:
    it names a row of the report and changes nothing that is compiled (each run's record keeps its own).
    """
    batchable_fields = tuple(batchable_fields) + ("train.label",)
    runs = []
    for config, overrides in _configs(spec):
        group_key = _hash({"config": _without(config, batchable_fields)}, 16)
        for seed in spec.seeds:
            runs.append(
                RunSpec(
                    run_id=run_id_for(config, seed, overrides),
                    group_key=group_key,
                    seed=seed,
                    config=config,
                    overrides=dict(overrides),
                    index=len(runs),
                )
            )
    return runs


def group_runs(runs: Iterable[RunSpec]) -> list[list[RunSpec]]:
    """Runs grouped by group_key, groups in order of first appearance, runs in their given order."""
    groups: dict[str, list[RunSpec]] = {}
    for run in runs:
        groups.setdefault(run.group_key, []).append(run)
    return list(groups.values())


# -- sharding ---------------------------------------------------------------------------------------------


def _check_shard(i: Any, n: Any, text: str | None = None) -> tuple[int, int]:
    shown = text if text is not None else f"{i}/{n}"
    if not (_is_int(i) and _is_int(n)):
        raise UserError(f"--shard {shown!r}: expected I/N with integers, e.g. --shard 0/4")
    if n < 1:
        raise UserError(f"--shard {shown!r}: the number of shards N must be at least 1")
    if not 0 <= i < n:
        raise UserError(f"--shard {shown!r}: the shard index must be 0..{n - 1} for {n} shards")
    return i, n


def parse_shard(text: str) -> tuple[int, int]:
    """Parse "--shard I/N" (0 <= I < N) into (I, N); UserError on anything else."""
    m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
    return _check_shard(int(m.group(1)), int(m.group(2)), str(text))


def _select_groups(groups: Sequence[Sequence[RunSpec]], i: int, n: int) -> list[list[RunSpec]]:
    # Deal groups round-robin in group_key (hash) order: balanced counts, and no shard gets all runs of
    # one axis value (the last axis varies fastest, so dealing in sweep order would do exactly that).
    order = sorted(range(len(groups)), key=lambda k: (groups[k][0].group_key, k))
    return [list(groups[k]) for k in sorted(order[i::n])]


def shard(runs_or_groups: Sequence[RunSpec] | Sequence[Sequence[RunSpec]], i: int, n: int):
    """The i-th of n disjoint parts of a sweep, split by groups (a group never spans shards).

    Given runs, returns that shard's runs (in sweep order); given groups, returns its groups.
    """
    i, n = _check_shard(i, n)
    items = list(runs_or_groups)
    if items and isinstance(items[0], RunSpec):
        return [run for group in _select_groups(group_runs(items), i, n) for run in group]
    return _select_groups(items, i, n)


# -- execution --------------------------------------------------------------------------------------------


def sweep_manifest(spec: SweepSpec, runs: Sequence[RunSpec], batchable_fields: Iterable[str] = ()) -> dict:
    """The expanded sweep as plain data: what DIR/sweep.json holds (identical for every shard)."""
    return {
        "name": spec.name,
        "description": spec.description,
        "source": spec.source,
        "seeds": list(spec.seeds),
        "base": spec.base,
        "axes": [
            {"fields": list(a.fields), "points": [list(p) for p in a.points], "zipped": a.zipped}
            for a in spec.axes
        ],
        "report": {k: list(v) for k, v in spec.report.items()},
        "batchable_fields": list(batchable_fields),
        "n_runs": len(runs),
        "n_groups": len(group_runs(runs)),
        "runs": [
            {"run_id": r.run_id, "group_key": r.group_key, "seed": r.seed, "overrides": r.overrides}
            for r in runs
        ],
    }


def _record(spec: SweepSpec, run: RunSpec, result: Mapping[str, Any], timing: dict) -> tuple[dict, Any]:
    if not isinstance(result, Mapping):
        raise TypeError(f"run_group returned {type(result).__name__} for {run.run_id}; expected a dict")
    result = dict(result)
    metrics = result.pop("metrics", None)
    ours = {
        "run_id": run.run_id,
        "sweep": spec.name,
        "seed": run.seed,
        "group_key": run.group_key,
        "overrides": run.overrides,
        "config": run.config,
    }
    for key in RUN_KEYS:
        if key in result and to_jsonable(result[key]) != to_jsonable(ours[key]):
            raise ValueError(f"run_group's record for {run.run_id} sets {key!r} unlike the sweep's value")
    return {**ours, **result, "timing": {**result.get("timing", {}), **timing}}, metrics


def _todo(group: Sequence[RunSpec], done: set[str]) -> list[RunSpec]:
    return [r for r in group if r.run_id not in done]


def check_store(store: ResultsStore, name: str, *, force: bool = False) -> None:
    """Refuse (UserError) a store that holds another sweep or a train run, unless `force`, which empties it.
    The same sweep, extended or not, is welcome: its finished runs are reused."""
    if (store.path / "summary.json").exists() and not (store.path / "sweep.json").exists():
        raise UserError(f"--out {store.path}: is the output folder of `precision-lab train`, not a results "
                        "store; use another --out")
    old = store.manifest()
    if old is None or old.get("name") == name:
        return
    theirs = str(old.get("name"))
    if force:
        shutil.rmtree(store.runs_dir, ignore_errors=True)
        store.manifest_path.unlink(missing_ok=True)
        return
    if theirs == name + "_smoke" or name == theirs + "_smoke":
        what = "the smoke version" if theirs.endswith("_smoke") else "the full version"
        hint = f"it holds {what} of this sweep ({theirs!r}), whose runs would be reported as {name!r}"
    else:
        hint = f"it holds another sweep ({theirs!r}); the two would mix their records"
    raise UserError(f"--out {store.path}: {hint}; use another --out, or --force to empty it first")
GroupTask = Callable[[list[RunSpec]], Any]
# executor(task, groups) -> (group, task(group)) for each group, as each finishes (any order)
Executor = Callable[[GroupTask, Iterable[list[RunSpec]]], Iterable[tuple[list[RunSpec], Any]]]


def in_process(task: GroupTask, groups: Iterable[list[RunSpec]]) -> Iterator[tuple[list[RunSpec], Any]]:
    """The default executor: each group in this process, one after the other."""
    for group in groups:
        yield group, task(group)


def timed_group(run_group: Callable[[list[RunSpec]], list[dict]], group: list[RunSpec]) -> tuple[list, dict]:
    """`run_group(group)` and the timing that goes into its records, measured where it ran (a module-level
    function, so a `functools.partial` of it pickles for executors that run groups in other processes)."""
    t0 = time.perf_counter()
    results = list(run_group(list(group)))
    return results, {
        "group_seconds": time.perf_counter() - t0,
        "group_runs": len(group),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def run_sweep(
    spec: SweepSpec | str | os.PathLike,
    out_dir: str | os.PathLike,
    run_group: Callable[[list[RunSpec]], list[dict]],
    shard: tuple[int, int] | str = (0, 1),
    resume: bool = True,
    progress: bool = True,
    batchable_fields: Iterable[str] = (),
    executor: Executor | None = None,
    force: bool = False,
    group_steps: Callable[[Sequence[RunSpec]], int] | None = None,
) -> SweepSummary:
    """Run one shard of a sweep into the results store at `out_dir`.

    `run_group(runs)` gets all the runs of one group that still misses a run (same group_key, so one compiled
    program) and returns one record dict per run, in the same order; only the missing ones are stored. A record's optional "metrics" entry
    (name -> per-step array) goes to the run's metrics file; run_sweep adds run_id, sweep, seed,
    group_key, overrides, config and "timing" (the only fields that differ between identical reruns).

    resume=True skips runs already stored; resume=False recomputes this shard and overwrites its records.
    Records are stored one by one as each group finishes, so a killed sweep loses at most the groups in
    flight. `shard` is (i, n) or "i/n".

    `executor(task, groups)` runs `task(group)` for each group still missing runs and yields
    `(group, task(group))` as each finishes, in any order (default `in_process`: one after the other, here).
    Another executor (precision_lab.executors.ray_executor) may run groups elsewhere, in parallel; only this
    process writes the store, so workers need no shared file system.
    A store that holds another sweep (another name: also the smoke version of this one) is refused with a
    UserError before anything runs, unless `force`, which empties it first. Extending this sweep (same
    name, more points) is fine. `group_steps(group)` (optional) gives a group's steps per member: the
    progress bar then counts member-steps (members x steps) and, if `run_group` takes a `progress`
    keyword, advances inside the running group as it calls `progress(member_steps_done)`.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    i, n = parse_shard(shard) if isinstance(shard, str) else _check_shard(*shard)
    batchable_fields = tuple(batchable_fields)
    started = time.perf_counter()
    store = ResultsStore(out_dir)
    runs = expand(spec, batchable_fields)
    check_store(store, spec.name, force=force)
    store.write_manifest(sweep_manifest(spec, runs, batchable_fields))
    mine = _select_groups(group_runs(runs), i, n)
    shard_runs = sum(len(g) for g in mine)
    done = {run.run_id for g in mine for run in g if store.has(run.run_id)} if resume else set()

    from tqdm.auto import tqdm  # imported here: only a running sweep needs it

    # Progress in member-steps when the trainer says how long a group is (a bar of whole groups sits at
    # 0/48 for minutes and has no ETA), else in runs.
    cost = (lambda g: len(g) * group_steps(g)) if group_steps is not None else len
    in_group = group_steps is not None and "progress" in inspect.signature(run_group).parameters
    computed = raced = groups_run = 0
    desc = spec.name if n == 1 else f"{spec.name} [shard {i}/{n}]"
    with tqdm(
        total=sum(cost(g) for g in mine), initial=sum(cost(g) for g in mine if not _todo(g, done)), desc=desc,
        unit="step" if group_steps else "run", disable=not progress, file=sys.stderr, dynamic_ncols=True,
    ) as bar:
        missing_ids: dict[str, set[str]] = {}
        started_at: dict[str, int] = {}
        live = in_group and executor is None  # the bar advances inside a group only when it runs here

        def pending():  # lazy: the in-process executor asks for the next group only when it is free
            for k, group in enumerate(mine):
                todo = _todo(group, done)
                if not todo:
                    continue  # counted in the bar's initial value
                # Look again: another process (a concurrent resume of this shard) may have stored some since.
                missing = [r for r in todo if not (resume and store.has(r.run_id))]
                if not missing:
                    bar.update(cost(group))
                    continue
                missing_ids[group[0].group_key] = {r.run_id for r in missing}
                bar.set_postfix_str(f"group {k + 1}/{len(mine)} {missing[0].run_id.rsplit('-s', 1)[0]}",
                                    refresh=False)
                started_at[group[0].group_key] = bar.n
                # The whole group runs again even if only some of it is missing (a kill between two of its
                # records): a vmapped program's numbers may depend on which members it holds (XLA orders
                # batched reductions by batch size), so only the original membership reproduces the original
                # records.
                yield list(group)

        task = functools.partial(run_group, progress=bar.update) if live else run_group
        for group, (results, timing) in (executor or in_process)(functools.partial(timed_group, task), pending()):
            # the group is done, whatever it reported
            bar.update(started_at[group[0].group_key] + cost(group) - bar.n if live else cost(group))
            if len(results) != len(group):
                raise ValueError(f"run_group returned {len(results)} records for {len(group)} runs")
            groups_run += 1
            wanted = missing_ids[group[0].group_key]
            for run, result in zip(group, results):
                if run.run_id not in wanted:
                    continue
                record, metrics = _record(spec, run, result, timing)
                try:
                    store.put(run.run_id, record, metrics, overwrite=not resume)
                    computed += 1
                except RecordConflict:
                    # First writer wins: another process stored this run while we computed it.
                    raced += 1
    return SweepSummary(
        name=spec.name,
        out_dir=str(out_dir),
        shard=(i, n),
        total_runs=len(runs),
        shard_runs=shard_runs,
        skipped=shard_runs - computed - raced if resume else 0,
        computed=computed,
        raced=raced,
        groups_run=groups_run,
        seconds=time.perf_counter() - started,
    )
