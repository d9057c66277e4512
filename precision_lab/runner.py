"""Sweep execution: turn a group of runs (one configuration, several seeds) into stored records by training
the seeds vmapped in one compiled program.

This is where `sweep` (expansion, store, resume) meets `train`; `sweep.py` itself knows nothing of models.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from precision_lab.config import RunConfig, run_config, validate
from precision_lab.errors import UserError
from precision_lab.store import canonical_json
from precision_lab.sweep import Executor, RunSpec, SweepSpec, SweepSummary, expand, load_sweep, run_sweep
from precision_lab.train import BATCHABLE_FIELDS, enable_compilation_cache, hparams_of, run_mesh, train

# The built-in sweep of `precision-lab run` (shipped inside the package so an installed lab has it).
QUICKSTART = Path(__file__).with_name("quickstart.toml")


def pretrained_point(run: RunConfig, seeds: list[int], pretrained_dir: str | os.PathLike) -> Path:
    """The `precision-lab train` folder of fine-tuning run `run`'s pretraining sweep point
    (`finetune.pretrain`, see precision_lab.finetune) for `seeds`, trained now if it is not there yet.

    Content-addressed: PRETRAINED_DIR/<fingerprint of the pretraining config>-s<seeds>, so every fine-tuning
    run (of this sweep or another sweep given the same --pretrained folder) that names the same point and
    seeds reuses one training. It trains into NAME.partial (checkpointed, so a killed sweep resumes it
    bit-identically) under an exclusive lock (shards wait for each other instead of training it twice),
    then renames it into place."""
    import fcntl
    import sys

    import jax

    from precision_lab.finetune import PARAMS_FILE, pretraining_spec
    from precision_lab.model import init as model_init

    pre = run_config(pretraining_spec(run.to_dict()))
    shapes = [jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda k: model_init(k, c.model, c.policy)[0],
                                                              jax.random.key(0))) for c in (pre, run)]
    if shapes[0] != shapes[1]:
        raise UserError("finetune.pretrain: its model's parameter shapes differ from the fine-tuning model's; "
                        "set only fields that keep the shapes (capacity factors, loss coefficients, dropout)")
    seed_text = "-".join(map(str, seeds)) if len(seeds) <= 12 else hashlib.sha256(canonical_json(seeds).encode()).hexdigest()[:12]
    root = Path(pretrained_dir)
    final = root / f"{pre.fingerprint()}-s{seed_text}"
    if (final / PARAMS_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, however it ends
        if not (final / PARAMS_FILE).is_file():
            partial = root / f"{final.name}.partial"
            print(f"pretraining {final} ({len(seeds)} seeds x {pre.train.steps} steps) for fine-tuning",
                  file=sys.stderr, flush=True)
            if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):  # its config.json then names them,
                # so `precision-lab finetune --from` the folder finds every seed (the fingerprint ignores seeds)
                pre = dataclasses.replace(pre, train=dataclasses.replace(pre.train, seed=seeds[0], seeds=len(seeds)))
            train(pre, seeds=list(seeds), out_dir=partial, resume=True, progress=False)
            partial.rename(final)
    return final


def run_group(runs: list[RunSpec], progress: Callable[[int], object] | None = None,
              pretrained_dir: str | os.PathLike | None = None) -> list[dict]:
    """Train every run of one group (identical configurations, different seeds) in one vmapped program.
    `progress(n)` is called as n more member-steps finish (see `group_steps`). Fine-tuning runs that name a
    pretraining sweep point (`finetune.pretrain`) start from its folder under `pretrained_dir`, trained
    first where missing (`pretrained_point`)."""
    enable_compilation_cache()  # also in a worker process of another executor: compile each shape once
    configs = [run_config(r.config) for r in runs]
    seeds = [r.seed for r in runs]
    pretrained = None
    if configs[0].finetune.pretrain:  # every member shares it: the point ignores the batchable fields
        if pretrained_dir is None:
            raise UserError("finetune.pretrain needs a folder for the pretrained runs (sweep --pretrained DIR)")
        pretrained = pretrained_point(configs[0], sorted(set(seeds)), pretrained_dir)
        configs = [dataclasses.replace(c, finetune=dataclasses.replace(c.finetune, from_run=str(pretrained),
                                                                       pretrain={}))
                   for c in configs]
    run = configs[0]  # the group shares everything but seeds and BATCHABLE_FIELDS (traced hyperparameters)
    result = train(run, seeds=seeds, hparams=[hparams_of(c) for c in configs], progress=progress or False)
    s = result.summary
    records = []
    for i, _ in enumerate(runs):
        per_seed = {
            "final_eval_loss": s["final_eval_loss"][i],
            "final_train_loss": s["final_train_loss"][i],
            "final_eval_batch_losses": s["final_eval_batch_losses"][i],
            "quality_gap": None if s["quality_gap"] is None else s["quality_gap"][i],
            "outcome": s["outcome"][i],
            "diverged": s["diverged"][i],
            "divergence_step": s["divergence_step"][i],
            "divergence_rule": s["divergence_rule"][i],
            "first_loss_spike_step": s["first_loss_spike_step"][i],
            "eval_history": [{"step": e["step"], "loss": e["loss"][i]} for e in s["eval_history"]],
        }
        if s.get("routing_stats") is not None:  # train.routing_stats_batches: per sparse layer
            per_seed["routing_stats"] = s["routing_stats"][i]
        if "finetune" in s:  # a fine-tuning run: its task's test-split loss
            per_seed["final_test_loss"] = s["finetune"]["final_test_loss"][i]
        if pretrained is not None:  # and where it started: the pretraining point's own final eval loss
            pre = json.loads((pretrained / "summary.json").read_text())
            per_seed["pretrained_run"] = pretrained.name
            per_seed["pretrain_final_eval_loss"] = pre["final_eval_loss"][pre["seeds"].index(runs[i].seed)]
        shared = {k: s.get(k) for k in ("best_loss", "best_loss_stderr", "unigram_loss", "entropy_rate", "backend",
                                        "device", "jax_version", "xla_flags", "policy_resolved")}
        shared["moe_layer_names"] = list(run.model.moe_layer_names())
        metrics = {name: np.asarray(v[:, i]) for name, v in result.metrics.items()}  # every per-step metric
        # timing is the one part of a record that differs between identical reruns: the store keeps it apart
        records.append({"result": per_seed, "env": shared, "resolved": configs[i].to_dict(), "metrics": metrics,
                        "timing": dict(s["timing"])})
    return records


# The smoke version of a sweep: seconds instead of minutes, same code path (what tests/test_experiments.py
# runs for the shipped experiments). A micro model, a few steps, two seeds, and each axis cut to its first
# point, except axes of batchable hyperparameters, which keep two points so the vmapped-hyperparameter path
# is exercised too.
SMOKE_BASE = {
    # One encoder and one decoder block, both sparse: an MoE layer on each side (what the routing tables and
    # the encoder-vs-decoder report need) in the fewest ops. A smoke run's cost is its compilation, which
    # grows with the blocks: 9 s here against 16 s for 2 + 2 blocks with every second one sparse (st-moe
    # policy, 2 AMD EPYC cores).
    "model": {"d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "num_encoder_layers": 1,
              "num_decoder_layers": 1, "moe_every": 1, "num_experts": 4},
    "train": {"steps": 6, "chunk_steps": 3, "batch_size": 4, "eval_every": 0, "eval_batches": 1,
              "checkpoint_every": 0},
    # a warm-up no longer than the run: a cosine schedule must end after it (and 6 steps reach the peak lr)
    "optim": {"warmup_steps": 2},
}


def smoke(spec: SweepSpec) -> SweepSpec:
    base = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.base.items()}
    for section, fields in SMOKE_BASE.items():
        base[section] = {**base.get(section, {}), **fields}
    if base["train"].get("replicas", 1) > 1:  # emulated replicas must still divide the smoke batch (and
        # stay > 1, so the smoke version runs the ring all-reduce path)
        base["train"]["replicas"] = math.gcd(base["train"]["replicas"], SMOKE_BASE["train"]["batch_size"])
    pretrain = base.get("finetune", {}).get("pretrain")
    if pretrain:  # a pretraining sweep point trains a few steps too (its model is the smoke model already)
        base["finetune"] = {**base["finetune"], "pretrain": {**pretrain, "train": {**pretrain.get("train", {}),
                                                                                   **SMOKE_BASE["train"]}}}
    axes = tuple(dataclasses.replace(a, points=a.points[: 2 if set(a.fields) <= set(BATCHABLE_FIELDS) else 1])
                 for a in spec.axes)
    return dataclasses.replace(spec, name=spec.name + "_smoke", base=base, axes=axes, seeds=spec.seeds[:2])


def group_steps(group: list[RunSpec]) -> int:
    """Training steps of each member of a group (the progress bar counts members x steps)."""
    return run_config(group[0].config).train.steps


def load(path: str | os.PathLike, *, smoke_test: bool = False,
         report_names: Mapping[str, Iterable[str]] | None = None) -> SweepSpec:
    """The sweep TOML at `path`, every run configuration (and, given `report_names`, the [report] names)
    checked; its smoke version with `smoke_test`."""
    spec = load_sweep(path, validate=validate, report_names=report_names)
    return smoke(spec) if smoke_test else spec


def sweep(path: str | os.PathLike, out_dir: str | os.PathLike, *, shard: str | tuple[int, int] = (0, 1),
          resume: bool = True, progress: bool = True, smoke_test: bool = False, force: bool = False,
          report_names: Mapping[str, Iterable[str]] | None = None, executor: Executor | None = None,
          run_group: Callable[..., list[dict]] = run_group,
          pretrained: str | os.PathLike | None = None) -> SweepSummary:
    """Run the sweep TOML at `path` into the results store at `out_dir` (see `precision_lab.sweep`).
    `smoke_test` runs the seconds-long smoke version of the same sweep (see `smoke`); a store of another
    sweep is refused unless `force` (see `check_store`); `executor` runs the groups elsewhere
    (`precision_lab.executors`; default: in this process); `run_group` trains one group (default: this
    module's). Fine-tuning runs with a pretraining sweep point (`finetune.pretrain`) pretrain into
    `pretrained` (default OUT_DIR/pretrained; give several sweeps one folder to share their pretraining)."""
    spec = load(path, smoke_test=smoke_test, report_names=report_names)
    enable_compilation_cache()
    if executor is None:  # a train.mesh must fit the devices here: say so before any group trains
        for config in {canonical_json(r.config): r.config for r in expand(spec)}.values():
            run_mesh(run_config(config))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if "pretrained_dir" in inspect.signature(run_group).parameters:
        run_group = functools.partial(run_group, pretrained_dir=str(Path(pretrained or Path(out_dir) / "pretrained").resolve()))
    return run_sweep(spec, out_dir, run_group, shard=shard, resume=resume, progress=progress,
                     batchable_fields=tuple(BATCHABLE_FIELDS), force=force, group_steps=group_steps,
                     executor=executor)
