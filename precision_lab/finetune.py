"""Fine-tuning: which pretrained run to start from, which task, and which parameters may move.

A run whose `finetune.task` is set starts every seed from the final parameters of a finished
`precision-lab train` run (`finetune.from_run`, its `params.npz`) instead of a fresh initialisation, and
trains on a downstream task of `precision_lab.tasks`. Everything else (policy, optimiser, divergence rules,
telemetry, outputs) is the ordinary training loop's.

Parameter subsets (ST-MoE section 4.2, Table 6), by the parameter tree's names:
  all        every parameter.
  non_moe    everything but the sparse layers (router and experts).
  moe        only the sparse layers (router and experts).
  attention  only self- and encoder-decoder attention (q, k, v, o) and the relative position biases.
  ffn        only the dense (non-MoE) feed-forward layers, as ST-MoE's "FFN" row.
Frozen parameters get a zero update through optax (`optax.partition` with `optax.set_to_zero`), so they
keep no optimiser state; `trainable_labels` decides the partition.

Where the pretrained parameters come from: `from_run` (a folder, as `precision-lab finetune --from` takes)
or `pretrain`, a pretraining sweep point: the pretraining run is this run's own model, data, policy and
divergence rules (without the batchable loss coefficients, so every member of a vmapped group shares it),
with `pretrain` laid over them section by section; its `train` and `optim` come from `pretrain` alone (their
defaults otherwise), so a fine-tuning lr or batch-size axis never changes the pretraining. `pretraining_spec`
builds it; the sweep runner trains each distinct point once per seed list, content-addressed by its
fingerprint, and fine-tunes every run that names it from there (precision_lab.runner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from precision_lab.errors import UserError, unknown_choice

TRAINABLE: tuple[str, ...] = ("all", "non_moe", "moe", "attention", "ffn")
PARAMS_FILE = "params.npz"
# sections a pretraining point may set; its data is the fine-tuning run's (the task is built from its languages)
PRETRAIN_SECTIONS: tuple[str, ...] = ("model", "train", "optim", "divergence", "policy")
# model fields a vmapped group may vary (traced loss coefficients: precision_lab.train.BATCHABLE_FIELDS): the
# pretraining point does not inherit them, so all members of a group share one pretraining
_GROUP_VARYING_MODEL_FIELDS = ("load_balance_coef", "router_z_loss_coef", "output_z_loss_coef")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Fine-tuning settings; an empty `task` means pretraining (the default).

    Attributes:
      from_run: the output folder of a finished `precision-lab train` run (holds params.npz).
      task: a built-in task of precision_lab.tasks (e.g. "langid-small").
      trainable: which parameters move: all | non_moe | moe | attention | ffn.
      pretrain: a pretraining sweep point instead of from_run: sections (model, train, optim, divergence,
        policy) laid over this run's own model, policy and divergence rules (see the module docstring).
    """

    from_run: str = ""
    task: str = ""
    trainable: str = "all"
    pretrain: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise unknown_choice("finetune.trainable", self.trainable, TRAINABLE)
        if not isinstance(self.pretrain, Mapping):
            raise UserError(f"finetune.pretrain must be a table of sections ({', '.join(PRETRAIN_SECTIONS)}), "
                            f"got {self.pretrain!r}")
        for key, value in self.pretrain.items():
            if key not in PRETRAIN_SECTIONS:
                raise unknown_choice("finetune.pretrain section", key, PRETRAIN_SECTIONS)
            if key != "policy" and not isinstance(value, Mapping):
                raise UserError(f"finetune.pretrain.{key} must be a table of {key} fields, got {value!r}")
        if self.task:
            from precision_lab.tasks import check_task

            check_task(self.task)
            if not self.from_run and not self.pretrain:
                raise UserError("finetune.task needs finetune.from_run (a `precision-lab train` --out folder) or "
                                "finetune.pretrain (a pretraining sweep point)")
        if self.from_run and self.pretrain:
            raise UserError("finetune.from_run and finetune.pretrain both name the pretrained parameters; give one")

    def __hash__(self):  # the pretrain table is a dict: hash its canonical JSON
        import json

        return hash((self.from_run, self.task, self.trainable, json.dumps(self.pretrain, sort_keys=True)))

    @property
    def active(self) -> bool:
        return bool(self.task)


