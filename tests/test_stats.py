"""precision_lab.stats against scipy results and hand-worked examples: intervals, paired tests, Fisher,
power and sample sizes, the plateau slope, eval vs seed noise, LR sensitivity."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from precision_lab import stats
from precision_lab.errors import UserError

# -- intervals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, expected",
    [
        (4, 6, (0.2228, 0.9567)),
        (0, 10, (0.0, 0.3085)),
        (10, 10, (0.6915, 1.0)),
        (5, 10, (0.1871, 0.8129)),
    ],
)
def test_clopper_pearson_known_values(k, n, expected):
    lo, hi = stats.clopper_pearson(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_clopper_pearson_alpha_and_errors():
    lo90, hi90 = stats.clopper_pearson(4, 6, alpha=0.1)
    lo95, hi95 = stats.clopper_pearson(4, 6)
    assert lo95 < lo90 < 4 / 6 < hi90 < hi95
    with pytest.raises(UserError):
        stats.clopper_pearson(7, 6)
    with pytest.raises(UserError):
        stats.clopper_pearson(0, 0)


def test_mean_interval_hand_worked():
    # 1, 2, 3, 4, 5: mean 3, SD sqrt(2.5), half-width t_{0.975,4} * SD / sqrt(5) = 2.7764 * 0.70711 = 1.9632
    m = stats.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0, float("nan"), None])
    assert (m.n, m.mean, m.sd) == (5, 3.0, pytest.approx(math.sqrt(2.5)))
    assert (m.ci_lo, m.ci_hi) == (pytest.approx(3 - 1.96324, abs=1e-4), pytest.approx(3 + 1.96324, abs=1e-4))
    one = stats.mean_interval([2.0])
    assert one.mean == 2.0 and math.isnan(one.sd) and math.isnan(one.ci_lo)
    assert stats.mean_interval([]).n == 0
    assert stats.mean_interval([1.5, 1.5]).ci_lo == 1.5


# -- paired comparisons ---------------------------------------------------------------------------------

A = {0: 3.30, 1: 3.25, 2: 3.41, 3: 3.28, 4: 3.35, 5: 3.31, 6: 3.22, 7: 3.38}
B = {0: 3.49, 1: 3.40, 2: 3.52, 3: 3.51, 4: 3.44, 5: 3.50, 6: 3.37, 7: 3.58}


def test_paired_t_matches_scipy_and_hand_example():
    d = stats.paired_difference(B, A)
    a = np.array(list(A.values()))
    b = np.array(list(B.values()))
    ref = sps.ttest_rel(b, a)
    ci = ref.confidence_interval()
    assert d.test == "paired t" and d.n == 8 and d.seeds == tuple(range(8))
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert (d.ci_lo, d.ci_hi) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    # By hand: differences .19 .15 .11 .23 .09 .19 .15 .20: mean 0.16375, sum of squared deviations
    # 0.0157875, SD sqrt(0.0157875 / 7) = 0.047491, t = 0.16375 / (0.047491 / sqrt 8) = 9.752 on 7 df
    assert d.mean == pytest.approx(0.16375)
    assert d.sd == pytest.approx(0.047491, abs=1e-6)
    assert d.mean / (d.sd / math.sqrt(8)) == pytest.approx(9.752, abs=1e-3)
    assert d.p_value < 1e-4 and d.significant
    assert d.seeds_for_power == 3  # an effect of 3.4 SD: power 0.30 with 2 pairs, 0.83 with 3


def test_paired_pairs_by_seed_and_skips_missing_or_nonfinite():
    values = {0: 1.0, 1: 2.0, 2: float("nan"), 3: 4.0, 9: 5.0}
    base = {0: 0.5, 1: 1.0, 2: 1.0, 3: 3.0, 4: 1.0}
    d = stats.paired_difference(values, base)
    assert d.seeds == (0, 1, 3) and d.mean == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    empty = stats.paired_difference({0: 1.0}, {1: 1.0})
    assert empty.n == 0 and math.isnan(empty.p_value) and empty.seeds_for_power is None


def test_wilcoxon_option_is_scipy_and_named():
    d = stats.paired_difference(B, A, test="wilcoxon")
    ref = sps.wilcoxon(np.array(list(B.values())), np.array(list(A.values())))
    assert d.test == "Wilcoxon signed-rank"
    assert d.p_value == pytest.approx(ref.pvalue)
    assert d.p_value == pytest.approx(2 / 2**8)  # exact: all 8 differences positive, two-sided
    with pytest.raises(UserError, match="paired test"):
        stats.paired_difference(B, A, test="ttest")


def test_paired_t_power_and_sample_sizes_match_published_tables():
    # Cohen's d for a paired test (one-sample t on differences), alpha 0.05 two-sided, 80% power:
    # G*Power / R power.t.test(type="paired") give n = 34 (d 0.5), 15 (d 0.8), 10 (d 1.0).
    assert stats.paired_t_seeds_for_power(0.5, 1.0) == 34
    assert stats.paired_t_seeds_for_power(-0.8, 1.0) == 15  # the sign does not matter
    assert stats.paired_t_seeds_for_power(0.1, 0.1) == 10
    assert stats.paired_t_power(0.5, 1.0, 34) == pytest.approx(0.8078, abs=1e-3)
    assert stats.paired_t_power(0.5, 1.0, 33) < 0.8
    assert stats.paired_t_seeds_for_power(1e-4, 1.0) == stats.MAX_SEEDS + 1
    # no effect: power is the false-positive rate
    assert stats.paired_t_power(0.0, 1.0, 8) == pytest.approx(0.05)


# -- fractions stable -------------------------------------------------------------------------------------


def test_fisher_p_value_is_scipys():
    r = stats.fisher_exact_test(4, 6, 6, 6)
    assert r.p_value == pytest.approx(sps.fisher_exact([[4, 2], [6, 0]]).pvalue)
    assert r.p_value == pytest.approx(0.4545, abs=1e-4)  # by hand: (C(6,4) + C(6,2)... ) = 5/11
    same = stats.fisher_exact_test(8, 8, 8, 8)
    assert same.p_value == 1.0 and same.seeds_for_power is None and math.isnan(same.power)
    with pytest.raises(UserError):
        stats.fisher_exact_test(9, 8, 8, 8)


def test_fisher_rejection_region_agrees_with_scipy_on_every_small_table():
    for n1 in (1, 2, 3, 5, 8, 12):
        for n2 in (1, 3, 4, 8, 9):
            region = stats._fisher_rejects(n1, n2, 0.05)
            for a in range(n1 + 1):
                for b in range(n2 + 1):
                    p = sps.fisher_exact([[a, n1 - a], [b, n2 - b]]).pvalue
                    assert region[a, b] == (p <= 0.05), (n1, a, n2, b, p)


def test_fisher_power_pins_paper_numbers():
    """PAPER.md section 13: with 8 seeds per arm a Fisher test has about 9% power to tell a 4/6-like fraction
    stable (2/3) from 1.0; about 20 seeds per arm are needed for 80%. Exact enumeration gives 8.8% and 19."""
    assert stats.fisher_power(4 / 6, 1.0, 8, 8) == pytest.approx(0.0879, abs=1e-4)
    # with p2 = 1 every baseline seed is stable; the test rejects exactly when k1 <= 3 of 8: P(Bin(8, 2/3) <= 3)
    assert stats.fisher_power(4 / 6, 1.0, 8, 8) == pytest.approx(sps.binom.cdf(3, 8, 2 / 3))
    assert stats.fisher_seeds_for_power(4 / 6, 1.0) == 19
    assert stats.fisher_power(4 / 6, 1.0, 19, 19) >= 0.8 > stats.fisher_power(4 / 6, 1.0, 18, 18)
    r = stats.fisher_exact_test(4, 6, 6, 6)
    assert r.seeds_for_power == 19 and r.power == pytest.approx(stats.fisher_power(4 / 6, 1.0, 6, 6))
    # false-positive rate under the null stays below alpha (Fisher is conservative)
    assert stats.fisher_power(0.7, 0.7, 8, 8) < 0.05


# -- plateau, noise, LR sensitivity ------------------------------------------------------------------------


def test_plateau_slope_on_known_lines():
    steps = np.arange(0, 1001, 10)
    flat = 3.0 + 0.0 * steps
    falling = 3.0 - 1e-3 * steps
    rng = np.random.default_rng(0)
    noisy = np.stack([flat + 0.01 * rng.standard_normal(steps.size) for _ in range(4)])
    s = stats.plateau_slope(steps, noisy)
    assert s.window == (800, 1000) and s.points == 21 and s.seeds == 4
    assert s.ci_lo < 0 < s.ci_hi and not s.still_falling
    f = stats.plateau_slope(steps, np.stack([falling, falling + 0.1, falling - 0.05]))
    assert f.slope == pytest.approx(-1e-3) and f.still_falling
    assert f.change_over_window == pytest.approx(-0.2)
    assert (f.verdict(0.1), f.verdict(0.3), s.verdict(0.1)) == ("still falling", "falling slowly", "plateaued")
    # one seed: the regression's own interval, from scipy.stats.linregress
    one = stats.plateau_slope(steps, noisy[0])
    ref = sps.linregress(steps[steps >= 800], noisy[0][steps >= 800])
    assert one.slope == pytest.approx(ref.slope)
    assert one.ci_hi - one.slope == pytest.approx(sps.t.ppf(0.975, 19) * ref.stderr)
    assert stats.plateau_slope([0, 1], [[1.0, 2.0]]).seeds == 0  # too few points: NaN slope


def test_eval_vs_seed_noise():
    # per seed, four eval batches; SE = SD(batches) / 2
    batches = [[3.0, 3.2, 3.1, 2.9], [3.3, 3.1, 3.2, 3.0]]
    finals = [3.05, 3.15]
    n = stats.eval_vs_seed_noise(batches, finals)
    se = [np.std(b, ddof=1) / 2 for b in batches]
    assert n.eval_se == pytest.approx(math.sqrt(np.mean(np.square(se))))
    assert n.seed_sd == pytest.approx(np.std(finals, ddof=1)) and n.seeds == 2 and n.eval_batches == 4
    assert n.eval_below_seed == (n.eval_se < n.seed_sd)


def test_lr_sensitivity_hand_example():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    losses = [3.0, 2.5, 2.0, 5.0, np.nan]  # 5.0 is capped at init 4.0; NaN counts as 4.0
    # best = 2.0; terms: 1.0, 0.5, 0.0, 2.0, 2.0 -> mean 1.1
    assert stats.lr_sensitivity(lrs, losses, loss_at_init=4.0) == pytest.approx(1.1)
    assert stats.lr_sensitivity(lrs, [2.0] * 5, loss_at_init=4.0) == 0.0
    with pytest.raises(UserError):
        stats.lr_sensitivity(lrs, losses[:3], loss_at_init=4.0)
