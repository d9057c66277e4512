"""Reports from synthetic store records (no training): the three outcomes, paired comparisons with the
baseline row (CI, p, power), Fisher on fractions not diverged, the router precondition table, the training
budget and noise section, and the figures that draw the same intervals."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from precision_lab import stats
from precision_lab.report import (
    ConfigResult,
    baseline_learns_line,
    baseline_of,
    comparison,
    informative_rows,
    load_sweep_results,
    router_kind,
    router_preconditions,
    table_lr_intervals,
    write_figures,
    write_report,
)
from precision_lab.store import ResultsStore

UNIGRAM = 3.43
STEPS = 300
SEEDS = range(8)
rng = np.random.default_rng(0)
SEED_EFFECT = rng.normal(0.0, 0.05, size=8)  # seeds share data, so their offsets repeat across rows


def make_record(label, seed, loss, outcome, *, routing="top2", num_experts=8, lr=0.01, extra=None):
    """One store record in the runner's layout (precision_lab.runner.run_group)."""
    diverged = outcome == "diverged"
    overrides = {"train.label": label, **(extra or {})}
    resolved = {"train": {"label": label, "steps": STEPS}, "optim": {"lr": lr},
                "model": {"routing": routing, "num_experts": num_experts}}
    steps = np.arange(STEPS)
    # falling to a plateau at `loss` (time constant 30 steps): the last 20% is flat
    curve = loss + 3.0 * np.exp(-steps / 30.0) + 0.01 * rng.standard_normal(STEPS)
    evals = [{"step": s, "loss": float(loss + 3.0 * math.exp(-s / 30.0))} for s in range(20, STEPS + 1, 20)]
    result = {
        "final_eval_loss": None if diverged else loss,
        "final_eval_batch_losses": None if diverged else list(loss + 0.01 * rng.standard_normal(4)),
        "final_train_loss": loss, "quality_gap": None if diverged else loss - 0.93, "outcome": outcome,
        "diverged": diverged, "divergence_step": 40 if diverged else None,
        "divergence_rule": "spikes" if diverged else None, "first_loss_spike_step": None, "eval_history": evals,
    }
    env = {"best_loss": 0.93, "unigram_loss": UNIGRAM, "entropy_rate": 0.9, "backend": "cpu", "device": "cpu",
           "jax_version": "0", "xla_flags": "", "policy_resolved": {"mode": "emulate"}, "moe_layer_names": ["e1"]}
    record = {"run_id": f"{label}-{lr:g}-s{seed}", "sweep": "synthetic", "seed": seed, "group_key": label,
              "overrides": overrides, "config": resolved, "result": result, "env": env, "resolved": resolved,
              "timing": {"step_s": 0.01, "group_runs": 8}}
    return record, {"loss": curve.astype(np.float32), "ce": curve.astype(np.float32)}


# label, mean loss shift vs the baseline, outcomes of seeds 0..7, routing, num_experts
ROWS = [
    ("baseline", 0.0, ["stable"] * 6 + ["diverged", "failed_to_learn"], "top2", 8),
    ("worse", 0.10, ["stable"] * 5 + ["diverged", "diverged", "stable"], "top2", 8),
    ("random_routing", 0.30, ["stable"] * 8, "random", 8),
    ("hash_routing", 0.01, ["stable"] * 8, "hash", 8),
    ("dense", 0.20, ["stable"] * 8, "top2", 0),
]


def loss_of(shift, seed, outcome):
    if outcome == "failed_to_learn":
        return UNIGRAM + 0.2  # at the level of a unigram model: trained, learned nothing
    return 2.0 + shift + SEED_EFFECT[seed] + 0.005 * rng.standard_normal()


