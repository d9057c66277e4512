"""Divergence onset (issue 14 item 5): the logistic fit of P(diverge | lr) with profile-likelihood intervals,
its honest answers under separation, the shift between two policies, precursor lead times, and the report
table and figures built on them (synthetic results: no training)."""

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.special import expit

from precision_lab import stats
from precision_lab.errors import UserError

LRS = [0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0]
SEEDS = [16] * len(LRS)
CRIT = sps.chi2.ppf(0.95, 1)


def _simulate(rng, onset, slope=5.0, seeds=16, lrs=LRS):
    return rng.binomial(seeds, expit(slope * (np.log10(lrs) - math.log10(onset))))


def test_onset_interval_covers_the_true_onset_in_a_seeded_simulation():
    """50 simulated experiments (7 lrs x 16 seeds, true onset 0.3, slope 5 logit per decade): the 95%
    profile-likelihood interval covers 0.3 in at least 88% of them (measured: 45/50), every one is a fit,
    and the estimates centre on the truth."""
    rng = np.random.default_rng(20261201)
    fits = [stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.3)) for _ in range(50)]
    assert all(f.status == "fit" for f in fits)
    covered = sum(f.ci_lo <= 0.3 <= f.ci_hi for f in fits)
    assert covered >= 44, covered
    assert abs(np.median([math.log10(f.onset_lr) for f in fits]) - math.log10(0.3)) < 0.03


def test_onset_fit_is_the_maximum_likelihood_and_its_interval_the_likelihood_ratio_set():
    k = np.array([2, 2, 2, 4, 10, 12, 15])
    f = stats.divergence_onset(LRS, SEEDS, k)
    x = np.log10(LRS)
    n = np.array(SEEDS)

    def loglik(a, b):
        return np.sum(sps.binom.logpmf(k, n, expit(a + b * x)))

    best = loglik(f.intercept, f.slope)
    # a maximum: no nearby point is better, and the onset is where the fitted P is one half
    for da, db in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert loglik(f.intercept + da, f.slope + db) < best
    assert f.probability(f.onset_lr) == pytest.approx(0.5)
    assert f.ci_lo < f.onset_lr < f.ci_hi

    # each interval end: the best likelihood with the onset held there is the chi-square 95% point below
    def profile(onset):  # brute force over a fine grid of slopes
        b = np.linspace(0.01, 30, 30001)[:, None]
        return np.max(np.sum(sps.binom.logpmf(k, n, expit(b * (x - math.log10(onset)))), axis=1))

    for end in (f.ci_lo, f.ci_hi):
        assert 2 * (best - profile(end)) == pytest.approx(CRIT, abs=0.02)


@pytest.mark.parametrize("diverged, status", [
    ([0] * 7, "all_stable"),
    ([16] * 7, "all_diverged"),
    ([0, 0, 0, 0, 16, 16, 16], "separated"),
    ([0, 0, 0, 5, 16, 16, 16], "separated"),
    ([16, 16, 5, 0, 0, 0, 0], "decreasing"),
    ([8] * 7, "decreasing"),
])
def test_separation_and_one_sided_outcomes_give_no_point_estimate(diverged, status):
    f = stats.divergence_onset(LRS, SEEDS, diverged)
    assert f.status == status and f.onset_lr is None and f.reason
    if status == "all_stable":  # a lower bound at the top of the grid (16 stable seeds there exclude lower)
        assert f.ci_hi is None and f.ci_lo == pytest.approx(1.0, rel=1e-3)
        assert "above the highest lr" in f.reason
    if status == "all_diverged":
        assert f.ci_lo is None and f.ci_hi == pytest.approx(0.1, rel=1e-3)
    if status == "separated":
        assert f.bracket[0] < f.bracket[1] and f.ci_lo is not None and f.ci_hi is not None
        assert f.bracket[0] <= f.ci_lo < f.ci_hi <= f.bracket[1]
    if diverged == [0, 0, 0, 0, 16, 16, 16]:
        assert f.bracket == (0.3, 0.45) and "complete separation" in f.reason
    if diverged == [0, 0, 0, 5, 16, 16, 16]:  # one mixed lr: the step is there, its slope unbounded
        assert f.bracket == (0.2, 0.45) and "quasi-complete" in f.reason and f.ci_lo < 0.3 < f.ci_hi


