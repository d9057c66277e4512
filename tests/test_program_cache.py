"""The program cache (precision_lab.program_cache): a run whose executables are read back from disk is
bit-identical to one traced and compiled afresh; the key follows the configuration, the arguments' shapes and
the package's source, not the batchable hyperparameters; a broken entry is compiled again; a program that
jax's persistent cache served is not kept; the folder is capped; PRECISION_LAB_PROGRAM_CACHE=0 turns it off."""

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision_lab import program_cache
from precision_lab.config import run_config
from precision_lab.train import Trainer, hparams_of, train

MICRO = {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1,
         "moe_every": 1, "num_experts": 4}


def micro(lr=1e-2, d_model=32, policy="fp32"):
    return run_config({"model": {**MICRO, "d_model": d_model}, "policy": policy, "optim": {"lr": lr},
                       "train": {"steps": 6, "chunk_steps": 3, "eval_every": 3, "eval_batches": 2,
                                 "checkpoint_every": 0, "batch_size": 8}})


def one_chunk(run, seeds=(0,)):
    """A new Trainer (an empty in-memory cache) runs init, one chunk and one evaluation."""
    trainer = Trainer(run)
    state, keys = trainer.init(list(seeds))
    # arguments placed as train() places them for one seed, so train() finds these executables too
    hps = {k: jnp.asarray([v] * len(seeds), jnp.float32) for k, v in hparams_of(run).items()}
    state, metrics = trainer._chunk(state, keys, hps, trainer.batches(list(seeds), 0, 3), jnp.int32(0))
    ev = trainer.evaluate(state, keys)
    return trainer, jax.device_get((state, metrics)), ev


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def set_jax_cache(on: bool) -> None:
    """jax's persistent cache on or off for the compiles that follow (the flag alone is read once, when the
    cache is first used in a process: reset it so the change takes effect)."""
    from jax._src import compilation_cache
    jax.config.update("jax_enable_compilation_cache", on)
    compilation_cache.reset_cache()


@pytest.fixture
def use_folder(monkeypatch):
    """use_folder(path, fresh=True): the program cache in `path` for this test (restored afterwards); with
    `fresh`, jax's persistent cache off, so every compile here is fresh."""
    before = program_cache._FOLDER
    monkeypatch.delenv("PRECISION_LAB_PROGRAM_CACHE", raising=False)

    def use(path: Path, fresh: bool = True) -> Path:
        program_cache.enable(path)
        set_jax_cache(not fresh)
        return path
    yield use
    set_jax_cache(True)
    program_cache._FOLDER = before


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A folder holding the micro run's three programs (init, chunk, eval), compiled fresh, and what they
    computed."""
    folder = tmp_path_factory.mktemp("programs")
    before = program_cache._FOLDER
    program_cache.enable(folder)
    set_jax_cache(False)
    try:
        trainer, state, ev = one_chunk(micro())
    finally:
        set_jax_cache(True)
        program_cache._FOLDER = before
    assert trainer._chunk.loaded_from_disk == 0
    assert sorted(p.name.split("-")[0] for p in folder.glob("*.pkl")) == ["chunk", "eval", "init"]
    return folder, state, ev


def test_executables_read_back_from_disk_give_bit_identical_training(compiled, use_folder, tmp_path):
    folder, state_a, ev_a = compiled
    use_folder(Path(shutil.copytree(folder, tmp_path / "programs")))  # train() below adds entries
    warm, state_b, ev_b = one_chunk(micro())
    assert (warm._init.loaded_from_disk, warm._chunk.loaded_from_disk, warm._eval.loaded_from_disk) == (1, 1, 1)
    assert_same(state_a, state_b)
    np.testing.assert_array_equal(ev_a, ev_b)
    # the training loop runs on the same executables: its first chunk's telemetry equals the fresh one's
    loads = program_cache.LOADS[0]
    result = train(micro(), seeds=[0], progress=False)
    assert program_cache.LOADS[0] - loads == 3  # init, chunk, eval: nothing traced or compiled
    for name, series in state_a[1].items():  # every telemetry series, bit for bit
        np.testing.assert_array_equal(result.metrics[name][:3], np.asarray(series))


def chunk_key(run, seeds=(0,)):
    """The chunk program's cache key for `run` and `seeds` members, without compiling anything."""
    trainer = Trainer(run)
    state, keys = jax.eval_shape(lambda: trainer.init(list(seeds)))
    hps = {k: np.asarray([v] * len(seeds), np.float32) for k, v in hparams_of(run).items()}
    args = (state, keys, hps, trainer.batches(list(seeds), 0, 3), np.int32(0))
    return trainer._chunk.key(program_cache.signature(args))


