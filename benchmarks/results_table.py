#!/usr/bin/env python
"""Markdown tables for RESULTS.md from the JSON lines run_lab.sh writes (the last line of each kind wins).

    .venv/bin/python benchmarks/results_table.py benchmarks/results/lab-cpu-2core.jsonl
"""

from __future__ import annotations

import json
import sys


def fmt_ms(d: dict) -> str:
    return f"{d['ms_per_step_median']:.1f} ({d['ms_per_step_min']:.1f}–{d['ms_per_step_max']:.1f})"


def fmt_vs_fp32(r: dict) -> str:
    """ms/step, ratio to the same rep's fp32 and compile time: the cells of a program's row."""
    lo, hi = r["ratio_to_fp32_min_max"]
    return f"{fmt_ms(r)} | {r['ratio_to_fp32_median']:.2f} ({lo:.2f}–{hi:.2f}) | {r['compile_s']:.1f}"


def ratio_ci(ratios: list[float], target: float, better: str) -> str:
    """Geometric mean of paired per-round ratios, its 95% t-interval (on log ratios) and a one-sided
    one-sample t-test (scipy.stats.ttest_1samp) of whether the ratio is on the `better` side of `target`."""
    import numpy as np
    from scipy import stats

    r = np.log(np.asarray(ratios, float))
    if r.size < 2:
        return f"geometric mean {np.exp(r.mean()):.2f} (one round: no interval)"
    lo, hi = stats.t.interval(0.95, r.size - 1, loc=r.mean(), scale=stats.sem(r))
    # H0: the target is met; the test asks whether the data say it is not
    alt = "less" if better == "greater" else "greater"
    p = stats.ttest_1samp(r, np.log(target), alternative=alt).pvalue
    return (f"geometric mean {np.exp(r.mean()):.2f}, 95% CI {np.exp(lo):.2f}–{np.exp(hi):.2f} (t on log ratios, "
            f"{r.size} rounds); one-sided t-test that it misses the target {target:g}: p = {p:.3f}")


def ratio_table(title: str, heads: list[str], reference: str, rows) -> None:
    """One '### title' table of ms/step and the ratio to `reference` per row; rows are (cells, result)."""
    print(f"### {title}\n")
    print("| " + " | ".join(heads) + f" | ms/step median (min–max) | ratio to {reference} median (min–max) | compile s |")
    print("| --- |" + " --- |" * (len(heads) + 2))
    for cells, r in rows:
        print("| " + " | ".join(cells) + f" | {fmt_vs_fp32(r)} |")
    print()


