"""Figures: matplotlib plots of roundoff analyses and sweep results (PNG and SVG, labelled axes)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402

from precision_lab.formats import FORMATS, roundoff_per_binade  # noqa: E402


def save(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Write `fig` as STEM.png and STEM.svg into out_dir; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def roundoff_per_binade_figure(out_dir: str | Path, formats: list[str] | None = None) -> list[Path]:
    """Maximum absolute roundoff per binade for every format: one ulp (as ST-MoE prints it) solid,
    the round-to-nearest bound (half an ulp) dashed."""
    names = formats or [n for n in FORMATS if n != "e8m0"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        rows = roundoff_per_binade(FORMATS[name], lo=-10, hi=31)
        if not rows:
            continue
        xs = [math.log2(r["binade_lo"]) for r in rows]
        line, = ax.step(xs, [r["one_ulp"] for r in rows], where="post", label=f"{name} (one ulp)")
        ax.step(xs, [r["half_ulp"] for r in rows], where="post", ls="--", color=line.get_color(), alpha=0.6)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("binade: log2 of its lower end, |x| in [2^k, 2^(k+1))")
    ax.set_ylabel("maximum absolute roundoff (solid: one ulp; dashed: half ulp, round-to-nearest)")
    ax.set_title("Maximum roundoff per binade, per format")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, out_dir, "roundoff_per_binade")


# -- roundoff analyses (precision_lab.roundoff): each takes the analysis's rows ---------------------------------

from matplotlib import ticker as _ticker  # noqa: E402


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Group rows by the values of `keys`, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _colors(names) -> dict:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[i % len(cycle)] for i, n in enumerate(dict.fromkeys(names))}


def roundoff_table_figure(rows: list[dict], out_dir: str | Path, stem: str = "roundoff_table") -> list[Path]:
    """`roundoff.binade_table` rows: analytic one ulp (solid) and half ulp (dashed) per binade, the measured
    maxima (o: round-to-nearest, x: toward zero) and ST-MoE's printed values (black stars)."""
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = _colors(r["format"] for r in rows)
    for (name,), rs in _by(rows, "format").items():
        k = [r["k"] for r in rs]
        c = colors[name]
        ax.plot(k, [r["one_ulp"] for r in rs], color=c, lw=1.2, label=f"{name}: one ulp (solid), half ulp (dashed)")
        ax.plot(k, [r["half_ulp"] for r in rs], color=c, lw=1.0, ls="--")
        ax.plot(k, [r["measured_nearest"] for r in rs], "o", color=c, ms=3, mfc="none")
        ax.plot(k, [r["measured_toward_zero"] for r in rs], "x", color=c, ms=3)
    paper = [r for r in rows if r.get("paper") is not None]
    if paper:
        ax.plot([r["k"] for r in paper], [r["paper"] for r in paper], "*", color="black", ms=10, mfc="none",
                label="ST-MoE printed value (one ulp)")
    ax.plot([], [], "o", color="gray", mfc="none", ms=4, label="measured max, round to nearest even")
    ax.plot([], [], "x", color="gray", ms=4, label="measured max, round toward zero")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("binade k: |x| in [2^k, 2^(k+1))")
    ax.set_ylabel("maximum absolute roundoff |round(x) - x| (same units as x)")
    ax.set_title("Maximum roundoff per binade: analytic and measured with quantize()")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return save(fig, out_dir, stem)


