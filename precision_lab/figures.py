"""Figures: matplotlib plots of roundoff analyses and sweep results (PNG and SVG, labelled axes)."""

from __future__ import annotations

import math
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
