"""The `precision-lab` command line.

Every subcommand is a thin shell over a library function. A `UserError` (bad name, value or file) becomes
one line on stderr and exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from precision_lab.errors import UserError

COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, example: str):
    """Register a subcommand: the decorated function adds its arguments; `run` executes it. `example` is
    one command line, shown at the end of the command's --help."""

    def wrap(add_args):
        def register(run):
            COMMANDS[name] = (help, example, add_args, run)
            return run

        return register

    return wrap


def writable_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Prove, before any work, that `path` is a folder a file can be written in, or can be created as one:
    one UserError line otherwise (an existing file, /proc/x, a read-only place). Creates nothing: a probe
    file (deleted at once) in the folder or in its nearest existing parent; not os.access, which says yes
    to root everywhere."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder; give a folder")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a folder; give a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({err.strerror or err}); give a writable "
                        "folder") from None
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (>= 1)")
    return value


def _report_names() -> dict[str, list[str]]:
    """The figure and table names a sweep's [report] may use (checked when the sweep is loaded)."""
    from precision_lab.figures import SWEEP_FIGURES
    from precision_lab.report import TABLES

    return {"figures": list(SWEEP_FIGURES), "tables": list(TABLES)}


def _fmt_num(v: float) -> str:
    return f"{v:.6g}"


def _add_formats(p):
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


SPECIALS = {"ieee": "inf, NaN", "fn": "NaN only (no inf)", "fnuz": "one NaN, no -0, no inf",
            "none": "none (finite only)", "e8m0": "NaN, no zero, unsigned"}


@command("formats", "print the table of number formats (with their aliases and special values)",
         "precision-lab formats --json")(_add_formats)
