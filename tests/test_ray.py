"""Sweeps on a Ray cluster (`--executor ray`): one local Ray instance with 2 CPUs for the whole module.

Skipped only where Ray is not installed (CI installs the `ray` extra). The sweep is micro-sized (2 shape
groups x 2 seeds, 4 steps); the in-process reference run fills the persistent compilation cache that the
Ray workers then read, so each Ray run costs Ray's start and the workers' JAX import more than training.
"""

import functools
import json
import os
import signal
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from precision_lab.cli import main  # noqa: E402
from precision_lab.errors import UserError  # noqa: E402
from precision_lab.executors import make_executor, ray_executor  # noqa: E402
from precision_lab.runner import run_group, sweep  # noqa: E402
from precision_lab.store import ResultsStore  # noqa: E402

# Two shape groups (the policy changes the program), two seeds each, a micro model (one sparse block per stack).
SWEEP = """
name = "ray_micro"
seeds = 2
[base]
policy = "fp32"
train = { steps = 4, chunk_steps = 2, batch_size = 4, eval_every = 0, eval_batches = 1, checkpoint_every = 0 }
[base.model]
preset = "tiny"
d_model = 32
d_ff = 64
num_heads = 2
d_kv = 16
num_encoder_layers = 1
num_decoder_layers = 1
moe_every = 1
num_experts = 4
[[axes]]
field = "policy"
values = ["fp32", "bf16"]
"""


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (starting one costs seconds); workers inherit this process's
    environment: XLA_FLAGS (8 forced CPU devices, as here) and PRECISION_LAB_CACHE."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process executor's store of the micro sweep."""
    root = tmp_path_factory.mktemp("ray")
    (root / "sweep.toml").write_text(SWEEP)
    summary = sweep(root / "sweep.toml", root / "inprocess", progress=False)
    assert summary.computed == 4 and summary.groups_run == 2
    return root


def _comparable(store) -> dict:
    """Every record without its timing (where/when it ran), with its metrics arrays as lists. The data's
    reference losses in `env` (best_loss, entropy_rate: numpy Monte Carlo averages computed in each
    process) are compared to 12 significant digits: another process gives them one float64 ulp apart
    (measured: 0.9670034847139508 vs ...507); every trained number must be identical."""
    s = ResultsStore(store)

    def record(rid):
        r = {k: v for k, v in s.get(rid).items() if k != "timing"}
        r["env"] = {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in r["env"].items()}
        return r

    return {rid: (record(rid), {k: v.tolist() for k, v in s.metrics(rid).items()}) for rid in s.ids()}


def _files(store) -> list[str]:
    return sorted(p.name for p in (store / "runs").iterdir())


def test_ray_executor_stores_the_same_records_as_in_process(cluster, reference, tmp_path, capsys):
    out = tmp_path / "ray"
    summary = sweep(reference / "sweep.toml", out, progress=False, executor=ray_executor(num_cpus=1))
    assert (summary.computed, summary.groups_run, summary.complete) == (4, 2, True)
    assert _comparable(out) == _comparable(reference / "inprocess")
    assert _files(out) == _files(reference / "inprocess")
    pids = {ResultsStore(out).get(rid)["timing"]["pid"] for rid in ResultsStore(out).ids()}
    assert os.getpid() not in pids  # trained in Ray workers, stored here

    # Resume from the command line (`precision-lab sweep FILE --out DIR --executor ray`, joining the Ray
    # instance of this process): only what is missing is submitted (one record deleted -> its group runs
    # again, alone, and only that record is stored).
    victim = ResultsStore(out).ids()[0]
    (out / "runs" / f"{victim}.json").unlink()
    code = main(["sweep", str(reference / "sweep.toml"), "--out", str(out), "--executor", "ray", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "1 runs computed, 3 already stored" in capsys.readouterr().out
    assert _comparable(out) == _comparable(reference / "inprocess")
    assert json.loads((out / "sweep.json").read_text())["n_runs"] == 4


def _killed_once(marker: str, group):
    """run_group, but the first attempt's worker process is SIGKILLed while it trains (from a timer thread,
    as the kernel's OOM killer or a lost node would end it: no exception, no cleanup)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one attempt of one group wins
    except FileExistsError:
        return run_group(group)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return run_group(group)


def test_killed_worker_is_retried_and_the_store_ends_complete(cluster, reference, tmp_path):
    # The task is pickled by value (this test module is not importable in the workers).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed.pid"
    out = tmp_path / "ray"
    summary = sweep(reference / "sweep.toml", out, progress=False, executor=ray_executor(max_retries=2),
                    run_group=functools.partial(_killed_once, str(marker)))
    killed_pid = int(marker.read_text())
    assert (summary.computed, summary.raced, summary.complete) == (4, 0, True)
    store = ResultsStore(out)
    assert len(store.ids()) == 4 and killed_pid not in {store.get(r)["timing"]["pid"] for r in store.ids()}
    # nothing duplicated or left half-written: one record and one metrics file per run, no temp files
    assert len(_files(out)) == 8 and not any(name.startswith(".") for name in _files(out))
    assert _comparable(out) == _comparable(reference / "inprocess")


def _fails(group):
    raise UserError("this group is broken")


def test_an_error_inside_a_task_is_not_retried_and_reaches_the_driver(cluster, reference, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="this group is broken"):
        sweep(reference / "sweep.toml", tmp_path / "ray", progress=False, executor=ray_executor(), run_group=_fails)
    assert time.perf_counter() - t0 < 30


def test_bad_executor_options_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "s.toml").write_text(SWEEP)
    for extra, needle in ((["--address", "auto"], "--address needs --executor ray"),
                          (["--executor", "ray", "--cpus-per-task", "0"], "--cpus-per-task 0")):
        assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_make_executor_names_the_choices():
    assert make_executor("inprocess") is None
    with pytest.raises(UserError, match="valid choices: inprocess, ray"):
        make_executor("dask")
