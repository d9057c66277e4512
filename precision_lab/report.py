"""Reports: read a sweep's results store, aggregate seeds per configuration, and write Markdown with the
paper's numbers beside the lab's, figures embedded and the environment recorded.

Reads only the store (`precision_lab.store`): nothing here trains. A configuration is the set of axis
values of a run (its `overrides`) minus the seed; batchable hyperparameters (lr, loss coefficients) are
axis values like any other, so they get their own rows.

Statistics (all from `precision_lab.stats`): every seed has one of three outcomes (stable, diverged, failed to
learn); quality is compared over stable seeds only, paired by seed against the baseline row (the
configuration whose `train.label` is "baseline", else the first), with a 95% CI, a p-value (paired t, or
Wilcoxon signed-rank with `paired_test="wilcoxon"`) and the seeds 80% power would need; fractions not
diverged are compared with Fisher's exact test. A report whose sweep has random-, hash-routed or dense rows
opens with the precondition table (is the learned router better than those controls?).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from precision_lab import stats
from precision_lab.divergence import OUTCOMES, classify_outcome
from precision_lab.errors import UserError, unknown_choice
from precision_lab.formats import get_format
from precision_lab.stats import clopper_pearson, lr_sensitivity
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
    paired_test: str = "t"  # the test of the paired comparisons: a key of stats.PAIRED_TESTS

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def stable(self) -> int:
        """Seeds that did not diverge (ST-MoE's "fraction stable" counts these; see `outcomes` for the
        seeds among them that also learned)."""
        return sum(not r["result"]["diverged"] for r in self.records)

    @property
    def outcomes(self) -> list[str]:
        """Per seed, one of divergence.OUTCOMES (recomputed for records written before outcomes were)."""
        return [outcome_of(r) for r in self.records]

    def outcome_counts(self) -> dict[str, int]:
        got = self.outcomes
        return {o: got.count(o) for o in OUTCOMES}

    @property
    def all_learned(self) -> bool:
        """Every seed trained to the end and learned (no divergence, no failure to learn)."""
        return self.n > 0 and self.outcome_counts()["stable"] == self.n

    def eval_losses(self, stable_only: bool = True) -> np.ndarray:
        """Final eval losses; with stable_only (the default) of the stable, learning seeds only."""
        vals = [r["result"]["final_eval_loss"] for r, o in zip(self.records, self.outcomes)
                if not (stable_only and o != "stable")]
        return np.array([v for v in vals if v is not None and math.isfinite(v)], float)

    def eval_by_seed(self) -> dict[int, float]:
        """{seed: final eval loss} of the stable, learning seeds: what quality comparisons pair."""
        return {r["seed"]: r["result"]["final_eval_loss"] for r, o in zip(self.records, self.outcomes)
                if o == "stable"}

    def metric(self, name: str) -> np.ndarray:
        """<float>[seeds, steps, ...] of a per-step metric (NaN after a seed froze)."""
        arrays = [m[name] for m in self.metrics if name in m]  # none: a metric this store never recorded
        return np.stack(arrays) if arrays else np.zeros((0,))

    def value(self, path: str, default=None):
        """A field of the fully resolved configuration (what the run used), by dotted path."""
        node: Any = self.records[0].get("resolved", self.config) if self.records else self.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def outcome_of(record: dict) -> str:
    """A store record's outcome: its own, or (older records) classified from what it holds."""
    res = record["result"]
    if res.get("outcome") in OUTCOMES:
        return res["outcome"]
    return classify_outcome(diverged=res["diverged"], final_eval_loss=res.get("final_eval_loss"),
                            unigram_loss=record.get("env", {}).get("unigram_loss"))


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


def baseline_of(configs: list[ConfigResult]) -> ConfigResult | None:
    """The row every other row is compared with: `train.label = "baseline"`, else the first configuration."""
    return next((c for c in configs if c.value("train.label") == "baseline"), configs[0] if configs else None)


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _seeds(n: int | None) -> str:
    if n is None:
        return "-"
    return f"> {stats.MAX_SEEDS}" if n > stats.MAX_SEEDS else str(n)


def _diff_cell(d: stats.PairedDifference) -> str:
    if d.n == 0:
        return "no shared stable seeds"
    if d.n == 1:
        return f"{d.mean:+.3f} (1 pair)"
    return f"{d.mean:+.3f} [{d.ci_lo:+.3f}, {d.ci_hi:+.3f}] (n={d.n})"


def _outcome_cell(c: ConfigResult) -> str:
    k = c.outcome_counts()
    return " / ".join(str(k[o]) for o in OUTCOMES)


def comparison(c: ConfigResult, base: ConfigResult) -> tuple[stats.PairedDifference, stats.FisherResult]:
    """Quality (final eval loss of stable, learning seeds, paired by seed) and fraction not diverged (Fisher)
    of `c` against `base`."""
    diff = stats.paired_difference(c.eval_by_seed(), base.eval_by_seed(), test=c.paired_test)
    fisher = stats.fisher_exact_test(c.stable, c.n, base.stable, base.n)
    return diff, fisher


def _test_name(configs) -> str:
    return stats.PAIRED_TESTS[configs[0].paired_test] if configs else stats.PAIRED_TESTS["t"]


def comparison_head(configs) -> tuple[str, str]:
    """The header cells (and their separator) of the columns every comparison table ends with."""
    head = (" stable / diverged / failed to learn | eval loss - baseline's, mean [95% CI] (stable seeds paired "
            f"by seed) | p ({_test_name(configs)}) | seeds for 80% power | not diverged vs baseline: Fisher p "
            "(seeds for 80% power) |")
    return head, "---|" * 5


def comparison_cells(c: ConfigResult, configs: list[ConfigResult]) -> str:
    """The cells of the comparison columns for `c` (see `comparison_head`)."""
    base = baseline_of(configs)
    if base is None or c is base:
        return f" {_outcome_cell(c)} | baseline | - | - | baseline |"
    diff, fisher = comparison(c, base)
    return (f" {_outcome_cell(c)} | {_diff_cell(diff)} | {_p(diff.p_value)} | {_seeds(diff.seeds_for_power)} | "
            f"{_p(fisher.p_value)} ({_seeds(fisher.seeds_for_power)}) |")


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _mean_std(vals: np.ndarray) -> str:
    """"mean +- SD" (sample SD over seeds; headers say so)."""
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
    return _loss_cell(c, -c.eval_losses())


def _loss_cell(c: ConfigResult, vals: np.ndarray) -> str:
    """A quality cell over the stable seeds: "x" when every seed diverged (a diverged seed's frozen loss is
    no result)."""
    return "x" if c.n and not c.stable else _mean_std(vals)


def table_summary(configs: list[ConfigResult]) -> str:
    head, sep = comparison_head(configs)
    rows = ["| configuration | not diverged (95% CI) | eval loss, mean +- SD (stable seeds) | gap to best loss, mean +- SD "
            "| diverged at (rule) |" + head, "|---|---|---|---|---|" + sep]
    for c in configs:
        gaps = np.array([r["result"]["quality_gap"] for r, o in zip(c.records, c.outcomes)
                         if r["result"]["quality_gap"] is not None and o == "stable"], float)
        div = ", ".join(f"{r['result']['divergence_step']} ({r['result']['divergence_rule']})"
                        for r in c.records if r["result"]["diverged"]) or "-"
        rows.append(f"| {c.label} | {_stable_cell(c)} | {_loss_cell(c, c.eval_losses())} | {_loss_cell(c, gaps)} | "
                    f"{div} |" + comparison_cells(c, configs))
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
    head, sep = comparison_head(configs)
    out = [PAPER_SCALE_NOTE, "", f"| {first_col} | paper: stable | paper: quality | lab configuration | lab: not diverged "
           "(95% CI) | lab: neg. log perplexity, mean +- SD |" + head, "|---|---|---|---|---|---|" + sep]
    for name, paper_stable, paper_q, key in rows:
        matches = [c for c in configs if c.value("train.label") == key]
        if not matches:
            out.append(f"| {name} | {paper_stable} | {paper_q} | not run | - | - |" + " - |" * 5)
        for c in matches:
            out.append(f"| {name} | {paper_stable} | {paper_q} | {c.label} | {_stable_cell(c)} | {_neg_log_ppl(c)} |"
                       + comparison_cells(c, configs))
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
    head, sep = comparison_head(configs)
    out = ["| train CF / eval CF | paper quality | lab neg. log perplexity, mean +- SD | lab dropped tokens (train, final) "
           "| lab dropped assignments (train, final) | lab step ms |" + head, "|---|---|---|---|---|---|" + sep]
    for tr, ev, q in CAPACITY_ROWS:
        c = _find(configs, lambda c: c.value("model.train_capacity_factor") == tr and c.value("model.eval_capacity_factor") == ev)
        if c is None:
            out.append(f"| {tr}/{ev} | {q} | not run | - | - | - |" + " - |" * 5)
            continue
        tokens = _final(c, "router_dropped_token_fraction", np.nanmean)
        assignments = _final(c, "router_dropped_assignment_fraction", np.nanmean)
        if assignments is None:  # a store written before the two were told apart
            assignments = _final(c, "router_dropped_fraction", np.nanmean)
        step_ms = np.nanmedian([r["timing"].get("step_s", float("nan")) for r in c.records]) * 1e3
        out.append(f"| {tr}/{ev} | {q} | {_neg_log_ppl(c)} | {_fmt(tokens)} | {_fmt(assignments)} | {step_ms:.1f} |"
                   + comparison_cells(c, configs))
    return ("ST-MoE Table 8 (top-2): quality rises with capacity; dropped tokens fall. A dropped TOKEN is one no "
            "expert processed (all its assignments dropped: only the residual carries it), ST-MoE's measure; a "
            "dropped ASSIGNMENT is one token-expert request that found no slot (for top-2 at CF 1.25 at least "
            "37.5% by construction).\n\n" + "\n".join(out))


def _step_ms(c: ConfigResult) -> float:
    """Median over a configuration's records of its group's wall time per step (ms): the vmapped program of
    all its seeds, so compare configurations trained with the same number of seeds."""
    return float(np.nanmedian([r.get("timing", {}).get("step_s", float("nan")) for r in c.records]) * 1e3)


