"""What the experts specialise in (ST-MoE section 7): statistics of a trained model's routing decisions per
sparse layer, by latent language and by token class, with permutation nulls.

Computed after training from the final parameters (`train.routing_stats_batches` held-out batches, labelled
with each sequence's latent language by `Dataset.eval_batches(with_language=True)`), not as per-step
telemetry: a language label is a property of the data, not of the model, and the model never sees it. The
trainer routes the batches (`Trainer.routing_top1`); this module only counts (numpy, no model), so the store
holds the numbers and reports read them from there.

Every statistic uses the router's first choice (top-1 expert) of each real token (padding excluded; in the
decoder, the positions that carry a target), as ST-MoE Table 14 and the `sentinel_entropy` telemetry do:

  expert_entropy      H(E): entropy (nats) of the layer's top-1 experts over all tokens (ln E = balanced).
  sentinel_entropy    H(E | sentinel): entropy of the sentinel tokens' experts (ST-MoE Table 14).
  sentinel_entropy_null  the same for random subsets of the layer's tokens of the sentinels' size (mean over
                      permutations): the entropy without any sentinel specialisation, small-sample bias
                      included. sentinel_p: one-sided permutation p of sentinel_entropy being that low.
  sentinel_share      sentinels / tokens in this stack (the decoder's inputs carry one per span, and its
                      sequences are short, so sentinels are a much larger share there than in the encoder).
  token_nmi           I(token id; E) / H(E): how much of the expert choice the token id alone explains (1 for
                      Hash routing; ~0 for random routing once the null is subtracted); token_nmi_null: the
                      same after permuting experts across tokens (the plug-in bias); token_p.
  frequent_token_entropy  mean over the FREQUENT_TOKENS most frequent content tokens of the entropy of each
                      one's experts (0 = each always goes to one expert); frequent_token_entropy_null: with
                      experts permuted across tokens.
  sentinel_token_entropy  H(E | token id) over the sentinel positions: each sentinel id's own concentration
                      (sentinel_entropy pools s0, s1, ... which may go to different experts).
  language_expert     [languages][experts] counts of tokens of each language's sequences sent to each expert.
  language_nmi        I(language; E) / min(H(language), H(E)) from that table: 0 = experts do not depend on the
                      language, 1 = the expert determines the language (or the other way round);
                      language_nmi_null: mean over permutations of the languages across SEQUENCES (the unit
                      a language is drawn for), language_nmi_null_q95 its 95th percentile, language_p.
  language_nmi_token_null  the language NMI that routing by token id alone would give (experts shuffled
                      among the positions of the same token id; the languages use tokens at different rates),
                      language_token_p: one-sided p of language_nmi exceeding it (specialisation by language
                      beyond what the tokens explain).
"""

from __future__ import annotations

import numpy as np

from precision_lab import stats
from precision_lab.data import NUM_SPECIAL, PAD_ID

FREQUENT_TOKENS = 10
PERMUTATIONS = 200
STATISTICS: tuple[str, ...] = (
    "expert_entropy", "sentinel_entropy", "sentinel_entropy_null", "sentinel_p", "sentinel_share", "token_nmi",
    "token_nmi_null", "token_p", "frequent_token_entropy", "frequent_token_entropy_null", "language_nmi",
    "language_nmi_null", "language_nmi_null_q95", "language_p", "language_nmi_token_null", "language_token_p",
    "sentinel_token_entropy")


