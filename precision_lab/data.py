"""Training data: T5 span corruption over a synthetic Markov language or over a local text file.

Vocabulary layout (every dataset):
  0                         PAD, also the decoder start token (as in T5)
  1                         EOS
  2 .. vocab_size-S-1       ordinary tokens (Markov states, bytes, or characters)
  vocab_size-S .. vocab_size-1
                            S = `num_sentinels` sentinels, allocated from the top down:
                            sentinel k is vocab_size - 1 - k (T5's extra_ids).

Span corruption follows T5 (Raffel et al. 2020; t5.data.preprocessors.random_spans_noise_mask,
noise_span_to_unique_sentinel, nonnoise_span_to_unique_sentinel, random_spans_helper) exactly:
  * a raw example has `tokens_length` tokens; num_noise = round(length * density) clamped to
    [1, length - 1], num_spans = max(1, round(num_noise / mean_span)); round is half-to-even in float32,
    like tf.math.round on the float32 products T5 computes.
  * the noise tokens and the non-noise tokens are each split into num_spans segments by a uniformly random
    composition (every segment >= 1 token); segments alternate non-noise, noise, ..., so the example starts
    with non-noise and ends with noise.
  * inputs  = a0 s0 a1 s1 ... a(k-1) s(k-1) EOS    (each noise span becomes one sentinel)
    targets = s0 n0 s1 n1 ... s(k-1) n(k-1) EOS    (each sentinel followed by the tokens it hid)
    The target ends with EOS, not a final sentinel: that is what T5 does.
  * `random_spans_helper` picks the largest tokens_length whose inputs fit in the requested inputs_length;
    the targets length follows. Every example of a batch has the same number of noise tokens and spans, so
    targets are never padded and inputs are padded only by the rounding slack of the helper.

Batches are dicts of numpy arrays (see `to_features`). A batch is a pure function of (data seed, run seed,
step), so a resumed run sees the same data; evaluation data comes from a disjoint source (separate random
streams for the synthetic language, the held-out tail of the file for text).

The synthetic language is a first-order Markov chain whose rows are Dirichlet draws; its entropy rate is
exact, and `span_corruption_best_loss` gives the loss of the Bayes-optimal span-corruption model (see there
for how, and which part is a Monte Carlo estimate).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np

from precision_lab.errors import UserError, unknown_choice

PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = PAD_ID
NUM_SPECIAL = 2

# "mixture" (the default): several Markov languages, one per sequence, latent; "synthetic": ONE Markov
# language (the default before issue 13: a bigram lookup solves it); "text": a local file.
KINDS: tuple[str, ...] = ("mixture", "synthetic", "text")
LEVELS: tuple[str, ...] = ("byte", "char")

# The transition matrix is dense (K^2 float64) and best_loss needs its powers, so keep K moderate.
MAX_SYNTHETIC_VOCAB = 4096

# Tags that keep the random streams of the language, training, evaluation and best-loss estimation apart:
# numpy's SeedSequence hashes the whole entropy list, so different tags give independent streams.
_LANGUAGE, _TRAIN, _EVAL, _BEST_LOSS = 0x1A6, 0x7A1, 0xE7A, 0xBE5


# ---------------------------------------------------------------------------------------------------------
# Span lengths (T5's random_spans_helper)
# ---------------------------------------------------------------------------------------------------------


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a raw example of `length` tokens, as T5 computes them."""
    length = max(int(length), 2)
    # float32 products and half-to-even rounding reproduce tf.math.round(tf.cast(length, tf.float32) * d).
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def _inputs_targets_lengths(tokens_length: int, noise_density: float, mean: float) -> tuple[int, int]:
    num_noise, num_spans = noise_span_counts(tokens_length, noise_density, mean)
    # one sentinel per span on each side, and one EOS on each side
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_helper(
    *, inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(tokens_length, targets_length) so that span-corrupted inputs fit in `inputs_length`, as in T5.

    For T5's defaults (0.15, 3.0): inputs_length 512 -> (568, 114); 128 -> (141, 29).
    """
    tokens_length = inputs_length - 1
    def fits(length: int) -> bool:
        return _inputs_targets_lengths(length, noise_density, mean_noise_span_length)[0] <= inputs_length

    while fits(tokens_length + 1):
        tokens_length += 1
    _, targets_length = _inputs_targets_lengths(tokens_length, noise_density, mean_noise_span_length)
    # T5's hack: with density 0.5, keep targets no longer than the (probably round) inputs length. T5 then
    # just subtracts 1 from the targets length, which is wrong when the counts change; recount instead.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        _, targets_length = _inputs_targets_lengths(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length, targets_length


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpanLayout:
    """The fixed shape of every span-corrupted example for one (inputs_length, density, mean span) choice.

    Attributes:
      tokens_length: raw tokens per example before corruption.
      num_noise_tokens, num_noise_spans: the same for every example (T5's counts for tokens_length).
      inputs_length: padded encoder length (what the user asked for).
      targets_length: decoder length; targets always fill it exactly.
      noise_density, mean_noise_span_length: the knobs this layout came from.
    """

    tokens_length: int
    num_noise_tokens: int
    num_noise_spans: int
    inputs_length: int
    targets_length: int
    noise_density: float
    mean_noise_span_length: float

    @property
    def num_nonnoise_tokens(self) -> int:
        return self.tokens_length - self.num_noise_tokens

    @property
    def unpadded_inputs_length(self) -> int:
        """Encoder tokens before padding: non-noise tokens, one sentinel per span, EOS."""
        return self.num_nonnoise_tokens + self.num_noise_spans + 1


def span_layout(
    *, inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> SpanLayout:
    """The `SpanLayout` for a requested encoder length; raises UserError for impossible settings."""
    if not isinstance(inputs_length, (int, np.integer)) or inputs_length < 3:
        raise UserError(f"data.inputs_length must be an integer >= 3, got {inputs_length!r}")
    if not 0.0 < noise_density < 1.0:
        raise UserError(f"data.noise_density must be in (0, 1), got {noise_density!r}")
    if not mean_noise_span_length >= 1.0:
        raise UserError(f"data.mean_noise_span_length must be >= 1, got {mean_noise_span_length!r}")
    tokens_length, targets_length = random_spans_helper(
        inputs_length=int(inputs_length),
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
    )
    num_noise, num_spans = noise_span_counts(tokens_length, noise_density, mean_noise_span_length)
    if num_spans > tokens_length - num_noise:
        # each span needs a non-noise segment before it; T5 would silently build broken masks here
        raise UserError(
            f"data.noise_density={noise_density} with data.mean_noise_span_length={mean_noise_span_length} "
            f"needs {num_spans} non-noise segments but only {tokens_length - num_noise} tokens are "
            "non-noise; lower the density or lengthen the spans"
        )
    return SpanLayout(
        tokens_length=tokens_length,
        num_noise_tokens=num_noise,
        num_noise_spans=num_spans,
        inputs_length=int(inputs_length),
        targets_length=targets_length,
        noise_density=float(noise_density),
        mean_noise_span_length=float(mean_noise_span_length),
    )


# ---------------------------------------------------------------------------------------------------------
# Span corruption
# ---------------------------------------------------------------------------------------------------------


def _random_segmentation(
    rng: np.random.Generator, batch: int, num_items: int, num_segments: int
) -> np.ndarray:
    """<int64>[batch, num_segments] uniformly random compositions of num_items (every part >= 1).

    Choosing num_segments - 1 distinct cut points among the num_items - 1 gaps uniformly is the same law as
    T5's shuffle of a 0/1 "first in segment" vector.
    """
    if num_segments == 1:
        return np.full((batch, 1), num_items, dtype=np.int64)
    keys = rng.random((batch, num_items - 1))
    cuts = np.argpartition(keys, num_segments - 2, axis=1)[:, : num_segments - 1]
    cuts = np.sort(cuts, axis=1) + 1
    bounds = np.concatenate(
        [np.zeros((batch, 1), np.int64), cuts, np.full((batch, 1), num_items, np.int64)], axis=1
    )
    return np.diff(bounds, axis=1)


def random_spans_noise_mask(rng: np.random.Generator, layout: SpanLayout, batch_size: int) -> np.ndarray:
    """<bool>[batch, tokens_length] T5 noise masks: True marks a noise (hidden) token.

    Every row has layout.num_noise_tokens noise tokens in layout.num_noise_spans spans, alternating with
    non-noise segments and starting with non-noise.
    """
    n, k = layout.num_noise_tokens, layout.num_noise_spans
    noise = _random_segmentation(rng, batch_size, n, k)
    nonnoise = _random_segmentation(rng, batch_size, layout.tokens_length - n, k)
    lengths = np.stack([nonnoise, noise], axis=2).reshape(-1)
    flags = np.tile(np.array([False, True]), batch_size * k)
    return np.repeat(flags, lengths).reshape(batch_size, layout.tokens_length)


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Replace each run of masked tokens by one sentinel (numbered from the left); drop the run's rest."""
    prev = np.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    first = mask & ~prev
    subsequent = mask & prev
    sentinels = vocab_size - np.cumsum(first, axis=1)  # first run -> vocab_size - 1
    out = np.where(first, sentinels, tokens)
    kept = ~subsequent
    counts = kept.sum(axis=1)
    if np.any(counts != counts[0]):
        raise ValueError("every row of a batch needs the same number of noise tokens and spans")
    return out[kept].reshape(tokens.shape[0], counts[0] if len(counts) else 0)


def span_corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, *, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of a batch, unpadded.

    Args:
      tokens: <int32>[batch, length] raw token ids (no sentinels among them).
      noise_mask: <bool>[batch, length] from `random_spans_noise_mask`.
      vocab_size: total vocabulary; sentinel k is vocab_size - 1 - k.
    Returns:
      inputs: <int32>[batch, nonnoise + spans + 1], noise spans -> sentinels, then EOS.
      targets: <int32>[batch, noise + spans + 1], each sentinel then the tokens it hid, then EOS.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    inputs = _spans_to_sentinels(tokens, noise_mask, vocab_size)
    targets = _spans_to_sentinels(tokens, ~noise_mask, vocab_size)
    eos = np.full((tokens.shape[0], 1), EOS_ID, np.int32)
    return (
        np.concatenate([inputs, eos], axis=1).astype(np.int32),
        np.concatenate([targets, eos], axis=1).astype(np.int32),
    )


def to_features(
    inputs: np.ndarray, targets: np.ndarray, *, inputs_length: int, targets_length: int
) -> dict[str, np.ndarray]:
    """Pad to fixed lengths and add the decoder side.

    Returns:
      "inputs":         <int32>[batch, inputs_length] encoder ids, PAD-padded (inputs != PAD is the mask).
      "targets":        <int32>[batch, targets_length] decoder labels, PAD-padded.
      "decoder_inputs": <int32>[batch, targets_length] targets shifted right, DECODER_START_ID (= PAD)
                        first.
      "loss_mask":      <float32>[batch, targets_length] 1 where the target is not PAD; every sentinel and
                        the EOS carry loss.
    """
    batch = inputs.shape[0]
    if inputs.shape[1] > inputs_length or targets.shape[1] > targets_length:
        raise ValueError(
            f"examples of {inputs.shape[1]}/{targets.shape[1]} tokens exceed {inputs_length}/{targets_length}"
        )
    enc = np.full((batch, inputs_length), PAD_ID, np.int32)
    enc[:, : inputs.shape[1]] = inputs
    dec = np.full((batch, targets_length), PAD_ID, np.int32)
    dec[:, : targets.shape[1]] = targets
    dec_in = np.full((batch, targets_length), DECODER_START_ID, np.int32)
    dec_in[:, 1:] = dec[:, :-1]
    return {
        "inputs": enc,
        "targets": dec,
        "decoder_inputs": dec_in,
        "loss_mask": (dec != PAD_ID).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------------
# The synthetic language: a stationary first-order Markov chain
# ---------------------------------------------------------------------------------------------------------


def _entropies(p: np.ndarray) -> np.ndarray:
    """Row entropies in nats of a <float64>[..., K] stochastic array (0 log 0 = 0)."""
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(p * np.log(safe), axis=-1)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MarkovLanguage:
    """A stationary Markov chain over the ordinary tokens NUM_SPECIAL .. NUM_SPECIAL + K - 1.

    Attributes:
      transition: <float64>[K, K] row-stochastic; transition[a, b] = P(next = b | current = a).
      stationary: <float64>[K] the stationary distribution; sequences start from it.
    """

    transition: np.ndarray
    stationary: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.transition.shape[0]

    @property
    def entropy_rate(self) -> float:
        """Exact entropy rate in nats/token: sum_a pi(a) H(transition[a, :])."""
        return float(self.stationary @ _entropies(self.transition))

    @property
    def token_marginal(self) -> np.ndarray:
        """<float64>[K] the marginal of any single token: the stationary distribution."""
        return self.stationary

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """<int32>[batch, length] token ids (offset by NUM_SPECIAL); each row is a stationary run."""
        return self.walk(self.draw(rng, batch, length))

    def draw(self, rng: np.random.Generator, batch: int, length: int) -> "ChainDraw":
        """Every random number `sample` uses, drawn from `rng` in sample's order (the walk draws none), so
        several generators' draws can be concatenated and walked at once (`walk`)."""
        start, _ = self._cdfs()
        u = rng.random((batch, length))
        state = np.minimum(np.searchsorted(start, u[:, 0], side="right"), self.num_tokens - 1)
        return ChainDraw(state, np.zeros(batch, np.int64), u)

    def walk(self, draw: "ChainDraw") -> np.ndarray:
        """<int32>[batch, length] token ids of `draw`'s rows (see `draw`)."""
        return _walk(self._cdfs()[1], self.num_tokens, draw.state, draw.table, draw.u) + NUM_SPECIAL

    def _cdfs(self) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.get("_cdf_cache")
        if cache is None:
            start = np.cumsum(self.stationary)
            start[-1] = 1.0
            cache = (start, _flat_cdf([self.transition]))
            object.__setattr__(self, "_cdf_cache", cache)
        return cache


def _flat_cdf(transitions: list[np.ndarray]) -> np.ndarray:
    """The row cdfs of stacked [K, K] transition tables, row r shifted into [r, r + 1] (one sorted array)."""
    rows = np.cumsum(np.concatenate(transitions, axis=0), axis=1)
    rows[:, -1] = 1.0
    return (rows + np.arange(rows.shape[0])[:, None]).reshape(-1)


class ChainDraw(NamedTuple):
    """The random part of a batch of chain runs: first states <int>[batch], transition table per row
    <int>[batch] (the language; 0 for a single chain) and one uniform per position <float64>[batch, length]
    (u[:, 0] chose the first state). Rows are independent, so draws concatenate along the batch."""

    state: np.ndarray
    table: np.ndarray
    u: np.ndarray

    @staticmethod
    def concatenate(draws: "Sequence[ChainDraw]") -> "ChainDraw":
        return ChainDraw(*(np.concatenate(parts) for parts in zip(*draws)))


def _walk(flat: np.ndarray, k: int, state: np.ndarray, table: np.ndarray, u: np.ndarray) -> np.ndarray:
    """<int32>[batch, length] chain states (0-based) from first states `state` <int>[batch], each row moving
    with transition table `table` <int>[batch] of the stacked `flat` cdf, one uniform per step (u[:, 1:]).

    The loop over positions is the data's whole cost (one searchsorted per position, however many rows),
    so callers walk every seed's rows in one call; the clamp is in-place minimum/maximum, not np.clip,
    whose per-call overhead was a third of the walk."""
    batch, length = u.shape
    out = np.empty((batch, length), np.int32)
    out[:, 0] = state
    for t in range(1, length):
        # row r of the stacked cdf lives in [r, r + 1] of `flat`, so one searchsorted serves all rows
        row = table * k + state
        state = np.searchsorted(flat, row + u[:, t], side="right") - row * k
        np.minimum(np.maximum(state, 0, out=state), k - 1, out=state)
        out[:, t] = state
    return out


def _stationary(transition: np.ndarray) -> np.ndarray:
    k = transition.shape[0]
    a = transition.T - np.eye(k)
    a[-1, :] = 1.0  # replace one (redundant) balance equation by sum(pi) = 1
    b = np.zeros(k)
    b[-1] = 1.0
    pi = np.clip(np.linalg.solve(a, b), 0.0, None)
    return pi / pi.sum()


def make_markov_language(
    *, num_tokens: int, concentration: float, seed: int, index: int | None = None
) -> MarkovLanguage:
    """A chain whose rows are independent Dirichlet(concentration * ones(num_tokens)) draws.

    `index` picks one of a family of independent chains for the same seed (the languages of a mixture).

    A small concentration makes rows sparse-ish: with K tokens a row's expected entropy is about
    digamma(K * c + 1) - digamma(c + 1) nats (c = 0.02, K = 410: about 2.7 nats).
    """
    rng = np.random.default_rng([_LANGUAGE, seed] if index is None else [_LANGUAGE, seed, index])
    # log-space Gamma draws (Gamma(c) = Gamma(c + 1) * U^(1/c)): plain Gamma(c) underflows to 0 for c << 1
    log_g = np.log(rng.gamma(concentration + 1.0, size=(num_tokens, num_tokens)))
    log_g += np.log(rng.random((num_tokens, num_tokens)) + np.finfo(np.float64).tiny) / concentration
    log_g -= log_g.max(axis=1, keepdims=True)
    p = np.exp(log_g)
    p /= p.sum(axis=1, keepdims=True)
    return MarkovLanguage(transition=p, stationary=_stationary(p))


# ---------------------------------------------------------------------------------------------------------
# The default synthetic data: a mixture of Markov languages (the language of a sequence is latent)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class MarkovMixture:
    """L Markov languages over the same K ordinary tokens; each sequence is a stationary run of ONE language,
    language l drawn with probability weights[l] and never shown to the model.

    Why this is the default (issue 13): in a single first-order chain a bigram lookup is the whole answer,
    so which expert a token goes to cannot matter. Here the next-token table depends on a latent language
    that must be inferred from context, and L tables of K x K hold L times the knowledge, so a model whose
    active parameters cannot hold all of them gains from experts that specialise (by language, or by token).

    Attributes:
      languages: the L chains (independent Dirichlet rows; see make_markov_language).
      weights: <float64>[L] mixture weights.
    """

    languages: tuple[MarkovLanguage, ...]
    weights: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.languages[0].num_tokens

    @property
    def entropy_rate(self) -> float:
        """sum_l w_l h_l nats/token: the entropy rate of the mixture process (the language is identified from
        a long enough sequence, so its information per token vanishes), exact."""
        return float(sum(w * lang.entropy_rate for w, lang in zip(self.weights, self.languages)))

    @property
    def token_marginal(self) -> np.ndarray:
        """<float64>[K] the marginal of any single token: sum_l w_l pi_l."""
        return sum(w * lang.stationary for w, lang in zip(self.weights, self.languages))

    def sample(self, rng: np.random.Generator, batch: int, length: int, *, with_language: bool = False):
        """<int32>[batch, length] token ids (offset by NUM_SPECIAL), each row one language's stationary run;
        with_language=True also returns the <int64>[batch] language of each row."""
        draw = self.draw(rng, batch, length)
        tokens = self.walk(draw)
        return (tokens, draw.table) if with_language else tokens

    def draw(self, rng: np.random.Generator, batch: int, length: int) -> ChainDraw:
        """Every random number `sample` uses, in its order (see MarkovLanguage.draw); `table` holds each
        row's language."""
        k = self.num_tokens
        starts, _ = self._cdfs()
        which = np.minimum(np.searchsorted(np.cumsum(self.weights), rng.random(batch), side="right"),
                           len(self.languages) - 1)
        u = rng.random((batch, length))
        state = np.minimum(np.searchsorted(starts, which + u[:, 0], side="right") - which * k, k - 1)
        return ChainDraw(state, which, u)

    def walk(self, draw: ChainDraw) -> np.ndarray:
        """<int32>[batch, length] token ids of `draw`'s rows."""
        return _walk(self._cdfs()[1], self.num_tokens, draw.state, draw.table, draw.u) + NUM_SPECIAL

    def _cdfs(self) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.get("_cdf_cache")
        if cache is None:
            cache = (_flat_cdf([lang.stationary[None, :] for lang in self.languages]),
                     _flat_cdf([lang.transition for lang in self.languages]))
            object.__setattr__(self, "_cdf_cache", cache)
        return cache


def make_markov_mixture(
    *, num_tokens: int, num_languages: int, concentration: float, seed: int
) -> MarkovMixture:
    """`num_languages` independent `make_markov_language` chains (index 0, 1, ...), equal weights."""
    languages = tuple(make_markov_language(num_tokens=num_tokens, concentration=concentration, seed=seed, index=i)
                      for i in range(num_languages))
    return MarkovMixture(languages=languages, weights=np.full(num_languages, 1.0 / num_languages))


def unigram_loss(token_marginal: np.ndarray, layout: SpanLayout) -> float:
    """The "failed to learn" reference, exact, in nats per target token: the loss of the best model that has
    learned the span-corruption FORMAT but no token statistics beyond unigram frequencies.

    Such a model copies every sentinel and the EOS into place and knows the prior of the noise span lengths
    (a uniform composition of N = num_noise_tokens into k = num_noise_spans parts), but predicts each hidden
    token from its marginal `token_marginal` alone (stationary chains: every position has it) and uses no
    context to place the span ends. Its loss is (log C(N-1, k-1) + N * H(token_marginal)) / targets_length.
    Runs whose eval loss sits at or above it have learned nothing a bigram would give; a context-free model
    that has not even learned the format is worse still.
    """
    n, k = layout.num_noise_tokens, layout.num_noise_spans
    span_prior = math.log(math.comb(n - 1, k - 1)) if k > 1 else 0.0
    return float((span_prior + n * _entropies(np.asarray(token_marginal, np.float64))) / layout.targets_length)


# ---------------------------------------------------------------------------------------------------------
# The Bayes-optimal span-corruption loss on the Markov language
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BestLoss:
    """Loss of the Bayes-optimal model, nats per loss-carrying target token (sentinels and EOS included).

    Attributes:
      value: the best loss (exact parts plus a Monte Carlo mean; see `span_corruption_best_loss`).
      stderr: Monte Carlo standard error of `value`.
      lower: exact; the best loss if the noise span lengths were revealed to the model.
      upper: exact; the best loss if the visible tokens told the model nothing about the span lengths.
      examples: Monte Carlo sample size.
    """

    value: float
    stderr: float
    lower: float
    upper: float
    examples: int


def span_corruption_best_loss(
    language: MarkovLanguage, layout: SpanLayout, *, examples: int = 4096, seed: int = 0
) -> BestLoss:
    """Expected per-target-token cross entropy of the Bayes-optimal span-corruption model.

    The model's loss averages -log q(target_i | targets_<i, inputs) over all targets_length positions (every
    example fills them all), so the best loss is H(T | X) / targets_length, T the targets and X the inputs.
    Write c = (g_0, ..., g_{k-1}) for the noise span lengths (a uniform composition of N into k parts; the
    non-noise lengths are visible in X). Then exactly

        H(T | X) = H(c | X) + H(noise tokens | X, c)

    because T is a function of (c, noise tokens) and vice versa given X.

    H(noise tokens | X, c) is computed exactly. Given c, span j's hidden tokens are a Markov bridge of
    g_j tokens from the visible token before it (a) to the visible token after it (b), so
    H = (g+1) h - H_{g+1}, with h the entropy rate and H_m = sum_a pi(a) H(P^m[a, :]); the last span has no
    right end and contributes g h. Averaging over the uniform composition (each g_j has marginal
    C(N-g-1, k-2) / C(N-1, k-1)) gives (N + k - 1) h - (k - 1) E[H_{g+1}]. This alone is `lower`.

    H(c | X) is the entropy of the span lengths given what the model sees: the sentinels and EOS in the
    target carry exactly this information. The posterior is p(c | X) ∝ prod_{j<k-1} P^{g_j+1}[a_j, b_j]
    (the last length is fixed by sum(c) = N), and its entropy for one X comes from a forward pass over the
    spans in the expectation semiring (forward-backward folded into one sweep: it carries both
    sum_c Q(c) and sum_c Q(c) log Q(c) per partial sum). That per-X entropy is exact; only its average over
    X is a Monte Carlo mean over `examples` sampled examples (a fixed stream for `seed`), which is
    unbiased. `upper` replaces it by the prior entropy log C(N-1, k-1).

    The model is assumed to know the data process (chain, N, k); nothing else is approximated.
    """
    n, k, t_len = layout.num_noise_tokens, layout.num_noise_spans, layout.targets_length
    powers, noise_term, prior_entropy = _bridge_terms(language, layout)
    if k == 1:
        per_example = np.zeros(examples)
    else:
        rng = np.random.default_rng([_BEST_LOSS, seed])
        tokens = language.sample(rng, examples, layout.tokens_length)
        mask = random_spans_noise_mask(rng, layout, examples)
        per_example = _span_length_posterior_entropy(tokens - NUM_SPECIAL, mask, powers, layout)

    mean = float(per_example.mean())
    stderr = float(per_example.std(ddof=1) / math.sqrt(examples)) if examples > 1 else float("inf")
    return BestLoss(
        value=(noise_term + mean) / t_len,
        stderr=stderr / t_len,
        lower=noise_term / t_len,
        upper=(noise_term + prior_entropy) / t_len,
        examples=examples,
    )


def mixture_best_loss(
    mixture: MarkovMixture, layout: SpanLayout, *, examples: int = 8192, seed: int = 0
) -> BestLoss:
    """Expected per-target-token cross entropy of the Bayes-optimal span-corruption model on a mixture:
    the model knows every language's chain and the data process, and infers the language (and the span
    lengths) from the inputs by exact posterior inference.

    Monte Carlo over `examples` sampled examples (a fixed stream for `seed`, so the number is deterministic)
    of the exact per-example loss -log p(T | X), with T the targets and X the inputs:

        p(T | X) = p(X, T) / p(X) = sum_l w_l p(seq | l) / sum_l w_l V_l(X) Z_l(X)

    (the mask's prior probability cancels): p(seq | l) is the whole sequence's probability under chain l;
    V_l(X) = pi_l(x_0) times the transitions between adjacent visible tokens; Z_l(X) = sum over noise span
    lengths c of prod_j P_l^(g_j+1)[a_j, b_j] (the bridges over the hidden spans, `_span_length_posterior`).
    The mean is unbiased; `stderr` is its standard error. Exact bounds: `lower` = sum_l w_l H(noise | X, c, l)
    (language and span lengths revealed), `upper` = lower + prior entropy of c + H(w) (nothing inferred).
    With one language this estimates the same number as `span_corruption_best_loss`, with more variance
    (that one integrates the hidden tokens out exactly).
    """
    from scipy.special import logsumexp

    t_len = layout.targets_length
    rng = np.random.default_rng([_BEST_LOSS, seed, len(mixture.languages)])
    tokens, _ = mixture.sample(rng, examples, layout.tokens_length, with_language=True)
    mask = random_spans_noise_mask(rng, layout, examples)
    x = tokens - NUM_SPECIAL
    both_visible = ~mask[:, :-1] & ~mask[:, 1:]  # adjacent visible pairs (the same non-noise segment)
    log_seq, log_visible, lower, prior = [], [], 0.0, 0.0
    with np.errstate(divide="ignore"):
        for w, lang in zip(mixture.weights, mixture.languages):
            powers, noise_term, prior = _bridge_terms(lang, layout)
            lower += w * noise_term
            log_first = np.log(lang.stationary[x[:, 0]])
            log_step = np.log(lang.transition[x[:, :-1], x[:, 1:]])  # -inf where this chain cannot move
            log_seq.append(log_first + log_step.sum(axis=1))
            log_z, _ = _span_length_posterior(x, mask, powers, layout)
            log_visible.append(log_first + np.where(both_visible, log_step, 0.0).sum(axis=1) + log_z)
    log_w = np.log(mixture.weights)[:, None]
    per_example = logsumexp(log_w + np.array(log_visible), axis=0) - logsumexp(log_w + np.array(log_seq), axis=0)
    h_w = float(_entropies(mixture.weights))
    return BestLoss(
        value=float(per_example.mean()) / t_len,
        stderr=float(per_example.std(ddof=1) / math.sqrt(examples)) / t_len,
        lower=lower / t_len,
        upper=(lower + prior + h_w) / t_len,
        examples=examples,
    )


def _bridge_terms(language: MarkovLanguage, layout: SpanLayout) -> tuple[list[np.ndarray], float, float]:
    """(powers P^2 .. P^(max_g + 1), H(noise tokens | X, c), prior entropy of the span lengths): the exact
    parts of `span_corruption_best_loss` (see there), in nats per example."""
    n, k = layout.num_noise_tokens, layout.num_noise_spans
    h = language.entropy_rate
    max_g = n - k + 1  # longest possible span
    p = language.transition
    pi = language.stationary

    # powers P^2 .. P^(max_g + 1): the bridge weights and the entropies H_m
    powers = [p @ p]
    for _ in range(max_g - 1):
        powers.append(powers[-1] @ p)
    if k == 1:
        # one span, the whole tail of the example: its length is known and it has no right-hand end
        return powers, n * h, 0.0
    h_m = np.array([pi @ _entropies(pm) for pm in powers])  # h_m[g - 1] = H_{g+1}
    g = np.arange(1, max_g + 1)
    q = np.array([math.comb(n - gi - 1, k - 2) for gi in g], np.float64) / math.comb(n - 1, k - 1)
    noise_term = (n + k - 1) * h - (k - 1) * float(q @ h_m)
    return powers, noise_term, math.log(math.comb(n - 1, k - 1))


def _span_length_posterior(
    states: np.ndarray, mask: np.ndarray, powers: list[np.ndarray], layout: SpanLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Per example, over the span lengths c given the visible tokens: (log Z, H(c | visible tokens)).

    `states` are 0-based chain states, `powers` = [P^2, P^3, ...]. Z = sum_c prod_{j<k-1} P^(g_j+1)[a_j, b_j]
    is the bridge likelihood summed over compositions (without the uniform prior 1 / C(N-1, k-1)); log Z is
    -inf where no composition is possible under this chain (another language's chain, in a mixture), and the
    entropy is then NaN. Both <float64>[batch].
    """
    n, k = layout.num_noise_tokens, layout.num_noise_spans
    batch = states.shape[0]
    max_g = n - k + 1
    prev = np.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    nxt = np.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:]
    starts = np.nonzero(mask & ~prev)[1].reshape(batch, k)
    ends = np.nonzero(mask & ~nxt)[1].reshape(batch, k)
    rows = np.arange(batch)[:, None]
    a = states[rows, starts[:, :-1] - 1]  # visible token before span j (j < k - 1)
    b = states[rows, ends[:, :-1] + 1]  # visible token after span j
    # w[j, g-1, b] = P^(g+1)[a_j, b_j]; scaling each (span, example) by a constant leaves the posterior
    # unchanged, so normalise to max 1 against underflow (and add the log of the scale back to log Z).
    # Example-last layout keeps the slices contiguous.
    w = np.stack([pm[a.T, b.T] for pm in powers], axis=1)
    w_max = w.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        log_z = np.sum(np.log(w_max[:, 0]), axis=0)
    w /= np.where(w_max > 0, w_max, 1.0)
    wlw = np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0)

    # alpha[t] = sum of Q over partial compositions with total t; beta[t] = sum of Q log Q over the same
    alpha = np.zeros((n + 1, batch))
    alpha[0] = 1.0
    beta = np.zeros((n + 1, batch))
    log_scale = np.zeros(batch)
    for j in range(k - 1):
        new_alpha = np.zeros_like(alpha)
        new_beta = np.zeros_like(beta)
        for gi in range(1, max_g + 1):
            wj, wlwj = w[j, gi - 1], wlw[j, gi - 1]
            new_alpha[gi:] += alpha[:-gi] * wj
            new_beta[gi:] += beta[:-gi] * wj + alpha[:-gi] * wlwj
        scale = new_alpha.sum(axis=0)
        safe = np.where(scale > 0, scale, 1.0)
        alpha, beta = new_alpha / safe, new_beta / safe
        with np.errstate(divide="ignore"):
            log_scale += np.log(scale)
    # the last span takes the remaining n - t >= 1 tokens, with no right-hand visible token
    z = alpha[:n].sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norm = log_scale + np.log(z)  # log of the sum over compositions of the normalised weights
        entropy = log_norm - beta[:n].sum(axis=0) / z
    return log_z + log_norm, entropy


def _span_length_posterior_entropy(
    states: np.ndarray, mask: np.ndarray, powers: list[np.ndarray], layout: SpanLayout
) -> np.ndarray:
    """<float64>[batch] H(span lengths | visible tokens) per example; `states` are 0-based chain states."""
    return _span_length_posterior(states, mask, powers, layout)[1]


# ---------------------------------------------------------------------------------------------------------
# Configuration and datasets
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What data to train on.

    Attributes:
      kind: "mixture" (num_languages Markov languages, one per sequence, the language latent: the default),
        "synthetic" (one Markov language) or "text" (a local file).
      path: the text file (kind="text").
      level: "byte" (256 byte tokens) or "char" (the file's characters, UTF-8) for kind="text".
      vocab_size: total vocabulary of the synthetic language, specials and sentinels included.
      num_sentinels: sentinel ids reserved at the top of the vocabulary (T5's extra_ids = 100).
      inputs_length: encoder length; the raw example and target lengths follow (random_spans_helper).
      noise_density, mean_noise_span_length: T5's span corruption knobs.
      concentration: Dirichlet concentration of the synthetic transition rows (smaller = lower entropy).
      num_languages: languages of the "mixture" kind (equal weights).
      eval_fraction: share of the text file (its tail) held out for evaluation.
      best_loss_examples: Monte Carlo sample size for the synthetic best loss.
      seed: the data seed: the synthetic language, evaluation data and best-loss sample come from it.
    """

    kind: Literal["mixture", "synthetic", "text"] = "mixture"
    path: str | None = None
    level: Literal["byte", "char"] = "byte"
    vocab_size: int = 512
    num_sentinels: int = 100
    inputs_length: int = 128
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    concentration: float = 0.02
    num_languages: int = 8
    eval_fraction: float = 0.1
    best_loss_examples: int = 8192
    seed: int = 0


def _check_seed(field: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise UserError(f"{field} must be an integer >= 0, got {value!r}")


def stack_batches(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feature dicts of equal keys and shapes stacked along a new leading axis (seeds, steps)."""
    return {n: np.stack([b[n] for b in batches]) for n in batches[0]}


class Dataset:
    """Span-corrupted batches over some token source. Use `make_dataset`.

    Attributes:
      config: the DataConfig.
      layout: the SpanLayout (inputs_length, targets_length, tokens_length, ...).
      vocab_size: total vocabulary (specials, ordinary tokens, sentinels).
    """

    config: DataConfig
    layout: SpanLayout
    vocab_size: int

    @property
    def entropy_rate(self) -> float | None:
        """Entropy rate of the token source in nats/token, when it is known exactly (else None)."""
        return None

    @property
    def best_loss(self) -> float | None:
        """Bayes-optimal span-corruption loss in nats per target token, when known (else None)."""
        return None

    @property
    def best_loss_stderr(self) -> float | None:
        """Monte Carlo standard error of `best_loss` (None when there is no best loss)."""
        return None

    @property
    def unigram_loss(self) -> float | None:
        """The "failed to learn" reference: loss of the best context-free model (see `unigram_loss`), when
        the token marginal is known (else None)."""
        marginal = self._token_marginal()
        return None if marginal is None else unigram_loss(marginal, self.layout)

    def reference_losses(self) -> dict[str, float | None]:
        """{"best_loss", "best_loss_stderr", "unigram_loss"} in nats per target token: what a run's eval loss
        is measured against (a seed at or above unigram_loss failed to learn; best_loss is the floor)."""
        return {"best_loss": self.best_loss, "best_loss_stderr": self.best_loss_stderr,
                "unigram_loss": self.unigram_loss}

    def _token_marginal(self) -> np.ndarray | None:
        return None

    def batch(self, step: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Training batch `step` for run seed `seed`: a pure function of (config.seed, seed, step).

        Returns the `to_features` dict: inputs <int32>[batch_size, inputs_length], targets, decoder_inputs
        <int32>[batch_size, targets_length], loss_mask <float32>[batch_size, targets_length].
        """
        rng = self._train_rng(step, batch_size, seed)
        return self._corrupt(rng, self._train_tokens(rng, batch_size))

    def seed_batches(self, step: int, batch_size: int, seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """Training batch `step` of every seed in `seeds`, stacked: each array [len(seeds), batch_size, ...],
        row i equal to `batch(step, batch_size, seeds[i])` (what a vmapped multi-seed run feeds per step)."""
        return stack_batches([self.batch(step, batch_size, seed=s) for s in seeds])

    def _train_rng(self, step: int, batch_size: int, seed: int) -> np.random.Generator:
        """The generator of training batch `step` of run seed `seed` (arguments checked)."""
        _check_seed("step", step)
        _check_seed("seed", seed)
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size!r}")
        return np.random.default_rng([_TRAIN, self.config.seed, seed, step])

    def eval_batches(self, n: int, batch_size: int, *, with_language: bool = False) -> list[dict[str, np.ndarray]]:
        """`n` held-out batches (the same on every call), disjoint from training data.

        with_language: also "language" <int32>[batch_size], the latent language of each row (the same
        batches, labelled: the routing-specialisation statistics need it), where the source has languages
        (the mixture; one language, 0, for "synthetic"; text files have none and get no "language")."""
        if n < 0 or batch_size < 1:
            raise UserError(f"eval batches need n >= 0 and batch_size >= 1, got {n!r} and {batch_size!r}")
        out = []
        for i in range(n):
            rng = np.random.default_rng([_EVAL, self.config.seed, i])
            tokens, language = self._eval_tokens_labelled(rng, i, batch_size)
            features = self._corrupt(rng, tokens)
            if with_language and language is not None:
                features["language"] = np.asarray(language, np.int32)
            out.append(features)
        return out

    def _eval_tokens_labelled(self, rng: np.random.Generator, index: int, batch_size: int):
        """(tokens, <int>[batch_size] language or None): `_eval_tokens` with each row's language."""
        return self._eval_tokens(rng, index, batch_size), None

    def _corrupt(self, rng: np.random.Generator, tokens: np.ndarray) -> dict[str, np.ndarray]:
        mask = random_spans_noise_mask(rng, self.layout, tokens.shape[0])
        inputs, targets = span_corrupt(tokens, mask, vocab_size=self.vocab_size)
        features = to_features(
            inputs,
            targets,
            inputs_length=self.layout.inputs_length,
            targets_length=self.layout.targets_length,
        )
        # Where the sentinels are, for ST-MoE's specialisation telemetry (Table 14): sentinels occupy the top
        # `num_sentinels` ids of the vocabulary.
        first_sentinel = self.vocab_size - self.config.num_sentinels
        for name in ("inputs", "decoder_inputs"):
            features[f"{name}_sentinel"] = (features[name] >= first_sentinel).astype(np.float32)
        return features

    def _train_tokens(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        raise NotImplementedError

    def _eval_tokens(self, rng: np.random.Generator, index: int, batch_size: int) -> np.ndarray:
        raise NotImplementedError


class SyntheticDataset(Dataset):
    """One Markov language (kind "synthetic"); training and evaluation draw from independent random streams.

    `best_loss` is computed on first use (about 0.3 s for the defaults, several seconds for
    inputs_length=512 or vocab_size in the thousands: it needs ~N powers of the K x K transition matrix).
    """

    def __init__(self, config: DataConfig, layout: SpanLayout):
        self.config, self.layout, self.vocab_size = config, layout, config.vocab_size
        self.language = self._make_language(config.vocab_size - NUM_SPECIAL - config.num_sentinels)
        self._best: BestLoss | None = None

    def _make_language(self, num_tokens: int):
        return make_markov_language(num_tokens=num_tokens, concentration=self.config.concentration,
                                    seed=self.config.seed)

    def _compute_best(self) -> BestLoss:
        return span_corruption_best_loss(self.language, self.layout, examples=self.config.best_loss_examples,
                                         seed=self.config.seed)

    @property
    def entropy_rate(self) -> float:
        return self.language.entropy_rate

    @property
    def best_loss_detail(self) -> BestLoss:
        """The best loss with its Monte Carlo error and exact bounds (computed once, on first use; the sample
        is a fixed stream of the data seed, so the number is deterministic)."""
        if self._best is None:
            self._best = self._compute_best()
        return self._best

    @property
    def best_loss(self) -> float:
        return self.best_loss_detail.value

    @property
    def best_loss_stderr(self) -> float:
        return self.best_loss_detail.stderr

    def _token_marginal(self) -> np.ndarray:
        return self.language.token_marginal

    def _train_tokens(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return self.language.sample(rng, batch_size, self.layout.tokens_length)

    def seed_batches(self, step: int, batch_size: int, seeds: Sequence[int]) -> dict[str, np.ndarray]:
        """As Dataset.seed_batches (bit-identical), with every seed's chains walked in one pass: each seed's
        generator draws what `batch` would draw, in the same order (the walk draws nothing, so it can wait
        until all seeds have drawn), then corrupts its own rows."""
        rngs = [self._train_rng(step, batch_size, s) for s in seeds]
        draws = [self.language.draw(rng, batch_size, self.layout.tokens_length) for rng in rngs]
        tokens = self.language.walk(ChainDraw.concatenate(draws)).reshape(len(seeds), batch_size, -1)
        return stack_batches([self._corrupt(rng, t) for rng, t in zip(rngs, tokens)])

    def _eval_tokens(self, rng: np.random.Generator, index: int, batch_size: int) -> np.ndarray:
        return self.language.sample(rng, batch_size, self.layout.tokens_length)

    def _eval_tokens_labelled(self, rng: np.random.Generator, index: int, batch_size: int):
        return self._eval_tokens(rng, index, batch_size), np.zeros(batch_size, np.int32)


class MixtureDataset(SyntheticDataset):
    """The default data (kind "mixture"): `num_languages` Markov languages, one per sequence, latent
    (`MarkovMixture`); `best_loss` is `mixture_best_loss` (Monte Carlo, with its standard error)."""

    @property
    def mixture(self) -> MarkovMixture:
        """The mixture (also `language`): its `languages` and `weights` (fine-tuning tasks read them)."""
        return self.language

    def _make_language(self, num_tokens: int):
        return make_markov_mixture(num_tokens=num_tokens, num_languages=self.config.num_languages,
                                   concentration=self.config.concentration, seed=self.config.seed)

    def _eval_tokens_labelled(self, rng: np.random.Generator, index: int, batch_size: int):
        # the same draws as _eval_tokens (sample consumes the generator identically), plus the languages
        return self.language.sample(rng, batch_size, self.layout.tokens_length, with_language=True)

    def _compute_best(self) -> BestLoss:
        return mixture_best_loss(self.language, self.layout, examples=self.config.best_loss_examples,
                                 seed=self.config.seed)


class TextDataset(Dataset):
    """A local file, tokenised by byte or character. The last `eval_fraction` of it is held out.

    Training examples are windows at random offsets in the training part; evaluation examples are
    consecutive non-overlapping windows of the held-out part (cycled if more are asked for than it holds).
    The character alphabet is built from the whole file so held-out text is always representable.
    """

    def __init__(self, config: DataConfig, layout: SpanLayout):
        self.config, self.layout = config, layout
        raw = _read_file(config.path)
        if config.level == "byte":
            ids = np.frombuffer(raw, np.uint8).astype(np.int32) + NUM_SPECIAL
            self.alphabet: list[str] | None = None
            num_tokens = 256
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"data.path {config.path!r} is not UTF-8 text ({e.reason}); use data.level='byte'"
                )
            points = np.frombuffer(text.encode("utf-32-le"), np.dtype("<u4"))
            alphabet = np.unique(points)
            ids = (np.searchsorted(alphabet, points) + NUM_SPECIAL).astype(np.int32)
            self.alphabet = [chr(c) for c in alphabet]
            num_tokens = len(alphabet)
        self.vocab_size = NUM_SPECIAL + num_tokens + config.num_sentinels
        split = len(ids) - int(round(len(ids) * config.eval_fraction))
        self.train_ids, self.eval_ids = ids[:split], ids[split:]
        need = layout.tokens_length
        if len(self.train_ids) < need or len(self.eval_ids) < need:
            raise UserError(
                f"data.path {config.path!r} is too short: {len(ids)} {config.level} tokens split "
                f"{len(self.train_ids)}/{len(self.eval_ids)} train/eval, each part needs >= {need} "
                f"for data.inputs_length={layout.inputs_length}"
            )

    def _token_marginal(self) -> np.ndarray:
        """Token frequencies of the whole file (the unigram model fitted to the data it is scored on)."""
        counts = np.bincount(np.concatenate([self.train_ids, self.eval_ids]) - NUM_SPECIAL,
                             minlength=self.vocab_size - NUM_SPECIAL - self.config.num_sentinels)
        return counts / counts.sum()

    def decode(self, ids: np.ndarray) -> str:
        """Text of ordinary token ids (specials and sentinels are skipped)."""
        ids = [int(i) - NUM_SPECIAL for i in np.ravel(ids)]
        if self.alphabet is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return "".join(self.alphabet[i] for i in ids if 0 <= i < len(self.alphabet))

    def _train_tokens(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        length = self.layout.tokens_length
        starts = rng.integers(0, len(self.train_ids) - length + 1, size=batch_size)
        return self.train_ids[starts[:, None] + np.arange(length)]

    def _eval_tokens(self, rng: np.random.Generator, index: int, batch_size: int) -> np.ndarray:
        length = self.layout.tokens_length
        windows = len(self.eval_ids) // length
        starts = ((index * batch_size + np.arange(batch_size)) % windows) * length
        return self.eval_ids[starts[:, None] + np.arange(length)]


def _read_file(path: str | None) -> bytes:
    if not path:
        raise UserError("data.path is required when data.kind='text'")
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise UserError(f"data.path {path!r}: no such file")
    try:
        with open(full, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"data.path {path!r}: cannot read ({e.strerror})")


def make_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset `cfg` describes; raises UserError for bad settings."""
    if cfg.kind not in KINDS:
        raise unknown_choice("data.kind", cfg.kind, KINDS)
    if cfg.level not in LEVELS:
        raise unknown_choice("data.level", cfg.level, LEVELS)
    _check_seed("data.seed", cfg.seed)
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction must be in (0, 1), got {cfg.eval_fraction!r}")
    layout = span_layout(
        inputs_length=cfg.inputs_length,
        noise_density=cfg.noise_density,
        mean_noise_span_length=cfg.mean_noise_span_length,
    )
    if cfg.num_sentinels < layout.num_noise_spans:
        raise UserError(
            f"data.num_sentinels={cfg.num_sentinels} is too few: data.inputs_length={cfg.inputs_length} "
            f"makes {layout.num_noise_spans} noise spans per example"
        )
    if cfg.kind == "text":
        return TextDataset(cfg, layout)
    num_tokens = cfg.vocab_size - NUM_SPECIAL - cfg.num_sentinels
    if num_tokens < 2 or cfg.vocab_size > MAX_SYNTHETIC_VOCAB:
        raise UserError(
            f"data.vocab_size must be in [{NUM_SPECIAL + cfg.num_sentinels + 2}, {MAX_SYNTHETIC_VOCAB}] "
            f"(2 specials + {cfg.num_sentinels} sentinels + >= 2 tokens), got {cfg.vocab_size!r}"
        )
    if not cfg.concentration > 0:
        raise UserError(f"data.concentration must be > 0, got {cfg.concentration!r}")
    if cfg.best_loss_examples < 2:
        raise UserError(f"data.best_loss_examples must be >= 2, got {cfg.best_loss_examples!r}")
    if cfg.kind == "synthetic":
        return SyntheticDataset(cfg, layout)
    if not (isinstance(cfg.num_languages, (int, np.integer)) and 1 <= cfg.num_languages <= 64):
        raise UserError(f"data.num_languages must be an integer in [1, 64], got {cfg.num_languages!r}")
    return MixtureDataset(cfg, layout)


__all__ = [
    "PAD_ID", "EOS_ID", "DECODER_START_ID", "NUM_SPECIAL", "KINDS", "LEVELS",
    "noise_span_counts", "random_spans_helper", "SpanLayout", "span_layout",
    "random_spans_noise_mask", "span_corrupt", "to_features",
    "MarkovLanguage", "make_markov_language", "BestLoss", "span_corruption_best_loss",
    "MarkovMixture", "make_markov_mixture", "mixture_best_loss", "unigram_loss",
    "DataConfig", "Dataset", "SyntheticDataset", "MixtureDataset", "TextDataset", "make_dataset",
]
