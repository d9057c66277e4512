"""The lab's statistics, in one place: every interval, test and power figure that reports, figures and
divergence print comes from here, and every test is scipy.stats' (nothing hand-rolled but the enumeration
of Fisher power, which sums scipy's own hypergeometric probabilities and is checked against
`scipy.stats.fisher_exact` table by table in tests/test_stats.py).

Conventions:
  * Seeds share data streams (seed s of every configuration sees the same batches), so comparisons between
    configurations are paired by seed: `paired_difference(values, baseline)` takes {seed: value} maps and
    uses the seeds present (and finite) in both.
  * Intervals are two-sided 95% unless `confidence` says otherwise; "+-" in reports is always labelled SD or
    CI (`MeanInterval.sd` vs `MeanInterval.ci`).
  * Power is for two-sided tests at alpha = 0.05 and the effect as observed (mean paired difference and its
    SD; the two observed fractions stable): "how many seeds per arm would detect this effect 80% of the
    time", not a claim that the effect is real.

Public API:
  clopper_pearson(k, n)                       exact binomial interval (fraction of seeds stable)
  mean_interval(values)                        mean, SD and t-interval of the mean
  paired_difference(values, baseline, test=)   paired t (or Wilcoxon signed-rank) against a baseline row
  paired_t_power(effect, sd, n), paired_t_seeds_for_power(effect, sd)   noncentral-t power
  fisher_exact_test(k1, n1, k2, n2)            Fisher's exact test of two fractions stable
  fisher_power(p1, p2, n1, n2), fisher_seeds_for_power(p1, p2)           exact power by enumeration
  plateau_slope(steps, losses)                 slope of a loss over the last 20% of steps, with its CI
  eval_vs_seed_noise(batch_losses, final_losses)   evaluation noise beside seed noise
  lr_sensitivity(lrs, losses, loss_at_init)    Wortsman et al. 2023
  divergence_onset(lrs, seeds, diverged)       logistic fit of P(diverge | lr): onset lr with a profile-
                                               likelihood 95% interval; separation reported, not fitted
  onset_shift(fit, baseline)                   shift of the onset between two policies, profile-likelihood CI
  precursor_lead(series, reference, step)      steps a diverged seed's telemetry ran above the stable seeds'
  entropy(counts, axis), mutual_information(table)   plug-in entropy and mutual information (nats) of counts
  permutation_p(observed, null)                one-sided permutation p-value, (1 + #null >= observed) / (1 + n)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy import stats as sps

from precision_lab.errors import UserError, unknown_choice

ALPHA = 0.05
POWER = 0.8
# The seed-count searches stop here: beyond it "more than MAX_SEEDS" is the honest answer.
MAX_SEEDS = 200
PAIRED_TESTS = {"t": "paired t", "wilcoxon": "Wilcoxon signed-rank"}


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided 1-alpha interval for a binomial proportion k/n."""
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise UserError(f"n must be an integer >= 1, got {n!r}")
    if not (isinstance(k, (int, np.integer)) and 0 <= k <= n):
        raise UserError(f"k must be an integer in [0, n={n}], got {k!r}")
    _check_alpha(alpha)
    lo = 0.0 if k == 0 else float(sps.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(sps.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}")


# -- one configuration ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeanInterval:
    """n values: their mean, sample SD (ddof=1) and the t-interval of the mean (ci_lo, ci_hi).

    sd and the interval are NaN for n < 2; everything is NaN for n == 0."""

    n: int
    mean: float
    sd: float
    ci_lo: float
    ci_hi: float


def mean_interval(values: Sequence[float], confidence: float = 1 - ALPHA) -> MeanInterval:
    """Mean with its `confidence` t-interval over the finite entries of `values` (non-finite are dropped)."""
    x = _finite(values)
    nan = float("nan")
    if x.size == 0:
        return MeanInterval(n=0, mean=nan, sd=nan, ci_lo=nan, ci_hi=nan)
    if x.size == 1:
        return MeanInterval(n=1, mean=float(x[0]), sd=nan, ci_lo=nan, ci_hi=nan)
    sd = float(np.std(x, ddof=1))
    if sd == 0.0:  # scipy's interval is NaN for zero spread; the interval of a constant is the point
        lo = hi = float(x.mean())
    else:
        lo, hi = sps.t.interval(confidence, x.size - 1, loc=x.mean(), scale=sd / math.sqrt(x.size))
    return MeanInterval(n=int(x.size), mean=float(x.mean()), sd=sd, ci_lo=float(lo), ci_hi=float(hi))


def _finite(values) -> np.ndarray:
    x = np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))], float)
    return x[np.isfinite(x)]


