"""One training run over a device mesh (`precision-lab train --mesh data=2,expert=4`, `train.mesh` in a
sweep TOML) on the 8 forced CPU devices (tests/conftest.py), and the one-line errors of bad meshes.

Tolerance: the mesh run computes the same numbers as the run on one device per member, but XLA sums some
float32 values in another order across devices (batch-mean losses summed over "data", weight gradients
summed in per-device partial sums, matmuls blocked for smaller per-device shapes), so per-step losses agree
to rtol 1e-5 (measured: 2e-7, about 2 float32 ulp), while routing must be identical: the dropped fraction
and dropped-token fractions and the load CV of every sparse layer, functions of the routing decisions only, are equal at every
step.
"""

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest

from precision_lab.cli import main
from precision_lab.config import run_config
from precision_lab.errors import UserError
from precision_lab.sweep import parse_sweep
from precision_lab.train import train

# A micro model (one sparse block per stack, 4 experts split over expert=4), 2 seeds vmapped, batch 8 split
# over data=2.
MICRO = {"model": {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "num_experts": 4,
                   "num_encoder_layers": 1, "num_decoder_layers": 1, "moe_every": 1},
         "train": {"steps": 2, "chunk_steps": 1, "batch_size": 8, "eval_every": 0, "eval_batches": 1,
                   "checkpoint_every": 0}}
SETS = [f"{section}.{k}={v}" for section in ("model", "train") for k, v in MICRO[section].items()
        if k != "preset"]  # the CLI's --preset is tiny already

needs_8 = pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 forced CPU devices of conftest.py")


@needs_8
@pytest.mark.parametrize("seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_train_over_a_mesh_matches_one_device_per_member(tmp_path, capsys, seeds):
    """`precision-lab train --mesh data=2,expert=4` against the in-process run without a mesh: one seed
    (unbatched), and (slow) two seeds vmapped over the mesh."""
    out = tmp_path / "mesh"
    code = main(["train", "--mesh", "data=2,expert=4", "--seeds", str(seeds), "--no-progress", "--out", str(out),
                 *[a for s in SETS for a in ("--set", s)]])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["mesh"] == config["train"]["mesh"] == "data=2,expert=4"
    assert config["model"]["expert_dispatch"] == "dense"  # a mesh selects the dispatch that splits over experts
    with np.load(out / "metrics.npz") as z:
        sharded = {k: z[k] for k in z.files}

    reference = train(run_config({**MICRO, "model": {**MICRO["model"], "expert_dispatch": "dense"}}),
                      seeds=list(range(seeds)), progress=False).metrics
    assert sharded["loss"].shape == reference["loss"].shape == (MICRO["train"]["steps"], seeds)
    np.testing.assert_allclose(sharded["loss"], reference["loss"], rtol=1e-5)
    for name in ("router_dropped_assignment_fraction", "router_dropped_token_fraction", "router_load_cv"):
        np.testing.assert_array_equal(sharded[name], reference[name])


@needs_8
@pytest.mark.parametrize("mesh, needle", [
    ("data=2,expert=2", "needs 4 devices, JAX sees 8"),
    ("data=2,model=4", "unknown mesh axis 'model'"),
    ("data=1,expert=8", "num_experts = 4 does not split over expert=8"),
    ("data=3,expert=1", "batch_size = 8 does not split over data=3"),
    ("data=two", "is not a positive size"),
])
def test_bad_mesh_exits_2_with_one_line(tmp_path, capsys, mesh, needle):
    out = tmp_path / "out"
    code = main(["train", "--mesh", mesh, "--no-progress", "--out", str(out),
                 *[a for s in SETS for a in ("--set", s)]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_mesh_with_the_sorted_dispatch_is_refused():
    with pytest.raises(UserError, match="expert_dispatch = 'sorted' cannot run over a mesh"):
        run_config({"model": {"expert_dispatch": "sorted"}, "train": {"mesh": "data=2"}})


def test_mesh_in_a_sweep_toml_as_string_or_table():
    from precision_lab.config import validate
    from precision_lab.sweep import expand

    for mesh in ('"data=2,expert=4"', "{ data = 2, expert = 4 }"):
        spec = parse_sweep(tomllib.loads(f"[base]\ntrain = {{ mesh = {mesh} }}\n"), "s.toml",
                           validate)
        (run,) = expand(spec)
        assert run_config(run.config).train.mesh == "data=2,expert=4"
    with pytest.raises(UserError, match=r"s.toml: \[base\]: .*unknown mesh axis 'experts'"):
        parse_sweep({"base": {"train": {"mesh": {"experts": 4}}}}, "s.toml", validate)


@needs_8
@pytest.mark.slow
def test_two_processes_share_one_mesh(tmp_path, capsys):
    """Multi-host through jax.distributed on one machine: two CLI processes with 4 CPU devices each (gloo
    collectives) train over one data=2 x expert=4 mesh; process 0 writes --out. Same losses (rtol 1e-5) and
    routing as the one-process run over 8 devices."""
    with socket.socket() as s:  # a free local port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PRECISION_LAB_NO_REEXEC="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "precision_lab.cli", "train", "--mesh", "data=2,expert=4", "--no-progress",
         "--out", str(tmp_path / f"p{i}"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), *[a for s in SETS for a in ("--set", s)]],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outs = [p.communicate(timeout=540)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not (tmp_path / "p1").exists()  # only process 0 writes
    with np.load(tmp_path / "p0" / "metrics.npz") as z:
        two = {k: z[k] for k in z.files}
    one = train(run_config({**MICRO, "train": {**MICRO["train"], "mesh": "data=2,expert=4"}}), seeds=[0],
                progress=False).metrics
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    for name in ("router_dropped_assignment_fraction", "router_dropped_token_fraction", "router_load_cv"):
        np.testing.assert_array_equal(two[name], one[name])
