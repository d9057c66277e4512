"""Fine-tuning: tasks, parameter subsets through optax, loading a pretrained run, the `finetune` command."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from precision_lab import cli
from precision_lab.config import run_config
from precision_lab.data import EOS_ID, NUM_SPECIAL, DataConfig
from precision_lab.errors import UserError
from precision_lab.finetune import TRAINABLE, is_trainable, load_params, trainable_labels
from precision_lab.model import init as model_init
from precision_lab.tasks import SIZES, TASKS, make_task

# a micro model (as the sweeps' smoke runs use) keeps every compile here to seconds
MICRO = ["--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_heads=2",
         "--set", "model.num_experts=4", "--set", "train.chunk_steps=2", "--set", "train.eval_batches=1"]


def _tree_paths(params):
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def test_trainable_subsets_follow_st_moe_table_6():
    run = run_config({})
    params, _ = jax.eval_shape(lambda k: model_init(k, run.model, run.policy), jax.random.key(0))
    paths = _tree_paths(params)
    chosen = {which: {p for p in paths if is_trainable(p.split("/"), which)} for which in TRAINABLE}
    assert chosen["all"] == set(paths)
    assert chosen["moe"] and all("/moe/" in p for p in chosen["moe"])
    assert chosen["non_moe"] == set(paths) - chosen["moe"]  # a partition of the parameters
    assert {p.rsplit("/", 1)[-1] for p in chosen["attention"]} == {"q", "k", "v", "o", "position_bias"}
    assert chosen["ffn"] and all("/ffn/" in p for p in chosen["ffn"]) and not chosen["ffn"] & chosen["moe"]
    labels = jax.tree.leaves(trainable_labels(params, "moe"))
    assert labels.count("trainable") == len(chosen["moe"])


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """One pretrained micro run (2 seeds, 4 steps) that every test here starts from."""
    out = tmp_path_factory.mktemp("pretrained") / "pre"
    assert cli.main(["train", "--steps", "4", "--seeds", "2", "--out", str(out), "--no-progress", *MICRO]) == 0
    return out


def test_finetune_moves_only_the_trainable_subset_and_writes_curves(pre, tmp_path):
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--from", str(pre), "--task", "reverse-small", "--trainable", "moe",
                     "--steps", "4", "--batch-size", "8", "--out", str(out), "--no-progress",
                     "--set", "train.chunk_steps=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune"]["task"] == "reverse-small" and summary["finetune"]["train_examples"] == 250
    assert all(np.isfinite(v) for v in summary["finetune"]["final_test_loss"])
    assert len(summary["eval_history"]) >= 1 and (out / "finetune_curves.png").exists()
    with np.load(pre / "params.npz") as a, np.load(out / "params.npz") as b:
        assert list(a["__seeds__"]) == list(b["__seeds__"]) == [0, 1]
        moved = {k: not np.array_equal(a[k], b[k]) for k in a.files if k != "__seeds__"}
    assert moved and all(m == ("/moe/" in k) for k, m in moved.items()), moved


def test_finetune_refuses_what_does_not_fit(pre, tmp_path, capsys):
    base = ["finetune", "--from", str(pre), "--steps", "2", "--out", str(tmp_path / "x"), "--no-progress"]
    cases = [
        (["--task", "reverse-small", "--set", "model.d_model=48"], "shapes do not fit"),
        (["--task", "revrse-small"], "valid choices: langid-large, langid-small, reverse-large, reverse-small"),
        (["--task", "reverse-small", "--seeds", "3"], "--seeds must be in [1, 2]"),
        (["--task", "reverse-small", "--batch-size", "0"], "--batch-size must be in [1, 1024]"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert cli.main(["finetune", "--from", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written on refusal


def test_load_params_checks_every_leaf(pre):
    run = run_config({"model": {"d_model": 32, "d_ff": 64, "num_heads": 2, "num_experts": 4}})
    template, _ = jax.eval_shape(lambda k: model_init(k, run.model, run.policy), jax.random.key(0))
    params = load_params(pre, template, [0])
    assert jax.tree.structure(params) == jax.tree.structure(template)
    with pytest.raises(UserError, match=r"holds seeds \[0, 1\], not \[5\]"):
        load_params(pre, template, [5])
    bigger = run_config({"model": {"d_model": 32, "d_ff": 64, "num_heads": 2, "num_experts": 8}})
    template8, _ = jax.eval_shape(lambda k: model_init(k, bigger.model, bigger.policy), jax.random.key(0))
    with pytest.raises(UserError, match="shapes do not fit"):
        load_params(pre, template8, [0])


def test_reverse_task_splits_are_fixed_sized_and_correct():
    task = make_task("reverse-small", DataConfig(kind="synthetic", vocab_size=128, num_sentinels=16),
                     inputs_length=64, targets_length=14, vocab_size=128)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [SIZES["small"], 1024, 1024]
    split = task.splits["train"]
    tokens = split["_tokens"]
    np.testing.assert_array_equal(split["targets"][:, :8], tokens[:, :8][:, ::-1])
    assert (split["targets"][:, 8] == EOS_ID).all() and (split["inputs"][:, tokens.shape[1]] == EOS_ID).all()
    assert tokens.min() >= NUM_SPECIAL and task.best_loss == 0.0 and task.chance_loss > 0
    # the same examples every time; a seed's epochs visit every training example once
    again = make_task("reverse-small", DataConfig(kind="synthetic", vocab_size=128, num_sentinels=16),
                      inputs_length=64, targets_length=14, vocab_size=128)
    np.testing.assert_array_equal(again.splits["test"]["inputs"], task.splits["test"]["inputs"])
    epoch = np.concatenate([task.batch(s, 50, seed=3)["inputs"] for s in range(5)])
    assert len({row.tobytes() for row in epoch}) == len({row.tobytes() for row in split["inputs"]})
    assert not np.array_equal(task.batch(0, 50, seed=3)["inputs"], task.batch(0, 50, seed=4)["inputs"])
    with pytest.raises(UserError, match="exceed its validation split"):
        task.eval_batches(100, 16)
    assert set(TASKS) == {"langid-small", "langid-large", "reverse-small", "reverse-large"}


def test_a_sweep_fine_tunes_from_a_pretrained_run(pre, tmp_path):
    from precision_lab.runner import sweep
    from precision_lab.store import ResultsStore

    toml = tmp_path / "ft.toml"
    toml.write_text(f"""name = "ft"
