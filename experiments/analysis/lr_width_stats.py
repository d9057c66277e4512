"""Read lr_width's results store: failure lr and best lr per (width, arm), the max attention logit per lr,
and each arm against the baseline over the (width, lr) points (Wilcoxon signed-rank, scipy.stats), over all
points and over the points where both runs learned (mean with a 95% t-interval).

    .venv/bin/python experiments/analysis/lr_width_stats.py runs/lr_width

lr_width runs one seed per point, so its pairs are (width, lr) points, not seeds (see its TOML header).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ARMS = ("baseline", "output-z-loss", "qk-norm", "bf16-attention")


def load(store: Path) -> dict:
    runs = {}
    for f in sorted((store / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        c = r["resolved"]
        metrics = np.load(store / "runs" / r["metrics_file"])
        width = c["model"]["d_model"]  # a deeper model of the same width is its own line: "64x4" (4+4 blocks)
        if c["model"]["num_encoder_layers"] != 2:
            width = f"{width}x{c['model']['num_encoder_layers']}"
        runs[(width, c["train"]["label"], c["optim"]["lr"])] = (
            r["result"]["outcome"], r["result"]["final_eval_loss"], float(np.nanmax(metrics["max_attention_logit"])))
    return runs


def main(store: str) -> None:
    runs = load(Path(store))
    widths = sorted({k[0] for k in runs}, key=lambda w: (int(str(w).split("x")[0]), str(w)))
    lrs = sorted({k[2] for k in runs})
    print("width arm: failure lr (as pre-registered: the lowest lr not stable), cliff lr (the lowest lr ABOVE the "
          "best lr not stable), best lr and its loss, outcome (s/f/d) and max attention logit per lr", lrs)
    print("(Wortsman et al.'s LR sensitivity per line is in the report's lr table)")
    for w in widths:
        for a in ARMS:
            if (w, a, lrs[0]) not in runs:
                continue
            fail = [lr for lr in lrs if runs[(w, a, lr)][0] != "stable"]
            best = min(lrs, key=lambda lr: runs[(w, a, lr)][1])
            cliff = [lr for lr in fail if lr > best]
            print(w, a, "fail", fail[0] if fail else "none", "cliff", cliff[0] if cliff else "none", "best", best,
                  round(runs[(w, a, best)][1], 3),
                  "outcomes", [runs[(w, a, lr)][0][0] for lr in lrs],
                  "max attention logit", [round(runs[(w, a, lr)][2]) for lr in lrs])
    for a in ARMS[1:]:
        points = [(w, lr) for w in widths for lr in lrs if (w, a, lr) in runs]
        diffs = np.array([runs[(w, a, lr)][1] - runs[(w, "baseline", lr)][1] for w, lr in points])
        both = np.array([runs[(w, a, lr)][1] - runs[(w, "baseline", lr)][1] for w, lr in points
                         if runs[(w, a, lr)][0] == "stable" and runs[(w, "baseline", lr)][0] == "stable"])
        line = (f"{a} - baseline over {len(diffs)} (width, lr) points: mean {diffs.mean():+.3f}, median "
                f"{np.median(diffs):+.3f}, Wilcoxon p = {stats.wilcoxon(diffs).pvalue:.2g}")
        if len(both) > 2:
            lo, hi = stats.t.interval(0.95, len(both) - 1, loc=both.mean(), scale=stats.sem(both))
            line += (f"; where both learned ({len(both)} points): mean {both.mean():+.3f} [{lo:+.3f}, {hi:+.3f}],"
                     f" Wilcoxon p = {stats.wilcoxon(both).pvalue:.2g}")
        print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lr_width")
