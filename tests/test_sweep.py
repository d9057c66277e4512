"""Sweep specs: parsing and its errors, deterministic expansion, sharding, and resumable execution
(including a real SIGKILL-and-resume and two concurrent shard processes sharing one store)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precision_lab.errors import UserError
from precision_lab.store import ResultsStore, to_jsonable
from precision_lab.sweep import (
    RunSpec,
    expand,
    group_runs,
    load_sweep,
    parse_shard,
    parse_sweep,
    run_sweep,
    shard,
)

SPEC = """
# command: precision-lab sweep experiments/x.toml --out runs/x
name = "z_loss"
description = "z-loss against bf16 instability"
seeds = 3
[base]
model = { preset = "tiny", d_model = 64 }
train = { steps = 20, lr = 1e-2, z_loss = 1e-3 }
policy = "bf16"
[[axes]]
field = "train.z_loss"
values = [0.0, 1e-4, 1e-3, 1e-2]
[[axes]]
zip = { "policy" = ["fp32", "bf16"], "train.lr" = [1e-2, 3e-2] }
[report]
figures = ["loss_curves", "router_logits"]
tables = ["stability"]
"""

# The test-only runner fixture: a fake, deterministic run_group (a small numpy computation from the config
# and seed, optionally sleeping per group and logging every run it computes). It is source text so that
# the subprocesses below can run exactly the same code with `python -c`.
FAKE_RUN_GROUP = """
import os, time
import numpy as np

def make_run_group(sleep=0.0, log=None):
    def run_group(runs):
        time.sleep(sleep)
        records = []
        for run in runs:
            train = run.config["train"]
            rng = np.random.default_rng(run.seed)
            steps = np.arange(train["steps"])
            loss = (np.exp(-10 * train["lr"] * steps) + train["z_loss"] + 0.01 * rng.standard_normal(steps.size))
            loss = loss.astype(np.float32)
            blown_up = run.config["policy"] == "bf16" and train["z_loss"] == 0.0
            if blown_up:
                loss[-5:] = np.nan
            if log:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} {run.run_id}\\n")
            records.append({
                "final_loss": float(loss[-1]),
                "max_loss": float("inf") if blown_up else float(loss.max()),
                "diverged": bool(blown_up),
                "metrics": {"loss": loss, "step": steps},
            })
        return records
    return run_group
"""

RUNNER = (
    FAKE_RUN_GROUP
    + """
