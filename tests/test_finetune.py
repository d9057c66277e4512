"""Fine-tuning: tasks, parameter subsets through optax, loading a pretrained run, the `finetune` command."""

from __future__ import annotations

import json
import re

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
        (["--task", "revrse-small"], "valid choices: langid-large, langid-small, langid16-large, langid16-small, reverse-large, reverse-small"),
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
    assert set(TASKS) == {"langid-small", "langid-large", "reverse-small", "reverse-large", "langid16-small",
                          "langid16-large"}


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


def test_langid16_is_the_same_task_with_runs_long_enough_to_name_the_language():
    """16-token runs: the label is nearly certain (Bayes loss ~0), the prior is the same; the 2-token task's
    examples are untouched by the new family (each family draws from its own stream)."""
    data = DataConfig(kind="mixture", vocab_size=128, num_sentinels=16)
    long_runs = make_task("langid16-small", data, inputs_length=64, targets_length=14, vocab_size=128)
    short = make_task("langid-small", data, inputs_length=64, targets_length=14, vocab_size=128)
    split = long_runs.splits["train"]
    assert split["_tokens"].shape == (SIZES["small"], 16)
    assert (split["inputs"][:, 16] == EOS_ID).all()
    np.testing.assert_array_equal(split["targets"][:, 0], NUM_SPECIAL + split["_language"])
    assert long_runs.best_loss < 0.01 < short.best_loss
    assert long_runs.chance_loss == pytest.approx(short.chance_loss)
    # the 2-token task's draws did not move: its examples are those of the previous versions
    assert short.splits["train"]["_tokens"][:3].tolist() == [[82, 53], [68, 39], [85, 32]]


# -- a pretraining sweep point (finetune.pretrain): pretrained once, shared, from a fresh store ------------------

# the programs of the `pre` fixture and of test_a_sweep_fine_tunes_from_a_pretrained_run (same shapes, optimiser,
# members): the compilation cache serves them, so this test costs little more than its data
PRETRAIN_SWEEP = """name = "{name}"
description = "fine-tuning from a pretraining sweep point"
seeds = 2
[base]
model = {{ d_model = 32, d_ff = 64, num_heads = 2, num_experts = 4 }}
train = {{ steps = 2, batch_size = 8, chunk_steps = 2, eval_every = 0, eval_batches = 1, checkpoint_every = 0 }}
finetune = {{ task = "langid-small", trainable = "non_moe", pretrain = {{ train = {{ steps = 4, chunk_steps = 2, eval_every = 0, eval_batches = 1, checkpoint_every = 2 }} }} }}
[[axes]]
field = "{field}"
values = {values}
"""


def test_a_sweep_pretrains_its_point_once_and_another_sweep_reuses_it(tmp_path):
    from precision_lab.runner import sweep
    from precision_lab.store import ResultsStore

    shared = tmp_path / "pretrained"
    first = tmp_path / "a.toml"
    first.write_text(PRETRAIN_SWEEP.format(name="a", field="model.load_balance_coef", values="[0.0]"))
    sweep(first, tmp_path / "store_a", progress=False, pretrained=shared)
    points = [p for p in shared.iterdir() if p.is_dir()]
    assert len(points) == 1 and (points[0] / "params.npz").is_file(), list(shared.iterdir())
    config = json.loads((points[0] / "config.json").read_text())
    assert "finetune" not in config and config["train"]["steps"] == 4  # the pretrain table's train, not ours
    assert (config["train"]["seed"], config["train"]["seeds"]) == (0, 2)  # `finetune --from` finds both seeds
    assert config["model"]["load_balance_coef"] == 1e-2  # c_B (a group may vary it) is not inherited
    records = ResultsStore(tmp_path / "store_a").records()
    assert len(records) == 2 and {r["result"]["pretrained_run"] for r in records} == {points[0].name}
    assert all(np.isfinite(r["result"]["pretrain_final_eval_loss"]) for r in records)
    stamp = (points[0] / "params.npz").stat().st_mtime_ns

    # another sweep, another axis (here its run config): the same point, found, not retrained
    from precision_lab.runner import load, pretrained_point
    from precision_lab.sweep import expand

    second = tmp_path / "b.toml"
    second.write_text(PRETRAIN_SWEEP.format(name="b", field="finetune.trainable", values='["all"]'))
    run = run_config(expand(load(second))[0].config)
    assert pretrained_point(run, [0, 1], shared) == points[0]
    assert (points[0] / "params.npz").stat().st_mtime_ns == stamp and [p for p in shared.iterdir() if p.is_dir()] == points


def test_a_pretraining_point_that_cannot_work_is_one_line(tmp_path):
    from precision_lab.runner import pretrained_point

    base = {"model": {"d_model": 32, "d_ff": 64, "num_heads": 2, "num_experts": 4}}
    cases = [
        ({"task": "langid-small", "pretrain": {"data": {"seed": 3}}}, "valid choices: divergence, model, optim"),
        ({"task": "langid-small", "pretrain": {"train": {"steps": 0}}}, "finetune.pretrain: train.steps must be"),
        ({"task": "langid-small", "pretrain": {"train": {"stpes": 4}}}, "train field 'stpes'"),
        ({"task": "langid-small", "from_run": "x", "pretrain": {"train": {}}}, "give one"),
        ({"task": "langid-small"}, "finetune.from_run (a `precision-lab train` --out folder) or finetune.pretrain"),
    ]
    for finetune, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            run_config({**base, "finetune": finetune})
    wider = run_config({**base, "finetune": {"task": "langid-small", "pretrain": {"model": {"d_model": 48}}}})
    with pytest.raises(UserError, match="parameter shapes differ"):
        pretrained_point(wider, [0], tmp_path)  # refused before any training
    assert not any(tmp_path.iterdir())