def test_few_seeds_widen_the_separated_set_and_one_lr_is_refused_a_fit():
    f = stats.divergence_onset([0.3, 1.0], [2, 2], [0, 2])
    assert f.status == "separated" and f.ci_lo < 0.3 and f.ci_hi > 1.0  # 2 seeds cannot exclude much
    assert stats.divergence_onset([0.3], [16], [5]).status == "too_few_lrs"
    edge = stats.divergence_onset([0.3, 1.0], [16, 16], [0, 5])  # mixed only at the top lr: no upper end
    assert edge.status == "separated" and edge.bracket == (0.3, None) and "above lr 0.3" in edge.reason
    # runs at the same lr pool
    assert stats.divergence_onset([0.3, 0.3, 1.0], [8, 8, 16], [0, 0, 16]).seeds == (16, 16)


@pytest.mark.parametrize("lrs, seeds, diverged", [
    ([0.1, 0.2], [16, 16], [0, 17]),
    ([0.1, -0.2], [16, 16], [0, 1]),
    ([0.1, 0.2], [16], [0, 1]),
    ([0.1, 0.2], [16, 0], [0, 0]),
    ([0.1, 0.2], [16, 16], [0, 1.5]),
])
def test_bad_onset_input_is_a_user_error(lrs, seeds, diverged):
    with pytest.raises(UserError):
        stats.divergence_onset(lrs, seeds, diverged)


def test_onset_shift_covers_a_known_shift_and_is_zero_against_itself():
    rng = np.random.default_rng(7)
    base = stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.4))
    low = stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.25))
    d = stats.onset_shift(low, base)
    truth = math.log10(0.25 / 0.4)
    assert d.ci_lo <= truth <= d.ci_hi and d.ci_hi < 0 and d.p_value < 0.05
    assert d.shift == pytest.approx(math.log10(low.onset_lr / base.onset_lr))
    assert d.ratio == pytest.approx(low.onset_lr / base.onset_lr)
    assert d.ratio_ci[0] == pytest.approx(10 ** d.ci_lo)
    same = stats.onset_shift(base, base)
    assert same.shift == 0 and same.p_value == pytest.approx(1.0)
    assert same.ci_lo == pytest.approx(-same.ci_hi, abs=stats.ONSET_SHIFT_STEP)


def test_onset_shift_against_a_policy_that_never_diverged_is_one_sided():
    rng = np.random.default_rng(8)
    never = stats.divergence_onset(LRS, SEEDS, [0] * 7)
    low = stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.25))
    d = stats.onset_shift(low, never)
    assert d.shift is None and "baseline: all_stable" in d.reason
    assert d.ci_lo is None and d.ci_hi < math.log10(0.25 / 1.0) + 0.1  # at least ~4x lower, how much: open
    assert d.p_value < 1e-3
    flat = stats.divergence_onset(LRS, SEEDS, [8] * 7)
    none = stats.onset_shift(flat, never)
    assert none.ci_lo is None and none.ci_hi is None and "does not rise" in none.reason


def test_precursor_lead_counts_the_uninterrupted_run_into_the_divergence():
    steps = 12
    reference = np.stack([np.linspace(1, 2, steps), np.linspace(1.5, 2.5, steps)])  # max: row 1
    series = reference[1].copy()
    series[3] += 1.0  # an isolated excursion that came back: not the precursor
    series[7:10] += 1.0  # above from step 7 to 9; divergence at step 10
    assert stats.precursor_lead(series, reference, 10) == 3
    assert stats.precursor_lead(series, reference, 11) is None  # back inside at step 10
    assert stats.precursor_lead(series, reference, 0) is None
    series[:10] = np.inf
    assert stats.precursor_lead(series, reference, 10) == 10
    gap = reference.copy()
    gap[:, 8] = np.nan  # no stable value at step 8 interrupts the run
    series = reference[1] + 1.0
    assert stats.precursor_lead(series, gap, 10) == 1
    with pytest.raises(UserError):
        stats.precursor_lead(series, reference[:, :5], 10)