def _formats(args) -> int:
    from precision_lab.formats import format_table

    rows = format_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "bits", "exponent_bits", "mantissa_bits", "bias", "max", "min_normal", "min_subnormal", "eps"]
    head = ["format", "bits", "exp", "man", "bias", "max", "min normal", "min subnormal", "eps", "specials",
            "aliases"]
    table = [[_fmt_num(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols]
             + [SPECIALS[r["specials"]], ", ".join(r["aliases"])] for r in rows]
    _print_table(head, table)
    print("e4m3 and fp8 are fp8_e4m3fn (OCP/NVIDIA, max 448); fp8_e4m3 is the IEEE-style e4m3 with inf (max 240). "
          "Any eXmY (e.g. e5m7) is an IEEE-style custom format.")
    return 0


def _print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _add_roundoff(p):
    p.add_argument("--format", action="append", dest="formats", metavar="NAME",
                   help="format to tabulate (repeatable; default: bf16 and fp32 as in ST-MoE)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("roundoff-table", "maximum roundoff per binade, as the ST-MoE paper prints it",
         "precision-lab roundoff-table --format bf16 --format fp8_e4m3fn")(_add_roundoff)
def _roundoff_table(args) -> int:
    from precision_lab.formats import get_format, roundoff_per_binade

    fmts = [get_format(n) for n in (args.formats or ["bf16", "fp32"])]  # validate all before printing
    rows = [r for f in fmts for r in roundoff_per_binade(f)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("Maximum roundoff per binade [lo, hi).")
    print("  one ulp   = the spacing of the format in the binade (the figure the ST-MoE paper prints);")
    print("  half ulp  = the largest error of round-to-nearest (the bound that actually applies).")
    table = [[r["format"], f"[{_fmt_num(r['binade_lo'])}, {_fmt_num(r['binade_hi'])})", _fmt_num(r["one_ulp"]),
              _fmt_num(r["half_ulp"])] for r in rows]
    _print_table(["format", "binade", "one ulp (paper)", "half ulp (nearest)"], table)
    return 0


def _add_roundoff_cmd(p):
    p.add_argument("experiment", nargs="?", help="a roundoff experiment TOML (default: all analyses)")
    p.add_argument("--out", default="figures", help="folder for figures, tables and roundoff.md")


@command("roundoff", "roundoff analyses (no training): binade table, exp, softmax, flip rate, footnote",
         "precision-lab roundoff experiments/roundoff_exp.toml --out runs/roundoff_exp")(_add_roundoff_cmd)
def _roundoff(args) -> int:
    from precision_lab import roundoff

    if args.experiment:
        analysis = roundoff.load_roundoff_experiment(args.experiment)  # a bad file fails before any work
        writable_folder(args.out)
        paths = roundoff.run_analysis(*analysis, args.out)[1]
    else:
        writable_folder(args.out)
        paths = roundoff.roundoff_report(args.out)
        print(roundoff.footnote_text())
    for p in paths:
        print(f"wrote {p}")
    return 0


def _add_model_info(p):
    p.add_argument("preset", help="model preset: tiny, small, switch-base, gshard, st-moe-l, st-moe-32b, dense-l")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE",
                   help="override a model field, e.g. --set model.num_experts=0 --set model.flop_matched_dense=true")


@command("model-info", "total and active parameters and FLOPs per sequence of a model preset",
         "precision-lab model-info st-moe-l")(_add_model_info)
def _model_info(args) -> int:
    from precision_lab.config import run_config
    from precision_lab.model.info import model_info_text

    fields = _overrides(args.set)
    if set(fields) - {"model"}:
        raise UserError(f"model-info --set takes model fields only (model.FIELD=VALUE), got {sorted(fields)[0]!r}")
    cfg = run_config({"model": {"preset": args.preset, **fields["model"]}}).model if fields else args.preset
    print(model_info_text(cfg, as_json=args.json))
    return 0


def _add_compare(p):
    p.add_argument("dirs", nargs="+", help="output folders of `precision-lab train`")
    p.add_argument("--last", type=_positive_int, default=100, metavar="N",
                   help="average telemetry over the last N steps (N >= 1)")


COMPARED = ("loss", "router_max_abs_logit", "router_mean_lse_sq", "router_flip_rate", "router_entropy",
            "router_dropped_token_fraction", "router_dropped_assignment_fraction", "router_load_cv", "max_attention_logit", "grad_norm")


@command("compare", "final telemetry of several train runs side by side (mean over seeds and last steps)",
         "precision-lab compare runs/fp32 runs/bf16 --last 50")(_add_compare)
def _compare(args) -> int:
    import warnings

    import numpy as np

    from precision_lab.train import read_run

    warnings.simplefilter("ignore", RuntimeWarning)  # a frozen seed's steps are NaN: averaged over the rest
    rows = []
    for d in args.dirs:
        summary, metrics = read_run(d)
        cells = [d, summary["policy"]]
        for name in COMPARED:
            m = metrics[name][-args.last:]
            m = m.reshape(m.shape[0], m.shape[1], -1)
            # per seed: mean over steps and layers (router_max_abs_logit: max over layers)
            reduce = np.nanmax if name == "router_max_abs_logit" else np.nanmean
            per_seed = np.nanmean(reduce(m, axis=2), axis=0)
            cells.append(f"{np.nanmean(per_seed):.4g} +- {np.nanstd(per_seed):.2g}")
        losses = [x for x in summary["final_eval_loss"] if x is not None]
        cells.append(f"{np.mean(losses):.4f}" if losses else "-")
        cells.append(f"{sum(summary['diverged'])}/{len(summary['diverged'])}")
        rows.append(cells)
    _print_table(["run", "policy", *COMPARED, "eval loss", "diverged"], rows)
    return 0


def _add_sweep(p):
    p.add_argument("file", help="sweep TOML (see experiments/)")
    p.add_argument("--out", required=True, help="results store folder")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run shard I of N, counting from 0 (0/4 .. 3/4; groups split evenly)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed sweep (finished runs are always kept and skipped; this says so)")
    p.add_argument("--smoke", action="store_true",
                   help="run the seconds-long smoke version (micro model, few steps, first axis points)")
    p.add_argument("--force", action="store_true",
                   help="empty an --out store that holds another sweep (or the smoke/full version) first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--pretrained", default=None, metavar="DIR",
                   help="where fine-tuning runs with a pretraining sweep point (finetune.pretrain) keep their "
                        "pretrained runs, content-addressed; give several sweeps one DIR to pretrain once "
                        "(default: OUT/pretrained)")
    p.add_argument("--executor", default="inprocess", choices=("inprocess", "ray"),
                   help="where groups run: inprocess (here, one after the other) or ray (one Ray task per "
                        "group, in parallel; needs precision-lab[ray])")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: the cluster to join (auto, HOST:6379, ray://HOST:10001); "
                        "none: a local Ray instance, or $RAY_ADDRESS")
    p.add_argument("--cpus-per-task", type=int, default=1, metavar="N",
                   help="with --executor ray: CPUs Ray reserves for each group's task")


@command("sweep", "run a sweep TOML into a results store (resumable, shardable)",
         "precision-lab sweep experiments/z_loss.toml --out runs/z_loss --shard 0/2")(_add_sweep)
def _sweep(args) -> int:
    from precision_lab.executors import make_executor
    from precision_lab.runner import sweep

    writable_folder(args.out)
    if args.pretrained is not None:
        writable_folder(args.pretrained, "--pretrained")
    executor = make_executor(args.executor, address=args.address, num_cpus=args.cpus_per_task)
    summary = sweep(args.file, args.out, shard=args.shard, progress=not args.no_progress, smoke_test=args.smoke,
                    force=args.force, report_names=_report_names(), executor=executor, pretrained=args.pretrained)
    print(f"{summary.name}: {summary.computed} runs computed, {summary.skipped} already stored, "
          f"shard {summary.shard[0]}/{summary.shard[1]} of {summary.total_runs} runs; store: {args.out}")
    return 0


def _add_figures(p):
    p.add_argument("dir", help="a sweep's results store")
    p.add_argument("--out", default="figures", help="folder for the figures")


@command("figures", "draw a sweep's figures (PNG and SVG) from its results store",
         "precision-lab figures runs/z_loss --out figures/z_loss")(_add_figures)
def _figures(args) -> int:
    from precision_lab.report import check_results, write_figures

    check_results(args.dir)  # a folder that is not a store fails before the --out check creates anything
    writable_folder(args.out)
    for p in write_figures(args.dir, args.out):
        print(f"wrote {p}")
    return 0


def _add_report(p):
    p.add_argument("dir", help="a sweep's results store")
    p.add_argument("--figures", default=None, help="folder for the figures (default: DIR/figures)")
    p.add_argument("--paired-test", default="t", choices=("t", "wilcoxon"),
                   help="test of the paired-by-seed comparisons: t = paired t, wilcoxon = Wilcoxon signed-rank")


@command("report", "write DIR/report.md: tables beside the paper's numbers, figures, environment",
         "precision-lab report runs/z_loss")(_add_report)
def _report(args) -> int:
    from precision_lab.report import check_results, write_report

    check_results(args.dir)
    writable_folder(args.dir, "DIR")
    writable_folder(args.figures or Path(args.dir) / "figures", "--figures")
    print(f"wrote {write_report(args.dir, args.figures, paired_test=args.paired_test)}")
    return 0


def _add_run(p):
    p.add_argument("--out", default="runs/quickstart", help="results store of the quick-start sweep")
    p.add_argument("--figures", default="figures", help="folder for figures")
    p.add_argument("--sweep", default=None, help="sweep TOML (default: the built-in quick-start sweep)")
    p.add_argument("--smoke", action="store_true", help="the seconds-long smoke version of the sweep")
    p.add_argument("--force", action="store_true", help="empty an --out store that holds another sweep first")


@command("run", "the main job: roundoff analyses, then the quick-start sweep, its figures and report",
         "precision-lab run --out runs/quickstart --figures figures")(_add_run)
def _run(args) -> int:
    from precision_lab import figures, roundoff
    from precision_lab.report import write_report
    from precision_lab.runner import QUICKSTART, load, sweep
    from precision_lab.store import ResultsStore
    from precision_lab.sweep import check_store

    # Everything that can be wrong is checked before the first analysis runs.
    spec = load(args.sweep or QUICKSTART, smoke_test=args.smoke, report_names=_report_names())
    writable_folder(args.out)
    writable_folder(args.figures, "--figures")
    if not args.force:
        check_store(ResultsStore(args.out), spec.name)
    _formats(argparse.Namespace(json=False))
    print()
    for p in [*figures.roundoff_per_binade_figure(args.figures), *roundoff.roundoff_report(args.figures)]:
        print(f"wrote {p}")
    print(roundoff.footnote_text())
    summary = sweep(args.sweep or QUICKSTART, args.out, smoke_test=args.smoke, force=args.force,
                    report_names=_report_names())
    report = write_report(args.out, args.figures)
    print(f"quick-start sweep: {summary.computed} runs computed, {summary.skipped} reused; report: {report}")
    return 0


def _parse_value(text: str):
    """A --set value: TOML scalar syntax (numbers, true/false, quoted strings), else a bare string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    """--set section.field=value pairs as a nested dict."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise UserError(f"--set {pair!r}: expected SECTION.FIELD=VALUE, e.g. model.d_model=64")
        key, value = pair.split("=", 1)
        section, field = key.split(".", 1)
        out.setdefault(section, {})[field] = _parse_value(value)
    return out


def _add_train(p):
    from precision_lab.config import DEFAULTS, TrainConfig
    from precision_lab.data import DataConfig
    from precision_lab.model.config import get_model_config

    model, train, data = get_model_config("tiny"), TrainConfig(), DataConfig()
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, switch-base, gshard, ...)")
    p.add_argument("--policy", default="fp32", help="precision policy: a preset or a compact string")
    p.add_argument("--z-loss", type=float, default=None,
                   help=f"router z-loss coefficient c_z (default: the preset's; tiny: {model.router_z_loss_coef})")
    p.add_argument("--aux-loss", type=float, default=None,
                   help=f"load-balancing coefficient c_B (default: the preset's; tiny: {model.load_balance_coef})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {DEFAULTS['optim']['lr']})")
    p.add_argument("--optimizer", default=None, help=f"adamw or adafactor (default: {DEFAULTS['optim']['name']})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds, vmapped into one program (default: {train.seeds})")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default: {train.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default: {train.batch_size})")
    p.add_argument("--data", default=None, metavar="FILE",
                   help=f"train on a local text file, byte level (default: a mixture of {data.num_languages} synthetic "
                        "Markov languages, one per sequence, the language latent)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any config field in TOML syntax, e.g. --set model.router_softmax_shift=false "
                        "(booleans: true/false only; repeatable)")
    p.add_argument("--out", required=True, help="output folder (config.json, metrics.npz, summary.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (of a finished run: says so, does nothing)")
    p.add_argument("--force", action="store_true",
                   help="discard what --out holds (another run, a checkpoint) and train from step 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mesh", default=None, metavar="data=D,expert=E",
                   help="run each step over a device mesh: batch split over data, experts over expert (dense "
                        "dispatch); D x E must equal the devices JAX sees (same as --set train.mesh=...)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several hosts: run this command on each, all with the coordinator's address (process 0 "
                        "listens there), --num-processes and their own --process-id; the mesh spans them all")
    p.add_argument("--num-processes", type=int, default=None, metavar="N")
    p.add_argument("--process-id", type=int, default=None, metavar="I", help="0..N-1; process 0 writes --out")