def fill_store(path, rows=ROWS, tables=("summary",)):
    store = ResultsStore(path)
    runs = []
    for label, shift, outcomes, routing, experts in rows:
        for seed, outcome in zip(SEEDS, outcomes):
            rec, metrics = make_record(label, seed, loss_of(shift, seed, outcome), outcome, routing=routing,
                                       num_experts=experts)
            store.put(rec["run_id"], rec, metrics)
            runs.append({"run_id": rec["run_id"], "group_key": label, "seed": seed, "overrides": rec["overrides"]})
    store.write_manifest({"name": "synthetic", "description": "synthetic records", "axes": [],
                          "report": {"figures": ["lr_sweep", "differences", "fraction_stable"], "tables": list(tables)},
                          "runs": runs})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    fill_store(path)
    return path, write_report(path).read_text()


def test_outcomes_are_counted_and_only_stable_seeds_compared(report):
    path, text = report
    _, configs = load_sweep_results(path)
    base, worse = configs[0], configs[1]
    assert base.outcome_counts() == {"stable": 6, "diverged": 1, "failed_to_learn": 1}
    assert "| baseline | 7/8" in text and " 6 / 1 / 1 | baseline |" in text
    assert " 6 / 2 / 0 |" in text  # "worse": seeds 5 and 6 diverged
    # quality over stable seeds only: the failed seed (3.63) is not in the baseline's eval losses
    assert base.eval_losses().size == 6 and base.eval_losses().max() < 3.0
    assert sorted(base.eval_by_seed()) == [0, 1, 2, 3, 4, 5]


def test_paired_difference_column_is_scipys_paired_t(report):
    path, text = report
    _, configs = load_sweep_results(path)
    base, worse = configs[0], configs[1]
    seeds = [0, 1, 2, 3, 4]  # stable in both (baseline: 0-5; worse: 0-4 and 7)
    a = np.array([worse.eval_by_seed()[s] for s in seeds])
    b = np.array([base.eval_by_seed()[s] for s in seeds])
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval()
    d, fisher = comparison(worse, base)
    assert d.seeds == tuple(seeds) and d.p_value == pytest.approx(ref.pvalue)
    cell = f"{d.mean:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}] (n=5)"
    assert cell in text
    assert d.mean == pytest.approx(0.10, abs=0.02) and d.significant
    # Fisher on fractions not diverged: 6/8 against the baseline's 7/8
    assert fisher.p_value == pytest.approx(sps.fisher_exact([[6, 2], [7, 1]]).pvalue)
    assert f"{fisher.p_value:.3f} ({fisher.seeds_for_power})" in text
    assert "p (paired t)" in text
    assert "mean +- SD" in text  # every "+-" column says it is an SD


