"""Routing-specialisation statistics (precision_lab/specialization.py) on routings whose answer is known, and
the language labels of the held-out batches they are computed on."""

import math

import numpy as np
import pytest

from precision_lab import stats
from precision_lab.data import NUM_SPECIAL, DataConfig, make_dataset
from precision_lab.specialization import layer_statistics, routing_statistics

E, LANGS, N, LEN, VOCAB = 4, 4, 64, 24, 40


def _data(seed=0):
    rng = np.random.default_rng(seed)
    language = np.repeat(np.arange(LANGS), N // LANGS)
    tokens = rng.integers(NUM_SPECIAL, VOCAB, size=(N, LEN))
    sentinel = np.zeros((N, LEN), bool)
    sentinel[:, ::6] = True  # 4 per sequence
    tokens[sentinel] = VOCAB  # one sentinel id
    valid = np.ones((N, LEN), bool)
    valid[:, -3:] = False  # padding is never counted
    return rng, language, tokens, sentinel, valid


def test_routing_by_language_is_found_and_random_routing_is_not():
    rng, language, tokens, sentinel, valid = _data()
    by_language = np.broadcast_to(language[:, None] % E, (N, LEN))
    s = layer_statistics(by_language, valid, tokens, sentinel, language, num_experts=E, num_languages=LANGS)
    assert s["language_nmi"] == pytest.approx(1.0)
    assert s["language_p"] < 0.01 and s["language_nmi_null_q95"] < 0.2
    table = np.array(s["language_expert"])
    assert table.shape == (LANGS, E) and table.sum() == valid.sum()
    assert np.array_equal(table, np.diag(np.diag(table)))  # language l only ever went to expert l
    random = rng.integers(0, E, size=(N, LEN))
    r = layer_statistics(random, valid, tokens, sentinel, language, num_experts=E, num_languages=LANGS)
    assert r["language_p"] > 0.01 and r["language_nmi"] < r["language_nmi_null_q95"] + 0.02
    assert r["expert_entropy"] == pytest.approx(math.log(E), abs=0.01)
    assert r["sentinel_entropy"] == pytest.approx(r["sentinel_entropy_null"], abs=0.05)
    assert r["token_nmi"] == pytest.approx(r["token_nmi_null"], abs=0.03)


def test_token_hash_routing_and_sentinel_expert():
    rng, language, tokens, sentinel, valid = _data(1)
    hashed = tokens % E  # Hash Layers: the token id alone decides; sentinels (id VOCAB = 40) all to expert 0
    s = layer_statistics(hashed, valid, tokens, sentinel, language, num_experts=E, num_languages=LANGS)
    assert s["token_nmi"] == pytest.approx(1.0) and s["token_p"] < 0.01 and s["token_nmi_null"] < 0.2
    assert s["frequent_token_entropy"] == 0.0 and s["frequent_token_entropy_null"] > 1.0
    assert s["sentinel_entropy"] == 0.0 and s["sentinel_p"] < 0.01
    assert s["sentinel_share"] == pytest.approx(sentinel[valid].mean())
    assert s["language_p"] > 0.01  # tokens are independent of the language here


def test_no_sentinels_no_languages_gives_none_not_a_crash():
    _, language, tokens, sentinel, valid = _data(2)
    s = layer_statistics(tokens % E, valid, tokens, np.zeros_like(sentinel), None, num_experts=E)
    assert s["sentinel_entropy"] is None and s["language_nmi"] is None and "language_expert" not in s


def test_mutual_information_matches_definition():
    table = np.array([[10, 0, 5], [2, 8, 5]], float)
    p = table / table.sum()
    indep = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    expected = np.sum(p[nz] * np.log(p[nz] / indep[nz]))
    assert stats.mutual_information(table) == pytest.approx(expected)
    assert stats.mutual_information(np.outer([1, 2], [3, 4, 5])) == pytest.approx(0.0, abs=1e-12)
    assert stats.permutation_p(1.0, [0.0] * 99) == pytest.approx(0.01)
    counts = np.random.default_rng(0).integers(0, 5, size=(6, 7))
    counts[2] = 0
    from scipy.stats import entropy as scipy_entropy

    rows = stats.entropy(counts, axis=1)
    assert np.isnan(rows[2]) and math.isnan(stats.entropy(np.zeros(3)))
    for i in (0, 1, 3, 4, 5):
        assert rows[i] == pytest.approx(scipy_entropy(counts[i]))
    assert stats.entropy(counts) == pytest.approx(scipy_entropy(counts.ravel()))
    stacked = stats.mutual_information(np.stack([table, np.outer([1, 2], [3, 4, 5])]))
    assert stacked[0] == pytest.approx(expected) and stacked[1] == pytest.approx(0.0, abs=1e-12)


def test_labelled_eval_batches_are_the_eval_batches_with_their_true_language():
    ds = make_dataset(DataConfig(vocab_size=128, num_sentinels=16, inputs_length=64))
    plain = ds.eval_batches(2, 16)
    labelled = ds.eval_batches(2, 16, with_language=True)
    for a, b in zip(plain, labelled):
        assert set(b) == set(a) | {"language"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # the label is the language under which the visible bigrams (adjacent non-sentinel input tokens, which
    # were adjacent before corruption) are most likely: the tables are sparse, so this names it
    logt = [np.log(np.maximum(lang.transition, 1e-300)) for lang in ds.mixture.languages]
    first_sentinel = ds.vocab_size - ds.config.num_sentinels
    hits = total = 0
    for b in labelled:
        for row, lang in zip(b["inputs"], b["language"]):
            content = (row >= NUM_SPECIAL) & (row < first_sentinel)
            pairs = content[:-1] & content[1:]
            x, y = row[:-1][pairs] - NUM_SPECIAL, row[1:][pairs] - NUM_SPECIAL
            hits += int(np.argmax([lt[x, y].sum() for lt in logt]) == lang)
            total += 1
    assert hits / total > 0.95 and len(set(np.concatenate([b["language"] for b in labelled]))) > 4


def test_routing_statistics_splits_members_and_stacks():
    ds = make_dataset(DataConfig(vocab_size=128, num_sentinels=16, inputs_length=64))
    batches = ds.eval_batches(2, 8, with_language=True)
    # two members: member 0 routes every token to expert 1, member 1 by language
    top1 = [[np.stack([np.ones_like(b["inputs"]), np.broadcast_to(b["language"][:, None] % E, b["inputs"].shape)]),
             np.stack([np.ones_like(b["decoder_inputs"]),
                       np.broadcast_to(b["language"][:, None] % E, b["decoder_inputs"].shape)])] for b in batches]
    out = routing_statistics(top1, batches, ["encoder/1", "decoder/1"], num_experts=E, num_languages=8,
                             permutations=20)
    assert [[l["layer"] for l in m] for m in out] == [["encoder/1", "decoder/1"]] * 2
    assert out[0][0]["expert_entropy"] == 0.0 and out[0][0]["language_nmi"] is None  # H(E) = 0: undefined
    assert out[1][1]["language_nmi"] > 0.9
    enc, dec = out[1]
    assert enc["tokens"] == int(sum((b["inputs"] != 0).sum() for b in batches))
    assert dec["tokens"] == int(sum(b["loss_mask"].sum() for b in batches))
    assert dec["sentinel_share"] > enc["sentinel_share"]  # one sentinel per span in far fewer positions


def test_language_dependence_explained_by_token_ids_is_told_apart_from_routing_by_language():
    rng, language, tokens, sentinel, valid = _data(3)
    # language l uses tokens l*4 .. l*4+11 (overlapping ranges): routing by token id alone depends on language
    tokens = NUM_SPECIAL + language[:, None] * 4 + rng.integers(0, 12, size=(N, LEN))
    by_token = (tokens // 5) % E
    s = layer_statistics(by_token, valid, tokens, sentinel, language, num_experts=E, num_languages=LANGS)
    assert s["language_p"] < 0.01  # depends on the language...
    assert s["language_nmi_token_null"] == pytest.approx(s["language_nmi"], abs=1e-9)  # ...through tokens only
    assert s["language_token_p"] > 0.5
    mixed = np.where(rng.random((N, LEN)) < 0.5, by_token, language[:, None] % E)  # half by language
    m = layer_statistics(mixed, valid, tokens, sentinel, language, num_experts=E, num_languages=LANGS)
    assert m["language_token_p"] < 0.01 and m["language_nmi"] > m["language_nmi_token_null"]
    # per sentinel id: the one sentinel id always goes to expert 0 under hashing
    h = layer_statistics(_data(1)[2] % E, valid, _data(1)[2], sentinel, language, num_experts=E)
    assert h["sentinel_token_entropy"] == 0.0


def _config(label, per_seed_layers, model):
    from precision_lab.report import ConfigResult

    resolved = {"model": model, "train": {"label": label}}
    records = [{"seed": s, "result": {"routing_stats": layers, "final_eval_loss": 2.0 + 0.01 * s, "diverged": False,
                                      "outcome": "stable"}, "resolved": resolved, "timing": {"step_s": 0.1}}
               for s, layers in per_seed_layers.items()]
    return ConfigResult(label, {}, resolved, records, [{} for _ in records])


def _stack_layers(seed, decoder_routing):
    """An encoder layer routed at random and a decoder layer routed by `decoder_routing(tokens, rng)`."""
    rng, language, tokens, sentinel, valid = _data(seed)
    enc = layer_statistics(rng.integers(0, E, size=(N, LEN)), valid, tokens, sentinel, language, num_experts=E,
                           num_languages=LANGS, permutations=30)
    dec = layer_statistics(decoder_routing(tokens, rng), valid, tokens, sentinel, language, num_experts=E,
                           num_languages=LANGS, permutations=30)
    return [{"layer": "encoder/1", **enc}, {"layer": "decoder/1", **dec}]


def test_report_explains_a_decoder_that_routes_every_token_by_id():
    from precision_lab.report import table_routing_stats

    by_id = _config("hashed decoder", {s: _stack_layers(s, lambda t, r: t % E) for s in range(3)},
                    {"num_experts": E, "targets_length": LEN})
    text = table_routing_stats(by_id)
    assert "| encoder/1 | 2.2 |" in text and "| decoder/1 | 3.4 |" in text  # the paper's column
    assert "opposite of ST-MoE Table 14, but not because its experts specialise in sentinels" in text
    # sentinels to expert 0, every other token at random: a sentinel-specific concentration
    only_sentinels = _config("sentinel expert", {s: _stack_layers(
        s, lambda t, r: np.where(t == VOCAB, 0, r.integers(0, E, size=t.shape))) for s in range(3)},
        {"num_experts": E, "targets_length": LEN})
    assert "a sentinel-specific effect" in table_routing_stats(only_sentinels)


def test_num_experts_table_and_figure(tmp_path):
    from precision_lab.figures import num_experts_figure
    from precision_lab.report import table_num_experts

    configs = [_config(lab, {s: [] for s in range(3)},
                       {"num_experts": e, "routing": r, "top_k": k, "train_capacity_factor": cf})
               for lab, e, r, k, cf in (("baseline", 8, "top2", 2, 1.25), ("experts_64", 64, "top2", 2, 1.25),
                                        ("top3", 8, "topk", 3, 1.875))]
    configs[0].config["train"]["label"] = "baseline"
    text = table_num_experts(configs)
    assert "| experts_64 | 64 | 2 | 1.25 |" in text and "| top3 | 8 | 3 | 1.875 |" in text
    assert "| 100.0 | 1.00 |" in text  # step time and its ratio to the baseline's
    paths = num_experts_figure(configs, tmp_path, "ne")
    assert paths[0].stat().st_size > 1000


def test_report_tells_token_routing_with_a_sentinel_excess_apart():
    from precision_lab.report import table_routing_stats

    def routing(t, r):  # content tokens mostly by id (80%), sentinels always to expert 0
        return np.where(t == VOCAB, 0, np.where(r.random(t.shape) < 0.8, t % E, r.integers(0, E, size=t.shape)))

    c = _config("mixed", {s: _stack_layers(s, routing) for s in range(3)}, {"num_experts": E, "targets_length": LEN})
    assert "a smaller sentinel-specific part on top" in table_routing_stats(c)


def test_encoder_vs_decoder_verdict_rests_on_a_paired_test():
    """The report says which stack concentrates sentinels more only where the paired-by-seed difference is
    significant (a 0.05-nat gap between means over 4 seeds used to be printed as "the decoder concentrates
    sentinels MORE")."""
    from precision_lab.report import ConfigResult, _stacks_compared

    names = ["encoder/1", "decoder/1"]
    c = ConfigResult("top2", {}, {"model": {"targets_length": 14}}, [], [])

    def layer(sentinel, token=1.0, frequent=1.0, nmi=0.5, share=0.1):
        return {"sentinel_entropy": sentinel, "sentinel_token_entropy": token, "frequent_token_entropy": frequent,
                "token_nmi": nmi, "sentinel_share": share}

    noisy = {s: [layer(1.9 + e), layer(1.85 + f)] for s, (e, f) in
             enumerate([(0.0, 0.3), (0.1, -0.3), (-0.1, 0.2), (0.05, -0.2)])}
    assert "do not differ significantly" in _stacks_compared(noisy, names, c)
    lower = {s: [layer(2.0 + 0.01 * s), layer(1.2 + 0.02 * s)] for s in range(4)}
    assert "concentrates sentinels MORE" in _stacks_compared(lower, names, c)
    higher = {s: [layer(1.2 + 0.01 * s), layer(2.5 + 0.02 * s)] for s in range(4)}
    assert "As in ST-MoE Table 14" in _stacks_compared(higher, names, c)