def train_config(args: argparse.Namespace):
    """The RunConfig a `train` command line asks for (every value checked)."""
    from precision_lab.config import run_config

    spec: dict = {"model": {"preset": args.preset}, "policy": args.policy}
    for section, field, value in (("model", "router_z_loss_coef", args.z_loss),
                                  ("model", "load_balance_coef", args.aux_loss),
                                  ("optim", "lr", args.lr), ("optim", "name", args.optimizer),
                                  ("train", "seeds", args.seeds), ("train", "steps", args.steps),
                                  ("train", "batch_size", args.batch_size), ("train", "mesh", getattr(args, "mesh", None))):
        if value is not None:
            spec.setdefault(section, {})[field] = value
    if args.data:
        spec.setdefault("data", {}).update(kind="text", path=args.data)
    for section, fields in _overrides(args.set).items():
        if isinstance(spec.get(section), dict):
            spec[section].update(fields)
        else:
            spec[section] = fields
    return run_config(spec)


@command("train", "train seeds of one configuration (vmapped), detect divergence, write a summary",
         "precision-lab train --preset tiny --policy bf16 --seeds 4 --steps 500 --set model.rmsnorm_scale=false "
         "--out runs/bf16")(_add_train)
def _train(args) -> int:
    from precision_lab.train import enable_compilation_cache, prepare_out_dir, read_run, train

    run = train_config(args)
    writable_folder(args.out)
    if prepare_out_dir(args.out, run, resume=args.resume, force=args.force) == "finished":
        print(f"{args.out}: this run already finished ({run.train.steps} steps); nothing to do")
        _print_seeds(read_run(args.out)[0])
        return 0
    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        _join_processes(args.coordinator, args.num_processes, args.process_id)
    else:
        # Not with several processes: a program cached by a one-process run over as many devices was
        # loaded by a two-process run and aborted it (SIGABRT, tests/test_mesh.py), so those compile afresh.
        enable_compilation_cache()
    result = train(run, out_dir=args.out, resume=args.resume, force=args.force, progress=not args.no_progress)
    import jax

    if jax.process_index() != 0:  # several processes: the first reports
        return 0
    _print_seeds(result.summary)
    print(f"wrote {args.out}/summary.json")
    return 0


