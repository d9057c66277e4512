"""Reports: read a sweep's results store, aggregate seeds per configuration, and write Markdown with the
paper's numbers beside the lab's, figures embedded and the environment recorded.

Reads only the store (`precision_lab.store`): nothing here trains. A configuration is the set of axis
values of a run (its `overrides`) minus the seed; batchable hyperparameters (lr, loss coefficients) are
axis values like any other, so they get their own rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from precision_lab.divergence import clopper_pearson, lr_sensitivity
from precision_lab.errors import UserError, unknown_choice
from precision_lab.store import ResultsStore


@dataclasses.dataclass
class ConfigResult:
    """All seeds of one configuration of a sweep."""

    label: str
    overrides: dict
    config: dict
    records: list[dict]
    metrics: list[dict[str, np.ndarray]]
    hidden: frozenset = frozenset()  # fields named by train.label (zipped with it)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def stable(self) -> int:
        return sum(not r["result"]["diverged"] for r in self.records)

    def eval_losses(self, stable_only: bool = True) -> np.ndarray:
        vals = [r["result"]["final_eval_loss"] for r in self.records
                if not (stable_only and r["result"]["diverged"])]
        return np.array([v for v in vals if v is not None and math.isfinite(v)], float)

    def metric(self, name: str) -> np.ndarray:
        """<float>[seeds, steps, ...] of a per-step metric (NaN after a seed froze)."""
        return np.stack([m[name] for m in self.metrics if name in m]) if self.metrics else np.zeros((0,))

    def value(self, path: str, default=None):
        """A field of the fully resolved configuration (what the run used), by dotted path."""
        node: Any = self.records[0].get("resolved", self.config) if self.records else self.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def label_of(overrides: dict, hidden: frozenset = frozenset()) -> str:
    """A short name for a configuration: its axis values, with a `train.label` standing for the fields
    zipped with it (`hidden`)."""
    if not overrides:
        return "base"
    parts = []
    if "train.label" in overrides:
        parts.append(str(overrides["train.label"]))
    parts += [f"{k.split('.')[-1]}={_short(v)}" for k, v in overrides.items()
              if k != "train.label" and k not in hidden]
    return ", ".join(parts)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def check_results(out_dir: str | Path) -> ResultsStore:
    """The store at out_dir, if it holds a sweep's results (cheap: reads no record); UserError otherwise."""
    store = ResultsStore(out_dir)
    if store.manifest() is None or not store.ids():
        raise UserError(f"{out_dir}: no sweep results here (expected sweep.json and runs/); run "
                        "`precision-lab sweep FILE --out DIR` first")
    return store


def load_sweep_results(out_dir: str | Path) -> tuple[dict, list[ConfigResult]]:
    """(manifest, configurations in manifest order) of the store at out_dir."""
    store = check_results(out_dir)
    manifest = store.manifest()
    # fields zipped with train.label are named by the label
    hidden = frozenset(f for axis in manifest.get("axes", []) if "train.label" in axis.get("fields", [])
                       for f in axis["fields"] if f != "train.label")
    groups: dict[str, ConfigResult] = {}
    for rec in store.records():
        key = json.dumps(rec.get("overrides", {}), sort_keys=True)
        if key not in groups:
            groups[key] = ConfigResult(label_of(rec.get("overrides", {}), hidden), rec.get("overrides", {}),
                                       rec["config"], [], [], hidden)
        groups[key].records.append(rec)
        groups[key].metrics.append(store.metrics(rec["run_id"]))
    order = []
    for run in manifest.get("runs", []):
        key = json.dumps(run.get("overrides", {}), sort_keys=True)
        if key in groups and key not in order:
            order.append(key)
    order += [k for k in groups if k not in order]
    return manifest, [groups[k] for k in order]


# -- tables --------------------------------------------------------------------------------------------


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _mean_std(vals: np.ndarray) -> str:
    if vals.size == 0:
        return "-"
    if vals.size == 1:
        return f"{vals[0]:.3f}"
    return f"{vals.mean():.3f} +- {vals.std(ddof=1):.3f}"


def _stable_cell(c: ConfigResult) -> str:
    lo, hi = clopper_pearson(c.stable, c.n)
    return f"{c.stable}/{c.n} [{lo:.2f}, {hi:.2f}]"


def _neg_log_ppl(c: ConfigResult) -> str:
    """ST-MoE/Switch report quality as negative log perplexity = -(cross entropy in nats per token)."""
    vals = -c.eval_losses()
    return _mean_std(vals)