# -- report and figures (synthetic ConfigResults) ---------------------------------------------------------------


def _config(policy, lr, diverged, *, steps=30, telemetry=True, blowup_at=20):
    """A configuration of `len(diverged)` seeds; a diverged seed's grad norm leaves the stable range 5 steps
    before its divergence step and its router logit 2 steps before; telemetry=False leaves out underflow."""
    from precision_lab.report import ConfigResult, label_of

    records, metrics = [], []
    for i, d in enumerate(diverged):
        base = 1.0 + 0.01 * i
        grad = np.full(steps, base)
        logit = np.tile(np.full(steps, 2.0 + 0.01 * i)[:, None], (1, 2))
        if d:
            grad[blowup_at - 5:] = 10.0
            logit[blowup_at - 2:] = 50.0
        m = {"ce": np.full(steps, 4.0), "grad_norm": grad, "update_rms": np.full(steps, 1e-3),
             "router_max_abs_logit": logit, "router_mean_lse_sq": logit * 0 + 1.0,
             "output_z_loss": np.full(steps, 25.0), "max_attention_logit": np.full(steps, 3.0)}
        if telemetry:
            m["underflow_frac/grads"] = np.full(steps, 0.01)
        else:  # as random routing records its router telemetry: NaN
            m["router_mean_lse_sq"] = np.full((steps, 2), np.nan)
        metrics.append(m)
        records.append({"seed": i, "resolved": {"optim": {"lr": lr}, "policy": policy},
                        "result": {"diverged": d, "final_eval_loss": None if d else 2.5, "quality_gap": None,
                                   "divergence_step": blowup_at if d else None,
                                   "divergence_rule": "nonfinite" if d else None,
                                   "outcome": "diverged" if d else "stable"}})
    overrides = {"policy": policy, "train.label": policy, "optim.lr": lr}
    hidden = frozenset({"policy"})  # zipped with train.label, as in a sweep
    return ConfigResult(label=label_of(overrides, hidden), overrides=overrides, config={}, records=records,
                        metrics=metrics, hidden=hidden)


def _sweep(telemetry_bf16=True):
    out = []
    for lr, k in zip([0.1, 0.2, 0.4, 0.8], [0, 1, 2, 5]):
        out.append(_config("fp32", lr, [j < k for j in range(6)]))
    for lr, k in zip([0.1, 0.2, 0.4, 0.8], [0, 3, 5, 6]):
        out.append(_config("bf16", lr, [j < k for j in range(6)], telemetry=telemetry_bf16))
    return out


def test_onset_table_fits_each_policy_line_and_shifts_against_the_baseline_line():
    from precision_lab import report

    configs = _sweep()
    fits = report.onset_fits(configs)
    assert list(fits) == ["fp32", "bf16"]  # lines are lr_lines': every axis but the lr
    assert fits["fp32"][1].diverged == (0, 1, 2, 5) and fits["bf16"][1].diverged == (0, 3, 5, 6)
    table = report.table_onset(configs)
    assert "| fp32 | 0.1 0.2 0.4 0.8 | 6 6 6 6 | 0 1 2 5 |" in table and "baseline line" in table
    bf16 = next(line for line in table.splitlines() if line.startswith("| bf16 |"))
    f = fits["bf16"][1]
    assert f"{f.onset_lr:.3g} [{f.ci_lo:.3g}, {f.ci_hi:.3g}]" in bf16
    d = stats.onset_shift(f, fits["fp32"][1])
    assert f"x{d.ratio:.3g}" in bf16 and f"({d.shift:+.3f} decades)" in bf16
    # all stable: a bound, not a number; a separated line: no point estimate of the shift, but its interval
    calm = [_config("fp32", lr, [False] * 4) for lr in (0.1, 0.2)]
    assert "> 0.2 (no seed diverged; 95% lower bound" in report.table_onset(calm)
    cliff = [_config("bf16", lr, [lr > 0.3] * 6) for lr in (0.1, 0.2, 0.4, 0.8)]
    row = report.table_onset(configs[:4] + cliff).splitlines()[-1]
    assert "no point estimate (complete separation: the step lies between lr 0.2 and 0.4)" in row
    assert "no point estimate (policy: separated); ratio 95% CI [" in row