def test_precondition_table_recognises_controls_by_config(report):
    path, text = report
    _, configs = load_sweep_results(path)
    assert [router_kind(c) for c in configs] == ["learned", "learned", "random", "hash", "dense"]
    assert text.index("## Precondition") < text.index("## Summary")
    # learned (baseline) beats random by 0.3 significantly; against hash (0.01 apart) it is not significant
    assert "| random_routing (random) | baseline |" in text
    section = text.split("## Precondition")[1].split("## Summary")[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert rows["random_routing (random)"].rstrip().endswith("| yes |")
    assert rows["dense (dense)"].rstrip().endswith("| yes |")
    assert informative_rows(configs) == {"baseline": True}
    assert "- baseline: informative" in text


def test_precondition_pairs_each_control_with_the_learned_row_of_its_own_setting(tmp_path):
    """A lever on a model field (here vocab_size) must not pair the 256-token dense row with the 128-token
    learned row: only the router arm's own fields (num_experts, routing, ...) may differ within a pair."""
    store, runs = ResultsStore(tmp_path), []
    for vocab in (128, 256):
        for arm, experts in (("learned", 8), ("dense", 0)):
            label = f"{arm}-v{vocab}"
            for seed in range(4):
                loss = 2.0 + (0.1 if vocab == 256 else 0.0) + (0.05 if arm == "dense" else 0.0) + SEED_EFFECT[seed]
                rec, metrics = make_record(label, seed, loss, "stable", num_experts=experts,
                                           extra={"model.vocab_size": vocab, "model.num_experts": experts})
                store.put(rec["run_id"], rec, metrics)
                runs.append({"run_id": rec["run_id"], "group_key": label, "seed": seed, "overrides": rec["overrides"]})
    store.write_manifest({"name": "levers", "description": "", "axes": [], "report": {"tables": ["summary"]},
                          "runs": runs})
    _, configs = load_sweep_results(tmp_path)
    pairs = {control.value("train.label"): learned.value("train.label")
             for control, learned, _ in router_preconditions(configs)}
    assert pairs == {"dense-v128": "learned-v128", "dense-v256": "learned-v256"}
    for _, _, d in router_preconditions(configs):  # learned - dense = -0.05 exactly (same seed offsets)
        assert d.mean == pytest.approx(-0.05, abs=0.02)


def test_precondition_table_says_how_far_the_learned_router_committed(tmp_path):
    """The entropy column: the learned router's per-token routing entropy over the last 10% of the steps
    (mean over layers and stable seeds) / ln E. Here it falls from ln 8 to 0.9 ln 8 in layer 0 and 0.7 ln 8
    in layer 1 at step 270, so the tail reads 0.800; the dense row has no router and the learned row is the
    one whose number is printed."""
    store, runs = ResultsStore(tmp_path), []
    for arm, experts in (("learned", 8), ("dense", 0)):
        for seed in range(4):
            rec, metrics = make_record(arm, seed, 2.0 + (0.05 if arm == "dense" else 0.0) + SEED_EFFECT[seed],
                                       "stable", num_experts=experts, extra={"model.num_experts": experts})
            if experts:
                entropy = np.full((STEPS, 2), math.log(8), np.float32)
                entropy[270:] = np.array([0.9, 0.7], np.float32) * np.float32(math.log(8))
                metrics["router_entropy"] = entropy
            store.put(rec["run_id"], rec, metrics)
            runs.append({"run_id": rec["run_id"], "group_key": arm, "seed": seed, "overrides": rec["overrides"]})
    store.write_manifest({"name": "commit", "description": "", "axes": [], "report": {"tables": ["summary"]},
                          "runs": runs})
    text = write_report(tmp_path).read_text()
    assert "learned router's final entropy / ln E" in text
    row = next(line for line in text.splitlines() if line.startswith("| dense") and "(dense) | learned" in line)
    assert [c.strip() for c in row.split("|")][5] == "0.800"


def test_budget_section_reports_plateau_and_noise(report):
    _, text = report
    section = text.split("## Budget")[1].split("##")[0]
    line = next(line for line in section.splitlines() if line.startswith("| baseline (baseline)"))
    # 3 exp(-s/30) still falls over steps 240-300, significantly (noiseless evals), by 0.0009 nats: less
    # than the seed SD (0.02)
    assert "(eval loss, 6 seeds): falling slowly" in line and "-0.0009 over steps 240-300" in line
    cells = [c.strip() for c in line.split("|")]
    assert cells[-2] in ("yes", "no") and "(4)" in cells[5] and "(6)" in cells[6]


def test_wilcoxon_option_and_figures(report, tmp_path):
    path, _ = report
    text = write_report(path, tmp_path / "figs", paired_test="wilcoxon").read_text()
    assert "p (Wilcoxon signed-rank)" in text and "Wilcoxon signed-rank; scipy.stats" in text
    for name in ("lr_sweep", "differences", "fraction_stable"):
        assert (tmp_path / "figs" / f"synthetic_{name}.png").stat().st_size > 1000


def test_every_report_opens_with_its_preconditions(tmp_path):
    """Issue 13: every report says whether its baseline learned; one without control rows says it does not
    check whether routing matters (and so calls no router-precision result informative)."""
    fill_store(tmp_path / "a", rows=ROWS[:2])
    text = write_report(tmp_path / "a").read_text()
    section = text.split("## Precondition")[1].split("\n## ")[0]
    assert "baseline **baseline**: 6 of 8 seeds stable and learning, 1 diverged, 1 failed to learn" in section
    assert f"unigram reference {UNIGRAM:.3f}" in section and "it learns in some seeds only" in section
    assert "No random-routed, hash-routed or dense" not in section
    assert "whether routing matters is not checked here" in section
    assert text.index("## Precondition") < text.index("## Summary")
    # a baseline that never learned makes every comparison uninformative, and the report says so
    never = [("baseline", 0.0, ["failed_to_learn"] * 8, "top2", 8), ROWS[1]]
    fill_store(tmp_path / "b", rows=never)
    assert "it does NOT learn: every comparison with it is uninformative" in write_report(tmp_path / "b").read_text()
    # with controls, the baseline line opens the router table's section
    fill_store(tmp_path / "c")
    text = write_report(tmp_path / "c").read_text()
    assert "baseline **baseline**" in text and "Does routing matter here?" in text


def test_lr_intervals_pair_with_the_baseline_line_at_the_same_lr():
    configs = []
    for label, shift in (("baseline", 0.0), ("bf16", 0.05)):
        for lr in (0.01, 0.1):
            recs, mets = zip(*[make_record(label, s, 2.0 + shift + lr + SEED_EFFECT[s], "stable", lr=lr,
                                           extra={"optim.lr": lr}) for s in SEEDS])
            configs.append(ConfigResult(f"{label}, lr={lr:g}", {"train.label": label, "optim.lr": lr}, recs[0]["config"],
                                        list(recs), list(mets)))
    text = table_lr_intervals(configs)
    assert baseline_of(configs) is configs[0]
    d, _ = comparison(configs[3], configs[1])  # bf16 at lr 0.1 against the baseline at lr 0.1
    assert d.mean == pytest.approx(0.05)
    assert f"| bf16 | 0.1 |" in text and f"{d.mean:+.3f} [{d.ci_lo:+.3f}, {d.ci_hi:+.3f}] (n=8)" in text
    m = stats.mean_interval(configs[0].eval_losses())
    assert f"{m.mean:.3f} [{m.ci_lo:.3f}, {m.ci_hi:.3f}]" in text


def test_precondition_of_an_lr_sweep_names_the_lrs_at_which_the_baseline_line_learns():
    """lr_width run 2: the baseline row is the line's first lr (1e-3, too slow to learn); the precondition must
    still say at which lrs the line learns, since the lr table compares every row with it at the same lr."""
    configs = []
    for lr, outcome in ((0.001, "failed_to_learn"), (0.003, "stable"), (0.01, "failed_to_learn")):
        recs, mets = zip(*[make_record("baseline", s, 2.0 + SEED_EFFECT[s], outcome, lr=lr, extra={"optim.lr": lr})
                           for s in SEEDS])
        configs.append(ConfigResult(f"baseline, lr={lr:g}", {"train.label": "baseline", "optim.lr": lr},
                                    recs[0]["config"], list(recs), list(mets)))
    line = baseline_learns_line(configs)
    assert "it does NOT learn" in line  # the first row itself
    assert ("the baseline's line over the lr grid (the lr table compares every row with it at the same lr): every "
            "seed learns at lr 0.003; not every seed does at lr 0.001, 0.01.") in line
    assert "lr grid" not in baseline_learns_line(configs[1:2])  # no lr axis: nothing added


def test_report_cli_takes_the_paired_test(report, tmp_path, capsys):
    from precision_lab.cli import main

    path, _ = report
    assert main(["report", str(path), "--figures", str(tmp_path), "--paired-test", "wilcoxon"]) == 0
    assert "p (Wilcoxon signed-rank)" in (path / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(path), "--paired-test", "wilcox"]) == 2  # argparse names the choices
    assert "invalid choice: 'wilcox' (choose from 't', 'wilcoxon')" in capsys.readouterr().err