# -- paired comparisons ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """Mean over shared seeds of (value - baseline value), its t-interval, a two-sided p-value and power.

    test: the name of the test that gave p_value ("paired t" or "Wilcoxon signed-rank"); the interval is
      always the paired-t interval of the mean difference. seeds: the seeds used (both finite).
    seeds_for_power: seeds per arm a paired t test would need to detect the observed mean difference (with
      the observed SD of the differences) with POWER at ALPHA; None when the observed difference is 0 or
      there are fewer than 2 pairs, MAX_SEEDS + 1 when it would take more than MAX_SEEDS.
    """

    n: int
    mean: float
    sd: float
    ci_lo: float
    ci_hi: float
    p_value: float
    test: str
    seeds: tuple[int, ...]
    power: float  # power of the paired t test at this n for the observed effect (NaN if undefined)
    seeds_for_power: int | None

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < ALPHA


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float], *, test: str = "t",
                      confidence: float = 1 - ALPHA) -> PairedDifference:
    """Compare `values` with `baseline` (both {seed: value}) seed by seed: values[s] - baseline[s].

    test: "t" (scipy.stats.ttest_rel) or "wilcoxon" (scipy.stats.wilcoxon, exact for small n).
    """
    if test not in PAIRED_TESTS:
        raise unknown_choice("paired test", test, PAIRED_TESTS)
    seeds = tuple(sorted(s for s in set(values) & set(baseline) if _ok(values[s]) and _ok(baseline[s])))
    a = np.array([values[s] for s in seeds], float)
    b = np.array([baseline[s] for s in seeds], float)
    d = a - b
    nan = float("nan")
    summary = mean_interval(d, confidence)
    p = nan
    if d.size >= 2:
        if np.all(d == 0):
            p = 1.0
        elif test == "t":
            p = float(sps.ttest_rel(a, b).pvalue) if summary.sd > 0 else 0.0
        else:
            p = float(sps.wilcoxon(a, b).pvalue)
    power, need = nan, None
    if d.size >= 2 and summary.mean != 0:
        power = paired_t_power(summary.mean, summary.sd, d.size)
        need = paired_t_seeds_for_power(summary.mean, summary.sd)
    return PairedDifference(n=int(d.size), mean=summary.mean, sd=summary.sd, ci_lo=summary.ci_lo,
                            ci_hi=summary.ci_hi, p_value=p, test=PAIRED_TESTS[test], seeds=seeds, power=power,
                            seeds_for_power=need)


def _ok(v) -> bool:
    return v is not None and math.isfinite(v)


def paired_t_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t test with n pairs when the differences have mean `effect` and SD `sd`.

    The statistic follows a noncentral t with n - 1 degrees of freedom and noncentrality
    effect / sd * sqrt(n) (scipy.stats.nct); power is the chance it falls outside +-t_{1-alpha/2, n-1}.
    """
    _check_alpha(alpha)
    if n < 2:
        raise UserError(f"a paired t test needs n >= 2 pairs, got {n!r}")
    if sd == 0:
        return 1.0 if effect != 0 else alpha
    df = n - 1
    nc = effect / sd * math.sqrt(n)
    crit = sps.t.ppf(1 - alpha / 2, df)
    # P(T < -crit) is written as P(T' > crit) with the noncentrality negated: scipy's nct.cdf far in the
    # lower tail returns NaN for noncentralities above ~18, its sf returns the 0 it should.
    return float(sps.nct.sf(crit, df, abs(nc)) + sps.nct.sf(crit, df, -abs(nc)))


def _bisect_first(reaches, lo: int, hi: int) -> int:
    """The smallest n in (lo, hi] with reaches(n), given reaches(hi) and not reaches(lo)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi


def paired_t_seeds_for_power(effect: float, sd: float, power: float = POWER, alpha: float = ALPHA) -> int:
    """Smallest number of pairs (>= 2) whose paired t test reaches `power`; MAX_SEEDS + 1 if none <= MAX_SEEDS.

    Power rises with n for a fixed standardised effect, so a bisection over n finds the first crossing.
    """
    if paired_t_power(effect, sd, MAX_SEEDS, alpha) < power:
        return MAX_SEEDS + 1
    lo, hi = 2, MAX_SEEDS  # power(hi) >= power
    if paired_t_power(effect, sd, lo, alpha) >= power:
        return lo
    return _bisect_first(lambda n: paired_t_power(effect, sd, n, alpha) >= power, lo, hi)


# -- fractions stable ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FisherResult:
    """Fisher's exact test of k1/n1 vs k2/n2 (two-sided), with the power of the test for the observed
    fractions at these arm sizes and the seeds per arm that would reach POWER (None if the fractions are
    equal; MAX_SEEDS + 1 when beyond MAX_SEEDS)."""

    k1: int
    n1: int
    k2: int
    n2: int
    p_value: float
    power: float
    seeds_for_power: int | None


def fisher_exact_test(k1: int, n1: int, k2: int, n2: int) -> FisherResult:
    """k1 of n1 seeds stable against k2 of n2 (e.g. a row against the baseline): scipy.stats.fisher_exact."""
    for k, n in ((k1, n1), (k2, n2)):
        if not (0 <= k <= n and n >= 1):
            raise UserError(f"fraction stable must be k of n with 0 <= k <= n and n >= 1, got {k} of {n}")
    p = float(sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)
    p1, p2 = k1 / n1, k2 / n2
    if p1 == p2:
        return FisherResult(k1=k1, n1=n1, k2=k2, n2=n2, p_value=p, power=float("nan"), seeds_for_power=None)
    return FisherResult(k1=k1, n1=n1, k2=k2, n2=n2, p_value=p, power=fisher_power(p1, p2, n1, n2),
                        seeds_for_power=fisher_seeds_for_power(p1, p2))


@lru_cache(maxsize=256)
def _fisher_rejects(n1: int, n2: int, alpha: float) -> np.ndarray:
    """<bool>[n1 + 1, n2 + 1]: whether the two-sided Fisher test of the table (k1 of n1, k2 of n2) has p <= alpha.

    The p-value is scipy's definition, computed for all tables of one column total K = k1 + k2 at once: k1
    is then hypergeometric (scipy.stats.hypergeom) and p sums the probabilities of the tables with that K
    that are no more likely than the observed one (relative tolerance 1e-7, as scipy.stats.fisher_exact).
    """
    rejects = np.zeros((n1 + 1, n2 + 1), bool)
    for total in range(n1 + n2 + 1):
        k1 = np.arange(max(0, total - n2), min(total, n1) + 1)
        pmf = sps.hypergeom.pmf(k1, n1 + n2, n1, total)
        p = np.sum(np.where(pmf[None, :] <= pmf[:, None] * (1 + 1e-7), pmf[None, :], 0.0), axis=1)
        rejects[k1, total - k1] = p <= alpha
    return rejects


def fisher_power(p1: float, p2: float, n1: int, n2: int, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided Fisher test with arms of n1 and n2 seeds whose true fractions stable are
    p1 and p2: the binomial probability of every table whose Fisher p-value is <= alpha (full enumeration)."""
    _check_alpha(alpha)
    if not (0 <= p1 <= 1 and 0 <= p2 <= 1):
        raise UserError(f"fractions must be in [0, 1], got {p1!r} and {p2!r}")
    w1 = sps.binom.pmf(np.arange(n1 + 1), n1, p1)
    w2 = sps.binom.pmf(np.arange(n2 + 1), n2, p2)
    return float(w1 @ _fisher_rejects(n1, n2, alpha).astype(float) @ w2)