def table_summary(configs: list[ConfigResult]) -> str:
    rows = ["| configuration | stable (95% CI) | eval loss (stable seeds) | gap to best loss | diverged at (rule) |",
            "|---|---|---|---|---|"]
    for c in configs:
        gaps = np.array([r["result"]["quality_gap"] for r in c.records
                         if r["result"]["quality_gap"] is not None and not r["result"]["diverged"]], float)
        div = ", ".join(f"{r['result']['divergence_step']} ({r['result']['divergence_rule']})"
                        for r in c.records if r["result"]["diverged"]) or "-"
        rows.append(f"| {c.label} | {_stable_cell(c)} | {_mean_std(c.eval_losses())} | {_mean_std(gaps)} | {div} |")
    return "\n".join(rows)


def _find(configs, predicate) -> ConfigResult | None:
    for c in configs:
        if predicate(c):
            return c
    return None


# Paper rows: (name, paper fraction stable, paper quality, the `train.label` of the lab's configurations)
STABILITY_ROWS = [
    ("Baseline", "4/6", "-1.755 +- 0.02", "baseline"),
    ("Remove GEGLU", "3/3", "-1.849 +- 0.02", "remove_geglu"),
    ("Remove RMSNorm scale", "3/3", "-2.020 +- 0.06", "remove_rmsnorm_scale"),
    ("Input jitter 1e-2", "3/3", "-1.777 +- 0.03", "input_jitter"),
    ("Dropout 0.1", "3/3", "-1.822 +- 0.11", "dropout"),
    ("Adafactor update clipping 0.1", "3/3", "-4.206 +- 0.17", "update_clipping"),
    ("Router z-loss", "3/3", "-1.741 +- 0.02", "z_loss"),
]

SELECTIVE_ROWS = [
    ("float32", "-", "-1.718 (1160 ex/s)", "fp32"),
    ("bfloat16 everywhere", "diverged", "-3.780 (1390 ex/s)", "bf16"),
    ("selective precision (router in float32)", "-", "-1.716 (1390 ex/s)", "bf16-selective"),
]


PAPER_SCALE_NOTE = ("The paper's absolute numbers come from models 3-5 orders of magnitude larger trained on C4; "
                    "the lab's from a CPU-sized model on a synthetic language. Compare orderings, gaps and "
                    "fractions stable, not absolute values.")


def _paper_table(configs, rows, first_col: str) -> str:
    """One line per paper row and lab configuration whose `train.label` names that row."""
    out = [PAPER_SCALE_NOTE, "", f"| {first_col} | paper: stable | paper: quality | lab configuration | lab: stable (95% CI) | "
           "lab: neg. log perplexity |", "|---|---|---|---|---|---|"]
    for name, paper_stable, paper_q, key in rows:
        matches = [c for c in configs if c.value("train.label") == key]
        if not matches:
            out.append(f"| {name} | {paper_stable} | {paper_q} | not run | - | - |")
        for c in matches:
            out.append(f"| {name} | {paper_stable} | {paper_q} | {c.label} | {_stable_cell(c)} | {_neg_log_ppl(c)} |")
    return "\n".join(out)


def table_stability(configs) -> str:
    return ("ST-MoE stability table (XL scale, 6 or 3 seeds) beside the lab. Quality is the negative log "
            "perplexity of held-out data (higher is better), over stable seeds.\n\n"
            + _paper_table(configs, STABILITY_ROWS, "method"))


def table_selective_precision(configs) -> str:
    text = _paper_table(configs, SELECTIVE_ROWS, "Switch Table 2")
    steps = "\n".join(
        f"- {c.label}: {np.nanmedian([r.get('timing', {}).get('step_s', float('nan')) for r in c.records]) * 1e3:.1f} "
        f"ms per step of its vmapped program ({c.records[0].get('timing', {}).get('group_runs', '?')} members)"
        for c in configs)
    return (text + "\n\nStep time on this machine (emulating bf16 costs time on a CPU; on a TPU bf16 is the faster "
            "one, which is what Switch's examples/s compare):\n\n" + steps)


CAPACITY_ROWS = [(0.75, 0.75, -1.424), (1.0, 1.0, -1.392), (1.25, 1.25, -1.375), (1.25, 2.0, -1.369), (2.0, 2.0, -1.360)]


def table_capacity_factor(configs) -> str:
    out = ["| train CF / eval CF | paper quality | lab neg. log perplexity | lab dropped fraction (train, final) | lab step ms |",
           "|---|---|---|---|---|"]
    for tr, ev, q in CAPACITY_ROWS:
        c = _find(configs, lambda c: c.value("model.train_capacity_factor") == tr and c.value("model.eval_capacity_factor") == ev)
        if c is None:
            out.append(f"| {tr}/{ev} | {q} | not run | - | - |")
            continue
        dropped = c.metric("router_dropped_fraction")
        final_drop = float(np.nanmean(dropped[:, -10:])) if dropped.size else float("nan")
        step_ms = np.nanmedian([r["timing"].get("step_s", float("nan")) for r in c.records]) * 1e3
        out.append(f"| {tr}/{ev} | {q} | {_neg_log_ppl(c)} | {_fmt(final_drop)} | {step_ms:.1f} |")
    return ("ST-MoE Table 8 (top-2): quality rises with capacity; dropped tokens fall.\n\n" + "\n".join(out))