def test_router_overflow_table_counts_crossings_before_divergence():
    """Issue 14 (4a): a seed whose router logit crosses ln 65504 = 11.09 and then diverges is counted as
    'diverged after crossing'; a seed that diverges with small logits is not; NaN steps never cross."""
    from precision_lab.report import ConfigResult, first_crossing, table_router_overflow

    assert first_crossing(np.array([1.0, np.nan, 12.0, 13.0]), 11.09) == 2
    assert first_crossing(np.array([1.0, np.nan]), 11.09) is None
    recs, mets = [], []
    for seed, (peak, outcome) in enumerate([(14.0, "diverged"), (3.0, "diverged"), (5.0, "stable")]):
        record, metrics = make_record("fp16-router", seed, 2.0, outcome)
        logit = np.linspace(0.5, peak, STEPS)[:, None].repeat(2, 1)  # [steps, layers]
        if outcome == "diverged":
            logit[60:] = np.nan  # frozen after its divergence at step 60
            record["result"]["divergence_step"] = 60
        recs.append(record)
        mets.append({**metrics, "router_max_abs_logit": logit.astype(np.float32)})
    c = ConfigResult("fp16-router", recs[0]["overrides"], recs[0]["config"], recs, mets)
    table = table_router_overflow([c])
    row = [line for line in table.splitlines() if line.startswith("| fp16-router")][0]
    cells = [x.strip() for x in row.split("|")]
    # seed 0 would cross 11.09 only at index 235, but it froze at 60: no seed crossed while finite
    assert cells[3] == "0/3" and cells[4].startswith("2/3 (60") and cells[5] == "0/2"
    recs[0]["result"]["divergence_step"] = 250
    mets[0]["router_max_abs_logit"][60:] = np.linspace(0.5, 14.0, STEPS)[60:, None]
    mets[0]["router_max_abs_logit"][251:] = np.nan
    row = [line for line in table_router_overflow([c]).splitlines() if line.startswith("| fp16-router")][0]
    cells = [x.strip() for x in row.split("|")]
    assert cells[3].startswith("1/3 (") and cells[5] == "1/2"


