"""Every shipped experiment: documented, runs (smoke version) through sweep -> store -> figures -> report;
a real SIGKILL of a sweep process resumes to identical results; bad sweep input exits 2 and loses nothing."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from precision_lab.cli import _report_names, main
from precision_lab.report import load_sweep_results, write_report
from precision_lab.runner import BATCHABLE_FIELDS, QUICKSTART, SMOKE_BASE, load, sweep
from precision_lab.sweep import expand
from precision_lab.store import ResultsStore

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TRAINING = sorted(p for p in EXPERIMENTS.glob("*.toml") if tomllib.loads(p.read_text()).get("kind") != "roundoff")


def test_every_experiment_documents_itself():
    assert len(TRAINING) >= 7
    for path in [*EXPERIMENTS.glob("*.toml"), QUICKSTART]:
        head = path.read_text().split("\n[")[0]
        for word in ("command:", "runtime:"):
            assert word in head, f"{path.name} lacks '{word}' in its header comment"
        assert "RUNTIME_" not in head, f"{path.name}: runtime placeholder not filled in"
        assert re.search(r"reproduces|shows", head), path.name


@pytest.fixture(scope="module")
def shared_pretrained(tmp_path_factory):
    """One pretraining folder for every fine-tuning smoke of a test process, as `sweep --pretrained DIR` gives
    several sweeps one: those that name the same pretraining point pretrain it once."""
    return tmp_path_factory.mktemp("pretrained")


# The default suite trains the smoke versions of the experiments below, which together take each path a sweep
# can take (the main job's sweep, divergence rules, fine-tuning from a shared pretraining point, traced
# formats, routing statistics; router_fp16's programs are also the kill-and-resume test's). Every other
# experiment's smoke run is marked slow: each compiles its own programs, 20-95 s apiece with a cold cache on 2
# cores, which put the default suite at 19 min on a fresh machine (README, Tests: `pytest -m slow`). Every
# experiment, these included, is still loaded and validated in the default suite (the test below).
DEFAULT_SMOKES = {"quickstart", "router_fp16", "finetune_hparams", "sensitivity_map", "specialization"}


def _smoke_param(path: Path):
    marks = () if path.stem in DEFAULT_SMOKES else (pytest.mark.slow,)
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", sorted(set(EXPERIMENTS.glob("*.toml")) - set(TRAINING)), ids=lambda p: p.stem)
def test_every_roundoff_experiment_validates(path):
    from precision_lab.roundoff import ANALYSES, load_roundoff_experiment

    name, kwargs = load_roundoff_experiment(path)
    assert name in ANALYSES and set(kwargs) <= set(ANALYSES[name].fields)


@pytest.mark.parametrize("path", [*TRAINING, QUICKSTART], ids=lambda p: p.stem)
def test_every_experiment_and_its_smoke_version_validate(path):
    """What `sweep` checks before it trains anything, for every shipped sweep: each run configuration of
    the full and the smoke sweep, the [report]'s table and figure names (the smoke test below does not pass
    them), and that the smoke version still has runs and is a sub-grid of the full one."""
    full = load(path, report_names=_report_names())
    small = load(path, smoke_test=True, report_names=_report_names())
    runs_full, runs_small = expand(full, BATCHABLE_FIELDS), expand(small, BATCHABLE_FIELDS)
    assert runs_small and len(runs_small) <= len(runs_full)
    assert set(small.seeds) <= set(full.seeds)
    assert {r.config["train"]["steps"] for r in runs_small} == {SMOKE_BASE["train"]["steps"]}


@pytest.mark.parametrize("path", [_smoke_param(p) for p in [*TRAINING, QUICKSTART]])
def test_experiment_smoke(path, tmp_path, shared_pretrained):
    summary = sweep(path, tmp_path, progress=False, smoke_test=True, pretrained=shared_pretrained)
    assert summary.computed == summary.shard_runs > 0
    report = write_report(tmp_path)
    text = report.read_text()
    manifest, configs = load_sweep_results(tmp_path)
    for table in manifest["report"].get("tables", []):
        assert f"## {table.replace('_', ' ').capitalize()}" in text
    if record_routing := ResultsStore(tmp_path).records()[0]["result"].get("routing_stats"):  # routing_stats_batches
        assert [layer["layer"] for layer in record_routing] == configs[0].records[0]["env"]["moe_layer_names"]
        assert "Language x expert" in text and "Encoder vs decoder" in text
    for fig in manifest["report"].get("figures", []):
        assert (tmp_path / "figures" / f"{manifest['name']}_{fig}.png").stat().st_size > 1000
        assert f"{manifest['name']}_{fig}.png" in text
    assert "backend cpu" in text and "jax" in text
    record = ResultsStore(tmp_path).records()[0]
    assert {"final_eval_loss", "diverged", "divergence_step", "divergence_rule"} <= set(record["result"])
    assert record["env"]["policy_resolved"]["mode"] in ("emulate", "native")


SWEEP_ARGS = ["sweep", "experiments/router_fp16.toml", "--smoke", "--no-progress"]


def _sweep_proc(out: Path):
    return subprocess.Popen([sys.executable, "-m", "precision_lab.cli", *SWEEP_ARGS, "--out", str(out)],
                            cwd=EXPERIMENTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _comparable(store: Path) -> dict:
    s = ResultsStore(store)
    return {rid: ({k: v for k, v in s.get(rid).items() if k != "timing"}, s.metrics(rid)) for rid in s.ids()}


def test_sweep_killed_and_resumed_ends_identical(tmp_path):
    whole = _sweep_proc(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    victim = _sweep_proc(tmp_path / "killed")
    runs = tmp_path / "killed" / "runs"
    deadline = time.time() + 600
    while victim.poll() is None and time.time() < deadline and not (runs.exists() and any(runs.glob("*.json"))):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run([sys.executable, "-m", "precision_lab.cli", *SWEEP_ARGS, "--out", str(tmp_path / "killed"),
                              "--resume"], cwd=EXPERIMENTS.parent, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = _comparable(tmp_path / "whole"), _comparable(tmp_path / "killed")
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid][0] == b[rid][0], rid
        for name in a[rid][1]:
            np.testing.assert_array_equal(a[rid][1][name], b[rid][1][name])


@pytest.mark.parametrize("content,needle", [
    ("name = 'x'\n[base\n", "TOML"),
    ("seeds = 1\n[base]\ntrain = { steps = 3 }\n[[axes]]\nfield = 'train.stpes'\nvalues = [1]\n", "train.stpes"),
    ("seeds = 1\n[base]\ntrain = { steps = 3 }\n[[axes]]\nfield = 'train.steps'\nvalues = []\n", "no values"),
    ("seeds = 1\n[base]\npolicy = 'bf61'\n", "bf16"),
    ("seeds = 1\n[base]\nmodel = { routing = 'topk', top_k = 3, num_experts = 2 }\n", "top_k"),
])
def test_bad_sweep_input_exits_2_and_keeps_the_store(tmp_path, capsys, content, needle):
    store = tmp_path / "store"
    ResultsStore(store).put("keep-me", {"result": {"x": 1}})
    before = sorted(p.name for p in (store / "runs").iterdir())
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    assert main(["sweep", str(bad), "--out", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "bad.toml" in err, err
    assert sorted(p.name for p in (store / "runs").iterdir()) == before
    assert ResultsStore(store).get("keep-me")["result"] == {"x": 1}


def test_report_of_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no sweep results" in capsys.readouterr().err


# -- report cells (synthetic results: no training) -----------------------------------------------------------------


def _config_result(label, lr, losses, diverged, **metrics):
    from precision_lab.report import ConfigResult

    records = [{"seed": i, "resolved": {"optim": {"lr": lr}},
                "env": {"backend": "cpu", "device": "cpu"}, "timing": {"step_s": 0.01},
                "result": {"diverged": d, "final_eval_loss": l, "quality_gap": l - 2.0,
                           "divergence_step": 5 if d else None, "divergence_rule": "nonfinite" if d else None}}
               for i, (l, d) in enumerate(zip(losses, diverged))]
    steps = {"ce": np.full(20, 4.0), **{k: np.full((20, 2), v) for k, v in metrics.items()}}
    return ConfigResult(label=label, overrides={"optim.lr": lr}, config={}, records=records,
                        metrics=[steps for _ in records])


def test_report_cells_where_every_seed_diverged_print_x():
    """Regression: a diverged seed's frozen eval loss was averaged into the lr table (backends report: 12.34 at
    lr 1.0 where both seeds diverged). Every quality cell of a configuration with no stable seed prints x."""
    from precision_lab import report

    ok = _config_result("lr=0.1", 0.1, [2.5, 2.7], [False, False])
    dead = _config_result("lr=1", 1.0, [12.34, 12.34], [True, True])
    lr_table = report.table_lr_sensitivity([ok, dead])
    assert "12.34" not in lr_table and "| 2.60 x |" in lr_table
    for table in (report.table_summary([dead]), report.table_backends([dead])):
        assert "12.34" not in table and "| x |" in table
    assert report._neg_log_ppl(dead) == "x" and report._neg_log_ppl(ok) == "-2.600 +- 0.141"


def test_report_gate_bound_and_dropped_tokens_vs_assignments():
    """The bf16 gate roundoff bound is max|logit| * 2^-8 (8 significant bits; format-generic 2^-(m+1)); the
    capacity table reports dropped TOKENS and dropped ASSIGNMENTS, named so."""
    from precision_lab import report

    assert report.gate_roundoff_bound(10.0) == 10.0 * 2.0**-8
    assert report.gate_roundoff_bound(10.0, "fp8_e4m3fn") == 10.0 * 2.0**-4
    assert report.gate_roundoff_bound(None) is None
    c = _config_result("cf", 0.1, [2.5, 2.6], [False, False], router_max_abs_logit=16.0,
                       router_dropped_token_fraction=0.03, router_dropped_assignment_fraction=0.4)
    assert "| 0.0625 |" in report.table_router([c]) and "2^-8" in report.table_router([c])
    c = report.dataclasses.replace(c, records=[dict(r, resolved={"model": {"train_capacity_factor": 1.25,
                                                                           "eval_capacity_factor": 2.0}})
                                               for r in c.records])
    table = report.table_capacity_factor([c])
    assert "dropped tokens" in table and "dropped assignments" in table
    assert "| 0.030 | 0.400 |" in table


def test_smoke_version_of_a_cosine_sweep_shortens_its_warmup(tmp_path):
    """Regression: a cosine schedule decays over train.steps, which the smoke version cuts to 6, below a 20-step
    warm-up: loading the smoke version exited 2 (total_steps must be > warmup_steps)."""
    from precision_lab.runner import SMOKE_BASE, load

    path = tmp_path / "cosine.toml"
    path.write_text("name = 'c'\nseeds = 1\n[base]\ntrain = { steps = 300 }\n"
                    "optim = { schedule = 'cosine', warmup_steps = 20 }\n")
    spec = load(path, smoke_test=True)
    assert spec.base["optim"]["warmup_steps"] < SMOKE_BASE["train"]["steps"]
    assert load(path).base["optim"]["warmup_steps"] == 20  # the full version is untouched