def exp_error_figure(rows: list[dict], out_dir: str | Path, stem: str = "exp_error") -> list[Path]:
    """`roundoff.exp_error` rows: max (solid, markers) and median (dotted) relative error of exp per |x| bin,
    and the analytic bound (1+u) exp(|x| u) - 1 (dashed), per format."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 6))
    colors = _colors(r["format"] for r in rows)
    for (name,), rs in _by(rows, "format").items():
        c = colors[name]
        mid = [math.sqrt(r["bin_lo"] * r["bin_hi"]) if r["bin_lo"] > 0 else r["bin_hi"] / 2 for r in rs]
        ax.plot(mid, [r["max_rel_err"] for r in rs], "o-", color=c, ms=3, label=f"{name}: max")
        ax.plot(mid, [r["median_rel_err"] for r in rs], ":", color=c, lw=1)
        u = 2.0 ** -(rs[0]["mantissa_bits"] + 1)
        xs = np.geomspace(max(rs[0]["bin_lo"], 1e-3), rs[-1]["bin_hi"], 200)
        ax.plot(xs, (1 + u) * np.exp(xs * u) - 1, "--", color=c, lw=1)
    ax.plot([], [], ":", color="gray", label="median (dotted)")
    ax.plot([], [], "--", color="gray", label="bound (1+u) exp(|x| u) - 1, u = 2^-(m+1) (dashed)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(_ticker.NullLocator())
    ax.set_xlabel("|x| (input of exp, bins of half an octave)")
    ax.set_ylabel("relative error of exp(x) vs float64")
    ax.set_title("exp(x) with input and output rounded to the format (emulate mode)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, out_dir, stem)


def _mark_nonfinite(ax, xs, ys, color):
    """Points whose value is not finite (overflow) as x markers along the top edge of the axes."""
    bad = [x for x, y in zip(xs, ys) if not math.isfinite(y)]
    if bad:
        ax.plot(bad, [0.97] * len(bad), "x", color=color, transform=ax.get_xaxis_transform(), clip_on=False)


def softmax_error_figure(rows: list[dict], out_dir: str | Path, stem: str = "softmax_error") -> list[Path]:
    """`roundoff.softmax_error` rows: one figure per number of experts; columns = (max-shift, mean shift),
    rows = median over tokens of the all-expert and of the top-1 relative error; lines = format (colour) and
    mode (solid emulate, dashed native)."""
    paths: list[Path] = []
    colors = _colors(r["format"] for r in rows)
    for (num_experts,), rs_e in _by(rows, "num_experts").items():
        variants = list(_by(rs_e, "shift", "mean_shift"))
        fig, axes = plt.subplots(2, len(variants), figsize=(4.2 * len(variants), 7.5), sharex=True, squeeze=False)
        for j, (shift, mean_shift) in enumerate(variants):
            for i, (metric, what) in enumerate((("all_median", "worst expert with p >= floor"),
                                                ("top1_median", "top-1 expert"))):
                ax = axes[i, j]
                for (name, mode), rs in _by([r for r in rs_e if r["shift"] == shift and r["mean_shift"] == mean_shift],
                                            "format", "mode").items():
                    xs = [r["scale"] for r in rs]
                    ys = [r[metric] for r in rs]
                    label = f"{name} {mode}" + ("" if mode == "emulate" or rs[0]["native_dtype"] else " (emulated)")
                    ax.plot(xs, [y if math.isfinite(y) and y > 0 else float("nan") for y in ys],
                            "o-" if mode == "emulate" else "s--", ms=3, color=colors[name], label=label,
                            alpha=1.0 if mode == "emulate" else 0.7)
                    _mark_nonfinite(ax, xs, ys, colors[name])
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.yaxis.set_minor_locator(_ticker.NullLocator())  # ten decades: minor ticks only cost time
                ax.grid(True, which="major", alpha=0.3)
                ax.set_title(f"shift={shift}, mean shift={mean_shift:g} x scale", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"relative error, {what}\n(median over tokens)")
                if i == 1:
                    ax.set_xlabel("logit scale (std of router logits)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.suptitle(f"Router softmax in the format vs float64, {num_experts} experts "
                     "(x at the top: non-finite probabilities, exp overflow)")
        fig.tight_layout(rect=(0, 0.06, 1, 0.97))
        paths += save(fig, out_dir, f"{stem}_E{num_experts}")
    return paths


def flip_rate_figure(rows: list[dict], out_dir: str | Path, stem: str = "flip_rate") -> list[Path]:
    """`roundoff.flip_rate` rows: fraction of tokens whose top-k routing changes, one panel per k; lines =
    format (colour) and variant (mode, max-shift, mean shift); dotted = ties at the selection boundary."""
    ks = sorted({r["k"] for r in rows})
    colors = _colors(r["format"] for r in rows)
    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 5), squeeze=False)
    variants = list(_by(rows, "mode", "shift", "mean_shift"))
    styles = ["o-", "s--", "^-.", "v:", "d-", "p--", "h-.", "*:"]
    for ax, k in zip(axes[0], ks):
        for (name, mode, shift, ms), rs in _by([r for r in rows if r["k"] == k], "format", "mode", "shift",
                                                "mean_shift").items():
            style = styles[variants.index((mode, shift, ms)) % len(styles)]
            label = name if len(variants) == 1 else f"{name} {mode} shift={shift} mean shift={ms:g}"
            xs = [r["scale"] for r in rs]
            ax.plot(xs, [r["flip_rate"] for r in rs], style, ms=4, color=colors[name], label=label)
            ax.plot(xs, [r["tie_frac"] for r in rs], ":", lw=0.8, color=colors[name])
        ax.plot([], [], ":", color="gray", label="tokens with a tie at the k-th place (dotted)")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("logit scale (std of router logits)")
        ax.set_ylabel(f"fraction of tokens whose top-{k} {'expert' if k == 1 else 'set'} changes")
        ax.set_title(f"top-{k} routing in the format vs float64 ({rs[0]['num_experts']} experts, "
                     f"{rs[0]['tokens']} tokens)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Routing flips caused by rounding the router logits and softmax (ties: lowest index first)")
    return save(fig, out_dir, stem)


def allreduce_error_figure(rows: list[dict], out_dir: str | Path, stem: str = "allreduce_error") -> list[Path]:
    """`roundoff.allreduce_error` rows: relative L2 error of the ring all-reduce sum vs float64 against the
    number of replicas, per format (solid, markers), with the worst-case bound R u (dashed)."""
    colors = _colors(r["format"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 5))
    for (name,), rs in _by(rows, "format").items():
        rs = sorted(rs, key=lambda r: r["replicas"])
        xs = [r["replicas"] for r in rs]
        ax.plot(xs, [r["rel_l2"] for r in rs], "o-", color=colors[name], label=f"{name}: measured")
        ax.plot(xs, [r["bound_rel_l2"] for r in rs], "--", color=colors[name], lw=0.8, label=f"{name}: bound R u")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("replicas R (ring all-reduce: R - 1 rounded partial sums)")
    ax.set_ylabel("relative L2 error of the summed gradient vs float64")
    ax.set_title(f"Gradient all-reduce roundoff ({rows[0]['size']} elements over {rows[0]['spread_decades']:g} "
                 f"decades, noise {rows[0]['noise']:g}x signal)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out_dir, stem)


def footnote_figure(rows: list[dict], out_dir: str | Path, stem: str = "footnote") -> list[Path]:
    """`roundoff.footnote_example` rows: softmax probability of the 128.5 logit per format (max-shift, each
    mode), the exact value and ST-MoE's printed numbers; formats whose unshifted softmax overflows say so."""
    shifted = [r for r in rows if r["shift"]]
    modes = list(dict.fromkeys(r["mode"] for r in shifted))
    names = list(dict.fromkeys(r["format"] for r in shifted))
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 5))
    width = 0.8 / max(len(modes), 1)
    for m, mode in enumerate(modes):
        ps = [next((r["p"] for r in shifted if r["format"] == n and r["mode"] == mode), float("nan")) for n in names]
        xs = [i + (m - (len(modes) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [p if math.isfinite(p) else 0.0 for p in ps], width, label=f"{mode} (max-shift)")
        for x, p in zip(xs, ps):
            ax.annotate(f"{p:.4f}" if math.isfinite(p) else "NaN", (x, p / 2 if math.isfinite(p) else 0.0),
                        ha="center", va="center", fontsize=7, rotation=90, color="white" if math.isfinite(p) else "k")
    exact = rows[0]["exact"]
    ax.axhline(exact, color="black", lw=1, label=f"exact (float64) {exact:.4f}")
    ax.axhline(0.142, color="black", ls="--", lw=0.8, label="ST-MoE: exact 0.142")
    ax.axhline(0.091, color="red", ls="--", lw=0.8, label="ST-MoE: bf16 0.091")
    unshifted_nan = sorted({r["format"] for r in rows if not r["shift"] and not math.isfinite(r["p"])})
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("softmax probability of the 128.5 logit")
    ax.set_title("ST-MoE footnote: ten logits of 128, one of 128.5"
                 + (f"\nwithout the max-shift exp overflows (NaN) in: {', '.join(unshifted_nan)}" if unshifted_nan
                    else ""), fontsize=9)
    ax.set_ylim(0, 0.2)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    return save(fig, out_dir, stem)


# -- sweep figures (read ConfigResults from precision_lab.report; never train) -------------------------------


def accumulator_error_figure(rows: list[dict], out_dir: str | Path, stem: str = "accumulator_error") -> list[Path]:
    """`roundoff.accumulator_error` rows: one figure per (distribution, rounding); columns = input format,
    rows = max and median relative error over the dot products vs K (log-log); colour = accumulator
    significant bits, solid = never promoted, dashed = promoted to float32 every N elements. The star is
    DeepSeek-V3's reported point (about 2% maximum at K = 4096 with about 14 bits, H800 FP8)."""
    from precision_lab.roundoff import PAPER_ACCUMULATOR

    paths: list[Path] = []
    inputs = list(dict.fromkeys(r["input_format"] for r in rows))
    bits = sorted({r["significant_bits"] for r in rows})
    cmap = plt.get_cmap("viridis")
    colors = {b: cmap(i / max(1, len(bits) - 1)) for i, b in enumerate(bits)}
    for (dist, rounding), rs in _by(rows, "distribution", "rounding").items():
        fig, axes = plt.subplots(2, len(inputs), figsize=(5.5 * len(inputs), 8), sharex=True, squeeze=False)
        for j, fmt in enumerate(inputs):
            for (b, promote), cs in _by([r for r in rs if r["input_format"] == fmt], "significant_bits",
                                        "promote_every").items():
                cs = sorted(cs, key=lambda r: r["k"])
                style = "--" if promote else "-"
                label = f"{b} bits" + (f", promote every {promote}" if promote else "")
                for i, key in enumerate(("max_rel_err", "median_rel_err")):
                    ys = [max(r[key], 1e-12) for r in cs]  # an exact result (0) drawn at the floor
                    axes[i, j].plot([r["k"] for r in cs], ys, style, marker="o", ms=3, color=colors[b], label=label)
            for i, what in enumerate(("max", "median")):
                ax = axes[i, j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                ax.set_title(f"{fmt} inputs: {what} over {cs[0]['dots']} dot products", fontsize=9)
                ax.set_ylabel("|result - exact| / sum |a b|" if dist == "normal" else "relative error vs float64")
                if what == "max":
                    ax.plot([PAPER_ACCUMULATOR["k"]], [PAPER_ACCUMULATOR["max_rel_err"]], "*", color="red", ms=12,
                            label="DeepSeek-V3: ~2% at K=4096, ~14 bits (H800 FP8)")
            axes[-1, j].set_xlabel("K (dot product length)")
        axes[0, 0].legend(fontsize=6, ncol=2)
        fig.suptitle(f"Narrow matmul accumulator (blocks of {rs[0]['block']} products, {rounding}), "
                     f"{dist} inputs", fontsize=10)
        fig.tight_layout()
        paths += save(fig, out_dir, f"{stem}_{dist}_{rounding}")
    return paths


def _curves(configs, metric: str, reduce_layers, out_dir, stem, ylabel: str, title: str, logy: bool = False):
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for c in configs:
        m = c.metric(metric)
        if m.size == 0:
            continue
        if m.ndim == 3:  # (seeds, steps, layers)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # frozen seeds are all-NaN rows
                m = reduce_layers(m, axis=2)
        steps = np.arange(1, m.shape[1] + 1)
        with np.errstate(all="ignore"):
            mid = np.nanmedian(m, axis=0)
            lo, hi = np.nanmin(m, axis=0), np.nanmax(m, axis=0)
        line, = ax.plot(steps, mid, label=f"{c.label} ({c.stable}/{c.n} stable)", lw=1.2)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out_dir, stem)


# Per-step curves: metric, how sparse layers combine, y label, title, log scale.
CURVES = {
    "loss_curves": ("loss", "mean", "training loss (nats/token; median over seeds, band = min..max)",
                    "Training loss per configuration", True),
    "router_logits": ("router_max_abs_logit", "max", "max |router logit| over sparse layers", "Router logit growth",
                      False),
    "router_lse": ("router_mean_lse_sq", "mean", "mean logsumexp(router logits)^2 (the z-loss)",
                   "Router z-loss over training", True),
    "flip_rate": ("router_flip_rate", "mean", "routing flip rate vs float32 shadow router (fraction of tokens)",
                  "Routing flips from precision", False),
    "dropped": ("router_dropped_token_fraction", "mean", "dropped tokens (no expert processed them)",
                "Tokens dropped by capacity", False),
    "dropped_assignments": ("router_dropped_assignment_fraction", "mean", "dropped token-expert assignments",
                            "Expert assignments dropped by capacity", False),
    # train.precision_telemetry (issue 14): where precision fails, per step
    "lost_updates": ("lost_update_frac", "mean", "lost updates: nonzero intended update, master unchanged",
                     "Updates cancelled by the master-weight format", False),
    "applied_update_ratio": ("applied_update_ratio", "mean", "sum |applied update| / sum |intended update|",
                             "Update that reached the master weights", False),
    "grad_underflow": ("underflow_frac/grads", "mean", "gradient elements flushed to zero (of nonzero)",
                       "Gradient underflow in the grads format", False),
    "allreduce_error": ("allreduce_rel_error", "mean", "||all-reduced grad - float32 sum|| / ||float32 sum||",
                        "Gradient all-reduce roundoff", True),
    "grad_overflow": ("overflow_frac/grads", "mean", "gradient elements overflowed or saturated (of finite)",
                      "Gradient overflow in the grads format", False),
}


def curve_figure(name: str):
    """The figure function of one entry of CURVES."""
    import numpy as np

    metric, layers, ylabel, title, logy = CURVES[name]
    reduce = np.nanmax if layers == "max" else np.nanmean

    def figure(configs, out_dir, stem):
        return _curves(configs, metric, reduce, out_dir, stem, ylabel, title, logy=logy)

    return figure


def lr_sweep_figure(configs, out_dir, stem):
    """Final held-out loss vs peak learning rate, one line per configuration without its lr: the mean over
    stable seeds with its 95% t-interval (error bars, as the report's lr table); dotted: a seed diverged."""
    import numpy as np

    from precision_lab.report import lr_lines
    from precision_lab.stats import mean_interval

    lines = lr_lines(configs)
    many = len(lines) > 8  # the legend goes beside the axes, and line styles tell the colour cycle's repeats apart
    fig, ax = plt.subplots(figsize=(13 if many else 8, 5))
    for i, (name, cs) in enumerate(lines.items()):
        lrs = [c.value("optim.lr") for c in cs]
        m = [mean_interval(c.eval_losses()) for c in cs]
        means = np.array([x.mean for x in m])
        # one stable seed has no interval: its bar is left out (NaN), the point stays
        err = np.array([[x.mean - x.ci_lo for x in m], [x.ci_hi - x.mean for x in m]])
        line = ax.errorbar(lrs, means, yerr=np.where(np.isfinite(err), err, 0.0), marker="o", capsize=3,
                           label=name, ls=("-", "--", ":", "-.")[(i // 10) % 4]).lines[0]
        for lr, c in zip(lrs, cs):
            if c.stable < c.n:
                ax.axvline(lr, color=line.get_color(), ls=":", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final held-out loss (nats/token; mean over stable seeds, bars: 95% CI)")
    ax.set_title("Loss vs learning rate (dotted vertical: a seed diverged at that lr)")
    ax.grid(True, which="both", alpha=0.3)
    if many:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
    else:
        ax.legend(fontsize=7)
    return save(fig, out_dir, stem)


def fraction_stable_figure(configs, out_dir, stem):
    import numpy as np

    from precision_lab.stats import clopper_pearson

    fig, ax = plt.subplots(figsize=(max(6, len(configs) * 0.8), 4.5))
    fracs = [c.stable / c.n for c in configs]
    ci = [clopper_pearson(c.stable, c.n) for c in configs]
    x = np.arange(len(configs))
    ax.bar(x, fracs, color="tab:blue", alpha=0.7)
    ax.errorbar(x, fracs, yerr=[[f - lo for f, (lo, _) in zip(fracs, ci)], [hi - f for f, (_, hi) in zip(fracs, ci)]],
                fmt="none", color="k", capsize=3)
    ax.set_xticks(x, [c.label for c in configs], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of seeds stable (95% Clopper-Pearson)")
    ax.set_title("Fraction stable per configuration")
    return save(fig, out_dir, stem)


def sentinel_entropy_figure(configs, out_dir, stem):
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in configs:
        m = c.metric("router_sentinel_entropy")
        if m.size == 0:
            continue
        final = np.nanmean(m[:, -10:], axis=(0, 1))
        ax.plot(np.arange(final.size), final, marker="o", label=f"{c.label}: training telemetry")
    from precision_lab.report import routing_stats_of
    from precision_lab.stats import mean_interval

    for c in configs:  # after training, held-out batches (train.routing_stats_batches): 95% CI over seeds
        per_seed = list(routing_stats_of(c).values())
        if not per_seed:
            continue
        for name, style, what in (("sentinel_entropy", "s-", "final params, held-out"),
                                  ("sentinel_entropy_null", "x--", "null: random token subsets")):
            cis = [mean_interval([layers[j][name] for layers in per_seed]) for j in range(len(per_seed[0]))]
            x = np.arange(len(cis))
            mean = np.array([ci.mean for ci in cis])
            err = np.array([[ci.mean - ci.ci_lo, ci.ci_hi - ci.mean] for ci in cis]).T
            ax.errorbar(x, mean, yerr=np.nan_to_num(err), fmt=style, capsize=3, label=f"{c.label}: {what} (95% CI)")
        ax.set_xticks(np.arange(len(per_seed[0])), [layer["layer"] for layer in per_seed[0]], fontsize=7)
    experts = {c.value("model.num_experts") for c in configs if c.value("model.num_experts")}
    for e in sorted(experts):
        ax.axhline(np.log(e), color="gray", ls=":", lw=1, label=f"uniform over {e} experts (ln {e})")
    ax.set_xlabel("sparse layer (encoder layers first, then decoder)")
    ax.set_ylabel("entropy of sentinel-token routing (nats)")
    ax.set_title("Expert specialisation of sentinel tokens (ST-MoE Table 14)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out_dir, stem)


def language_experts_figure(configs, out_dir, stem):
    """Heat maps, one per sparse layer: the fraction of each language's tokens whose top-1 expert is each
    expert, for the first seed of every configuration with routing statistics (train.routing_stats_batches;
    expert numbers are arbitrary per seed, so seeds are not pooled). Rows that look alike = experts do not
    specialise by language. The title of each map gives its language NMI and the permutation null."""
    import numpy as np

    from precision_lab.report import routing_stats_of

    panels = []
    for c in configs:
        per_seed = routing_stats_of(c)
        if per_seed:
            seed = min(per_seed)
            panels += [(c.label, seed, layer) for layer in per_seed[seed] if layer.get("language_expert")]
    if not panels:  # nothing recorded: an empty figure that says so
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no routing statistics recorded (train.routing_stats_batches = 0)", ha="center")
        ax.axis("off")
        return save(fig, out_dir, stem)
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax, (label, seed, layer) in zip(axes.flat, panels):
        table = np.asarray(layer["language_expert"], float)
        frac = table / np.maximum(table.sum(axis=1, keepdims=True), 1.0)
        im = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        nmi, null = layer.get("language_nmi"), layer.get("language_nmi_null")
        stat = "" if nmi is None else f"\nNMI {nmi:.3f} (null {null:.3f})"
        ax.set_title(f"{label}, seed {seed}: {layer['layer']}{stat}", fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("language", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8).set_label("fraction of the language's tokens", fontsize=7)
    fig.suptitle("Language x expert routing per sparse layer (ST-MoE section 7.3)", fontsize=9, y=1.0 + 0.12 / rows)
    return save(fig, out_dir, stem)


def num_experts_figure(configs, out_dir, stem):
    """Left: final eval loss (mean over stable seeds, 95% CI) against the number of experts, one line per
    number of experts per token (k); right: wall time per step of each configuration's group."""
    import numpy as np

    from precision_lab.report import _step_ms
    from precision_lab.stats import mean_interval

    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    lines: dict[int, list] = {}
    for c in configs:
        routing, top_k = c.value("model.routing"), c.value("model.top_k")
        k = {"top1": 1, "top2": 2, "top2-gshard": 2}.get(routing, top_k)
        lines.setdefault(k, []).append((c.value("model.num_experts"), mean_interval(c.eval_losses()), _step_ms(c)))
    for k, pts in sorted(lines.items()):
        pts.sort(key=lambda p: p[0])
        x = np.array([p[0] for p in pts], float)
        mean = np.array([p[1].mean for p in pts])
        err = np.nan_to_num(np.array([[p[1].mean - p[1].ci_lo, p[1].ci_hi - p[1].mean] for p in pts]).T)
        ax.errorbar(x, mean, yerr=err, fmt="o-", capsize=3, label=f"top-{k}")
        ax_t.plot(x, [p[2] for p in pts], "o-", label=f"top-{k}")
    for a in (ax, ax_t):
        a.set_xscale("log", base=2)
        a.set_xlabel("experts per sparse layer")
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    ax.set_ylabel("final eval loss (nats/token; mean, 95% CI)")
    ax.set_title("Quality vs number of experts (ST-MoE 5.1)")
    ax_t.set_ylabel("ms per step (vmapped group, shared CPU)")
    ax_t.set_title("Step time")
    fig.tight_layout()
    return save(fig, out_dir, stem)


def differences_figure(configs, out_dir, stem):
    """Each configuration's final eval loss minus the baseline's, paired by seed over stable seeds: the mean
    with its 95% CI (the report's comparison column), one bar per configuration; 0 = the baseline."""
    from precision_lab.report import baseline_of, comparison

    base = baseline_of(configs)
    others = [c for c in configs if c is not base]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.45 * len(others) + 1.5)))
    for y, c in enumerate(others):
        d, _ = comparison(c, base)
        if d.n == 0:
            continue
        color = "tab:red" if d.significant else "tab:blue"
        if d.n >= 2:
            ax.errorbar([d.mean], [y], xerr=[[d.mean - d.ci_lo], [d.ci_hi - d.mean]], fmt="o", color=color, capsize=3)
        else:
            ax.plot([d.mean], [y], "o", color=color, mfc="none")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(others)), [c.label for c in others], fontsize=7)
    ax.invert_yaxis()
    from precision_lab.stats import PAIRED_TESTS

    test = PAIRED_TESTS[configs[0].paired_test if configs else "t"]
    ax.set_xlabel(f"final eval loss - {base.label if base else 'baseline'}'s (nats/token; mean over seeds stable in "
                  f"both, 95% CI; red: p < 0.05, {test})")
    ax.set_title("Paired difference to the baseline row")
    ax.grid(True, axis="x", alpha=0.3)
    return save(fig, out_dir, stem)


def finetune_curves_figure(configs, out_dir, stem):
    """Fine-tuning curves of a sweep, one panel per task: per configuration the training cross entropy (thin,
    mean over the seeds that did not diverge, 10-step running mean) and the validation loss at each evaluation (thick, mean
    with its 95% CI band across seeds). Where validation turns up while training still falls, it overfits."""
    import numpy as np

    from precision_lab.report import finetune_task
    from precision_lab.stats import mean_interval

    tasks = list(dict.fromkeys(finetune_task(c) for c in configs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.2), squeeze=False)
    arm = lambda c: ", ".join(p for p in c.label.split(", ") if not p.startswith("task="))  # one colour per arm
    colors = _colors(arm(c) for c in configs)
    for ax, task in zip(axes[0], tasks):
        for c in [c for c in configs if finetune_task(c) == task]:
            keep = [(r, m) for r, m in zip(c.records, c.metrics) if not r["result"]["diverged"]]  # as the tables
            color = colors[arm(c)]
            ce = [np.asarray(m["ce"], float) for _, m in keep if "ce" in m]
            if ce:
                mean = np.nanmean(np.stack(ce), axis=0)
                smooth = np.convolve(mean, np.ones(10) / 10, mode="valid") if mean.size >= 10 else mean
                ax.plot(np.arange(smooth.size) + (mean.size - smooth.size) + 1, smooth, color=color, lw=0.9,
                        alpha=0.6)
            steps = sorted({e["step"] for r, _ in keep for e in r["result"].get("eval_history", [])})
            bands = [mean_interval([e["loss"] for r, _ in keep for e in r["result"]["eval_history"]
                                    if e["step"] == s and e["loss"] is not None]) for s in steps]
            if steps:
                ax.plot(steps, [b.mean for b in bands], color=color, lw=2, marker="o", ms=3,
                        label=f"{c.label} (validation; thin: train)")
                ax.fill_between(steps, [b.ci_lo for b in bands], [b.ci_hi for b in bands], color=color, alpha=0.2)
        best = next((r["env"].get("best_loss") for c in configs if finetune_task(c) == task for r in c.records), None)
        if best is not None:
            ax.axhline(best, color="k", ls=":", lw=1, label="Bayes-optimal")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("cross entropy (nats / target token)")
        ax.set_title(f"{task}: train (thin) and validation (95% CI band)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, out_dir, stem)


def divergence_onset_figure(configs, out_dir, stem):
    """P(diverge) vs learning rate per policy line (`report.onset_fits`): the observed fraction of seeds that
    diverged with its Clopper-Pearson 95% interval, the fitted logistic curve, and the onset (P = 0.5) with
    its 95% profile-likelihood interval as a shaded band; lines without a fit say why in the legend."""
    import numpy as np

    from precision_lab.report import onset_fits
    from precision_lab.stats import clopper_pearson

    fig, ax = plt.subplots(figsize=(8, 5))
    fits = onset_fits(configs)
    colors = _colors(fits)
    for j, (line, (cs, f)) in enumerate(fits.items()):
        c = colors[line]
        dodge = 10 ** (0.006 * (j - (len(fits) - 1) / 2))  # lines side by side at a shared lr
        frac = np.array(f.diverged) / np.array(f.seeds)
        ci = np.array([clopper_pearson(k, n) for k, n in zip(f.diverged, f.seeds)])
        label = (f"{line}: onset {f.onset_lr:.3g}" if f.onset_lr is not None else
                 f"{line}: no point estimate ({f.status})")
        ax.errorbar(np.array(f.lrs) * dodge, frac, yerr=[frac - ci[:, 0], ci[:, 1] - frac], fmt="o", color=c,
                    capsize=3, label=label)
        if f.slope is not None and f.status == "fit":
            xs = np.geomspace(f.lrs[0], f.lrs[-1], 200)
            ax.plot(xs, f.probability(xs), "-", color=c, lw=1.2)
            ax.axvline(f.onset_lr, color=c, ls="--", lw=0.8)
        if f.ci_lo is not None or f.ci_hi is not None:
            lo = f.ci_lo if f.ci_lo is not None else f.lrs[0]
            hi = f.ci_hi if f.ci_hi is not None else f.lrs[-1]
            ax.axvspan(lo, hi, color=c, alpha=0.1)
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("fraction of seeds diverged (95% Clopper-Pearson)")
    ax.set_title("Divergence onset: P(diverge | lr), logistic fit in log10 lr\n"
                 "(dashed: onset, P = 0.5; band: its 95% profile-likelihood interval)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out_dir, stem)


def precursor_lead_time_figure(configs, out_dir, stem):
    """Per telemetry series (`report.PRECURSOR_SERIES`), how many steps before its divergence each diverged
    seed had that series above the range of its configuration's stable seeds (`report.table_precursors`'s
    rule): one point per seed and policy line; the count of seeds with a precursor beside each row."""
    import numpy as np

    from precision_lab.report import PRECURSOR_SERIES, lr_lines, precursors

    names = list(PRECURSOR_SERIES)
    lines = {line: precursors(cs) for line, cs in lr_lines(configs).items()}
    colors = _colors(lines)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 2))
    rng = np.random.default_rng(0)  # vertical jitter only, so points of one row do not hide each other
    offsets = np.linspace(-0.2, 0.2, len(lines)) if len(lines) > 1 else np.zeros(1)
    for j, (line, pre) in enumerate(lines.items()):
        label = line
        for y, name in enumerate(names):
            vals = [v for v in pre.leads.get(name, []) if v is not None]
            if vals:
                ax.plot(vals, y + offsets[j] + rng.uniform(-0.05, 0.05, len(vals)), "o", ms=4, alpha=0.7,
                        color=colors[line], label=label)
                label = None  # one legend entry per line
    ticks = []
    for name in names:
        parts = []
        for line, pre in lines.items():
            if name in pre.absent:
                parts.append("absent")
            elif pre.seeds:
                parts.append(f"{sum(v is not None for v in pre.leads[name])}/{pre.seeds}")
        ticks.append(f"{PRECURSOR_SERIES[name][2]}\n({', '.join(parts) or 'no diverged seeds'})")
    ax.set_yticks(range(len(names)), ticks, fontsize=6)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first series on top
    ax.set_xscale("log")  # lead times are >= 1 step
    ax.set_xlim(left=0.8)
    ax.xaxis.set_major_formatter(_ticker.ScalarFormatter())
    ax.set_xlabel("lead time: steps before the divergence step that the series stayed above the stable seeds' max")
    ax.set_title("Precursors of divergence per telemetry series\n(in brackets: diverged seeds with a precursor / "
                 "with a reference, per policy line)", fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)
    return save(fig, out_dir, stem)


def finetune_grid_figure(configs, out_dir, stem):
    """Test loss against learning rate, one line per batch size, one panel per arm (sparse, dense): mean over
    the seeds that did not diverge, with 95% CI error bars (ST-MoE Table 20's grid)."""
    from precision_lab.report import finetune_values, router_kind
    from precision_lab.stats import mean_interval

    arms = [(k, a) for k, a in (("learned", "sparse"), ("dense", "dense")) if any(router_kind(c) == k for c in configs)]
    fig, axes = plt.subplots(1, max(len(arms), 1), figsize=(5.5 * max(len(arms), 1), 4.2), squeeze=False, sharey=True)
    for ax, (kind, arm) in zip(axes[0], arms):
        mine = [c for c in configs if router_kind(c) == kind]
        for b in sorted({c.value("train.batch_size") for c in mine}):
            line = sorted((c for c in mine if c.value("train.batch_size") == b), key=lambda c: c.value("optim.lr"))
            ms = [mean_interval(list(finetune_values(c)["test"].values())) for c in line]
            lrs = [c.value("optim.lr") for c in line]
            ax.errorbar(lrs, [m.mean for m in ms], yerr=[[m.mean - m.ci_lo for m in ms], [m.ci_hi - m.mean for m in ms]],
                        marker="o", capsize=3, label=f"batch {b}")
        ax.set_xscale("log")
        ax.set_xlabel("fine-tuning learning rate")
        ax.set_ylabel("test loss (nats / target token; mean, 95% CI)")
        ax.set_title(f"{arm}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, out_dir, stem)


def sensitivity_map_figure(configs, out_dir, stem):
    """The precision sensitivity map: component group (rows) x format (columns: the mantissa sweep at 8
    exponent bits, then the exponent sweep at 3 mantissa bits), colour = mean eval-loss gap to the group's
    float32 reference (paired by seed; symmetric-log scale, linear within +-0.01 nats); * the paired 95% CI
    excludes 0; x a seed diverged or failed to learn (grey: no stable seed, no gap)."""
    import numpy as np
    from matplotlib import colors as mcolors

    from precision_lab.report import (SENSITIVITY_EXPONENT_MANTISSA, SENSITIVITY_MANTISSA_EXPONENT,
                                      SENSITIVITY_TOLERANCE, sensitivity_axes, sensitivity_map)

    grid = sensitivity_map(configs)
    groups = list(grid)
    mant_bits = sorted({b for g in groups for b in sensitivity_axes(grid[g])[0]})
    expo_bits = sorted({b for g in groups for b in sensitivity_axes(grid[g])[1]})
    columns = [("m", b) for b in mant_bits] + [("e", b) for b in expo_bits]
    values = np.full((max(len(groups), 1), max(len(columns), 1)), np.nan)
    fig, ax = plt.subplots(figsize=(0.55 * len(columns) + 3.5, 0.5 * len(groups) + 2.2))
    for i, g in enumerate(groups):
        mant, expo = sensitivity_axes(grid[g])
        for j, (kind, b) in enumerate(columns):
            cell = (mant if kind == "m" else expo).get(b)
            if cell is None:
                continue
            if cell.gap.n:
                values[i, j] = cell.gap.mean
            mark = ("*" if cell.ci_excludes_zero else "") + ("x" if cell.failed else "")
            if cell.gap.n == 0:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.6"))
            text = (f"{cell.gap.mean:+.2f}" if cell.gap.n else "") + (f"\n{mark}" if mark else "")
            if text:
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color="k")
    finite = np.abs(values[np.isfinite(values)])
    vmax = max(float(finite.max()) if finite.size else 0.0, 2 * SENSITIVITY_TOLERANCE)
    norm = mcolors.SymLogNorm(linthresh=SENSITIVITY_TOLERANCE, vmin=-vmax, vmax=vmax, base=10)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", norm=norm, aspect="auto")
    fig.colorbar(im, ax=ax, label="eval loss - float32 (nats, paired mean)")
    ax.set_yticks(range(len(groups)), groups)
    ax.set_xticks(range(len(columns)), [f"e{SENSITIVITY_MANTISSA_EXPONENT}m{b}" if k == "m" else f"e{b}m{SENSITIVITY_EXPONENT_MANTISSA}"
                                         for k, b in columns], rotation=60, fontsize=7)
    if mant_bits and expo_bits:
        ax.axvline(len(mant_bits) - 0.5, color="k", lw=1.5)
    ax.set_xlabel(f"format: mantissa bits at {SENSITIVITY_MANTISSA_EXPONENT} exponent bits | exponent bits at "
                  f"{SENSITIVITY_EXPONENT_MANTISSA} mantissa bits")
    ax.set_title("Precision sensitivity map: one component group in the format, the rest float32\n"
                 "(* paired 95% CI excludes 0; x a seed diverged or failed to learn; grey: no stable seed)",
                 fontsize=9)
    return save(fig, out_dir, stem)


SWEEP_FIGURES = {
    **{name: curve_figure(name) for name in CURVES},
    "lr_sweep": lr_sweep_figure,
    "fraction_stable": fraction_stable_figure,
    "sentinel_entropy": sentinel_entropy_figure,
    "language_experts": language_experts_figure,
    "num_experts": num_experts_figure,
    "differences": differences_figure,
    "finetune_curves": finetune_curves_figure,
    "finetune_grid": finetune_grid_figure,
    "divergence_onset": divergence_onset_figure,
    "precursor_lead_time": precursor_lead_time_figure,
    "sensitivity_map": sensitivity_map_figure,
}


def finetune_curves(summary: dict, metrics: dict, out_dir: str | Path, stem: str = "finetune_curves") -> Path:
    """Train loss (per step, every seed) and validation loss (at each evaluation) of a fine-tuning run in
    one panel: where validation turns up while training still falls, the run overfits."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    train = np.asarray(metrics["ce"], np.float64)  # [steps, seeds]
    steps = np.arange(1, train.shape[0] + 1)
    evals = summary["eval_history"]
    for i, seed in enumerate(summary["seeds"]):
        color = f"C{i % 10}"
        ax.plot(steps, train[:, i], color=color, alpha=0.35, lw=0.8)
        ax.plot([e["step"] for e in evals], [np.nan if e["loss"][i] is None else e["loss"][i] for e in evals],
                color=color, marker="o", ms=3, lw=1.5, label=f"seed {seed} validation")
    ft = summary.get("finetune", {})
    if summary.get("best_loss") is not None:
        ax.axhline(summary["best_loss"], color="k", ls=":", lw=1, label="Bayes-optimal")
    if ft.get("chance_loss") is not None:
        ax.axhline(ft["chance_loss"], color="grey", ls="--", lw=1, label="chance (prior only)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("cross entropy (nats / target token)")
    ax.set_title(f"{ft.get('task', '')}, trainable {ft.get('trainable', '')}: train (thin) and validation")
    ax.legend(fontsize=7)
    paths = save(fig, out_dir, stem)
    return paths[0]