def _nan_none(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def layer_statistics(expert, valid, token_ids, sentinel, language=None, *, num_experts: int,
                     num_languages: int | None = None, permutations: int = PERMUTATIONS,
                     frequent: int = FREQUENT_TOKENS, seed: int = 0) -> dict:
    """The statistics above for one sparse layer.

    Args:
      expert: <int>[N, L] top-1 expert of every position of N sequences.
      valid: <bool>[N, L] the positions that are real tokens (counted).
      token_ids: <int>[N, L] the token at each position (the layer's stack input: encoder inputs or decoder
        inputs).
      sentinel: <bool>[N, L] sentinel positions.
      language: <int>[N] each sequence's latent language, or None (no language statistics).
      num_experts, num_languages: table sizes (num_languages None: 1 + the largest label).
      permutations, seed: the permutation nulls (deterministic per seed).
    Returns a JSON-ready dict (None for a statistic that is undefined, e.g. no sentinel in the stack).
    """
    rng = np.random.default_rng(seed)
    valid = np.asarray(valid, bool)
    e = np.asarray(expert)[valid].astype(np.int64)
    tok = np.asarray(token_ids)[valid].astype(np.int64)
    sen = np.asarray(sentinel, bool)[valid]
    n, big_e = e.size, num_experts
    out: dict = {"tokens": int(n)}
    h_e = stats.entropy(np.bincount(e, minlength=big_e))
    out["expert_entropy"] = h_e
    perms = [rng.permutation(n) for _ in range(permutations)]

    k = int(sen.sum())
    out["sentinel_share"] = k / n if n else None
    if k:
        obs = stats.entropy(np.bincount(e[sen], minlength=big_e))
        null = np.array([stats.entropy(np.bincount(e[p[:k]], minlength=big_e)) for p in perms])
        out |= {"sentinel_entropy": obs, "sentinel_entropy_null": float(null.mean()),
                "sentinel_p": stats.permutation_p(-obs, -null)}  # one-sided: lower entropy = more concentrated
    else:
        out |= {"sentinel_entropy": None, "sentinel_entropy_null": None, "sentinel_p": None}

    vocab = int(tok.max()) + 1 if n else 1

    def token_table(experts):
        return np.bincount(tok * big_e + experts, minlength=vocab * big_e).reshape(vocab, big_e)

    if n and h_e > 0:
        obs = stats.mutual_information(token_table(e)) / h_e
        null = np.array([stats.mutual_information(token_table(e[p])) / h_e for p in perms])
        out |= {"token_nmi": obs, "token_nmi_null": float(null.mean()), "token_p": stats.permutation_p(obs, null)}
    else:
        out |= {"token_nmi": None, "token_nmi_null": None, "token_p": None}

    content = (tok >= NUM_SPECIAL) & ~sen
    freq = np.bincount(tok[content], minlength=vocab)
    top = [t for t in np.argsort(-freq, kind="stable")[:frequent] if freq[t] > 0]

    def frequent_entropy(experts):
        return float(np.mean(stats.entropy(token_table(experts)[top], axis=1)))

    sentinel_ids = np.unique(tok[sen])
    if sentinel_ids.size:  # H(E | token) over the sentinel ids: pooled sentinel_entropy also mixes the ids
        table = token_table(e)[sentinel_ids]
        out["sentinel_token_entropy"] = float(np.sum(table.sum(axis=1) * stats.entropy(table, axis=1)) / table.sum())
    if top:
        out["frequent_token_entropy"] = frequent_entropy(e)
        out["frequent_token_entropy_null"] = float(np.mean([frequent_entropy(e[p]) for p in perms]))
    else:
        out["frequent_token_entropy"] = out["frequent_token_entropy_null"] = None

    if language is not None:
        lang = np.asarray(language).astype(np.int64)
        big_l = int(num_languages if num_languages is not None else lang.max() + 1)
        seq_of = np.broadcast_to(np.arange(valid.shape[0])[:, None], valid.shape)[valid]
        per_seq = np.bincount(seq_of * big_e + e, minlength=valid.shape[0] * big_e).reshape(-1, big_e)  # [N, E]

        def language_table(labels):
            return np.eye(big_l, dtype=np.int64)[labels].T @ per_seq  # [L, E]

        def nmi(table):
            denom = min(stats.entropy(table.sum(axis=1)), stats.entropy(table.sum(axis=0)))
            return stats.mutual_information(table) / denom if denom > 0 else np.nan

        table = language_table(lang)
        out["language_expert"] = table.tolist()
        obs = nmi(table)
        if np.isfinite(obs):
            null = np.array([nmi(language_table(rng.permutation(lang))) for _ in range(permutations)])
            out |= {"language_nmi": obs, "language_nmi_null": float(np.nanmean(null)),
                    "language_nmi_null_q95": float(np.nanquantile(null, 0.95)),
                    "language_p": stats.permutation_p(obs, null[np.isfinite(null)])}
            # What routing by token id alone gives: languages use tokens at different rates, so an expert
            # chosen by the token already depends on the language. Shuffle experts among the positions of
            # the same token id (across sequences and languages) and recompute.
            by_token = np.argsort(tok, kind="stable")
            within = []
            for _ in range(permutations):
                shuffled = np.empty_like(e)
                shuffled[by_token] = e[np.lexsort((rng.random(n), tok))]
                counts = np.bincount(seq_of * big_e + shuffled, minlength=valid.shape[0] * big_e).reshape(-1, big_e)
                within.append(nmi(np.eye(big_l, dtype=np.int64)[lang].T @ counts))
            within_a = np.array(within)
            out |= {"language_nmi_token_null": float(np.nanmean(within_a)),
                    "language_token_p": stats.permutation_p(obs, within_a[np.isfinite(within_a)])}
    for name in STATISTICS:
        if name in out:
            out[name] = _nan_none(out[name])
        else:
            out[name] = None
    return out


def routing_statistics(top1: list[list[np.ndarray]], batches: list[dict], layer_names: list[str], *,
                       num_experts: int, num_languages: int | None, seed: int = 0,
                       permutations: int = PERMUTATIONS) -> list[list[dict]]:
    """Per member (seed) and sparse layer, `layer_statistics` over all `batches` together.

    top1: per batch, <int>[members, B, L_stack] arrays, one per sparse layer (encoder layers first, as
    `layer_names`); batches: the held-out feature dicts they were routed from ("language" optional).
    """
    def cat(name):
        return np.concatenate([b[name] for b in batches])

    stack_inputs = {
        "encoder": (cat("inputs"), cat("inputs") != PAD_ID, cat("inputs_sentinel") > 0),
        "decoder": (cat("decoder_inputs"), cat("loss_mask") > 0, cat("decoder_inputs_sentinel") > 0),
    }
    language = cat("language") if all("language" in b for b in batches) else None
    members = top1[0][0].shape[0]
    out = []
    for m in range(members):
        layers = []
        for j, name in enumerate(layer_names):
            tokens, valid, sentinel = stack_inputs[name.split("/")[0]]
            expert = np.concatenate([np.asarray(b[j])[m] for b in top1])
            layers.append({"layer": name, **layer_statistics(
                expert, valid, tokens, sentinel, language, num_experts=num_experts, num_languages=num_languages,
                permutations=permutations, seed=seed * 1000 + j)})
        out.append(layers)
    return out