def table_z_loss(configs) -> str:
    return ("ST-MoE: the z-loss keeps router logits small, so bf16 rounding of a logit (relative 2^-9, absolute "
            "|z| 2^-9) becomes a small relative error of the gate after exp.\n\n" + table_router(configs))


def table_router(configs) -> str:
    """Router telemetry at the end of training, per configuration (mean over seeds, last 10 steps)."""
    out = ["| configuration | stable | neg. log perplexity | max router logit (final) | mean logsumexp^2 (final) | "
           "gate roundoff bound in bf16 (= max logit * 2^-9) | flip rate vs fp32 router |", "|---|---|---|---|---|---|---|"]
    for c in configs:
        logit = _final(c, "router_max_abs_logit", np.nanmax)
        lse = _final(c, "router_mean_lse_sq", np.nanmean)
        flip = _final(c, "router_flip_rate", np.nanmean)
        out.append(f"| {c.label} | {_stable_cell(c)} | {_neg_log_ppl(c)} | {_fmt(logit, 2)} | {_fmt(lse, 2)} | "
                   f"{_fmt(logit * 2**-9 if logit is not None else None, 4)} | {_fmt(flip, 4)} |")
    return "\n".join(out)


def _final(c: ConfigResult, name: str, reduce: Callable) -> float | None:
    m = c.metric(name)
    if m.size == 0:
        return None
    last = m[:, -10:]
    return float(reduce(last)) if np.isfinite(last).any() else None