def table_num_experts(configs) -> str:
    """ST-MoE section 5.1: quality against the number of experts at fixed active compute (top-2, the same
    expert width), and top-1 vs top-2 vs top-3; with step time, since experts cost memory and dispatch."""
    head, sep = comparison_head(configs)
    base = baseline_of(configs)
    base_ms = _step_ms(base) if base is not None else float("nan")
    out = ["| configuration | experts | experts per token (k) | train CF | eval loss, mean +- SD (stable seeds) | "
           "dropped tokens (train, final) | ms/step (group of its seeds) | step time / baseline's |" + head,
           "|---|---|---|---|---|---|---|---|" + sep]
    for c in configs:
        routing, top_k = c.value("model.routing"), c.value("model.top_k")
        k = {"top1": 1, "top2": 2, "top2-gshard": 2}.get(routing, top_k)
        ms = _step_ms(c)
        out.append(f"| {c.label} | {c.value('model.num_experts')} | {k} | {c.value('model.train_capacity_factor')} | "
                   f"{_loss_cell(c, c.eval_losses())} | {_fmt(_final(c, 'router_dropped_token_fraction', np.nanmean))} | "
                   f"{ms:.1f} | {ms / base_ms:.2f} |" + comparison_cells(c, configs))
    return ("ST-MoE section 5.1: more experts improve quality at fixed compute with diminishing returns (and top-2 "
            "over top-1 helps more than top-3 over top-2), while each expert costs memory and dispatch time. "
            "Step times are wall times of each configuration's vmapped group on a shared CPU, measured one group "
            "after another (not interleaved): a rough guide, not a benchmark.\n\n" + "\n".join(out))


def table_z_loss(configs) -> str:
    return ("ST-MoE: the z-loss keeps router logits small, so bf16 rounding of a logit (relative 2^-8, absolute "
            "|z| 2^-8) becomes a small relative error of the gate after exp.\n\n" + table_router(configs))


def table_router(configs) -> str:
    """Router telemetry at the end of training, per configuration (mean over seeds, last 10 steps)."""
    head, sep = comparison_head(configs)
    out = ["| configuration | not diverged (95% CI) | neg. log perplexity, mean +- SD | max router logit (final) | "
           "mean logsumexp^2 (final) | gate roundoff bound in bf16 (= max logit * 2^-8) | flip rate vs fp32 router |"
           + head, "|---|---|---|---|---|---|---|" + sep]
    for c in configs:
        logit = _final(c, "router_max_abs_logit", np.nanmax)
        lse = _final(c, "router_mean_lse_sq", np.nanmean)
        flip = _final(c, "router_flip_rate", np.nanmean)
        out.append(f"| {c.label} | {_stable_cell(c)} | {_neg_log_ppl(c)} | {_fmt(logit, 2)} | {_fmt(lse, 2)} | "
                   f"{_fmt(gate_roundoff_bound(logit), 4)} | {_fmt(flip, 4)} |" + comparison_cells(c, configs))
    return "\n".join(out)


# (metric, how to read it) of train.precision_telemetry, in the order the table prints them
TELEMETRY_COLUMNS = (
    ("lost_update_frac", "lost updates"),
    ("applied_update_ratio", "applied / intended update"),
    ("underflow_frac/grads", "gradient underflow"),
    ("overflow_frac/grads", "gradient overflow"),
    ("underflow_frac/grad_allreduce", "all-reduce underflow"),
    ("allreduce_rel_error", "all-reduce relative error"),
)


def _window_mean(m: np.ndarray, start: float, stop: float) -> float | None:
    """Mean over seeds, steps in [start, stop) (fractions of the run) and layers of a per-step metric
    <float>[seeds, steps, ...] (at least one step)."""
    if m.size == 0:
        return None
    lo = int(start * m.shape[1])
    window = m[:, lo:max(lo + 1, int(stop * m.shape[1]))]
    return float(np.nanmean(window)) if np.isfinite(window).any() else None


