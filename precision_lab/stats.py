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
  entropy(counts, axis), mutual_information(table)   plug-in entropy and mutual information (nats) of counts
  permutation_p(observed, null)                one-sided permutation p-value, (1 + #null >= observed) / (1 + n)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
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