import sys
from precision_lab.sweep import run_sweep
spec, out, shard_text, sleep, log = sys.argv[1:6]
summary = run_sweep(spec, out, make_run_group(float(sleep), log or None), shard=shard_text, progress=True)
print(summary)
"""
)

_ns: dict = {}
exec(FAKE_RUN_GROUP, _ns)
make_run_group = _ns["make_run_group"]


@pytest.fixture
def spec_path(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(SPEC)
    return path


# -- expansion ---------------------------------------------------------------------------------------------


def test_expansion_is_complete_and_ordered(spec_path):
    spec = load_sweep(spec_path)
    assert spec.name == "z_loss" and spec.seeds == (0, 1, 2)
    assert spec.report == {"figures": ("loss_curves", "router_logits"), "tables": ("stability",)}
    runs = expand(spec)
    assert len(runs) == 4 * 2 * 3
    assert [r.index for r in runs] == list(range(24))
    # Grid axis crossed with the zipped pair; the zipped lists walked together, never crossed.
    combos = {(r.config["train"]["z_loss"], r.config["policy"], r.config["train"]["lr"], r.seed) for r in runs}
    assert len(combos) == 24
    assert {(p, lr) for _, p, lr, _ in combos} == {("fp32", 1e-2), ("bf16", 3e-2)}
    # Order: first axis slowest, seeds innermost.
    assert [r.config["train"]["z_loss"] for r in runs[::6]] == [0.0, 1e-4, 1e-3, 1e-2]
    assert [r.seed for r in runs[:6]] == [0, 1, 2, 0, 1, 2]
    # The base is untouched and every config is resolved in full.
    assert spec.base["train"]["z_loss"] == 1e-3
    assert runs[0].config["model"] == {"preset": "tiny", "d_model": 64} and runs[0].config["train"]["steps"] == 20
    assert runs[4].overrides == {"train.z_loss": 0.0, "policy": "bf16", "train.lr": 3e-2}
    # Run ids: unique, readable, stable across calls.
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 24
    assert ids[4].startswith("z_loss=0.0,policy=bf16,lr=0.03-s1-")
    assert ids == [r.run_id for r in expand(load_sweep(spec_path))]


def test_unquoted_zip_keys_and_seed_lists(tmp_path, spec_path):
    other = tmp_path / "y.toml"
    other.write_text(SPEC.replace('"train.lr" =', "train.lr =").replace("seeds = 3", "seeds = [0, 1, 2]"))
    assert [r.run_id for r in expand(load_sweep(other))] == [r.run_id for r in expand(load_sweep(spec_path))]
    other.write_text(SPEC.replace("seeds = 3", "seeds = [7, 3]"))
    assert [r.seed for r in expand(load_sweep(other))[:2]] == [7, 3]


def test_run_ids_stable_across_processes(spec_path):
    code = (
        "import json, sys; from precision_lab.sweep import load_sweep, expand;"
        "print(json.dumps([[r.run_id, r.group_key] for r in expand(load_sweep(sys.argv[1]))]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(spec_path)], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == [[r.run_id, r.group_key] for r in expand(load_sweep(spec_path))]


def test_groups_are_configs_without_seed(spec_path):
    runs = expand(load_sweep(spec_path))
    groups = group_runs(runs)
    assert len(groups) == 8 and all(len(g) == 3 for g in groups)
    for g in groups:
        assert [r.seed for r in g] == [0, 1, 2] and len({json.dumps(r.config, sort_keys=True) for r in g}) == 1
    assert len({g[0].group_key for g in groups}) == 8
    # Fields the trainer can batch over (no recompile) merge groups: here only the policy is left.
    batched = group_runs(expand(load_sweep(spec_path), batchable_fields=["train.lr", "train.z_loss", "no.such"]))
    assert sorted(len(g) for g in batched) == [12, 12]
    assert {r.run_id for g in batched for r in g} == {r.run_id for r in runs}  # ids do not depend on it


def test_a_label_never_splits_a_group(spec_path):
    """Rows that differ only in train.label and batchable fields share one compiled program (e.g. a
    baseline and its output z-loss arm), and each run keeps its own label."""
    text = spec_path.read_text().replace('zip = { "policy" = ["fp32", "bf16"], "train.lr" = [1e-2, 3e-2] }',
                                         'zip = { "train.lr" = [1e-2, 3e-2], "train.label" = ["low", "high"] }')
    text = text.replace("z_loss = 1e-3 }", 'z_loss = 1e-3, label = "" }')
    spec_path.write_text(text)
    runs = expand(load_sweep(spec_path), batchable_fields=["train.lr", "train.z_loss"])
    assert len(group_runs(runs)) == 1
    assert {r.config["train"]["label"] for r in runs} == {"low", "high"}
    assert len(group_runs(expand(load_sweep(spec_path)))) == 8  # unbatched, z_loss x lr still split


# -- bad input ---------------------------------------------------------------------------------------------

BASE = '[base]\ntrain = { lr = 1e-2, z_loss = 1e-3 }\npolicy = "bf16"\n'

BAD = [
    ('name = "x"\nseeds = 3 3\n', "line 2"),  # malformed TOML: the message says where
    ('seed = 3\n' + BASE, "seeds"),  # unknown top-level key: names it and the valid ones
    ('nam = "x"\n' + BASE, "'nam'"),
    ("seeds = 0\n" + BASE, "seeds"),
    ("seeds = -2\n" + BASE, "seeds"),
    ('seeds = "8"\n' + BASE, "seeds"),
    ("seeds = true\n" + BASE, "seeds"),
    ("seeds = []\n" + BASE, "seeds"),
    ("seeds = [1, 1]\n" + BASE, "seeds"),
    ("name = 3\n" + BASE, "name"),
    ("description = 3\n" + BASE, "description"),
    ("base = 3\n", "base"),
    ("axes = 3\n" + BASE, "axes"),
    (BASE + "when = 1979-05-27\n", "base.when"),
    (BASE + '[[axes]]\nfield = "train.z_loss"\nvalues = []\n', "train.z_loss"),
    (BASE + '[[axes]]\nfield = "train.z_loss"\nvalues = 3\n', "train.z_loss"),
    (BASE + '[[axes]]\nfield = "train.z_loss"\n', "axes[0].values"),
    (BASE + "[[axes]]\nvalues = [1]\n", "axes[0].field"),
    (BASE + '[[axes]]\nfields = "train.lr"\nvalues = [1]\n', "fields"),
    (BASE + '[[axes]]\nfield = "train.zloss"\nvalues = [1]\n', "train.zloss"),
    (BASE + '[[axes]]\nfield = "policy.bits"\nvalues = [1]\n', "policy.bits"),
    (BASE + '[[axes]]\nfield = "train..lr"\nvalues = [1]\n', "train..lr"),
    (BASE + '[[axes]]\nfield = "train.lr"\nvalues = [1e-2, 1e-3, 1e-2]\n', "train.lr"),
    (BASE + '[[axes]]\nzip = { policy = ["fp32", "bf16"], "train.lr" = [1e-2] }\n', "train.lr"),
    (BASE + '[[axes]]\nzip = { policy = ["fp32"] }\nfield = "train.lr"\nvalues = [1]\n', "axes[0]"),
    (BASE + "[[axes]]\nzip = {}\n", "axes[0].zip"),
    (BASE + '[[axes]]\nzip = { policy = "fp32" }\n', "policy"),
    (BASE + '[[axes]]\nfield = "train.lr"\nvalues = [1]\n[[axes]]\nzip = { "train.lr" = [2] }\n', "train.lr"),
    (BASE + '[[axes]]\nfield = "train"\nvalues = [{}]\n[[axes]]\nfield = "train.lr"\nvalues = [2]\n', "train.lr"),
    (BASE + '[report]\nfigure = ["loss_curves"]\n', "figures"),
    (BASE + '[report]\ntables = "stability"\n', "report.tables"),
]


@pytest.mark.parametrize("text,field", BAD)
def test_bad_spec_is_one_line_user_error(tmp_path, text, field):
    path = tmp_path / "bad_spec.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert field in message.removeprefix(str(path)), message  # not a lucky match inside the temp dir name


def test_unknown_field_names_closest_and_choices(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(BASE + '[[axes]]\nfield = "train.zloss"\nvalues = [1]\n')
    with pytest.raises(UserError, match=r"s\.toml: .*'train\.zloss'.*closest match: 'train\.z_loss'.*valid choices: .*policy"):
        load_sweep(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nothere.toml: sweep file not found"):
        load_sweep(tmp_path / "nothere.toml")


def test_validate_hook(tmp_path):
    schema = {"train": {"lr", "z_loss", "warmup"}, "policy": None}

    def validate(config):
        for section, value in config.items():
            if section not in schema:
                raise UserError(f"unknown config section {section!r}; valid choices: {', '.join(schema)}")
            if isinstance(value, dict):
                for key in value:
                    if key not in schema[section]:
                        raise UserError(f"unknown field {section}.{key}; valid choices: {sorted(schema[section])}")
        if config["policy"] not in ("fp32", "bf16"):
            raise UserError(f"unknown policy {config['policy']!r}; valid choices: bf16, fp32")

    path = tmp_path / "v.toml"
    # A field the base lacks but the trainer's schema knows is allowed once a validator is given.
    path.write_text(BASE + '[[axes]]\nfield = "train.warmup"\nvalues = [0, 10]\n')
    runs = expand(load_sweep(path, validate=validate))
    assert [r.config["train"]["warmup"] for r in runs] == [0, 10]
    path.write_text(BASE + '[[axes]]\nfield = "train.cooldown"\nvalues = [0, 10]\n')
    with pytest.raises(UserError, match=r"v\.toml: train\.cooldown=0: unknown field train\.cooldown"):
        load_sweep(path, validate=validate)
    path.write_text(BASE + '[[axes]]\nfield = "policy"\nvalues = ["fp32", "fp16"]\n')
    with pytest.raises(UserError, match=r"v\.toml: policy='fp16': unknown policy 'fp16'; valid choices"):
        load_sweep(path, validate=validate)
    # Even with a validator, a path cannot run through a value that is not a table.
    path.write_text(BASE + '[[axes]]\nfield = "policy.bits"\nvalues = [1]\n')
    with pytest.raises(UserError, match=r"v\.toml: .*policy\.bits"):
        load_sweep(path, validate=validate)


# -- sharding ----------------------------------------------------------------------------------------------


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 4 ") == (3, 4)
    for text, pattern in [
        ("2/2", r"0\.\.1"),
        ("4/4", r"0\.\.3"),
        ("-1/2", r"0\.\.1"),
        ("0/0", "at least 1"),
        ("a/b", "I/N"),
        ("1", "I/N"),
        ("", "I/N"),
    ]:
        with pytest.raises(UserError, match=pattern) as info:
            parse_shard(text)
        assert "--shard" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"0\.\.2"):
        shard([], 3, 3)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_shards_partition_the_sweep_by_groups(spec_path, n):
    runs = expand(load_sweep(spec_path))
    parts = [shard(runs, i, n) for i in range(n)]
    ids = [r.run_id for part in parts for r in part]
    assert sorted(ids) == sorted(r.run_id for r in runs) and len(ids) == len(set(ids))  # union, disjoint
    for part in parts:
        assert all(isinstance(r, RunSpec) for r in part)
        assert [r.index for r in part] == sorted(r.index for r in part)  # sweep order within a shard
        for group in group_runs(part):  # whole groups only
            assert len(group) == 3
    sizes = [len(group_runs(p)) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced
    # Groups in, groups out; and the same answer every time.
    group_parts = [shard(group_runs(runs), i, n) for i in range(n)]
    assert [[r.run_id for g in p for r in g] for p in group_parts] == [[r.run_id for r in p] for p in parts]


# -- execution ---------------------------------------------------------------------------------------------


def comparable(store: ResultsStore) -> dict:
    """The store's content without timing fields, NaN-safe (as stored JSON), with its metrics."""
    out = {}
    for run_id in store.ids():
        rec = store.get(run_id)
        rec.pop("timing")
        metrics = {k: v.tolist() for k, v in store.metrics(run_id).items()}
        out[run_id] = json.dumps(to_jsonable({"record": rec, "metrics": metrics}), sort_keys=True)
    return out