def table_precision_telemetry(configs) -> str:
    """Issue 14 (item 1): did the precision knob reach its regime? Per configuration, the precision telemetry
    averaged over the first 10% and the last 20% of the steps (seeds, steps and sites pooled; '-' where the
    run did not record it: train.precision_telemetry = false, or a site its policy never rounds). Underflow:
    nonzero elements flushed to zero by the rounding, of the nonzero; overflow: finite elements that became
    inf/NaN or saturated, of the finite; lost updates: parameters whose nonzero intended update left the
    master weight unchanged."""
    cols = [name for name, _ in TELEMETRY_COLUMNS if any(c.metric(name).size for c in configs)]
    if not cols:
        return "No precision telemetry in this store (set train.precision_telemetry = true)."
    heads = dict(TELEMETRY_COLUMNS)
    out = ["| configuration | " + " | ".join(f"{heads[n]}: first 10% / last 20%" for n in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for c in configs:
        cells = []
        for n in cols:
            m = c.metric(n)
            early, late = _window_mean(m, 0.0, 0.1), _window_mean(m, 0.8, 1.0)
            cells.append(" / ".join("-" if x is None else f"{x:.3g}" for x in (early, late)))  # fractions span decades
        out.append(f"| {c.label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def first_crossing(series: np.ndarray, threshold: float) -> int | None:
    """First step (0-based index) at which a per-step series exceeds `threshold`; None if it never does.
    NaN (a frozen or overflowed step) never counts as a crossing: the crossing must be seen while finite."""
    hit = np.flatnonzero(np.nan_to_num(series, nan=-np.inf) > threshold)
    return int(hit[0]) if hit.size else None


def table_router_overflow(configs) -> str:
    """Issue 14 (4a): does a float16 router overflow? fp16's largest finite value is 65504, so exp(z)
    overflows above ln 65504 = 11.09 (and a sum of 8 equal terms above 9.01). Per configuration: the largest
    router logit seen while training was finite (over layers and steps), how many seeds crossed 11.09 and at
    which step (median), and how many diverged, at which step (median) and by which rule. A divergence that
    follows a crossing is the mechanism the experiment looks for; one without a crossing is something else."""
    limit = math.log(float(get_format("fp16").max))
    head, sep = comparison_head(configs)
    out = [f"fp16 exp overflows above ln 65504 = {limit:.2f}; a row's router format is in its policy.", "",
           "| configuration | max router logit seen (finite steps), median [range] over seeds | seeds crossing "
           f"{limit:.2f} (median step) | diverged (median step; rules) | diverged after crossing |" + head,
           "|---|---|---|---|---|" + sep]
    for c in configs:
        logits = c.metric("router_max_abs_logit")  # [seeds, steps, layers]
        peaks, crossings = [], []
        for seed_series in (logits.reshape(logits.shape[0], logits.shape[1], -1).max(-1)
                            if logits.size else []):
            finite = seed_series[np.isfinite(seed_series)]
            peaks.append(float(finite.max()) if finite.size else math.nan)
            crossings.append(first_crossing(seed_series, limit))
        div = [(r["result"]["divergence_step"], r["result"]["divergence_rule"]) for r in c.records
               if r["result"]["diverged"]]
        after = sum(1 for r, x in zip(c.records, crossings)
                    if r["result"]["diverged"] and x is not None and x <= r["result"]["divergence_step"])
        peak = (f"{np.nanmedian(peaks):.2f} [{np.nanmin(peaks):.2f}, {np.nanmax(peaks):.2f}]"
                if peaks and np.isfinite(peaks).any() else "-")
        crossed = [x for x in crossings if x is not None]
        cross = f"{len(crossed)}/{c.n}" + (f" ({int(np.median(crossed))})" if crossed else "")
        rules = sorted({str(rule) for _, rule in div})
        dv = f"{len(div)}/{c.n}" + (f" ({int(np.median([s for s, _ in div]))}; {', '.join(rules)})" if div else "")
        out.append(f"| {c.label} | {peak} | {cross} | {dv} | {after}/{len(div)} |" + comparison_cells(c, configs))
    return "\n".join(out)


def gate_roundoff_bound(max_abs_logit: float | None, fmt: str = "bf16") -> float | None:
    """Largest relative error of a gate exp(z) when the logit z is rounded to nearest in `fmt`: a format with
    m stored mantissa bits keeps m + 1 significant bits, so rounding moves z by up to |z| * 2^-(m+1) and
    exp(z) by a factor exp(|z| * 2^-(m+1)) ~ 1 + |z| * 2^-(m+1). For bf16 (m = 7): max |logit| * 2^-8."""
    if max_abs_logit is None:
        return None
    return max_abs_logit * 2.0 ** -(get_format(fmt).mantissa_bits + 1)


def _final(c: ConfigResult, name: str, reduce: Callable) -> float | None:
    m = c.metric(name)
    if m.size == 0:
        return None
    last = m[:, -10:]
    return float(reduce(last)) if np.isfinite(last).any() else None


def lr_lines(configs) -> dict[str, list[ConfigResult]]:
    """Configurations grouped by everything but the learning rate (one line of an LR sweep), by lr."""
    by_line: dict[str, list[ConfigResult]] = {}
    for c in configs:
        rest = {k: v for k, v in c.overrides.items() if k != "optim.lr"}
        by_line.setdefault(label_of(rest, c.hidden), []).append(c)
    return {line: sorted(cs, key=lambda c: c.value("optim.lr")) for line, cs in by_line.items()}


def table_lr_sensitivity(configs) -> str:
    """Per policy (every axis but the lr): loss vs lr, divergence onset, Wortsman's LR sensitivity."""
    by_line = lr_lines(configs)
    out = ["| configuration | lr grid | final eval loss per lr (mean over seeds; x = all diverged) | "
           "divergence onset (lowest lr with a diverged seed) | LR sensitivity |", "|---|---|---|---|---|"]
    for line, cs in by_line.items():
        lrs = [c.value("optim.lr") for c in cs]
        losses = []
        for c in cs:
            vals = np.array([r["result"]["final_eval_loss"] if r["result"]["final_eval_loss"] is not None else np.nan
                             for r in c.records if not r["result"]["diverged"]], float)  # x: all diverged
            losses.append(float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"))
        init = _loss_at_init(cs)
        onset = next((c.value("optim.lr") for c in cs if c.stable < c.n), None)
        sens = lr_sensitivity(lrs, [l if math.isfinite(l) else init for l in losses], init) if init else None
        cells = " ".join("x" if not math.isfinite(l) else f"{l:.2f}" for l in losses)
        out.append(f"| {line} | {min(lrs):g}..{max(lrs):g} | {cells} | {onset if onset is not None else 'none'} | "
                   f"{_fmt(sens)} |")
    return ("Wortsman et al. 2023: LR sensitivity = mean over the lr grid of min(loss(lr), loss at init) - best "
            "loss; smaller is more robust.\n\n" + "\n".join(out))


def table_lr_intervals(configs) -> str:
    """Per line and lr: outcomes, the mean eval loss with its 95% CI, and the paired comparison with the
    baseline's line at the same lr."""
    by_line = lr_lines(configs)
    base = baseline_of(configs)
    base_line = by_line.get(baseline_line(configs, by_line), [])
    head, sep = comparison_head(configs)
    out = ["| configuration | lr | eval loss, mean [95% CI] (stable seeds) |" + head.replace("baseline", "baseline line"),
           "|---|---|---|" + sep]
    for line, cs in by_line.items():
        for c in cs:
            m = stats.mean_interval(c.eval_losses())
            cell = "-" if m.n == 0 else f"{m.mean:.3f}" if m.n == 1 else f"{m.mean:.3f} [{m.ci_lo:.3f}, {m.ci_hi:.3f}]"
            peers = [b for b in base_line if b.value("optim.lr") == c.value("optim.lr")]
            cells = comparison_cells(c, peers) if peers else f" {_outcome_cell(c)} |" + " - |" * 4
            out.append(f"| {line} | {c.value('optim.lr'):g} | {cell} |" + cells)
    return ("Per learning rate, with intervals (the comparison is with the baseline's line at the same lr):\n\n"
            + "\n".join(out))


def table_lr_sensitivity_with_intervals(configs) -> str:
    return table_lr_sensitivity(configs) + "\n\n" + table_lr_intervals(configs)


def _loss_at_init(cs: list[ConfigResult]) -> float | None:
    firsts = [c.metric("ce")[:, 0] for c in cs if c.metric("ce").size]
    vals = np.concatenate(firsts) if firsts else np.array([])
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else None


# -- divergence onset and its precursors ----------------------------------------------------------------------


def onset_fits(configs) -> dict[str, tuple[list[ConfigResult], stats.OnsetFit]]:
    """Per policy line (`lr_lines`: every axis but the lr): its configurations by lr and the logistic fit
    of P(diverge | lr) over their seeds (stats.divergence_onset)."""
    return {line: (cs, stats.divergence_onset([c.value("optim.lr") for c in cs], [c.n for c in cs],
                                              [c.n - c.stable for c in cs]))
            for line, cs in lr_lines(configs).items() if cs and all(c.n for c in cs)}


def baseline_line(configs, lines: dict[str, list[ConfigResult]]) -> str | None:
    """The line (a key of `lines`, as `lr_lines` gives them) holding the baseline row (`baseline_of`)."""
    base = baseline_of(configs)
    return next((line for line, cs in lines.items() if any(c is base for c in cs)), None)


def _lr_cell(v: float | None) -> str:
    return "open" if v is None else f"{v:.3g}"


def onset_cell(f: stats.OnsetFit) -> str:
    """The fitted onset lr with its 95% profile-likelihood interval, or why there is no point estimate."""
    ci = f"[{_lr_cell(f.ci_lo)}, {_lr_cell(f.ci_hi)}]"
    if f.status == "fit":
        return f"{f.onset_lr:.3g} {ci}"
    if f.status == "all_stable":
        return f"> {f.lrs[-1]:g} (no seed diverged; 95% lower bound {_lr_cell(f.ci_lo)})"
    if f.status == "all_diverged":
        return f"< {f.lrs[0]:g} (every seed diverged; 95% upper bound {_lr_cell(f.ci_hi)})"
    if f.status == "separated":
        return f"no point estimate ({f.reason}); 95% profile set {ci}"
    return f"none: {f.reason}"


def shift_cell(d: stats.OnsetShift) -> str:
    lo, hi = d.ratio_ci
    ci = f"[{_lr_cell(lo)}, {_lr_cell(hi)}]"
    if d.shift is None:
        if lo is None and hi is None:
            return f"none ({d.reason})"
        return f"no point estimate ({d.reason}); ratio 95% CI {ci}"
    return f"x{d.ratio:.3g} {ci} ({d.shift:+.3f} decades)"


def table_onset(configs) -> str:
    """Per policy line: the lr grid, seeds and diverged seeds per lr, the fitted onset lr with its 95% CI,
    and the shift of the onset against the baseline's line with its 95% CI and likelihood-ratio p."""
    fits = onset_fits(configs)
    base = baseline_line(configs, {line: cs for line, (cs, _) in fits.items()})
    out = ["| policy line | lrs | seeds per lr | diverged per lr | onset lr (P = 0.5) [95% CI] | onset / baseline "
           "line's: ratio [95% CI] (shift in decades) | p (likelihood ratio, no shift) |",
           "|---|---|---|---|---|---|---|"]
    for line, (cs, f) in fits.items():
        if line == base:
            shift, p = "baseline line", "-"
        else:
            d = stats.onset_shift(f, fits[base][1]) if base is not None else None
            shift, p = (shift_cell(d), _p(d.p_value)) if d is not None else ("no baseline line", "-")
        out.append(f"| {line} | {' '.join(f'{v:g}' for v in f.lrs)} | {' '.join(map(str, f.seeds))} | "
                   f"{' '.join(map(str, f.diverged))} | {onset_cell(f)} | {shift} | {p} |")
    return ("Divergence onset: P(diverge | lr) = sigmoid(a + b log10 lr) fitted by maximum likelihood to every "
            "seed's outcome (diverged or not; failed-to-learn seeds count as not diverged); the onset is the lr "
            "where P = 0.5. Intervals are 95% profile-likelihood intervals (the values a likelihood-ratio test "
            "does not reject, the slopes maximised out); 'open': not bounded within "
            f"{stats.ONSET_EXTRAPOLATE_DECADES:g} decade of the grid. Under separation (every stable seed at a "
            "lower lr than every diverged one) the likelihood has no maximum: no point estimate is given, only "
            "where the step lies and the profile set. The shift compares each line's onset with the baseline "
            "line's (ratio of onset lrs; the p-value tests a common onset, slopes free).\n\n" + "\n".join(out))


# Telemetry series watched for precursors: name -> (metric, how per-layer values combine, label).
PRECURSOR_SERIES = {
    "router_max_logit": ("router_max_abs_logit", "max", "router max abs logit (max over sparse layers)"),
    "router_lse_sq": ("router_mean_lse_sq", "max", "router logsumexp^2 (z-loss; max over sparse layers)"),
    "output_lse_sq": ("output_z_loss", None, "output logsumexp^2 (mean over tokens: the output z-loss)"),
    "attention_logit": ("max_attention_logit", "max", "max abs attention logit"),
    "grad_norm": ("grad_norm", None, "gradient norm"),
    "update_rms": ("update_rms", None, "update RMS"),
    "underflow_grads": ("underflow_frac/grads", None, "underflow fraction of gradients (precision telemetry)"),
}
# Fewer stable seeds than this at a configuration: no reference range there.
PRECURSOR_MIN_REFERENCE = 2


def _series(c: ConfigResult, name: str) -> np.ndarray | None:
    """<float>[seeds, steps] of a precursor series, None where the runs did not record it (or recorded only
    NaN, as the router telemetry of random or hash routing)."""
    metric, layers, _ = PRECURSOR_SERIES[name]
    m = c.metric(metric)
    if m.size == 0 or m.shape[0] != c.n or not np.isfinite(m).any():
        return None
    if m.ndim == 3:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a frozen seed's steps are all NaN
            m = np.nanmax(m, axis=2) if layers == "max" else np.nanmean(m, axis=2)
    return m


@dataclasses.dataclass(frozen=True)
class Precursors:
    """A policy line's diverged seeds against the stable seeds of their own configuration.

    leads: {series: [lead time in steps, or None (no precursor), per diverged seed with a reference]};
    absent: series not recorded in some configuration of the line; unreferenced: (configuration label,
    diverged seeds) where fewer than PRECURSOR_MIN_REFERENCE seeds stayed stable; seeds: diverged seeds
    with a reference."""

    leads: dict[str, list[int | None]]
    absent: tuple[str, ...]
    unreferenced: tuple[tuple[str, int], ...]
    seeds: int


def precursors(cs: list[ConfigResult]) -> Precursors:
    """stats.precursor_lead of every watched series for every diverged seed of these configurations."""
    leads: dict[str, list[int | None]] = {name: [] for name in PRECURSOR_SERIES}
    absent, unreferenced, seeds = set(), [], 0
    for c in cs:
        div = [i for i, r in enumerate(c.records) if r["result"]["diverged"]]
        stable = [i for i, r in enumerate(c.records) if not r["result"]["diverged"]]
        if not div:
            continue
        if len(stable) < PRECURSOR_MIN_REFERENCE:
            unreferenced.append((c.label, len(div)))
            continue
        seeds += len(div)
        for name in PRECURSOR_SERIES:
            m = _series(c, name)
            if m is None:
                absent.add(name)
                continue
            leads[name] += [stats.precursor_lead(m[i], m[stable], c.records[i]["result"]["divergence_step"])
                            for i in div]
    return Precursors({k: v for k, v in leads.items() if k not in absent}, tuple(sorted(absent)),
                      tuple(unreferenced), seeds)


def table_precursors(configs) -> str:
    """Per policy line: for each telemetry series, how many diverged seeds had it above the stable seeds'
    range before diverging, how often it was the first to leave, and how many steps ahead."""
    out = ["| policy line | series | diverged seeds with a reference | above the stable range before diverging | "
           "first to leave (ties count for each) | lead time in steps: median [min, max] |",
           "|---|---|---|---|---|---|"]
    notes = []
    for line, cs in lr_lines(configs).items():
        pre = precursors(cs)
        for label, k in pre.unreferenced:
            notes.append(f"- {line}: {label}: {k} diverged seed(s) without a reference (fewer than "
                         f"{PRECURSOR_MIN_REFERENCE} stable seeds at that lr)")
        if not pre.seeds:
            what = "no diverged seed has a reference" if pre.unreferenced else "no seed diverged"
            out.append(f"| {line} | - | 0 | {what} | - | - |")
            continue
        per_seed = list(zip(*pre.leads.values())) if pre.leads else []
        firsts = dict.fromkeys(pre.leads, 0)
        for row in per_seed:
            got = [v for v in row if v is not None]
            for name, v in zip(pre.leads, row):
                if got and v == max(got):
                    firsts[name] += 1
        for name, (_, _, label) in PRECURSOR_SERIES.items():
            if name in pre.absent:
                out.append(f"| {line} | {label} | {pre.seeds} | not recorded in these runs | - | - |")
                continue
            vals = [v for v in pre.leads[name] if v is not None]
            lead = f"{np.median(vals):g} [{min(vals)}, {max(vals)}]" if vals else "-"
            out.append(f"| {line} | {label} | {pre.seeds} | {len(vals)}/{pre.seeds} | {firsts[name]} | {lead} |")
    return ("Precursors of divergence. For each diverged seed and telemetry series: the series 'left the stable "
            "range' at the first step of its last uninterrupted run above the maximum over the stable seeds of "
            "the same configuration (same policy and lr) at the same step, a run that lasts up to the step "
            "before the divergence step; the lead time is the divergence step minus that step (the step its rule "
            "fired: for the spike rule the loss was already high for its 4 preceding steps). A series below "
            "that maximum at the step before divergence is no precursor for that seed. Series a run did not "
            "record (precision telemetry off, random routing) are said to be absent.\n\n" + "\n".join(out)
            + ("\n\n" + "\n".join(notes) if notes else ""))


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
    telemetry = ("Sentinel-routing entropy from the training telemetry (mean over seeds and the last 10 steps, "
                 "training batches, training capacity factor):\n\n" + "\n".join(out))
    routed = [c for c in configs if routing_stats_of(c)]
    if not routed:
        return paper + "\n\n" + telemetry
    return "\n\n".join([paper, *(table_routing_stats(c) for c in routed), telemetry])


def routing_stats_of(c: ConfigResult) -> dict[int, list[dict]]:
    """{seed: per sparse layer statistics} of the records that carry them (train.routing_stats_batches)."""
    return {r["seed"]: r["result"]["routing_stats"] for r in c.records if r["result"].get("routing_stats")}


def _vs_null(per_seed: dict[int, list[dict]], j: int, name: str, null: str, test: str) -> str:
    """"observed vs null: mean difference [95% CI] p" over seeds for layer j (paired by seed: each seed's
    statistic against its own permutation null)."""
    obs = {s: layers[j].get(name) for s, layers in per_seed.items()}
    ref = {s: layers[j].get(null) for s, layers in per_seed.items()}
    obs = {s: v for s, v in obs.items() if v is not None and ref.get(s) is not None}
    if not obs:
        return "-"
    d = stats.paired_difference(obs, ref, test=test)
    m_obs, m_ref = np.mean(list(obs.values())), np.mean([ref[s] for s in obs])
    return f"{m_obs:.2f} vs {m_ref:.2f}: {_diff_cell(d)}, p {_p(d.p_value)}"


def _paper_sentinel(name: str, index_in_stack: int) -> str:
    paper = SPECIALIZATION_PAPER[name.split("/")[0]]
    return str(paper[index_in_stack]) if index_in_stack < len(paper) else "-"


def table_routing_stats(c: ConfigResult) -> str:
    """Per sparse layer, after training on held-out batches labelled with their language
    (precision_lab/specialization.py): sentinel entropy, token-id and frequent-token specialisation, and
    language specialisation, each against its permutation null, paired by seed."""
    per_seed = routing_stats_of(c)
    first = next(iter(per_seed.values()))
    names = [layer["layer"] for layer in first]
    n_exp = c.value("model.num_experts")
    test = c.paired_test
    seen: dict[str, int] = {}
    rows = ["| sparse layer | paper: sentinel entropy | sentinel share of tokens | expert entropy H(E) | sentinel entropy "
            "vs random subsets of the same size | per sentinel id H(E \\| id) | frequent-token entropy vs experts "
            "permuted | token-id NMI vs experts permuted |", "|---|---|---|---|---|---|---|---|"]
    lang_rows = ["| sparse layer | language NMI vs languages permuted over sequences | seeds with permutation p "
                 "< 0.05 | language NMI vs routing by token id alone (experts shuffled within each token id) | "
                 "seeds with p < 0.05 |", "|---|---|---|---|---|"]
    for j, name in enumerate(names):
        stack = name.split("/")[0]
        seen[stack] = seen.get(stack, -1) + 1
        col = lambda k: [layers[j].get(k) for layers in per_seed.values() if layers[j].get(k) is not None]  # noqa: E731
        share, h_e = col("sentinel_share"), col("expert_entropy")
        rows.append(f"| {name} | {_paper_sentinel(name, seen[stack])} | {_fmt(np.mean(share) if share else None, 3)} | "
                    f"{_fmt(np.mean(h_e) if h_e else None, 2)} | "
                    f"{_vs_null(per_seed, j, 'sentinel_entropy', 'sentinel_entropy_null', test)} | "
                    f"{_fmt(np.mean(col('sentinel_token_entropy')) if col('sentinel_token_entropy') else None, 2)} | "
                    f"{_vs_null(per_seed, j, 'frequent_token_entropy', 'frequent_token_entropy_null', test)} | "
                    f"{_vs_null(per_seed, j, 'token_nmi', 'token_nmi_null', test)} |")
        ps, tps = col("language_p"), col("language_token_p")
        lang_rows.append(f"| {name} | {_vs_null(per_seed, j, 'language_nmi', 'language_nmi_null', test)} | "
                         f"{sum(p < stats.ALPHA for p in ps)}/{len(ps)} | "
                         f"{_vs_null(per_seed, j, 'language_nmi', 'language_nmi_token_null', test)} | "
                         f"{sum(p < stats.ALPHA for p in tps)}/{len(tps)} |")
    tokens = int(np.mean([layers[0]["tokens"] for layers in per_seed.values()]))
    return (f"**{c.label}**: routing of the final parameters on held-out batches ({tokens} tokens in the first "
            f"sparse layer), each token's top-1 expert; {len(per_seed)} seeds; uniform over {n_exp} experts = "
            f"ln {n_exp} = {math.log(n_exp):.2f} nats. Each cell: mean over seeds of the statistic vs its null, "
            f"then their paired difference [95% CI] and p ({stats.PAIRED_TESTS[test]}, paired by seed). Entropies "
            "in nats (lower = more concentrated); NMI = mutual information / entropy (token id: I(T;E)/H(E); "
            "language: I(L;E)/min(H(L), H(E))), 0 = no dependence, 1 = determined.\n\n"
            + "\n".join(rows) + "\n\n" + _stacks_compared(per_seed, names, c)
            + "\n\nLanguage x expert (ST-MoE section 7.3: experts do not specialise by language):\n\n"
            + "\n".join(lang_rows))


STACK_STATISTICS = ("sentinel_entropy", "sentinel_token_entropy", "frequent_token_entropy", "token_nmi",
                    "sentinel_share")


def _stacks_compared(per_seed: dict[int, list[dict]], names: list[str], c: ConfigResult) -> str:
    """Encoder vs decoder, each statistic averaged over the stack's sparse layers and the seeds, and, where
    the decoder concentrates sentinels more than the encoder (the opposite of ST-MoE Table 14), whether the
    decoder's routing is concentrated for every token (routing by token id) or for sentinels only."""
    means: dict[str, dict[str, float]] = {}
    for stack in ("encoder", "decoder"):
        idx = [j for j, n in enumerate(names) if n.startswith(stack)]
        means[stack] = {}
        for k in STACK_STATISTICS:
            vals = [layers[j][k] for layers in per_seed.values() for j in idx if layers[j].get(k) is not None]
            means[stack][k] = float(np.mean(vals)) if vals else float("nan")
    enc, dec = means["encoder"], means["decoder"]
    if not all(math.isfinite(v) for v in (*enc.values(), *dec.values())):
        return "Encoder vs decoder: not comparable (a stack has no sparse layer or no sentinel)."
    line = ("Encoder vs decoder (mean over the stack's sparse layers and seeds): sentinel entropy "
            f"{enc['sentinel_entropy']:.2f} vs {dec['sentinel_entropy']:.2f}; per sentinel id "
            f"{enc['sentinel_token_entropy']:.2f} vs {dec['sentinel_token_entropy']:.2f}; the most frequent content "
            f"tokens {enc['frequent_token_entropy']:.2f} vs {dec['frequent_token_entropy']:.2f}; token-id NMI "
            f"{enc['token_nmi']:.2f} vs {dec['token_nmi']:.2f}; sentinels are {enc['sentinel_share']:.1%} vs "
            f"{dec['sentinel_share']:.1%} of the routed tokens.")
    # Which stack concentrates sentinels more is a claim about seeds: per seed, the stack's mean sentinel
    # entropy over its sparse layers, decoder minus encoder, paired t (stats.paired_difference).
    per_stack = {stack: {seed: float(np.mean([layers[j]["sentinel_entropy"] for j, n in enumerate(names)
                                               if n.startswith(stack) and layers[j].get("sentinel_entropy") is not None]
                                              or [np.nan]))
                         for seed, layers in per_seed.items()} for stack in ("encoder", "decoder")}
    d = stats.paired_difference(per_stack["decoder"], per_stack["encoder"], test=c.paired_test)
    line += (f" Decoder - encoder sentinel entropy, paired by seed: {_diff_cell(d)}, p {_p(d.p_value)} "
             f"({d.test}).")
    if not (d.significant and d.mean < 0):
        if d.significant:
            return line + " As in ST-MoE Table 14, the encoder concentrates sentinels more than the decoder."
        return (line + " The two stacks do not differ significantly in how they route sentinels: the paper's "
                "near-uniform decoder (3.4 of ln 32) is not reproduced, and neither is a decoder that "
                "concentrates them more.")
    # "routes by token id": clearly higher token-id NMI AND clearly more concentrated frequent tokens than the
    # encoder; "like a frequent token": a sentinel id no more than 0.25 nats more concentrated than those
    by_token = (dec["token_nmi"] - enc["token_nmi"] > 0.1
                and enc["frequent_token_entropy"] - dec["frequent_token_entropy"] > 0.25)
    like_frequent = dec["frequent_token_entropy"] <= dec["sentinel_token_entropy"] + 0.25
    why = ("Likely why the decoder routes by token (a reading, not tested here): its router sees, at each "
           "position, the embedding of the (shifted) target token itself with causal attention over the earlier "
           f"positions of a {c.value('model.targets_length', '?')}-token target, while the encoder's bidirectional attention mixes every input position; and in the "
           "decoder's inputs every span starts with its sentinel (s0 always at position 1), so sentinels are a "
           "several times larger share of the routed tokens than in the encoder.")
    if by_token and like_frequent:
        return (line + " The decoder concentrates sentinels MORE than the encoder, the opposite of ST-MoE Table "
                "14, but not because its experts specialise in sentinels: its routing is concentrated by token id "
                "for every token (higher token-id NMI than the encoder's, and its most frequent tokens within 0.25 nats "
                "of a sentinel id's concentration). "
                + why)
    if by_token:
        return (line + " The decoder concentrates sentinels MORE than the encoder, the opposite of ST-MoE Table "
                "14. Most of it is token-id routing in general (higher token-id NMI than the encoder's, frequent "
                "tokens far more concentrated than in the encoder), and a sentinel id is more concentrated still "
                f"than the frequent tokens ({dec['sentinel_token_entropy']:.2f} vs "
                f"{dec['frequent_token_entropy']:.2f} nats): a smaller sentinel-specific part on top. " + why)
    return (line + " The decoder concentrates sentinels MORE than the encoder, the opposite of ST-MoE Table 14, "
            "and more than token-id routing in general explains (a sentinel id is more concentrated than the "
            "frequent tokens, or the decoder's token-id NMI is not higher): a sentinel-specific effect. " + why)


def table_backends(configs) -> str:
    head, sep = comparison_head(configs)
    out = ["| configuration | backend (device) | not diverged (95% CI) | eval loss, mean +- SD | divergence onset steps |"
           + head, "|---|---|---|---|---|" + sep]
    for c in configs:
        backends = sorted({f"{r['env']['backend']} ({r['env']['device']})" for r in c.records})
        steps = [r["result"]["divergence_step"] for r in c.records if r["result"]["diverged"]]
        out.append(f"| {c.label} | {', '.join(backends)} | {_stable_cell(c)} | {_loss_cell(c, c.eval_losses())} | "
                   f"{steps or '-'} |" + comparison_cells(c, configs))
    return ("CPU float32 vs the `tpu-default` policy (TPU's one-pass bf16 matmuls emulated on the CPU). A run of "
            "the same file on a TPU or GPU adds its own rows (the backend column says which).\n\n" + "\n".join(out))


# -- preconditions and budget: sections every report gets where they apply ----------------------------------

CONTROL_ROUTINGS = ("random", "hash")


def router_kind(c: ConfigResult) -> str:
    """What routes this configuration's tokens: "dense" (model.num_experts = 0, the FLOP-matched dense
    model), "random" or "hash" (model.routing, the unlearned controls), else "learned"."""
    if c.value("model.num_experts") == 0:
        return "dense"
    routing = c.value("model.routing")
    return routing if routing in CONTROL_ROUTINGS else "learned"


# The fields that make a row a router arm (learned, random, hash, dense) rather than another setting.
ROUTER_ARM_FIELDS = ("model.num_experts", "model.flop_matched_dense", "model.routing", "model.top_k", "train.label")


def _learned_partner(control: ConfigResult, learned: list[ConfigResult]) -> ConfigResult | None:
    """The learned-router row a control row is compared with: the one that agrees with it on every axis but
    the router arm's own fields (so a lever such as model.vocab_size pairs within itself), else the one that
    agrees outside the model section (policy, lr, ...), else the first learned row."""
    def setting(c):
        return {k: v for k, v in c.overrides.items() if k not in ROUTER_ARM_FIELDS and k not in c.hidden}

    def outside_model(c):
        return {k: v for k, v in setting(c).items() if not k.startswith("model.")}
    for key in (setting, outside_model):
        match = next((c for c in learned if key(c) == key(control)), None)
        if match is not None:
            return match
    return learned[0] if learned else None


def router_preconditions(configs) -> list[tuple[ConfigResult, ConfigResult, stats.PairedDifference]]:
    """(control row, learned row, learned - control paired difference of eval loss) per control row."""
    learned = [c for c in configs if router_kind(c) == "learned"]
    out = []
    for control in configs:
        if router_kind(control) == "learned":
            continue
        partner = _learned_partner(control, learned)
        if partner is not None:
            out.append((control, partner, stats.paired_difference(partner.eval_by_seed(), control.eval_by_seed(),
                                                                  test=control.paired_test)))
    return out


def informative_rows(configs) -> dict[str, bool]:
    """{learned row label: whether its learned router beats random routing significantly} (learned rows
    without a random control are absent): router-precision results are informative only where True."""
    verdict: dict[str, bool] = {}
    for control, learned, d in router_preconditions(configs):
        if router_kind(control) == "random":
            beats = d.significant and d.ci_hi < 0
            verdict[learned.label] = verdict.get(learned.label, False) or beats
    return verdict


def router_entropy_ratio(c: ConfigResult) -> float | None:
    """How far this row's router committed: its per-token routing entropy over the last 10% of the steps
    (mean over sparse layers and stable seeds) divided by ln(num_experts), the entropy of a uniform router.
    Near 1: the router still spreads every token almost evenly (its top-k choices ride on small logit
    differences); None for dense rows or runs without router telemetry."""
    experts = c.value("model.num_experts")
    if not experts or experts < 2:
        return None
    means = []
    for m, o in zip(c.metrics, c.outcomes):
        if o == "stable" and "router_entropy" in m and len(m["router_entropy"]):
            tail = np.asarray(m["router_entropy"], dtype=np.float64)[-max(1, len(m["router_entropy"]) // 10):]
            if np.isfinite(tail).any():
                means.append(np.nanmean(tail))
    return float(np.mean(means) / math.log(experts)) if means else None


def _partial_note(manifest: dict, runs: list[dict]) -> list[str]:
    """A line saying the store holds only part of the sweep (a long sweep run over several sessions, or a
    shard), with how many runs and shape groups are still missing; nothing when every planned run is stored."""
    planned = manifest.get("runs") or []
    stored = {r.get("run_id") for r in runs}
    missing = [r for r in planned if r.get("run_id") not in stored]
    if not missing:
        return []
    groups = {r.get("group_key") for r in planned}
    done = groups - {r.get("group_key") for r in missing}
    return [f"**Partial results:** {len(planned) - len(missing)} of the sweep's {len(planned)} runs are stored "
            f"({len(done)} of {len(groups)} shape groups complete); every table below covers the stored runs only. "
            f"`precision-lab sweep {manifest.get('source', 'FILE')} --out DIR` (the same store) trains the rest.", ""]


def baseline_learns_line(configs) -> str:
    """Does the comparison's reference learn? The baseline row's outcomes and mean eval loss against the
    unigram-model loss (the "failed to learn" line). A comparison with a baseline that did not learn says
    nothing about the paper."""
    base = baseline_of(configs)
    if base is None:
        return "- baseline: no runs stored"
    counts = base.outcome_counts()
    n = sum(counts.values())
    unigram = next((r.get("env", {}).get("unigram_loss") for r in base.records
                    if r.get("env", {}).get("unigram_loss") is not None), None)
    losses = base.eval_losses()
    mean = f"mean final eval loss {losses.mean():.3f} over its stable seeds" if len(losses) else "no stable seed"
    ref = f" (unigram reference {unigram:.3f})" if unigram is not None else ""
    verdict = ("it learns" if counts.get("stable", 0) == n else
               "it learns in some seeds only" if counts.get("stable", 0) else "it does NOT learn: every comparison "
               "with it is uninformative")
    return (f"- baseline **{base.label}**: {counts.get('stable', 0)} of {n} seeds stable and learning, "
            f"{counts.get('diverged', 0)} diverged, {counts.get('failed_to_learn', 0)} failed to learn; {mean}{ref}: "
            f"{verdict}. Whether it plateaued within the budget: the Budget section." + _baseline_line_over_lrs(configs))


def _baseline_line_over_lrs(configs) -> str:
    """In an lr sweep the baseline row is one point of a line (its first lr); the lr table compares every row
    with that line at the same lr, so what matters is at which lrs the line learns."""
    lines = lr_lines(configs)
    cs = lines.get(baseline_line(configs, lines), [])
    if len(cs) < 2:
        return ""
    learns = [f"{c.value('optim.lr'):g}" for c in cs if c.all_learned]
    not_all = [f"{c.value('optim.lr'):g}" for c in cs if not c.all_learned]
    return ("\n- the baseline's line over the lr grid (the lr table compares every row with it at the same lr): "
            + (f"every seed learns at lr {', '.join(learns)}" if learns else "no lr at which every seed learns")
            + (f"; not every seed does at lr {', '.join(not_all)}." if not_all else "."))


def table_precondition(configs) -> str:
    """Every report opens with its preconditions: does the baseline learn, and (where the sweep has control
    rows) does routing matter. A sweep without controls says that it does not check the latter."""
    head = "Could this experiment have shown its effect?\n\n" + baseline_learns_line(configs)
    rows = router_preconditions(configs)
    if not rows:
        return (head + "\n- routing: no random-routed, "
                "hash-routed or dense (model.num_experts = 0) rows in this sweep, so whether routing matters is "
                "not checked here, and no router-precision result of this report is shown to be informative by "
                "this report alone (the README's findings table names the control experiments run at each "
                "budget).")
    out = ["| control | compared with (learned router) | control: stable / diverged / failed | learned: stable / "
           "diverged / failed | learned router's final entropy / ln E | learned - control eval loss, mean [95% CI] "
           f"(paired by seed) | p ({_test_name(configs)}) | seeds for 80% power | learned significantly better? |",
           "|---|---|---|---|---|---|---|---|---|"]
    for control, learned, d in rows:
        better = "yes" if d.significant and d.ci_hi < 0 else "no"
        ratio = router_entropy_ratio(learned)
        out.append(f"| {control.label} ({router_kind(control)}) | {learned.label} | {_outcome_cell(control)} | "
                   f"{_outcome_cell(learned)} | {'-' if ratio is None else f'{ratio:.3f}'} | {_diff_cell(d)} | "
                   f"{_p(d.p_value)} | {_seeds(d.seeds_for_power)} | {better} |")
    verdict = informative_rows(configs)
    lines = [f"- {label}: " + ("informative (the learned router beats random routing significantly)" if ok else
                               "NOT informative (the learned router does not beat random routing significantly)")
             for label, ok in verdict.items()]
    if not verdict:
        lines = ["- no random-routed row: no router-precision result of this report is shown to be informative"]
    return (head + "\n\n"
            "Does routing matter here? Each control (random or hash routing, or the FLOP-matched dense model) "
            "against the learned router, over seeds stable in both. The entropy column says how far the learned "
            "router committed (1 = it still spreads every token evenly over the E experts). A router-precision "
            "result is called "
            "informative only where the learned router is significantly better than random routing (CI below "
            "0 and p < 0.05).\n\n" + "\n".join(out) + "\n\n" + "\n".join(lines))


def _eval_curves(c: ConfigResult) -> tuple[np.ndarray, np.ndarray, str]:
    """(steps, losses [seeds, steps], what) of the stable seeds: the eval history, or the per-step training
    cross entropy when the eval history has fewer than 3 points in the last 20% of the steps."""
    keep = [r for r, o in zip(c.records, c.outcomes) if o == "stable"]
    steps = sorted({e["step"] for r in keep for e in r["result"].get("eval_history", [])})
    last = c.value("train.steps", max(steps, default=0))
    if sum(s >= 0.8 * last for s in steps) >= 3:
        table = np.full((len(keep), len(steps)), np.nan)
        for i, r in enumerate(keep):
            for e in r["result"]["eval_history"]:
                table[i, steps.index(e["step"])] = np.nan if e["loss"] is None else e["loss"]
        return np.array(steps), table, "eval loss"
    ce = np.stack([m["ce"] for m, o in zip(c.metrics, c.outcomes) if o == "stable" and "ce" in m]) \
        if any(o == "stable" for o in c.outcomes) and c.metrics else np.zeros((0, 0))
    return np.arange(1, ce.shape[1] + 1), ce, "training cross entropy (too few evals)"


def table_budget(configs) -> str:
    """Has each configuration plateaued within its budget, and is evaluation noise below seed noise?"""
    base = baseline_of(configs)
    out = ["| configuration | steps | plateau: slope over the last 20% of steps, nats per 100 steps, mean [95% CI] "
           "across seeds (of) | loss change over that window | eval noise: SE of a seed's eval loss (batches) | "
           "seed noise: SD of eval loss across seeds | eval noise below seed noise? |", "|---|---|---|---|---|---|---|"]
    for c in configs:
        batch_losses = [r["result"]["final_eval_batch_losses"] for r, o in zip(c.records, c.outcomes)
                        if o == "stable" and r["result"].get("final_eval_batch_losses")]
        noise = stats.eval_vs_seed_noise(batch_losses, c.eval_losses())
        steps, curves, what = _eval_curves(c)
        slope = stats.plateau_slope(steps, curves) if curves.size else None
        if slope is None or slope.seeds == 0:
            slope_cell, change = "-", "-"
        else:
            slope_cell = (f"{100 * slope.slope:+.4f} [{100 * slope.ci_lo:+.4f}, {100 * slope.ci_hi:+.4f}] "
                          f"({what}, {slope.seeds} seeds): {slope.verdict(noise.seed_sd)}")
            change = f"{slope.change_over_window:+.4f} over steps {slope.window[0]}-{slope.window[1]}"
        below = "-" if not (math.isfinite(noise.eval_se) and math.isfinite(noise.seed_sd)) else \
            ("yes" if noise.eval_below_seed else "no")
        name = f"{c.label} (baseline)" if c is base else c.label
        out.append(f"| {name} | {c.value('train.steps', '-')} | {slope_cell} | {change} | "
                   f"{_fmt(noise.eval_se, 4)} ({noise.eval_batches}) | {_fmt(noise.seed_sd, 4)} ({noise.seeds}) | "
                   f"{below} |")
    return ("Training budget: the slope of the loss over the last 20% of the steps: plateaued (95% CI not below "
            "0), falling slowly (below 0, but the fall over the window is less than the seed SD) or still falling. "
            "Noise: the standard error of one seed's eval loss from the finite held-out set (SD over "
            "eval batches / sqrt(batches)) beside the SD of the final eval loss across stable seeds.\n\n"
            + "\n".join(out))


# -- fine-tuning (ST-MoE section 4; PAPER.md section 8) ----------------------------------------------------------

FINETUNE_NOTE = ("Fine-tuning quality is the cross entropy of the task's held-out TEST split (1,024 examples, used "
                 "for nothing else) at the last step, in nats per target token (lower is better); validation "
                 "curves pick nothing. Fine-tuning tables use every seed that did not diverge, failed-to-learn "
                 "ones included (see the finetune table), paired by seed. SuperGLUE scores (the paper's) and "
                 "these losses are different measures: compare directions and orderings.")


def finetune_values(c: ConfigResult) -> dict[str, dict[int, float]]:
    """Per quantity, {seed: value} over the seeds of a fine-tuning configuration that did not diverge (stable
    or failed to learn: a run that learns and then overfits can end above the task's chance loss, and
    leaving it out would hide exactly the overfitting these tables measure):
    test (final test loss), val (final validation loss), train (training cross entropy, mean of the last 10
    steps), best_val and best_step (the lowest validation loss and its step), rise (final validation - best:
    how far validation climbed back, the overfitting), gap (final validation - final training), pretrain (the
    pretraining point's final eval loss)."""
    out: dict[str, dict[int, float]] = {k: {} for k in ("test", "val", "train", "best_val", "best_step", "rise",
                                                        "gap", "pretrain")}
    for r, m in zip(c.records, c.metrics):
        if r["result"]["diverged"]:
            continue
        res, seed = r["result"], r["seed"]
        hist = [(e["step"], e["loss"]) for e in res.get("eval_history", []) if e["loss"] is not None]
        val = res.get("final_eval_loss")
        ce = np.asarray(m.get("ce", []), float)
        train = float(np.nanmean(ce[-10:])) if ce.size and np.isfinite(ce[-10:]).any() else None
        for key, v in (("test", res.get("final_test_loss")), ("val", val), ("train", train),
                       ("pretrain", res.get("pretrain_final_eval_loss"))):
            if v is not None and math.isfinite(v):
                out[key][seed] = float(v)
        if hist:
            step, best = min(hist, key=lambda h: h[1])
            out["best_val"][seed], out["best_step"][seed] = best, float(step)
            if val is not None:
                out["rise"][seed] = val - best
        if val is not None and train is not None:
            out["gap"][seed] = val - train
    return out


def _mi_cell(values, digits: int = 3) -> str:
    m = stats.mean_interval(list(values))
    if m.n == 0:
        return "-"
    if m.n == 1:
        return f"{m.mean:.{digits}f}"
    return f"{m.mean:.{digits}f} +- {m.sd:.{digits}f}"


def _pd_cells(d: stats.PairedDifference, digits: int = 3) -> str:
    """"mean [95% CI] (n) | p | seeds for 80% power" of a paired difference."""
    if d.n < 2:
        return f" {_diff_cell(d)} | - | - |"
    return (f" {d.mean:+.{digits}f} [{d.ci_lo:+.{digits}f}, {d.ci_hi:+.{digits}f}] (n={d.n}) | {_p(d.p_value)} | "
            f"{_seeds(d.seeds_for_power)} |")


def finetune_task(c: ConfigResult) -> str:
    return str(c.value("finetune.task", "") or "-")


def table_finetune(configs) -> str:
    """Every fine-tuning configuration: train, validation and test loss, best validation step, overfitting."""
    base = baseline_of(configs)
    bv = finetune_values(base) if base else {}
    out = ["| configuration | task | trainable | stable / diverged / failed to learn | pretrained eval loss | "
           "train CE (last 10 steps) | validation loss (final) | test loss | best validation loss (at step) | "
           "validation rise since best | validation - train gap | test loss - baseline's, mean [95% CI] "
           f"(paired by seed) | p ({_test_name(configs)}) | seeds for 80% power |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        v = finetune_values(c)
        best = f"{_mi_cell(v['best_val'].values())} ({_mi_cell(v['best_step'].values(), 0)})"
        cmp = " baseline | - | - |" if c is base else _pd_cells(stats.paired_difference(
            v["test"], bv.get("test", {}), test=c.paired_test))
        out.append(f"| {c.label} | {finetune_task(c)} | {c.value('finetune.trainable', '-')} | {_outcome_cell(c)} | "
                   f"{_mi_cell(v['pretrain'].values())} | {_mi_cell(v['train'].values())} | "
                   f"{_mi_cell(v['val'].values())} | {_mi_cell(v['test'].values())} | {best} | "
                   f"{_mi_cell(v['rise'].values())} | {_mi_cell(v['gap'].values())} |" + cmp)
    return (FINETUNE_NOTE + " Values are mean +- SD over the seeds that did not diverge, failed-to-learn ones "
            "included (final validation loss at or above the task's chance loss, the label or token prior: a run "
            "that overfits can end there after learning).\n\n" + "\n".join(out))


def table_finetune_overfitting(configs) -> str:
    """Sparse minus FLOP-matched dense, per task, paired by seed (ST-MoE Figure 3)."""
    small = "sparse overfits sooner (CB, 250 examples): earlier best step, larger rise"
    large = "no difference (ReCoRD, 138k examples)"
    paper = {"langid-small": small, "langid16-small": small, "reverse-small": small,
             "langid-large": large, "langid16-large": large, "reverse-large": large}
    out = ["| task | quantity | sparse, mean +- SD | dense, mean +- SD | sparse - dense, mean [95% CI] (paired by "
           f"seed) | p ({_test_name(configs)}) | seeds for 80% power | paper (ST-MoE Fig. 3) |",
           "|---|---|---|---|---|---|---|---|"]
    names = {"best_step": "best validation step", "rise": "validation rise since best", "gap": "validation - train gap",
             "best_val": "best validation loss", "test": "test loss (final)", "pretrain": "pretrained eval loss"}
    for task in dict.fromkeys(finetune_task(c) for c in configs):
        here = [c for c in configs if finetune_task(c) == task]
        sparse = next((c for c in here if router_kind(c) == "learned"), None)
        dense = next((c for c in here if router_kind(c) == "dense"), None)
        if sparse is None or dense is None:
            out.append(f"| {task} | needs a sparse and a dense (model.num_experts = 0) row |" + " - |" * 6)
            continue
        sv, dv = finetune_values(sparse), finetune_values(dense)
        for key, name in names.items():
            digits = 0 if key == "best_step" else 3
            d = stats.paired_difference(sv[key], dv[key], test=sparse.paired_test)
            out.append(f"| {task} | {name} | {_mi_cell(sv[key].values(), digits)} | {_mi_cell(dv[key].values(), digits)} "
                       f"|" + _pd_cells(d, digits) + f" {paper.get(task, '-') if key in ('best_step', 'rise') else '-'} |")
    return (FINETUNE_NOTE + " Overfitting: the step of the lowest validation loss (earlier = sooner) and how far "
            "validation climbed back from it by the end (rise).\n\n" + "\n".join(out))


def _grid(configs, kind: str) -> dict[tuple[int, float], ConfigResult]:
    return {(c.value("train.batch_size"), c.value("optim.lr")): c for c in configs if router_kind(c) == kind}


def _average_over(grid: dict, fixed: int, value, key: str) -> dict[int, float]:
    """{seed: mean over the other axis of the grid} at grid axis `fixed` (0: batch size, 1: lr) = `value`,
    over seeds present in every cell of that row or column."""
    cells = [finetune_values(c)[key] for k, c in grid.items() if k[fixed] == value]
    seeds = set.intersection(*(set(v) for v in cells)) if cells else set()
    return {s: float(np.mean([v[s] for v in cells])) for s in sorted(seeds)}


def table_finetune_hparams(configs) -> str:
    """Batch size x learning rate, per arm: row and column averages with CIs and the preference of each arm,
    not best cells (ST-MoE Table 20)."""
    paper = ("ST-MoE Table 20 (PAPER.md section 8): averaged over the grid, sparse models prefer a higher lr (1e-3) "
             "and smaller batches (65k tokens), dense models the opposite (lr 1e-4, 262k tokens); the paper's "
             "cells are single runs (its best single sparse cell is lr 1e-3 at batch 1M), so the lab reports "
             "averages over rows and columns, not best cells.")
    return paper + " " + FINETUNE_NOTE + "\n\n" + "\n\n".join(
        _hparams_block(configs, key, name) for key, name in
        (("test", "test loss (final)"), ("best_val", "best validation loss (the paper's best checkpoint)")))


def _hparams_block(configs, key: str, measure: str) -> str:
    out = [f"### {measure}", ""]
    prefs: dict[str, dict[str, dict[int, float]]] = {}
    for kind, arm in (("learned", "sparse"), ("dense", "dense")):
        grid = _grid(configs, kind)
        if not grid:
            continue
        batches = sorted({k[0] for k in grid})
        lrs = sorted({k[1] for k in grid})
        out += [f"**{arm}**: {measure}, mean +- SD over seeds not diverged, per cell; last column and row: the average "
                "over the other axis, mean [95% CI] across seeds\n",
                "| batch size \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " | average over lr |",
                "|---|" + "---|" * (len(lrs) + 1)]
        for b in batches:
            cells = [_mi_cell(finetune_values(grid[(b, lr)])[key].values()) if (b, lr) in grid else "not run"
                     for lr in lrs]
            out.append(f"| {b} | " + " | ".join(cells) + f" | {_ci_cell(_average_over(grid, 0, b, key))} |")
        out.append("| average over batch size | " + " | ".join(_ci_cell(_average_over(grid, 1, lr, key)) for lr in lrs)
                   + " | |")
        out.append("")
        small, large = _average_over(grid, 0, batches[0], key), _average_over(grid, 0, batches[-1], key)
        high, low = _average_over(grid, 1, lrs[-1], key), _average_over(grid, 1, lrs[0], key)
        db = {s: small[s] - large[s] for s in set(small) & set(large)}
        dl = {s: high[s] - low[s] for s in set(high) & set(low)}
        prefs[arm] = {"batch": db, "lr": dl}
        for name, d in ((f"batch {batches[0]} - batch {batches[-1]} (negative: prefers the smaller batch)", db),
                        (f"lr {lrs[-1]:g} - lr {lrs[0]:g} (negative: prefers the higher lr)", dl)):
            pd = stats.paired_difference(d, {s: 0.0 for s in d}, test=configs[0].paired_test)
            out.append(f"- {arm}, {name}:" + _pd_cells(pd).replace(" |", ";").rstrip(";"))
        out.append("")
    if {"sparse", "dense"} <= set(prefs):
        out.append("Sparse preference minus dense preference, paired by seed (the paper: sparse prefers smaller "
                   "batches and higher lr than dense, so both differences negative):\n")
        out.append(f"| preference | sparse - dense, mean [95% CI] | p ({_test_name(configs)}) | seeds for 80% power |")
        out.append("|---|---|---|---|")
        for pref, name in (("batch", "smaller batch (loss at small - at large batch)"),
                           ("lr", "higher lr (loss at high - at low lr)")):
            d = stats.paired_difference(prefs["sparse"][pref], prefs["dense"][pref], test=configs[0].paired_test)
            out.append(f"| {name} |" + _pd_cells(d))
    return "\n".join(out)


def _ci_cell(values: dict[int, float]) -> str:
    m = stats.mean_interval(list(values.values()))
    if m.n == 0:
        return "-"
    return f"{m.mean:.3f}" if m.n == 1 else f"{m.mean:.3f} [{m.ci_lo:.3f}, {m.ci_hi:.3f}]"


TRAINABLE_PAPER = {"all": "reference", "non_moe": "about as good as all", "moe": "much worse",
                   "attention": "- (not in PAPER.md)", "ffn": "as good as all"}


def table_finetune_trainable(configs) -> str:
    """Which parameters to fine-tune (ST-MoE Table 6), each subset against `all`, paired by seed."""
    ref = next((c for c in configs if c.value("finetune.trainable") == "all"), None)
    rv = finetune_values(ref)["test"] if ref else {}
    rb = finetune_values(ref)["best_val"] if ref else {}
    out = ["| parameters updated | paper (ST-MoE Table 6, SuperGLUE) | lab configuration | stable / diverged / "
           "failed to learn | test loss, mean +- SD | test loss - all's, mean [95% CI] (paired by seed) | "
           f"p ({_test_name(configs)}) | seeds for 80% power | best validation loss - all's (the paper's best "
           "checkpoint), mean [95% CI] | p | seeds for 80% power |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for which, paper in TRAINABLE_PAPER.items():
        rows = [c for c in configs if c.value("finetune.trainable") == which]
        if not rows:
            out.append(f"| {which} | {paper} | not run | - | - | - | - | - | - | - | - |")
        for c in rows:
            v, b = finetune_values(c)["test"], finetune_values(c)["best_val"]
            cmp = " reference | - | - | reference | - | - |" if c is ref else (
                _pd_cells(stats.paired_difference(v, rv, test=c.paired_test))
                + _pd_cells(stats.paired_difference(b, rb, test=c.paired_test)))
            out.append(f"| {which} | {paper} | {c.label} | {_outcome_cell(c)} | {_mi_cell(v.values())} |" + cmp)
    return (FINETUNE_NOTE + " Frozen parameters get a zero update through optax (no optimiser state).\n\n"
            + "\n".join(out))


def table_finetune_capacity(configs) -> str:
    """Train capacity factor x load-balancing loss during fine-tuning (ST-MoE Table 5)."""
    base = next((c for c in configs if c.value("train.label") == "baseline"), None) or max(
        configs, key=lambda c: (c.value("model.train_capacity_factor", 0), c.value("model.load_balance_coef", 0)))
    bv, bb = finetune_values(base)["test"], finetune_values(base)["best_val"]
    out = ["| train CF | load-balancing loss (c_B) | dropped tokens (train, final; mean over sparse layers) | "
           "stable / diverged / failed to learn | test loss, mean +- SD | test loss - baseline's, mean [95% CI] "
           f"(paired by seed) | p ({_test_name(configs)}) | seeds for 80% power | best validation loss - "
           "baseline's, mean [95% CI] | p | seeds for 80% power |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_cf: dict[float, dict[bool, ConfigResult]] = {}
    for c in sorted(configs, key=lambda c: (-c.value("model.train_capacity_factor", 0),
                                            -c.value("model.load_balance_coef", 0))):
        cf, coef = c.value("model.train_capacity_factor"), c.value("model.load_balance_coef")
        by_cf.setdefault(cf, {})[bool(coef)] = c
        v, b = finetune_values(c)["test"], finetune_values(c)["best_val"]
        cmp = " baseline | - | - | baseline | - | - |" if c is base else (
            _pd_cells(stats.paired_difference(v, bv, test=c.paired_test))
            + _pd_cells(stats.paired_difference(b, bb, test=c.paired_test)))
        dropped = _final(c, "router_dropped_token_fraction", np.nanmean)
        out.append(f"| {cf:g} | {'on' if coef else 'off'} ({coef:g}) | {_fmt(dropped)} | {_outcome_cell(c)} | "
                   f"{_mi_cell(v.values())} |" + cmp)
    out += ["", "The load-balancing loss during fine-tuning, at each train CF (without minus with: positive = the "
            "loss helps):", "", f"| train CF | test loss without - with, mean [95% CI] | p ({_test_name(configs)}) | "
            "seeds for 80% power | best validation loss without - with | p | seeds for 80% power |",
            "|---|---|---|---|---|---|---|"]
    for cf, pair in by_cf.items():
        if True in pair and False in pair:
            off, on = finetune_values(pair[False]), finetune_values(pair[True])
            out.append(f"| {cf:g} |" + "".join(_pd_cells(stats.paired_difference(off[k], on[k], test=pair[True].paired_test))
                                              for k in ("test", "best_val")))
    paper = ("ST-MoE Table 5 (PAPER.md section 8): dropping up to about 10-15% of tokens during fine-tuning barely "
             "hurts, and the auxiliary load-balancing loss helps fine-tuning. ST-MoE counts dropped TOKENS (no "
             "expert processed them), as this table does; padding takes no capacity and is not counted.")
    return paper + " " + FINETUNE_NOTE + "\n\n" + "\n".join(out)


# -- the precision sensitivity map (issue 14, item 6) ---------------------------------------------------------
#
# A sweep over `policy.traced_group` (a component group) x `policy.traced_format` (an IEEE-style eXmY) with the
# rest float32 (experiments/sensitivity_map.toml). Each group's reference is its own e8m23 row (float32 into
# e8m23 changes no value; it trains in the same compiled program), else a configuration without a traced group
# (float32). Gaps are final eval loss minus the reference's, paired by seed over seeds stable in both.

SENSITIVITY_TOLERANCE = 0.01  # nats per target token: "within 0.01 nats of float32" (issue 14)
SENSITIVITY_MANTISSA_EXPONENT = 8  # the mantissa sweep's exponent width (float32's range)
SENSITIVITY_EXPONENT_MANTISSA = 3  # the exponent sweep's mantissa width


@dataclasses.dataclass
class SensitivityCell:
    """One (component group, format) configuration against its group's float32 reference."""

    group: str
    format: str
    exponent_bits: int
    mantissa_bits: int
    config: ConfigResult
    gap: stats.PairedDifference
    flip_rate: float | None  # routing decisions that differ from a float32 shadow router (last 10 steps)

    @property
    def all_stable(self) -> bool:
        """Every seed trained to the end and learned (no divergence, no failure to learn)."""
        return self.config.all_learned

    @property
    def failed(self) -> bool:
        """Some seed diverged or failed to learn (marked x in the map)."""
        return self.config.n > 0 and not self.all_stable

    @property
    def shown_within(self) -> bool:
        """Shown within tolerance: every seed stable and the paired 95% CI's upper end <= +0.01 nats."""
        return self.all_stable and self.gap.n >= 2 and self.gap.ci_hi <= SENSITIVITY_TOLERANCE

    @property
    def point_within(self) -> bool:
        """Point estimate within tolerance: every seed stable and the mean paired gap <= +0.01 nats."""
        return self.all_stable and self.gap.n >= 1 and self.gap.mean <= SENSITIVITY_TOLERANCE

    @property
    def ci_excludes_zero(self) -> bool:
        return self.gap.n >= 2 and (self.gap.ci_lo > 0 or self.gap.ci_hi < 0)


def traced_point(c: ConfigResult) -> tuple[str | None, str | None]:
    """(traced group, traced format) of a configuration: its axis values, else its sweep config's policy."""
    policy = c.config.get("policy") if isinstance(c.config, dict) else None
    table = policy if isinstance(policy, dict) else {}
    return (c.overrides.get("policy.traced_group", table.get("traced_group")),
            c.overrides.get("policy.traced_format", table.get("traced_format")))


def _is_reference(fmt: str) -> bool:
    f = get_format(fmt)
    return (f.exponent_bits, f.mantissa_bits) == (8, 23)


def sensitivity_map(configs: list[ConfigResult]) -> dict[str, dict[str, SensitivityCell]]:
    """{group: {format: cell}} in sweep order, reference rows left out (they are the zero of each group)."""
    points = [(c, *traced_point(c)) for c in configs]
    fallback = next((c for c, g, _ in points if g is None), None)  # a plain float32 row, if the sweep has one
    refs = {g: c for c, g, f in points if g is not None and f is not None and _is_reference(f)}
    out: dict[str, dict[str, SensitivityCell]] = {}
    for c, group, fmt in points:
        if group is None or fmt is None or _is_reference(fmt):
            continue
        ref = refs.get(group, fallback)
        gap = stats.paired_difference(c.eval_by_seed(), ref.eval_by_seed() if ref is not None else {},
                                      test=c.paired_test)
        f = get_format(fmt)
        flip = _final(c, "router_flip_rate", np.nanmean)
        out.setdefault(group, {})[fmt] = SensitivityCell(group, fmt, f.exponent_bits, f.mantissa_bits, c, gap, flip)
    return out


def sensitivity_axes(cells: dict[str, SensitivityCell]) -> tuple[dict[int, SensitivityCell], dict[int, SensitivityCell]]:
    """A group's cells on the two sweeps: ({mantissa bits: cell} at 8 exponent bits, {exponent bits: cell} at
    3 mantissa bits), each sorted by bits."""
    mant = {c.mantissa_bits: c for c in cells.values() if c.exponent_bits == SENSITIVITY_MANTISSA_EXPONENT}
    expo = {c.exponent_bits: c for c in cells.values() if c.mantissa_bits == SENSITIVITY_EXPONENT_MANTISSA}
    return dict(sorted(mant.items())), dict(sorted(expo.items()))


def fewest_bits(axis: dict[int, SensitivityCell], rule: Callable[[SensitivityCell], bool]) -> int | None:
    """The fewest bits b of the grid such that the cell at b and every cell with more bits satisfy `rule`
    (a lucky pass below a failing width does not count); None if not even the widest does."""
    bits = sorted(axis)
    ok = [b for b in bits if all(rule(axis[w]) for w in bits if w >= b)]
    return min(ok) if ok else None


def _bits_cell(axis: dict[int, SensitivityCell], rule) -> str:
    if not axis:
        return "-"
    b = fewest_bits(axis, rule)
    if b is None:
        return f"none (> {max(axis)})"
    return f"{b}" + (" (fewest tried)" if b == min(axis) else "")


def _gap_mark(cell: SensitivityCell) -> str:
    if cell.config.n and not cell.config.stable:
        return "x (all diverged)"
    if cell.gap.n == 0:
        return "x (no stable seed)"
    text = f"{cell.gap.mean:+.3f}" + ("*" if cell.ci_excludes_zero else "")
    return text + (f" x{cell.config.n - cell.config.outcome_counts()['stable']}" if cell.failed else "")


def table_sensitivity_map(configs) -> str:
    """Per component group, the fewest mantissa bits (at 8 exponent bits) and exponent bits (at 3 mantissa
    bits) within 0.01 nats of float32, by two stated rules; then every cell's gap, and the router's flip rate."""
    grid = sensitivity_map(configs)
    if not grid:
        return "No configuration sets policy.traced_group and policy.traced_format: no map."
    tol = SENSITIVITY_TOLERANCE
    rule = (f"Gap = final eval loss minus the group's float32 reference (its e8m23 row), paired by seed over seeds "
            f"stable in both. A cell is *shown within* {tol} nats when every seed is stable and the upper end of the "
            f"paired 95% t-interval is <= +{tol}; *within by point estimate* when every seed is stable and the mean "
            f"gap is <= +{tol} (each group's median CI half-width is in the last column). Fewest bits: the smallest width b such that b and every "
            "wider width on that sweep satisfy the rule (\"none\": not even the widest tried).")
    head = ["| group | fewest mantissa bits at e8: shown within | by point estimate | fewest exponent bits at m3: "
            "shown within | by point estimate | cells with a diverged or failed seed | median paired CI half-width |",
            "|---|---|---|---|---|---|---|"]
    for group, cells in grid.items():
        mant, expo = sensitivity_axes(cells)
        failed = [c.format for c in cells.values() if c.failed]
        half = [(c.gap.ci_hi - c.gap.ci_lo) / 2 for c in cells.values() if c.gap.n >= 2 and math.isfinite(c.gap.ci_hi)]
        head.append(f"| {group} | {_bits_cell(mant, lambda c: c.shown_within)} | "
                    f"{_bits_cell(mant, lambda c: c.point_within)} | {_bits_cell(expo, lambda c: c.shown_within)} | "
                    f"{_bits_cell(expo, lambda c: c.point_within)} | {', '.join(failed) or '-'} | "
                    f"{_fmt(float(np.median(half)) if half else None)} |")
    formats = list(dict.fromkeys(f for cells in grid.values() for f in cells))
    cells_head = ["| format |" + "".join(f" {g} |" for g in grid) + " router flip rate |",
                  "|---|" + "---|" * (len(grid) + 1)]
    for fmt in formats:
        row = f"| {fmt} |" + "".join(f" {_gap_mark(grid[g][fmt]) if fmt in grid[g] else '-'} |" for g in grid)
        router = grid.get("router", {}).get(fmt)
        cells_head.append(row + f" {_fmt(router.flip_rate, 4) if router is not None else '-'} |")
    legend = ("Each cell: mean paired gap in nats (* its 95% CI excludes 0; xK: K seeds diverged or failed to learn). "
              "Router flip rate: the fraction of routing decisions that differ from a float32 shadow router with "
              "the same weights and inputs (mean over the last 10 steps, seeds and sparse layers), in the router "
              "group's row of each format.")
    return "\n".join([rule, "", *head, "", legend, "", *cells_head])


TABLES: dict[str, Callable[[list[ConfigResult]], str]] = {
    "summary": table_summary,
    "stability": table_stability,
    "selective_precision": table_selective_precision,
    "capacity_factor": table_capacity_factor,
    "z_loss": table_z_loss,
    "router": table_router,
    "router_overflow": table_router_overflow,
    "precision_telemetry": table_precision_telemetry,
    "lr_sensitivity": table_lr_sensitivity_with_intervals,
    "specialization": table_specialization,
    "num_experts": table_num_experts,
    "backends": table_backends,
    "precondition": table_precondition,
    "budget": table_budget,
    "finetune": table_finetune,
    "finetune_overfitting": table_finetune_overfitting,
    "finetune_hparams": table_finetune_hparams,
    "finetune_trainable": table_finetune_trainable,
    "finetune_capacity": table_finetune_capacity,
    "onset": table_onset,
    "precursors": table_precursors,
    "sensitivity_map": table_sensitivity_map,
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


def write_report(out_dir: str | Path, fig_dir: str | Path | None = None, *, paired_test: str = "t") -> Path:
    """Write out_dir/report.md (figures into fig_dir, default out_dir/figures) and return its path.

    paired_test: "t" (paired t) or "wilcoxon" (Wilcoxon signed-rank) for every paired comparison."""
    if paired_test not in stats.PAIRED_TESTS:
        raise unknown_choice("paired test", paired_test, stats.PAIRED_TESTS)
    manifest, configs = load_sweep_results(out_dir)
    for c in configs:
        c.paired_test = paired_test
    name = manifest.get("name", Path(out_dir).name)
    report_cfg = manifest.get("report", {})
    named = [t for t in report_cfg.get("tables", []) if t not in ("summary", "precondition", "budget")]
    # Every report: its preconditions first, then the summary, the tables the sweep names, and the training
    # budget and noise.
    tables = ["precondition", "summary", *named, "budget"]
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
    lines += _partial_note(manifest, runs)
    best = next((r["env"].get("best_loss") for r in runs if r["env"].get("best_loss") is not None), None)
    if best is not None:
        stderr = runs[0]["env"].get("best_loss_stderr")
        lines += [f"Best possible loss of the synthetic data on this objective (Bayes predictor): {best:.4f}"
                  + (f" +- {stderr:.4f} (Monte Carlo standard error)" if stderr else "")
                  + " nats/token" + ("" if runs[0]["env"].get("entropy_rate") is None else  # a fine-tuning task has none
                                       f" (entropy rate {runs[0]['env']['entropy_rate']:.4f})") + ".", ""]
    unigram = sorted({round(r["env"]["unigram_loss"], 4) for r in runs if r["env"].get("unigram_loss") is not None})
    base = baseline_of(configs)
    lines += [
        "Outcomes per seed: *stable* (trained to the end and learned), *diverged* (a divergence rule fired; the "
        "summary gives the step and rule), *failed to learn* (final eval loss at or above the unigram-model loss"
        + (f", {', '.join(f'{u:.4f}' for u in unigram)} nats/token here" if unigram else
           "; not known for these runs, so none is counted") + "). Quality is compared over stable seeds only.",
        "",
        f"Comparisons: every row against the baseline row **{base.label}**, paired by seed (seed s of every "
        f"configuration sees the same data), mean difference with its 95% t-interval and a two-sided p-value "
        f"({stats.PAIRED_TESTS[paired_test]}; scipy.stats); fractions not diverged with Fisher's exact test "
        "(two-sided). \"Seeds for 80% power\": seeds per arm that would detect the observed difference 80% of "
        "the time at alpha 0.05 (noncentral t for the paired test, exact enumeration for Fisher); \"-\" where "
        "the observed difference is 0. \"+-\" is one sample SD across seeds; intervals in brackets are 95% CIs; "
        "fractions stable carry Clopper-Pearson 95% intervals.",
        ""]
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