def _print_seeds(s: dict) -> None:
    print(f"backend {s['backend']}; policy {s['policy']}")
    # summaries written before the three outcomes existed have only `diverged`
    outcomes = s.get("outcome") or ["diverged" if d else "stable" for d in s["diverged"]]
    for i, seed in enumerate(s["seeds"]):
        status = outcomes[i]
        if status == "diverged":
            status = f"diverged at step {s['divergence_step'][i]} ({s['divergence_rule'][i]})"
        elif status == "failed_to_learn":
            status = f"failed to learn (eval loss not below the unigram loss {s['unigram_loss']:.4f})"
        loss = s["final_eval_loss"][i]
        print(f"seed {seed}: eval loss {loss if loss is None else f'{loss:.4f}'}, {status}")


# Fine-tuning defaults (ST-MoE section 4: a constant learning rate; 1e-3 suited its sparse models best).
FINETUNE_DEFAULTS = dict(steps=200, lr=1e-3, batch_size=16, eval_every=20)


def _add_finetune(p):
    from precision_lab.finetune import TRAINABLE
    from precision_lab.tasks import describe

    p.epilog = "tasks: " + "; ".join(f"{name}: {text}" for name, text in describe()) + ".\n\n" + (p.epilog or "")
    p.add_argument("--from", dest="from_run", required=True, metavar="PRETRAINED_RUN_DIR",
                   help="the --out folder of a finished `precision-lab train` run (config.json, params.npz)")
    p.add_argument("--task", default="langid-small", help="a built-in downstream task (see below)")
    p.add_argument("--trainable", default="all", choices=TRAINABLE, help="which parameters move")
    p.add_argument("--steps", type=int, default=FINETUNE_DEFAULTS["steps"], help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"], help="constant learning rate")
    p.add_argument("--batch-size", type=int, default=FINETUNE_DEFAULTS["batch_size"], help="sequences per step")
    p.add_argument("--policy", default=None, help="precision policy (default: the pretrained run's)")
    p.add_argument("--seeds", type=int, default=None,
                   help="fine-tune the first N pretrained seeds (default: all of them)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any config field, e.g. --set model.capacity_factor=2.0 (repeatable)")
    p.add_argument("--out", required=True, help="output folder (as train's, plus params.npz and loss curves)")
    p.add_argument("--force", action="store_true", help="discard what --out holds and fine-tune from step 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("finetune", "fine-tune a trained run on a built-in downstream task",
         "precision-lab finetune --from runs/pre --task langid-small --trainable non_moe --out runs/ft")(_add_finetune)
def _finetune(args) -> int:
    from precision_lab.config import run_config
    from precision_lab.finetune import pretrained_spec
    from precision_lab.train import enable_compilation_cache, train

    spec = pretrained_spec(args.from_run)
    pretrained_seeds = list(range(spec["train"]["seed"], spec["train"]["seed"] + spec["train"]["seeds"]))
    if args.seeds is not None and not 1 <= args.seeds <= len(pretrained_seeds):
        raise UserError(f"--seeds must be in [1, {len(pretrained_seeds)}] (the pretrained run's seeds), got {args.seeds}")
    seeds = pretrained_seeds[: args.seeds or len(pretrained_seeds)]
    if not 1 <= args.batch_size <= 1024:  # validation batches are drawn from the task's 1,024 examples
        raise UserError(f"--batch-size must be in [1, 1024], got {args.batch_size}")
    spec["train"] = {**spec["train"], "steps": args.steps, "batch_size": args.batch_size, "seeds": len(seeds),
                     "eval_every": FINETUNE_DEFAULTS["eval_every"], "eval_batches": 1024 // args.batch_size,
                     "checkpoint_every": 0}
    spec["optim"] = {**spec["optim"], "lr": args.lr, "schedule": "constant", "warmup_steps": 0, "total_steps": 0}
    spec["finetune"] = {"from_run": str(args.from_run), "task": args.task, "trainable": args.trainable}
    if args.policy is not None:
        spec["policy"] = args.policy
    for section, fields in _overrides(args.set).items():
        spec[section] = {**spec.get(section, {}), **fields} if isinstance(spec.get(section), dict) else fields
    run = run_config(spec)
    writable_folder(args.out)
    enable_compilation_cache()
    result = train(run, seeds=seeds, out_dir=args.out, force=args.force, progress=not args.no_progress)
    _print_seeds(result.summary)
    ft = result.summary["finetune"]
    print(f"task {ft['task']} ({ft['train_examples']} training examples), trainable {ft['trainable']}: "
          f"best loss {result.summary['best_loss']:.4f}, chance {ft['chance_loss']:.4f}")
    for seed, loss in zip(seeds, ft["final_test_loss"]):
        print(f"seed {seed}: test loss {loss if loss is None else f'{loss:.4f}'}")
    from precision_lab.figures import finetune_curves

    print(f"wrote {args.out}/summary.json, {finetune_curves(result.summary, result.metrics, args.out)}")
    return 0


def _join_processes(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize: one JAX program over the devices of several processes (hosts)."""
    if not coordinator or num_processes is None or process_id is None:
        raise UserError("--coordinator, --num-processes and --process-id go together, e.g. "
                        "--coordinator host0:1234 --num-processes 2 --process-id 0")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(f"--process-id {process_id}: must be 0..{num_processes - 1} for --num-processes "
                        f"{num_processes}")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices talk through gloo
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless the help already says it, or it is off/none) and keeps the
    example epilog's line breaks."""

    def _get_help_string(self, action):
        help = action.help or ""
        default = action.default
        if ("default" not in help and action.option_strings and default not in (None, False, [], argparse.SUPPRESS)
                and not isinstance(action, argparse._VersionAction)):
            help += " (default: %(default)s)"
        return help


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (the README's promise), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from precision_lab import __version__

    parser = _Parser(prog="precision-lab", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter,
                     epilog="example:\n  precision-lab run --smoke\n\n"
                            "`precision-lab COMMAND --help` shows a command's options and an example.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, example, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter,
                                epilog=f"example:\n  {example}"))
    return parser


def _reexec_with_huge_pages() -> None:
    """Restart this process once with glibc's `malloc.hugetlb` tunable (Linux, glibc >= 2.35).

    XLA:CPU allocates each compiled call's temporaries afresh (287 MB for a call of the matched benchmark
    configuration) and glibc maps such blocks with mmap and unmaps them on free, so every call
    first-touches ~75,000 4-KiB pages again; with the tunable malloc asks for transparent huge pages
    (~500 faults per call) and the step is 9% faster (benchmarks/RESULTS.md). It must be set before the
    process starts, hence the re-exec; PRECISION_LAB_NO_REEXEC=1 turns it off. Elsewhere a no-op."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (not sys.platform.startswith("linux") or os.environ.get("PRECISION_LAB_NO_REEXEC")
            or "glibc.malloc.hugetlb" in tunables or not hasattr(os, "execve")):
        return
    env = dict(os.environ, PRECISION_LAB_NO_REEXEC="1",
               GLIBC_TUNABLES=":".join(t for t in (tunables, "glibc.malloc.hugetlb=1") if t))
    try:
        os.execve(sys.executable, [sys.executable, "-m", "precision_lab.cli", *sys.argv[1:]], env)
    except OSError:  # cannot re-exec (odd interpreter setup): run as we are
        return


def use_one_device_per_core() -> None:
    """One XLA host device per core (unless XLA_FLAGS already sets a count), so the vmapped members of a
    train run are spread over them (train.member_sharding). PRECISION_LAB_CPU_DEVICES overrides."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(os.environ.get("PRECISION_LAB_CPU_DEVICES", cores)))
    except (RuntimeError, ValueError):  # jax already started in this process (main() called from Python)
        pass


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the console script, not a call from Python
        _reexec_with_huge_pages()
    use_one_device_per_core()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed one line; keep its status (2 for bad usage)
        return int(exit_.code or 0)
    if args.command is None:  # a bare `precision-lab`: usage, not success
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command][3](args)
    except UserError as err:
        print(f"precision-lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