def test_precursor_table_finds_the_first_series_and_says_what_is_absent():
    from precision_lab import report

    configs = _sweep(telemetry_bf16=False)
    pre = report.precursors([c for c in configs if c.overrides["policy"] == "fp32"])
    assert pre.seeds == 3 and pre.unreferenced == (("fp32, lr=0.8", 5),)  # lr 0.8: one stable seed left
    assert pre.leads["grad_norm"] == [5, 5, 5] and pre.leads["router_max_logit"] == [2, 2, 2]
    assert pre.leads["update_rms"] == [None] * 3
    table = report.table_precursors(configs)
    assert "| fp32 | gradient norm | 3 | 3/3 | 3 | 5 [5, 5] |" in table
    assert "| fp32 | router max abs logit (max over sparse layers) | 3 | 3/3 | 0 | 2 [2, 2] |" in table
    assert "| bf16 | underflow fraction of gradients (precision telemetry) | 3 | not recorded in these runs |" in table
    assert "| bf16 | router logsumexp^2 (z-loss; max over sparse layers) | 3 | not recorded in these runs |" in table
    assert "not recorded in these runs" in table and "without a reference" in table
    calm = [_config("fp32", lr, [False] * 2) for lr in (0.1, 0.2)]
    assert "| fp32 | - | 0 | no seed diverged | - | - |" in report.table_precursors(calm)


def test_onset_and_precursor_figures_are_drawn(tmp_path):
    from precision_lab import figures

    assert {"divergence_onset", "precursor_lead_time"} <= set(figures.SWEEP_FIGURES)
    configs = _sweep(telemetry_bf16=False)
    for name in ("divergence_onset", "precursor_lead_time"):
        paths = figures.SWEEP_FIGURES[name](configs, tmp_path, name)
        assert paths[0].suffix == ".png" and paths[0].stat().st_size > 1000
    calm = [_config("fp32", lr, [False] * 2) for lr in (0.1, 0.2)]  # nothing diverged: still a figure
    assert figures.SWEEP_FIGURES["precursor_lead_time"](calm, tmp_path, "calm")[0].stat().st_size > 1000


@pytest.mark.slow
def test_onset_and_shift_intervals_have_nominal_coverage():
    """The profile-likelihood intervals are asymptotic (chi-square calibration); at the experiment's size
    (7 lrs x 16 seeds, slope 5 logit per decade) they cover the truth as often as they claim. Measured: the
    onset interval 380/400 = 95%, the shift interval 96/100 (about 40 s on 2 busy cores)."""
    rng = np.random.default_rng(1)
    covered = sum(f.ci_lo is not None and f.ci_hi is not None and f.ci_lo <= 0.3 <= f.ci_hi
                  for f in (stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.3)) for _ in range(400)))
    assert 0.92 <= covered / 400 <= 0.98, covered
    truth, hits = math.log10(0.25 / 0.4), 0
    for _ in range(100):
        base = stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.4))
        d = stats.onset_shift(stats.divergence_onset(LRS, SEEDS, _simulate(rng, 0.25)), base)
        hits += d.ci_lo is not None and d.ci_hi is not None and d.ci_lo <= truth <= d.ci_hi
    assert hits >= 88, hits