def fisher_seeds_for_power(p1: float, p2: float, power: float = POWER, alpha: float = ALPHA) -> int:
    """Seeds per arm (both arms equal) at which the Fisher test reaches `power` for true fractions p1 and
    p2; MAX_SEEDS + 1 if it does not by MAX_SEEDS. Doubling brackets the crossing and bisection finds it.
    Exact power saw-tooths in n (the discrete rejection region jumps), so a few n just below the answer can
    also reach `power`: read it as good to a seed or two."""
    if p1 == p2:
        raise UserError("equal fractions: no sample size detects a zero difference")
    if fisher_power(p1, p2, 2, 2, alpha) >= power:
        return 2
    lo, hi = 2, 4
    while fisher_power(p1, p2, hi, hi, alpha) < power:
        if hi >= MAX_SEEDS:
            return MAX_SEEDS + 1
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    return _bisect_first(lambda n: fisher_power(p1, p2, n, n, alpha) >= power, lo, hi)


# -- training budget and noise -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slope:
    """Slope of a loss per step over a window of steps, mean over seeds with its t-interval across seeds
    (one seed: the regression's own interval). window: (first step, last step); points: points per seed."""

    slope: float
    ci_lo: float
    ci_hi: float
    seeds: int
    points: int
    window: tuple[int, int]

    @property
    def change_over_window(self) -> float:
        """The loss change the slope implies over the window (nats)."""
        return self.slope * (self.window[1] - self.window[0])

    @property
    def still_falling(self) -> bool:
        """The loss still decreases significantly (the whole interval below 0)."""
        return self.ci_hi < 0

    def verdict(self, tolerance: float) -> str:
        """"plateaued" (no significant fall), "falling slowly" (significant, but the fall over the window is
        smaller than `tolerance`, e.g. the seed SD: another window would move the loss less than seeds
        differ) or "still falling"."""
        if not self.still_falling:
            return "plateaued"
        if math.isfinite(tolerance) and abs(self.change_over_window) < tolerance:
            return "falling slowly"
        return "still falling"


def plateau_slope(steps: Sequence[int], losses, fraction: float = 0.2, confidence: float = 1 - ALPHA) -> Slope:
    """Has training plateaued? The least-squares slope (scipy.stats.linregress) of each seed's loss over the
    last `fraction` of the steps, then the mean slope over seeds with its t-interval across seeds.

    steps: <int>[n] step numbers (increasing); losses: <float>[seeds, n] or [n] (NaN entries are dropped per
    seed; seeds with fewer than 3 finite points in the window are left out). Seeds are independent, so the
    across-seed interval is honest; one seed's regression interval assumes independent residuals, which
    consecutive training losses are not (it is then too narrow).
    """
    steps_a = np.asarray(steps, float)
    y = np.atleast_2d(np.asarray(losses, float))
    if steps_a.ndim != 1 or y.shape[1] != steps_a.size:
        raise UserError(f"steps must be 1-D and losses [seeds, steps], got {steps_a.shape} and {y.shape}")
    if not 0 < fraction <= 1:
        raise UserError(f"fraction must be in (0, 1], got {fraction!r}")
    last = steps_a.max(initial=0.0)
    first = steps_a.min(initial=0.0)
    start = last - fraction * (last - first)
    in_window = steps_a >= start
    fits = []
    for row in y:
        ok = in_window & np.isfinite(row)
        if ok.sum() >= 3:
            fits.append(sps.linregress(steps_a[ok], row[ok]))
    nan = float("nan")
    window = (int(round(start)), int(last))
    if not fits:
        return Slope(slope=nan, ci_lo=nan, ci_hi=nan, seeds=0, points=int(in_window.sum()), window=window)
    if len(fits) == 1:
        f = fits[0]
        half = sps.t.ppf(0.5 + confidence / 2, int(in_window.sum()) - 2) * f.stderr
        return Slope(slope=float(f.slope), ci_lo=float(f.slope - half), ci_hi=float(f.slope + half), seeds=1,
                     points=int(in_window.sum()), window=window)
    m = mean_interval([f.slope for f in fits], confidence)
    return Slope(slope=m.mean, ci_lo=m.ci_lo, ci_hi=m.ci_hi, seeds=m.n, points=int(in_window.sum()), window=window)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Noise:
    """Evaluation noise beside seed noise, in nats.

    eval_se: standard error of a seed's eval loss from the finite held-out set (SD over eval batches /
      sqrt(batches), root mean square over seeds); eval_batches: batches per evaluation;
    seed_sd: SD of the final eval loss across seeds; seeds: how many seeds it is over.
    """

    eval_se: float
    eval_batches: int
    seed_sd: float
    seeds: int

    @property
    def eval_below_seed(self) -> bool:
        return self.eval_se < self.seed_sd