def test_run_sweep_stores_records_and_resumes(spec_path, tmp_path):
    spec = load_sweep(spec_path)
    out = tmp_path / "out"
    calls = []

    def run_group(runs):
        calls.append([r.run_id for r in runs])
        return make_run_group()(runs)

    summary = run_sweep(spec, out, run_group, progress=False)
    assert (summary.total_runs, summary.shard_runs, summary.computed, summary.skipped) == (24, 24, 24, 0)
    assert summary.groups_run == 8 and summary.complete
    store = ResultsStore(out)
    assert store.ids() == sorted(r.run_id for r in expand(spec))
    assert len(calls) == 8 and all(len(c) == 3 for c in calls)
    rec = store.get(calls[0][0])
    assert set(rec) >= {"run_id", "sweep", "seed", "group_key", "overrides", "config", "timing", "final_loss"}
    diverged = [r for r in store.records() if r["diverged"]]
    assert len(diverged) == 3 and all(math.isnan(r["final_loss"]) and r["max_loss"] == math.inf for r in diverged)
    assert store.metrics(rec["run_id"])["loss"].shape == (20,)
    manifest = store.manifest()
    assert manifest["name"] == "z_loss" and manifest["n_runs"] == 24 and manifest["n_groups"] == 8
    assert [r["run_id"] for r in manifest["runs"]] == [r.run_id for r in expand(spec)]
    rows = store.to_rows()
    assert rows[0]["config.train.steps"] == 20 and "timing.group_seconds" in rows[0]

    # Resume after losing one seed of one group: the whole group runs again (a vmapped program's numbers
    # may depend on its membership), and only the lost run is stored.
    victim = calls[3][1]
    os.unlink(out / "runs" / f"{victim}.json")
    group_of_victim = calls[3]
    calls.clear()
    summary = run_sweep(spec, out, run_group, progress=False)
    assert calls == [group_of_victim] and (summary.computed, summary.skipped) == (1, 23)
    calls.clear()
    assert run_sweep(spec, out, run_group, progress=False).skipped == 24 and calls == []

    # resume=False recomputes this shard and overwrites its records.
    summary = run_sweep(spec, out, run_group, shard="1/4", resume=False, progress=False)
    assert summary.computed == summary.shard_runs == 6 and len(calls) == 2
    assert len(store.ids()) == 24