def main(path: str) -> int:
    last, hf_runs = {}, {}
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            d = json.loads(line)
            last[d.get("benchmark")] = d
            if d.get("benchmark") == "cli_train":  # one per configuration (matched, quickstart)
                last[f"cli_train:{d.get('config', 'matched')}"] = d
            if d.get("benchmark") == "lab_vs_hf_switch":  # one per malloc setting (run_lab.sh runs both)
                hf_runs[d.get("env", {}).get("GLIBC_TUNABLES", "")] = d
    cpus = sorted({d["env"]["cpu"] for d in last.values() if isinstance(d.get("env"), dict) and d["env"].get("cpu")})
    print(f"CPU model of these rows (`env.cpu` of each JSON line): {', '.join(cpus)}\n")
    if len(cpus) > 1:
        print("**Rows from different CPU models are mixed here: compare ratios within one row only.**\n")
    for tunables, d in sorted(hf_runs.items(), reverse=True):
        lab, hf, peak = d["lab"], d["hf"], d["peak"]
        print(f"### Lab vs HF SwitchTransformers, fp32 train step, matched configuration "
              f"(GLIBC_TUNABLES='{tunables}')\n")
        print("| | ms/step median (min–max) | matmul GFLOP/step | GFLOP/s | fraction of JAX f32 peak | other busy cores |")
        print("| --- | --- | --- | --- | --- | --- |")
        lab_gf = lab["matmul_gflop_per_step"]
        print(f"| lab (JAX) | {fmt_ms(lab)} | {lab_gf:.2f} executed (XLA cost analysis {lab['xla_cost_gflop_per_step']:.2f}) "
              f"| {d['lab_gflops']:.0f} | {d['lab_fraction_of_peak']:.2f} (HF-counted work: {d['lab_fraction_of_peak_hf_flops']:.2f}) "
              f"| {lab['other_busy_cores_median']} |")
        hf_gf = hf["gflop_per_step_warm"]
        print(f"| HF (torch) | {fmt_ms(hf)} | {hf_gf:.2f} (FlopCounterMode, routed tokens) "
              f"| {hf_gf / hf['ms_per_step_median'] * 1e3:.0f} | {d['hf_fraction_of_peak']:.2f} | {hf['other_busy_cores_median']} |")
        if "lab_dense_dispatch" in d:
            dense = d["lab_dense_dispatch"]
            print(f"| lab, dense one-hot dispatch | {fmt_ms(dense)} | {dense['matmul_gflop_per_step']:.2f} executed "
                  f"| {dense['matmul_gflop_per_step'] / dense['ms_per_step_median'] * 1e3:.0f} | "
                  f"{dense['matmul_gflop_per_step'] / dense['ms_per_step_median'] * 1e3 / peak['gflops_median']:.2f} "
                  f"| {dense['other_busy_cores_median']} |")
        if "hf_huge_pages_flipped" in d:
            flip = d["hf_huge_pages_flipped"]
            print(f"| HF, GLIBC_TUNABLES='{flip['glibc_tunables']}' | {fmt_ms(flip)} | | | | |")
        print(f"\nHF time / lab time, per interleaved rep: median **{d['speedup_hf_over_lab_median']:.2f}**, "
              f"reps {d['speedup_per_rep']}. JAX f32 2048³ matmul in the same run: {peak['gflops_median']:.0f} GFLOP/s "
              f"(best {peak['gflops_best']:.0f}).\n")
    if "lab_user_path_vs_hf" in last:
        d = last["lab_user_path_vs_hf"]
        src, tgt = d["tokens"]
        print(f"### The user's path vs HF, fp32, matched configuration, {d['batch']} x ({src} + {tgt}) tokens "
              f"(CPU: {d.get('cpu_model', '?')})\n")
        print("| program | ms/step median (min–max) | HF time / this time, median (min–max) | other busy cores |")
        print("| --- | --- | --- | --- |")
        for name in ("lab user path (prefetch)", "lab user path (no prefetch)", "lab bare chunk"):
            r = d[name]
            lo, hi = r["hf_over_lab_min_max"]
            print(f"| {name} | {fmt_ms(r)} | **{r['hf_over_lab_median']:.2f}** ({lo:.2f}–{hi:.2f}) "
                  f"| {r['other_busy_cores_median']} |")
        print(f"| HF (torch) | {fmt_ms(d['hf'])} | 1 | |")
        print(f"\nThe run's Dataset alone: {d['data_ms_per_step']:.1f} ms per step of data.\n")
    for d in [last[k] for k in ("cli_train:matched", "cli_train:quickstart") if k in last]:
        config = {"quickstart": "the quick-start model (tiny, batch 16)"}.get(d.get("config"), "matched configuration")
        print(f"### `precision-lab train` itself, {config}, fp32 (CPU: {d.get('cpu_model', '?')})\n")
        if "reps" not in d:  # a line from before round 12: one run of each, no HF
            print("| run | step ms (timing.step_s) | data ms/step (drawn, overlapped or not) | first chunk s | process s |")
            print("| --- | --- | --- | --- | --- |")
            for name, r in d["runs"].items():
                print(f"| {name} | {r['step_ms']:.1f} | {r.get('data_s', float('nan')) * 1e3:.1f} | "
                      f"{r['first_chunk_s']:.1f} | {r['process_s']:.0f} |")
            print(f"\n8 seeds / 1 seed per step: **{d['cost_8_over_1']:.2f}**\n")
        else:
            print(f"{d['reps']} interleaved rounds, a fresh process per run.\n")
            print("| run | step ms, timing.step_s, median (min–max) | data ms/step | first chunk s | process s |")
            print("| --- | --- | --- | --- | --- |")
            for name, r in d["runs"].items():
                print(f"| {name} | {fmt_ms(r)} | {r['data_ms_median']:.1f} | {r['first_chunk_s_median']:.1f} "
                      f"| {r['process_s_median']:.0f} |")
            if "hf" in d:
                src, tgt = d["tokens"]
                print(f"| HF (torch), {src} + {tgt} tokens, one block per round | {fmt_ms(d['hf'])} | | | |")
            lo, hi = d["cost_8_over_1_min_max"]
            print(f"\n8 seeds / 1 seed per step, per round: median **{d['cost_8_over_1_median']:.2f}** ({lo:.2f}–{hi:.2f})",
                  end="")
            one, eight = d["runs"]["1 seed"]["reps"], d["runs"]["8 seeds"]["reps"]
            print(f"; {ratio_ci([e / o for e, o in zip(eight, one)], 4.0, 'less')} "
                  + ("(issue 12 item 2's 4x)" if d.get("config") == "quickstart" else "(item 2's 4x names the quick-start model)"))
            if "hf" in d:
                lo, hi = d["hf_over_lab_min_max"]
                print(f"\nHF time / `precision-lab train` time (1 seed), per round: median "
                      f"**{d['hf_over_lab_median']:.2f}** ({lo:.2f}–{hi:.2f}); "
                      f"{ratio_ci(d['hf_over_lab_per_rep'], 1.5, 'greater')} (item 1's 1.5x)")
            print()
    if "telemetry_cost" in last:
        d = last["telemetry_cost"]
        ratio_table("What the per-step telemetry costs (fp32; ratio to the full step in the same rep)",
                    ["config", "program"], "full",
                    [((cfg, name), r) for cfg, res in d["configs"].items() for name, r in res.items()])
    if "policy_cost" in last:
        d = last["policy_cost"]
        ratio_table("Cost of faithful simulation (ratio to fp32 in the same rep)", ["config", "policy"], "fp32",
                    [((cfg, pol), r) for cfg, res in d["configs"].items() for pol, r in res.items()])
    if "emulation_gain" in last:
        d = last["emulation_gain"]
        ratio_table("Emulation speed-ups of this round, before/after in one run (matched configuration)",
                    ["program"], "fp32", [((name,), r) for name, r in d["programs"].items()])
    if "fp8_cast_gain" in last:
        d = last["fp8_cast_gain"]
        ratio_table("The saturating fp8 cast's short path, before/after in one run (ratio to fp32 in the same rep)",
                    ["config", "program"], "fp32",
                    [((cfg, name), r) for cfg, res in d["configs"].items() for name, r in res.items()])
    if "accumulator_cost" in last:
        d = last["accumulator_cost"]
        ratio_table(f"Matmul accumulator model, {d['config']} (ratio to fp32 in the same rep)",
                    ["policy"], "fp32", [((name,), r) for name, r in d["programs"].items()])
    if "capacity_step_time" in last:
        d = last["capacity_step_time"]
        lo_cf, hi_cf = d["capacity_factors"]
        paper = "; ".join(f"{name} {b / a:.2f} ({a} vs {b} s)" for name, (a, b) in d["paper"].items())
        print(f"### Step time at train capacity factor {hi_cf} over {lo_cf} (fp32, one seed; CPU: "
              f"{d.get('cpu_model', '?')})\n")
        print(f"ST-MoE Table 9: {paper}.\n")
        print(f"| preset | dispatch | CF {lo_cf} ms/step median (min–max) | CF {hi_cf} ms/step median (min–max) "
              "| ratio, median of reps (min–max) | executed matmul FLOP ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for preset, res in d["configs"].items():
            for dispatch, r in res.items():
                lo, hi = r["ratio_min_max"]
                print(f"| {preset} | {dispatch} | {fmt_ms(r[f'CF {lo_cf}'])} | {fmt_ms(r[f'CF {hi_cf}'])} "
                      f"| **{r['ratio_median']:.2f}** ({lo:.2f}–{hi:.2f}) | {r['matmul_gflop_ratio']:.2f} |")
        print()
    if "vmapped_seeds" in last:
        d = last["vmapped_seeds"]
        print("### Vmapped seeds (fp32)\n")
        print("| config | 1 seed ms/step | 8 seeds ms/step (devices) | 8 seeds / 1 seed median (min–max) |")
        print("| --- | --- | --- | --- |")
        for cfg, r in d["configs"].items():
            lo, hi = r["cost_8_over_1_min_max"]
            print(f"| {cfg} | {fmt_ms(r['1 seed'])} | {fmt_ms(r['8 seeds'])} ({r['8 seeds'].get('member_devices', 1)}) "
                  f"| {r['cost_8_over_1_median']:.2f} ({lo:.2f}–{hi:.2f}) |")
        print()
    if "expert_block_size" in last:
        d = last["expert_block_size"]
        print("### Sorted dispatch: block size (fp32 ms/step, median (min–max))\n")
        names = list(next(iter(d["configs"].values())))
        print("| config | " + " | ".join(names) + " |")
        print("| --- |" + " --- |" * len(names))
        for cfg, res in d["configs"].items():
            print(f"| {cfg} | " + " | ".join(f"{fmt_ms(res[n])}, {res[n]['matmul_gflop_per_step']:.1f} GFLOP" for n in names) + " |")
        print()
    if "small_mfu" in last:
        d = last["small_mfu"]
        s, p = d["small"], d["peak"]
        print("### `small` preset, fp32 train step: model FLOP utilisation\n")
        print("| ms/step median (min–max) | matmul GFLOP/step | JAX f32 peak GFLOP/s | MFU median of reps (min–max) |")
        print("| --- | --- | --- | --- |")
        print(f"| {fmt_ms(s)} | {s['matmul_gflop_per_step']:.2f} | {p['gflops_median']:.0f} | "
              f"{d['mfu_median']:.2f} ({min(d['mfu_per_rep']):.2f}–{max(d['mfu_per_rep']):.2f}) |\n")
    if "compile_time" in last:
        d = last["compile_time"]
        print("### Compilation, tiny train run (fresh process each; median of runs)\n")
        print("| policy | cache | first chunk s (compile + 10 steps) | compile s (runs) | step ms |")
        print("| --- | --- | --- | --- | --- |")
        for pol, res in d["policies"].items():
            for label, r in res.items():
                print(f"| {pol} | {label} | {r['first_chunk_s']:.2f} | {r['compile_s']:.2f} {r['compile_s_all']} | {r['step_ms']:.1f} |")
        print()
    q = [d for b, d in last.items() if b and "quantize" in str(b)]
    for d in q:
        print("### quantize throughput (Melem/s, 2^22 elements, median)\n")
        rows = {}
        for r in d.get("results", []):
            if "melem_per_s" in r:
                faults = f", {r['minflt_per_call']:.0f} faults/call" if "minflt_per_call" in r else ""
                rows.setdefault(r["contender"], {})[r["format"]] = f"{r['melem_per_s']:.1f} (agree {r['agree']}{faults})"
        fmts = ["bf16", "fp8_e4m3fn", "fp8_e4m3"]
        print("| contender | " + " | ".join(fmts) + " |")
        print("| --- |" + " --- |" * len(fmts))
        for c, v in rows.items():
            print(f"| {c} | " + " | ".join(v.get(f, "–") for f in fmts) + " |")
        print()
    if "xla_cpu_micro" in last:
        d = last["xla_cpu_micro"]
        print("### XLA:CPU micro-benchmarks behind two layout choices (`xla_cpu_micro.py`, median ms)\n")
        print("| what | ms | GFLOP/s |")
        print("| --- | --- | --- |")
        for key in ("bias_grad_reduce", "bias_grad_pairwise", "bias_grad_ones_matmul"):
            print(f"| position-bias gradient, 4 x [16,4,128,128] over the batch: {key.split('_', 2)[2]} | {d[key + '_ms']} | |")
        for key in ("logits_token_major", "logits_heads_major", "values_token_major", "values_heads_major"):
            print(f"| attention {key.replace('_', ' ')} | {d[key + '_ms']} | {d[key + '_gflops']:.0f} |")
        print(f"| 2048x128x512 matmul | | {d['matmul_2048x128x512_gflops']:.0f} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