def table_lr_sensitivity(configs) -> str:
    """Per policy (every axis but the lr): loss vs lr, divergence onset, Wortsman's LR sensitivity."""
    by_line: dict[str, list[ConfigResult]] = {}
    for c in configs:
        rest = {k: v for k, v in c.overrides.items() if k != "optim.lr"}
        by_line.setdefault(label_of(rest, c.hidden), []).append(c)
    out = ["| configuration | lr grid | final eval loss per lr (mean over seeds; x = all diverged) | "
           "divergence onset (lowest lr with a diverged seed) | LR sensitivity |", "|---|---|---|---|---|"]
    for line, cs in by_line.items():
        cs = sorted(cs, key=lambda c: c.value("optim.lr"))
        lrs = [c.value("optim.lr") for c in cs]
        losses = []
        for c in cs:
            vals = np.array([r["result"]["final_eval_loss"] if r["result"]["final_eval_loss"] is not None else np.nan
                             for r in c.records], float)
            losses.append(float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"))
        init = _loss_at_init(cs)
        onset = next((c.value("optim.lr") for c in cs if c.stable < c.n), None)
        sens = lr_sensitivity(lrs, [l if math.isfinite(l) else init for l in losses], init) if init else None
        cells = " ".join("x" if not math.isfinite(l) else f"{l:.2f}" for l in losses)
        out.append(f"| {line} | {min(lrs):g}..{max(lrs):g} | {cells} | {onset if onset is not None else 'none'} | "
                   f"{_fmt(sens)} |")
    return ("Wortsman et al. 2023: LR sensitivity = mean over the lr grid of min(loss(lr), loss at init) - best "
            "loss; smaller is more robust.\n\n" + "\n".join(out))


def _loss_at_init(cs: list[ConfigResult]) -> float | None:
    firsts = [c.metric("ce")[:, 0] for c in cs if c.metric("ce").size]
    vals = np.concatenate(firsts) if firsts else np.array([])
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else None


SPECIALIZATION_PAPER = {"encoder": [2.2, 1.8, 1.6, 1.7, 1.7, 1.2], "decoder": [3.4] * 6}


def table_specialization(configs) -> str:
    out = []
    for c in configs:
        m = c.metric("router_sentinel_entropy")
        if m.size == 0:
            out.append(f"- {c.label}: no sentinel-entropy telemetry recorded")
            continue
        final = np.nanmean(m[:, -10:], axis=(0, 1))
        names = c.records[0].get("env", {}).get("moe_layer_names") or [f"layer {i}" for i in range(final.size)]
        n_exp = c.value("model.num_experts")
        out.append(f"**{c.label}** (uniform over {n_exp} experts = ln {n_exp} = {math.log(n_exp):.2f}):\n")
        out.append("| sparse layer | lab entropy of sentinel routing |\n|---|---|")
        out += [f"| {n} | {v:.2f} |" for n, v in zip(names, final)]
        out.append("")
    paper = ("ST-MoE Table 14 (ST-MoE-L, 32 experts, uniform = ln 32 = 3.47): encoder layers 1..6: "
             + " ".join(map(str, SPECIALIZATION_PAPER["encoder"])) + "; decoder: 3.4 everywhere.")
    return paper + "\n\n" + "\n".join(out)


def table_backends(configs) -> str:
    out = ["| configuration | backend (device) | stable | eval loss | divergence onset steps |", "|---|---|---|---|---|"]
    for c in configs:
        backends = sorted({f"{r['env']['backend']} ({r['env']['device']})" for r in c.records})
        steps = [r["result"]["divergence_step"] for r in c.records if r["result"]["diverged"]]
        out.append(f"| {c.label} | {', '.join(backends)} | {_stable_cell(c)} | {_mean_std(c.eval_losses())} | "
                   f"{steps or '-'} |")
    return ("CPU float32 vs the `tpu-default` policy (TPU's one-pass bf16 matmuls emulated on the CPU). A run of "
            "the same file on a TPU or GPU adds its own rows (the backend column says which).\n\n" + "\n".join(out))


TABLES: dict[str, Callable[[list[ConfigResult]], str]] = {
    "summary": table_summary,
    "stability": table_stability,
    "selective_precision": table_selective_precision,
    "capacity_factor": table_capacity_factor,
    "z_loss": table_z_loss,
    "router": table_router,
    "lr_sensitivity": table_lr_sensitivity,
    "specialization": table_specialization,
    "backends": table_backends,
}


# -- the report ----------------------------------------------------------------------------------------


def environment() -> dict:
    import os

    import jax

    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_figures(out_dir: str | Path, fig_dir: str | Path | None = None, names: list[str] | None = None) -> list[Path]:
    from precision_lab import figures

    manifest, configs = load_sweep_results(out_dir)
    fig_dir = Path(fig_dir) if fig_dir is not None else Path(out_dir) / "figures"
    names = names or list(manifest.get("report", {}).get("figures", [])) or ["loss_curves", "router_logits"]
    for n in names:
        if n not in figures.SWEEP_FIGURES:
            raise unknown_choice("figure", n, figures.SWEEP_FIGURES)
    name = manifest.get("name", Path(out_dir).name)
    paths: list[Path] = []
    for n in names:
        paths += figures.SWEEP_FIGURES[n](configs, fig_dir, f"{name}_{n}")
    return paths


def write_report(out_dir: str | Path, fig_dir: str | Path | None = None) -> Path:
    """Write out_dir/report.md (figures into fig_dir, default out_dir/figures) and return its path."""
    manifest, configs = load_sweep_results(out_dir)
    name = manifest.get("name", Path(out_dir).name)
    report_cfg = manifest.get("report", {})
    tables = ["summary", *[t for t in report_cfg.get("tables", []) if t != "summary"]]
    for t in tables:
        if t not in TABLES:
            raise unknown_choice("table", t, TABLES)
    fig_paths = write_figures(out_dir, fig_dir)
    report = Path(out_dir) / "report.md"
    runs = [r for c in configs for r in c.records]
    env = environment()
    run_env = sorted({(r["env"]["backend"], r["env"]["device"], r["env"]["jax_version"], r["env"]["xla_flags"])
                      for r in runs})
    lines = [f"# {name}", "", manifest.get("description", ""), "",
             f"{len(runs)} runs in {len(configs)} configurations. Quality is held-out cross entropy in nats per "
             "target token (lower is better) unless a column says negative log perplexity (its negative, as the "
             "papers print it).", ""]
    best = next((r["env"].get("best_loss") for r in runs if r["env"].get("best_loss") is not None), None)
    if best is not None:
        lines += [f"Best possible loss of the synthetic language on this objective: {best:.4f} nats/token "
                  f"(entropy rate {runs[0]['env'].get('entropy_rate', float('nan')):.4f}).", ""]
    for t in tables:
        lines += [f"## {t.replace('_', ' ').capitalize()}", "", TABLES[t](configs), ""]
    lines += ["## Figures", ""]
    for p in fig_paths:
        if p.suffix == ".png":
            lines.append(f"![{p.stem}]({_rel(p, report.parent)})")
            lines.append("")
    lines += ["## Environment", "", "Runs were made on: " + "; ".join(
        f"backend {b}, device {d}, jax {j}, XLA_FLAGS '{x}'" for b, d, j, x in run_env) + ".",
        f"Report written with: {json.dumps(env)}.", "",
        "Times are from a shared 2-core CPU unless the backend says otherwise; compare ratios, not absolutes.", ""]
    report.write_text("\n".join(lines))
    return report


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        import os

        return os.path.relpath(p.resolve(), base.resolve())
