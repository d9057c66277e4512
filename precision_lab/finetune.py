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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from precision_lab.errors import UserError, unknown_choice

TRAINABLE: tuple[str, ...] = ("all", "non_moe", "moe", "attention", "ffn")
PARAMS_FILE = "params.npz"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Fine-tuning settings; an empty `task` means pretraining (the default).

    Attributes:
      from_run: the output folder of a finished `precision-lab train` run (holds params.npz).
      task: a built-in task of precision_lab.tasks (e.g. "langid-small").
      trainable: which parameters move: all | non_moe | moe | attention | ffn.
    """

    from_run: str = ""
    task: str = ""
    trainable: str = "all"

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise unknown_choice("finetune.trainable", self.trainable, TRAINABLE)
        if self.task:
            from precision_lab.tasks import check_task

            check_task(self.task)
            if not self.from_run:
                raise UserError("finetune.from_run is required with finetune.task (a `precision-lab train` --out folder)")

    @property
    def active(self) -> bool:
        return bool(self.task)


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