description = "fine-tuning in a sweep"
seeds = 2
[base]
model = {{ d_model = 32, d_ff = 64, num_heads = 2, num_experts = 4 }}
train = {{ steps = 2, batch_size = 8, chunk_steps = 2, eval_every = 0, eval_batches = 1, checkpoint_every = 0 }}
finetune = {{ from_run = "{pre}", task = "reverse-small", trainable = "non_moe" }}
""")
    sweep(toml, tmp_path / "store", progress=False)
    records = ResultsStore(tmp_path / "store").records()
    assert sorted(r["seed"] for r in records) == [0, 1]
    for r in records:
        assert r["resolved"]["finetune"]["trainable"] == "non_moe"
        assert np.isfinite(r["result"]["final_test_loss"])


def test_langid_task_labels_the_latent_language_and_has_an_exact_bayes_loss():
    data = DataConfig(kind="mixture", vocab_size=128, num_sentinels=16)
    task = make_task("langid-small", data, inputs_length=64, targets_length=14, vocab_size=128)
    split = task.splits["test"]
    languages = len(task.languages)
    assert languages >= 2 and task.num_examples("train") == SIZES["small"]
    np.testing.assert_array_equal(split["targets"][:, 0], NUM_SPECIAL + split["_language"])
    assert (split["targets"][:, 1] == EOS_ID).all() and split["loss_mask"].sum(axis=1).tolist() == [2.0] * 1024
    # 12 tokens leave the language uncertain: the Bayes loss is above 0 and below the prior's
    assert 0.0 < task.best_loss < task.chance_loss == pytest.approx(np.log(languages) / 2)
    with pytest.raises(UserError, match="several languages"):
        make_task("langid-small", DataConfig(kind="synthetic", vocab_size=128, num_sentinels=16),
                  inputs_length=64, targets_length=14, vocab_size=128)
