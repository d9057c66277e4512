"""Divergence detection for training-loss curves, and the statistics that summarise many runs.

A run has diverged at the first step where any enabled rule fires:

  "nonfinite"  the loss (or the grad norm) is NaN or +-inf.
  "early_max"  (Megatron-style) the loss is >= `early_max_factor` x the largest loss of the first
               `early_max_window` steps. Before that window is complete (with `early_reference`, the
               default) the reference is the largest loss of the steps so far, so the rule watches from
               step 1.
  "spikes"     (LLM Foundry's KillLossSpike) more than `spike_count` consecutive steps whose loss is
               >= `spike_factor` x the mean loss of the `spike_window` steps before it. Before
               `spike_min_history` steps exist (with `early_reference`) a step counts as a spike when its
               loss is >= `spike_factor` x the smallest loss of the steps so far.
  "sigma"      (OLMo-core's stability monitor) the loss or the grad norm is > mean + `sigma_k` x std of
               the `sigma_window` steps before it (population std).

Why those early references (the first 100 steps used to be unwatched; a 300-step run's first third):
  * 10x rule: the largest loss so far is at least the initial loss, about ln(vocab) for a model whose
    output starts near uniform (higher with a large init). Ten times it is out of reach of any healthy
    curve and within reach of a blow-up at step 20. It is the same max the rule takes at step 100, grown
    step by step, so nothing changes once the window is complete.
  * spikes: while the loss falls fast from ln(vocab) the window mean is dominated by the first, high
    losses, so 2x the mean hides a spike back to ln(vocab) and beyond (a row of the shipped stability
    table jumped from about 4 to 8-11 nats at steps 20-40 unrecorded). The running minimum is the loss the
    run has already reached; a healthy early curve sits at or near it and is never at twice it for
    `spike_count` + 1 consecutive steps. ln(vocab) itself would be too high a reference (2 ln 512 = 12.5
    nats misses those spikes) and would tie a curve rule to a vocabulary it does not know.
  * sigma keeps its 128 steps of history: during the fast initial drop the window's std is the drop, not
    noise, so mean + 6 sigma means nothing there (and the rule only records spikes by default).

Conventions shared by every rule, so the batch and streaming detectors can agree bit for bit:
  * Step i is compared against the steps strictly before it; step numbers are `step0 + index`.
  * A non-finite value belongs to the "nonfinite" rule only: it is left out of every window statistic
    (a window's mean is over its finite entries) and never fires another rule; it ends a spike run.
  * A windowed rule needs at least `*_min_history` finite values in its window before it can fire.
  * Window sums are accumulated strictly oldest to newest, one element at a time (in float64), so the
    result depends only on the window's values, never on how the curve was chunked.
  * When several rules fire on the same step the reported rule is the first in `RULES`.

`detect` runs the rules over a whole curve; `DivergenceMonitor` runs them over chunks of steps for many
seeds at once, keeping only bounded history, and its state survives a checkpoint (dict of numpy arrays
or JSON). Both share one kernel, `_scan_chunk`, and give identical answers for any chunking.

`classify_outcome` turns a seed's divergence result and final eval loss into one of `OUTCOMES`. The
statistics that summarise many runs (intervals, tests, power, LR sensitivity) live in
`precision_lab.stats`; the windowed means and stds here stay in the streaming kernel because they must be
summed in one fixed order for streaming == batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numpy as np

from precision_lab.errors import UserError, unknown_choice

# Reporting priority when several rules fire on the same step: first wins.
RULES: tuple[str, ...] = ("nonfinite", "early_max", "spikes", "sigma")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DivergenceConfig:
    """Every threshold of the divergence rules (see the module docstring for their meaning).

    Attributes:
      rules: the enabled rules, a subset of `RULES` (order does not matter; priority is `RULES` order).
      early_max_factor, early_max_window: "early_max" fires at loss >= factor x max(first `window` losses).
      spike_factor, spike_window, spike_count, spike_min_history: "spikes" fires on the
        (spike_count + 1)-th consecutive step with loss >= factor x mean(previous `window` losses).
      sigma_k, sigma_window, sigma_min_history: "sigma" fires at value > mean + k * std of the previous
        `window` values; `sigma_on_grad_norm` also applies it to the grad norm.
      early_reference: "early_max" and "spikes" watch the steps before their window is complete, against
        the largest and the smallest loss so far (see the module docstring); False restores the rules
        that wait for `early_max_window` / `spike_min_history` steps.
    """

    rules: tuple[str, ...] = RULES
    early_max_factor: float = 10.0
    early_max_window: int = 100
    spike_factor: float = 2.0
    spike_window: int = 100
    spike_count: int = 4
    spike_min_history: int = 100
    sigma_k: float = 6.0
    sigma_window: int = 128
    sigma_min_history: int = 128
    sigma_on_grad_norm: bool = True
    early_reference: bool = True

    def __post_init__(self):
        if isinstance(self.rules, str):
            raise UserError(
                f"rules must be a tuple of rule names, not the string {self.rules!r}; "
                f"valid choices: {', '.join(RULES)}"
            )
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if rule not in RULES:
                raise unknown_choice("divergence rule", rule, RULES)
        for name in ("early_max_window", "spike_window", "sigma_window"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("spike_count", self.spike_count, minimum=0)
        _check_int("spike_min_history", self.spike_min_history, minimum=1, maximum=self.spike_window)
        # A standard deviation needs two values to mean anything.
        _check_int("sigma_min_history", self.sigma_min_history, minimum=2, maximum=self.sigma_window)
        for name in ("early_max_factor", "spike_factor", "sigma_k"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a finite number > 0, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise UserError(f"{name} must be an integer >= {minimum}{bound}, got {value!r}")


# What became of one seed: it trained and learned; a rule fired ("diverged", with its rule and step); or it
# ran to the end without doing better than the best context-free predictor of the targets.
OUTCOMES: tuple[str, ...] = ("stable", "diverged", "failed_to_learn")


def classify_outcome(*, diverged: bool, final_eval_loss: float | None, unigram_loss: float | None) -> str:
    """One of OUTCOMES. "failed_to_learn": not diverged, but the final held-out loss is at or above the
    unigram-model loss (`unigram_loss`, the "failed to learn" reference) or is not a finite number. With no
    reference (None) a finite loss counts as stable: there is nothing to call it a failure against."""
    if diverged:
        return "diverged"
    if final_eval_loss is None or not math.isfinite(final_eval_loss):
        return "failed_to_learn"
    if unigram_loss is not None and final_eval_loss >= unigram_loss:
        return "failed_to_learn"
    return "stable"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DivergenceResult:
    """Whether a run diverged, at which step, and by which rule (`step` and `rule` are None if not)."""

    diverged: bool
    step: int | None = None
    rule: str | None = None


# ----------------------------------------------------------------------------------------------------
# The shared kernel. State per seed (S seeds), all numpy:
#   loss_hist[H_loss, S], loss_ok[H_loss, S]  the last H_loss losses (0 where missing or non-finite) and
#   grad_hist[H_grad, S], grad_ok[H_grad, S]  whether each is a finite value; oldest first.
#   early_max[S], early_seen[S]               max finite loss of the early window so far, and whether any.
#   loss_min[S], min_seen[S]                  min finite loss so far, and whether any (early spike reference).
#   spike_run[S]                              length of the current run of spike steps.
# ----------------------------------------------------------------------------------------------------


def _history_lengths(cfg: DivergenceConfig) -> tuple[int, int]:
    return max(cfg.spike_window, cfg.sigma_window), cfg.sigma_window


def _empty_state(cfg: DivergenceConfig, num_seeds: int) -> dict[str, np.ndarray]:
    h_loss, h_grad = _history_lengths(cfg)
    return {
        "num_steps": np.zeros((), np.int64),  # steps seen so far (shared by all seeds)
        "loss_hist": np.zeros((h_loss, num_seeds), np.float64),
        "loss_ok": np.zeros((h_loss, num_seeds), bool),
        "grad_hist": np.zeros((h_grad, num_seeds), np.float64),
        "grad_ok": np.zeros((h_grad, num_seeds), bool),
        "early_max": np.zeros((num_seeds,), np.float64),  # 0 until early_seen (keeps JSON finite)
        "early_seen": np.zeros((num_seeds,), bool),
        "loss_min": np.zeros((num_seeds,), np.float64),  # 0 until min_seen (keeps JSON finite)
        "min_seen": np.zeros((num_seeds,), bool),
        "spike_run": np.zeros((num_seeds,), np.int64),
    }


def _window_stats(values, ok, window: int, k: int, with_std: bool):
    """Mean (and population std) of the `window` entries before each of the last k rows.

    values, ok: float64[h + k, S] and bool[h + k, S], with h >= window rows of history first.
    Returns (count int64[k, S], mean float64[k, S], std float64[k, S] or None); mean/std are NaN where
    count == 0. Sums run oldest to newest, one shifted slice at a time, so each entry depends only on
    its own window's values (the padding and masked entries add exact zeros).
    """
    start = values.shape[0] - k - window  # row of the oldest entry in the first new row's window
    count = np.zeros((k,) + values.shape[1:], np.int64)
    total = np.zeros(count.shape, np.float64)
    for j in range(window):
        rows = slice(start + j, start + j + k)
        count += ok[rows]
        total += np.where(ok[rows], values[rows], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    if not with_std:
        return count, mean, None
    squares = np.zeros(count.shape, np.float64)
    for j in range(window):
        rows = slice(start + j, start + j + k)
        squares += np.where(ok[rows], (values[rows] - mean) ** 2, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(squares / count)
    return count, mean, std


def _scan_chunk(cfg: DivergenceConfig, state: dict[str, np.ndarray], losses, grad_norms):
    """Run every rule over a chunk of k steps for S seeds and advance `state` (a new dict).

    losses: float64[k, S]; grad_norms: float64[k, S] or None.
    Returns (new_state, fired: dict rule -> bool[k, S]) where fired[rule][i, s] says that rule fires at
    row i of the chunk for seed s (rules that are disabled are absent).
    """
    k, num_seeds = losses.shape
    enabled = set(cfg.rules)
    n0 = int(state["num_steps"])
    index = n0 + np.arange(k)  # steps since the start of the curve
    loss_ok = np.isfinite(losses)
    grad_ok = np.isfinite(grad_norms) if grad_norms is not None else np.zeros_like(loss_ok)
    loss_vals = np.where(loss_ok, losses, 0.0)
    grad_vals = np.where(grad_ok, grad_norms, 0.0) if grad_norms is not None else np.zeros_like(loss_vals)
    fired: dict[str, np.ndarray] = {}

    if "nonfinite" in enabled:
        fired["nonfinite"] = ~loss_ok | (~grad_ok if grad_norms is not None else False)

    # early_max: the reference of row i is the max of the finite losses of the steps before
    # min(i, window); for rows past the window that is the whole window's max, as Megatron has it.
    in_early = (index < cfg.early_max_window)[:, None] & loss_ok
    prior_max, early_max = _exclusive_scan(np.maximum, np.where(in_early, loss_vals, -np.inf),
                                           np.where(state["early_seen"], state["early_max"], -np.inf))
    early_seen = state["early_seen"] | in_early.any(axis=0)
    early_max = np.where(early_seen, early_max, 0.0)
    if "early_max" in enabled:
        watched = (index >= cfg.early_max_window) | cfg.early_reference
        fired["early_max"] = (watched[:, None] & loss_ok & (prior_max > -np.inf)
                              & (loss_vals >= cfg.early_max_factor * prior_max))

    # The running minimum (the early spike reference): min of the finite losses of the steps before row i.
    prior_min, loss_min = _exclusive_scan(np.minimum, np.where(loss_ok, loss_vals, np.inf),
                                          np.where(state["min_seen"], state["loss_min"], np.inf))
    min_seen = state["min_seen"] | loss_ok.any(axis=0)
    loss_min = np.where(min_seen, loss_min, 0.0)

    all_loss = np.concatenate([state["loss_hist"], loss_vals])
    all_loss_ok = np.concatenate([state["loss_ok"], loss_ok])
    all_grad = np.concatenate([state["grad_hist"], grad_vals])
    all_grad_ok = np.concatenate([state["grad_ok"], grad_ok])

    # spikes: a run of consecutive spike steps, carried across chunks in spike_run.
    count, mean, _ = _window_stats(all_loss, all_loss_ok, cfg.spike_window, k, with_std=False)
    with np.errstate(invalid="ignore"):
        spike = loss_ok & (count >= cfg.spike_min_history) & (loss_vals >= cfg.spike_factor * mean)
    if cfg.early_reference:
        early_rows = (index < cfg.spike_min_history)[:, None] & loss_ok & (prior_min < np.inf)
        spike |= early_rows & (loss_vals >= cfg.spike_factor * prior_min)
    rows = np.arange(k)[:, None]
    # Run length at row i = i - (last non-spike row at or before i); before the chunk the "last
    # non-spike row" sits spike_run rows before row 0.
    last_reset = np.maximum.accumulate(np.where(spike, -1 - state["spike_run"][None, :], rows), axis=0)
    run = np.where(spike, rows - last_reset, 0)
    spike_run = run[-1] if k else state["spike_run"]
    if "spikes" in enabled:
        fired["spikes"] = run > cfg.spike_count

    if "sigma" in enabled:
        sigma_fire = np.zeros((k, num_seeds), bool)
        series = [(all_loss, all_loss_ok, loss_vals, loss_ok)]
        if cfg.sigma_on_grad_norm and grad_norms is not None:
            series.append((all_grad, all_grad_ok, grad_vals, grad_ok))
        for values, ok, new_vals, new_ok in series:
            count, mean, std = _window_stats(values, ok, cfg.sigma_window, k, with_std=True)
            with np.errstate(invalid="ignore"):
                above = new_vals > mean + cfg.sigma_k * std
                sigma_fire |= new_ok & (count >= cfg.sigma_min_history) & above
        fired["sigma"] = sigma_fire

    h_loss, h_grad = _history_lengths(cfg)
    new_state = {
        "num_steps": np.asarray(n0 + k, np.int64),
        "loss_hist": all_loss[all_loss.shape[0] - h_loss :],
        "loss_ok": all_loss_ok[all_loss_ok.shape[0] - h_loss :],
        "grad_hist": all_grad[all_grad.shape[0] - h_grad :],
        "grad_ok": all_grad_ok[all_grad_ok.shape[0] - h_grad :],
        "early_max": early_max,
        "early_seen": early_seen,
        "loss_min": loss_min,
        "min_seen": min_seen,
        "spike_run": np.asarray(spike_run, np.int64),
    }
    return new_state, fired


def _exclusive_scan(op, values, initial):
    """(rows, last): rows[i] = op-reduction of `initial` and values[:i] (the rows strictly before i), per
    column; last = the reduction over all of them (the state after the chunk).

    values: float64[k, S]; initial: float64[S]. max and min are exact, so any chunking gives the same rows.
    """
    inclusive = op.accumulate(np.concatenate([initial[None, :], values]), axis=0)
    return inclusive[:-1], inclusive[-1]


def _first_firing(fired: dict[str, np.ndarray], k: int, num_seeds: int):
    """First row and rule (index into RULES) that fired per seed; -1 where none. Returns two int64[S]."""
    any_fired = np.zeros((k, num_seeds), bool)
    code = np.full((k, num_seeds), -1, np.int64)
    for r in reversed(range(len(RULES))):  # lower index = higher priority, so it is written last
        if RULES[r] in fired:
            code = np.where(fired[RULES[r]], r, code)
            any_fired |= fired[RULES[r]]
    has = any_fired.any(axis=0)
    if k == 0:
        return np.full((num_seeds,), -1, np.int64), np.full((num_seeds,), -1, np.int64)
    row = np.where(has, np.argmax(any_fired, axis=0), -1)
    rule = np.where(has, code[np.maximum(row, 0), np.arange(num_seeds)], -1)
    return row, rule


def _as_2d(name: str, x, num_seeds: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1 and num_seeds is None:
        a = a[:, None]
    if a.ndim != 2 or (num_seeds is not None and a.shape[1] != num_seeds):
        want = "[steps]" if num_seeds is None else f"[steps, {num_seeds}]"
        raise UserError(f"{name} must have shape {want}, got {np.shape(x)}")
    return a


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def detect(
    losses, grad_norms=None, cfg: DivergenceConfig | None = None, *, step0: int = 0
) -> DivergenceResult:
    """First step of a whole curve where any enabled rule fires.

    losses: float[n] loss per step; grad_norms: float[n] or None; steps are numbered step0 .. step0+n-1.
    """
    cfg = cfg or DivergenceConfig()
    if np.ndim(losses) != 1 or (grad_norms is not None and np.shape(grad_norms) != np.shape(losses)):
        raise UserError(
            f"losses must be 1-D and grad_norms the same shape, "
            f"got {np.shape(losses)} and {np.shape(grad_norms)}"
        )
    # One seed of the streaming kernel, fed the whole curve as a single chunk.
    losses2 = _as_2d("losses", losses)
    grads2 = _as_2d("grad_norms", grad_norms) if grad_norms is not None else None
    _, fired = _scan_chunk(cfg, _empty_state(cfg, 1), losses2, grads2)
    row, rule = _first_firing(fired, losses2.shape[0], 1)
    if row[0] < 0:
        return DivergenceResult(diverged=False)
    return DivergenceResult(diverged=True, step=int(step0 + row[0]), rule=RULES[rule[0]])


class DivergenceMonitor:
    """Streaming `detect` for many seeds at once, fed chunks of steps; bounded numpy history.

    Feeding a curve in any chunking gives exactly `detect` on the whole curve, seed by seed. Once a
    seed has diverged its result is frozen. State round-trips through `state_dict`/`load_state_dict`
    (dict of numpy arrays) or `to_json`/`from_json`, for checkpoint-resume.
    """

    def __init__(self, cfg: DivergenceConfig | None = None, num_seeds: int = 1):
        self.cfg = cfg or DivergenceConfig()
        _check_int("num_seeds", num_seeds, minimum=1)
        self.num_seeds = int(num_seeds)
        self._state = _empty_state(self.cfg, self.num_seeds)
        self._step0 = np.asarray(-1, np.int64)  # step number of the curve's first step (-1: none yet)
        self._uses_grad = np.asarray(-1, np.int64)  # -1 unknown, 0 no grad norms, 1 grad norms
        self.diverged = np.zeros((self.num_seeds,), bool)
        self.step = np.full((self.num_seeds,), -1, np.int64)  # -1 where not diverged
        self._rule = np.full((self.num_seeds,), -1, np.int64)  # index into RULES, -1 where not diverged

    @property
    def next_step(self) -> int | None:
        """The step number the next `update` must start at (None before the first update)."""
        return None if self._step0 < 0 else int(self._step0 + self._state["num_steps"])

    @property
    def rule(self) -> list[str | None]:
        return [RULES[r] if r >= 0 else None for r in self._rule]

    def results(self) -> list[DivergenceResult]:
        """Per-seed results so far."""
        return [
            DivergenceResult(diverged=True, step=int(s), rule=RULES[r])
            if d
            else DivergenceResult(diverged=False)
            for d, s, r in zip(self.diverged, self.step, self._rule, strict=True)
        ]

    def update(self, step0: int, losses, grad_norms=None) -> list[DivergenceResult]:
        """Feed steps step0 .. step0+k-1: losses float[k, num_seeds], grad_norms float[k, num_seeds] or None.

        Chunks must be contiguous (step0 == next_step), and grad norms given always or never.
        Returns the per-seed results so far (the first divergence of each seed).
        """
        losses2 = _as_2d("losses", losses, self.num_seeds)
        grads2 = _as_2d("grad_norms", grad_norms, self.num_seeds) if grad_norms is not None else None
        if grads2 is not None and grads2.shape != losses2.shape:
            raise UserError(f"grad_norms must have the shape of losses {losses2.shape}, got {grads2.shape}")
        if self.next_step is not None and int(step0) != self.next_step:
            raise UserError(f"step0 must continue the curve at step {self.next_step}, got {step0}")
        uses_grad = int(grads2 is not None)
        if self._uses_grad >= 0 and uses_grad != self._uses_grad:
            raise UserError("grad_norms must be given in every update or in none")
        if self._step0 < 0:
            self._step0 = np.asarray(int(step0), np.int64)
        self._uses_grad = np.asarray(uses_grad, np.int64)

        self._state, fired = _scan_chunk(self.cfg, self._state, losses2, grads2)
        row, rule = _first_firing(fired, losses2.shape[0], self.num_seeds)
        new = (row >= 0) & ~self.diverged
        self.step = np.where(new, int(step0) + row, self.step)
        self._rule = np.where(new, rule, self._rule)
        self.diverged = self.diverged | new
        return self.results()

    # -- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as numpy arrays (copies)."""
        out = {k: np.array(v) for k, v in self._state.items()}
        out.update(
            step0=np.array(self._step0),
            uses_grad=np.array(self._uses_grad),
            diverged=self.diverged.copy(),
            step=self.step.copy(),
            rule=self._rule.copy(),
        )
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore from `state_dict()` output; shapes must match this monitor's config and seed count."""
        reference = DivergenceMonitor(self.cfg, self.num_seeds).state_dict()
        missing = sorted(set(reference) - set(state))
        if missing:
            raise UserError(f"divergence monitor state is missing {', '.join(missing)}")
        loaded = {}
        for key, ref in reference.items():
            value = np.asarray(state[key]).astype(ref.dtype)
            if value.shape != ref.shape:
                raise UserError(
                    f"divergence monitor state {key!r} has shape {value.shape}, expected {ref.shape} "
                    "(different config or num_seeds?)"
                )
            loaded[key] = value
        self._state = {k: loaded[k] for k in self._state}
        self._step0, self._uses_grad = loaded["step0"], loaded["uses_grad"]
        self.diverged, self.step, self._rule = loaded["diverged"], loaded["step"], loaded["rule"]

    def to_json(self) -> str:
        """State and config as JSON (floats are written with round-trip precision; all finite)."""
        state = {k: v.tolist() for k, v in self.state_dict().items()}
        config = dataclasses.asdict(self.cfg)
        return json.dumps({"config": config, "num_seeds": self.num_seeds, "state": state})

    @classmethod
    def from_json(cls, text: str) -> DivergenceMonitor:
        data = json.loads(text)
        config = dict(data["config"])
        config["rules"] = tuple(config["rules"])
        monitor = cls(DivergenceConfig(**config), data["num_seeds"])
        monitor.load_state_dict({k: np.asarray(v) for k, v in data["state"].items()})
        return monitor