def pretraining_spec(resolved: Mapping) -> dict:
    """The run-config spec of the pretraining point of a fine-tuning run, from that run's resolved
    configuration (`RunConfig.to_dict()`): its model (less the loss coefficients a group may vary), data,
    policy and divergence rules, with `finetune.pretrain` laid over them section by section; `train` and
    `optim` from `finetune.pretrain` only; no finetune section."""
    pretrain = resolved["finetune"]["pretrain"]
    model = {k: v for k, v in resolved["model"].items() if k not in _GROUP_VARYING_MODEL_FIELDS}
    spec = {"model": {**model, **pretrain.get("model", {})}, "data": dict(resolved["data"]),
            "divergence": {**resolved["divergence"], **pretrain.get("divergence", {})},
            "policy": pretrain.get("policy", resolved["policy"])}
    for section in ("train", "optim"):
        if section in pretrain:
            spec[section] = dict(pretrain[section])
    return spec


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def is_trainable(names: list[str], which: str) -> bool:
    """Does the parameter at tree path `names` move under subset `which`?"""
    moe = "moe" in names
    if which == "all":
        return True
    if which == "non_moe":
        return not moe
    if which == "moe":
        return moe
    if which == "attention":
        return any(n in ("self_attn", "cross_attn") for n in names) or names[-1] == "position_bias"
    if which == "ffn":
        return "ffn" in names and not moe
    raise unknown_choice("finetune.trainable", which, TRAINABLE)


def trainable_labels(params, which: str):
    """A tree of "trainable" / "frozen" labels shaped like `params` (optax.partition's labels)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "trainable" if is_trainable(_names(path), which) else "frozen", params)


# -- parameters on disk --------------------------------------------------------------------------------------


def save_params(out: Path, master, seeds: list[int]) -> None:
    """Write every seed's final master weights, keyed by tree path, stacked over seeds (atomically)."""
    import io

    from precision_lab.store import atomic_write

    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(master))[0]
    arrays = {"/".join(_names(path)): np.asarray(x) for path, x in flat}
    buf = io.BytesIO()
    np.savez(buf, __seeds__=np.asarray(seeds, np.int64), **arrays)
    atomic_write(Path(out) / PARAMS_FILE, buf.getvalue())


def load_params(run_dir: str | Path, template, seeds: list[int]):
    """The master weights of `seeds` from a finished train run, stacked on a leading member axis, checked
    leaf by leaf against `template` (one seed's parameter shapes): a mismatch is a one-line UserError."""
    path = Path(run_dir) / PARAMS_FILE
    if not path.is_file():
        raise UserError(f"finetune.from_run {str(run_dir)!r}: no {PARAMS_FILE} there; give the --out folder of a "
                        "finished `precision-lab train` run")
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    stored_seeds = [int(s) for s in stored.pop("__seeds__")]
    missing = [s for s in seeds if s not in stored_seeds]
    if missing:
        raise UserError(f"finetune.from_run {str(run_dir)!r} holds seeds {stored_seeds}, not {missing}: "
                        "fine-tune the pretrained seeds (--seeds up to their number)")
    rows = np.array([stored_seeds.index(s) for s in seeds])
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for p, leaf in flat:
        name = "/".join(_names(p))
        if name not in stored:
            raise UserError(f"finetune.from_run {str(run_dir)!r}: the checkpoint has no parameter {name}; "
                            "its model does not fit this configuration")
        got = stored[name].shape[1:]
        if tuple(got) != tuple(leaf.shape):
            raise UserError(f"finetune.from_run {str(run_dir)!r}: parameter {name} has shape {tuple(got)}, this "
                            f"model needs {tuple(leaf.shape)}; the checkpoint's shapes do not fit")
        leaves.append(stored[name][rows].astype(np.float32))
    extra = sorted(set(stored) - {"/".join(_names(p)) for p, _ in flat})
    if extra:
        raise UserError(f"finetune.from_run {str(run_dir)!r}: the checkpoint has parameters this model lacks "
                        f"({extra[0]}, ...); its shapes do not fit")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def pretrained_spec(run_dir: str | Path) -> dict:
    """The resolved configuration of a finished train run (its config.json), as a run-config spec."""
    import json

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"--from {str(run_dir)!r}: no config.json there; give the --out folder of a finished "
                        "`precision-lab train` run")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--from {str(run_dir)!r}: config.json is unreadable ({e})") from None
    spec = {k: v for k, v in config.items() if k != "policy_resolved"}
    spec.pop("finetune", None)
    spec["model"] = {k: v for k, v in spec.get("model", {}).items()}
    return spec