# -- fine-tuning report tables (synthetic records: no training) ------------------------------------------------------


def _ft_config(label, *, task="langid-small", experts=8, trainable="all", batch=16, lr=1e-3, cf=1.25, coef=1e-2,
               test=(), history=()):
    """A ConfigResult of a fine-tuning configuration with per-seed test losses and validation histories."""
    from precision_lab.report import ConfigResult

    resolved = {"model": {"num_experts": experts, "train_capacity_factor": cf, "load_balance_coef": coef},
                "finetune": {"task": task, "trainable": trainable}, "train": {"batch_size": batch, "steps": 100},
                "optim": {"lr": lr}}
    records, metrics = [], []
    for seed, t in enumerate(test):
        hist = history[seed] if history else [(100, t)]
        records.append({"seed": seed, "resolved": resolved, "env": {"unigram_loss": 5.0},
                        "result": {"diverged": False, "outcome": "stable", "final_eval_loss": hist[-1][1],
                                   "final_test_loss": t, "eval_history": [{"step": s, "loss": l} for s, l in hist],
                                   "divergence_step": None, "divergence_rule": None, "quality_gap": None}})
        metrics.append({"ce": np.full(100, 0.1), "router_dropped_token_fraction": np.full((100, 2), 0.125)})
    return ConfigResult(label=label, overrides={}, config={}, records=records, metrics=metrics)


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # zero-spread differences
def test_finetune_tables_pair_by_seed():
    from precision_lab import report

    # overfitting: sparse's validation minimum at step 50, dense's at 100 (even seeds) or 80 (odd): -50 / -30
    rise = lambda s, best_at: [(25, 1.0), (50, 0.8 if best_at == 50 else 0.9), (80, 0.7 if best_at == 80 else 0.85),
                               (100, 0.6 if best_at == 100 else 0.9 + 0.01 * s)]
    sparse = _ft_config("sparse", test=[1.0] * 6, history=[rise(s, 50) for s in range(6)])
    dense = _ft_config("dense", experts=0, test=[1.0] * 6, history=[rise(s, 100 if s % 2 == 0 else 80) for s in range(6)])
    sparse.records[0]["result"]["outcome"] = "failed_to_learn"  # overfitted above chance: still counted
    table = report.table_finetune_overfitting([sparse, dense])
    row = next(line for line in table.splitlines() if "best validation step" in line)
    assert "| -40 [" in row and "(n=6)" in row, row

    # hparams: sparse gains 0.1 (+0.01 on odd seeds) from the small batch, dense loses 0.1: sparse - dense -0.205
    cells = []
    for experts, sign in ((8, -1), (0, +1)):
        for batch in (8, 32):
            for lr in (3e-4, 3e-3):
                test = [1.0 + 0.01 * s + (batch == 8) * sign * (0.1 + 0.01 * (s % 2) * (sign < 0))
                        + (lr == 3e-3) * sign * 0.2 for s in range(6)]
                cells.append(_ft_config(f"{experts},{batch},{lr}", experts=experts, batch=batch, lr=lr, test=test))
    table = report.table_finetune_hparams(cells)
    assert "### test loss (final)" in table and "### best validation loss" in table
    row = next(line for line in table.splitlines() if line.startswith("| smaller batch"))
    assert "| -0.205 [" in row, row
    row = next(line for line in table.splitlines() if line.startswith("| higher lr"))
    assert "| -0.400 [" in row, row

    # trainable: moe-only 0.3 worse than all (+0.01 on odd seeds)
    subsets = [_ft_config(w, trainable=w, test=[1.0 + 0.01 * s + (w == "moe") * (0.3 + 0.01 * (s % 2))
                                                + (w == "non_moe") * 0.002 * (s % 3) for s in range(6)])
               for w in ("all", "non_moe", "moe")]
    table = report.table_finetune_trainable(subsets)
    assert "| moe | much worse | moe | 6 / 0 / 0 | 1.330 +- 0.021 | +0.305 [" in table, table
    moe = next(line for line in table.splitlines() if line.startswith("| moe |"))
    assert moe.count("+0.305 [") == 2, moe  # test loss and best validation (here the one validation point)
    assert "| ffn | as good as all | not run |" in table

    # capacity: the baseline is the largest CF with the load-balancing loss; without it 0.05 worse at CF 0.25
    grid = [_ft_config(f"{cf},{coef}", cf=cf, coef=coef, test=[1.0 + 0.01 * s + (cf < 1 and not coef) * (0.05 + 0.01 * (s % 2))
                                                               for s in range(6)])
            for cf in (2.0, 0.25) for coef in (1e-2, 0.0)]
    table = report.table_finetune_capacity(grid)
    assert "| 2 | on (0.01) | 0.125 | 6 / 0 / 0 | 1.025 +- 0.019 | baseline |" in table, table
    assert "| 0.25 | +0.055 [" in table and "| 2 | +0.000" in table, table
