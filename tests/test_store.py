"""The results store: atomic writes, idempotent puts, NaN round trips, metrics, concurrent writers."""

import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from precision_lab import store as store_mod
from precision_lab.errors import UserError
from precision_lab.store import RecordConflict, ResultsStore, load_results


def record_for(i: int, variant: int = 0) -> tuple[dict, dict]:
    """A deterministic record and metrics for run i; a different `variant` gives different content."""
    rng = np.random.default_rng([i, variant])
    loss = rng.random(50).astype(np.float32)
    record = {"i": i, "variant": variant, "final_loss": float(loss[-1]), "config": {"train": {"lr": 1e-3 * (i + 1)}}}
    return record, {"loss": loss, "step": np.arange(50)}


def test_put_get_and_rows(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.ids() == [] and store.records() == []
    for i in (2, 0, 1):
        rec, metrics = record_for(i)
        assert store.put(f"r{i}", rec, metrics if i else None) is True
    assert store.ids() == ["r0", "r1", "r2"]
    assert [r["run_id"] for r in store.records()] == ["r0", "r1", "r2"]
    assert store.get("r1")["final_loss"] == record_for(1)[0]["final_loss"]
    assert store.metrics("r0") == {}
    rows = load_results(tmp_path)
    assert rows[1]["config.train.lr"] == pytest.approx(2e-3)
    assert "config" not in rows[1]
    # The records are plain JSON files that any reader can open.
    assert json.loads((tmp_path / "runs" / "r2.json").read_text())["i"] == 2


def test_missing_run_and_store_are_user_errors(tmp_path):
    store = ResultsStore(tmp_path)
    store.put("alpha", {"x": 1})
    with pytest.raises(UserError, match="alpho.*closest match: 'alpha'"):
        store.get("alpho")
    with pytest.raises(UserError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(ValueError):
        store.put(".hidden", {"x": 1})
    with pytest.raises(ValueError):
        store.put("a/b", {"x": 1})


class Crash(BaseException):
    """Stands in for the process dying between writing the temp file and renaming it."""


def test_crash_between_temp_write_and_rename_leaves_no_record(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    rec, metrics = record_for(0)

    def crash(*args, **kwargs):
        raise Crash

    # A real crash leaves the temp file behind: keep unlink from tidying it up.
    monkeypatch.setattr(store_mod.os, "link", crash)
    monkeypatch.setattr(store_mod.os, "unlink", lambda *a, **k: None)
    with pytest.raises(Crash):
        store.put("r0", rec, metrics)
    monkeypatch.undo()
    assert not store.has("r0") and store.ids() == [] and store.records() == []
    assert not list((tmp_path / "runs").glob("*.json"))
    assert list((tmp_path / "runs").glob(".*.tmp"))  # the debris exists, but nobody reads it
    with pytest.raises(UserError):
        store.get("r0")
    # The interrupted put can simply be repeated.
    assert store.put("r0", rec, metrics) is True
    assert store.get("r0")["i"] == 0
    np.testing.assert_array_equal(store.metrics("r0")["loss"], metrics["loss"])


def test_crash_during_overwrite_keeps_record_and_metrics_consistent(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    store.put("r0", *record_for(0, 0))
    real_replace = os.replace

    def crash_on_record(src, dst):
        if str(dst).endswith(".json"):
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", crash_on_record)
    with pytest.raises(Crash):
        store.put("r0", *record_for(0, 1), overwrite=True)
    monkeypatch.undo()
    # The new metrics landed under their own (hash) name; the old record still points at the old ones.
    assert store.get("r0")["variant"] == 0
    np.testing.assert_array_equal(store.metrics("r0")["loss"], record_for(0, 0)[1]["loss"])


def test_identical_reput_is_noop_and_conflict_raises(tmp_path):
    store = ResultsStore(tmp_path)
    rec, metrics = record_for(3)
    assert store.put("r3", rec, metrics) is True
    path = tmp_path / "runs" / "r3.json"
    before = (path.stat().st_mtime_ns, path.stat().st_ino)
    assert store.put("r3", dict(rec), {k: v.copy() for k, v in metrics.items()}) is False
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before

    other, other_metrics = record_for(3, variant=1)
    with pytest.raises(RecordConflict) as info:
        store.put("r3", other, other_metrics)
    assert "\n" not in str(info.value) and "r3.json" in str(info.value) and "overwrite" in str(info.value)
    with pytest.raises(RecordConflict):
        store.put("r3", rec, other_metrics)  # same record, different metrics: still a conflict
    assert store.get("r3")["variant"] == 0

    assert store.put("r3", other, other_metrics, overwrite=True) is True
    assert store.get("r3")["variant"] == 1
    np.testing.assert_array_equal(store.metrics("r3")["loss"], other_metrics["loss"])
    # The superseded metrics file is gone: one record, one metrics file.
    assert len(list((tmp_path / "runs").glob("*.npz"))) == 1


def test_nan_inf_and_numpy_round_trip(tmp_path):
    store = ResultsStore(tmp_path)
    record = {
        "nan": float("nan"),
        "inf": np.float32(np.inf),
        "ninf": -math.inf,
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "np_float": np.float32(0.1),
        "array": np.array([1.0, np.nan, -np.inf], dtype=np.float32),
        "nested": {"deep": [np.float16(np.inf), {"x": np.nan}]},
        "text": "ok",
    }
    store.put("r", record)
    raw = (tmp_path / "runs" / "r.json").read_text()
    json.loads(raw)  # strict JSON: no bare NaN/Infinity tokens
    assert "NaN" not in raw.replace('"NaN"', "") and '"Infinity"' in raw and '"-Infinity"' in raw
    got = store.get("r")
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["ninf"] == -math.inf
    assert got["np_int"] == 7 and type(got["np_int"]) is int and got["np_bool"] is True
    assert got["np_float"] == float(np.float32(0.1))
    assert got["array"][0] == 1.0 and math.isnan(got["array"][1]) and got["array"][2] == -math.inf
    assert got["nested"]["deep"][0] == math.inf and math.isnan(got["nested"]["deep"][1]["x"])
    row = store.to_rows()[0]
    assert math.isnan(row["nested.deep"][1]["x"]) and math.isnan(row["nan"])
    # Identical content with NaNs is still recognised as identical (NaN != NaN must not matter).
    assert store.put("r", record) is False
    # The reserved spellings cannot be stored as text, and unstorable types are refused.
    with pytest.raises(ValueError, match="reserved"):
        store.put("s", {"label": "NaN"})
    with pytest.raises(TypeError, match="set"):
        store.put("s", {"x": {1, 2}})
    with pytest.raises(TypeError, match="string"):
        store.put("s", {"x": {1: 2}})
    assert not store.has("s")


def test_metrics_round_trip(tmp_path):
    store = ResultsStore(tmp_path)
    metrics = {
        "loss": np.array([3.0, np.nan, np.inf], dtype=np.float32),
        "router/max_logit": np.arange(12, dtype=np.float64).reshape(3, 4),
        "tokens_dropped": np.array([0, 5, 9], dtype=np.int32),
        "finite": np.array([True, False, False]),
    }
    store.put("m", {"x": 1}, metrics)
    got = store.metrics("m")
    assert list(got) == sorted(metrics)
    for name, arr in metrics.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)
    record = store.get("m")
    assert record["metrics_file"].startswith("m.metrics-") and record["metrics_file"].endswith(".npz")
    # A metrics file that no longer matches its record is reported, not silently returned.
    (tmp_path / "runs" / record["metrics_file"]).write_bytes(_npz({"loss": np.zeros(3, np.float32)}))
    with pytest.raises(UserError, match="sha256"):
        store.metrics("m")
    with pytest.raises(TypeError, match="bfloat16"):
        import ml_dtypes

        store.put("b", {}, {"x": np.zeros(2, ml_dtypes.bfloat16)})


def _npz(arrays):
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_manifest_written_atomically_and_updated(tmp_path):
    store = ResultsStore(tmp_path / "new")
    assert store.manifest() is None
    assert store.write_manifest({"name": "x", "lr": [1e-3, float("nan")]}) is True
    assert store.write_manifest({"name": "x", "lr": [1e-3, float("nan")]}) is False
    assert math.isnan(store.manifest()["lr"][1])
    assert store.write_manifest({"name": "y"}) is True
    assert store.manifest() == {"name": "y"}
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["sweep.json"]


# -- concurrency -------------------------------------------------------------------------------------------


def _writer(path: str, ids: list[int], variant: int, start, out: str) -> None:
    """Worker for the multiprocessing tests (module level so the spawn start method can import it)."""
    store = ResultsStore(path)
    written = noop = conflicts = 0
    start.wait()
    for i in ids:
        rec, metrics = record_for(i, variant)
        try:
            if store.put(f"run{i:03d}", rec, metrics):
                written += 1
            else:
                noop += 1
        except RecordConflict:
            conflicts += 1
    Path(out).write_text(json.dumps({"written": written, "noop": noop, "conflicts": conflicts}))


def _run_writers(tmp_path, jobs):
    # spawn, not fork: the test process has JAX (multithreaded) loaded, which fork does not mix with.
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs, outs = [], []
    for k, (ids, variant) in enumerate(jobs):
        out = tmp_path / f"writer{k}.json"
        procs.append(ctx.Process(target=_writer, args=(str(tmp_path / "store"), ids, variant, start, str(out))))
        outs.append(out)
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [json.loads(o.read_text()) for o in outs]


def _assert_consistent(store: ResultsStore):
    """Every record parses, and its metrics file exists and matches the record's hash."""
    for run_id in store.ids():
        rec = store.get(run_id)
        metrics = store.metrics(run_id)
        expected = record_for(rec["i"], rec["variant"])[1]
        np.testing.assert_array_equal(metrics["loss"], expected["loss"])
    assert not list(store.runs_dir.glob(".*.tmp"))


def test_two_processes_disjoint_and_overlapping_ids(tmp_path):
    a = list(range(0, 60))  # 40..59 overlap with b, with identical content
    b = list(range(40, 100))
    stats = _run_writers(tmp_path, [(a, 0), (b[::-1], 0)])
    store = ResultsStore(tmp_path / "store")
    assert store.ids() == [f"run{i:03d}" for i in range(100)]
    for i in range(100):
        assert store.get(f"run{i:03d}") == {**record_for(i)[0], **_refs(store, i)}
    _assert_consistent(store)
    assert sum(s["conflicts"] for s in stats) == 0
    assert sum(s["written"] for s in stats) == 100  # each overlapping id written exactly once
    assert sum(s["noop"] for s in stats) == 20
    assert len(list(store.runs_dir.glob("*.npz"))) == 100


def _refs(store, i):
    rec = store.get(f"run{i:03d}")
    return {k: rec[k] for k in ("run_id", "metrics_file", "metrics_sha256")}


def test_two_processes_conflicting_ids_first_writer_wins(tmp_path):
    ids = list(range(40))
    stats = _run_writers(tmp_path, [(ids, 1), (ids, 2)])
    store = ResultsStore(tmp_path / "store")
    assert len(store.ids()) == 40
    # Each id was won by exactly one writer, the other got a RecordConflict; records match their metrics.
    assert sum(s["written"] for s in stats) == 40 and sum(s["conflicts"] for s in stats) == 40
    _assert_consistent(store)
    assert len(list(store.runs_dir.glob("*.npz"))) == 40  # the losers removed their metrics files


WRITE_FOREVER = """
import sys, numpy as np
from precision_lab.store import ResultsStore
store = ResultsStore(sys.argv[1])
for i in range(100000):
    store.put(f"run{i:05d}", {"i": i, "payload": list(range(2000))}, {"x": np.full(20000, i, np.float32)})
"""


def test_sigkill_mid_write_leaves_whole_records_only(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(tmp_path)])
    try:
        deadline = time.time() + 20
        while len(list((tmp_path / "runs").glob("*.json"))) < 30 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = ResultsStore(tmp_path)
    ids = store.ids()
    assert len(ids) >= 30
    for run_id in ids:
        rec = store.get(run_id)  # parses: never a half-written file
        assert rec["payload"] == list(range(2000))
        assert (store.metrics(run_id)["x"] == rec["i"]).all()