def test_run_group_contract_is_checked(spec_path, tmp_path):
    spec = load_sweep(spec_path)
    with pytest.raises(ValueError, match="2 records for 3 runs"):
        run_sweep(spec, tmp_path / "a", lambda runs: [{}, {}], progress=False)
    with pytest.raises(ValueError, match="'seed'"):
        run_sweep(spec, tmp_path / "b", lambda runs: [{"seed": 99} for _ in runs], progress=False)


def _start(spec_path, out, shard_text, sleep, log):
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(spec_path), str(out), shard_text, str(sleep), str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _log(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    return [(int(pid), run_id) for pid, run_id in (line.split() for line in path.read_text().splitlines())]


def test_sigkill_then_resume_matches_uninterrupted_run(spec_path, tmp_path):
    reference = tmp_path / "reference"
    run_sweep(load_sweep(spec_path), reference, make_run_group(), progress=False)

    out, log = tmp_path / "out", tmp_path / "calls.log"
    first = _start(spec_path, out, "0/1", 0.3, log)  # 8 groups x 0.3 s
    store = ResultsStore(out)
    try:
        deadline = time.time() + 20
        while len(store.ids()) < 7 and time.time() < deadline and first.poll() is None:
            time.sleep(0.005)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    stored_at_kill = set(store.ids())
    assert 7 <= len(stored_at_kill) < 24

    second = _start(spec_path, out, "0/1", 0.0, log)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert "24/24" in stderr  # the tqdm bar counted runs done/total
    assert f"skipped={len(stored_at_kill)}" in stdout

    assert comparable(store) == comparable(ResultsStore(reference))
    recomputed = {run_id for pid, run_id in _log(log) if pid == second.pid}
    assert recomputed >= set(store.ids()) - stored_at_kill  # every missing run was computed
    # Finished runs are computed again only as members of a group the kill left partly stored (the group
    # reruns whole so that its vmapped numbers are reproduced); whole finished groups are never rerun.
    groups = {r.run_id: r.group_key for r in expand(load_sweep(spec_path))}
    partial = {groups[rid] for rid in set(store.ids()) - stored_at_kill}
    assert all(groups[rid] in partial for rid in recomputed & stored_at_kill)
    assert len(partial & {groups[rid] for rid in stored_at_kill}) <= 1


def test_concurrent_shards_match_single_process_run(spec_path, tmp_path):
    reference = tmp_path / "reference"
    run_sweep(load_sweep(spec_path), reference, make_run_group(), progress=False)

    out, log = tmp_path / "out", tmp_path / "calls.log"
    procs = [_start(spec_path, out, f"{i}/2", 0.05, log) for i in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
    assert comparable(ResultsStore(out)) == comparable(ResultsStore(reference))
    computed = [run_id for _, run_id in _log(log)]
    assert sorted(computed) == ResultsStore(reference).ids()  # every run computed exactly once
    assert len({pid for pid, _ in _log(log)}) == 2  # and both shards did work
    assert ResultsStore(out).manifest() == ResultsStore(reference).manifest()


def test_parse_sweep_from_data():
    spec = parse_sweep({"seeds": 2, "base": {"a": {"b": 1}}, "axes": [{"field": "a.b", "values": [1, 2]}]}, "mem.toml")
    assert spec.name == "mem" and [r.config["a"]["b"] for r in expand(spec)] == [1, 1, 2, 2]
    assert len(expand(parse_sweep({"base": {"x": 1}}, "empty.toml"))) == 1


# -- issue 16: a store is never mixed; progress counts steps ----------------------------------------------


def _store_state(out: Path) -> tuple:
    return (out / "sweep.json").read_text(), sorted(p.name for p in (out / "runs").iterdir())


def test_store_of_another_sweep_is_refused_unless_force(spec_path, tmp_path):
    import dataclasses

    spec = load_sweep(spec_path)
    out = tmp_path / "out"
    run_sweep(spec, out, make_run_group(), progress=False)
    before = _store_state(out)
    calls = []

    def run_group(runs):
        calls.append(runs)
        return make_run_group()(runs)

    with pytest.raises(UserError, match=r"another sweep \('z_loss'\).*--force"):
        run_sweep(dataclasses.replace(spec, name="other"), out, run_group, progress=False)
    with pytest.raises(UserError, match=r"full version of this sweep \('z_loss'\), whose runs would be reported "
                                        r"as 'z_loss_smoke'.*--force"):
        run_sweep(dataclasses.replace(spec, name="z_loss_smoke"), out, run_group, progress=False)
    assert calls == [] and _store_state(out) == before  # nothing ran, nothing changed
    # The same sweep, extended by one more z_loss value, reuses what is there.
    extended = dataclasses.replace(spec, axes=(dataclasses.replace(spec.axes[0], points=(*spec.axes[0].points, (0.1,))),
                                               spec.axes[1]))
    assert run_sweep(extended, out, run_group, progress=False).skipped == 24 and len(calls) == 2
    summary = run_sweep(dataclasses.replace(spec, name="other"), out, run_group, progress=False, force=True)
    store = ResultsStore(out)
    assert summary.computed == 24 and store.manifest()["name"] == "other"
    assert {r["sweep"] for r in store.records()} == {"other"}  # the old sweep's records are gone, not mixed


class _Bar:
    """Stands in for tqdm: records what run_sweep tells the bar."""

    made: list = []

    def __init__(self, total, initial=0, unit="it", **_):
        self.total, self.n, self.unit, self.updates = total, initial, unit, []
        self.initial = initial
        _Bar.made.append(self)

    def update(self, n=1):
        self.n += n
        self.updates.append(n)

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_progress_counts_member_steps_within_the_running_group(spec_path, tmp_path, monkeypatch):
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    spec = load_sweep(spec_path)  # 8 groups of 3 seeds, 20 steps each

    def run_group(runs, progress):
        for _ in range(4):  # four chunks of 5 steps, every member
            progress(len(runs) * 5)
        return make_run_group()(runs)

    steps = lambda group: group[0].config["train"]["steps"]  # noqa: E731
    _Bar.made.clear()
    run_sweep(spec, tmp_path / "out", run_group, group_steps=steps)
    bar = _Bar.made[-1]
    assert (bar.total, bar.initial, bar.unit, bar.n) == (8 * 3 * 20, 0, "step", 480)
    assert bar.updates[:5] == [15, 15, 15, 15, 0]  # inside the first group, chunk by chunk
    assert bar.postfix.startswith("group 8/8 ")
    # Resumed with one run missing: the finished groups are the bar's starting point.
    victim = expand(spec)[4].run_id
    os.unlink(tmp_path / "out" / "runs" / f"{victim}.json")
    run_sweep(spec, tmp_path / "out", run_group, group_steps=steps)
    bar = _Bar.made[-1]
    assert (bar.initial, bar.n, bar.updates) == (420, 480, [15, 15, 15, 15, 0])