def test_the_key_follows_config_shapes_and_source_but_not_batchable_hyperparameters(monkeypatch, use_folder,
                                                                                     tmp_path):
    use_folder(tmp_path / "programs", fresh=False)  # on, as after any CLI test in the same process: under
    # jax.eval_shape (chunk_key) the programs see tracers and must take jax's path (regression: they tried
    # to run a compiled executable on tracers)
    base = chunk_key(micro())
    assert chunk_key(micro()) == base
    assert chunk_key(micro(lr=3e-3)) == base  # lr reaches the program as a traced value (as in a sweep group)
    others = {chunk_key(micro(d_model=16)), chunk_key(micro(policy="bf16")), chunk_key(micro(), seeds=(0, 1))}
    assert len(others) == 3 and base not in others  # another model, policy, number of members
    monkeypatch.setattr(program_cache, "source_digest", lambda: "an edited package")
    assert chunk_key(micro()) != base


def small_program():
    """A CachedProgram of a small jitted function of a pytree (cheap to compile), and its arguments."""
    jitted = jax.jit(lambda tree, k: {"y": jnp.tanh(tree["a"] @ tree["b"]) * k, "n": tree["n"] + 1})
    args = ({"a": jnp.arange(12.0).reshape(3, 4) / 7, "b": jnp.ones((4, 2)), "n": jnp.int32(3)}, jnp.float32(2))
    return program_cache.CachedProgram(jitted, "small", lambda: "small"), args


def test_a_broken_entry_is_compiled_again_and_rewritten(use_folder, tmp_path):
    folder = use_folder(tmp_path / "programs")
    prog, args = small_program()
    want = prog(*args)
    (entry,) = folder.glob("small-*.pkl")
    entry.write_bytes(b"not a pickle")
    again, _ = small_program()
    assert_same(again(*args), want)
    assert again.loaded_from_disk == 0
    third, _ = small_program()
    assert_same(third(*args), want)
    assert third.loaded_from_disk == 1  # rewritten whole


def test_a_program_served_by_jax_persistent_cache_is_not_kept(use_folder, tmp_path):
    """XLA:CPU cannot serialize again an executable it deserialized (the copy fails at run time with
    "Function wrapped_slice.1 not found"), so a compile that jax's persistent cache served (its cache-hit
    event fired) runs but is not written."""
    folder = use_folder(tmp_path / "programs")
    prog, args = small_program()
    real = prog.jitted

    class ServedByJaxCache:  # jax's path, reporting a persistent-cache hit as jax does
        def trace(self, *a):
            jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
            return real.trace(*a)

    prog.jitted = ServedByJaxCache()
    assert_same(prog(*args), real(*args))
    assert not list(folder.glob("*.pkl"))


def test_the_folder_is_capped_least_recently_used_first(tmp_path):
    for i, name in enumerate(("old", "mid", "new")):
        p = tmp_path / f"chunk-{name}.pkl"
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))
    stale, live = tmp_path / ".chunk-killed.tmp", tmp_path / ".chunk-writing.tmp"  # a killed and a live writer
    for p in (stale, live):
        p.write_bytes(b"x")
    os.utime(stale, (1000, 1000))
    program_cache.evict(tmp_path, limit=250)
    assert sorted(p.name for p in tmp_path.glob("*.pkl")) == ["chunk-mid.pkl", "chunk-new.pkl"]
    assert not stale.exists() and live.exists()


def test_off_unless_enabled(monkeypatch, tmp_path):
    monkeypatch.setattr(program_cache, "_FOLDER", tmp_path)
    monkeypatch.setenv("PRECISION_LAB_PROGRAM_CACHE", "0")
    assert program_cache.folder() is None
    monkeypatch.delenv("PRECISION_LAB_PROGRAM_CACHE")
    assert program_cache.folder() == tmp_path
    monkeypatch.setattr(program_cache, "_FOLDER", None)
    assert program_cache.folder() is None
    calls = []
    prog = program_cache.CachedProgram(lambda *a: calls.append(a) or 7, "t", lambda: "")
    assert prog(1, 2) == 7 and calls == [(1, 2)]