def test_precision_telemetry_table_reads_early_and_late_windows():
    """The table that shows whether a precision knob reached its regime: early vs late means, '-' for
    series a run did not record, and a plain sentence when no run recorded any."""
    from precision_lab.report import ConfigResult, table_precision_telemetry

    record, metrics = make_record("bf16-master", 0, 2.0, "stable")
    lost = np.where(np.arange(STEPS) < 30, 0.01, 0.5).astype(np.float32)  # rises late: round-to-nearest stall
    c = ConfigResult("bf16-master", record["overrides"], record["config"], [record],
                     [{**metrics, "lost_update_frac": lost}])
    row = [r for r in table_precision_telemetry([c]).splitlines() if r.startswith("| bf16-master")][0]
    assert "0.01 / 0.5" in row
    bare = ConfigResult("fp32", record["overrides"], record["config"], [record], [metrics])
    assert "No precision telemetry" in table_precision_telemetry([bare])


def test_a_partial_store_says_how_much_of_the_sweep_it_holds(tmp_path):
    """A sweep run over several sessions (or one shard of it) is reported as partial, with the count of
    stored runs and complete shape groups; a complete store says nothing of the kind."""
    fill_store(tmp_path)
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    manifest["runs"].append({"run_id": "not-yet-run", "group_key": "later", "seed": 0, "overrides": {}})
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    text = write_report(tmp_path).read_text()
    n = len(manifest["runs"])
    assert f"**Partial results:** {n - 1} of the sweep's {n} runs are stored (5 of 6 shape groups complete)" in text


def test_a_complete_store_is_not_called_partial(report):
    assert "Partial results" not in report[1]