def eval_vs_seed_noise(batch_losses: Sequence[Sequence[float]], final_losses: Sequence[float]) -> Noise:
    """batch_losses: per seed, the eval loss of each held-out batch (equal-sized batches); final_losses: per
    seed, the final eval loss. Seeds with fewer than 2 finite batch losses are left out of eval_se."""
    ses, batches = [], 0
    for row in batch_losses:
        x = _finite(row)
        if x.size >= 2:
            ses.append(np.std(x, ddof=1) / math.sqrt(x.size))
            batches = max(batches, int(x.size))
    eval_se = float(math.sqrt(np.mean(np.square(ses)))) if ses else float("nan")
    seed = mean_interval(final_losses)
    return Noise(eval_se=eval_se, eval_batches=batches, seed_sd=seed.sd, seeds=seed.n)


# -- learning-rate sensitivity -------------------------------------------------------------------------------


def lr_sensitivity(lrs: Sequence[float], losses: Sequence[float], loss_at_init: float) -> float:
    """Wortsman et al. 2023 LR sensitivity: mean over the grid of min(loss(lr), loss_at_init) - best_loss.

    lrs: float[g] the learning-rate grid (log-spaced in the paper; the expectation is the plain mean over
    the grid points); losses: float[g] final loss per lr; non-finite losses count as loss_at_init, and
    best_loss is the minimum of the capped losses over the grid.
    """
    lrs_a = np.asarray(lrs, dtype=np.float64)
    losses_a = np.asarray(losses, dtype=np.float64)
    if lrs_a.ndim != 1 or lrs_a.shape != losses_a.shape or lrs_a.size == 0:
        raise UserError(
            f"lrs and losses must be 1-D, non-empty and the same length, "
            f"got {lrs_a.shape} and {losses_a.shape}"
        )
    if not math.isfinite(loss_at_init):
        raise UserError(f"loss_at_init must be finite, got {loss_at_init!r}")
    capped = np.minimum(np.where(np.isfinite(losses_a), losses_a, loss_at_init), loss_at_init)
    return float(np.mean(capped - capped.min()))


# -- divergence onset: P(diverge | lr) ---------------------------------------------------------------------------
#
# The model: each seed at learning rate lr diverges independently with P = sigmoid(a + b x), x = log10(lr),
# fitted by maximum likelihood over the per-seed binary outcomes (k diverged of n seeds per lr). The onset is
# the lr where P = 0.5: x0 = -a / b. Intervals are PROFILE LIKELIHOOD intervals: the set of x0 (or of a
# shift between two policies) that a likelihood-ratio test does not reject at 5% (deviance <= the chi-square
# 95% point with 1 degree of freedom, scipy.stats.chi2), the nuisance slope(s) maximised out
# (scipy.optimize). Unlike a Wald interval it is not symmetric in x0, stays inside what the data allow and
# still exists under separation, where the maximum likelihood estimate does not. The chi-square calibration
# is asymptotic: at 7 lrs x 16 seeds the intervals cover the truth at the nominal rate (tests/test_onset.py,
# slow), with a few seeds per lr they are too narrow.

ONSET_STATUSES = {
    "fit": "maximum-likelihood fit (stable and diverged seeds overlap in lr)",
    "separated": "complete or quasi-complete separation: every stable seed at an lr no higher than every "
                 "diverged seed, so the likelihood grows without bound as the slope does; no point estimate, "
                 "the onset lies between the last all-stable and the first all-diverged lr",
    "all_stable": "no seed diverged: the onset lies above the grid (a lower bound only)",
    "all_diverged": "every seed diverged: the onset lies below the grid (an upper bound only)",
    "decreasing": "P(diverge) does not rise with lr (fitted slope <= 0, or reversed separation): no onset",
    "outside": "the fitted 50% point lies outside the grid widened by the extrapolation margin: not estimated",
    "too_few_lrs": "fewer than 2 distinct learning rates: a slope cannot be fitted",
}
# How far (decades of lr) beyond the grid a 50% point or an interval end is still reported; past it an
# interval side is "not bounded" (None) rather than an extrapolation.
ONSET_EXTRAPOLATE_DECADES = 1.0
# The slope (logit per decade of lr) at which a profile treats the fit as a step: separation's limit.
_MAX_SLOPE = 1e4


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnsetFit:
    """The divergence onset of one policy: P(diverge | lr) = sigmoid(a + b log10 lr), onset where P = 0.5.

    lrs, seeds, diverged: the data, per distinct lr (ascending): seeds run and seeds diverged.
    status: a key of ONSET_STATUSES; reason: a sentence saying why there is (no) point estimate.
    onset_lr: the maximum-likelihood onset (None unless status == "fit").
    ci_lo, ci_hi: the 95% profile-likelihood interval of the onset lr; None on a side the data do not bound
      within ONSET_EXTRAPOLATE_DECADES of the grid (e.g. ci_hi for all_stable: a lower bound only). Given
      for "fit", "separated", "all_stable" and "all_diverged"; None for the others.
    bracket: (highest lr at which no seed diverged and below which none did, lowest lr at which every seed
      diverged and above which all did): where the data put the step; (None, None) when not separated.
    intercept, slope: a and b (logit, logit per decade of lr) of the fit (None without a fit).
    """

    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    diverged: tuple[int, ...]
    status: str
    reason: str
    onset_lr: float | None = None
    ci_lo: float | None = None
    ci_hi: float | None = None
    bracket: tuple[float | None, float | None] = (None, None)
    intercept: float | None = None
    slope: float | None = None

    def probability(self, lr) -> np.ndarray | None:
        """The fitted P(diverge) at lr (None without a fit)."""
        if self.slope is None:
            return None
        from scipy.special import expit

        return expit(self.intercept + self.slope * np.log10(np.asarray(lr, float)))


