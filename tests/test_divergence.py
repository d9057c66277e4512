"""Divergence rules on synthetic curves (from step 0 on), streaming == batch, checkpoint round-trip, the
three outcomes of a seed."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precision_lab.divergence import (
    RULES,
    DivergenceConfig,
    DivergenceMonitor,
    DivergenceResult,
    classify_outcome,
    detect,
)
from precision_lab.errors import UserError


def smooth_curve(rng, n=1000):
    """A decaying, noisy, healthy loss curve and grad-norm curve (float[n] each)."""
    t = np.arange(n)
    losses = 2.0 + 5.0 * np.exp(-t / 300) + 0.05 * rng.standard_normal(n)
    grads = 1.0 + 0.1 * rng.standard_normal(n)
    return losses, grads


def only(*rules, **kw):
    return DivergenceConfig(rules=rules, **kw)


# -- each rule on synthetic curves -------------------------------------------------------------------


def test_smooth_curve_never_diverges(rng):
    for _ in range(5):
        losses, grads = smooth_curve(rng)
        assert detect(losses, grads) == DivergenceResult(diverged=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_loss_and_grad_norm(rng, bad):
    losses, grads = smooth_curve(rng)
    l2 = losses.copy()
    l2[437] = bad
    assert detect(l2, grads) == DivergenceResult(diverged=True, step=437, rule="nonfinite")
    g2 = grads.copy()
    g2[12] = bad
    assert detect(losses, g2) == DivergenceResult(diverged=True, step=12, rule="nonfinite")
    # step0 shifts the reported step number.
    assert detect(l2, grads, step0=1000).step == 1437


def test_nonfinite_is_ignored_by_other_rules_when_disabled(rng):
    losses, grads = smooth_curve(rng)
    losses[300] = np.inf
    losses[301] = np.nan
    assert not detect(losses, grads, only("early_max", "spikes", "sigma")).diverged


def test_early_max_fires_at_right_step_and_is_configurable(rng):
    losses, _ = smooth_curve(rng)
    early_max = losses[:100].max()
    losses[700] = 10.0 * early_max  # exactly the threshold: >= fires
    fired = DivergenceResult(diverged=True, step=700, rule="early_max")
    assert detect(losses, cfg=only("early_max")) == fired
    assert not detect(losses, cfg=only("early_max", early_max_factor=11.0)).diverged
    # A huge value inside the early window fires against the max of the steps before it (early reference);
    # without the early reference it only raises the window's max, as Megatron's rule has it.
    losses2, _ = smooth_curve(rng)
    losses2[50] = 1000.0
    losses2[700] = 100.0
    assert detect(losses2, cfg=only("early_max")) == DivergenceResult(diverged=True, step=50, rule="early_max")
    assert not detect(losses2, cfg=only("early_max", early_reference=False)).diverged
    cfg = only("early_max", early_max_window=20, early_reference=False)  # the window ends before step 50
    assert detect(losses2, cfg=cfg) == DivergenceResult(diverged=True, step=50, rule="early_max")


def test_spikes_needs_more_than_count_consecutive(rng):
    losses, _ = smooth_curve(rng)
    base = losses.copy()
    losses[500:504] *= 2.5  # 4 consecutive spikes: not more than 4
    assert not detect(losses, cfg=only("spikes")).diverged
    losses[504] *= 2.5  # the 5th
    assert detect(losses, cfg=only("spikes")) == DivergenceResult(diverged=True, step=504, rule="spikes")
    # An interruption resets the run.
    broken = base.copy()
    broken[500:504] *= 2.5
    broken[505:509] *= 2.5
    assert not detect(broken, cfg=only("spikes")).diverged
    # count and factor are knobs.
    assert detect(broken, cfg=only("spikes", spike_count=3)).step == 503
    assert not detect(losses, cfg=only("spikes", spike_factor=3.0)).diverged


def test_spikes_window_mean_uses_previous_steps_only():
    # Constant loss 1, then a step at exactly 2x: a spike (>= factor x mean of the previous window).
    losses = np.ones(20)
    losses[10:13] = 2.0
    cfg = only("spikes", spike_window=5, spike_min_history=5, spike_count=0)
    assert detect(losses, cfg=cfg).step == 10
    # Before min_history finite values exist, the running minimum is the reference: 5 >= 2 x min(1, 1, 1).
    losses = np.ones(20)
    losses[3] = 5.0
    assert detect(losses, cfg=cfg) == DivergenceResult(diverged=True, step=3, rule="spikes")
    # Without the early reference, nothing fires before min_history finite values exist.
    assert not detect(losses, cfg=only("spikes", spike_window=5, spike_min_history=5, spike_count=0,
                                       early_reference=False)).diverged


def test_sigma_on_loss_and_grad_norm(rng):
    losses, grads = smooth_curve(rng)
    l2 = losses.copy()
    l2[600] += 1.0  # ~10 sigma of noise plus trend over the window, but nowhere near 2x or 10x
    assert detect(l2, grads) == DivergenceResult(diverged=True, step=600, rule="sigma")
    assert not detect(l2, grads, only("sigma", sigma_k=15.0)).diverged
    g2 = grads.copy()
    g2[800] = 3.0  # 20 sigma
    assert detect(losses, g2) == DivergenceResult(diverged=True, step=800, rule="sigma")
    assert not detect(losses, g2, DivergenceConfig(sigma_on_grad_norm=False)).diverged


def test_sigma_needs_min_history(rng):
    losses, _ = smooth_curve(rng)
    losses[100] += 4.0  # within the first 128 steps: not enough history with the default
    assert not detect(losses, cfg=only("sigma")).diverged
    assert detect(losses, cfg=only("sigma", sigma_min_history=50)).step == 100


def test_priority_order_on_same_step(rng):
    losses, grads = smooth_curve(rng)
    losses[700] = 1e4  # early_max and sigma both fire here
    assert detect(losses, grads).rule == "early_max"
    assert detect(losses, grads, only("sigma", "spikes")).rule == "sigma"
    assert RULES[0] == "nonfinite"


def test_config_validation():
    with pytest.raises(UserError, match="divergence rule"):
        DivergenceConfig(rules=("nonfinite", "sigmaa"))
    with pytest.raises(UserError, match="sigma_min_history"):
        DivergenceConfig(sigma_min_history=1)
    with pytest.raises(UserError, match="spike_min_history"):
        DivergenceConfig(spike_window=10)  # min history 100 > window 10
    with pytest.raises(UserError, match="early_max_factor"):
        DivergenceConfig(early_max_factor=-1.0)
    with pytest.raises(UserError):
        DivergenceConfig(rules="sigma")


# -- a plain-Python reference, step by step, for the property tests ---------------------------------


def reference_detect(losses, grads, cfg):
    """Straight transcription of the rules; sums run oldest to newest like the implementation."""

    def stats(values, i, window):
        win = [v for v in values[max(0, i - window) : i] if math.isfinite(v)]
        if not win:
            return 0, math.nan, math.nan
        total = 0.0
        for v in win:
            total += v
        mean = total / len(win)
        squares = 0.0
        for v in win:
            squares += (v - mean) ** 2
        return len(win), mean, math.sqrt(squares / len(win))

    run = 0
    for i, x in enumerate(losses):
        g = grads[i] if grads is not None else 0.0
        fired = set()
        if not (math.isfinite(x) and math.isfinite(g)):
            fired.add("nonfinite")
        early = [v for v in losses[: min(i, cfg.early_max_window)] if math.isfinite(v)]
        watched = i >= cfg.early_max_window or cfg.early_reference
        if watched and early and math.isfinite(x) and x >= cfg.early_max_factor * max(early):
            fired.add("early_max")
        n, mean, _ = stats(losses, i, cfg.spike_window)
        spike = math.isfinite(x) and n >= cfg.spike_min_history and x >= cfg.spike_factor * mean
        before = [v for v in losses[:i] if math.isfinite(v)]
        if cfg.early_reference and i < cfg.spike_min_history and before and math.isfinite(x):
            spike = spike or x >= cfg.spike_factor * min(before)
        run = run + 1 if spike else 0
        if run > cfg.spike_count:
            fired.add("spikes")
        series = [losses] + ([grads] if grads is not None and cfg.sigma_on_grad_norm else [])
        for values in series:
            n, mean, std = stats(values, i, cfg.sigma_window)
            v = values[i]
            if math.isfinite(v) and n >= cfg.sigma_min_history and v > mean + cfg.sigma_k * std:
                fired.add("sigma")
        fired &= set(cfg.rules)
        if fired:
            return DivergenceResult(diverged=True, step=i, rule=min(fired, key=RULES.index))
    return DivergenceResult(diverged=False)


# Values from a small set so that ties, exact thresholds and repeats happen often.
values = st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0, 2.0, 3.0, 10.0, 1e3, np.nan, np.inf])
small_cfgs = st.builds(
    lambda rules, ew, sw, sc, smh, gw, gmh, early: DivergenceConfig(
        rules=tuple(rules),
        early_reference=early,
        early_max_window=ew,
        spike_window=sw,
        spike_count=sc,
        spike_min_history=min(smh, sw),
        sigma_window=gw,
        sigma_min_history=min(gmh, gw),
        sigma_k=2.0,
    ),
    st.sets(st.sampled_from(RULES), min_size=1),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(0, 3),
    st.integers(1, 6),
    st.integers(2, 7),
    st.integers(2, 7),
    st.booleans(),
)


@st.composite
def curves(draw):
    n = draw(st.integers(0, 40))
    num_seeds = draw(st.integers(1, 3))
    noise = st.floats(0.5, 2.0)
    losses = np.array([draw(values) * draw(noise) for _ in range(n * num_seeds)]).reshape(n, num_seeds)
    with_grad = draw(st.booleans())
    grads = None
    if with_grad:
        grads = np.array([draw(values) for _ in range(n * num_seeds)]).reshape(n, num_seeds)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    return losses, grads, cuts


@settings(max_examples=200)
@given(cfg=small_cfgs, curve=curves(), step0=st.integers(0, 10**6))
def test_streaming_equals_batch_equals_reference(cfg, curve, step0):
    losses, grads, cuts = curve
    num_seeds = losses.shape[1]
    monitor = DivergenceMonitor(cfg, num_seeds)
    bounds = [0, *cuts, losses.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        monitor.update(step0 + a, losses[a:b], grads[a:b] if grads is not None else None)
        # Checkpoint-resume between chunks changes nothing.
        monitor = DivergenceMonitor.from_json(monitor.to_json())
    for s in range(num_seeds):
        g = grads[:, s] if grads is not None else None
        batch = detect(losses[:, s], g, cfg, step0=step0)
        assert monitor.results()[s] == batch
        ref = reference_detect(list(losses[:, s]), list(g) if g is not None else None, cfg)
        ref_step = ref.step + step0 if ref.diverged else None
        assert (batch.diverged, batch.step, batch.rule) == (ref.diverged, ref_step, ref.rule)


# -- streaming specifics --------------------------------------------------------------------------------


def test_monitor_many_seeds_realistic(rng):
    curves_ = [smooth_curve(rng) for _ in range(4)]
    losses = np.stack([c[0] for c in curves_], axis=1)
    grads = np.stack([c[1] for c in curves_], axis=1)
    losses[450, 1] = np.nan
    losses[300:320, 2] *= 3.0
    monitor = DivergenceMonitor(DivergenceConfig(), num_seeds=4)
    for start in range(0, 1000, 64):
        results = monitor.update(start, losses[start : start + 64], grads[start : start + 64])
    assert [r.diverged for r in results] == [False, True, True, False]
    assert results[1] == DivergenceResult(diverged=True, step=450, rule="nonfinite")
    assert results[2] == detect(losses[:, 2], grads[:, 2])
    # Bounded history: the state does not grow with the number of steps.
    sizes = {k: v.shape for k, v in monitor.state_dict().items()}
    assert max(max(s, default=1) for s in sizes.values()) <= 128
    assert monitor.next_step == 1000


def test_state_round_trip_dict_and_json(rng):
    losses, grads = smooth_curve(rng)
    losses2 = np.stack([losses, losses * 1.01], axis=1)
    grads2 = np.stack([grads, grads], axis=1)
    losses2[700:710, 1] *= 4
    full = DivergenceMonitor(num_seeds=2)
    full.update(0, losses2, grads2)

    first = DivergenceMonitor(num_seeds=2)
    first.update(0, losses2[:600], grads2[:600])
    state = first.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    resumed = DivergenceMonitor(num_seeds=2)
    resumed.load_state_dict(state)
    resumed.update(600, losses2[600:], grads2[600:])
    assert resumed.results() == full.results()

    text = first.to_json()
    json.loads(text)  # plain JSON: every stored float is finite
    assert "NaN" not in text and "Infinity" not in text
    resumed = DivergenceMonitor.from_json(text)
    resumed.update(600, losses2[600:], grads2[600:])
    assert resumed.results() == full.results()
    assert resumed.results()[1].diverged


def test_monitor_input_errors():
    monitor = DivergenceMonitor(num_seeds=2)
    with pytest.raises(UserError, match="losses"):
        monitor.update(0, np.ones((5, 3)))
    monitor.update(0, np.ones((5, 2)), np.ones((5, 2)))
    with pytest.raises(UserError, match="step0"):
        monitor.update(7, np.ones((5, 2)), np.ones((5, 2)))
    with pytest.raises(UserError, match="grad_norms"):
        monitor.update(5, np.ones((5, 2)))
    with pytest.raises(UserError, match="shape"):
        DivergenceMonitor(DivergenceConfig(sigma_window=64, sigma_min_history=64), 2).load_state_dict(
            monitor.state_dict()
        )


# -- watching from step 0 ------------------------------------------------------------------------------


def early_curve(rng, n=300, floor=3.0, tau=5.0):
    """A healthy start: ln(512) = 6.24 falling fast (time constant `tau` steps) to `floor`, with noise."""
    t = np.arange(n)
    losses = floor + (math.log(512) - floor) * np.exp(-t / tau) + 0.03 * rng.standard_normal(n)
    grads = 1.0 + 2.0 * np.exp(-t / tau) + 0.1 * rng.standard_normal(n)
    return losses, grads


def test_healthy_early_curves_do_not_fire(rng):
    """Fast initial drops (time constants of 1 to 30 steps, down to a floor near the best loss), warm-up
    plateaus and early bumps of +40% watched by every rule from step 0 on: nothing fires."""
    for tau in (1.0, 3.0, 10.0, 30.0):
        for floor in (0.93, 3.0):
            losses, grads = early_curve(rng, floor=floor, tau=tau)
            assert detect(losses, grads) == DivergenceResult(diverged=False), (tau, floor)
    losses, grads = early_curve(rng, floor=2.0)
    plateau = np.concatenate([np.full(15, math.log(512)) + 0.01 * rng.standard_normal(15), losses[:-15]])
    assert not detect(plateau, grads).diverged
    bumpy = losses.copy()
    bumpy[20:24] *= 1.4  # a short early bump, under 2x the best loss so far
    assert not detect(bumpy, grads).diverged


def test_spike_at_step_20_fires_each_rule(rng):
    losses, grads = early_curve(rng)
    spiked = losses.copy()
    spiked[20:40] = 9.0  # from ~3 nats back above ln(vocab) for 20 steps (the RMSNorm-scale row's pattern)
    # spikes: the 5th consecutive step at >= 2x the running minimum; the window mean (~3.7) would not do it
    assert detect(spiked, grads) == DivergenceResult(diverged=True, step=24, rule="spikes")
    assert not detect(spiked, grads, DivergenceConfig(early_reference=False)).diverged
    blowup = losses.copy()
    blowup[20] = 80.0  # >= 10 x max(steps 0..19) = 10 x ln(512)
    assert detect(blowup, grads) == DivergenceResult(diverged=True, step=20, rule="early_max")
    assert not detect(blowup, grads, DivergenceConfig(early_reference=False)).diverged
    # Streaming in chunks of 10 (the trainer's) gives the same answers, several seeds at once.
    monitor = DivergenceMonitor(DivergenceConfig(), num_seeds=3)
    curves_ = np.stack([losses, spiked, blowup], axis=1)
    for start in range(0, 300, 10):
        results = monitor.update(start, curves_[start : start + 10], np.stack([grads] * 3, axis=1)[start : start + 10])
    assert results == [DivergenceResult(diverged=False), detect(spiked, grads), detect(blowup, grads)]


def test_step_zero_has_no_reference():
    # No step before step 0: only a non-finite value can fire there; step 1 is compared with step 0.
    assert not detect(np.array([1e6, 1e6])).diverged
    assert detect(np.array([1.0, 10.0])) == DivergenceResult(diverged=True, step=1, rule="early_max")


# -- outcomes ----------------------------------------------------------------------------------------


def test_classify_outcome():
    assert classify_outcome(diverged=True, final_eval_loss=1.0, unigram_loss=3.0) == "diverged"
    assert classify_outcome(diverged=False, final_eval_loss=2.9, unigram_loss=3.0) == "stable"
    assert classify_outcome(diverged=False, final_eval_loss=3.0, unigram_loss=3.0) == "failed_to_learn"  # at
    assert classify_outcome(diverged=False, final_eval_loss=3.4, unigram_loss=3.0) == "failed_to_learn"
    assert classify_outcome(diverged=False, final_eval_loss=None, unigram_loss=3.0) == "failed_to_learn"
    assert classify_outcome(diverged=False, final_eval_loss=float("nan"), unigram_loss=None) == "failed_to_learn"
    # No reference known (e.g. an old record): a finite loss cannot be called a failure.
    assert classify_outcome(diverged=False, final_eval_loss=9.0, unigram_loss=None) == "stable"
