"""The control - learned gap of eval loss along training, from the eval histories of router-control sweeps
(mean over the seeds both arms share, per eval step), and, for several stores, the pooled final gaps with a
one-sample t-interval (scipy.stats). Pooling is exploratory: no TOML pre-registered it.

    .venv/bin/python experiments/analysis/routing_gap.py runs/routing_controls runs/routing_rsqrt

Arms are told apart as the reports do: num_experts = 0 is "dense", routing = "random" is "random", the
rest "learned"; a run whose train.label names another arm (router_precision_long's "bf16-router") is left
out; with --lr LR only runs at that peak lr count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats


def arms(store: Path, lr: float | None) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for f in sorted((store / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        model, run_lr = r["resolved"]["model"], r["resolved"]["optim"]["lr"]
        if lr is not None and not np.isclose(run_lr, lr):
            continue
        arm = "dense" if model["num_experts"] == 0 else "random" if model.get("routing") == "random" else "learned"
        label = r["resolved"].get("train", {}).get("label")
        if label and label not in (arm, "baseline"):  # another learned-router arm (e.g. a bf16 router): not the reference
            continue
        history = {e["step"]: e["loss"] for e in r["result"]["eval_history"]}
        out.setdefault(arm, {})[r["seed"]] = {"history": history, "final": r["result"]["final_eval_loss"]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--control", default="dense", choices=["dense", "random"])
    args = p.parse_args(argv)
    pooled = []
    for store in args.stores:
        a = arms(Path(store), args.lr)
        control, learned = a[args.control], a["learned"]
        seeds = sorted(set(control) & set(learned))
        steps = sorted(control[seeds[0]]["history"])
        gaps = [f"{s}:{np.mean([control[k]['history'][s] - learned[k]['history'][s] for k in seeds]):+.3f}"
                for s in steps]
        print(f"{store} ({args.control} - learned per eval step, {len(seeds)} seeds):", " ".join(gaps))
        pooled += [control[k]["final"] - learned[k]["final"] for k in seeds]
    if len(args.stores) > 1:
        x = np.array(pooled)
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        print(f"pooled final gap over {len(x)} seeds (exploratory): {x.mean():+.3f} [{lo:+.3f}, {hi:+.3f}], "
              f"one-sample t p = {stats.ttest_1samp(x, 0.0).pvalue:.2g}")


if __name__ == "__main__":
    main()