def _onset_data(lrs, seeds, diverged) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lr, x = log10 lr, n, k) per distinct lr, ascending; runs at the same lr are pooled."""
    lr_a, n_a, k_a = (np.asarray(v, float).ravel() for v in (lrs, seeds, diverged))
    if not (lr_a.size == n_a.size == k_a.size) or lr_a.size == 0:
        raise UserError(f"lrs, seeds and diverged must be non-empty and of one length, got {lr_a.size}, "
                        f"{n_a.size}, {k_a.size}")
    if not (np.all(np.isfinite(lr_a)) and np.all(lr_a > 0)):
        raise UserError(f"learning rates must be finite and > 0, got {lr_a.tolist()}")
    if not (np.all(n_a == np.round(n_a)) and np.all(k_a == np.round(k_a)) and np.all(n_a >= 1)
            and np.all((k_a >= 0) & (k_a <= n_a))):
        raise UserError(f"need integer seeds >= 1 and 0 <= diverged <= seeds per lr, got {n_a.tolist()} and "
                        f"{k_a.tolist()}")
    uniq = np.unique(lr_a)
    n = np.array([n_a[lr_a == u].sum() for u in uniq])
    k = np.array([k_a[lr_a == u].sum() for u in uniq])
    return uniq, np.log10(uniq), n, k


def _loglik(x, n, k, a, b) -> float:
    """Binomial log likelihood (without the constant binomial coefficients) of sigmoid(a + b x)."""
    z = a + b * x
    return float(-np.sum(k * np.logaddexp(0.0, -z) + (n - k) * np.logaddexp(0.0, z)))


def _profile_at(x, n, k, x0: float) -> float:
    """max over the slope b of the log likelihood with the onset fixed at x0 (P = sigmoid(b (x - x0))):
    concave in b, maximised by scipy.optimize.minimize_scalar on [-_MAX_SLOPE, _MAX_SLOPE] (the bound stands
    for the step function separation drives it to)."""
    from scipy.optimize import minimize_scalar

    d = x - x0
    res = minimize_scalar(lambda b: -_loglik(d, n, k, 0.0, b), bounds=(-_MAX_SLOPE, _MAX_SLOPE), method="bounded",
                          options={"xatol": 1e-6})
    return float(-res.fun)


def _profile(x, n, k) -> Callable[[float], float]:
    return lambda x0: _profile_at(x, n, k, x0)


def _likelihood_set(profile, best: float, centre: float, lo: float, hi: float, crit: float
                    ) -> tuple[float | None, float | None]:
    """The ends of the connected set around `centre` where 2 (best - profile) <= crit, searched in [lo, hi]
    on a grid and refined with scipy.optimize.brentq; None on a side that reaches the search limit."""
    from scipy.optimize import brentq

    def excess(v):
        return 2.0 * (best - profile(v)) - crit

    ends = []
    for limit in (lo, hi):
        grid = np.linspace(centre, limit, 41)[1:]
        prev = centre
        end = None
        for v in grid:
            if excess(v) > 0:
                end = brentq(excess, prev, v, xtol=1e-6) if excess(prev) < 0 else prev
                break
            prev = v
        ends.append(end)
    return ends[0], ends[1]


def divergence_onset(lrs: Sequence[float], seeds: Sequence[int], diverged: Sequence[int],
                     confidence: float = 1 - ALPHA) -> OnsetFit:
    """Fit P(diverge | lr) = sigmoid(a + b log10 lr) by maximum likelihood (scipy.optimize.minimize) to
    `diverged` of `seeds` seeds at each learning rate, and return the onset lr (P = 0.5) with its
    profile-likelihood interval (see the comment above ONSET_STATUSES).

    Separation is reported, never papered over: where every stable seed sits at an lr no higher than every
    diverged seed the likelihood has no maximum (the slope runs to infinity), so there is no point estimate;
    the result gives the bracket the data put the step in and the profile-likelihood interval, which exists
    there too (it is the bracket widened by what too few seeds cannot exclude). All stable: a lower bound;
    all diverged: an upper bound; one lr: nothing.
    """
    from scipy.optimize import minimize, minimize_scalar
    from scipy.special import expit

    _check_alpha(1 - confidence)
    lr_grid, x, n, k = _onset_data(lrs, seeds, diverged)
    data = dict(lrs=tuple(float(v) for v in lr_grid), seeds=tuple(int(v) for v in n),
                diverged=tuple(int(v) for v in k))
    crit = float(sps.chi2.ppf(confidence, 1))
    lo_limit, hi_limit = x[0] - ONSET_EXTRAPOLATE_DECADES, x[-1] + ONSET_EXTRAPOLATE_DECADES
    has_stable, has_diverged = k < n, k > 0
    if not has_diverged.any() or not has_stable.any():
        status = "all_stable" if not has_diverged.any() else "all_diverged"
        edge = x[-1] if status == "all_stable" else x[0]
        # the supremum of the likelihood (0: a step just outside the grid) is approached at the edge
        ci = _likelihood_set(_profile(x, n, k), 0.0, edge + (1 if status == "all_stable" else -1) * 1e-9,
                             lo_limit, hi_limit, crit)
        side = "above the highest" if status == "all_stable" else "below the lowest"
        edge_lr = lr_grid[-1] if status == "all_stable" else lr_grid[0]
        return OnsetFit(**data, status=status, ci_lo=_lr(ci[0]), ci_hi=_lr(ci[1]),
                        reason=f"{'no' if status == 'all_stable' else 'every'} seed of {int(n.sum())} diverged: "
                               f"the onset lies {side} lr of the grid ({edge_lr:g})")
    if len(x) < 2:
        return OnsetFit(**data, status="too_few_lrs", reason=ONSET_STATUSES["too_few_lrs"])
    x_stable_max, x_div_min = x[has_stable].max(), x[has_diverged].min()
    x_div_max, x_stable_min = x[has_diverged].max(), x[has_stable].min()
    if x_div_max <= x_stable_min:
        return OnsetFit(**data, status="decreasing",
                        reason="every diverged seed is at an lr no higher than every stable seed: P(diverge) "
                               "falls with lr here, so there is no onset")
    if x_stable_max <= x_div_min:
        # the step is between the last lr where no seed diverged and the first where all did
        below = lr_grid[(x < x_div_min) | ((x == x_div_min) & ~has_diverged)]
        above = lr_grid[(x > x_stable_max) | ((x == x_stable_max) & ~has_stable)]
        bracket = (float(below.max()) if below.size else None, float(above.min()) if above.size else None)
        profile = _profile(x, n, k)
        # The supremum of the likelihood: anywhere in the gap (complete separation), or at an offset of
        # logit(k/n) / slope from the mixed lr (quasi-complete), found by scipy.optimize.minimize_scalar.
        half = max(0.5 * (x_div_min - x_stable_max), 1e-3)
        mid = 0.5 * (x_stable_max + x_div_min)
        peak = minimize_scalar(lambda v: -profile(v), bounds=(mid - half, mid + half), method="bounded",
                               options={"xatol": 1e-9})
        centre, best = float(peak.x), float(-peak.fun)
        ci = _likelihood_set(profile, best, centre, lo_limit, hi_limit, crit)
        lo_lr, hi_lr = bracket
        where = (f"between lr {lo_lr:g} and {hi_lr:g}" if lo_lr is not None and hi_lr is not None else
                 f"above lr {lo_lr:g}" if lo_lr is not None else f"below lr {hi_lr:g}")
        return OnsetFit(**data, status="separated", bracket=bracket, ci_lo=_lr(ci[0]), ci_hi=_lr(ci[1]),
                        reason=("complete separation" if x_stable_max < x_div_min else "quasi-complete separation "
                                "(one lr mixed, all below stable, all above diverged)")
                               + f": the step lies {where}")
    # Overlap: the likelihood is strictly concave with a finite maximum. Fit in centred x for conditioning.
    xm = float(np.mean(x))

    def nll(p):
        z = p[0] + p[1] * (x - xm)
        prob = expit(z)
        grad_z = n * prob - k  # d(-loglik)/dz
        return -_loglik(x - xm, n, k, p[0], p[1]), np.array([grad_z.sum(), (grad_z * (x - xm)).sum()])

    res = minimize(nll, np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-9})
    a_c, b = (float(v) for v in res.x)
    a = a_c - b * xm
    fit = dict(intercept=a, slope=b)
    if b <= 0:
        return OnsetFit(**data, status="decreasing", **fit,
                        reason=f"fitted slope {b:.3g} logit per decade <= 0: P(diverge) does not rise with lr")
    x0 = -a / b
    if not lo_limit <= x0 <= hi_limit:
        return OnsetFit(**data, status="outside", **fit,
                        reason=f"the fitted 50% point (lr {10 ** x0:.3g}) is more than "
                               f"{ONSET_EXTRAPOLATE_DECADES:g} decade(s) outside the grid: too flat a curve to "
                               "place the onset")
    best = _loglik(x, n, k, a, b)
    ci = _likelihood_set(_profile(x, n, k), best, x0, lo_limit, hi_limit, crit)
    return OnsetFit(**data, status="fit", **fit, onset_lr=_lr(x0), ci_lo=_lr(ci[0]), ci_hi=_lr(ci[1]),
                    reason=ONSET_STATUSES["fit"])


def _lr(x: float | None) -> float | None:
    return None if x is None else float(10.0 ** x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnsetShift:
    """How far a policy moves the divergence onset against a baseline: shift = log10(onset) -
    log10(baseline onset) in decades of lr (negative: it diverges at lower lrs), ratio = 10^shift.

    shift, ratio: maximum-likelihood values (None unless both fits have a point estimate).
    ci_lo, ci_hi: the 95% profile-likelihood interval of the shift in decades (None on a side the data do not
      bound, e.g. when one policy never diverged on its grid); ratio_ci: the same as lr ratios.
    p_value: likelihood-ratio test of "no shift" (deviance at shift 0 against chi-square with 1 df), NaN
      where it cannot be computed. reason: why a value is missing, else "".
    """

    shift: float | None
    ratio: float | None
    ci_lo: float | None
    ci_hi: float | None
    p_value: float
    reason: str

    @property
    def ratio_ci(self) -> tuple[float | None, float | None]:
        return _lr(self.ci_lo), _lr(self.ci_hi)


ONSET_SHIFT_STEP = 0.005  # decades: the grid of the shift's profile (1.2% in lr ratio)
_SHIFT_STATUSES = ("fit", "separated", "all_stable", "all_diverged")


def onset_shift(fit: OnsetFit, baseline: OnsetFit, confidence: float = 1 - ALPHA) -> OnsetShift:
    """The shift of `fit`'s onset against `baseline`'s with its profile-likelihood interval.

    The two policies' seeds are independent, so the joint log likelihood is the sum of the two; with the
    shift fixed, the baseline's onset x0 and both slopes are maximised out:
    profile(shift) = max over x0 of [profile_baseline(x0) + profile_fit(x0 + shift)], each policy's own
    profile (slope maximised out, scipy.optimize.minimize_scalar) evaluated on a grid of onsets ONSET_SHIFT_STEP
    decades apart over its own interval (only onsets there can enter the joint set); the interval is the
    set of shifts whose deviance is within the chi-square 95% point, its ends good to a grid step. A side
    whose best onset pair reaches an open end of either policy's interval (its lr grid widened by
    ONSET_EXTRAPOLATE_DECADES) is not bounded (None).
    """
    _check_alpha(1 - confidence)
    nan = float("nan")
    for f, who in ((fit, "policy"), (baseline, "baseline")):
        if f.status not in _SHIFT_STATUSES:
            return OnsetShift(shift=None, ratio=None, ci_lo=None, ci_hi=None, p_value=nan,
                              reason=f"{who}: {f.reason}")
    crit = float(sps.chi2.ppf(confidence, 1))
    h = ONSET_SHIFT_STEP
    lo = min(math.log10(f.lrs[0]) for f in (fit, baseline)) - ONSET_EXTRAPOLATE_DECADES
    hi = max(math.log10(f.lrs[-1]) for f in (fit, baseline)) + ONSET_EXTRAPOLATE_DECADES
    grid = lo + h * np.arange(int(math.ceil((hi - lo) / h)) + 1)
    profiles = []
    for f in (baseline, fit):
        _, x, n, k = _onset_data(f.lrs, f.seeds, f.diverged)
        # Only onsets inside the policy's own interval can be in the joint set (its deviance alone would
        # exceed the critical value), so the profile is evaluated there (two grid steps beyond, to bracket
        # the crossing) and a side the policy's own interval leaves open runs to its search limit.
        lo_f = math.log10(f.ci_lo) - 2 * h if f.ci_lo is not None else x[0] - ONSET_EXTRAPOLATE_DECADES
        hi_f = math.log10(f.ci_hi) + 2 * h if f.ci_hi is not None else x[-1] + ONSET_EXTRAPOLATE_DECADES
        inside = np.flatnonzero((grid >= lo_f - 1e-12) & (grid <= hi_f + 1e-12))
        prof = np.full(grid.size, -np.inf)
        prof[inside] = [_profile_at(x, n, k, v) for v in grid[inside]]
        open_edges = ([inside[0]] if f.ci_lo is None else []) + ([inside[-1]] if f.ci_hi is None else [])
        profiles.append((prof, open_edges))
    (pa, edge_a), (pb, edge_b) = profiles
    m = grid.size
    # shifts j = -(m-1) .. m-1 steps; joint[j] = max_i pa[i] + pb[i + j]
    shifts = np.arange(-(m - 1), m)
    joint = np.full(shifts.size, -np.inf)
    arg = np.zeros(shifts.size, int)
    for idx, j in enumerate(shifts):
        i = np.arange(max(0, -j), min(m, m - j))
        if i.size:
            s = pa[i] + pb[i + j]
            best_i = int(np.argmax(s))
            joint[idx], arg[idx] = s[best_i], i[best_i]
    best = float(np.max(joint))
    dev = 2.0 * (best - joint)
    centre = int(np.argmax(joint))
    if fit.onset_lr is not None and baseline.onset_lr is not None:
        shift = math.log10(fit.onset_lr) - math.log10(baseline.onset_lr)
        centre = int(np.argmin(np.abs(shifts * h - shift)))
        reason = ""
    else:
        shift = None
        reason = "; ".join(f"{who}: {f.status}" for f, who in ((fit, "policy"), (baseline, "baseline"))
                           if f.onset_lr is None)

    def at_edge(idx):
        i = arg[idx]
        return i in edge_a or (i + shifts[idx]) in edge_b

    def end(direction):
        idx = centre
        while 0 <= idx + direction < shifts.size and dev[idx + direction] <= crit:
            idx += direction
        if at_edge(idx) or not 0 <= idx + direction < shifts.size or not np.isfinite(dev[idx + direction]):
            return None
        # linear interpolation of the deviance between the last grid shift inside and the first outside
        d0, d1 = dev[idx], dev[idx + direction]
        t = (crit - d0) / (d1 - d0) if d1 > d0 else 0.0
        return float((shifts[idx] + direction * t) * h)

    p = float(sps.chi2.sf(max(2.0 * (best - _common_onset(baseline, fit, lo, hi)), 0.0), 1))
    return OnsetShift(shift=shift, ratio=_lr(shift), ci_lo=end(-1), ci_hi=end(+1), p_value=p, reason=reason)


def _common_onset(a: OnsetFit, b: OnsetFit, lo: float, hi: float) -> float:
    """max over a shared onset x0 in [lo, hi] of profile_a(x0) + profile_b(x0) (each slope maximised out):
    the likelihood under "no shift". A grid of 0.05 decades, refined by scipy.optimize.minimize_scalar around
    its best point."""
    from scipy.optimize import minimize_scalar

    profiles = [_profile(*_onset_data(f.lrs, f.seeds, f.diverged)[1:]) for f in (a, b)]

    def joint(v):
        return sum(p(v) for p in profiles)

    grid = np.linspace(lo, hi, int(math.ceil((hi - lo) / 0.05)) + 1)
    values = [joint(v) for v in grid]
    i = int(np.argmax(values))
    res = minimize_scalar(lambda v: -joint(v), bounds=(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]),
                          method="bounded", options={"xatol": 1e-7})
    return max(float(-res.fun), float(values[i]))


# -- precursors of divergence ----------------------------------------------------------------------------------


def precursor_lead(series: Sequence[float], reference, divergence_step: int) -> int | None:
    """How many steps before a seed's divergence one of its telemetry series had left the range of the
    stable seeds of the same configuration, by the rule: the series must be above the maximum over the
    stable seeds at that same step, at every step from the exit up to the step before the divergence step
    (the last uninterrupted excursion that runs into the divergence). Isolated excursions that came back do
    not count: with m stable seeds a healthy seed is above their maximum at a given step with probability
    about 1/(m+1), so a first-crossing rule would fire early by chance; the uninterrupted run into the
    divergence is the precursor.

    series: <float>[steps] of the diverged seed; reference: <float>[stable seeds, steps] (NaN entries are
    ignored; a step where no stable seed is finite interrupts the run); divergence_step: the 0-based step
    the divergence rule fired at (the row of the per-step metrics). Returns the lead time in steps
    (divergence_step - exit step, >= 1), or None when the series was not above the range at the step before
    the divergence (no precursor) or there is no step before it.
    """
    x = np.asarray(series, float).ravel()
    ref = np.atleast_2d(np.asarray(reference, float))
    d = int(divergence_step)
    if ref.shape[-1] != x.size:
        raise UserError(f"reference must be [seeds, {x.size}] like the series, got {ref.shape}")
    if d <= 0 or d > x.size or ref.shape[0] == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps: no reference there
        top = np.nanmax(ref[:, :d], axis=0)
    above = np.isfinite(top) & (x[:d] > top)  # NaN in the series is not above
    if not above[-1]:
        return None
    below = np.flatnonzero(~above)
    start = int(below[-1]) + 1 if below.size else 0
    return d - start


def entropy(counts, axis=None):
    """Plug-in entropy (nats) of the distribution(s) that non-negative `counts` are proportional to: of all
    of them (axis None: a float) or along `axis` (an array, e.g. one entropy per row); NaN where the counts
    sum to 0. The same numbers as scipy.stats.entropy (tests/test_specialization.py), vectorised because
    the permutation nulls of the specialisation statistics need thousands of them."""
    c = np.asarray(counts, dtype=np.float64)
    if axis is None:
        c = c.ravel()
        axis = 0
    total = c.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = c / total
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = np.where(np.squeeze(total, axis=axis) > 0, terms.sum(axis=axis), np.nan)
    return float(h) if h.ndim == 0 else h


def mutual_information(table):
    """Plug-in mutual information (nats) between the row and the column variable of a contingency table of
    counts (or of a stack of tables [..., R, C]): H(rows) + H(columns) - H(joint). Biased upwards on finite
    samples (about (R-1)(C-1) / 2N nats), which is why the specialisation statistics set it beside a
    permutation null. NaN for an empty table."""
    t = np.asarray(table, dtype=np.float64)
    if t.ndim < 2:
        raise UserError(f"mutual_information needs a 2-D table of counts, got shape {t.shape}")
    flat = t.reshape(*t.shape[:-2], -1)
    mi = entropy(t.sum(axis=-1), axis=-1) + entropy(t.sum(axis=-2), axis=-1) - entropy(flat, axis=-1)
    mi = np.where(np.isnan(mi), np.nan, np.maximum(mi, 0.0))
    return float(mi) if np.ndim(mi) == 0 else mi


def permutation_p(observed: float, null: Sequence[float]) -> float:
    """One-sided permutation p-value of `observed` against statistics of label-permuted data: (1 + number of
    null values >= observed) / (1 + number of permutations) (Phipson & Smyth 2010: never 0)."""
    null_a = np.asarray(null, dtype=np.float64)
    return float((1 + np.sum(null_a >= observed)) / (1 + null_a.size))
